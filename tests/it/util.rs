//! Helpers shared by the integration tests: running the `kiln` binary, and seeded test data.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

use kiln_ir::interp::Tensor;
use kiln_ir::Graph;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// What a `kiln` process did.
pub struct Out {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `kiln` in the repository root, as a user would.
pub fn kiln(args: &[&str]) -> Out {
    kiln_env(args, &[])
}

/// The kernel cache every `kiln` the tests start shares (`KILN_KERNEL_CACHE_DIR`): in the target
/// directory, not the user's cache, and the same for the whole test run, so that the tests that
/// compile the same models compile each kernel once.
pub fn kernel_cache() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("kernel-cache")
}

/// A `kiln` command with the tests' [`kernel_cache`].
pub fn kiln_command() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln"));
    cmd.env("KILN_KERNEL_CACHE_DIR", kernel_cache());
    cmd
}

/// [`kiln`] with extra environment variables.
pub fn kiln_env(args: &[&str], env: &[(&str, &str)]) -> Out {
    let out = kiln_command().args(args).envs(env.iter().copied()).current_dir(root()).output().unwrap();
    Out {
        ok: out.status.success(),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}

/// SplitMix64: platform-independent, seeded per parameter name so that values do not depend on
/// graph order.
pub struct Rng(u64);

impl Rng {
    pub fn for_name(name: &str, seed: u64) -> Rng {
        Rng(name
            .bytes()
            .fold(0xCBF2_9CE4_8422_2325u64 ^ seed, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01B3)))
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[-scale, scale)`.
    pub fn uniform(&mut self, scale: f32) -> f32 {
        ((self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
    }
}

/// Seeded parameters of the graph's types: norms near 1, a small router bias, the embedding in ±1,
/// matrices in ±1/sqrt(fan_in) so that activations stay of order one.
pub fn random_params(g: &Graph, seed: u64) -> HashMap<String, Tensor> {
    g.params()
        .into_iter()
        .map(|(name, ty)| {
            let shape: Vec<u64> = ty.shape.iter().map(|d| d.as_known().unwrap()).collect();
            let n = shape.iter().product::<u64>() as usize;
            let mut rng = Rng::for_name(name, seed);
            let (offset, scale) = if name.ends_with("norm.weight") {
                (1.0, 0.1)
            } else if name.ends_with("e_score_correction_bias") {
                (0.0, 0.05)
            } else if name.contains("embed_tokens") {
                (0.0, 1.0)
            } else {
                (0.0, 1.0 / (shape[1] as f32).sqrt())
            };
            let data = (0..n).map(|_| offset + rng.uniform(scale)).collect();
            (name.to_string(), Tensor::from_f32(ty.dtype, shape, data).unwrap())
        })
        .collect()
}

/// A fresh, empty directory for one test, removed when dropped.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new() -> Scratch {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "kiln-it-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    pub fn str(&self, name: &str) -> String {
        self.path(name).to_string_lossy().into_owned()
    }

    /// Every entry of the directory, hidden ones included.
    pub fn entries(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&self.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }
}

/// The activation arena of `spec`'s train step compiled for the CPU at 8 x 256 tokens (into
/// `name` under `s`), with `kiln compile`'s `extra` arguments.
pub fn train_arena(s: &Scratch, spec: &str, name: &str, extra: &[&str]) -> u64 {
    let out = s.str(name);
    let base = ["compile", spec, "--train", "--target", "cpu", "--max-batch", "8"];
    let r = kiln(&[&base[..], &["--max-context", "256", "-o", &out], extra].concat());
    assert!(r.ok, "{}", r.stderr);
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(s.path(name).join("manifest.json")).unwrap()).unwrap();
    m["programs"][0]["arena_bytes"].as_u64().unwrap()
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
