//! Scoring token sequences: the mean next-token cross-entropy and the perplexity of a model on a
//! data set ([`crate::data::TokenRows`]), over any [`Engine`] that has a `score` program (a
//! compiled artifact on any backend, or the reference interpreter), so compiled and interpreted
//! scores are computed by the same loop.
//!
//! A `score` program takes `tokens`, `positions` and `targets` `[B, T]` and outputs `loss` f32
//! `[B, T]`, the loss of each position's target. Each row of `T + 1` tokens gives the inputs
//! `row[..T]` at positions `0..T` and the targets `row[1..]`; rows run `batch` at a time (the
//! last batch may be smaller; every row has the same `T`, so nothing is padded). Losses are summed
//! in f64, so the mean does not depend on the batch size beyond the last bit of each f32 loss.

use std::time::{Duration, Instant};

use kiln_ir::module::ProgramKind;

use crate::data::{DataError, TokenRows};
use crate::generate::{program_of, Engine};
use crate::weights::{HostData, HostTensor};
use crate::RuntimeError;

/// The output a `score` program writes.
pub const LOSS: &str = "loss";

/// What [`score`] measured.
#[derive(Clone, Debug, PartialEq)]
pub struct Score {
    /// Targets scored (rows times `T`).
    pub tokens: u64,
    /// Mean next-token cross-entropy, in nats per token.
    pub mean_loss: f64,
    /// Each row's mean loss.
    pub row_loss: Vec<f64>,
    /// Every target's loss, row-major `[rows, T]`.
    pub token_loss: Vec<f32>,
    pub elapsed: Duration,
}

impl Score {
    /// `exp(mean loss)`.
    pub fn perplexity(&self) -> f64 {
        self.mean_loss.exp()
    }
}

/// Why a data set could not be scored.
#[derive(Debug, thiserror::Error)]
pub enum ScoreError {
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
}

/// Scores every row of `rows` on `engine`'s `score` program, `batch` rows per run (at most what
/// the program takes). The rows are checked against the vocabulary and the program's context
/// before anything runs.
pub fn score(engine: &mut dyn Engine, rows: &TokenRows, batch: usize) -> Result<Score, ScoreError> {
    let program = program_of(engine, ProgramKind::Score).ok_or_else(|| RuntimeError::NoSuchProgram {
        name: "score".into(),
        known: engine.programs().iter().map(|(n, _)| format!("`{n}`")).collect::<Vec<_>>().join(", "),
    })?;
    if batch == 0 {
        return Err(RuntimeError::BadOption("the batch must be at least 1 row".into()).into());
    }
    // Without a `logits` output to read the vocabulary from, the engine's own check of each run's
    // ids (the executor's index inputs, the interpreter's ops) still refuses a bad id.
    let vocab = engine.vocab_size().unwrap_or(u64::MAX);
    let limits = engine.limits(&program);
    rows.check(vocab, limits.max_tokens, &limits.what)?;
    let batch = (batch as u64).min(limits.max_batch.max(1)) as usize;
    let inputs = engine.inputs(&program)?;
    let t = rows.width() - 1;
    let start = Instant::now();
    let mut token_loss = Vec::with_capacity(rows.rows() * t);
    let mut first = 0;
    while first < rows.rows() {
        let n = batch.min(rows.rows() - first);
        let shape = vec![n as u64, t as u64];
        let mut feeds = Vec::with_capacity(inputs.len());
        for (name, dtype) in &inputs {
            let data: Vec<i64> = match name.as_str() {
                "tokens" => (first..first + n).flat_map(|r| rows.row(r)[..t].to_vec()).collect(),
                "targets" => (first..first + n).flat_map(|r| rows.row(r)[1..].to_vec()).collect(),
                "positions" => (0..n).flat_map(|_| 0..t as i64).collect(),
                other => return Err(RuntimeError::UnknownModelInput(other.to_string()).into()),
            };
            feeds.push(HostTensor {
                name: name.clone(),
                dtype: *dtype,
                shape: shape.clone(),
                data: HostData::I64(data),
            });
        }
        engine.run(&program, &feeds)?;
        token_loss.extend(engine.output_f32(LOSS, 0..n * t)?);
        first += n;
    }
    let elapsed = start.elapsed();
    let row_loss: Vec<f64> = token_loss
        .chunks(t.max(1))
        .map(|r| r.iter().map(|&x| f64::from(x)).sum::<f64>() / t as f64)
        .collect();
    let total: f64 = token_loss.iter().map(|&x| f64::from(x)).sum();
    let tokens = token_loss.len() as u64;
    Ok(Score { tokens, mean_loss: total / tokens.max(1) as f64, row_loss, token_loss, elapsed })
}
