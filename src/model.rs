//! A model loaded for conversation and serving (`kiln chat`, `kiln serve`): an engine (an artifact
//! on the CPU backend, or with `--interp` a spec or an artifact's graph on the reference
//! interpreter), with what generation needs to know of it, and the text side: the tokenizer and the
//! chat template of the tokenizer folder (the weights folder unless `--tokenizer` says otherwise).
//!
//! The engine is loaded where it will run (the CPU backend's memory is not shared between threads),
//! so [`Source`] is owned data a thread can take.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use kiln_compiler::{build, spec};
use kiln_runtime::artifact;
use kiln_runtime::cpu::CpuModel;
use kiln_runtime::generate::{program_of, Engine};
use kiln_runtime::reference::Reference;
use kiln_runtime::weights;

use crate::chat::template::{self, ChatTemplate};
use crate::run::{self, Weights};
use crate::tokenize::{self, TextTokenizer};

/// Where a model comes from (`MODEL`, `--weights`/`--random-weights`, `--interp`, `--threads`).
#[derive(Clone, Debug)]
pub struct Source {
    pub model: PathBuf,
    /// A checkpoint folder, or `None` with `random_seed`.
    pub weights: Option<PathBuf>,
    pub random_seed: Option<u64>,
    pub interp: bool,
    pub threads: Option<usize>,
}

/// A loaded engine and what generation needs to know of it.
pub struct Loaded {
    pub engine: Box<dyn Engine>,
    pub info: Info,
}

/// The limits and names of a loaded model, which request checks need (and can share across threads).
#[derive(Clone, Debug)]
pub struct Info {
    /// The model's name (the spec's), which a server reports as the model id.
    pub name: String,
    /// How it runs, for the startup line.
    pub what: String,
    pub vocab: u64,
    /// The model's end-of-sequence token.
    pub eos: Option<i64>,
    /// Sequences per batch.
    pub max_batch: u64,
    /// Prompt tokens one prefill takes.
    pub max_prompt: u64,
    /// Positions a sequence may reach: prompt plus new tokens less one (the KV cache's capacity).
    pub max_positions: u64,
}

impl Source {
    fn weights(&self) -> Weights<'_> {
        match (&self.weights, self.random_seed) {
            (Some(dir), _) => Weights::Checkpoint(dir),
            (None, Some(seed)) => Weights::Random(seed),
            (None, None) => Weights::Random(0),
        }
    }

    /// Loads the engine, checking the artifact and the weights first; `command` names the verb in
    /// messages.
    pub fn load(&self, command: &str) -> Result<Loaded> {
        let weights = self.weights();
        if !run::is_artifact(&self.model) {
            if !self.interp {
                return Err(run::not_an_artifact(&self.model, command));
            }
            let spec = spec::load(&self.model)?;
            let graph = build::build_graph(&spec)?;
            let mut ckpt = None;
            let tensors = run::params(weights::graph_params(&graph)?, &weights, Some(&spec), &mut ckpt)?
                .collect::<Result<Vec<_>, _>>()?;
            let engine = Reference::new(graph, tensors, Some(spec.model.max_position_embeddings))?;
            let eos = spec.model.eos_token_id.map(|e| e as i64);
            return info(Box::new(engine), &spec.model.name, "reference interpreter", eos);
        }
        let art = artifact::load(&self.model)?;
        let m = art.manifest();
        let spec = m.model.as_ref();
        let name = spec.map_or(m.name.as_str(), |s| s.model.name.as_str()).to_string();
        let eos = spec.and_then(|s| s.model.eos_token_id).map(|e| e as i64);
        let decls = weights::manifest_params(m)?;
        let mut ckpt = None;
        if self.interp {
            let tensors = run::params(decls, &weights, spec, &mut ckpt)?.collect::<Result<Vec<_>, _>>()?;
            let first = [kiln_ir::ProgramKind::Prefill, kiln_ir::ProgramKind::Forward]
                .iter()
                .find_map(|&k| m.program_of_kind(k))
                .map_or("forward", |p| p.name.as_str());
            let max_positions = spec.map(|s| s.model.max_position_embeddings);
            let engine = Reference::new(art.program_graph(first)?, tensors, max_positions)?;
            return info(Box::new(engine), &name, "reference interpreter on module.kir", eos);
        }
        let params = run::mapped_params(decls, &weights, spec, &mut ckpt)?;
        let model = CpuModel::load(&art, params, &run::cpu_options(self.threads))?;
        let what = format!("compiled artifact on the CPU, {} threads", model.threads());
        info(Box::new(model), &name, &what, eos)
    }

    /// The folder the tokenizer and chat template are read from: `tokenizer`, else the weights'.
    pub fn text_folder<'a>(&'a self, tokenizer: Option<&'a Path>) -> Option<&'a Path> {
        tokenizer.or(self.weights.as_deref().map(tokenize::weights_folder))
    }
}

fn info(engine: Box<dyn Engine>, name: &str, what: &str, eos: Option<i64>) -> Result<Loaded> {
    let plan = [kiln_ir::ProgramKind::Prefill, kiln_ir::ProgramKind::Forward]
        .iter()
        .find_map(|&k| program_of(engine.as_ref(), k))
        .context("the model has neither a prefill nor a forward program to generate with")?;
    let limits = engine.limits(&plan);
    let vocab = engine.vocab_size().context("the model has no `logits` output to generate from")?;
    let max_positions = engine.kv_cache().map_or(limits.max_tokens, |c| c.capacity);
    let info = Info {
        name: name.to_string(),
        what: what.to_string(),
        vocab,
        eos,
        max_batch: limits.max_batch,
        max_prompt: limits.max_tokens.min(max_positions),
        max_positions,
    };
    Ok(Loaded { engine, info })
}

/// The tokenizer of `folder`, and its chat template when `folder` has a `tokenizer_config.json`
/// with one (otherwise the reason there is none, for whoever asks for chat).
pub struct Text {
    pub tokenizer: TextTokenizer,
    pub template: Result<ChatTemplate, String>,
}

impl Text {
    pub fn load(folder: &Path) -> Result<Text> {
        let tokenizer = tokenize::load(folder)?;
        let template = template::load(folder).map_err(|e| format!("{e:#}"));
        Ok(Text { tokenizer, template })
    }

    /// The token ids that end an assistant's turn: the model's end-of-sequence token and the
    /// template's `eos_token`, when the tokenizer has it.
    pub fn stop_ids(&self, eos: Option<i64>) -> Vec<i64> {
        let mut ids: Vec<i64> = eos.into_iter().collect();
        let named = self.template.as_ref().ok().and_then(|t| t.eos_token());
        if let Some(id) = named.and_then(|t| self.tokenizer.token_id(t)) {
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
        ids
    }
}
