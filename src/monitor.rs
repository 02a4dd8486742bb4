//! The training monitor of `kiln train`: what each step records, the detectors that watch the
//! records, and what an alert makes the run do. On by default; `--no-monitor` turns it off.
//!
//! # Records
//!
//! Each kept step is one line of `metrics.jsonl` ([`Record::json`]): besides `step`, `loss`,
//! `grad_norm` (global, before clipping), `lr`, `tokens_per_s`, `max_load` and `load` (tokens per
//! expert per MoE layer), the monitor adds `grad_norms` (each layer's norm before clipping: the
//! embedding `model.embed_tokens`, each decoder layer `model.layers.N`, the head `lm_head`),
//! `expert_load` (per MoE layer: the busiest and the idlest expert's load over the mean, and how
//! many experts got no token) and `bias` (per router: min, max, mean and standard deviation of its
//! selection bias, the `routing_bias` state). Events are lines too, told apart by an `event` key
//! (`{"event":"alert","step":8,"kind":"loss_spike",...}`, `"skip"`, `"rollback"`,
//! `"non_finite"`); a step line has none, so the loss chart and resuming read step lines only.
//!
//! # Detectors and their defaults
//!
//! - `loss_spike`: the loss is more than `--spike-z` (4) standard deviations above the mean of the
//!   last `--spike-window` (20) kept steps, once the window holds `--spike-warmup` (10) of them.
//!   The deviation is floored at 0.1% of the mean, so a flat curve does not alert on rounding.
//! - `grad_norm_spike`: the same test on the global gradient norm.
//! - `non_finite`: the loss or the gradient norm is NaN or infinite. The step is run again with a
//!   check after every op (each compiled kernel launch; then on the reference interpreter, node by
//!   node) and the first op that produced a non-finite value is named by its scope.
//! - `expert_collapse`: an expert of a MoE layer got no token for `--collapse-steps` (20)
//!   consecutive kept steps (once per idle stretch).
//! - `load_imbalance`: a MoE layer's busiest expert got more than `--imbalance-bound` (4) times the
//!   mean load (once each time the layer crosses the bound).
//!
//! Every alert is a line on stderr (`alert: step N: ...`) and an event line in `metrics.jsonl`.
//!
//! # What an alert does (`--on-anomaly`)
//!
//! Spikes and non-finite values follow `--on-anomaly`; load alerts only warn (their cause is the
//! routing's drift over many steps, not one batch).
//!
//! - `warn` (the default): the step is kept. A non-finite step cannot be kept: it stops as `stop`.
//! - `skip-batch`: the step is undone (every weight and optimizer state back to before it) and
//!   its batch is dropped: the data position stays past the
//!   batch, the step count does not move, so the next batch is taken for the same step number (at
//!   the same learning rate). A run of `--steps N` still makes N updates and reads one more batch
//!   per skip. A failure after [`MAX_SKIPS_IN_A_ROW`] batches undone one after another stops the run: by
//!   then the weights themselves are broken, not the batches (a step that was kept blew them up,
//!   and every batch after it fails), and skipping on would go round the data for ever.
//! - `rollback`: the run goes back to its last checkpoint (the last `step-N/` written by
//!   `--save-every`, or the run's start; held in memory, a host copy of the weights and optimizer
//!   state) with its data position, and replays from there; the offending batch (by epoch and
//!   position) is skipped when the replay reaches it, as `skip-batch` skips one. The replayed
//!   steps are logged again (a step's last line is the one that counts). Rolling back to the same
//!   checkpoint more than [`MAX_ROLLBACKS`] times stops the run.
//! - `stop`: the run ends with an error naming the alert; the last checkpoint is intact.
//!
//! Nothing is lost: the log keeps the alert, the skipped batch's rows and the rollback.
//!
//! # Undoing a step
//!
//! A step is undone without a copy where its trainer has a gate ([`Steps::step_gated`]): a
//! compiled train step of one process or of replicas (`--dp`, `--ep`), a pipeline rank's update
//! (`--pp`), and the interpreter's. The
//! loss and the global gradient norm are known before AdamW writes any weight or moment (clipping
//! needs the norm, and the norm every gradient), so the step pauses there and asks
//! [`Monitor::verdict`]; a step the policy rejects (a non-finite one; a spike under `skip-batch`,
//! `rollback` or `stop`) stops with the model as it was, and its op-by-op re-check starts from the
//! same states. The processes of a run agree on the verdict by a gather before any goes on. A
//! trainer without a gate copies its states to the host before each step instead
//! ([`Steps::save`]), when the copy fits ([`copies`]).
//!
//! # Fault injection
//!
//! `--inject-fault KIND@STEP` (hidden from `--help`, documented in the README) makes step STEP
//! (as logged, from 1) faulty the first time it runs, to test the detectors and the recovery:
//! `lr-spike:FACTOR` multiplies its learning rate, `poison-batch` replaces every token of its batch
//! by `vocab - 1 - token` (text the model has not seen, which the loss punishes), and `nan:SCOPE`
//! writes NaN into the results of the compiled train step's first kernel launch in scope SCOPE
//! (while that step runs, re-checks included).

use std::collections::{HashMap, HashSet, VecDeque};

use anyhow::{bail, Result};
use serde_json::{json, Map, Value};

use kiln_ir::module::{StateDecl, StateRole};
use kiln_ir::Graph;
use kiln_runtime::data::TokenRows;
use kiln_runtime::exec::NonFinite;
use kiln_runtime::train::{Saved, Steps, Trainer};
use kiln_runtime::weights::HostTensor;

/// Rollbacks to one checkpoint before the run gives up.
pub const MAX_ROLLBACKS: u32 = 5;

/// Batches `skip-batch` undoes one after another, with no step kept between them, before the run
/// gives up.
pub const MAX_SKIPS_IN_A_ROW: u32 = 10;

/// What an anomaly makes the run do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Policy {
    /// Log it and keep the step (a non-finite step stops the run).
    Warn,
    /// Undo the step and go on with the next batch.
    SkipBatch,
    /// Go back to the last checkpoint and replay without the batch.
    Rollback,
    /// End the run with an error.
    Stop,
}

impl Policy {
    /// Its name on the command line and in the log.
    pub fn name(self) -> &'static str {
        match self {
            Policy::Warn => "warn",
            Policy::SkipBatch => "skip-batch",
            Policy::Rollback => "rollback",
            Policy::Stop => "stop",
        }
    }
}

/// The monitor's flags of `kiln train`.
#[derive(clap::Args, Clone, Debug)]
pub struct Args {
    /// Turn the training monitor off (no detectors, no per-layer records, no undo copy).
    #[arg(long)]
    pub no_monitor: bool,
    /// What a loss or gradient-norm spike or a non-finite step does: warn (keep the step; a
    /// non-finite one stops), skip-batch (undo the step, drop the batch), rollback (back to the
    /// last checkpoint, replay without the batch), stop. Load alerts only warn.
    #[arg(long, value_enum, default_value = "warn")]
    pub on_anomaly: Policy,
    /// Kept steps the spike detectors' mean and deviation are taken over.
    #[arg(long, value_name = "N", default_value_t = 20)]
    pub spike_window: usize,
    /// A loss or gradient norm this many standard deviations above the window's mean is a spike.
    #[arg(long, value_name = "Z", default_value_t = 4.0)]
    pub spike_z: f64,
    /// Kept steps in the window before the spike detectors judge.
    #[arg(long, value_name = "N", default_value_t = 10)]
    pub spike_warmup: usize,
    /// An expert idle (no token) for this many consecutive steps has collapsed.
    #[arg(long, value_name = "N", default_value_t = 20)]
    pub collapse_steps: u64,
    /// A MoE layer whose busiest expert gets more than this times the mean load is imbalanced.
    #[arg(long, value_name = "X", default_value_t = 4.0)]
    pub imbalance_bound: f64,
    /// Fault injection for tests: KIND@STEP, KIND one of lr-spike:FACTOR, poison-batch, nan:SCOPE,
    /// stall:RANK, exit:RANK (see the README).
    #[arg(long, value_name = "KIND@STEP", hide = true)]
    pub inject_fault: Vec<String>,
}

impl Default for Args {
    fn default() -> Args {
        Args {
            no_monitor: false,
            on_anomaly: Policy::Warn,
            spike_window: 20,
            spike_z: 4.0,
            spike_warmup: 10,
            collapse_steps: 20,
            imbalance_bound: 4.0,
            inject_fault: Vec::new(),
        }
    }
}

impl Args {
    /// Checks the settings: each says what would be right.
    pub fn check(&self) -> Result<()> {
        if self.spike_window < 2 || self.spike_warmup < 2 || self.spike_warmup > self.spike_window {
            bail!(
                "--spike-warmup {} and --spike-window {}: the warmup needs at least 2 steps and fits in the window",
                self.spike_warmup,
                self.spike_window
            );
        }
        if !(self.spike_z.is_finite() && self.spike_z > 0.0) {
            bail!("--spike-z must be a positive number, not {}", self.spike_z);
        }
        if self.collapse_steps == 0 {
            bail!("--collapse-steps must be at least 1");
        }
        if !(self.imbalance_bound.is_finite() && self.imbalance_bound > 1.0) {
            bail!("--imbalance-bound must be above 1 (the mean load), not {}", self.imbalance_bound);
        }
        Ok(())
    }
}

/// An injected fault (`--inject-fault`).
#[derive(Clone, Debug, PartialEq)]
pub enum Fault {
    LrSpike(f64),
    PoisonBatch,
    Nan(String),
    /// Data-parallel rank `r` stops answering before the step (it sleeps until the job ends).
    Stall(usize),
    /// Data-parallel rank `r` dies before the step (exits at once, code 3, telling nobody).
    Exit(usize),
    /// Rank 0 takes this many seconds longer to write the step's checkpoint (a slow disk), while
    /// the other processes wait for it.
    SlowSave(f64),
}

/// `KIND@STEP` parsed: the step (as logged, from 1) and the fault.
pub fn parse_fault(text: &str) -> Result<(u64, Fault)> {
    let wrong = |why: &str| {
        anyhow::anyhow!(
            "--inject-fault {text}: {why}; write KIND@STEP with KIND lr-spike:FACTOR, poison-batch, \
             nan:SCOPE, stall:RANK, exit:RANK or slow-save:SECS, and STEP the step as logged (from 1)"
        )
    };
    let (kind, step) = text.rsplit_once('@').ok_or_else(|| wrong("no @STEP"))?;
    let step: u64 =
        step.parse().ok().filter(|&s| s > 0).ok_or_else(|| wrong("the step is not a number from 1"))?;
    let fault = match kind.split_once(':') {
        Some(("lr-spike", f)) => {
            let f: f64 = f
                .parse()
                .ok()
                .filter(|f: &f64| f.is_finite() && *f > 0.0)
                .ok_or_else(|| wrong("the factor is not a positive number"))?;
            Fault::LrSpike(f)
        }
        Some(("nan", scope)) if !scope.is_empty() => Fault::Nan(scope.to_string()),
        Some(("slow-save", secs)) => {
            let secs: f64 = secs
                .parse()
                .ok()
                .filter(|s: &f64| s.is_finite() && *s >= 0.0)
                .ok_or_else(|| wrong("the seconds are not a number from 0"))?;
            Fault::SlowSave(secs)
        }
        Some((k @ ("stall" | "exit"), r)) => {
            let r: usize = r.parse().map_err(|_| wrong("the rank is not a number from 0"))?;
            if k == "stall" {
                Fault::Stall(r)
            } else {
                Fault::Exit(r)
            }
        }
        None if kind == "poison-batch" => Fault::PoisonBatch,
        _ => return Err(wrong(&format!("unknown kind `{kind}`"))),
    };
    Ok((step, fault))
}

/// What one step measured: the monitor's input and the step line of the log.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Record {
    pub step: u64,
    pub loss: f64,
    pub grad_norm: f64,
    /// Each layer's gradient norm, in model order.
    pub grad_norms: Vec<(String, f64)>,
    pub lr: f64,
    pub tokens_per_s: f64,
    /// Tokens per expert, per MoE layer.
    pub loads: Vec<(String, Vec<f64>)>,
    /// Each router's selection bias.
    pub biases: Vec<(String, Vec<f64>)>,
}

/// A MoE layer's load: max/mean, min/mean and the experts with no token.
pub fn load_stats(load: &[f64]) -> (f64, f64, usize) {
    let mean = load.iter().sum::<f64>() / load.len().max(1) as f64;
    let over = |v: f64| if mean > 0.0 { v / mean } else { 0.0 };
    let max = load.iter().copied().fold(0.0, f64::max);
    let min = load.iter().copied().fold(f64::INFINITY, f64::min);
    (over(max), over(if min.is_finite() { min } else { 0.0 }), load.iter().filter(|&&l| l == 0.0).count())
}

/// Min, max, mean and (population) standard deviation.
pub fn moments(v: &[f64]) -> (f64, f64, f64, f64) {
    let n = v.len().max(1) as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n;
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (min, max, mean, var.sqrt())
}

impl Record {
    /// The step line of `metrics.jsonl`. `max_load` is the worst layer's max/mean, as before the
    /// monitor.
    pub fn json(&self) -> Value {
        let max_load = self.loads.iter().map(|(_, l)| load_stats(l).0).reduce(f64::max);
        let mut line = json!({
            "step": self.step, "loss": self.loss, "grad_norm": self.grad_norm, "lr": self.lr,
            "tokens_per_s": self.tokens_per_s, "max_load": max_load,
            "load": self.loads.iter().map(|(s, l)| json!([s, l])).collect::<Vec<_>>(),
        });
        let obj = line.as_object_mut().expect("an object");
        if !self.grad_norms.is_empty() {
            let g: Map<String, Value> = self.grad_norms.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
            obj.insert("grad_norms".into(), Value::Object(g));
        }
        if !self.loads.is_empty() {
            let e: Map<String, Value> = (self.loads.iter())
                .map(|(k, l)| {
                    let (max, min, idle) = load_stats(l);
                    (k.clone(), json!({"max_over_mean": max, "min_over_mean": min, "idle": idle}))
                })
                .collect();
            obj.insert("expert_load".into(), Value::Object(e));
        }
        if !self.biases.is_empty() {
            let b: Map<String, Value> = (self.biases.iter())
                .map(|(k, v)| {
                    let (min, max, mean, std) = moments(v);
                    (k.clone(), json!({"min": min, "max": max, "mean": mean, "std": std}))
                })
                .collect();
            obj.insert("bias".into(), Value::Object(b));
        }
        line
    }
}

/// What an alert is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    LossSpike,
    GradNormSpike,
    NonFinite,
    ExpertCollapse,
    LoadImbalance,
}

impl Kind {
    /// Its name in the log.
    pub fn name(self) -> &'static str {
        match self {
            Kind::LossSpike => "loss_spike",
            Kind::GradNormSpike => "grad_norm_spike",
            Kind::NonFinite => "non_finite",
            Kind::ExpertCollapse => "expert_collapse",
            Kind::LoadImbalance => "load_imbalance",
        }
    }

    /// Whether `--on-anomaly` applies (load alerts only warn).
    pub fn follows_policy(self) -> bool {
        matches!(self, Kind::LossSpike | Kind::GradNormSpike | Kind::NonFinite)
    }
}

/// One alert: its kind, the step, a sentence, and its figures for the log.
#[derive(Clone, Debug, PartialEq)]
pub struct Alert {
    pub step: u64,
    pub kind: Kind,
    pub message: String,
    pub figures: Map<String, Value>,
}

impl Alert {
    /// The event line of `metrics.jsonl`, with the action taken.
    pub fn json(&self, action: &str) -> Value {
        let mut v = json!({"event": "alert", "step": self.step, "kind": self.kind.name(), "message": self.message, "action": action});
        let obj = v.as_object_mut().expect("an object");
        for (k, x) in &self.figures {
            obj.insert(k.clone(), x.clone());
        }
        v
    }
}

/// The last kept values of one series, for a z-score.
#[derive(Clone, Debug, Default)]
struct Window {
    values: VecDeque<f64>,
}

impl Window {
    /// `(z, mean, std)` of `x` against the window, once it holds `warmup` values.
    fn z(&self, x: f64, warmup: usize) -> Option<(f64, f64, f64)> {
        if self.values.len() < warmup {
            return None;
        }
        let v: Vec<f64> = self.values.iter().copied().collect();
        let (_, _, mean, std) = moments(&v);
        let floor = (1e-3 * mean.abs()).max(1e-12);
        Some(((x - mean) / std.max(floor), mean, std))
    }

    fn push(&mut self, x: f64, size: usize) {
        self.values.push_back(x);
        while self.values.len() > size {
            self.values.pop_front();
        }
    }
}

/// The detectors' state: the windows of kept steps, each expert's idle stretch, the layers above
/// the imbalance bound. Cloned with a checkpoint, so a rollback restores it too.
#[derive(Clone, Debug)]
pub struct Monitor {
    args: Args,
    loss: Window,
    grad: Window,
    /// Consecutive kept steps each expert of each layer got no token.
    idle: HashMap<String, Vec<u64>>,
    /// Layers whose last kept step was above the imbalance bound.
    imbalanced: HashSet<String>,
}

impl Monitor {
    pub fn new(args: &Args) -> Monitor {
        Monitor {
            args: args.clone(),
            loss: Window::default(),
            grad: Window::default(),
            idle: HashMap::new(),
            imbalanced: HashSet::new(),
        }
    }

    /// The alerts of step `r`, against the kept steps before it (nothing is updated: see
    /// [`Monitor::keep`]).
    pub fn check(&self, r: &Record) -> Vec<Alert> {
        let a = &self.args;
        let mut out = Vec::new();
        let mut alert = |kind: Kind, message: String, figures: Value| {
            let figures = figures.as_object().cloned().unwrap_or_default();
            out.push(Alert { step: r.step, kind, message, figures });
        };
        if !(r.loss.is_finite() && r.grad_norm.is_finite()) {
            alert(
                Kind::NonFinite,
                format!("the loss is {} and the gradient norm {}", r.loss, r.grad_norm),
                json!({"loss": r.loss.to_string(), "grad_norm": r.grad_norm.to_string()}),
            );
            return out;
        }
        for (kind, what, window, x) in [
            (Kind::LossSpike, "the loss", &self.loss, r.loss),
            (Kind::GradNormSpike, "the gradient norm", &self.grad, r.grad_norm),
        ] {
            if let Some((z, mean, std)) = window.z(x, a.spike_warmup).filter(|(z, ..)| *z > a.spike_z) {
                alert(
                    kind,
                    format!(
                        "{what} {x:.6} is {z:.1} standard deviations above the mean {mean:.6} of the last {} \
                         steps (bound {})",
                        window.values.len(),
                        a.spike_z
                    ),
                    json!({"value": x, "z": z, "mean": mean, "std": std}),
                );
            }
        }
        for (layer, load) in &r.loads {
            let idle_before = self.idle.get(layer);
            for (e, &l) in load.iter().enumerate() {
                let before = idle_before.and_then(|v| v.get(e)).copied().unwrap_or(0);
                if l == 0.0 && before + 1 == a.collapse_steps {
                    alert(
                        Kind::ExpertCollapse,
                        format!("expert {e} of {layer} has had no token for {} steps", a.collapse_steps),
                        json!({"layer": layer, "expert": e, "steps": a.collapse_steps}),
                    );
                }
            }
            let (max, min, idle) = load_stats(load);
            if max > a.imbalance_bound && !self.imbalanced.contains(layer) {
                alert(
                    Kind::LoadImbalance,
                    format!(
                        "the busiest expert of {layer} got {max:.2} times the mean load (bound {})",
                        a.imbalance_bound
                    ),
                    json!({"layer": layer, "max_over_mean": max, "min_over_mean": min, "idle": idle}),
                );
            }
        }
        out
    }

    /// Takes kept step `r` into the detectors' state.
    pub fn keep(&mut self, r: &Record) {
        let size = self.args.spike_window;
        self.loss.push(r.loss, size);
        self.grad.push(r.grad_norm, size);
        for (layer, load) in &r.loads {
            let idle = self.idle.entry(layer.clone()).or_insert_with(|| vec![0; load.len()]);
            idle.resize(load.len(), 0);
            for (c, &l) in idle.iter_mut().zip(load) {
                *c = if l == 0.0 { *c + 1 } else { 0 };
            }
            if load_stats(load).0 > self.args.imbalance_bound {
                self.imbalanced.insert(layer.clone());
            } else {
                self.imbalanced.remove(layer);
            }
        }
    }

    /// What the run does about step `step` from its loss and gradient norm alone: the
    /// [`Monitor::action`] of its alerts that follow `--on-anomaly` (which need nothing else).
    /// A trainer with a gate asks this before the step's update ([`Steps::step_gated`]), and the
    /// update is applied when it is `None` or `warn`.
    pub fn verdict(&self, step: u64, loss: f32, grad_norm: f32) -> Option<Policy> {
        let r = Record { step, loss: loss.into(), grad_norm: grad_norm.into(), ..Record::default() };
        self.action(&self.check(&r))
    }

    /// What the run does about `alerts`: the policy when one follows it, else keep the step. A
    /// non-finite step is never kept: `warn` stops.
    pub fn action(&self, alerts: &[Alert]) -> Option<Policy> {
        let worst = alerts.iter().filter(|a| a.kind.follows_policy()).map(|a| a.kind).next()?;
        Some(match (self.args.on_anomaly, worst) {
            (Policy::Warn, Kind::NonFinite) => Policy::Stop,
            (p, _) => p,
        })
    }
}

/// A copy of the states a step changes (see [`Steps::save`]): to undo a step, or to go back to
/// a checkpoint.
pub fn saved(t: &dyn Steps) -> Result<Saved> {
    let mut s = Saved::default();
    t.save(&mut s)?;
    Ok(s)
}

/// Which of the monitor's copies of the states a run takes ([`copies`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Copies {
    /// Every copy its policy uses.
    All,
    /// None before each step (the one a non-finite step's op-by-op re-check starts from), with the
    /// note that says so.
    NoneBefore(String),
    /// None before each step, which the trainer does not need: its steps stop at their gate
    /// ([`Steps::step_gated`]) when the monitor rejects them, before they change anything. Only
    /// rollback's checkpoint is kept.
    Gated,
}

/// Memory a run keeps free beside the monitor's copies.
pub const COPY_MARGIN: u64 = 1 << 30;

/// The monitor's copies of the states (`bytes`: the weights and optimizer state) under `policy`,
/// with `free` bytes of host memory free beside the run: one taken before each step (skip-batch
/// undoes a step from it, a non-finite step's op-by-op re-check starts from it) and rollback's
/// last checkpoint. A trainer whose steps stop at their gate (`gated`) needs no pre-step copy:
/// a step it rejects never changes the states. A copy the policy cannot do without is refused
/// when it does not fit (with [`COPY_MARGIN`] to spare), before any step; the pre-step copy that
/// only serves the re-check is dropped, with a note, rather than the run being killed for memory.
pub fn copies(policy: Policy, bytes: u64, free: u64, gated: bool) -> Result<Copies> {
    let needed = match policy {
        Policy::Rollback => bytes,
        Policy::SkipBatch if !gated => bytes,
        Policy::SkipBatch | Policy::Warn | Policy::Stop => 0,
    };
    let gb = |b: u64| format!("{:.2} GB", b as f64 / 1e9);
    if needed > 0 && needed.saturating_add(COPY_MARGIN) > free {
        bail!(
            "--on-anomaly {} keeps a copy of the weights and optimizer state, {}, which does not fit in the {} \
             this machine has free beside the run (with 1 GiB to spare); use --on-anomaly warn or stop (which \
             keep no copy when it does not fit), --no-monitor, or a machine with more memory",
            policy.name(),
            gb(bytes),
            gb(free)
        );
    }
    if gated {
        return Ok(Copies::Gated);
    }
    if policy != Policy::SkipBatch && needed.saturating_add(bytes).saturating_add(COPY_MARGIN) > free {
        return Ok(Copies::NoneBefore(format!(
            "no copy of the states is taken before each step: it would need {} of the {} free; a non-finite \
             step is reported without the op-by-op re-check that names its op",
            gb(bytes),
            gb(free.saturating_sub(needed))
        )));
    }
    Ok(Copies::All)
}

/// `rows` with every token `t` replaced by `vocab - 1 - t`: the `poison-batch` fault.
pub fn poison(rows: &TokenRows, vocab: u64) -> Result<TokenRows> {
    let tokens = (0..rows.rows()).flat_map(|r| rows.row(r).iter().map(|&t| vocab as i64 - 1 - t)).collect();
    let poisoned = TokenRows::from_rows(rows.width(), tokens)?;
    // The targets keep their weights (an SFT batch stays one).
    Ok(match rows.weights() {
        Some(w) => poisoned.with_weights(w.to_vec())?,
        None => poisoned,
    })
}

/// The train-step program on the reference interpreter, for re-checking a compiled step.
pub struct Reference<'a> {
    pub step: &'a Graph,
    pub accumulate: Option<&'a Graph>,
    pub micro_batches: usize,
    pub states: &'a [StateDecl],
    /// The parameters that are not states (none, when every parameter is trained).
    pub untrained: &'a [HostTensor],
}

/// Where a non-finite step's first non-finite value came from: the step is run again from
/// `before` with a check after every op, by `trainer` (each kernel launch, when it is `compiled`)
/// and then by `reference` on the interpreter (each node; none for an expert-parallel rank, whose
/// step is not the whole model's). The trainer is left as `before`. `before` is `None` when the
/// trainer still holds the states before the step, which stopped at its gate
/// ([`Steps::step_gated`]): the re-check stops there too (the first non-finite value comes
/// before it, since the loss or the gradient norm is not finite).
/// Each finding is the engine's name and the op, `None` when that engine computes the step finite.
pub fn locate(
    trainer: &mut dyn Steps,
    compiled: bool,
    before: Option<&Saved>,
    reference: Option<&Reference>,
    batch: &TokenRows,
    lr: f32,
) -> Result<Vec<(&'static str, Option<NonFinite>)>> {
    let mut found = Vec::new();
    let first = match before {
        Some(before) => {
            trainer.restore(before)?;
            let (_, first) = trainer.step_checked(batch, lr)?;
            trainer.restore(before)?;
            first
        }
        None => {
            let g = trainer.step_gated(batch, lr, true, &mut |_, _| false)?;
            g.found
        }
    };
    found.push((if compiled { "compiled" } else { "interpreter" }, first));
    if let Some(r) = reference {
        let mut params = r.untrained.to_vec();
        let mut rest = Vec::new();
        let states = match before {
            Some(before) => trainer.saved_tensors(before)?,
            None => trainer.weights()?.into_iter().chain(trainer.states()?).collect(),
        };
        for t in states {
            match r.states.iter().find(|s| s.name == t.name).map(|s| s.role) {
                Some(StateRole::Trainable | StateRole::RoutingBias) => params.push(t),
                _ => rest.push(t),
            }
        }
        let mut interp = Trainer::new(r.step.clone(), r.states.to_vec(), params)?;
        if let Some(acc) = r.accumulate {
            interp = interp.with_micro_batches(acc.clone(), r.micro_batches);
        }
        for t in rest {
            let name = t.name.clone();
            interp.set_state(&name, t)?;
        }
        let (_, first) = interp.step_checked(batch, lr)?;
        found.push(("interpreter", first));
    }
    Ok(found)
}

/// The sentence of a finding of [`locate`].
pub fn finding(engine: &str, f: &Option<NonFinite>) -> String {
    let engine = match engine {
        "compiled" => "the compiled step",
        _ => "the reference interpreter",
    };
    match f {
        Some(f) => format!(
            "{engine}: the first non-finite value is {} of {}{} ({} non-finite)",
            f.value,
            f.op,
            f.scope.as_deref().map_or(String::new(), |s| format!(" in scope {s}")),
            f.count
        ),
        None => format!("{engine}: the step is finite (the fault is not in the program's arithmetic)"),
    }
}

/// A finding as the log records it.
pub fn finding_json(f: &Option<NonFinite>) -> Value {
    match f {
        Some(f) => {
            json!({"program": f.program, "op": f.op, "scope": f.scope, "value": f.value, "count": f.count})
        }
        None => json!("finite"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> Args {
        Args { spike_window: 5, spike_warmup: 3, collapse_steps: 3, imbalance_bound: 3.0, ..Args::default() }
    }

    #[test]
    fn copies_of_the_states_fit_or_are_dropped_or_refused() {
        const GB: u64 = 1_000_000_000;
        let (states, margin) = (7 * GB, COPY_MARGIN);
        // Room for the pre-step copy: every policy takes its copies.
        for p in [Policy::Warn, Policy::Stop, Policy::SkipBatch] {
            assert_eq!(copies(p, states, states + margin, false).unwrap(), Copies::All, "{}", p.name());
        }
        // Rollback keeps its checkpoint and the pre-step copy: twice the states.
        assert_eq!(copies(Policy::Rollback, states, 2 * states + margin, false).unwrap(), Copies::All);
        let Copies::NoneBefore(note) =
            copies(Policy::Rollback, states, 2 * states + margin - 1, false).unwrap()
        else {
            panic!("rollback's checkpoint fits, not the pre-step copy beside it");
        };
        assert!(note.contains("7.00 GB of the 8.07 GB free"), "{note}");
        // Warn and stop do without the pre-step copy, and say so.
        let Copies::NoneBefore(note) = copies(Policy::Warn, states, states + margin - 1, false).unwrap()
        else {
            panic!("the copy does not fit");
        };
        assert!(note.contains("without the op-by-op re-check"), "{note}");
        assert!(matches!(copies(Policy::Stop, states, 0, false).unwrap(), Copies::NoneBefore(_)));
        // Skip-batch and rollback cannot do without theirs: refused before any step.
        for p in [Policy::SkipBatch, Policy::Rollback] {
            let e = copies(p, states, states + margin - 1, false).unwrap_err().to_string();
            assert!(e.contains(&format!("--on-anomaly {} keeps a copy", p.name())), "{e}");
            assert!(e.contains("7.00 GB, which does not fit in the 8.07 GB"), "{e}");
        }
        // A trainer that stops rejected steps at their gate takes no pre-step copy, so nothing
        // but rollback's checkpoint has to fit.
        for p in [Policy::Warn, Policy::Stop, Policy::SkipBatch] {
            assert_eq!(copies(p, states, 0, true).unwrap(), Copies::Gated, "{}", p.name());
        }
        assert_eq!(copies(Policy::Rollback, states, states + margin, true).unwrap(), Copies::Gated);
        let e = copies(Policy::Rollback, states, states + margin - 1, true).unwrap_err().to_string();
        assert!(e.contains("--on-anomaly rollback keeps a copy"), "{e}");
    }

    fn record(step: u64, loss: f64, grad_norm: f64) -> Record {
        Record { step, loss, grad_norm, ..Record::default() }
    }

    /// Runs `series` of (loss, grad norm) through a monitor, keeping every step, and returns the
    /// alerts' (step, kind).
    fn alerts(m: &mut Monitor, series: &[(f64, f64)]) -> Vec<(u64, Kind)> {
        let mut out = Vec::new();
        for (i, &(l, g)) in series.iter().enumerate() {
            let r = record(i as u64 + 1, l, g);
            out.extend(m.check(&r).into_iter().map(|a| (a.step, a.kind)));
            m.keep(&r);
        }
        out
    }

    #[test]
    fn a_loss_spike_is_a_z_score_over_the_window_after_the_warmup() {
        let mut m = Monitor::new(&args());
        // A noisy descent, then a jump; an early jump before the warmup is not judged.
        let series = [
            (9.0, 1.0),
            (5.0, 1.1),
            (4.9, 0.9),
            (4.8, 1.05),
            (4.75, 0.95),
            (4.7, 1.0),
            (6.0, 1.0),
            (4.6, 1.0),
        ];
        let got = alerts(&mut m, &series);
        assert_eq!(got, [(7, Kind::LossSpike)]);
        // The figures: the window is steps 2..=6 (the last 5 kept).
        let mut m = Monitor::new(&args());
        alerts(&mut m, &series[..6]);
        let a = &m.check(&record(7, 6.0, 1.0))[0];
        let (_, _, mean, std) = moments(&[5.0, 4.9, 4.8, 4.75, 4.7]);
        assert_eq!(a.figures["mean"], json!(mean));
        assert!((a.figures["z"].as_f64().unwrap() - (6.0 - mean) / std).abs() < 1e-12);
        assert!(a.message.contains("standard deviations above the mean"), "{}", a.message);
        // A fall is not a spike; nor is a flat curve's rounding.
        let mut m = Monitor::new(&args());
        assert!(alerts(&mut m, &[(5.0, 1.0), (5.0, 1.0), (5.0, 1.0), (5.0, 1.0), (1.0, 1.0)]).is_empty());
        let mut m = Monitor::new(&args());
        assert!(alerts(
            &mut m,
            &[(5.0, 1.0); 4].iter().copied().chain([(5.000001, 1.0)]).collect::<Vec<_>>()
        )
        .is_empty());
    }

    #[test]
    fn a_gradient_norm_spike_and_a_non_finite_step_alert() {
        let mut m = Monitor::new(&args());
        let got = alerts(&mut m, &[(5.0, 1.0), (4.9, 1.1), (4.8, 0.9), (4.7, 1.0), (4.6, 30.0)]);
        assert_eq!(got, [(5, Kind::GradNormSpike)]);
        for (l, g) in [(f64::NAN, 1.0), (4.0, f64::INFINITY), (f64::NEG_INFINITY, f64::NAN)] {
            let a = m.check(&record(6, l, g));
            assert_eq!(a.iter().map(|a| a.kind).collect::<Vec<_>>(), [Kind::NonFinite], "{l} {g}");
            assert_eq!(m.action(&a), Some(Policy::Stop), "warn cannot keep a NaN step");
        }
        let skip = Monitor::new(&Args { on_anomaly: Policy::SkipBatch, ..args() });
        assert_eq!(skip.action(&skip.check(&record(1, f64::NAN, 1.0))), Some(Policy::SkipBatch));
    }

    #[test]
    fn an_expert_idle_for_n_steps_has_collapsed_once_per_stretch() {
        let mut m = Monitor::new(&args());
        let mut got = Vec::new();
        // Expert 2 idles at steps 1-4, works at 5, idles 6-8: alerts at steps 3 and 8.
        for step in 1..=8u64 {
            let idle = step != 5;
            let load = vec![4.0, 4.0, if idle { 0.0 } else { 4.0 }, 4.0];
            let r = Record {
                step,
                loss: 1.0,
                grad_norm: 1.0,
                loads: vec![("model.layers.1.mlp".into(), load)],
                ..Record::default()
            };
            got.extend(
                m.check(&r)
                    .into_iter()
                    .filter(|a| a.kind == Kind::ExpertCollapse)
                    .map(|a| (a.step, a.figures["expert"].clone())),
            );
            m.keep(&r);
        }
        assert_eq!(got, [(3, json!(2)), (8, json!(2))]);
        assert_eq!(m.action(&[]), None);
    }

    #[test]
    fn load_imbalance_alerts_each_time_a_layer_crosses_the_bound() {
        let mut m = Monitor::new(&args());
        let mut got = Vec::new();
        // max/mean: 2, 3.5, 3.5, 2, 3.5 with bound 3.
        let loads = [
            [2.0, 1.0, 1.0, 0.0],
            [7.0, 1.0, 0.0, 0.0],
            [7.0, 1.0, 0.0, 0.0],
            [2.0, 1.0, 1.0, 0.0],
            [7.0, 0.0, 1.0, 0.0],
        ];
        for (i, l) in loads.iter().enumerate() {
            let r = Record {
                step: i as u64 + 1,
                loss: 1.0,
                grad_norm: 1.0,
                loads: vec![("m".into(), l.to_vec())],
                ..Record::default()
            };
            let a = m.check(&r);
            assert_eq!(m.action(&a), None, "load alerts only warn");
            got.extend(
                a.into_iter()
                    .filter(|a| a.kind == Kind::LoadImbalance)
                    .map(|a| (a.step, a.figures["max_over_mean"].clone())),
            );
            m.keep(&r);
        }
        assert_eq!(got, [(2, json!(3.5)), (5, json!(3.5))]);
        assert_eq!(load_stats(&[7.0, 1.0, 0.0, 0.0]), (3.5, 0.0, 2));
    }

    #[test]
    fn records_carry_layer_norms_load_and_bias_statistics_and_faults_parse() {
        let r = Record {
            step: 3,
            loss: 2.0,
            grad_norm: 5.0,
            grad_norms: vec![("model.embed_tokens".into(), 3.0), ("lm_head".into(), 4.0)],
            lr: 1e-3,
            tokens_per_s: 10.0,
            loads: vec![("model.layers.1.mlp".into(), vec![2.0, 0.0, 1.0, 1.0])],
            biases: vec![("b".into(), vec![1.0, 3.0])],
        };
        let j = r.json();
        assert_eq!(j["grad_norms"]["lm_head"], json!(4.0));
        assert_eq!(
            j["expert_load"]["model.layers.1.mlp"],
            json!({"max_over_mean": 2.0, "min_over_mean": 0.0, "idle": 1})
        );
        assert_eq!(j["bias"]["b"], json!({"min": 1.0, "max": 3.0, "mean": 2.0, "std": 1.0}));
        assert_eq!((j["max_load"].clone(), j.get("event")), (json!(2.0), None));
        let a = Alert { step: 3, kind: Kind::LossSpike, message: "m".into(), figures: Map::new() };
        assert_eq!(
            a.json("rollback"),
            json!({"event": "alert", "step": 3, "kind": "loss_spike", "message": "m", "action": "rollback"})
        );

        assert_eq!(parse_fault("lr-spike:100@5").unwrap(), (5, Fault::LrSpike(100.0)));
        assert_eq!(parse_fault("poison-batch@2").unwrap(), (2, Fault::PoisonBatch));
        assert_eq!(
            parse_fault("nan:model.layers.1.mlp@3").unwrap(),
            (3, Fault::Nan("model.layers.1.mlp".into()))
        );
        assert_eq!(parse_fault("slow-save:2.5@4").unwrap(), (4, Fault::SlowSave(2.5)));
        for bad in ["poison-batch", "lr-spike:x@2", "nan:@2", "flip@2", "poison-batch@0", "slow-save:-1@2"] {
            let e = parse_fault(bad).unwrap_err().to_string();
            assert!(e.contains("KIND@STEP") && e.contains(bad), "{e}");
        }
        assert!(Args { spike_warmup: 30, ..Args::default() }.check().is_err());
        assert!(Args::default().check().is_ok());
    }
}
