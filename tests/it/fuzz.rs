//! Bounded fuzzing, run by `cargo test` and so by CI: arbitrary and mutated bytes into every parser
//! of a file a user hands kiln, which must answer with a value or an error and never panic. The
//! targets are the spec loader (TOML and Hugging Face JSON, as `kiln` reads them: bytes, which need
//! not be UTF-8), the `.kir` reader (UTF-8, parser, verifiers, locating), the safetensors header
//! (through `open_checkpoint` and a read of every tensor) and the artifact manifest
//! (`artifact::parse_manifest`: JSON, version, decoding and `Manifest::validate`, which the runtime
//! relies on for memory safety), the last also with values replaced inside well-formed JSON so
//! that the mutations reach the validator.
//!
//! Each target runs [`CASES`] cases (`PROPTEST_CASES` sets another number, for a longer run by
//! hand): together about 5 seconds in a debug build. 20,000 each (50 s) found nothing. The seeds inputs are mutated
//! from are real files: `models/deepseek_v3.toml`, the V3 config fixture, every `tests/kir/good`
//! file, a written checkpoint and the manifest of a compiled artifact.

use std::path::Path;
use std::sync::OnceLock;

use proptest::prelude::*;
use proptest::sample::Index;

use kiln_runtime::weights::{open_checkpoint, write_safetensors, HostData, HostTensor, StoreFloats};

use crate::util::{kiln, root, Scratch};

/// Up to eight edits of a byte string: an insertion, a deletion or a replacement of one byte at a
/// chosen place, any byte value (so the result is often not UTF-8).
fn edits() -> impl Strategy<Value = Vec<(Index, u8, u8)>> {
    prop::collection::vec((any::<Index>(), 0u8..3, any::<u8>()), 1..8)
}

fn mutate(seed: &[u8], edits: &[(Index, u8, u8)], cut: Option<Index>) -> Vec<u8> {
    let mut bytes = seed.to_vec();
    for &(at, kind, b) in edits {
        let i = at.index(bytes.len() + 1);
        match kind {
            0 => bytes.insert(i, b),
            _ if i == bytes.len() => {}
            1 => drop(bytes.remove(i)),
            _ => bytes[i] = b,
        }
    }
    if let Some(cut) = cut {
        bytes.truncate(cut.index(bytes.len() + 1));
    }
    bytes
}

fn read(rel: &str) -> Vec<u8> {
    std::fs::read(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// Every `tests/kir/good` file, the seeds of the `.kir` target.
fn kir_seeds() -> &'static [Vec<u8>] {
    static SEEDS: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    SEEDS.get_or_init(|| {
        let mut names: Vec<_> = std::fs::read_dir(root().join("tests/kir/good"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "kir"))
            .collect();
        names.sort();
        names.iter().map(|p| std::fs::read(p).unwrap()).collect()
    })
}

/// The manifest of `tests/compile/small.kir` compiled for the CPU.
fn manifest_seed() -> &'static [u8] {
    static SEED: OnceLock<Vec<u8>> = OnceLock::new();
    SEED.get_or_init(|| {
        let s = Scratch::new();
        let out = kiln(&["compile", "tests/compile/small.kir", "--target", "cpu", "-o", &s.str("art")]);
        assert!(out.ok, "{}", out.stderr);
        std::fs::read(s.path("art/manifest.json")).unwrap()
    })
}

/// A checkpoint of a few tensors of the dtypes a checkpoint holds.
fn checkpoint_seed() -> &'static [u8] {
    static SEED: OnceLock<Vec<u8>> = OnceLock::new();
    SEED.get_or_init(|| {
        let s = Scratch::new();
        let t =
            |name: &str, dtype, shape: Vec<u64>, data| HostTensor { name: name.into(), dtype, shape, data };
        let tensors = [
            t("a", kiln_ir::DType::F32, vec![2, 3], HostData::F32(vec![1.0, -2.0, 0.5, 3.0, 0.0, 7.0])),
            t("b", kiln_ir::DType::BF16, vec![4], HostData::F32(vec![1.0, 2.0, 3.0, 4.0])),
            t("c", kiln_ir::DType::I64, vec![2], HostData::I64(vec![5, -6])),
        ];
        write_safetensors(&s.path("model.safetensors"), &tensors, StoreFloats::AsDeclared).unwrap();
        std::fs::read(s.path("model.safetensors")).unwrap()
    })
}

/// Opens `bytes` as a checkpoint file and reads every tensor it lists; errors are fine.
fn open_and_read(dir: &Path, bytes: &[u8]) {
    let path = dir.join("model.safetensors");
    std::fs::write(&path, bytes).unwrap();
    if let Ok(ckpt) = open_checkpoint(&path) {
        let names: Vec<String> = ckpt.tensors().map(|t| t.name.clone()).collect();
        for name in names {
            let _ = ckpt.read(&name).map_err(|e| e.to_string());
        }
    }
}

/// Every leaf of a JSON value, as a JSON pointer.
fn leaves(v: &serde_json::Value, at: String, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => m.iter().for_each(|(k, x)| leaves(x, format!("{at}/{k}"), out)),
        serde_json::Value::Array(a) => {
            a.iter().enumerate().for_each(|(i, x)| leaves(x, format!("{at}/{i}"), out))
        }
        _ => out.push(at),
    }
}

/// Values a hand edit or a corruption puts into a manifest field.
fn replacement() -> impl Strategy<Value = serde_json::Value> {
    prop_oneof![
        prop::sample::select(vec![0u64, 1, 2, 255, 256, 4096, 1 << 32, 1 << 53, u64::MAX])
            .prop_map(Into::into),
        any::<u64>().prop_map(Into::into),
        any::<i64>().prop_map(Into::into),
        Just(serde_json::json!(1.5e308)),
        Just(serde_json::Value::Null),
        prop::sample::select(vec![
            "",
            "B",
            "T*S",
            "99999999*B*T",
            "k0",
            "f8e4m3",
            "%0",
            "kernels.so",
            "../x"
        ])
        .prop_map(Into::into),
    ]
}

/// Cases per target in `cargo test`.
const CASES: u32 = 1024;

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(CASES);
    ProptestConfig { cases, ..ProptestConfig::default() }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn the_spec_loader_never_panics(
        edits in edits(),
        cut in proptest::option::of(any::<Index>()),
        noise in prop::collection::vec(any::<u8>(), 0..256),
    ) {
        let toml = mutate(&read("models/deepseek_v3.toml"), &edits, cut);
        let json = mutate(&read("tests/fixtures/hf/deepseek_v3_config.json"), &edits, cut);
        for (name, bytes) in [("m.toml", &toml), ("c.json", &json), ("n.toml", &noise), ("n.json", &noise)] {
            if let Err(e) = kiln_compiler::spec::parse_bytes(Path::new(name), bytes) {
                let _ = e.to_string();
            }
        }
    }

    #[test]
    fn the_kir_reader_never_panics(
        seed in any::<Index>(),
        edits in edits(),
        noise in prop::collection::vec(any::<u8>(), 0..256),
    ) {
        let seeds = kir_seeds();
        let bytes = mutate(&seeds[seed.index(seeds.len())], &edits, None);
        for bytes in [&bytes, &noise] {
            if let Err(d) = kiln_ir::text::read_file("f.kir", bytes) {
                prop_assert!(d.line >= 1 && d.col >= 1, "{d:?}");
            }
        }
    }

    #[test]
    fn the_safetensors_header_never_panics(
        edits in edits(),
        cut in proptest::option::of(any::<Index>()),
        noise in prop::collection::vec(any::<u8>(), 0..128),
    ) {
        let s = Scratch::new();
        open_and_read(&s.0, &mutate(checkpoint_seed(), &edits, cut));
        open_and_read(&s.0, &noise);
    }

    #[test]
    fn the_manifest_parser_never_panics(
        edits in edits(),
        cut in proptest::option::of(any::<Index>()),
        fields in prop::collection::vec((any::<Index>(), replacement()), 1..4),
    ) {
        let dir = Path::new("art");
        let seed = manifest_seed();
        let _ = kiln_runtime::artifact::parse_manifest(dir, &mutate(seed, &edits, cut)).map_err(|e| e.to_string());
        // Values replaced in well-formed JSON reach the validator.
        let mut v: serde_json::Value = serde_json::from_slice(seed).unwrap();
        let mut all = Vec::new();
        leaves(&v, String::new(), &mut all);
        for (at, value) in fields {
            let pointer = &all[at.index(all.len())];
            *v.pointer_mut(pointer).unwrap() = value;
        }
        let bytes = serde_json::to_vec(&v).unwrap();
        let _ = kiln_runtime::artifact::parse_manifest(dir, &bytes).map_err(|e| e.to_string());
    }
}
