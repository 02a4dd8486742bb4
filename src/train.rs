//! `kiln train`: next-token training of a model spec on token data, one compiled train-step
//! program per step (`kiln_compiler::train`: forward, loss, backward, clipping, AdamW), with
//! checkpoints a Hugging Face loader reads and a metrics log.
//!
//! By default the train step is compiled for the CPU into `--out/train.kiln` (for batches of
//! `--batch` rows of the data's length, with the run's losses and optimizer settings baked in) and
//! run by the executor, which keeps the weights, moments and step count as states; `--interp`
//! runs the same program on the reference interpreter instead (the oracle: exact, slow). The two
//! agree to float rounding, and both match PyTorch (`tests/it/train.rs`).
//!
//! Each step takes the next `--batch` rows of the data (in order, wrapping around), runs the
//! program at the schedule's learning rate, and prints and logs (`metrics.jsonl`) the step, loss,
//! gradient norm, learning rate and tokens/s. `--save-every K` (and the last step) writes a
//! checkpoint `step-N/` into `--out`: `config.json` and `model.safetensors` (every parameter, the
//! ones not trained too, under the checkpoint's names: `kiln run --weights` and transformers load
//! it), `optimizer.safetensors` (the moments and the step count) and `trainer.json` (the step, the
//! data position, the hyperparameters). A checkpoint is written into a hidden folder and renamed
//! into place, so a kill at any moment leaves the last complete one. `--resume DIR` continues from
//! a checkpoint exactly where it stopped: the same steps give the same losses and weights as an
//! uninterrupted run.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use kiln_compiler::train::Optimizer;
use kiln_compiler::{build, spec};
use kiln_ir::module::StateRole;
use kiln_runtime::cpu::CpuModel;
use kiln_runtime::data::{self, StreamDType, TokenRows};
use kiln_runtime::train::{CompiledTrainer, Steps, Trainer};
use kiln_runtime::weights::{self, StoreFloats};

use crate::run::{self, Weights};

/// The learning-rate schedule.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    /// `lr` at every step.
    Constant,
    /// Linear warmup over `warmup` steps, then cosine decay to `min_lr` at the last step.
    Cosine,
    /// DeepSeek-V3's (reference §4.2): linear warmup, constant until 80% of the steps, cosine decay
    /// to `min_lr` by 95%, then constant at `min_lr`.
    Deepseek,
}

/// The hyperparameters of a run, as `trainer.json` records them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Hyper {
    pub lr: f64,
    pub min_lr: f64,
    pub schedule: Schedule,
    pub warmup: u64,
    pub steps: u64,
    pub batch: usize,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub clip: Option<f64>,
}

impl Hyper {
    /// The learning rate of step `s` (0-based) of `steps`.
    pub fn lr_at(&self, s: u64) -> f64 {
        let (w, n) = (self.warmup, self.steps.max(1));
        if s < w {
            return self.lr * (s + 1) as f64 / w as f64;
        }
        let cosine = |from: f64, to: f64| {
            let span = (to - from).max(1.0);
            let p = ((s as f64 - from) / span).clamp(0.0, 1.0);
            self.min_lr + (self.lr - self.min_lr) * 0.5 * (1.0 + (std::f64::consts::PI * p).cos())
        };
        match self.schedule {
            Schedule::Constant => self.lr,
            Schedule::Cosine => cosine(w as f64, (n - 1) as f64),
            Schedule::Deepseek => {
                let (hold, end) = (0.8 * n as f64, 0.95 * n as f64);
                if (s as f64) < hold {
                    self.lr
                } else {
                    cosine(hold, end)
                }
            }
        }
    }

    fn optimizer(&self) -> Optimizer {
        Optimizer {
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            weight_decay: self.weight_decay,
            clip: self.clip,
        }
    }

    fn check(&self) -> Result<()> {
        for (name, v) in [("--lr", self.lr), ("--min-lr", self.min_lr)] {
            if !v.is_finite() || v < 0.0 {
                bail!("{name} must be a finite, non-negative number, not {v}");
            }
        }
        if self.steps == 0 || self.batch == 0 {
            bail!("--steps and --batch must be at least 1");
        }
        if self.warmup > self.steps {
            bail!("--warmup {} is longer than the run's {} steps", self.warmup, self.steps);
        }
        Ok(())
    }
}

/// Where a run is, as `trainer.json` records it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// Steps done.
    pub step: u64,
    /// The data row the next batch starts at.
    pub row: usize,
    pub hyper: Hyper,
    /// The model's name, so a checkpoint of another model is refused.
    pub model: String,
}

/// What `kiln train` was asked.
pub struct Request<'a> {
    pub model: &'a Path,
    pub weights: Weights<'a>,
    pub data: &'a Path,
    pub dtype: Option<&'a str>,
    pub seq_len: Option<u64>,
    pub hyper: Hyper,
    pub out: &'a Path,
    pub save_every: Option<u64>,
    pub resume: Option<&'a Path>,
    pub interp: bool,
    pub threads: Option<usize>,
    pub losses: build::TrainLosses,
}

const TRAINER: &str = "trainer.json";
const OPTIMIZER: &str = "optimizer.safetensors";
const METRICS: &str = "metrics.jsonl";
/// The compiled train step, in `--out`.
const ARTIFACT: &str = "train.kiln";

pub fn run(req: &Request, out: &mut impl Write) -> Result<()> {
    req.hyper.check()?;
    if req.interp && req.threads.is_some() {
        bail!("--threads sets the compiled train step's threads; it does not apply to --interp");
    }
    if run::is_artifact(req.model) {
        bail!("{}: kiln train takes a model spec or a Hugging Face config.json", req.model.display());
    }
    let spec = spec::load(req.model)?;
    let dtype = match req.dtype {
        None => None,
        Some(d) => Some(StreamDType::parse(d).with_context(|| format!("--dtype {d}: use u16 or u32"))?),
    };
    let rows = data::load_tokens(req.data, &data::format_for(req.data, dtype, req.seq_len)?)?;
    rows.check(
        spec.model.vocab_size,
        spec.model.max_position_embeddings,
        "the model's max_position_embeddings",
    )?;
    if rows.rows() < req.hyper.batch {
        bail!(
            "{}: {} rows, fewer than one batch of {}; give more data or a smaller --batch",
            req.data.display(),
            rows.rows(),
            req.hyper.batch
        );
    }

    // The program: forward and loss, backward, clipping and AdamW.
    let opt = req.hyper.optimizer();
    let (program, states) = kiln_compiler::train::program(&spec, &req.losses, &opt)?;
    let roles: HashMap<String, StateRole> = states.iter().map(|s| (s.name.clone(), s.role)).collect();
    // Every parameter a checkpoint of the model holds (MTP included), so one is written back whole.
    let full = build::build_graph(&spec)?;
    let decls = weights::graph_params(&full)?;
    let mut ckpt = None;
    let (weights_in, mut progress) = match req.resume {
        Some(dir) => {
            let p: Progress = serde_json::from_str(
                &std::fs::read_to_string(dir.join(TRAINER))
                    .with_context(|| format!("cannot read {}", dir.join(TRAINER).display()))?,
            )
            .with_context(|| format!("{} is not a kiln trainer state", dir.join(TRAINER).display()))?;
            if p.model != spec.model.name {
                bail!("{}: a checkpoint of model `{}`, not `{}`", dir.display(), p.model, spec.model.name);
            }
            let tensors = run::params(decls, &Weights::Checkpoint(dir), Some(&spec), &mut ckpt)?
                .collect::<Result<Vec<_>, _>>()?;
            (tensors, Progress { hyper: req.hyper.clone(), ..p })
        }
        None => {
            let tensors =
                run::params(decls, &req.weights, Some(&spec), &mut ckpt)?.collect::<Result<Vec<_>, _>>()?;
            (tensors, Progress { step: 0, row: 0, hyper: req.hyper.clone(), model: spec.model.name.clone() })
        }
    };
    let untrained: Vec<weights::HostTensor> =
        weights_in.iter().filter(|t| !roles.contains_key(&t.name)).cloned().collect();
    std::fs::create_dir_all(req.out).with_context(|| format!("cannot create {}", req.out.display()))?;
    let t = rows.width() - 1;
    let (mut trainer, engine): (Box<dyn Steps>, String) = if req.interp {
        (Box::new(Trainer::new(program, states, weights_in)?), "reference interpreter".into())
    } else {
        compiled(req, &spec, t as u64, weights_in, out)?
    };
    if let Some(dir) = req.resume {
        let opt = weights::open_checkpoint(&dir.join(OPTIMIZER))?;
        for (name, role) in &roles {
            if !matches!(role, StateRole::Trainable | StateRole::RoutingBias) {
                trainer.set_state(opt.read(name)?)?;
            }
        }
    }
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(req.out.join(METRICS))
        .with_context(|| format!("cannot write {}", req.out.join(METRICS).display()))?;
    writeln!(
        out,
        "train {}: {} steps of {} x {} tokens from {}, {:?} schedule, lr {}, {engine}",
        spec.model.name,
        req.hyper.steps,
        req.hyper.batch,
        t,
        req.data.display(),
        req.hyper.schedule,
        req.hyper.lr
    )?;
    while progress.step < req.hyper.steps {
        let batch = take(&rows, progress.row, req.hyper.batch)?;
        let lr = req.hyper.lr_at(progress.step);
        let t0 = Instant::now();
        let stats = trainer.step(&batch, lr as f32)?;
        let secs = t0.elapsed().as_secs_f64();
        if !stats.loss.is_finite() {
            bail!(
                "step {}: the loss is {}; stopping (the last checkpoint is intact)",
                progress.step,
                stats.loss
            );
        }
        progress.step += 1;
        progress.row = (progress.row + req.hyper.batch) % rows.rows();
        let tps = (req.hyper.batch * t) as f64 / secs.max(f64::MIN_POSITIVE);
        let load = stats.max_load.map_or(String::new(), |m| format!("  max load {m:.3}x mean"));
        writeln!(
            out,
            "step {:>5}  loss {:.6}  grad norm {:.4}  lr {:.3e}  {:.1} tokens/s{load}",
            progress.step, stats.loss, stats.grad_norm, lr, tps
        )?;
        let line = serde_json::json!({
            "step": progress.step, "loss": stats.loss, "grad_norm": stats.grad_norm, "lr": lr, "tokens_per_s": tps,
            "max_load": stats.max_load, "load": stats.loads,
        });
        writeln!(metrics, "{line}")?;
        let last = progress.step == req.hyper.steps;
        if last || req.save_every.is_some_and(|k| k > 0 && progress.step % k == 0) {
            let dir = save(req.out, &spec, trainer.as_ref(), &untrained, &roles, &progress)?;
            writeln!(out, "saved {}", dir.display())?;
        }
    }
    Ok(())
}

/// The train step compiled for the CPU into `--out`/`train.kiln` (for batches of `--batch` rows
/// of `t` tokens, with the run's losses and optimizer), loaded with the weights.
fn compiled(
    req: &Request,
    spec: &kiln_ir::ModelSpec,
    t: u64,
    weights_in: Vec<weights::HostTensor>,
    out: &mut impl Write,
) -> Result<(Box<dyn Steps>, String)> {
    use kiln_compiler::pack;
    let options = pack::Options {
        train: Some((req.losses, req.hyper.optimizer())),
        kv_cache: false,
        score: false,
        ..pack::Options::new(kiln_compiler::target::Targets::Cpu, req.hyper.batch as u64, t)
    };
    let dir = req.out.join(ARTIFACT);
    let t0 = Instant::now();
    let artifact = pack::compile(pack::Source::Spec(spec.clone()), &options, &mut ())?;
    pack::write(&artifact, &dir)?;
    writeln!(
        out,
        "compiled the train step into {} ({} kernels) in {:.1} s",
        dir.display(),
        artifact.manifest.kernels.len(),
        t0.elapsed().as_secs_f64()
    )?;
    let art = kiln_runtime::artifact::load(&dir)?;
    let wanted: std::collections::HashSet<String> =
        weights::manifest_params(art.manifest())?.into_iter().map(|d| d.name).collect();
    let given = weights_in.into_iter().filter(|t| wanted.contains(&t.name)).map(Ok);
    let model = CpuModel::load(&art, given, &run::cpu_options(req.threads))?;
    let engine = format!("compiled for the CPU ({} threads)", model.threads());
    Ok((Box::new(CompiledTrainer::new(model)?), engine))
}

/// `n` rows from row `at`, wrapping around.
fn take(rows: &TokenRows, at: usize, n: usize) -> Result<TokenRows> {
    let w = rows.width();
    let mut tokens = Vec::with_capacity(n * w);
    for i in 0..n {
        tokens.extend_from_slice(rows.row((at + i) % rows.rows()));
    }
    Ok(TokenRows::from_rows(w, tokens)?)
}

/// Writes checkpoint `step-N` into `out` atomically (a hidden folder renamed into place).
fn save(
    out: &Path,
    spec: &kiln_ir::ModelSpec,
    trainer: &dyn Steps,
    untrained: &[weights::HostTensor],
    roles: &HashMap<String, StateRole>,
    progress: &Progress,
) -> Result<PathBuf> {
    let dir = out.join(format!("step-{}", progress.step));
    let tmp = out.join(format!(".step-{}.tmp-{}", progress.step, std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let mut model: HashMap<String, weights::HostTensor> =
        untrained.iter().map(|t| (t.name.clone(), t.clone())).collect();
    let mut optimizer = Vec::new();
    for t in trainer.weights()?.into_iter().chain(trainer.states()?) {
        match roles.get(&t.name) {
            Some(StateRole::Trainable | StateRole::RoutingBias) | None => {
                drop(model.insert(t.name.clone(), t))
            }
            Some(_) => optimizer.push(t),
        }
    }
    let mut model: Vec<weights::HostTensor> = model.into_values().collect();
    model.sort_by(|a, b| a.name.cmp(&b.name));
    let config = serde_json::to_string_pretty(&spec::to_hf_config(spec))? + "\n";
    std::fs::write(tmp.join("config.json"), config)?;
    weights::write_safetensors(&tmp.join("model.safetensors"), &model, StoreFloats::AsDeclared)?;
    weights::write_safetensors(&tmp.join(OPTIMIZER), &optimizer, StoreFloats::AsDeclared)?;
    std::fs::write(tmp.join(TRAINER), serde_json::to_string_pretty(progress)? + "\n")?;
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("cannot replace {}", dir.display()))?;
    }
    std::fs::rename(&tmp, &dir).with_context(|| format!("cannot write {}", dir.display()))?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hyper(schedule: Schedule, warmup: u64) -> Hyper {
        Hyper {
            lr: 1e-3,
            min_lr: 1e-4,
            schedule,
            warmup,
            steps: 100,
            batch: 1,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            clip: Some(1.0),
        }
    }

    #[test]
    fn schedules_warm_up_linearly_and_decay_to_the_floor() {
        let c = hyper(Schedule::Constant, 0);
        assert!((0..100).all(|s| c.lr_at(s) == 1e-3));
        let w = hyper(Schedule::Cosine, 10);
        assert_eq!((w.lr_at(0), w.lr_at(4), w.lr_at(9)), (1e-4, 5e-4, 1e-3));
        assert!((w.lr_at(10) - 1e-3).abs() < 1e-12, "the peak right after warmup");
        assert!((w.lr_at(99) - 1e-4).abs() < 1e-12, "the floor at the last step");
        let mid = w.lr_at(10 + 89 / 2);
        assert!((mid - 5.5e-4).abs() < 2e-5, "halfway down the cosine: {mid}");
        assert!((10..99).all(|s| w.lr_at(s) >= w.lr_at(s + 1)), "monotone decay");
        let d = hyper(Schedule::Deepseek, 5);
        assert_eq!(d.lr_at(50), 1e-3, "constant until 80% of the steps");
        assert_eq!(d.lr_at(79), 1e-3);
        assert!(d.lr_at(85) < 1e-3 && d.lr_at(85) > 1e-4);
        assert!(
            (d.lr_at(95) - 1e-4).abs() < 1e-12 && (d.lr_at(99) - 1e-4).abs() < 1e-12,
            "the floor from 95%"
        );
    }
}
