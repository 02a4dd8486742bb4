//! `kiln export-hf SPEC --random-weights SEED -o DIR`: a Hugging Face checkpoint folder of a model
//! spec with kiln's seeded random weights, so that transformers and kiln run the very same model
//! (`tools/bench/compare_torch.py`).
//!
//! The folder holds `config.json` (`kiln_compiler::spec::to_hf_config`) and `model.safetensors`
//! (`kiln_runtime::weights::random_params` of the graph `kiln compile` builds, MTP modules included,
//! with the standard deviation `kiln run --random-weights` uses, so the two give the same weights for
//! the same seed), each tensor in its declared dtype. It is written atomically: into a hidden sibling
//! renamed into place when complete; an existing folder is replaced only if it holds nothing but a
//! checkpoint's files. A tokenizer someone put there (for `kiln run --prompt`) is left as it is:
//! export-hf writes none, and carries an existing one over into the new folder.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use kiln_compiler::{build, spec};
use kiln_runtime::weights::{self, StoreFloats};

/// The files `export-hf` writes; a folder holding only these (and [`KEPT`]) may be replaced.
const FILES: [&str; 2] = ["config.json", "model.safetensors"];

/// Tokenizer files export-hf does not write but keeps when it replaces a folder.
const KEPT: [&str; 2] = ["tokenizer.json", "tokenizer_config.json"];

pub fn run(spec_path: &Path, seed: u64, dir: &Path, out: &mut impl Write) -> Result<()> {
    let spec = spec::load(spec_path)?;
    if spec.quantization.is_some() {
        bail!(
            "{}: export-hf writes unquantised random weights, but the spec has [quantization]: FP8 \
             checkpoints need block scales, which random weights do not model; remove [quantization]",
            spec_path.display()
        );
    }
    if dir.exists() && !replaceable(dir)? {
        bail!("{} exists and holds more than a checkpoint's files; refusing to replace it", dir.display());
    }
    let graph = build::build_graph(&spec)?;
    let tensors = weights::random_params(&graph, seed, crate::run::RANDOM_STD)?;
    let count = tensors.len();
    let bytes: u64 = graph_bytes(&tensors, spec.model.dtype.size_bytes());

    let name = dir.file_name().with_context(|| format!("{} is not a folder path", dir.display()))?;
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let tmp: PathBuf = parent.join(format!(".{}.tmp-{}", name.to_string_lossy(), std::process::id()));
    let written = (|| -> Result<()> {
        std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        let config = serde_json::to_string_pretty(&spec::to_hf_config(&spec))? + "\n";
        std::fs::write(tmp.join(FILES[0]), config)
            .with_context(|| format!("cannot write {}", tmp.join(FILES[0]).display()))?;
        weights::write_safetensors(&tmp.join(FILES[1]), &tensors, StoreFloats::AsDeclared)?;
        if dir.exists() {
            for f in KEPT.iter().map(|f| dir.join(f)).filter(|f| f.is_file()) {
                let to = tmp.join(f.file_name().expect("a joined file name"));
                std::fs::copy(&f, &to).with_context(|| format!("cannot keep {}", f.display()))?;
            }
            std::fs::remove_dir_all(dir).with_context(|| format!("cannot replace {}", dir.display()))?;
        }
        std::fs::rename(&tmp, dir).with_context(|| format!("cannot write {}", dir.display()))?;
        Ok(())
    })();
    if written.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    written?;
    writeln!(
        out,
        "wrote {}: config.json (model_type {}) and model.safetensors ({count} tensors, {bytes} bytes of \
         {}, random weights seed {seed})",
        dir.display(),
        spec::to_hf_config(&spec)["model_type"].as_str().unwrap_or("?"),
        spec.model.dtype.name()
    )?;
    Ok(())
}

/// Whether `dir` is a folder holding only a checkpoint's files (or nothing).
fn replaceable(dir: &Path) -> Result<bool> {
    if !dir.is_dir() {
        return Ok(false);
    }
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))? {
        let entry = entry?;
        if !FILES.iter().chain(&KEPT).any(|f| entry.file_name() == *f) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Bytes of the tensor data at `elem` bytes per value (every parameter of a built graph has the
/// model's dtype).
fn graph_bytes(tensors: &[weights::HostTensor], elem: u64) -> u64 {
    tensors.iter().map(|t| t.data.len() as u64 * elem).sum()
}
