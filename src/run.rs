//! `kiln run`: greedy generation with the reference interpreter.
//!
//! The graph is built from the spec without the MTP module (inference needs only the main logits),
//! weights come from a Hugging Face checkpoint folder or a seeded random initialisation, and every
//! step recomputes the whole sequence (the interpreter has no KV cache: it is the oracle, not the
//! fast path). Tokens are printed as they come.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use kiln_compiler::{build, spec};
use kiln_ir::interp::{self, Tensor};
use kiln_ir::{DType, ModelSpec};
use kiln_runtime::weights::{self, HostData, HostTensor};

/// Where the parameters come from.
pub enum Weights<'a> {
    Checkpoint(&'a Path),
    Random(u64),
}

/// Standard deviation of random weights: Hugging Face's default `initializer_range`.
const RANDOM_STD: f64 = 0.02;

pub struct Request<'a> {
    pub spec: &'a Path,
    pub weights: Weights<'a>,
    pub prompt: Vec<i64>,
    pub max_new_tokens: u64,
    pub ignore_eos: bool,
}

fn to_tensor(t: HostTensor) -> Result<Tensor> {
    let name = t.name.clone();
    let tensor = match t.data {
        HostData::F32(v) => Tensor::from_f32(t.dtype, t.shape, v),
        HostData::I64(v) => Tensor::from_i64(t.dtype, t.shape, v),
    };
    tensor.with_context(|| format!("parameter {name}"))
}

fn check_prompt(spec: &ModelSpec, req: &Request) -> Result<()> {
    if req.prompt.is_empty() {
        bail!("the prompt is empty: give at least one token id with --prompt-ids");
    }
    let vocab = spec.model.vocab_size;
    if let Some((i, &t)) = req.prompt.iter().enumerate().find(|&(_, &t)| t < 0 || t as u64 >= vocab) {
        bail!("prompt token {i} is {t}, outside the vocabulary: ids must be in 0..{vocab}");
    }
    let total = req.prompt.len() as u64 + req.max_new_tokens;
    let max = spec.model.max_position_embeddings;
    if total > max {
        bail!(
            "{} prompt tokens + {} new tokens = {total} exceed the model's context of {max} positions",
            req.prompt.len(),
            req.max_new_tokens
        );
    }
    Ok(())
}

/// Runs greedy generation and writes the report to `out`.
pub fn run(req: &Request, out: &mut impl Write) -> Result<()> {
    let mut spec = spec::load(req.spec)?;
    spec.mtp = None;
    check_prompt(&spec, req)?;
    let graph = build::build_graph(&spec)?;
    let params: Vec<HostTensor> = match req.weights {
        Weights::Checkpoint(dir) => {
            let ckpt = weights::open_checkpoint(dir)?;
            let ckpt = match &spec.quantization {
                Some(q) => ckpt.with_weight_block(q.weight_block)?,
                None => ckpt,
            };
            weights::bind(&graph, &ckpt)?
        }
        Weights::Random(seed) => weights::random_params(&graph, seed, RANDOM_STD)?,
    };
    let params: HashMap<String, Tensor> =
        params.into_iter().map(|t| Ok((t.name.clone(), to_tensor(t)?))).collect::<Result<_>>()?;

    writeln!(out, "{}: {} prompt tokens, greedy, reference interpreter", spec.model.name, req.prompt.len())?;
    let eos = spec.model.eos_token_id.filter(|_| !req.ignore_eos);
    let mut seq = req.prompt.clone();
    let mut generated = Vec::new();
    let mut last_logits = Vec::new();
    let start = Instant::now();
    for _ in 0..req.max_new_tokens {
        let t = seq.len() as u64;
        let inputs = HashMap::from([
            ("tokens".to_string(), Tensor::from_i64(DType::I32, [1, t], seq.clone())?),
            ("positions".to_string(), Tensor::from_i64(DType::I32, [1, t], (0..t as i64).collect())?),
        ]);
        let outputs = interp::run(&graph, &inputs, &params)?;
        let logits = outputs["logits"].as_f32().context("logits are not floats")?;
        let vocab = spec.model.vocab_size as usize;
        let last = &logits[logits.len() - vocab..];
        let (next, &best) =
            last.iter().enumerate().fold((0, &last[0]), |acc, (i, x)| if *x > *acc.1 { (i, x) } else { acc });
        let lse = best + last.iter().map(|&x| (x - best).exp()).sum::<f32>().ln();
        writeln!(out, "token {next:>6}  logit {best:>9.4}  p {:.4}", (best - lse).exp())?;
        out.flush()?;
        generated.push(next as i64);
        seq.push(next as i64);
        last_logits = last.to_vec();
        if eos == Some(next as u64) {
            writeln!(out, "stopped at the end-of-sequence token {next}")?;
            break;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    writeln!(out, "generated {} tokens: {generated:?}", generated.len())?;
    if !last_logits.is_empty() {
        let n = last_logits.len() as f32;
        let (min, max) =
            last_logits.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &x| (a.min(x), b.max(x)));
        let mean = last_logits.iter().sum::<f32>() / n;
        writeln!(out, "last logits: min {min:.4}, max {max:.4}, mean {mean:.4} over {n} entries")?;
    }
    writeln!(
        out,
        "{} forward passes in {secs:.3} s ({:.3} s each)",
        generated.len(),
        secs / generated.len().max(1) as f64
    )?;
    Ok(())
}
