//! Model specs: TOML files and Hugging Face `config.json`s into a validated [`ModelSpec`], and back to
//! canonical TOML.
//!
//! ```text
//! models/x.toml ──parse_toml──┐
//!                             ├──▶ ModelSpec ──validate──▶ ModelSpec (valid) ──to_toml──▶ canonical TOML
//! config.json ───import_hf────┘
//!
//! ModelSpec ──to_hf_config──▶ config.json (for `kiln export-hf`)
//! ```
//!
//! Every error that is about the content of a file is a [`Diagnostic`] with file, line and column and
//! the offending line under a caret: syntax errors, unknown or missing keys, values of the wrong type,
//! and values that break a rule of the architecture (`validate`, one function per rule). I/O errors
//! name the path.
//!
//! What this module does not do: it never guesses. A Hugging Face key kiln does not model is ignored
//! only when it cannot change the computation (`use_cache`, `initializer_range`, ...); a value kiln
//! cannot honour (`attention_bias: true`, `hidden_act: "gelu"`, GQA) is an error at that key.
//!
//! Architecture invariant: `ir` knows nothing about TOML or JSON; the span-carrying parse lives here.

mod emit;
mod hf;
mod hf_out;
mod json;
pub mod limits;
mod load;
mod validate;

use std::path::{Path, PathBuf};

pub use kiln_ir::spec::ModelSpec;
use kiln_ir::Diagnostic;

pub use emit::to_toml;
pub use hf::import_hf;
pub use hf_out::to_hf_config;
pub use load::parse_toml;
pub use validate::{validate, Violation};

/// Why a model spec could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("cannot read model spec `{}`: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The text is not UTF-8, or not well-formed TOML or JSON.
    #[error("{0}")]
    Syntax(Diagnostic),
    /// Well-formed, but a key is unknown or missing, or a value has the wrong type.
    #[error("{0}")]
    Schema(Diagnostic),
    /// Every key is understood, but the values break a rule of the architecture.
    #[error("{0}")]
    Invalid(Diagnostic),
    /// A Hugging Face config asks for something kiln does not implement.
    #[error("{0}")]
    Unsupported(Diagnostic),
}

impl SpecError {
    /// The located diagnostic, for every error about the content of a file.
    pub fn diagnostic(&self) -> Option<&Diagnostic> {
        match self {
            SpecError::Io { .. } => None,
            SpecError::Syntax(d)
            | SpecError::Schema(d)
            | SpecError::Invalid(d)
            | SpecError::Unsupported(d) => Some(d),
        }
    }
}

/// Loads a model spec from a file: `*.json` is imported as a Hugging Face `config.json`
/// ([`import_hf`]), anything else is parsed as kiln TOML ([`parse_toml`]); a folder is its
/// `config.json`. Diagnostics name the path as given.
pub fn load(path: &Path) -> Result<ModelSpec, SpecError> {
    // A Hugging Face model folder is its config.json.
    let config;
    let path = if path.is_dir() {
        config = path.join("config.json");
        if !config.is_file() {
            return Err(SpecError::Io {
                path: path.to_path_buf(),
                source: std::io::Error::other(
                    "a folder is a model spec when it holds a Hugging Face config.json, and this one does not",
                ),
            });
        }
        config.as_path()
    } else {
        path
    };
    let bytes = std::fs::read(path).map_err(|source| SpecError::Io { path: path.to_path_buf(), source })?;
    parse_bytes(path, &bytes)
}

/// [`load`] on the bytes of the file at `path`: text that is not UTF-8 is an error at its first
/// bad byte.
pub fn parse_bytes(path: &Path, bytes: &[u8]) -> Result<ModelSpec, SpecError> {
    let file = path.display().to_string();
    let src = kiln_ir::diag::utf8(&file, bytes).map_err(SpecError::Syntax)?;
    if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("json")) {
        import_hf(&file, src)
    } else {
        parse_toml(&file, src)
    }
}
