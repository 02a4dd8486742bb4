//! `kiln compile`: a model spec or a `.kir` graph into an artifact directory, with the views of the
//! pipeline a compiler engineer needs: `--emit` (one stage's output on stdout), `--print-after`
//! (a stage's output on stderr as the pipeline passes it), `--report` (the kernel table with ptxas's
//! numbers), `--timings` (time, CPU time and memory per stage) and a progress bar when stderr is a terminal.
//!
//! Without `-o` nothing is written. The pipeline then stops after the stage `--emit` needs, unless
//! `--report` or a `--print-after` of a later stage asks for the rest; with neither `-o` nor `--emit`
//! the whole pipeline runs as a check.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::ValueEnum;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use kiln_compiler::codegen::emit::KernelTime;
use kiln_compiler::codegen::{cpu, form_kernels, gpu, Step as KernelStep, Target};
use kiln_compiler::pack::{self, Artifact, Dump, Observer, Options, Prepared, Source, Stage, Targets};
use kiln_compiler::schedule::Kind;
use kiln_compiler::spec;
use kiln_ir::artifact::{self, Manifest, Step};
use kiln_ir::Module;

pub(crate) mod plan;

/// A stage `--emit` prints to standard output.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Emit {
    /// The module after the pass pipeline (`module.kir`).
    Kir,
    /// The lowered kernels of every target (`kernels.mlir`).
    Mlir,
    /// The optimised LLVM IR of every target.
    Llvm,
    /// The PTX module (`kernels.ptx`).
    Ptx,
    /// The parallel plan of `--pp` as JSON, the pipeline stopping after planning (nothing is
    /// compiled); with `-o FILE` it is written there, with a summary on standard output.
    Plan,
}

/// The arguments of `kiln compile`.
#[derive(clap::Args)]
pub struct Args {
    /// A model spec (`.toml`, Hugging Face `config.json`) or a graph (`.kir`).
    input: PathBuf,
    /// `cpu`, `sm_90a` or `all`.
    #[arg(long, default_value = "all")]
    target: String,
    /// The artifact directory, written atomically: a new path, an empty directory, or an artifact
    /// (replaced whole; refused if it holds files its manifest does not list).
    #[arg(short, long)]
    output: Option<PathBuf>,
    /// For a `.kir` input: run the pass pipeline with this spec (without it the graph is compiled as
    /// written).
    #[arg(long)]
    spec: Option<PathBuf>,
    /// Print this stage's output to standard output (with `-o`, besides writing the artifact;
    /// without, the pipeline stops once it has it). `plan` stops after planning, and `-o` is then the
    /// file the plan is written to.
    #[arg(long, value_enum)]
    emit: Option<Emit>,
    /// Print a stage's output to standard error when it finishes: build, a pass name, kernels,
    /// plan-memory, lower, emit-cpu, emit-gpu, emit or pack.
    #[arg(long, value_name = "STAGE")]
    print_after: Option<String>,
    /// Print the kernel table: launches, per-layer launches and, for PTX, ptxas's resource use.
    #[arg(long)]
    report: bool,
    /// Print the time, the CPU time (all threads) and the memory of each stage.
    #[arg(long)]
    timings: bool,
    /// Print one JSON document instead of the summary line: the artifact, its programs (launches,
    /// arena bytes), kernels (launches per program), files (bytes, SHA-256) and every stage's
    /// time, CPU time and memory.
    #[arg(long, conflicts_with_all = ["emit", "report", "timings"], requires = "output")]
    json: bool,
    /// Skip this pass of the pipeline (repeatable), e.g. `--disable-pass fuse-kernels` to compile
    /// every op as a kernel of its own.
    #[arg(long, value_name = "PASS")]
    disable_pass: Vec<String>,
    /// The largest batch the buffer plan holds.
    #[arg(long, default_value_t = 1)]
    max_batch: u64,
    /// The largest context (and number of new tokens) the buffer plan holds: the KV cache's
    /// capacity per sequence.
    #[arg(long, default_value_t = 4096)]
    max_context: u64,
    /// From a spec, compile the stateless forward graph (with the MTP heads) instead of a prefill
    /// and a decode program over a KV cache.
    #[arg(long)]
    no_kv_cache: bool,
    /// From a spec, leave out the `score` program (the next-token loss at every position, which
    /// `kiln perplexity` runs).
    #[arg(long)]
    no_score: bool,
    /// From a spec with an MTP module, compile for speculative decoding (`kiln run --speculative`):
    /// the `draft` program (MTP module 1 over a KV cache of its own), prefill and decode programs
    /// that also output the main model's hidden states, and a decode program that verifies two
    /// tokens per sequence.
    #[arg(long, conflicts_with_all = ["no_kv_cache", "train"])]
    speculative: bool,
    /// From a spec, make the prefill program compute the logits at every prompt position. By
    /// default it computes them at each row's last prompt token alone (input `last`, logits
    /// `[B, 1, V]`), the only ones generation reads, and spares the rest of the head's GEMM.
    #[arg(long, conflicts_with_all = ["no_kv_cache", "train"])]
    all_logits: bool,
    /// From a spec, compile the `train_step` program instead of the inference programs (forward,
    /// next-token loss, backward, clipping and AdamW with DeepSeek-V3's settings; `kiln train`
    /// sets its own).
    #[arg(long)]
    train: bool,
    /// With --train, also compile the `accumulate` program, so that a step's batch can be split
    /// into micro-batches whose gradients add up before the update (`kiln train --micro-batch`).
    #[arg(long, requires = "train")]
    accumulate: bool,
    /// With --train, compile the step for one of several data-parallel replicas: the gradients,
    /// the loss and the routers' loads are summed over the replicas (`all_reduce` steps) before
    /// they are used (`mpirun -n N kiln train ... --dp N`; alone, it trains as one process).
    #[arg(long, requires = "train")]
    data_parallel: bool,
    /// With --train: also split AdamW's states over N data-parallel replicas (ZeRO stage 1; implies
    /// --data-parallel, and the artifact runs under `mpirun -n N ... --dp N`).
    #[arg(long, value_name = "N", requires = "train")]
    zero1: Option<u32>,
    /// With --train: the losses and the optimizer compiled in (`kiln train` runs the artifact with
    /// them).
    #[command(flatten)]
    settings: crate::train::Settings,
    /// Plan pipeline parallelism over P ranks: cut the model into the schedule's stages, generate,
    /// verify and simulate each rank's instruction list, and write the plan (with the experts'
    /// placement) into the manifest (`parallel`). With --train, also cut the train step into the
    /// stages' programs, which `kiln train --pp` runs under mpirun (with --ep E, each stage's step of
    /// one of E expert-parallel ranks, `kiln train --pp P --ep E`; --pp 1 --ep E: no stages, the
    /// step of one of E ranks, `kiln train --ep E`).
    #[arg(long, value_name = "P")]
    pp: Option<u32>,
    /// With --pp: expert-parallel ranks per stage, which must divide the routed experts (default
    /// the spec's `moe.ep_size`). With --pp 1 (inference), the artifact also holds each rank's
    /// programs with its share of the experts, which `kiln run --ep E` runs under mpirun.
    #[arg(long, value_name = "E", requires = "pp")]
    ep: Option<u64>,
    /// With --pp: the schedule, `dualpipe` (default; `1f1b` with --pp 1), `dualpipev`, `1f1b` or
    /// `zb1p`.
    #[arg(long, value_name = "SCHEDULE", requires = "pp")]
    schedule: Option<String>,
    /// With --pp: micro-batches per step (default 2·P, the fewest DualPipe takes).
    #[arg(long, value_name = "M", requires = "pp")]
    micro_batches: Option<u32>,
}

fn load_source(input: &Path, spec_path: Option<&Path>) -> Result<Source> {
    let is_kir = input.extension().is_some_and(|e| e == "kir");
    if !is_kir {
        if spec_path.is_some() {
            bail!("--spec goes with a .kir input; {} is a spec already", input.display());
        }
        return Ok(Source::Spec(spec::load(input)?));
    }
    let bytes = std::fs::read(input).with_context(|| format!("cannot read {}", input.display()))?;
    let name = input.display().to_string();
    let graph = kiln_ir::text::check_graph_file(&name, kiln_ir::diag::utf8(&name, &bytes)?)?;
    let spec = spec_path.map(spec::load).transpose()?;
    Ok(Source::Graph { graph: Box::new(graph), spec })
}

/// Resident and peak memory of this process in KiB (`VmRSS`, `VmHWM`), where /proc has them.
fn memory_kib() -> Option<(u64, u64)> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        line[name.len()..].trim().trim_end_matches("kB").trim().parse().ok()
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// CPU time this process has used so far, on all its threads, and the tools it ran and waited for
/// (`ptxas`'s check, the linker): `utime + stime + cutime + cstime` of /proc/self/stat, in USER_HZ
/// ticks, which Linux fixes at 100 per second, where /proc has it.
fn cpu_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The fields after the command name (in parentheses, which may hold spaces): state is field 3,
    // utime, stime, cutime and cstime are fields 14 to 17.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = (11..15).map(|i| fields.get(i)?.parse::<u64>().ok()).sum::<Option<u64>>()?;
    Some(Duration::from_millis(ticks * 10))
}

struct Row {
    stage: &'static str,
    time: Duration,
    /// CPU time on all threads and in the tools the stage ran: above `time` where a stage runs in
    /// parallel.
    cpu: Option<Duration>,
    memory: Option<(u64, u64)>,
}

/// The CLI's view of the pipeline: progress, `--print-after` and `--timings`.
struct Watch {
    print_after: Option<&'static str>,
    /// Passes `--disable-pass` skips.
    disabled: Vec<String>,
    /// The stage after which the graph's launches per layer are counted for `--report` (the last
    /// one before `fuse-kernels`), and the count.
    count_after: Option<&'static str>,
    before_fusion: Option<Vec<LayerLaunches>>,
    progress: ProgressBar,
    timings: Vec<Row>,
    started: Instant,
    started_cpu: Option<Duration>,
}

impl Observer for Watch {
    fn started(&mut self, stage: Stage) {
        self.progress.set_message(stage.name());
        self.started = Instant::now();
        self.started_cpu = cpu_time();
    }

    fn runs_pass(&mut self, pass: &str) -> bool {
        !self.disabled.iter().any(|d| d == pass)
    }

    fn finished(&mut self, stage: Stage, dump: &Dump<'_>) {
        let cpu = cpu_time().zip(self.started_cpu).map(|(now, then)| now.saturating_sub(then));
        let row = Row { stage: stage.name(), time: self.started.elapsed(), cpu, memory: memory_kib() };
        self.timings.push(row);
        if let (Some(name), Dump::Graph(g)) = (self.count_after, dump) {
            if name == stage.name() {
                // The program kernel formation makes of the graph fuse-kernels starts from.
                self.before_fusion = form_kernels(g).ok().map(|plan| {
                    let scopes = plan.steps.iter().filter_map(|s| match s {
                        KernelStep::Launch { node, .. } => Some(g.node(*node).scope.clone()),
                        _ => None,
                    });
                    launches_per_layer(scopes)
                });
            }
        }
        self.progress.inc(1);
        if self.print_after == Some(stage.name()) {
            let text = dump.render();
            self.progress.suspend(|| {
                eprintln!("// ----- after {} -----", stage.name());
                eprint!("{text}");
            });
        }
    }
}

fn progress_bar(stages: u64) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(stages), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template("{spinner} [{bar:30}] {pos}/{len} {msg} ({elapsed})") {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

/// Runs `kiln compile`, printing to `out`.
pub fn run(req: &Args, out: &mut dyn Write) -> Result<()> {
    let targets = Targets::parse(&req.target)
        .with_context(|| format!("unknown target `{}`: use cpu, {} or all", req.target, gpu::SM))?;
    if req.emit == Some(Emit::Ptx) && !targets.gpu() {
        bail!("--emit ptx needs --target {} or all", gpu::SM);
    }
    let options = Options {
        targets,
        max_batch: req.max_batch,
        max_context: req.max_context,
        kv_cache: !req.no_kv_cache,
        score: !req.no_score,
        speculative: req.speculative,
        last_logits: !req.all_logits,
        train: match req.train {
            true => {
                let e = req.settings.over(crate::train::Settings::defaults(), None)?;
                let (losses, optimizer) = (crate::train::losses_of(&e), crate::train::optimizer_of(&e));
                let shards = match req.zero1 {
                    Some(0) => bail!("--zero1 0: give the number of data-parallel replicas, at least 1"),
                    Some(n) => n,
                    None => 1,
                };
                Some(pack::TrainOptions {
                    losses,
                    optimizer: kiln_compiler::train::Optimizer { shards, ..optimizer },
                    accumulate: req.accumulate,
                    data_parallel: req.data_parallel || req.zero1.is_some(),
                    // `--pp P --ep E`: the step of one of E expert-parallel ranks (of each stage).
                    expert_parallel: req.ep.filter(|&e| e > 1),
                })
            }
            false if req.settings.any() => {
                bail!("the loss and optimizer settings (--betas, --clip, --mtp-lambda, ...) go with --train")
            }
            false => None,
        },
        parallel: match req.pp {
            Some(pp) => Some(pack::Parallel {
                // One rank has no pipeline to schedule (`--pp 1 --ep E`: expert parallelism alone).
                kind: Kind::parse(req.schedule.as_deref().unwrap_or(match pp {
                    1 => "1f1b",
                    _ => DEFAULT_SCHEDULE,
                }))
                .context("--schedule")?,
                pp,
                ep: req.ep,
                micro_batches: req.micro_batches,
            }),
            None => None,
        },
    };
    if req.emit == Some(Emit::Plan) {
        return plan::emit(req, &options, out);
    }
    for name in &req.disable_pass {
        kiln_compiler::passes::find(name)?;
    }
    // A target `-o` may not replace is refused before the compile, not after it.
    if let Some(dir) = &req.output {
        pack::check_target(dir)?;
        let inputs: Vec<&Path> =
            [Some(req.input.as_path()), req.spec.as_deref()].into_iter().flatten().collect();
        kiln_ir::output::check_not_input(dir, &inputs)?;
    }
    if req.train && req.input.extension().is_some_and(|e| e == "kir") {
        bail!(
            "--train builds the train step from a model spec (a .toml or a Hugging Face config.json); {} \
             is a .kir graph, which compiles as it is",
            req.input.display()
        );
    }
    let source = load_source(&req.input, req.spec.as_deref())?;
    let stages: Vec<Stage> = pack::stages(&source, &options)
        .into_iter()
        .filter(|s| !matches!(s, Stage::Pass(p) if req.disable_pass.iter().any(|d| d == p)))
        .collect();
    // `--report` compares the launches before fuse-kernels with the program's.
    let count_after = match stages.iter().position(|s| *s == Stage::Pass(FUSE_KERNELS)) {
        Some(i) if req.report && i > 0 => Some(stages[i - 1].name()),
        _ => None,
    };

    // `--print-after emit` is the last emit stage that runs.
    let last_emit = stages.iter().rev().find(|s| matches!(s, Stage::EmitCpu | Stage::EmitGpu)).copied();
    let print_after = match req.print_after.as_deref() {
        None => None,
        Some("emit") => last_emit.map(Stage::name),
        Some(name) => {
            let stage = stages.iter().find(|s| s.name() == name).with_context(|| {
                let names: Vec<&str> = stages.iter().map(|s| s.name()).collect();
                format!(
                    "--print-after {name}: no such stage here; the stages are: {}, emit",
                    names.join(", ")
                )
            })?;
            Some(stage.name())
        }
    };
    // How far the pipeline must run: to the end when writing or reporting (or with nothing to
    // print), else as far as the stages `--emit` and `--print-after` show.
    let depth = |name: &str| match stages.iter().position(|s| s.name() == name) {
        Some(i) if i < stages.iter().position(|s| *s == Stage::Kernels).unwrap_or(0) => Depth::Graph,
        _ if ["kernels", "plan-memory", "lower"].contains(&name) => Depth::Lowered,
        _ => Depth::All,
    };
    let depth = match req.emit {
        _ if req.output.is_some() || req.report => Depth::All,
        None => Depth::All,
        Some(emit) => {
            let needed = if emit == Emit::Kir { Depth::Graph } else { Depth::Lowered };
            needed.max(print_after.map_or(Depth::Graph, depth))
        }
    };
    let total = match depth {
        Depth::Graph => stages.iter().take_while(|s| **s != Stage::Kernels).count(),
        Depth::Lowered => stages.iter().take_while(|s| **s != Stage::Lower).count() + 1,
        Depth::All => stages.len(),
    };
    let mut watch = Watch {
        print_after,
        disabled: req.disable_pass.clone(),
        count_after,
        before_fusion: None,
        progress: progress_bar(total as u64),
        timings: Vec::new(),
        started_cpu: None,
        started: Instant::now(),
    };
    let result = match depth {
        Depth::Graph => {
            pack::make_module(source, &options, &mut watch).map(|(m, _)| Built::Module(Box::new(m)))
        }
        Depth::Lowered => pack::prepare(source, &options, &mut watch).map(|p| Built::Prepared(Box::new(p))),
        Depth::All => pack::compile(source, &options, &mut watch).map(|a| Built::Artifact(Box::new(a))),
    };
    watch.progress.finish_and_clear();
    let built = result?;

    if let Some(emit) = req.emit {
        out.write_all(emitted(&built, emit)?.as_bytes())?;
    }
    if let (Some(dir), Built::Artifact(a)) = (&req.output, &built) {
        pack::write(a, dir)?;
        if req.json {
            let mut doc = json_summary(dir, &a.manifest, &watch.timings, &a.kernel_times);
            let cache = &a.kernel_cache;
            let used = |u: Option<kiln_compiler::codegen::cache::Use>| {
                u.map(|u| serde_json::json!({"found": u.found, "compiled": u.compiled}))
            };
            doc["kernel_cache"] = serde_json::json!({
                "dir": kiln_compiler::codegen::cache::dir().map(|d| d.display().to_string()),
                "cpu": used(cache.cpu),
                "gpu": used(cache.gpu),
                "ptxas_found": cache.ptxas_found,
            });
            writeln!(out, "{}", serde_json::to_string_pretty(&doc)?)?;
        } else if req.emit.is_none() {
            writeln!(out, "{}", summary(dir, &a.manifest))?;
        }
    }
    // The plan's summary where nothing else goes to standard output.
    if let (None, false, Built::Artifact(a)) = (req.emit, req.json, &built) {
        if let Some(plan) = &a.manifest.parallel {
            out.write_all(plan::summary(plan, plan::mtp_depth(a.manifest.model.as_ref())).as_bytes())?;
        }
    }
    if let (true, Built::Artifact(a)) = (req.report, &built) {
        out.write_all(report(a).as_bytes())?;
        out.write_all(fusion_report(a, watch.before_fusion.as_deref(), &req.disable_pass).as_bytes())?;
    }
    if req.timings {
        out.write_all(timings(&watch.timings).as_bytes())?;
        if let Built::Artifact(a) = &built {
            out.write_all(kernel_cache_lines(&a.kernel_cache).as_bytes())?;
            out.write_all(slowest_kernels(&a.manifest, &a.kernel_times).as_bytes())?;
        }
    }
    // The process ends next and its memory goes back whole: freeing a DeepSeek-V3 compile (module,
    // plans and artifact, some 700 MiB in small allocations) one by one would cost a quarter of a
    // second. `run` is only called from `main`.
    std::mem::forget(built);
    Ok(())
}

/// The schedule `--pp` plans without `--schedule`: DeepSeek-V3's.
const DEFAULT_SCHEDULE: &str = "dualpipe";

/// How far a compile runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Depth {
    /// `build` and the passes.
    Graph,
    /// Up to `lower`.
    Lowered,
    /// Every stage.
    All,
}

/// What a compile produced, as far as it ran.
enum Built {
    Module(Box<Module>),
    Prepared(Box<Prepared>),
    Artifact(Box<Artifact>),
}

impl Built {
    /// The module as `.kir` text.
    fn kir(&self) -> String {
        match self {
            Built::Module(m) => kiln_ir::print_module(m),
            Built::Prepared(p) => kiln_ir::print_module(&p.module),
            Built::Artifact(a) => kiln_ir::print_module(&a.prepared.module),
        }
    }

    fn prepared(&self) -> Result<&Prepared> {
        match self {
            Built::Module(_) => bail!("internal error: the compile stopped before lowering"),
            Built::Prepared(p) => Ok(p),
            Built::Artifact(a) => Ok(&a.prepared),
        }
    }

    fn file(&self, name: &str) -> Option<String> {
        match self {
            Built::Artifact(a) => {
                a.files.iter().find(|(n, _)| n == name).map(|(_, b)| String::from_utf8_lossy(b).into_owned())
            }
            _ => None,
        }
    }
}

/// The text `--emit` prints.
fn emitted(built: &Built, emit: Emit) -> Result<String> {
    if emit == Emit::Kir {
        return Ok(built.file(artifact::MODULE_KIR).unwrap_or_else(|| built.kir()));
    }
    let p = built.prepared()?;
    Ok(match emit {
        Emit::Plan => bail!("internal error: --emit plan is answered before any compile"),
        Emit::Kir | Emit::Mlir => built.file(artifact::KERNELS_MLIR).unwrap_or_else(|| pack::kernels_mlir(p)),
        Emit::Llvm => {
            let mut text = String::new();
            if let Some(m) = &p.cpu {
                text.push_str(&format!("; target: cpu\n{}", cpu::llvm_ir(m)?));
            }
            if let Some(m) = &p.gpu {
                text.push_str(&format!("; target: {}\n{}", gpu::SM, gpu::llvm_ir(m)?));
            }
            text
        }
        Emit::Ptx => match built.file(artifact::KERNELS_PTX) {
            Some(ptx) => ptx,
            None => gpu::ptx(p.gpu.as_ref().context("no GPU module was lowered")?)?,
        },
    })
}

fn summary(dir: &Path, m: &Manifest) -> String {
    let programs: Vec<String> = m
        .programs
        .iter()
        .map(|p| {
            let launches = p.steps.iter().filter(|s| matches!(s, Step::Launch { .. })).count();
            format!("{} ({launches} launches, arena {} bytes)", p.name, p.arena_bytes)
        })
        .collect();
    let files: Vec<&str> = m.files.iter().map(|f| f.name.as_str()).collect();
    format!(
        "wrote {}: {} kernels; programs {}; {} and manifest.json",
        dir.display(),
        m.kernels.len(),
        programs.join(", "),
        files.join(", ")
    )
}

/// What `--timings` says of the kernel cache: a line per target emitted, how many of its kernels
/// the cache held, and for the PTX whether `ptxas`'s report came from it.
fn kernel_cache_lines(report: &kiln_compiler::codegen::cache::Report) -> String {
    let dir = kiln_compiler::codegen::cache::dir();
    let mut out = String::new();
    for (target, used) in [("CPU", report.cpu), ("GPU", report.gpu)] {
        let Some(used) = used else { continue };
        let all = used.found + used.compiled;
        let line = match &dir {
            Some(dir) => {
                format!(
                    "kernel cache: {} of {all} {target} kernels found in {}, {} compiled",
                    used.found,
                    dir.display(),
                    used.compiled
                )
            }
            None => format!("kernel cache: off (KILN_NO_KERNEL_CACHE), {all} {target} kernels compiled"),
        };
        out.push_str(&line);
        if let (Some(found), Some(_), "GPU") = (report.ptxas_found, &dir, target) {
            out.push_str(if found { "; the ptxas check found" } else { "; the ptxas check run" });
        }
        out.push('\n');
    }
    out
}

/// Kernels `--timings` names, at most.
const SLOWEST: usize = 5;

/// What `--timings` says of emission: per target, the kernels compiled (those the cache held cost
/// nothing) and the CPU time they took in all, then the slowest [`SLOWEST`], each with its label.
/// The times are each kernel's thread's CPU time: they add up to more than the stage's wall time
/// where kernels were compiled side by side.
fn slowest_kernels(m: &Manifest, times: &[KernelTime]) -> String {
    if times.is_empty() {
        return String::new();
    }
    let mut parts = Vec::new();
    for target in [Target::Cpu, Target::Gpu] {
        let (n, total) = (times.iter().filter(|t| t.target == target))
            .fold((0, Duration::ZERO), |(n, total), t| (n + 1, total + t.cpu));
        if n > 0 {
            let what = if n == 1 { "kernel" } else { "kernels" };
            let target = target.to_string().to_uppercase();
            parts.push(format!("{n} {target} {what} in {:.2} s", total.as_secs_f64()));
        }
    }
    let mut out = format!("emitted: {} of CPU time (each kernel's thread)\n", parts.join(", "));
    let mut slowest: Vec<&KernelTime> = times.iter().collect();
    slowest.sort_by(|a, b| b.cpu.cmp(&a.cpu).then_with(|| a.kernel.cmp(&b.kernel)));
    use crate::table::Align::{Left, Right};
    let mut table =
        crate::table::new(&[("slowest to emit", Left), ("target", Left), ("label", Left), ("cpu", Right)]);
    for t in slowest.into_iter().take(SLOWEST) {
        let label = (m.kernels.iter().find(|k| k.name == t.kernel))
            .and_then(|k| k.label.clone())
            .unwrap_or_else(|| "-".into());
        let cpu = format!("{:.1} ms", t.cpu.as_secs_f64() * 1e3);
        table.add_row(vec![t.kernel.clone(), t.target.to_string(), label, cpu]);
    }
    out.push_str(&crate::table::render(&table));
    out
}

/// `--json`: what [`summary`] says, and per kernel and per stage.
fn json_summary(dir: &Path, m: &Manifest, rows: &[Row], times: &[KernelTime]) -> serde_json::Value {
    use serde_json::json;
    let launches_of = |p: &kiln_ir::artifact::Program| {
        let mut n = vec![0u64; m.kernels.len()];
        for s in &p.steps {
            if let Step::Launch { kernel, .. } = s {
                n[kernel.index()] += 1;
            }
        }
        n
    };
    let per_program: Vec<Vec<u64>> = m.programs.iter().map(launches_of).collect();
    let programs: Vec<serde_json::Value> = (m.programs.iter().zip(&per_program))
        .map(|(p, n)| {
            json!({"name": p.name, "kind": p.kind.to_string(), "launches": n.iter().sum::<u64>(),
                   "arena_bytes": p.arena_bytes})
        })
        .collect();
    let kernels: Vec<serde_json::Value> = (m.kernels.iter().enumerate())
        .map(|(i, k)| {
            let launches: serde_json::Map<String, serde_json::Value> =
                (m.programs.iter().zip(&per_program)).map(|(p, n)| (p.name.clone(), n[i].into())).collect();
            // What emitting it cost, per target it was compiled for here (not taken from the cache).
            let emit: serde_json::Map<String, serde_json::Value> = (times.iter())
                .filter(|t| t.kernel == k.name)
                .map(|t| (t.target.to_string(), (t.cpu.as_secs_f64() * 1e3).into()))
                .collect();
            json!({"name": k.name, "cpu": k.cpu.is_some(), "gpu": k.gpu.is_some(), "launches": launches,
                   "emit_cpu_ms": emit})
        })
        .collect();
    let files: Vec<serde_json::Value> =
        m.files.iter().map(|f| json!({"name": f.name, "bytes": f.bytes, "sha256": f.sha256})).collect();
    let stages: Vec<serde_json::Value> = (rows.iter())
        .map(|r| {
            json!({
                "stage": r.stage,
                "ms": r.time.as_secs_f64() * 1e3,
                "cpu_ms": r.cpu.map(|c| c.as_secs_f64() * 1e3),
                "rss_bytes": r.memory.map(|(rss, _)| rss * 1024),
                "peak_rss_bytes": r.memory.map(|(_, peak)| peak * 1024),
            })
        })
        .collect();
    let mut doc = json!({
        "artifact": dir.display().to_string(),
        "name": m.name,
        "programs": programs,
        "kernels": kernels,
        "files": files,
        "stages": stages,
    });
    if let Some(p) = &m.parallel {
        doc["parallel"] = json!({
            "schedule": p.schedule, "pp": p.pp, "ep": p.ep, "micro_batches": p.micro_batches,
            "stages": p.stages.len(), "makespan": p.makespan, "bubble": p.bubble,
        });
    }
    doc
}

/// The decoder layer of a Hugging Face scope (`model.layers.3.mlp` is 3).
fn layer_of(scope: &str) -> Option<u64> {
    scope.strip_prefix("model.layers.")?.split('.').next()?.parse().ok()
}

/// `--report`: one row per kernel, then totals.
fn report(a: &Artifact) -> String {
    let m = &a.manifest;
    let first = &m.programs[0];
    let mut launches = vec![0usize; m.kernels.len()];
    let mut per_layer: Vec<BTreeMap<u64, usize>> = vec![BTreeMap::new(); m.kernels.len()];
    for s in &first.steps {
        if let Step::Launch { kernel, scope, .. } = s {
            launches[kernel.index()] += 1;
            if let Some(l) = scope.as_deref().and_then(layer_of) {
                *per_layer[kernel.index()].entry(l).or_default() += 1;
            }
        }
    }
    use crate::table::Align::{Left, Right};
    let mut columns =
        vec![("id", Left), ("kernel", Left), ("launches", Right), ("layers", Right), ("per layer", Right)];
    if a.ptxas.is_some() {
        columns.extend([("regs", Right), ("stack", Right), ("spill st/ld", Right), ("smem", Right)]);
    }
    let mut table = crate::table::new(&columns);
    for k in &m.kernels {
        let layers = &per_layer[k.id.index()];
        let (lo, hi) = (layers.values().min(), layers.values().max());
        let each = match (lo, hi) {
            (Some(lo), Some(hi)) if lo == hi => lo.to_string(),
            (Some(lo), Some(hi)) => format!("{lo}-{hi}"),
            _ => "-".to_string(),
        };
        let n_layers = if layers.is_empty() { "-".to_string() } else { layers.len().to_string() };
        let mut row =
            vec![k.id.to_string(), k.name.clone(), launches[k.id.index()].to_string(), n_layers, each];
        if let Some(stats) = &a.ptxas {
            match stats.get(&k.name) {
                Some(s) => row.extend([
                    s.registers.to_string(),
                    s.stack_bytes.to_string(),
                    format!("{}/{}", s.spill_store_bytes, s.spill_load_bytes),
                    s.shared_bytes.to_string(),
                ]),
                None => row.push("(not in the ptxas report)".to_string()),
            }
        }
        table.add_row(row);
    }
    let mut out = crate::table::render(&table);
    let total: usize = launches.iter().sum();
    let aliases = first.steps.iter().filter(|s| matches!(s, Step::Alias { .. })).count();
    let param_bytes: u64 = m
        .params
        .iter()
        .map(|p| kiln_ir::artifact::bytes_of(p.dtype, &p.shape, &first.max_sizes()).unwrap_or(0))
        .sum();
    let sizes: Vec<String> = first.symbols.iter().map(|e| format!("{} = {}", e.sym.name(), e.max)).collect();
    out.push_str(&format!(
        "{} kernels, {total} launches and {aliases} aliases per run of `{}`; arena {} bytes at {}; \
         {} parameters, {param_bytes} bytes\n",
        m.kernels.len(),
        first.name,
        first.arena_bytes,
        if sizes.is_empty() { "any size".to_string() } else { sizes.join(", ") },
        m.params.len()
    ));
    out
}

const FUSE_KERNELS: &str = "fuse-kernels";

/// The launches one run of a program makes in one decoder layer, in all and in its MoE (or dense
/// MLP) block, `mlp`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerLaunches {
    pub layer: u64,
    pub total: usize,
    pub mlp: usize,
}

/// Launches per decoder layer from the scopes of a program's launches (any program: a packed
/// artifact's forward, prefill or decode steps, or kernel formation's steps), layers in order. A
/// launch belongs to the layer of its scope (`model.layers.3...`); launches outside layers are not
/// counted.
pub fn launches_per_layer(scopes: impl IntoIterator<Item = Option<String>>) -> Vec<LayerLaunches> {
    let mut per: BTreeMap<u64, LayerLaunches> = BTreeMap::new();
    for scope in scopes.into_iter().flatten() {
        let Some(layer) = layer_of(&scope) else { continue };
        let e = per.entry(layer).or_insert(LayerLaunches { layer, total: 0, mlp: 0 });
        e.total += 1;
        if scope.starts_with(&format!("model.layers.{layer}.mlp")) {
            e.mlp += 1;
        }
    }
    per.into_values().collect()
}

/// The launches per layer of a packed program, without the weight-only launches a runtime runs once
/// at load (`Program::weight_only_steps`).
pub fn program_launches_per_layer(m: &Manifest, p: &kiln_ir::artifact::Program) -> Vec<LayerLaunches> {
    let folded = p.weight_only_steps(&m.kernels);
    launches_per_layer(p.steps.iter().enumerate().filter_map(|(i, s)| match s {
        Step::Launch { scope, .. } if !folded.contains(&i) => Some(scope.clone()),
        _ => None,
    }))
}

/// `--report`'s second table: launches per decoder layer before fuse-kernels (kernel formation of
/// the graph the pass starts from) and in the artifact's program (and its decode program, when it
/// has one), layers with the same numbers on one line. A program makes as many launches whatever
/// its number of tokens, so these are also the launches per token of a decode step.
fn fusion_report(a: &Artifact, before: Option<&[LayerLaunches]>, disabled: &[String]) -> String {
    let m = &a.manifest;
    let after = program_launches_per_layer(m, &m.programs[0]);
    let skipped = disabled.iter().any(|d| d == FUSE_KERNELS);
    // Without a spec no pass runs: there is no before and after to show.
    if after.is_empty() || (before.is_none() && !skipped) {
        return String::new();
    }
    let decode = m.program_of_kind(kiln_ir::ProgramKind::Decode).map(|d| program_launches_per_layer(m, d));
    let mut out = String::from("launches per layer, before fuse-kernels and in the program");
    if skipped {
        out.push_str(" (fuse-kernels disabled)");
    }
    out.push_str(":\n");
    out.push_str(&format!("{:<10} {:>8} {:>8} {:>8}", "layers", "before", "after", "(mlp)"));
    if decode.is_some() {
        out.push_str(&format!(" {:>8} {:>8}", "decode", "(mlp)"));
    }
    out.push('\n');
    let opt = |v: Option<usize>| v.map_or("-".to_string(), |n| n.to_string());
    let row = |x: &LayerLaunches| {
        let b = before.and_then(|b| b.iter().find(|y| y.layer == x.layer)).map(|y| y.total);
        let d = decode.as_ref().and_then(|d| d.iter().find(|y| y.layer == x.layer)).map(|y| (y.total, y.mlp));
        let mut cells = format!("{:>8} {:>8} {:>8}", opt(b), x.total, x.mlp);
        if decode.is_some() {
            cells.push_str(&format!(" {:>8} {:>8}", opt(d.map(|v| v.0)), opt(d.map(|v| v.1))));
        }
        cells
    };
    let mut lines: Vec<(u64, u64, String)> = Vec::new();
    for x in &after {
        let cells = row(x);
        match lines.last_mut() {
            Some(l) if l.1 + 1 == x.layer && l.2 == cells => l.1 = x.layer,
            _ => lines.push((x.layer, x.layer, cells)),
        }
    }
    for (lo, hi, cells) in lines {
        let layers = if lo == hi { lo.to_string() } else { format!("{lo}-{hi}") };
        out.push_str(&format!("{layers:<10} {cells}\n"));
    }
    out
}

/// `--timings`: one row per stage that ran.
fn timings(rows: &[Row]) -> String {
    use crate::table::Align::{Left, Right};
    let mib = |kib: u64| format!("{:.1} MiB", kib as f64 / 1024.0);
    let ms = |d: Duration| format!("{:.1} ms", d.as_secs_f64() * 1e3);
    let mut table = crate::table::new(&[
        ("stage", Left),
        ("time", Right),
        ("cpu", Right),
        ("rss", Right),
        ("peak rss", Right),
    ]);
    for r in rows {
        let (rss, peak) = match r.memory {
            Some((rss, peak)) => (mib(rss), mib(peak)),
            None => ("-".to_string(), "-".to_string()),
        };
        let cpu = r.cpu.map_or("-".to_string(), ms);
        table.add_row(vec![r.stage.to_string(), ms(r.time), cpu, rss, peak]);
    }
    let total: Duration = rows.iter().map(|r| r.time).sum();
    let cpu: Option<Duration> = rows.iter().map(|r| r.cpu).sum();
    table.add_row(vec!["total".to_string(), ms(total), cpu.map_or("-".to_string(), ms)]);
    crate::table::render(&table)
}
