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
//! Each step takes the next `--batch` rows of the data (in order, wrapping around; with
//! `--shuffle SEED`, in a fresh seeded permutation of all rows each epoch), runs the program at
//! the schedule's learning rate, and prints and logs (`metrics.jsonl`) the step, loss,
//! gradient norm, learning rate and tokens/s. `--save-every K` (and the last step) writes a
//! checkpoint `step-N/` into `--out`: `config.json` and `model.safetensors` (every parameter, the
//! ones not trained too, under the checkpoint's names: `kiln run --weights` and transformers load
//! it), `optimizer.safetensors` (the moments and the step count), `trainer.json` (the step, the
//! data position, the hyperparameters) and the tokenizer files of the run, when it has them. A checkpoint is written into a hidden folder and renamed
//! into place, so a kill at any moment leaves the last complete one. `--resume DIR` continues from
//! a checkpoint exactly where it stopped: the same steps give the same losses and weights as an
//! uninterrupted run (the shuffle's seed and epoch are in `trainer.json` too). A new run or a
//! resume removes the hidden folders a killed run of its own naming left behind.
//!
//! The monitor (`crate::monitor`, on unless `--no-monitor`) adds per-layer gradient norms, expert
//! load and router-bias statistics to each step's line, raises alerts (spikes, non-finite steps
//! located op by op, expert collapse, load imbalance) as stderr lines and `event` lines of
//! `metrics.jsonl`, and with `--on-anomaly` undoes a step, rolls back to the last checkpoint or
//! stops; see its module documentation for the defaults and what a skip does to the step count
//! and the data position.
//!
//! `loss.svg` in `--out` plots the whole of `metrics.jsonl` (a resumed run's history too): it is
//! rewritten, atomically, with every checkpoint and at the end. A progress bar on stderr (when it
//! is a terminal) counts the steps; the step lines go to stdout.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::{Deserialize, Serialize};
use std::io::IsTerminal;

use kiln_compiler::train::Optimizer;
use kiln_compiler::{build, spec};
use kiln_ir::artifact::TrainEntry;
use kiln_ir::module::StateRole;
use kiln_ir::DType;
use kiln_runtime::cpu::CpuModel;
use kiln_runtime::data::{self, StreamDType, TokenRows};
use kiln_runtime::train::{CompiledTrainer, Steps, Trainer};
use kiln_runtime::weights::{self, StoreFloats};

use crate::monitor::{self, Fault, Monitor, Policy, Record};
use crate::plot;
use crate::run::{self, Weights};

/// The learning-rate schedule.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[derive(Default)]
pub enum Schedule {
    /// `lr` at every step.
    #[default]
    Constant,
    /// Linear warmup over `warmup` steps, then cosine decay to `min_lr` at the last step.
    Cosine,
    /// DeepSeek-V3's (reference §4.2): linear warmup, constant until 80% of the steps, cosine decay
    /// to `min_lr` by 95%, then constant at `min_lr`.
    Deepseek,
}

/// The settings a train step is compiled with: its losses and its optimizer. Each is optional on
/// the command line: a model spec takes DeepSeek-V3's defaults for those not given, an artifact
/// from `kiln compile --train` has its own (and refuses a different one).
#[derive(clap::Args, Clone, Debug, Default, PartialEq)]
pub struct Settings {
    /// AdamW's betas, `b1,b2` [default: 0.9,0.95, DeepSeek-V3's].
    #[arg(long, value_delimiter = ',', num_args = 1)]
    pub betas: Option<Vec<f64>>,
    /// AdamW's epsilon [default: 1e-8].
    #[arg(long)]
    pub eps: Option<f64>,
    /// AdamW's decoupled weight decay [default: 0.1].
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Clip the global gradient norm to this; 0 for no clipping [default: 1.0].
    #[arg(long)]
    pub clip: Option<f64>,
    /// The dtype of AdamW's moments: f32, or bf16 as DeepSeek-V3 stores them (half the optimizer
    /// memory; the update is still computed in f32) [default: f32].
    #[arg(long, value_parser = ["f32", "bf16"])]
    pub moments: Option<String>,
    /// γ of auxiliary-loss-free balancing: after each step every router's selection bias moves by
    /// γ toward balance (DeepSeek-V3: 0.001); 0 leaves the bias as it is [default: 0].
    #[arg(long)]
    pub bias_update_speed: Option<f64>,
    /// α of the complementary sequence-wise balance loss (DeepSeek-V3: 0.0001) [default: 0].
    #[arg(long)]
    pub balance_alpha: Option<f64>,
    /// λ of the MTP loss over the spec's MTP modules (DeepSeek-V3: 0.3, then 0.1) [default: 0].
    #[arg(long)]
    pub mtp_lambda: Option<f64>,
}

impl Settings {
    /// The defaults, as a manifest records settings.
    pub fn defaults() -> TrainEntry {
        let o = Optimizer::default();
        TrainEntry {
            mtp_lambda: 0.0,
            balance_alpha: 0.0,
            bias_update_speed: 0.0,
            beta1: o.beta1,
            beta2: o.beta2,
            eps: o.eps,
            weight_decay: o.weight_decay,
            clip: o.clip,
            moments: o.moments,
            token_weights: false,
        }
    }

    /// `base` with the settings given here; with `fixed` (an artifact's), a given setting must
    /// equal the base's, since it is compiled in.
    pub fn over(&self, base: TrainEntry, fixed: Option<&Path>) -> Result<TrainEntry> {
        let mut e = base.clone();
        let betas = match self.betas.as_deref() {
            None => None,
            Some(&[b1, b2]) => Some((b1, b2)),
            Some(_) => bail!("--betas takes two numbers, b1,b2"),
        };
        let moments = match self.moments.as_deref() {
            None => None,
            Some("bf16") => Some(DType::BF16),
            Some(_) => Some(DType::F32),
        };
        // Each value given must be a number the step can hold (an f32 constant once compiled):
        // NaN was written to the manifest as `null`, which no kiln could read back (and `--clip
        // nan` read back as no clipping); infinities reached the verifier as a kiln bug.
        let given = [
            ("--betas", betas.map(|b| b.0), "in [0, 1)"),
            ("--betas", betas.map(|b| b.1), "in [0, 1)"),
            ("--eps", self.eps, "above 0"),
            ("--weight-decay", self.weight_decay, "at least 0"),
            ("--clip", self.clip, "at least 0 (0 for no clipping)"),
            ("--bias-update-speed", self.bias_update_speed, "at least 0"),
            ("--balance-alpha", self.balance_alpha, "at least 0"),
            ("--mtp-lambda", self.mtp_lambda, "at least 0"),
        ];
        for (flag, v, want) in given {
            let Some(v) = v else { continue };
            let ok = (v as f32).is_finite()
                && match flag {
                    "--betas" => (0.0..1.0).contains(&v),
                    "--eps" => v > 0.0,
                    _ => v >= 0.0,
                };
            if !ok {
                let v = if v.abs() < 1e16 { v.to_string() } else { format!("{v:e}") };
                bail!("{flag} {v}: must be a finite number {want}");
            }
        }
        let mut differ = Vec::new();
        let mut set = |flag: &str, old: &mut f64, new: Option<f64>| {
            if let Some(v) = new {
                if v != *old {
                    differ.push(format!("{flag} {old} (given {v})"));
                }
                *old = v;
            }
        };
        set("--betas", &mut e.beta1, betas.map(|b| b.0));
        set("--betas", &mut e.beta2, betas.map(|b| b.1));
        set("--eps", &mut e.eps, self.eps);
        set("--weight-decay", &mut e.weight_decay, self.weight_decay);
        set("--bias-update-speed", &mut e.bias_update_speed, self.bias_update_speed);
        set("--balance-alpha", &mut e.balance_alpha, self.balance_alpha);
        set("--mtp-lambda", &mut e.mtp_lambda, self.mtp_lambda);
        let mut clip = e.clip.unwrap_or(0.0);
        set("--clip", &mut clip, self.clip);
        e.clip = (clip > 0.0).then_some(clip);
        if let Some(m) = moments {
            if m != e.moments {
                differ.push(format!("--moments {} (given {m})", e.moments));
            }
            e.moments = m;
        }
        if let (Some(dir), false) = (fixed, differ.is_empty()) {
            bail!(
                "{}: the artifact's train step was compiled with {}; recompile it with `kiln compile --train` \
                 and these settings, or leave them out",
                dir.display(),
                differ.join(", ")
            );
        }
        Ok(e)
    }

    /// Whether any setting was given.
    pub fn any(&self) -> bool {
        *self != Settings::default()
    }
}

/// The losses of a manifest's settings.
pub fn losses_of(e: &TrainEntry) -> build::TrainLosses {
    build::TrainLosses {
        mtp_lambda: e.mtp_lambda,
        balance_alpha: e.balance_alpha,
        bias_update_speed: e.bias_update_speed,
        token_weights: e.token_weights,
    }
}

/// The optimizer of a manifest's settings.
pub fn optimizer_of(e: &TrainEntry) -> Optimizer {
    Optimizer {
        beta1: e.beta1,
        beta2: e.beta2,
        eps: e.eps,
        weight_decay: e.weight_decay,
        clip: e.clip,
        moments: e.moments,
        shards: 1,
    }
}

/// The hyperparameters of a run, as `trainer.json` records them.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
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
    /// AdamW's moments stored in bf16 (`--moments bf16`) rather than f32.
    #[serde(default)]
    pub bf16_moments: bool,
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

    /// Takes the optimizer's settings from `e`.
    fn set_optimizer(&mut self, e: &TrainEntry) {
        (self.beta1, self.beta2, self.eps, self.weight_decay) = (e.beta1, e.beta2, e.eps, e.weight_decay);
        self.clip = e.clip;
        self.bf16_moments = e.moments == DType::BF16;
    }

    fn optimizer(&self) -> Optimizer {
        Optimizer {
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            weight_decay: self.weight_decay,
            clip: self.clip,
            moments: if self.bf16_moments { DType::BF16 } else { DType::F32 },
            shards: 1,
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
        if self.schedule != Schedule::Constant && self.min_lr > self.lr {
            bail!(
                "--min-lr {} is above --lr {}: the {} schedule decays from --lr to --min-lr",
                self.min_lr,
                self.lr,
                format!("{:?}", self.schedule).to_lowercase()
            );
        }
        Ok(())
    }
}

/// Where a run is, as `trainer.json` records it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// Steps done.
    pub step: u64,
    /// Where the next batch starts in the current epoch's row order (the row itself when the run
    /// takes rows in order).
    pub row: usize,
    pub hyper: Hyper,
    /// The model's name, so a checkpoint of another model is refused.
    pub model: String,
    /// `--shuffle`'s seed: each epoch takes the rows in [`epoch_order`]; `None`, in order.
    #[serde(default)]
    pub shuffle: Option<u64>,
    /// Epochs done: how many times the rows have all been taken.
    #[serde(default)]
    pub epoch: u64,
}

impl Progress {
    /// The next `n` rows' indices, moving the position on (into the next epoch, and its order, at
    /// the end of one).
    fn next_rows(&mut self, rows: usize, n: usize) -> Vec<usize> {
        let mut order = epoch_order(rows, self.shuffle, self.epoch);
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            if self.row >= rows {
                self.row = 0;
                self.epoch += 1;
                order = epoch_order(rows, self.shuffle, self.epoch);
            }
            out.push(order[self.row]);
            self.row += 1;
        }
        if self.row >= rows {
            self.row = 0;
            self.epoch += 1;
        }
        out
    }
}

/// SplitMix64 (Steele, Lea and Flood), the shuffle's generator: small, fast and the same on every
/// platform.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (Lemire's multiply-shift; the bias is below 2^-32 for any row count).
    fn below(&mut self, n: usize) -> usize {
        ((u128::from(self.next()) * n as u128) >> 64) as usize
    }
}

/// The order epoch `epoch` takes `rows` rows in: `0..rows` without a seed, else a Fisher-Yates
/// permutation drawn from SplitMix64 seeded by the seed and the epoch (a fresh one each epoch).
pub fn epoch_order(rows: usize, seed: Option<u64>, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..rows).collect();
    if let Some(seed) = seed {
        let mut rng = SplitMix64(seed);
        rng.0 = rng.next() ^ epoch.wrapping_mul(0xD1B5_4A32_D192_ED03);
        for i in (1..rows).rev() {
            order.swap(i, rng.below(i + 1));
        }
    }
    order
}

/// Runs every pass but those in `skip`.
pub(crate) struct Passes {
    pub(crate) skip: Vec<&'static str>,
}

impl kiln_compiler::pack::Observer for Passes {
    fn runs_pass(&mut self, pass: &str) -> bool {
        !self.skip.contains(&pass)
    }
}

/// DeepSeek-V3's `quantization_config` (reference §4.2): E4M3 in 128x128 weight blocks and 1x128
/// activation tiles, scales computed online, not rounded to powers of two.
pub(crate) fn deepseek_fp8() -> kiln_ir::spec::QuantSection {
    kiln_ir::spec::QuantSection {
        method: "fp8".into(),
        format: DType::F8E4M3,
        weight_block: [128, 128],
        activation_scheme: "dynamic".into(),
        pow2_scale: false,
        modules_to_not_convert: None,
    }
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
    /// `--shuffle SEED`: a seeded permutation of the rows each epoch.
    pub shuffle: Option<u64>,
    pub interp: bool,
    pub threads: Option<usize>,
    /// Where the compiled train step runs.
    pub device: run::Device,
    /// `--micro-batch M`: rows per micro-batch, when a step's batch is split.
    pub micro_batch: Option<usize>,
    /// `--tokenizer`: the tokenizer.json (or its folder) of text data.
    pub tokenizer: Option<&'a Path>,
    /// The losses and the optimizer, as given ([`Request::resolve`] completes them).
    pub settings: Settings,
    /// `kiln sft`: the data is chat JSONL, and the loss counts the assistant's tokens alone (see
    /// [`crate::sft`]).
    pub chat: bool,
    /// The run's length in passes over the data instead of `hyper.steps`: `ceil(epochs N / batch)`
    /// steps for `N` rows.
    pub epochs: Option<u64>,
    /// The training monitor's settings (`crate::monitor`).
    pub monitor: monitor::Args,
    /// `--dp N` under mpirun: this process is one of N data-parallel replicas ([`crate::dist`]).
    pub dist: Option<&'a crate::dist::Dist>,
    /// `--zero1`: AdamW's states split over the replicas (ZeRO stage 1).
    pub zero1: bool,
    /// `--pp N` under mpirun: this process is one rank of an N-stage pipeline run with this schedule
    /// ([`crate::pipeline`]).
    pub pipeline: Option<(&'a crate::dist::Dist, kiln_compiler::schedule::Kind)>,
    /// `--pp-trace FILE`: where rank 0 writes the last step's measured timeline.
    pub pp_trace: Option<&'a Path>,
    /// `--nccl`: the compiled step's sums and gathers go over NCCL on the GPUs' memory.
    pub nccl: bool,
    /// `--fp8` (`Some(true)`) or `--no-fp8` (`Some(false)`): train with or without the FP8 recipe,
    /// whatever the spec's [quantization] says (`None`: as it says).
    pub fp8: Option<bool>,
    /// Whether the compiled step recomputes norms and up-projections in the backward pass
    /// (`--no-recompute` says no).
    pub recompute: bool,
    /// Whether the FP8 step keeps the attention outputs and SwiGLU inputs for the backward pass in
    /// FP8 (`--no-fp8-cache` says no).
    pub fp8_cache: bool,
}

impl Request<'_> {
    /// The passes `--no-recompute` and `--no-fp8-cache` turn off.
    fn skipped_passes(&self) -> Vec<&'static str> {
        let mut skip = Vec::new();
        if !self.recompute {
            skip.push("rematerialize");
        }
        if !self.fp8_cache {
            skip.push("cache-activations");
        }
        skip
    }

    /// How many micro-batches each step's batch is split into (1: not split).
    fn micro_batches(&self) -> Result<usize> {
        let batch = self.local_batch()?;
        match self.micro_batch {
            // A pipeline needs micro-batches: by default, one per stage.
            None if self.pipeline.is_some() => {
                let pp = self.pipeline.map_or(1, |(d, _)| d.pp_size());
                if batch % pp != 0 {
                    bail!(
                        "--pp {pp}: the batch of {batch} rows is split into {pp} micro-batches by default; give a \
                         multiple of {pp} or --micro-batch"
                    );
                }
                Ok(pp)
            }
            None => Ok(1),
            Some(m) if m == 0 || m > batch || batch % m != 0 => bail!(
                "--micro-batch {m}: a micro-batch must be a whole part of the batch of {batch} rows \
                 (a divisor of {batch})"
            ),
            Some(m) => Ok(batch / m),
        }
    }

    /// The rows of each batch this process trains on: all of them, or its replica's share.
    fn local_batch(&self) -> Result<usize> {
        let batch = self.hyper.batch;
        match self.dist {
            None => Ok(batch),
            Some(d) if batch % d.dp_size() != 0 => bail!(
                "--batch {batch} cannot be shared by the {} processes that each train on their own rows (--dp, \
                 --ep): give a multiple of {}",
                d.dp_size(),
                d.dp_size()
            ),
            Some(d) => Ok(batch / d.dp_size()),
        }
    }

    /// Whether this process writes the run's files (the only one, or the first replica).
    fn leader(&self) -> bool {
        self.dist.is_none_or(|d| d.leader()) && self.pipeline.is_none_or(|(d, _)| d.leader())
    }

    /// The process group that compiles together: the replicas, or the pipeline's ranks.
    fn group(&self) -> Option<&crate::dist::Dist> {
        self.dist.or(self.pipeline.map(|(d, _)| d))
    }
}

const TRAINER: &str = "trainer.json";
const OPTIMIZER: &str = "optimizer.safetensors";
const METRICS: &str = "metrics.jsonl";
/// The loss curve, in `--out`.
const CURVE: &str = "loss.svg";
/// The compiled train step, in `--out`.
const ARTIFACT: &str = "train.kiln";
/// How long the other replicas of a `--dp` run wait for rank 0 to compile the train step.
const COMPILE_WAIT: std::time::Duration = std::time::Duration::from_secs(1800);

pub fn run(req: &Request, out: &mut impl Write) -> Result<()> {
    // The run folder must not be the model (an artifact, whose folder then held files its
    // manifest does not list, refused by the next `kiln compile -o`), lie inside it, or be the data.
    let inside = |input: &Path| match (std::fs::canonicalize(req.out), std::fs::canonicalize(input)) {
        (Ok(o), Ok(i)) => o == i || (i.is_dir() && o.starts_with(&i)),
        _ => false,
    };
    for (input, what) in [(req.model, "the model"), (req.data, "the data")] {
        if inside(input) {
            bail!(
                "--out {}: the run's folder would be {what} {} or inside it; give a folder of its own",
                req.out.display(),
                input.display()
            );
        }
    }
    if req.zero1 && req.dist.is_none() {
        bail!("--zero1 splits AdamW's states over data-parallel replicas: give --dp N (under mpirun -n N)");
    }
    if req.pipeline.is_some() && req.interp {
        bail!("--pp runs the compiled stage programs in each process; --interp is the one-process oracle");
    }
    if req.dist.is_some() && req.interp {
        bail!(
            "--dp and --ep run the compiled train step in each process; --interp is the one-process oracle"
        );
    }
    if req.interp && req.threads.is_some() {
        bail!("--threads sets the compiled train step's threads; it does not apply to --interp");
    }
    if req.nccl {
        if req.device != run::Device::Cuda {
            bail!(
                "--nccl sums over NCCL on GPUs: add --device cuda (on the CPU, MPI sums in host memory \
                 without it)"
            );
        }
        if req.dist.is_none() && req.pipeline.is_none() {
            bail!(
                "--nccl sums over the processes of a --dp, --ep or --pp run under mpirun; one process has \
                 nothing to sum"
            );
        }
    }
    if req.device == run::Device::Cuda {
        if req.interp {
            bail!("--device cuda runs the compiled train step; --interp runs the reference interpreter on the CPU");
        }
        if req.threads.is_some() {
            bail!("--threads sets the CPU backend's threads; it does not apply to --device cuda");
        }
        if !kiln_runtime::cuda::driver_present() {
            return Err(kiln_runtime::RuntimeError::NoCudaDriver.into());
        }
    }
    // A Hugging Face folder is its config.json (and, unless told otherwise, its weights: see main).
    let config = req.model.join("config.json");
    let artifact = !(req.model.is_dir() && config.is_file()) && run::is_artifact(req.model);
    if req.zero1 && artifact {
        bail!(
            "--zero1 compiles the split into the train step: give the model spec or Hugging Face folder (an \
             artifact from `kiln compile --train --zero1 N` is split already)"
        );
    }
    if artifact && !req.model.join("manifest.json").is_file() {
        bail!(
            "{}: kiln train takes a model spec, a Hugging Face config.json or a folder holding one, or an \
             artifact from `kiln compile --train` (this folder has no config.json and no manifest.json)",
            req.model.display()
        );
    }
    let (spec, entry) = if artifact {
        // An artifact from `kiln compile --train`: its model and its compiled-in settings.
        let art = kiln_runtime::artifact::load(req.model)?;
        let m = art.manifest();
        let Some(entry) = m.train.clone() else {
            bail!(
                "{}: not a training artifact (it has no train step): compile the model with `kiln compile \
                 --train`, or give the spec or Hugging Face folder itself",
                req.model.display()
            );
        };
        let Some(spec) = m.model.clone() else {
            bail!(
                "{}: the artifact was compiled from a .kir graph and records no model",
                req.model.display()
            );
        };
        (spec, req.settings.over(entry, Some(req.model))?)
    } else {
        let path = if req.model.is_dir() && config.is_file() { config.as_path() } else { req.model };
        let mut spec = spec::load(path)?;
        match req.fp8 {
            Some(false) => spec.quantization = None,
            Some(true) if spec.quantization.is_none() => spec.quantization = Some(deepseek_fp8()),
            _ => {}
        }
        (spec, req.settings.over(Settings::defaults(), None)?)
    };
    // Checked first: an expert-parallel run's ranks must divide the experts.
    let share = ExpertShare::of(req, &spec)?;
    if artifact && !req.recompute {
        bail!(
            "{}: the artifact's train step is compiled already; --no-recompute applies to a model spec or \
             Hugging Face folder (or compile it with `kiln compile --train --disable-pass rematerialize`)",
            req.model.display()
        );
    }
    if artifact && !req.fp8_cache {
        bail!(
            "{}: the artifact's train step is compiled already; --no-fp8-cache applies to a model spec or \
             Hugging Face folder (or compile it with `kiln compile --train --disable-pass cache-activations`)",
            req.model.display()
        );
    }
    if artifact && req.fp8.is_some() {
        let has = if spec.quantization.is_some() { "with" } else { "without" };
        bail!(
            "{}: the artifact's train step was compiled {has} the FP8 recipe; --fp8 and --no-fp8 apply to a \
             model spec or Hugging Face folder",
            req.model.display()
        );
    }
    let mut entry = entry;
    if req.chat {
        if artifact && !entry.token_weights {
            bail!(
                "{}: the artifact's train step weighs every target alike; kiln sft compiles its own (give the                  model spec or Hugging Face folder instead)",
                req.model.display()
            );
        }
        entry.token_weights = true;
    }
    let mut hyper = req.hyper.clone();
    hyper.set_optimizer(&entry);
    if req.epochs.is_none() {
        hyper.check()?;
    }
    let losses = losses_of(&entry);
    let dtype = match req.dtype {
        None => None,
        Some(d) => Some(StreamDType::parse(d).with_context(|| format!("--dtype {d}: use u16 or u32"))?),
    };
    let rows = if req.chat {
        let folder = tokenizer_folder(req)?;
        let tok = crate::tokenize::load(&folder)?;
        let template = crate::chat::template::load(&folder)?;
        let pad = spec.model.eos_token_id.map_or(0, |e| e as i64);
        let (rows, s) = crate::sft::load_rows(
            req.data,
            &template,
            &tok,
            req.seq_len,
            pad,
            spec.model.max_position_embeddings,
        )?;
        writeln!(
            out,
            "sft: {} conversations from {} in rows of {} tokens, {} assistant targets carry the loss",
            s.conversations,
            req.data.display(),
            rows.width(),
            s.assistant_targets
        )?;
        if s.truncated > 0 {
            writeln!(
                out,
                "note: {} conversations are longer than a row and were cut, losing {} assistant targets                  (a longer --seq-len keeps them)",
                s.truncated, s.truncated_targets
            )?;
        }
        rows
    } else if crate::tokenize::is_text_data(req.data) {
        if dtype.is_some() {
            bail!("{}: --dtype applies to .bin token streams, not to text", req.data.display());
        }
        let folder = tokenizer_folder(req)?;
        if !folder.join(crate::tokenize::TOKENIZER_FILE).is_file() {
            bail!(
                "{}: text data is tokenised with the model's {}, and {} has none: give it with \
                 --tokenizer FILE, or the data as token ids (a .bin or .safetensors file)",
                req.data.display(),
                crate::tokenize::TOKENIZER_FILE,
                folder.display()
            );
        }
        let tok = crate::tokenize::load(&folder)?;
        crate::tokenize::load_text_rows(req.data, &tok, spec.model.eos_token_id, req.seq_len)?
    } else {
        data::load_tokens(req.data, &data::format_for(req.data, dtype, req.seq_len)?)?
    };
    rows.check(
        spec.model.vocab_size,
        spec.model.max_position_embeddings,
        "the model's max_position_embeddings",
    )?;
    if let Some(epochs) = req.epochs {
        hyper.steps = (epochs * rows.rows() as u64).div_ceil(hyper.batch.max(1) as u64);
        hyper.check()?;
    }
    if rows.rows() < hyper.batch {
        bail!(
            "{}: {} rows, fewer than one batch of {}; give more data or a smaller --batch",
            req.data.display(),
            rows.rows(),
            hyper.batch
        );
    }

    // The program: forward and loss, backward, clipping and AdamW.
    let opt = hyper.optimizer();
    let micro_batches = req.micro_batches()?;
    let mut programs = kiln_compiler::train::program(&spec, &losses, &opt, micro_batches > 1, false, None)?;
    if spec.quantization.is_some() {
        // FP8 training: the interpreter runs the step with the GEMMs' FP8 numerics and the FP8
        // activation caches, as compiled.
        use kiln_compiler::passes::run_until;
        use kiln_ir::ProgramKind;
        let last = if req.fp8_cache { "cache-activations" } else { "insert-fp8-casts" };
        run_until(&mut programs.step, &spec, ProgramKind::TrainStep, last)?;
        if let Some(acc) = &mut programs.accumulate {
            run_until(acc, &spec, ProgramKind::Accumulate, last)?;
        }
    }
    let states = programs.states.clone();
    // The compiled step's non-finite values are re-checked on the interpreter too.
    // (An expert-parallel or pipeline rank's step is not the whole model's: it has no interpreter
    // check.)
    let reference_programs = (!req.interp && share.is_none() && req.pipeline.is_none())
        .then(|| (programs.step.clone(), programs.accumulate.clone()));
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
            if req.shuffle.is_some() && req.shuffle != p.shuffle {
                let was = p
                    .shuffle
                    .map_or("took the rows in order".into(), |s| format!("was shuffled with seed {s}"));
                bail!(
                    "{}: the run {was}; a resume continues its order, so drop --shuffle or give the same seed",
                    dir.display()
                );
            }
            let mut tensors = run::params(decls, &Weights::Checkpoint(dir), Some(&spec), &mut ckpt)?
                .collect::<Result<Vec<_>, _>>()?;
            // A weight the model file holds in FP8 resumes from its exact value.
            let opt = weights::open_checkpoint(&dir.join(OPTIMIZER))?;
            for t in &mut tensors {
                let exact = format!("{EXACT_PREFIX}{}", t.name);
                if opt.get(&exact).is_some() {
                    *t = weights::HostTensor { name: t.name.clone(), ..opt.read(&exact)? };
                }
            }
            (tensors, Progress { hyper: hyper.clone(), ..p })
        }
        None => {
            let tensors =
                run::params(decls, &req.weights, Some(&spec), &mut ckpt)?.collect::<Result<Vec<_>, _>>()?;
            let progress = Progress {
                step: 0,
                row: 0,
                hyper: hyper.clone(),
                model: spec.model.name.clone(),
                shuffle: req.shuffle,
                epoch: 0,
            };
            (tensors, progress)
        }
    };
    let untrained: Vec<weights::HostTensor> =
        weights_in.iter().filter(|t| !roles.contains_key(&t.name)).cloned().collect();
    if req.leader() {
        std::fs::create_dir_all(req.out).with_context(|| format!("cannot create {}", req.out.display()))?;
        remove_stale(req.out)?;
    }
    let t = rows.width() - 1;
    let (mut trainer, engine): (Box<dyn Steps>, String) = if req.interp {
        let mut trainer = Trainer::new(programs.step, states.clone(), weights_in)?;
        if let Some(acc) = programs.accumulate {
            trainer = trainer.with_micro_batches(acc, micro_batches);
        }
        (Box::new(trainer), "reference interpreter".into())
    } else {
        compiled(req, &hyper, losses, artifact, &spec, t as u64, micro_batches, weights_in, out)?
    };
    if let Some(dir) = req.resume {
        let opt = weights::open_checkpoint(&dir.join(OPTIMIZER))?;
        for (name, role) in &roles {
            if kiln_runtime::train::kept(*role) {
                // An expert-parallel rank resumes its own experts' states, under rank 0's names.
                let local = match share {
                    Some(s) => match s.local(name) {
                        Some(l) => l,
                        None => continue,
                    },
                    None => name.clone(),
                };
                let whole = weights::HostTensor { name: local.clone(), ..opt.read(name)? };
                // A pipeline rank resumes its own stages' states.
                if !trainer.holds(&local) {
                    continue;
                }
                let t = shard_of(whole, &trainer.state(&local)?, req.dist)?;
                trainer.set_state(t)?;
            }
        }
    }
    let metrics_path = req.out.join(METRICS);
    let mut metrics: Box<dyn Write> = if req.leader() {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&metrics_path)
            .with_context(|| format!("cannot write {}", metrics_path.display()))?;
        // A kill can cut the last line short: start on a fresh line, so the next ones parse.
        if std::fs::read(&metrics_path).is_ok_and(|b| b.last().is_some_and(|&c| c != b'\n')) {
            writeln!(file)?;
        }
        Box::new(file)
    } else {
        Box::new(std::io::sink())
    };
    writeln!(
        out,
        "train {}: {} steps of {} x {} tokens from {}, {:?} schedule, lr {}, {engine}",
        spec.model.name,
        hyper.steps,
        hyper.batch,
        t,
        req.data.display(),
        hyper.schedule,
        hyper.lr
    )?;
    if let Some(seed) = progress.shuffle {
        writeln!(
            out,
            "rows shuffled each epoch (seed {seed}); epoch {}, position {}",
            progress.epoch, progress.row
        )?;
    }
    // The tokenizer files a checkpoint carries, so that it is a model `kiln run --prompt`, `kiln
    // chat` and `kiln sft` take as it is: those of the model's folder, --tokenizer, or the weights'.
    let text = tokenizer_folder(req).ok().filter(|f| f.join(crate::tokenize::TOKENIZER_FILE).is_file());
    let bar = match req.leader() {
        true => progress_bar(hyper.steps, progress.step),
        false => ProgressBar::hidden(),
    };
    // The monitor (crate::monitor): detectors, the faults to inject, the routers' biases to
    // record, and what a rollback goes back to (the run's start, then each checkpoint).
    req.monitor.check()?;
    let mut mon = (!req.monitor.no_monitor).then(|| Monitor::new(&req.monitor));
    let mut faults =
        (req.monitor.inject_fault.iter()).map(|f| monitor::parse_fault(f)).collect::<Result<Vec<_>>>()?;
    if mon.is_none() && !faults.is_empty() {
        bail!("--inject-fault tests the monitor: drop --no-monitor");
    }
    for (at, fault) in &faults {
        if *at > hyper.steps {
            bail!(
                "--inject-fault ...@{at}: the run has {} steps; give a step from 1 to {}",
                hyper.steps,
                hyper.steps
            );
        }
        let saves = *at == hyper.steps || req.save_every.is_some_and(|k| k > 0 && at % k == 0);
        if matches!(fault, Fault::SlowSave(_)) && !saves {
            bail!(
                "--inject-fault slow-save:...@{at}: step {at} writes no checkpoint; give the last step ({}) \
                 or a multiple of --save-every",
                hyper.steps
            );
        }
        // A scope with no launch is refused now, not when its step comes.
        if let Fault::Nan(scope) = fault {
            trainer.set_poison(Some(scope))?;
            trainer.set_poison(None)?;
        }
        if let Fault::Stall(r) | Fault::Exit(r) = fault {
            let ranks = req.group().map_or(0, |d| d.size());
            if *r >= ranks {
                bail!(
                    "--inject-fault ...:{r}@{at}: there is no rank {r}; stall and exit faults take a rank of a \
                     --dp or --pp run (0 to {})",
                    ranks.max(1) - 1
                );
            }
        }
    }
    let mut biases: Vec<&String> =
        roles.iter().filter(|(_, r)| **r == StateRole::RoutingBias).map(|(n, _)| n).collect();
    biases.sort();
    let rollback = mon.is_some() && req.monitor.on_anomaly == Policy::Rollback;
    // The monitor's copies of the states live in host memory beside the run: one taken before each
    // step (skip-batch undoes a step from it; a non-finite step's op-by-op re-check starts from
    // it) and rollback's last checkpoint. They must fit in the memory free: a copy the run cannot
    // do without is refused before any step, and the pre-step copy that only serves the re-check
    // is dropped with a note, rather than the run being killed for memory. The processes of a
    // multi-process run that share a machine copy their states side by side, so it is their sum
    // that must fit (every process of the machine comes to the same answer). The log says what
    // was counted and decided.
    // A trainer with a gate (a compiled step of one process or of replicas, or the interpreter)
    // asks the monitor before each step's update and stops a rejected step there, with the
    // states untouched: no copy before each step is needed.
    let gated = mon.is_some() && trainer.gated();
    let mut copy_before = mon.is_some() && !gated;
    if mon.is_some() {
        let (w, k) = trainer.heads()?;
        let bytes: u64 =
            w.iter().chain(&k).map(|h| h.shape.iter().product::<u64>() * h.dtype.size_bytes()).sum();
        let (bytes, free) = match req.group() {
            Some(d) => d.node_memory(bytes),
            None => (bytes, kiln_runtime::host::available_memory()),
        };
        let decided = |copy: bool| {
            serde_json::json!({"event": "monitor_copies", "state_bytes": bytes, "free_bytes": free,
                "copy_before_each_step": copy, "gate": gated})
        };
        if let Some(free) = free {
            copy_before = match monitor::copies(req.monitor.on_anomaly, bytes, free, gated)? {
                monitor::Copies::All => true,
                monitor::Copies::Gated => false,
                monitor::Copies::NoneBefore(note) => {
                    if req.leader() {
                        bar.suspend(|| say!("monitor: {note}"));
                    }
                    false
                }
            };
        }
        writeln!(metrics, "{}", decided(copy_before))?;
    }
    let mut last_good = match &mon {
        Some(m) if rollback => Some((monitor::saved(trainer.as_ref())?, progress.clone(), m.clone(), 0u32)),
        _ => None,
    };
    let reference = reference_programs.as_ref().map(|(step, acc)| monitor::Reference {
        step,
        accumulate: acc.as_ref(),
        micro_batches,
        states: &states,
        untrained: &untrained,
    });
    // Batches a rollback skips when the replay reaches them, by epoch and position.
    let mut skip: std::collections::HashSet<(u64, usize)> = Default::default();
    // Batches skip-batch has undone since the last step kept.
    let mut skipped_in_a_row = 0u32;
    let mut last_saved: Option<PathBuf> = req.resume.map(Path::to_path_buf);
    let event = |metrics: &mut Box<dyn Write>, v: serde_json::Value| writeln!(metrics, "{v}");
    // What the replicas' sums cost over the run (`--dp`).
    let mut comm = kiln_runtime::comm::CommStats::default();
    // Each process re-checks its own part of a non-finite step: its findings carry its rank.
    let rank = match req.group() {
        Some(d) if d.size() > 1 => format!(" (rank {} of {})", d.rank(), d.size()),
        _ => String::new(),
    };
    let mut before = kiln_runtime::train::Saved::default();
    // An expert-parallel run streams its checkpoints to rank 0 (unless its replicas split their
    // states, which are gathered).
    let expert_stream = match (share, req.dist) {
        (Some(s), Some(d)) => Some(ExpertStream::new(s, d)),
        _ => None,
    };
    while progress.step < hyper.steps {
        let at = (progress.epoch, progress.row);
        let which = progress.next_rows(rows.rows(), hyper.batch);
        let step = progress.step + 1;
        if skip.contains(&at) {
            if req.leader() {
                bar.suspend(|| {
                    say!("monitor: step {step}: skipping the batch of rows {which:?} (rolled back)")
                });
            }
            let v = serde_json::json!({"event": "skip", "step": step, "epoch": at.0, "position": at.1, "rows": which, "why": "rollback"});
            event(&mut metrics, v)?;
            continue;
        }
        // SFT's mask becomes weights that average over the batch's assistant targets: those of the
        // whole batch, before a replica takes its share (so the replicas' mean is the batch's).
        let mut batch = crate::sft::normalise(take(&rows, &which)?)?;
        if let Some(d) = req.dist {
            let (n, r) = (which.len() / d.dp_size(), d.dp_rank());
            batch = batch.select(&(r * n..(r + 1) * n).collect::<Vec<_>>());
        }
        let mut lr = hyper.lr_at(progress.step);
        // An injected fault hits its step once, the first time it runs.
        let fault = faults.iter().position(|(s, _)| *s == step).map(|i| faults.remove(i).1);
        match &fault {
            Some(Fault::LrSpike(f)) => lr *= f,
            Some(Fault::PoisonBatch) => batch = monitor::poison(&batch, spec.model.vocab_size)?,
            Some(Fault::Nan(scope)) => trainer.set_poison(Some(scope))?,
            Some(Fault::Stall(r)) if req.group().is_some_and(|d| d.rank() == *r) => loop {
                std::thread::sleep(std::time::Duration::from_secs(3600));
            },
            Some(Fault::Exit(r)) if req.group().is_some_and(|d| d.rank() == *r) => {
                say!("rank {r}: exiting before step {step} (--inject-fault)");
                std::process::exit(3)
            }
            Some(Fault::Stall(_) | Fault::Exit(_) | Fault::SlowSave(_)) | None => {}
        }
        // The states before the step, for undoing it (--on-anomaly skip-batch) or re-running it
        // op by op (a non-finite step): copied into the buffers of the last step's copy.
        if copy_before {
            trainer.save(&mut before)?;
        }
        let t0 = Instant::now();
        let (stats, applied) = match &mon {
            Some(m) if gated => {
                // The update goes on when the monitor keeps the step, on every process: each
                // asks its own (they see the same summed figures), and they agree by a gather.
                let mut go = |loss: f32, norm: f32| {
                    let keep = matches!(m.verdict(step, loss, norm), None | Some(Policy::Warn));
                    match req.group() {
                        Some(d) if d.size() > 1 => d
                            .gather(&[f32::from(u8::from(keep))])
                            .is_ok_and(|all| all.iter().all(|&k| k > 0.0)),
                        _ => keep,
                    }
                };
                let g = trainer.step_gated(&batch, lr as f32, false, &mut go)?;
                (g.stats, g.applied)
            }
            _ => (trainer.step(&batch, lr as f32)?, true),
        };
        let secs = t0.elapsed().as_secs_f64();
        comm.add(&trainer.take_comm_stats());
        let tps = (hyper.batch * t) as f64 / secs.max(f64::MIN_POSITIVE);
        let f64s = |v: &[f32]| v.iter().map(|&x| f64::from(x)).collect::<Vec<f64>>();
        let mut record = Record {
            step,
            loss: stats.loss.into(),
            grad_norm: stats.grad_norm.into(),
            lr,
            tokens_per_s: tps,
            loads: stats.loads.iter().map(|(s, l)| (s.clone(), f64s(l))).collect(),
            ..Record::default()
        };
        let (mut action, mut alerts) = (None, Vec::new());
        if let Some(m) = &mon {
            record.grad_norms = stats.grad_norms.iter().map(|(l, n)| (l.clone(), f64::from(*n))).collect();
            for name in &biases {
                // A pipeline's other ranks report their biases to the first, which logs them.
                if !trainer.holds(name) {
                    continue;
                }
                let b = trainer.state(name)?;
                let kiln_runtime::weights::HostData::F32(v) = &b.data else { continue };
                record.biases.push((name.to_string(), f64s(v)));
            }
            alerts = m.check(&record);
            action = m.action(&alerts);
            for a in &alerts {
                let did = match (a.kind.follows_policy(), action) {
                    (true, Some(p)) => p.name().to_string(),
                    _ => "warn".into(),
                };
                // Every process of a multi-process run computes the same alerts (from the summed
                // figures): the leader says them.
                if req.leader() {
                    bar.suspend(|| say!("alert: step {step}: {}: {}", a.kind.name(), a.message));
                }
                event(&mut metrics, a.json(&did))?;
            }
            if alerts.iter().any(|a| a.kind == monitor::Kind::NonFinite) {
                let mut v = serde_json::json!({"event": "non_finite", "step": step});
                let located = match copy_before || !applied {
                    true => monitor::locate(
                        trainer.as_mut(),
                        !req.interp,
                        copy_before.then_some(&before),
                        reference.as_ref(),
                        &batch,
                        lr as f32,
                    ),
                    false => Err(anyhow::anyhow!(
                        "no copy of the states before the step was taken (it did not fit in memory)"
                    )),
                };
                match located {
                    Ok(found) => {
                        for (engine, f) in &found {
                            bar.suspend(|| {
                                say!("monitor: step {step}{rank}: {}", monitor::finding(engine, f))
                            });
                            v[*engine] = monitor::finding_json(f);
                        }
                    }
                    // The alert stands without its location; the step's states are put back.
                    Err(e) => {
                        bar.suspend(|| {
                            say!("monitor: step {step}{rank}: the re-check op by op failed: {e:#}")
                        });
                        v["error"] = format!("{e:#}").into();
                        if copy_before {
                            trainer.restore(&before)?;
                        }
                    }
                }
                event(&mut metrics, v)?;
            }
        } else if !(stats.loss.is_finite() && stats.grad_norm.is_finite()) {
            action = Some(Policy::Stop);
        }
        if matches!(fault, Some(Fault::Nan(_))) {
            trainer.set_poison(None)?;
        }
        // A step stopped at its gate was rejected by some process: this one must reject it too
        // (the processes see the same summed loss and norm, so they do).
        if !applied && !matches!(action, Some(Policy::Stop | Policy::SkipBatch | Policy::Rollback)) {
            metrics.flush()?;
            bail!(
                "step {step}: another process rejected the step at its gate and this one{rank} would keep it (the \
                 loss {} and gradient norm {} differ between processes); stopping",
                stats.loss,
                stats.grad_norm
            );
        }
        match action {
            None | Some(Policy::Warn) => {}
            Some(Policy::Stop) => {
                metrics.flush()?;
                let what = match alerts.iter().find(|a| a.kind.follows_policy()) {
                    Some(a) => format!("{}: {}", a.kind.name(), a.message),
                    None => format!("the loss is {} and the gradient norm {}", stats.loss, stats.grad_norm),
                };
                let why = if req.monitor.on_anomaly == Policy::Stop && !req.monitor.no_monitor {
                    "as --on-anomaly stop asks"
                } else {
                    "a non-finite step cannot be kept (with --on-anomaly skip-batch or rollback its batch is dropped \
                     instead)"
                };
                let last = match &last_saved {
                    Some(dir) => format!("the last checkpoint, {}, is intact", dir.display()),
                    None => "no checkpoint was written in this run".into(),
                };
                bail!("step {step}: {what}; stopping {why}; {last}");
            }
            Some(Policy::SkipBatch) => {
                // A step stopped at its gate changed nothing (and zeroed the accumulators).
                if applied {
                    trainer.restore(&before)?;
                }
                if skipped_in_a_row == monitor::MAX_SKIPS_IN_A_ROW {
                    metrics.flush()?;
                    let last = match &last_saved {
                        Some(dir) => format!("the last checkpoint, {}, is intact", dir.display()),
                        None => "no checkpoint was written in this run".into(),
                    };
                    bail!(
                        "step {step}: the batch of rows {which:?} fails too, after {skipped_in_a_row} batches in a row \
                         were undone and skipped: the weights, not the batches, are likely broken (by a step kept \
                         earlier); stopping; {last} (--on-anomaly rollback goes back to the last checkpoint instead)"
                    );
                }
                skipped_in_a_row += 1;
                if req.leader() {
                    bar.suspend(|| {
                        say!("monitor: step {step}: undone; the batch of rows {which:?} is skipped")
                    });
                }
                let v = serde_json::json!({"event": "skip", "step": step, "epoch": at.0, "position": at.1, "rows": which, "why": "skip-batch"});
                event(&mut metrics, v)?;
                continue;
            }
            Some(Policy::Rollback) => {
                let (saved, p, m, count) = last_good.as_mut().expect("kept when rolling back");
                *count += 1;
                if *count > monitor::MAX_ROLLBACKS {
                    bail!(
                        "step {step}: rolled back to step {} {} times and the run still does not recover; stopping \
                         (the checkpoints written are intact)",
                        p.step,
                        monitor::MAX_ROLLBACKS
                    );
                }
                trainer.restore(saved)?;
                (progress, mon) = (p.clone(), Some(m.clone()));
                skip.insert(at);
                if req.leader() {
                    bar.suspend(|| {
                    say!(
                        "monitor: step {step}: rolled back to step {}; the batch of rows {which:?} will be skipped",
                        p.step
                    )
                });
                }
                let v = serde_json::json!({"event": "rollback", "step": step, "to": p.step, "epoch": at.0, "position": at.1, "rows": which});
                event(&mut metrics, v)?;
                bar.set_position(progress.step);
                continue;
            }
        }
        if let Some(m) = mon.as_mut() {
            m.keep(&record);
        }
        skipped_in_a_row = 0;
        progress.step += 1;
        let load = stats.max_load.map_or(String::new(), |m| format!("  max load {m:.3}x mean"));
        bar.suspend(|| {
            writeln!(
                out,
                "step {:>5}  loss {:.6}  grad norm {:.4}  lr {:.3e}  {:.1} tokens/s{load}",
                progress.step, stats.loss, stats.grad_norm, lr, tps
            )
        })?;
        bar.set_message(format!("loss {:.4}", stats.loss));
        bar.set_position(progress.step);
        writeln!(metrics, "{}", record.json())?;
        let last = progress.step == hyper.steps;
        if last || req.save_every.is_some_and(|k| k > 0 && progress.step % k == 0) {
            // The other processes wait for rank 0 to write the files, bounded by the checkpoint
            // wait, not --comm-timeout.
            let _saving = crate::dist::Saving::begin();
            // Rank 0 writes the files, reading each tensor as its turn comes; no process holds
            // the model's states whole.
            // - A pipeline streams its ranks' states to rank 0 as it asks for them (the first
            //   replica's; where the replicas split their states, each rank's replicas join the
            //   gather of each as it is made whole).
            // - Expert parallelism (with a pipeline or not): rank 0 asks the process that holds
            //   each tensor for it itself, telling the holders of a split state's shards to join
            //   its gather first (`ExpertStream`).
            // - A replica's split states (`--zero1`, no pipeline, no experts) are gathered one at
            //   a time as rank 0 writes them, every replica taking part in the same order.
            let experts = expert_stream.as_ref();
            match (req.pipeline, experts) {
                (Some(_), None) => trainer.stream_for_checkpoint()?,
                (Some(_), Some(_)) => trainer.plan_checkpoint()?,
                (None, _) => {}
            }
            let split = match req.dist {
                // A pipeline's ranks make their split states whole as they stream them.
                Some(d)
                    if (req.pipeline.is_none() || experts.is_some())
                        && split_states(trainer.as_ref(), &states)? =>
                {
                    Some(d)
                }
                _ => None,
            };
            if let (Some(d), false, None) = (split, req.leader(), experts) {
                follow_streamed_save(trainer.as_ref(), d, &states, &roles)?;
            }
            let tensors = Tensors { split: split.map(|d| (d, &states[..])), experts };
            if req.leader() {
                if let Some(Fault::SlowSave(secs)) = &fault {
                    std::thread::sleep(std::time::Duration::from_secs_f64(*secs));
                }
                let saved = save(
                    req.out,
                    &spec,
                    trainer.as_ref(),
                    tensors,
                    &untrained,
                    &roles,
                    &progress,
                    text.as_deref(),
                );
                // The other expert-parallel ranks serve until told, whether the files were
                // written or not.
                if let Some(x) = experts {
                    x.finish(trainer.as_ref(), true, split.map(|d| (d, &states[..])))?;
                }
                let dir = saved?;
                write_curve(req.out, &spec.model.name)?;
                bar.suspend(|| writeln!(out, "saved {}", dir.display()))?;
                last_saved = Some(dir.clone());
            } else if let Some(x) = experts {
                x.finish(trainer.as_ref(), false, split.map(|d| (d, &states[..])))?;
            }
            trainer.checkpoint_written()?;
            // No process goes on to the next step's messages, bounded by --comm-timeout, until
            // the files are written.
            if let Some(d) = req.group() {
                let what = format!("the wait for rank 0 to write checkpoint step-{}", progress.step);
                d.barrier(&what, crate::dist::CHECKPOINT_WAIT)?;
            }
            if let (Some(good), Some(m)) = (last_good.as_mut(), &mon) {
                *good = (monitor::saved(trainer.as_ref())?, progress.clone(), m.clone(), 0);
            }
        }
    }
    bar.finish_and_clear();
    if comm.messages > 0 {
        let ms = |ns: u64| ns as f64 / 1e6;
        writeln!(
            out,
            "communication: {} {}, {:.1} MB, {:.1} ms in flight, {:.1} ms waited for: {:.0}% hidden under \
             computation",
            comm.messages,
            match req.pipeline {
                Some(_) => "messages (point-to-point and collective)",
                None => "collective messages",
            },
            comm.bytes as f64 / 1e6,
            ms(comm.in_flight_ns),
            ms(comm.waited_ns),
            100.0 * comm.hidden()
        )?;
        if comm.rows_offered > 0 {
            writeln!(
                out,
                "all-to-all: {} of the {} token rows for other ranks travelled ({:.0}%): a token goes only to \
                 the ranks of its experts; {} exchanges, {:.1} ms in flight, {:.1} ms waited for: {:.0}% hidden \
                 under computation",
                comm.rows_sent,
                comm.rows_offered,
                100.0 * comm.rows_sent as f64 / comm.rows_offered as f64,
                comm.exchanges,
                ms(comm.exchange_in_flight_ns),
                ms(comm.exchange_waited_ns),
                100.0 * comm.exchange_hidden(),
            )?;
        }
        let v = serde_json::json!({"event": "communication", "messages": comm.messages, "bytes": comm.bytes,
            "in_flight_ms": ms(comm.in_flight_ns), "waited_ms": ms(comm.waited_ns), "hidden": comm.hidden(),
            "rows_sent": comm.rows_sent, "rows_offered": comm.rows_offered, "exchanges": comm.exchanges,
            "exchange_in_flight_ms": ms(comm.exchange_in_flight_ns),
            "exchange_waited_ms": ms(comm.exchange_waited_ns), "exchange_hidden": comm.exchange_hidden(),
            "exchange_start_ms": ms(comm.exchange_start_ns)});
        event(&mut metrics, v)?;
    }
    // A resume of a finished run takes no step: the curve still covers the log.
    if req.leader() {
        write_curve(req.out, &spec.model.name)?;
    }
    Ok(())
}

/// Where text data's tokenizer.json is: `--tokenizer` (the file or its folder), else the model's
/// Hugging Face folder, else the initial weights' folder.
fn tokenizer_folder(req: &Request) -> Result<PathBuf> {
    let weights = match &req.weights {
        Weights::Checkpoint(dir) => Some(*dir),
        Weights::Random(_) => None,
    };
    match crate::tokenize::text_folder(req.tokenizer, req.model, req.resume.or(weights)) {
        Some(dir) => Ok(dir),
        None => bail!(
            "{}: text data is tokenised with the model's tokenizer.json: give it with --tokenizer FILE \
             (or train a Hugging Face folder that holds one)",
            req.data.display()
        ),
    }
}

/// A bar of the run's steps on stderr, from `done`; hidden when stderr is not a terminal (a log
/// or a pipe gets the step lines of stdout alone).
fn progress_bar(steps: u64, done: u64) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(steps), ProgressDrawTarget::stderr());
    if let Ok(style) =
        ProgressStyle::with_template("[{bar:30}] step {pos}/{len} {msg} ({elapsed}, eta {eta})")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_position(done);
    bar.reset_eta();
    bar
}

/// Rewrites `out/loss.svg` from the whole of `out/metrics.jsonl`, atomically (a hidden file
/// renamed into place).
fn write_curve(out: &Path, model: &str) -> Result<()> {
    let log = out.join(METRICS);
    let text = std::fs::read_to_string(&log).with_context(|| format!("cannot read {}", log.display()))?;
    let svg = plot::render(&format!("kiln train {model}: loss"), &plot::points(&text));
    Ok(kiln_ir::output::write_file(&out.join(CURVE), svg.as_bytes())?)
}

/// Removes from `out` the hidden temporaries a killed `kiln train` left (`.step-N.tmp-PID/`,
/// `.loss.svg.tmp-PID…`): those of a process that no longer runs (`kiln_ir::output::remove_stale`).
fn remove_stale(out: &Path) -> Result<()> {
    let owner = |name: &str| {
        let (stem, _) = name.split_once(".tmp-")?;
        let ours = stem.strip_prefix(".step-").is_some_and(|n| n.parse::<u64>().is_ok())
            || stem == format!(".{CURVE}");
        ours.then(|| kiln_ir::output::pid_after(name, &format!("{stem}.tmp-")))?
    };
    kiln_ir::output::remove_stale(out, owner)
        .with_context(|| format!("cannot remove the temporaries a killed run left in {}", out.display()))?;
    Ok(())
}

/// The train step compiled for the CPU into `--out`/`train.kiln` (for micro-batches of the run's
/// rows of `t` tokens, with the run's losses and optimizer), or with `artifact` the model's own
/// (`kiln compile --train`), loaded with the weights.
#[allow(clippy::too_many_arguments)]
fn compiled(
    req: &Request,
    hyper: &Hyper,
    losses: build::TrainLosses,
    artifact: bool,
    spec: &kiln_ir::ModelSpec,
    t: u64,
    micro_batches: usize,
    weights_in: Vec<weights::HostTensor>,
    out: &mut impl Write,
) -> Result<(Box<dyn Steps>, String)> {
    use kiln_compiler::pack;
    // The programs run one micro-batch at a time: their buffers are planned for that many rows.
    let rows = (req.local_batch()? / micro_batches) as u64;
    let dir = if artifact {
        req.model.to_path_buf()
    } else if !req.leader() {
        // The first replica compiles; the others load its artifact once it is written.
        let dir = req.out.join(ARTIFACT);
        let d = req.group().expect("only a replica follows");
        d.barrier("the wait for rank 0's compile of the train step", COMPILE_WAIT)?;
        dir
    } else {
        let targets = match req.device {
            run::Device::Cpu => kiln_compiler::target::Targets::Cpu,
            run::Device::Cuda => kiln_compiler::target::Targets::Gpu,
        };
        let shards = match (req.zero1, req.dist) {
            (true, Some(d)) => d.dp_size() as u32,
            _ => 1,
        };
        let train = pack::TrainOptions {
            losses,
            optimizer: Optimizer { shards, ..hyper.optimizer() },
            accumulate: micro_batches > 1,
            data_parallel: req.dist.is_some(),
            expert_parallel: req.dist.map(|d| d.ep_size() as u64).filter(|&e| e > 1),
        };
        let options = pack::Options {
            train: Some(train),
            kv_cache: false,
            score: false,
            parallel: req.pipeline.map(|(d, kind)| pack::Parallel {
                kind,
                pp: d.pp_size() as u32,
                // The plan's expert placement is the step's (`--pp P --ep E`).
                ep: Some(req.dist.map_or(1, |r| r.ep_size() as u64)),
                micro_batches: Some(micro_batches as u32),
            }),
            ..pack::Options::new(targets, rows, t)
        };
        let dir = req.out.join(ARTIFACT);
        let t0 = Instant::now();
        let artifact = pack::compile(
            pack::Source::Spec(spec.clone()),
            &options,
            &mut Passes { skip: req.skipped_passes() },
        )?;
        pack::write(&artifact, &dir)?;
        writeln!(
            out,
            "compiled the train step into {} ({} kernels) in {:.1} s",
            dir.display(),
            artifact.manifest.kernels.len(),
            t0.elapsed().as_secs_f64()
        )?;
        if let Some(d) = req.group() {
            d.barrier("the wait for rank 0's compile of the train step", COMPILE_WAIT)?;
        }
        dir
    };
    let mut art = kiln_runtime::artifact::load(&dir)?;
    match req.device {
        run::Device::Cpu if art.manifest().cpu.is_none() => {
            bail!("{}: the artifact has no CPU library: compile it with --target cpu or all", dir.display())
        }
        run::Device::Cuda if art.manifest().gpu.is_none() => bail!(
            "{}: the artifact has no GPU kernels (kernels.ptx): compile it with --target sm_90a or all",
            dir.display()
        ),
        _ => {}
    }
    // An expert-parallel rank loads its own experts under rank 0's names, as its step reads them.
    let share = ExpertShare::of(req, spec)?;
    // An artifact's step is one rank's of as many expert-parallel ranks as it was compiled for
    // (`kiln compile --train --pp P --ep E`), or the whole model's.
    let planned = |a: &kiln_runtime::artifact::Artifact| {
        let reads_rank =
            a.manifest().states.iter().any(|s| s.name == kiln_compiler::expert_parallel::EP_RANK);
        reads_rank.then(|| a.manifest().parallel.as_ref().map_or(0, |p| u64::from(p.ep)))
    };
    if artifact {
        match (planned(&art), share) {
            (None, Some(s)) => bail!(
                "{}: the train step holds every expert; compile it with `kiln compile --train --pp P --ep {}` \
                 for --ep {}, or give the model spec",
                dir.display(),
                s.size,
                s.size
            ),
            (Some(e), None) => bail!(
                "{}: the train step is one rank's of {e} expert-parallel ranks: run it with --ep {e} under \
                 `mpirun -n {e}` (times --pp and --dp)",
                dir.display()
            ),
            (Some(e), Some(s)) if e != s.size => bail!(
                "{}: the train step splits the experts over {e} ranks, not the --ep {} given",
                dir.display(),
                s.size
            ),
            _ => {}
        }
    }
    let weights_in = match share {
        Some(s) => (weights_in.into_iter())
            .filter_map(|t| s.local(&t.name).map(|name| weights::HostTensor { name, ..t }))
            .collect(),
        None => weights_in,
    };
    let load = |art: &kiln_runtime::artifact::Artifact, weights_in: Vec<weights::HostTensor>| -> Result<_> {
        let wanted: std::collections::HashSet<String> =
            weights::manifest_params(art.manifest())?.into_iter().map(|d| d.name).collect();
        let given = weights_in.into_iter().filter(|t| wanted.contains(&t.name)).map(Ok);
        Ok(CpuModel::load(art, given, &run::cpu_options(req.threads))?)
    };
    if let Some((d, _)) = req.pipeline {
        let Some(plan) = art.manifest().parallel.clone() else {
            bail!(
                "{}: the artifact has no pipeline: compile it with `kiln compile --train --pp N`",
                dir.display()
            );
        };
        if plan.micro_batches as usize != micro_batches {
            let (local, compiled) = (req.local_batch()?, plan.micro_batches.max(1) as usize);
            // A micro-batch is at least a row: too few rows for the compiled count needs a larger batch.
            let fix = match local / compiled {
                0 => format!(
                    "give --batch {} (a row per micro-batch)",
                    req.hyper.batch / local.max(1) * compiled
                ),
                rows => format!("give --micro-batch {rows}"),
            };
            bail!(
                "{}: the pipeline was compiled for {} micro-batches a step, and this run splits each batch into \
                 {micro_batches}: {fix} or recompile with --micro-batches {micro_batches}",
                dir.display(),
                plan.micro_batches,
            );
        }
        if !art.manifest().programs.iter().any(|p| p.name.starts_with("stage.")) {
            bail!(
                "{}: the artifact plans a pipeline but has no stage programs: compile it with --train",
                dir.display()
            );
        }
        let dp_sums = (art.manifest().programs.iter()).any(|p| {
            (p.steps.iter()).any(|s| matches!(s, kiln_ir::artifact::Step::AllReduce { group, .. } if group == kiln_compiler::train::DP_GROUP))
        });
        if req.dist.is_some() && !dp_sums {
            bail!(
                "{}: the pipeline's updates sum nothing over data-parallel replicas: compile it with \
                 `kiln compile --train --pp N --data-parallel` for --pp with --dp",
                dir.display()
            );
        }
        // This rank loads its own stages' programs and states alone.
        let whole = art.keep_programs(|name| {
            crate::pipeline::runs(&plan, d.pp_rank() as u32, name).then(|| name.into())
        });
        let stage = Stage { req, share, rows, d };
        return match req.device {
            run::Device::Cuda => {
                let (model, device) = cuda_model(&art, weights_in)?;
                stage.trainer(model, device, whole, &plan)
            }
            run::Device::Cpu => {
                let model = load(&art, weights_in)?;
                let device = format!("the CPU ({} threads)", model.threads());
                stage.trainer(model, device, whole, &plan)
            }
        };
    }
    if req.device == run::Device::Cuda {
        let (model, device) = cuda_model(&art, weights_in)?;
        let engine = format!("compiled for {device}");
        return single(model, engine, req, &art, &dir, artifact, rows, t, micro_batches, share);
    }
    let model = load(&art, weights_in)?;
    let engine = format!("compiled for the CPU ({} threads)", model.threads());
    single(model, engine, req, &art, &dir, artifact, rows, t, micro_batches, share)
}

/// What a pipeline rank's trainer is made from, besides its model.
struct Stage<'a> {
    req: &'a Request<'a>,
    share: Option<ExpertShare>,
    rows: u64,
    d: &'a crate::dist::Dist,
}

impl Stage<'_> {
    /// This pipeline rank's trainer on `model` (on `device`, in words), running its own stages
    /// (`whole`: the artifact's manifest before it kept them) under `plan`.
    fn trainer<B: kiln_runtime::exec::Backend + 'static>(
        &self,
        model: kiln_runtime::exec::Executor<B>,
        device: String,
        whole: kiln_ir::artifact::Manifest,
        plan: &kiln_ir::artifact::ParallelPlan,
    ) -> Result<(Box<dyn Steps>, String)> {
        let (req, share, rows, d) = (self.req, self.share, self.rows, self.d);
        let mut engine = format!(
                "compiled for {device}, pipeline rank {} of {} ({} schedule, {} micro-batches of {rows} rows, MPI)",
                d.pp_rank(),
                d.pp_size(),
                plan.schedule,
                plan.micro_batches
            );
        // Replicas of the pipeline, each group of --ep of them splitting the experts.
        if let Some(r) = req.dist.filter(|r| r.dp_size() > r.ep_size()) {
            let ep = r.ep_size();
            engine += &format!(", replica {} of {} (data-parallel)", r.dp_rank() / ep, r.dp_size() / ep);
        }
        let mut trainer = crate::pipeline::PipelineTrainer::new(model, whole, d.pipeline_link())?;
        let (held, all) = trainer.held_state_bytes();
        engine += &format!(
            ", {:.2} of the model's {:.2} MB of states on this rank",
            held as f64 / 1e6,
            all as f64 / 1e6
        );
        trainer.set_replicas(d.dp_size());
        trainer.set_replica_index(d.dp_rank());
        // The first replica's timeline; the others run the same lists.
        trainer.set_trace(req.pp_trace.filter(|_| req.leader()));
        trainer.set_checkpoint_link(d.pipeline_link());
        if d.dp_size() > 1 {
            trainer.set_replica_link(d.replica_link());
        }
        trainer.executor_mut().set_communicator(d.pipeline_ranks())?;
        if req.nccl {
            let nccl = trainer.executor_mut().join_device_collectives()?;
            engine += &format!(", sums over {nccl}");
        }
        if let Some(s) = share {
            // The stages with MoE layers read the rank.
            if trainer.holds(kiln_compiler::expert_parallel::EP_RANK) {
                trainer.executor_mut().write_state(&s.rank_state())?;
            }
            engine += &format!(", {}", s.describe());
        }
        Ok((Box::new(trainer), engine))
    }
}

/// The train step's model on CUDA: the device of this process's local rank among the devices the
/// driver sees (device 0 for a process alone; several processes may share one), and the device in
/// words.
fn cuda_model(
    art: &kiln_runtime::artifact::Artifact,
    weights_in: Vec<weights::HostTensor>,
) -> Result<(kiln_runtime::gpu::GpuModel, String)> {
    let wanted: std::collections::HashSet<String> =
        weights::manifest_params(art.manifest())?.into_iter().map(|d| d.name).collect();
    let given = weights_in.into_iter().filter(|t| wanted.contains(&t.name)).map(Ok);
    let local = ["OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PMIX_LOCAL_RANK"]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.parse::<usize>().ok())
        .unwrap_or(0);
    let count = kiln_runtime::cuda::devices()?.len().max(1);
    let options = kiln_runtime::gpu::GpuOptions { device: local % count, ..Default::default() };
    let model = kiln_runtime::gpu::GpuModel::load(art, given, &options)?;
    let device = format!("CUDA device {}, {}", local % count, model.device_name());
    Ok((model, device))
}

/// The one-process (or data-parallel) compiled trainer on `model`'s backend: checks the sizes an
/// artifact was compiled for, joins the replicas of a `--dp` run, sets the micro-batches.
#[allow(clippy::too_many_arguments)]
fn single<B: kiln_runtime::exec::Backend + 'static>(
    model: kiln_runtime::exec::Executor<B>,
    mut engine: String,
    req: &Request,
    art: &kiln_runtime::artifact::Artifact,
    dir: &Path,
    artifact: bool,
    rows: u64,
    t: u64,
    micro_batches: usize,
    share: Option<ExpertShare>,
) -> Result<(Box<dyn Steps>, String)> {
    let mut trainer = CompiledTrainer::new(model)?;
    if artifact {
        // Checked before any step: an artifact is planned for at most its compiled sizes.
        let max = trainer.max_sizes()?;
        if rows > max.b || t > max.t {
            bail!(
                "{}: the train step was compiled for micro-batches of at most {} rows of {} tokens, not {rows} \
                 of {t}: use a smaller --batch/--micro-batch or --seq-len, or recompile with `kiln compile \
                 --train --max-batch {rows} --max-context {t}`",
                dir.display(),
                max.b,
                max.t
            );
        }
        engine = format!("the artifact {}, {engine}", dir.display());
    }
    if let Some(d) = req.dist {
        let reduces = (art.manifest().programs.iter())
            .any(|p| p.steps.iter().any(|s| matches!(s, kiln_ir::artifact::Step::AllReduce { .. })));
        if !reduces {
            bail!(
                "{}: the train step sums nothing over data-parallel replicas: compile it with `kiln compile \
                 --train --data-parallel` for --dp",
                dir.display()
            );
        }
        match share {
            Some(s) => {
                let exec = trainer.executor_mut();
                exec.set_communicator(d.expert_training())?;
                exec.write_state(&s.rank_state())?;
                engine += &format!(", {}", s.describe());
                if d.size() > d.ep_size() {
                    engine += &format!(", replica {} of {}", d.rank() / d.ep_size(), d.size() / d.ep_size());
                }
                engine += &format!(", {rows} rows each");
            }
            None => {
                trainer.executor_mut().set_communicator(d.replicas())?;
                engine += &format!(", data-parallel over {} processes (MPI), {rows} rows each", d.dp_size());
            }
        }
        if req.nccl {
            let nccl = trainer.executor_mut().join_device_collectives()?;
            engine += &format!(", sums over {nccl}");
        }
        let exec = trainer.executor();
        let moments =
            exec.state_bytes(StateRole::OptimizerMoment) + exec.state_bytes(StateRole::MasterWeight);
        let split = (art.manifest().programs.iter())
            .any(|p| p.steps.iter().any(|s| matches!(s, kiln_ir::artifact::Step::AllGather { .. })));
        engine += &format!(
            ", AdamW's states {:.2} MB per process{}",
            moments as f64 / 1e6,
            if split { " (split over the replicas: ZeRO-1)" } else { "" }
        );
    }
    trainer.set_micro_batches(micro_batches)?;
    if micro_batches > 1 {
        engine += &format!(", {micro_batches} micro-batches of {rows} rows per step");
    }
    Ok((Box::new(trainer), engine))
}

/// Whether this replica holds only its shard of some state (`--zero1`): a kept state with fewer
/// values than its declaration's. Every replica answers the same.
fn split_states(trainer: &dyn Steps, decls: &[kiln_ir::module::StateDecl]) -> Result<bool> {
    let (_, kept) = trainer.heads()?;
    Ok(kept.iter().any(|h| {
        decls.iter().find(|d| d.name == h.name).is_some_and(|d| {
            let whole: Option<u64> = d.ty.shape.iter().map(|d| d.as_known()).product();
            whole.is_some_and(|n| n != h.shape.iter().product::<u64>())
        })
    }))
}

/// The declared shape of state `h` where this replica holds only a shard of it (`--zero1`), if so.
fn whole_shape(h: &weights::TensorHead, decls: &[kiln_ir::module::StateDecl]) -> Option<Vec<u64>> {
    let decl = decls.iter().find(|d| d.name == h.name)?;
    let shape: Vec<u64> = decl.ty.shape.iter().filter_map(|d| d.as_known()).collect();
    let n = shape.iter().product::<u64>();
    (shape.len() == decl.ty.shape.len() && n != h.shape.iter().product::<u64>()).then_some(shape)
}

/// State `t` whole: itself, or, where this replica holds a shard of it, every replica's shard
/// gathered (every replica must call it for the same state at once), the padding dropped and the
/// declared shape (`decls`) restored.
fn whole_state(
    t: weights::HostTensor,
    dist: Option<&crate::dist::Dist>,
    decls: &[kiln_ir::module::StateDecl],
) -> Result<weights::HostTensor> {
    let Some(shape) = whole_shape(&weights::TensorHead::of(&t), decls) else { return Ok(t) };
    let n = shape.iter().product::<u64>() as usize;
    let Some(d) = dist else {
        bail!(
            "state `{}` holds {} of its {n} values, but this run has no replicas to gather from",
            t.name,
            t.data.len()
        );
    };
    let mine = match &t.data {
        weights::HostData::F32(v) => v.clone(),
        weights::HostData::I64(_) => bail!("state `{}` is split but not a float", t.name),
    };
    // A routed expert's state is split over the processes holding the expert (`--ep` with
    // `--dp`), any other over every replica (of its stage, with `--pp`).
    let expert = d.ep_size() > 1 && kiln_compiler::expert_parallel::is_routed_expert(&t.name);
    let mut all = match expert {
        true => d.gather_expert_replicas(&mine)?,
        false => d.gather_replicas(&mine)?,
    };
    if all.len() < n {
        bail!("state `{}`: the replicas' shards hold {} values, fewer than its {n}", t.name, all.len());
    }
    all.truncate(n);
    Ok(weights::HostTensor { name: t.name, dtype: t.dtype, shape, data: weights::HostData::F32(all) })
}

/// The split states a streamed save gathers (`Tensors::Streamed` with `split`), in the order it
/// writes them: the optimizer's file takes the kept states that are neither weights nor routing
/// biases, in the trainer's order.
fn split_save_order(
    trainer: &dyn Steps,
    decls: &[kiln_ir::module::StateDecl],
    roles: &HashMap<String, StateRole>,
) -> Result<Vec<String>> {
    let (_, kept) = trainer.heads()?;
    Ok(kept
        .into_iter()
        .filter(|h| {
            !matches!(roles.get(&h.name), Some(StateRole::Trainable | StateRole::RoutingBias) | None)
                && whole_shape(h, decls).is_some()
        })
        .map(|h| h.name)
        .collect())
}

/// A replica's part in the leader's streamed save (`--dp N --zero1`): the leader gathers each
/// split state as it writes it, and every other replica gives its shard to each gather, in the
/// same order ([`split_save_order`]), holding one state whole at a time.
fn follow_streamed_save(
    trainer: &dyn Steps,
    d: &crate::dist::Dist,
    decls: &[kiln_ir::module::StateDecl],
    roles: &HashMap<String, StateRole>,
) -> Result<()> {
    for name in split_save_order(trainer, decls, roles)? {
        whole_state(trainer.tensor(&name)?, Some(d), decls)?;
    }
    Ok(())
}

/// A checkpoint's whole state `whole` as this replica keeps it: itself, or (`--zero1`) the shard
/// of `current`'s size at this replica's rank, from `whole` flattened and padded with zeros.
fn shard_of(
    whole: weights::HostTensor,
    current: &weights::HostTensor,
    dist: Option<&crate::dist::Dist>,
) -> Result<weights::HostTensor> {
    let (n, m) = (whole.data.len(), current.data.len());
    if n == m {
        return Ok(weights::HostTensor { shape: current.shape.clone(), ..whole });
    }
    // A routed expert's state is split over the processes holding the expert, any other over every
    // replica.
    let expert = |d: &crate::dist::Dist| {
        d.ep_size() > 1 && kiln_compiler::expert_parallel::is_routed_expert(&whole.name)
    };
    let split = |d: &crate::dist::Dist| match expert(d) {
        true => (d.edp_rank(), d.edp_size()),
        false => (d.dp_rank(), d.dp_size()),
    };
    let Some((rank, _)) = dist.map(split).filter(|&(_, size)| m * size >= n && m * (size - 1) < n) else {
        bail!(
            "state `{}` has {n} values in the checkpoint, and this run keeps {m} of them: resume it with the \
             replicas it was split over",
            whole.name
        );
    };
    let weights::HostData::F32(v) = whole.data else {
        bail!("state `{}` is split but not a float", whole.name);
    };
    let shard: Vec<f32> = (rank * m..(rank + 1) * m).map(|i| v.get(i).copied().unwrap_or(0.0)).collect();
    Ok(weights::HostTensor {
        name: whole.name,
        dtype: whole.dtype,
        shape: current.shape.clone(),
        data: weights::HostData::F32(shard),
    })
}

/// The rows `which`, as one batch.
fn take(rows: &TokenRows, which: &[usize]) -> Result<TokenRows> {
    Ok(rows.select(which))
}

/// Copies tokenizer.json and tokenizer_config.json (those there are) from the folder `from` into
/// `to`.
pub fn copy_tokenizer(from: Option<&Path>, to: &Path) -> Result<()> {
    for name in [crate::tokenize::TOKENIZER_FILE, crate::chat::template::CONFIG_FILE] {
        if let Some(f) = from.map(|d| d.join(name)).filter(|f| f.is_file()) {
            std::fs::copy(&f, to.join(name)).with_context(|| format!("cannot copy {}", f.display()))?;
        }
    }
    Ok(())
}

/// The prefix under which a checkpoint's optimizer file keeps the exact value of a weight that its
/// model file stores in FP8: `weight.{name}`.
pub const EXACT_PREFIX: &str = "weight.";

/// Whether a checkpoint's model file stores weight `t` in DeepSeek-V3's FP8 release layout
/// (reference §4.2): a 2-D float weight of a linear DeepSeek stores in FP8.
fn released_in_fp8(t: &weights::TensorHead, q: &kiln_ir::spec::QuantSection) -> bool {
    use kiln_compiler::passes::insert_fp8_casts::fp8_name;
    fp8_name(&t.name, q) && t.shape.len() == 2 && t.dtype.is_float() && t.dtype != DType::F8E4M3
}

/// Weight `t` in DeepSeek-V3's FP8 release layout (reference §4.2): E4M3 codes, and
/// `{name}_scale_inv`, one f32 per `weight_block` block (partial blocks at the edges), quantised
/// as the FP8 train step quantises it each step (the reference interpreter's `quantize`: block max
/// floored at 1e-4, over 448), so a run of the checkpoint computes with the FP8 weights the last
/// step used.
fn fp8_release(
    t: &weights::HostTensor,
    q: &kiln_ir::spec::QuantSection,
) -> Result<(weights::HostTensor, weights::HostTensor)> {
    use kiln_compiler::passes::insert_fp8_casts::AMAX_FLOOR;
    use kiln_ir::interp::Tensor;
    use kiln_ir::op::{Op, QuantSpec};
    use kiln_ir::{Dim, Graph, TensorType};
    let weights::HostData::F32(values) = &t.data else {
        bail!("{}: an FP8 weight of {} holds integers", t.name, t.dtype);
    };
    let spec = QuantSpec { block: q.weight_block.to_vec(), amax_floor: AMAX_FLOOR, pow2_scale: q.pow2_scale };
    let mut g = Graph::new("fp8_release");
    let ty = TensorType::new(t.dtype, t.shape.iter().map(|&d| Dim::known(d)).collect::<Vec<_>>());
    let (_, x) = g.add_node(Op::Input { name: "w".into() }, &[], vec![ty.clone()], None)?;
    let op = Op::Quantize { to: DType::F8E4M3, spec };
    let types = kiln_ir::infer::infer(&op, &[&ty]).map_err(|e| anyhow::anyhow!("{}: {}", t.name, e.0))?;
    let (_, r) = g.add_node(op, &[x[0]], types, None)?;
    g.add_output("codes", r[0])?;
    g.add_output("scales", r[1])?;
    let w = Tensor::from_f32(t.dtype, t.shape.clone(), values.clone())?;
    let mut outs = kiln_ir::interp::run(&g, &[("w".to_string(), w)].into(), &Default::default())?;
    let mut host = |name: String, dtype: DType, output: &str| {
        let tensor = outs.remove(output).expect("the graph has both outputs");
        weights::HostTensor {
            name,
            dtype,
            shape: tensor.shape().to_vec(),
            data: weights::HostData::F32(tensor.as_f32().expect("quantize gives floats").to_vec()),
        }
    };
    Ok((
        host(t.name.clone(), DType::F8E4M3, "codes"),
        host(weights::scale_name(&t.name), DType::F32, "scales"),
    ))
}

/// Where a checkpoint's tensors come from: the trainer, one at a time as the files are written
/// (a pipeline's trainer asks its other ranks for theirs).
struct Tensors<'a> {
    /// The states this replica holds a shard of are gathered whole as they are written (the
    /// other replicas follow, [`follow_streamed_save`], or are told, [`ExpertStream`]).
    split: Option<(&'a crate::dist::Dist, &'a [kiln_ir::module::StateDecl])>,
    /// `--ep`: the tensors other processes hold are asked of them as the files need them.
    experts: Option<&'a ExpertStream>,
}

/// Where a tensor of a checkpoint's file comes from when its turn comes.
#[derive(Clone)]
enum Source {
    /// `pool[i]`: held already (the untrained weights).
    Held(usize),
    /// Read from the trainer.
    Trainer(String),
    /// Asked of process `rank`, which holds it as `local` (`--ep`: its experts under rank 0's
    /// names); `name` is its name in the checkpoint; `split`: the replicas hold shards of it,
    /// made whole as it is asked for.
    Remote { rank: u32, local: String, name: String, split: bool },
}

impl Source {
    /// The name of the tensor this source gives.
    fn name<'p>(&'p self, pool: &'p [&weights::HostTensor]) -> &'p str {
        match self {
            Source::Held(j) => &pool[*j].name,
            Source::Trainer(name) | Source::Remote { name, .. } => name,
        }
    }
}

/// What a checkpoint's file stores of a [`Source`].
#[derive(Clone, Copy, PartialEq, Eq)]
enum Form {
    AsIs,
    /// FP8 codes under the weight's own name ([`fp8_release`]).
    Codes,
    /// Their `_scale_inv` block scales.
    Scales,
    /// The weight's exact value, under `weight.{name}` ([`EXACT_PREFIX`]).
    Exact,
}

/// Writes checkpoint `step-N` into `out` atomically (a hidden folder renamed into place). A
/// tensor is read from the trainer, converted and written one at a time (`Tensors::Streamed`), so
/// a save needs the memory of the largest tensor, not of the model and its optimizer state again
/// (models/bench.toml's FP8 form: 8 GB of f32 values, written in 130 MB).
#[allow(clippy::too_many_arguments)]
fn save(
    out: &Path,
    spec: &kiln_ir::ModelSpec,
    trainer: &dyn Steps,
    tensors: Tensors<'_>,
    untrained: &[weights::HostTensor],
    roles: &HashMap<String, StateRole>,
    progress: &Progress,
    tokenizer: Option<&Path>,
) -> Result<PathBuf> {
    use weights::TensorHead;
    let dir = out.join(format!("step-{}", progress.step));
    let tmp = out.join(format!(".step-{}.tmp-{}", progress.step, std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    // Every tensor by name, with where it comes from: the untrained weights, then the trainer's
    // (which replace an untrained one of the same name).
    let pool: Vec<&weights::HostTensor> = untrained.iter().collect();
    let mut all: HashMap<String, (TensorHead, Source)> = untrained
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.clone(), (TensorHead::of(t), Source::Held(i))))
        .collect();
    let Tensors { split, experts } = tensors;
    let (w, mut k) = trainer.heads()?;
    if experts.is_some() {
        // By name, each expert's ranks in order: the same files however the run was split
        // (`--pp`, `--zero1` or not).
        k.sort_by(|a, b| a.name.cmp(&b.name));
    }
    let from_trainer: Vec<(TensorHead, Source)> = (w.into_iter().chain(k))
        .flat_map(|h| {
            // A split state is written whole, in its declared shape.
            let whole = split.and_then(|(_, decls)| whole_shape(&h, decls));
            let shards = whole.is_some();
            let head = TensorHead { shape: whole.unwrap_or(h.shape), ..h };
            match experts {
                Some(x) => x.sources(head, trainer, shards),
                None => vec![(head.clone(), Source::Trainer(head.name))],
            }
        })
        .collect();
    let (mut model, mut optimizer) = (Vec::new(), Vec::new());
    for (head, source) in from_trainer {
        match roles.get(&head.name) {
            Some(StateRole::Trainable | StateRole::RoutingBias) | None => {
                all.insert(head.name.clone(), (head, source));
            }
            Some(_) => optimizer.push((head, source, Form::AsIs)),
        }
    }
    let mut exact = Vec::new();
    for (_, (head, source)) in all {
        match &spec.quantization {
            // DeepSeek's release layout; the exact weights go with the optimizer's state for a
            // resume.
            Some(q) if released_in_fp8(&head, q) => {
                let b = &q.weight_block;
                let scales = TensorHead {
                    name: weights::scale_name(&head.name),
                    dtype: DType::F32,
                    shape: vec![head.shape[0].div_ceil(b[0]), head.shape[1].div_ceil(b[1])],
                };
                let codes = TensorHead { dtype: DType::F8E4M3, ..head.clone() };
                let kept = TensorHead { name: format!("{EXACT_PREFIX}{}", head.name), ..head };
                model.push((codes, source.clone(), Form::Codes));
                model.push((scales, source.clone(), Form::Scales));
                exact.push((kept, source, Form::Exact));
            }
            _ => model.push((head, source, Form::AsIs)),
        }
    }
    model.sort_by(|a, b| a.0.name.cmp(&b.0.name));
    exact.sort_by(|a, b| a.0.name.cmp(&b.0.name));
    optimizer.extend(exact);
    // The other replicas take part in each split state's gather in the optimizer file's order
    // (`split_save_order`): no split state may come earlier, in the model's file, or twice.
    // (Expert parallelism's processes are told of each gather instead, `ExpertStream`.)
    if let (Some((_, decls)), None) = (split, experts) {
        let order = split_save_order(trainer, decls, roles)?;
        let gathered: Vec<&str> = (model.iter().chain(&optimizer))
            .filter_map(|(h, source, _)| match source {
                Source::Trainer(name) if order.iter().any(|o| o == name) => Some(h.name.as_str()),
                _ => None,
            })
            .collect();
        if gathered != order {
            bail!(
                "internal: a streamed save would gather the split states in the order {gathered:?}, and the \
                 replicas follow {order:?}"
            );
        }
    }
    // The last weight quantised: its codes and scales are written one after the other.
    let mut last: Option<(String, weights::HostTensor, weights::HostTensor)> = None;
    let mut write = |path: &Path, list: &[(TensorHead, Source, Form)]| {
        let heads: Vec<TensorHead> = list.iter().map(|(h, _, _)| h.clone()).collect();
        // The next tensor held by another process is asked for as soon as this one has come, so
        // that its transfer overlaps this one's writing (a split one is not: its gather waits).
        let ahead = |i: usize| -> Result<(), String> {
            let Some((_, next, _)) = list.get(i + 1) else { return Ok(()) };
            if next.name(&pool) == list[i].1.name(&pool) {
                return Ok(());
            }
            match next {
                Source::Trainer(name) => trainer.prefetch(name).map_err(|e| e.to_string()),
                Source::Remote { rank, local, split: false, .. } => {
                    experts
                        .expect("a remote tensor comes with the expert-parallel link")
                        .prefetch(*rank, local);
                    Ok(())
                }
                Source::Remote { .. } | Source::Held(_) => Ok(()),
            }
        };
        let mut fetch_one = |i: usize| -> Result<std::borrow::Cow<'_, weights::HostTensor>, String> {
            let (head, source, form) = &list[i];
            let read = |source: &Source| match source {
                Source::Held(j) => Ok(std::borrow::Cow::Borrowed(pool[*j])),
                Source::Trainer(name) => {
                    let t = trainer.tensor(name).map_err(|e| e.to_string())?;
                    let t = match split {
                        Some((d, decls)) => {
                            if let (Some(x), Some(_)) = (experts, whole_shape(&TensorHead::of(&t), decls)) {
                                x.join_own(name);
                            }
                            whole_state(t, Some(d), decls).map_err(|e| format!("{e:#}"))?
                        }
                        None => t,
                    };
                    Ok(std::borrow::Cow::Owned(t))
                }
                Source::Remote { rank, local, name, split } => {
                    let x = experts.expect("a remote tensor comes with the expert-parallel link");
                    let t = x.ask(*rank, local, *split).map_err(|e| e.to_string())?;
                    Ok(std::borrow::Cow::Owned(weights::HostTensor { name: name.clone(), ..t }))
                }
            };
            let q = spec.quantization.as_ref();
            match (form, q) {
                (Form::AsIs, _) => read(source),
                (Form::Exact, _) => Ok(std::borrow::Cow::Owned(weights::HostTensor {
                    name: head.name.clone(),
                    ..read(source)?.into_owned()
                })),
                (Form::Codes | Form::Scales, Some(q)) => {
                    let weight = source.name(&pool).to_string();
                    if last.as_ref().is_none_or(|(n, _, _)| *n != weight) {
                        let (codes, scales) =
                            fp8_release(&*read(source)?, q).map_err(|e| format!("{e:#}"))?;
                        last = Some((weight, codes, scales));
                    }
                    let (_, codes, scales) = last.as_ref().expect("quantised above");
                    Ok(std::borrow::Cow::Owned(if *form == Form::Codes {
                        codes.clone()
                    } else {
                        scales.clone()
                    }))
                }
                (Form::Codes | Form::Scales, None) => {
                    unreachable!("FP8 forms come from a [quantization] section")
                }
            }
        };
        let fetch = |i: usize| {
            let t = fetch_one(i)?;
            ahead(i)?;
            Ok(t)
        };
        weights::write_safetensors_streamed(path, &heads, StoreFloats::AsDeclared, fetch)
    };
    let config = serde_json::to_string_pretty(&spec::to_hf_config(spec))? + "\n";
    std::fs::write(tmp.join("config.json"), config)?;
    write(&tmp.join("model.safetensors"), &model)?;
    write(&tmp.join(OPTIMIZER), &optimizer)?;
    std::fs::write(tmp.join(TRAINER), serde_json::to_string_pretty(progress)? + "\n")?;
    copy_tokenizer(tokenizer, &tmp)?;
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("cannot replace {}", dir.display()))?;
    }
    std::fs::rename(&tmp, &dir).with_context(|| format!("cannot write {}", dir.display()))?;
    Ok(dir)
}

/// The streamed checkpoint of an expert-parallel run (`--ep`, with `--pp` and `--dp` or not; with
/// `--zero1` only without `--pp`): rank 0 writes the files as a lone process (or a pipeline's
/// first rank) does, and asks the processes of the other expert-parallel ranks of the first
/// expert group for their experts' tensors one at a time, as the files need them; they serve
/// until told the files are written. Nothing is gathered whole: rank 0 holds one other process's
/// tensor at a time, and the other groups' processes, which hold the same experts, give nothing.
/// With `--pp`, each expert-parallel rank is a pipeline, and a tensor comes from the pipeline rank
/// that holds it ([`Steps::checkpoint_source`]).
///
/// Where the replicas split their states (`--zero1`), every process serves: before rank 0 makes a
/// split state whole, it tells the processes that hold the other shards to join the gather (every
/// process for a replicated weight's state, those of the same expert-parallel rank for an
/// expert's), and the one it asks gives the whole state.
struct ExpertStream {
    share: ExpertShare,
    /// Ranks per pipeline (1 without `--pp`): expert-parallel rank `r`'s pipeline rank `q` is
    /// world rank `r·pp + q` (the first expert group's replicas come first).
    pp: u32,
    /// The processes of the job.
    size: u32,
    /// This process serves rank 0's requests: a process of the first expert group other than 0.
    server: bool,
    /// A link over every process: rank `r` is world rank `r`.
    link: std::cell::RefCell<crate::pipeline::Link>,
    /// On rank 0: the tensor asked for ahead ([`ExpertStream::prefetch`]), process and local
    /// name, whose answer is on its way.
    prefetched: std::cell::RefCell<Option<(u32, String)>>,
}

/// The processes other than 0 of a job of `size` processes, `pp` a pipeline, `ep` per expert
/// group, that hold a shard of a split state where process `holder` holds one (world rank
/// `j·pp + q` is pipeline rank `q` of replica `j`, of expert-parallel rank `j mod ep`): the same
/// pipeline rank of every replica, and for an `expert`'s state only of the replicas of `holder`'s
/// expert-parallel rank.
fn shard_holders(expert: bool, holder: u32, pp: u32, ep: u32, size: u32) -> Vec<u32> {
    let (q, r) = (holder % pp, (holder / pp) % ep);
    (0..size / pp).filter(|&j| !expert || j % ep == r).map(|j| j * pp + q).filter(|&w| w != 0).collect()
}

/// A request of [`ExpertStream`]: give the state (and join its gather first, where it is split).
const GIVE: char = 'g';
/// A request of [`ExpertStream`]: join the gather of a split state, giving nothing.
const JOIN: char = 'j';

impl ExpertStream {
    /// Every process of an expert-parallel run must call it (it makes a communicator).
    fn new(share: ExpertShare, d: &crate::dist::Dist) -> ExpertStream {
        ExpertStream {
            share,
            pp: d.pp_size() as u32,
            size: d.size() as u32,
            server: d.edp_rank() == 0 && d.rank() != 0,
            link: std::cell::RefCell::new(d.world_link()),
            prefetched: Default::default(),
        }
    }

    /// Where the checkpoint's tensors of rank 0's tensor `head` come from: itself, and for a
    /// routed expert's, the tensor of the same local name of every expert-parallel rank, each
    /// under its own expert's name (ranks in order);
    /// `split`: the replicas hold shards of it. The rank's own state
    /// [`kiln_compiler::expert_parallel::EP_RANK`] is not the model's.
    fn sources(
        &self,
        head: weights::TensorHead,
        trainer: &dyn Steps,
        split: bool,
    ) -> Vec<(weights::TensorHead, Source)> {
        use kiln_compiler::expert_parallel::{expert_index, rank_param, EP_RANK};
        if head.name == EP_RANK {
            return Vec::new();
        }
        let q = trainer.checkpoint_source(&head.name);
        let ranks = match expert_index(&head.name) {
            Some(_) => self.share.size,
            None => 1,
        };
        (0..ranks)
            .map(|r| {
                let name = rank_param(&head.name, r, self.share.per_rank);
                let source = match r as u32 * self.pp + q {
                    0 => Source::Trainer(head.name.clone()),
                    rank => Source::Remote { rank, local: head.name.clone(), name: name.clone(), split },
                };
                (weights::TensorHead { name, ..head.clone() }, source)
            })
            .collect()
    }

    /// The processes other than 0 that hold a shard of split state `local` where process
    /// `holder` holds one (world rank `j·pp + q` is pipeline rank `q` of replica `j`, of
    /// expert-parallel rank `j mod ep`): the same pipeline rank of every replica for a replicated
    /// weight's state, of those of `holder`'s expert-parallel rank for an expert's.
    fn sharers(&self, local: &str, holder: u32) -> Vec<u32> {
        let expert = kiln_compiler::expert_parallel::is_routed_expert(local);
        shard_holders(expert, holder, self.pp, self.share.size as u32, self.size)
    }

    /// Rank 0: world rank `rank`'s tensor `local`; `split`: its replicas hold shards of it, and
    /// join the gather first.
    fn ask(&self, rank: u32, local: &str, split: bool) -> Result<weights::HostTensor> {
        let mut link = self.link.borrow_mut();
        match self.prefetched.borrow_mut().take() {
            Some((r, l)) if r == rank && l == local => return Ok(link.take_state(rank, local)?),
            // Asked ahead but not wanted after all: its answer is taken and dropped.
            Some((r, l)) => drop(link.take_state(r, &l)?),
            None => {}
        }
        if split {
            let others: Vec<u32> = self.sharers(local, rank).into_iter().filter(|&j| j != rank).collect();
            link.tell(&others, &format!("{JOIN}{local}"));
        }
        link.tell(&[rank], &format!("{GIVE}{local}"));
        Ok(link.take_state(rank, local)?)
    }

    /// Rank 0: world rank `rank`'s tensor `local`, whole where it is held (not split), is the one
    /// [`ExpertStream::ask`] will be asked for next: it is asked for now, so that its transfer
    /// overlaps the writing of the one before.
    fn prefetch(&self, rank: u32, local: &str) {
        let mut prefetched = self.prefetched.borrow_mut();
        if prefetched.is_none() {
            self.link.borrow_mut().tell(&[rank], &format!("{GIVE}{local}"));
            *prefetched = Some((rank, local.to_string()));
        }
    }

    /// Rank 0, about to make its split state `local` whole: the other processes holding its shards
    /// join the gather.
    fn join_own(&self, local: &str) {
        let others = self.sharers(local, 0);
        self.link.borrow_mut().tell(&others, &format!("{JOIN}{local}"));
    }

    /// This process's part once rank 0 has written the files (or failed to): rank 0 tells the
    /// processes that serve; they serve its requests from `trainer` until then (with `split`,
    /// every process, making each split state whole with the others). The others have nothing to
    /// do.
    fn finish(
        &self,
        trainer: &dyn Steps,
        leader: bool,
        split: Option<(&crate::dist::Dist, &[kiln_ir::module::StateDecl])>,
    ) -> Result<()> {
        let mut link = self.link.borrow_mut();
        if leader {
            // An answer asked for ahead and not taken is taken first.
            if let Some((r, l)) = self.prefetched.borrow_mut().take() {
                link.take_state(r, &l)?;
            }
            // Every process where states are split, else the first expert group's.
            let servers: Vec<u32> = match split {
                Some(_) => (1..self.size).collect(),
                None => (1..self.share.size as u32 * self.pp).collect(),
            };
            link.tell(&servers, "");
            return Ok(());
        }
        if !(self.server || split.is_some()) {
            return Ok(());
        }
        while let Some(request) = link.next_request("rank 0's request for a state of a checkpoint")? {
            let give = request.starts_with(GIVE);
            let (Some(name), true) = (request.get(1..), give || request.starts_with(JOIN)) else {
                bail!("internal: a checkpoint request `{request}` that is neither give nor join");
            };
            let mut t = trainer.tensor(name)?;
            if let Some((d, decls)) = split {
                t = whole_state(t, Some(d), decls)?;
            }
            if give {
                link.give_state(t);
            }
        }
        Ok(())
    }
}

/// An expert-parallel process's share of the routed experts (`kiln train --ep N`): it holds
/// experts `rank·per_rank ..` of every MoE layer under rank 0's names (`0 .. per_rank`), as its
/// compiled step reads them (`kiln_compiler::expert_parallel::split_tokens`).
#[derive(Clone, Copy, Debug)]
struct ExpertShare {
    rank: u64,
    size: u64,
    per_rank: u64,
}

impl ExpertShare {
    /// This process's share, in an `--ep` run of more than one rank.
    fn of(req: &Request, spec: &kiln_ir::ModelSpec) -> Result<Option<ExpertShare>> {
        let Some(d) = req.dist.filter(|d| d.ep_size() > 1) else { return Ok(None) };
        let size = d.ep_size() as u64;
        let experts = spec.moe.as_ref().map_or(0, |m| m.n_routed_experts);
        if experts == 0 {
            bail!(
                "--ep {size}: model `{}` has no routed experts to split; --dp {size} trains a dense model over \
                 {size} processes",
                spec.model.name
            );
        }
        if experts % size != 0 {
            bail!(
                "--ep {size}: model `{}` has {experts} routed experts per MoE layer; give a number of ranks that                  divides it",
                spec.model.name
            );
        }
        Ok(Some(ExpertShare { rank: d.ep_rank() as u64, size, per_rank: experts / size }))
    }

    /// The state [`kiln_compiler::expert_parallel::EP_RANK`] of this process.
    fn rank_state(&self) -> weights::HostTensor {
        weights::HostTensor {
            name: kiln_compiler::expert_parallel::EP_RANK.into(),
            dtype: kiln_ir::DType::F32,
            shape: Vec::new(),
            data: weights::HostData::F32(vec![self.rank as f32]),
        }
    }

    /// The share, in words (`kiln train`'s header).
    fn describe(&self) -> String {
        format!(
            "expert-parallel rank {} of {} (experts {}..{} of each MoE layer, tokens exchanged over MPI)",
            self.rank,
            self.size,
            self.rank * self.per_rank,
            (self.rank + 1) * self.per_rank
        )
    }

    /// The name this process holds tensor `name` (a weight or one of its states) under: itself,
    /// or for one of its own experts rank 0's name; `None` for another rank's expert.
    fn local(&self, name: &str) -> Option<String> {
        use kiln_compiler::expert_parallel::{expert_index, with_expert_index};
        match expert_index(name) {
            None => Some(name.to_string()),
            Some(e) if e / self.per_rank == self.rank => Some(with_expert_index(name, e % self.per_rank)),
            Some(_) => None,
        }
    }
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
            bf16_moments: false,
        }
    }

    #[test]
    fn a_split_state_is_gathered_by_the_replicas_of_its_stage_and_expert_rank() {
        // --ep 2 alone (2 processes): every process holds a shard of a replicated weight's state,
        // and an expert's state is held by its own rank alone (the list names the holder too).
        assert_eq!(shard_holders(false, 0, 1, 2, 2), [1]);
        assert_eq!(shard_holders(true, 1, 1, 2, 2), [1]);
        // --ep 2 --dp 2 (4 processes: ranks 0 and 2 are expert-parallel rank 0, 1 and 3 rank 1).
        assert_eq!(shard_holders(false, 0, 1, 2, 4), [1, 2, 3]);
        assert_eq!(shard_holders(true, 0, 1, 2, 4), [2]);
        assert_eq!(shard_holders(true, 1, 1, 2, 4), [1, 3]);
        // --pp 2 --ep 2 --dp 2 (8 processes: replica j's pipeline rank q is 2j + q).
        assert_eq!(shard_holders(false, 1, 2, 2, 8), [1, 3, 5, 7]);
        assert_eq!(shard_holders(true, 3, 2, 2, 8), [3, 7]);
        assert_eq!(shard_holders(true, 0, 2, 2, 8), [4]);
    }

    #[test]
    fn each_epoch_takes_every_row_once_in_a_fresh_seeded_order() {
        assert_eq!(epoch_order(5, None, 3), [0, 1, 2, 3, 4], "no seed: in order");
        for rows in [1, 2, 3, 10, 97] {
            for epoch in 0..4 {
                let mut order = epoch_order(rows, Some(7), epoch);
                assert_eq!(
                    order,
                    epoch_order(rows, Some(7), epoch),
                    "the same seed and epoch, the same order"
                );
                order.sort_unstable();
                assert_eq!(order, (0..rows).collect::<Vec<_>>(), "{rows} rows, epoch {epoch}: a permutation");
            }
        }
        let (a, b, c) =
            (epoch_order(97, Some(7), 0), epoch_order(97, Some(7), 1), epoch_order(97, Some(8), 0));
        assert!(a != b && a != c && b != c, "a fresh order per epoch and per seed");
        assert_ne!(a, (0..97).collect::<Vec<_>>());
        // Pinned, so a change of generator (which would break resuming older runs) shows.
        assert_eq!(epoch_order(6, Some(7), 0), [5, 0, 1, 2, 3, 4]);

        // Batches of 2 over 5 rows: every row once per epoch, a batch crossing an epoch's end
        // takes the next epoch's order, and the position matches a fresh count.
        let mut p = Progress {
            step: 0,
            row: 0,
            hyper: hyper(Schedule::Constant, 0),
            model: "m".into(),
            shuffle: Some(11),
            epoch: 0,
        };
        let taken: Vec<usize> = (0..5).flat_map(|_| p.next_rows(5, 2)).collect();
        assert_eq!((p.epoch, p.row), (2, 0));
        let want: Vec<usize> = (0..2).flat_map(|e| epoch_order(5, Some(11), e)).collect();
        assert_eq!(taken, want);
        // In order, the old wrap-around.
        let mut q = Progress { shuffle: None, ..p.clone() };
        q.epoch = 0;
        assert_eq!(q.next_rows(3, 2), [0, 1]);
        assert_eq!(q.next_rows(3, 2), [2, 0]);
        assert_eq!((q.epoch, q.row), (1, 1));
    }

    #[test]
    fn a_trainer_json_without_the_shuffle_fields_still_loads() {
        let p = Progress {
            step: 4,
            row: 1,
            hyper: hyper(Schedule::Cosine, 2),
            model: "tiny".into(),
            shuffle: None,
            epoch: 0,
        };
        let mut v = serde_json::to_value(&p).unwrap();
        let obj = v.as_object_mut().unwrap();
        assert!(obj.remove("shuffle").is_some() && obj.remove("epoch").is_some());
        assert_eq!(serde_json::from_value::<Progress>(v).unwrap(), p);
    }

    #[test]
    fn stale_temporaries_of_a_killed_run_are_removed() {
        let dir = std::env::temp_dir().join(format!("kiln-stale-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join(".step-3.tmp-4294967295")).unwrap();
        std::fs::create_dir_all(dir.join(format!(".step-4.tmp-{}", std::process::id()))).unwrap();
        std::fs::write(dir.join(".loss.svg.tmp-4294967295"), "x").unwrap();
        std::fs::create_dir_all(dir.join(".other.tmp-4294967295")).unwrap();
        std::fs::create_dir_all(dir.join("step-3")).unwrap();
        remove_stale(&dir).unwrap();
        let mut left: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        let mine = format!(".step-4.tmp-{}", std::process::id());
        assert_eq!(
            left,
            [".other.tmp-4294967295", mine.as_str(), "step-3"],
            "only a dead run's own temporaries go"
        );
        std::fs::remove_dir_all(&dir).unwrap();
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
