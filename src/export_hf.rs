//! `kiln export-hf SPEC --random-weights SEED -o DIR`: a Hugging Face checkpoint folder of a model
//! spec with kiln's seeded random weights, so that transformers and kiln run the very same model
//! (`tools/bench/compare_torch.py`).
//!
//! The folder holds `config.json` (`kiln_compiler::spec::to_hf_config`) and `model.safetensors`
//! (`kiln_runtime::weights::random_params` of the graph `kiln compile` builds, MTP modules included,
//! with the standard deviation `kiln run --random-weights` uses, so the two give the same weights for
//! the same seed), each tensor in its declared dtype. It is written atomically
//! (`kiln_ir::output::replace_dir`: a hidden sibling renamed into place when complete); an existing
//! folder is replaced only if it holds nothing but a checkpoint's files (not a link to one, and not
//! one holding the spec). A tokenizer someone put there (for `kiln run --prompt`) is left as it is:
//! export-hf writes none, and carries an existing one over into the new folder.

use std::io::Write;
use std::path::Path;

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
    if dir.symlink_metadata().is_ok() && !replaceable(dir)? {
        bail!(
            "{} exists and is not a checkpoint folder export-hf wrote (a folder holding only {} and \
             maybe a tokenizer); refusing to replace it: give a new path",
            dir.display(),
            FILES.join(" and ")
        );
    }
    kiln_ir::output::check_not_input(dir, &[spec_path])?;
    let graph = build::build_graph(&spec)?;
    // The tensors are made a batch at a time as the file is written (`random_tensors`), not all
    // at once: a model larger than this machine's memory is written whole, as long as the disk
    // holds it.
    let decls = weights::graph_params(&graph)?;
    let count = decls.len();
    let bytes = (decls.iter())
        .map(|d| (d.numel as u64).saturating_mul(spec.model.dtype.size_bytes()))
        .fold(0u64, u64::saturating_add);
    let heads: Vec<weights::TensorHead> = (decls.iter())
        .map(|d| weights::TensorHead { name: d.name.clone(), dtype: d.dtype, shape: d.shape.clone() })
        .collect();
    let mut made = weights::random_tensors(decls, seed, crate::run::RANDOM_STD);

    kiln_ir::output::replace_dir(dir, |tmp| -> Result<()> {
        let config = serde_json::to_string_pretty(&spec::to_hf_config(&spec))? + "\n";
        std::fs::write(tmp.join(FILES[0]), config)
            .with_context(|| format!("cannot write {}", tmp.join(FILES[0]).display()))?;
        let next = |i: usize| {
            let t = made.next().ok_or_else(|| format!("tensor {i} of {count} was not made"))?;
            Ok(std::borrow::Cow::Owned(t))
        };
        weights::write_safetensors_streamed(&tmp.join(FILES[1]), &heads, StoreFloats::AsDeclared, next)?;
        for f in KEPT.iter().map(|f| dir.join(f)).filter(|f| f.is_file()) {
            let to = tmp.join(f.file_name().expect("a joined file name"));
            std::fs::copy(&f, &to).with_context(|| format!("cannot keep {}", f.display()))?;
        }
        Ok(())
    })?;
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

/// Whether `dir` is a folder (not a link to one) holding only a checkpoint's files (or nothing).
fn replaceable(dir: &Path) -> Result<bool> {
    if !dir.symlink_metadata()?.is_dir() {
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
