//! Packing: a model spec or a graph into an artifact directory a runtime can load (`kiln compile`).
//!
//! The pipeline, each stage a named step whose output can be printed (`--print-after STAGE`):
//!
//! ```text
//! build          ModelSpec ─▶ Graph (or a given graph, verified)
//! <pass> ...     every pass of passes::PASSES, in order (only with a spec: passes read it)
//! kernels        Graph ─▶ KernelPlan (codegen::form_kernels)
//! plan-memory    KernelPlan ─▶ MemoryPlan (one arena, offsets for the maximum sizes)
//! lower          each distinct kernel once per target ─▶ MLIR
//! emit-gpu       MLIR ─▶ LLVM ─▶ kernels.ptx for sm_90a, assembled by ptxas -v as a check
//! emit-cpu       MLIR ─▶ LLVM ─▶ kernels.so with a packed entry per kernel
//! pack           module.kir, kernels.mlir, manifest.json (with the SHA-256 of every file)
//! ```
//!
//! Lowering and both emit stages work on every distinct kernel on its own, in parallel on the
//! rayon pool, and put the results together in kernel order, so an artifact is the same whatever
//! the number of threads. The stages overlap where they can: ptxas checks the PTX (emit-gpu comes
//! first for that) while emit-cpu makes the library, and module.kir, kernels.mlir and the
//! manifest are made beside both; a stage is reported finished when its own result is ready.
//!
//! With [`Options::parallel`] (`kiln compile --pp`), [`prepare`] first makes the parallel plan
//! ([`parallel_plan`], `crate::schedule::plan`): from the spec alone, so an impossible request fails
//! before any work; `pack` puts it into the manifest and [`plan_json`] prints it on its own.
//!
//! [`make_graph`] runs `build` and the passes, [`prepare`] the pure stages up to `lower`, [`emit`]
//! the rest, [`compile`] all of them. Nothing here writes the output: an [`Artifact`] holds its
//! files in memory, and [`write()`] puts them in place atomically. (The CPU library is linked by `cc`
//! in a private temporary directory and read back.)
//! A caller watches the stages through an [`Observer`]: the CLI's progress bar, timings and
//! `--print-after` are observers, so the pipeline itself does no printing.

mod memory;
mod ptxas;
mod structure;
mod write;

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::PathBuf;

use rayon::prelude::*;
use sha2::{Digest, Sha256};

use kiln_ir::artifact::{
    self, ArgRole, ArgSig, BufferKind, CpuKernel, CpuTarget, FileEntry, GpuKernel, GpuTarget, GridAxis,
    KernelEntry, KernelIndex, Manifest, NamedBuffer, ParallelPlan, ParamEntry, StateEntry, SymbolEntry,
};
use kiln_ir::module::{
    verify_declarations, Module, ModuleError, ParamDecl, Program, ProgramKind, StateDecl, StateRole,
};
use kiln_ir::types::Sym;
use kiln_ir::verify::{verify, VerifyError};
use kiln_ir::{Graph, ModelSpec, Op, SymBindings};

use crate::build::{
    build_cached, build_draft, build_graph, build_prefill_last, build_score, build_speculative, BuildError,
    Phase,
};
use crate::codegen::emit::KernelTime;
use crate::codegen::{
    cache, cpu, form_programs, gpu, lower_kernel, EmitError, FormError, KernelPlan, LaunchShape, LowerError,
    LoweredModule, Step, Target,
};
use crate::passes::{self, PassError};
use crate::toolchain::{self, ToolchainError};

pub use memory::{plan_memory, MemoryPlan, PlanError};
pub use ptxas::{parse_report, PtxasStats};
pub use write::{check_target, write, WriteError};

pub use crate::target::Targets;

/// What to compile.
pub enum Source {
    /// A model spec: the graph is built from it and the pass pipeline runs with it.
    Spec(ModelSpec),
    /// A graph as given (a `.kir` file). The passes run only when a spec is given too, because they
    /// read their constants from it; without one the graph is compiled as written.
    Graph { graph: Box<Graph>, spec: Option<ModelSpec> },
}

impl Source {
    /// The spec, when there is one.
    pub fn spec(&self) -> Option<&ModelSpec> {
        match self {
            Source::Spec(s) => Some(s),
            Source::Graph { spec, .. } => spec.as_ref(),
        }
    }
}

/// How to compile.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    pub targets: Targets,
    /// The largest batch (`B`) the buffer plan must hold.
    pub max_batch: u64,
    /// The largest context (`S`), and so the largest number of new tokens (`T`), it must hold.
    pub max_context: u64,
    /// From a spec, compile a prefill and a decode program over a KV cache ([`build_cached`])
    /// rather than the stateless forward graph (which keeps the MTP heads).
    pub kv_cache: bool,
    /// From a spec, also compile the `score` program ([`build_score`]): the next-token loss at
    /// every position (`kiln perplexity`).
    pub score: bool,
    /// From a spec, compile the training programs ([`crate::train::program`]) instead of the
    /// inference programs.
    pub train: Option<TrainOptions>,
    /// Put a parallel plan into the manifest ([`parallel_plan`]).
    pub parallel: Option<Parallel>,
    /// With `kv_cache`, compile for speculative decoding with the MTP module: the prefill and
    /// decode programs also output the main model's hidden states ([`build_speculative`]), the
    /// decode program takes two new tokens per sequence (the last one accepted and the draft), and
    /// the `draft` program ([`build_draft`]) is added.
    pub speculative: bool,
    /// With `kv_cache`, the prefill program computes the logits at each row's last prompt token
    /// alone ([`build_prefill_last`]: input `last`, logits `[B, 1, V]`), the only ones generation
    /// reads; otherwise at every position. `kiln compile` sets it unless `--all-logits`.
    pub last_logits: bool,
}

/// The pipeline and expert parallelism to plan (`kiln compile --pp`): a
/// [`crate::schedule::Request`] whose sizes are the compile's (see [`parallel_plan`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Parallel {
    pub kind: crate::schedule::Kind,
    pub pp: u32,
    /// The spec's `moe.ep_size` when absent.
    pub ep: Option<u64>,
    /// `2·pp` when absent.
    pub micro_batches: Option<u32>,
}

/// What a training artifact is compiled with.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct TrainOptions {
    pub losses: crate::build::TrainLosses,
    pub optimizer: crate::train::Optimizer,
    /// Also compile the `accumulate` program, so that a step's batch can be split into
    /// micro-batches (gradient accumulation).
    pub accumulate: bool,
    /// Compile the step for one data-parallel replica of several ([`crate::train::program`]).
    pub data_parallel: bool,
    /// Compile the step for one of this many expert-parallel ranks, which each train on their own
    /// rows and hold their share of the routed experts ([`crate::expert_parallel::split_tokens`]);
    /// `None` or 1: every process holds every expert.
    pub expert_parallel: Option<u64>,
}

impl Options {
    /// Every program a spec compiles to by default: prefill, decode and score.
    pub fn new(targets: Targets, max_batch: u64, max_context: u64) -> Options {
        Options {
            targets,
            max_batch,
            max_context,
            kv_cache: true,
            score: true,
            train: None,
            parallel: None,
            speculative: false,
            last_logits: false,
        }
    }

    /// The sizes the buffer plan is made for: `T <= S` always, so both get `max_context`.
    pub fn max_sizes(&self) -> SymBindings {
        SymBindings { b: self.max_batch, t: self.max_context, s: self.max_context }
    }

    /// The sizes the buffer plan of a program of `kind` is made for: a decode program runs one new
    /// token per sequence, or two when it verifies a draft.
    pub fn max_sizes_of(&self, kind: ProgramKind) -> SymBindings {
        match kind {
            ProgramKind::Decode => SymBindings { t: 1 + u64::from(self.speculative), ..self.max_sizes() },
            _ => self.max_sizes(),
        }
    }
}

/// A stage of the pipeline (see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    Build,
    Pass(&'static str),
    Kernels,
    PlanMemory,
    Lower,
    EmitCpu,
    EmitGpu,
    Pack,
}

impl Stage {
    pub fn name(self) -> &'static str {
        match self {
            Stage::Build => "build",
            Stage::Pass(name) => name,
            Stage::Kernels => "kernels",
            Stage::PlanMemory => "plan-memory",
            Stage::Lower => "lower",
            Stage::EmitCpu => "emit-cpu",
            Stage::EmitGpu => "emit-gpu",
            Stage::Pack => "pack",
        }
    }
}

/// The stages [`compile`] runs for `source` and `options`, in order.
pub fn stages(source: &Source, options: &Options) -> Vec<Stage> {
    let mut s = vec![Stage::Build];
    if source.spec().is_some() {
        s.extend(passes::PASSES.iter().map(|p| Stage::Pass(p.name)));
    }
    s.extend([Stage::Kernels, Stage::PlanMemory, Stage::Lower]);
    // The PTX first: ptxas checks it while the CPU library is made.
    if options.targets.gpu() {
        s.push(Stage::EmitGpu);
    }
    if options.targets.cpu() {
        s.push(Stage::EmitCpu);
    }
    s.push(Stage::Pack);
    s
}

/// What a stage produced, for printing.
pub enum Dump<'a> {
    /// The graph (after `build` and after each pass).
    Graph(&'a Graph),
    Kernels(&'a KernelPlan),
    Memory(&'a MemoryPlan),
    /// The lowered module of each target.
    Mlir(&'a [LoweredModule]),
    /// The packed entry points of the CPU library.
    Library {
        bytes: usize,
        symbols: Vec<String>,
    },
    Ptx(&'a str),
    /// `manifest.json`.
    Manifest(&'a str),
}

impl Dump<'_> {
    pub fn render(&self) -> String {
        match self {
            Dump::Graph(g) => kiln_ir::print(g),
            Dump::Kernels(plan) => print_kernels(plan),
            Dump::Memory(m) => m.print(),
            Dump::Mlir(modules) => {
                modules.iter().map(|m| format!("// target: {}\n{}", m.target, m.text())).collect()
            }
            Dump::Library { bytes, symbols } => {
                let mut s =
                    format!("{}: {bytes} bytes, {} entry points\n", artifact::KERNELS_SO, symbols.len());
                for sym in symbols {
                    let _ = writeln!(s, "  {sym}");
                }
                s
            }
            Dump::Ptx(ptx) => ptx.to_string(),
            Dump::Manifest(json) => json.to_string(),
        }
    }
}

/// The kernels (signature and launch count) and the steps of a plan.
fn print_kernels(plan: &KernelPlan) -> String {
    let mut uses = vec![0usize; plan.kernels.len()];
    for s in &plan.steps {
        if let Step::Launch { kernel, .. } = s {
            uses[kernel.index()] += 1;
        }
    }
    let mut out = String::new();
    for k in &plan.kernels {
        let list =
            |ts: &[kiln_ir::TensorType]| ts.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
        let scratch = match k.scratch.as_slice() {
            [] => String::new(),
            s => format!(" scratch ({})", list(s)),
        };
        let _ = writeln!(
            out,
            "{} {} x{} ({}) -> {}{scratch}",
            k.id,
            k.name,
            uses[k.id.index()],
            list(&k.args),
            list(&k.results)
        );
    }
    let vals = |vs: &[kiln_ir::ValueId]| vs.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
    for s in &plan.steps {
        let _ = match s {
            Step::Launch { kernel, args, results, .. } => {
                writeln!(out, "  launch {kernel} ({}) -> {}", vals(args), vals(results))
            }
            Step::Alias { result, source, .. } => writeln!(out, "  alias {result} = {source}"),
            Step::Runtime { node } => writeln!(out, "  runtime {node}"),
        };
    }
    out
}

/// Watches the pipeline. Both methods do nothing unless overridden.
pub trait Observer {
    /// `stage` is about to run.
    fn started(&mut self, _stage: Stage) {}
    /// `stage` finished and produced `dump`.
    fn finished(&mut self, _stage: Stage, _dump: &Dump<'_>) {}
    /// Whether the pass called `pass` runs (`kiln compile --disable-pass`); a skipped pass is
    /// neither started nor finished.
    fn runs_pass(&mut self, _pass: &str) -> bool {
        true
    }
}

impl Observer for () {}

/// Why a compile failed. Everything but [`CompileError::Internal`] and a failing `EmitError` is a
/// problem with the input or the machine; those two are kiln bugs.
#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    #[error("{0}")]
    Options(String),
    #[error("ptxas is needed to compile for {arch} but was not found{where_}: run scripts/setup.sh (it installs ptxas into tools/local/bin) or set KILN_PTXAS to its path")]
    NoPtxas { arch: &'static str, where_: String },
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error(transparent)]
    Invalid(#[from] VerifyError),
    #[error("internal error: the module kiln built is invalid (a kiln bug; please report it): {0}")]
    Module(#[from] ModuleError),
    #[error(transparent)]
    Pass(#[from] PassError),
    #[error(transparent)]
    Form(#[from] FormError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Lower(#[from] LowerError),
    #[error(transparent)]
    Emit(#[from] EmitError),
    /// ptxas rejected the PTX (a kiln bug) or could not run; or the host target is unusable.
    #[error(transparent)]
    Toolchain(#[from] ToolchainError),
    #[error(transparent)]
    Parallel(#[from] crate::schedule::PlanError),
    #[error("internal error: {0} (a kiln bug; please report it)")]
    Internal(String),
}

/// The result of the pure stages: everything but machine code.
pub struct Prepared {
    pub spec: Option<ModelSpec>,
    /// The module after the pass pipeline: its programs, parameters and states.
    pub module: Module,
    /// The kernels and memory of each program of [`Prepared::module`], in the same order. Every
    /// plan has the same kernels (one set, formed over all the programs).
    pub programs: Vec<PreparedProgram>,
    pub cpu: Option<LoweredModule>,
    pub gpu: Option<LoweredModule>,
    /// The parallel plan, when [`Options::parallel`] asked for one.
    pub parallel: Option<ParallelPlan>,
    ptxas: Option<PathBuf>,
}

/// One program of a [`Prepared`] module.
pub struct PreparedProgram {
    pub plan: KernelPlan,
    pub memory: MemoryPlan,
}

impl Prepared {
    /// The first program's graph after the passes (the prefill, or the forward graph).
    pub fn graph(&self) -> &Graph {
        &self.module.programs[0].graph
    }

    /// The first program's kernel plan (its kernels are every program's).
    pub fn plan(&self) -> &KernelPlan {
        &self.programs[0].plan
    }

    /// The first program's memory plan.
    pub fn memory(&self) -> &MemoryPlan {
        &self.programs[0].memory
    }

    /// The program called `name`, with its plans.
    pub fn program(&self, name: &str) -> Option<(&Program, &PreparedProgram)> {
        let i = self.module.programs.iter().position(|p| p.name == name)?;
        Some((&self.module.programs[i], &self.programs[i]))
    }
}

/// A compiled artifact, in memory.
pub struct Artifact {
    pub manifest: Manifest,
    /// `manifest.json` as written.
    pub manifest_json: String,
    /// The other files, `(name, contents)`, in the order of [`Manifest::files`].
    pub files: Vec<(String, Vec<u8>)>,
    /// Per-kernel resource use from `ptxas -v`, when the GPU target was compiled.
    pub ptxas: Option<BTreeMap<String, PtxasStats>>,
    /// What came from the kernel cache ([`cache`]).
    pub kernel_cache: cache::Report,
    /// What each kernel compiled (not found in the cache) cost to emit, CPU kernels then GPU ones,
    /// each in kernel order.
    pub kernel_times: Vec<KernelTime>,
    pub prepared: Prepared,
}

/// Runs `stage`, telling the observer before and after.
fn stage<T>(
    obs: &mut dyn Observer,
    stage: Stage,
    run: impl FnOnce() -> Result<T, CompileError>,
    dump: impl FnOnce(&T) -> Dump<'_>,
) -> Result<T, CompileError> {
    obs.started(stage);
    let out = run()?;
    obs.finished(stage, &dump(&out));
    Ok(out)
}

/// Finds ptxas, or says how to install it.
fn require_ptxas() -> Result<PathBuf, CompileError> {
    match toolchain::find_ptxas() {
        Some(p) if p.is_file() => Ok(p),
        Some(p) => Err(CompileError::NoPtxas { arch: gpu::SM, where_: format!(" at {}", p.display()) }),
        None => Err(CompileError::NoPtxas { arch: gpu::SM, where_: String::new() }),
    }
}

/// Runs `build` and the passes for the first program only (`kiln compile --print-after`): its graph
/// and the spec, if any.
pub fn make_graph(
    source: Source,
    options: &Options,
    obs: &mut dyn Observer,
) -> Result<(Graph, Option<ModelSpec>), CompileError> {
    let (mut module, spec) = make_module(source, &Options { score: false, ..*options }, obs)?;
    Ok((module.programs.swap_remove(0).graph, spec))
}

/// The module a spec builds to under `options`, before the passes: the prefill and decode programs
/// over a KV cache (or the stateless forward graph, with the MTP heads), and the `score` program.
/// Adding a program kind is one builder function and one line here.
pub fn build_module(spec: &ModelSpec, options: &Options) -> Result<Module, CompileError> {
    let mut module = Module::new(spec.model.name.clone());
    // A training artifact holds the train step alone: its weights are states it updates, which
    // inference programs would read as parameters (a name is one or the other in a module);
    // inference runs from the checkpoints training writes.
    if let Some(t) = &options.train {
        // A pipeline's stages are cut from the accumulate program (`crate::pipeline`).
        let accumulate = t.accumulate || options.parallel.is_some();
        let programs = crate::train::program(
            spec,
            &t.losses,
            &t.optimizer,
            accumulate,
            t.data_parallel,
            t.expert_parallel,
        )
        .map_err(|e| CompileError::Options(e.to_string()))?;
        let graph = programs.step;
        module.programs.push(Program { name: "train_step".into(), kind: ProgramKind::TrainStep, graph });
        if let Some(graph) = programs.accumulate {
            module.programs.push(Program { name: "accumulate".into(), kind: ProgramKind::Accumulate, graph });
        }
        module.states.extend(programs.states);
        return Ok(module);
    }
    let mut add = |name: &str, kind: ProgramKind, graph: Graph| {
        module.programs.push(Program { name: name.to_string(), kind, graph });
    };
    if options.kv_cache && options.speculative {
        let prefill = match options.last_logits {
            true => build_prefill_last(spec, true)?,
            false => build_speculative(spec, Phase::Prefill)?,
        };
        add("prefill", ProgramKind::Prefill, prefill);
        add("decode", ProgramKind::Decode, build_speculative(spec, Phase::Decode)?);
        add("draft", ProgramKind::Draft, build_draft(spec)?);
    } else if options.kv_cache {
        let prefill = match options.last_logits {
            true => build_prefill_last(spec, false)?,
            false => build_cached(spec, Phase::Prefill)?,
        };
        add("prefill", ProgramKind::Prefill, prefill);
        add("decode", ProgramKind::Decode, build_cached(spec, Phase::Decode)?);
    } else {
        add("forward", ProgramKind::Forward, build_graph(spec)?);
    }
    if options.score {
        add("score", ProgramKind::Score, build_score(spec)?);
    }
    // Expert parallelism without a pipeline: every program's copy with one rank's share of the
    // routed experts (`crate::expert_parallel`), beside the whole programs, and the state that
    // tells the copy its rank.
    if let Some(Parallel { pp: 1, ep: Some(ep), .. }) =
        options.parallel.filter(|p| p.ep.is_some_and(|e| e > 1))
    {
        use crate::expert_parallel as ep_split;
        let whole = module.programs.clone();
        for p in &whole {
            let split = ep_split::split(&p.graph, ep).map_err(|e| CompileError::Options(e.to_string()))?;
            if let Some((graph, _)) = split {
                module.programs.push(Program { name: ep_split::ep_program(&p.name), kind: p.kind, graph });
            }
        }
        let ty = kiln_ir::TensorType::scalar(kiln_ir::DType::F32);
        module.states.push(StateDecl { name: ep_split::EP_RANK.into(), ty, role: StateRole::Counter });
    }
    Ok(module)
}

/// The KV caches of a program: each input whose only reader is a `cache_update` of it, with the
/// update's result output under the input's name (what [`build_cached`] and `fuse-mla-latent`
/// make). The builders declare no other state today.
pub fn cache_states(g: &Graph) -> Vec<StateDecl> {
    let inputs = g.inputs();
    let mut out = Vec::new();
    for n in g.nodes() {
        let node = g.node(n);
        if !matches!(node.op, Op::CacheUpdate) {
            continue;
        }
        let Some(&(name, v)) = inputs.iter().find(|&&(_, v)| v == node.inputs[0]) else { continue };
        if g.output(name) == Some(node.results[0]) {
            out.push(StateDecl { name: name.to_string(), ty: g.ty(v).clone(), role: StateRole::KvCache });
        }
    }
    out
}

/// Declares the module's parameters (every `param` node of every program, first-seen order) and
/// states (every program's KV caches), and verifies it.
fn declare(module: &mut Module) -> Result<(), CompileError> {
    module.params.clear();
    // The KV caches are found again (passes rename them); the other states are the builders'.
    module.states.retain(|s| s.role != StateRole::KvCache);
    module.declare_params_from_programs()?;
    let caches: Vec<Vec<StateDecl>> = module.programs.par_iter().map(|p| cache_states(&p.graph)).collect();
    for s in caches.into_iter().flatten() {
        if !module.states.iter().any(|d| d.name == s.name) {
            module.states.push(s);
        }
    }
    // The graphs at once (verify_module would verify them one after another), then the rest of
    // the module's invariants.
    let graphs: Vec<Result<(), VerifyError>> = module.programs.par_iter().map(|p| verify(&p.graph)).collect();
    for (p, r) in module.programs.iter().zip(graphs) {
        r.map_err(|error| ModuleError::Graph { program: p.name.clone(), error })?;
    }
    verify_declarations(module)?;
    Ok(())
}

/// The module a spec builds to under `options`, as built or after the pass pipeline up to and
/// including the pass `last`, with its parameters and states declared: what
/// `kiln ir --module [--after PASS]` prints.
pub fn module_after(spec: &ModelSpec, options: &Options, last: Option<&str>) -> Result<Module, CompileError> {
    let mut module = build_module(spec, options)?;
    let Some(last) = last else {
        declare(&mut module)?;
        return Ok(module);
    };
    passes::find(last)?;
    for pass in passes::PASSES {
        run_on_programs(&mut module, pass, spec, options)?;
        if pass.name == last {
            break;
        }
    }
    declare(&mut module)?;
    Ok(module)
}

/// Runs one pass on every program of the module, each with its kind, the programs in parallel (a
/// pass sees one graph and nothing else, so they are independent); the first failure in program
/// order is the error.
fn run_on_programs(
    module: &mut Module,
    pass: &passes::PassInfo,
    spec: &ModelSpec,
    options: &Options,
) -> Result<(), CompileError> {
    let results: Vec<Result<passes::Changed, PassError>> = (module.programs.par_iter_mut())
        .map(|p| {
            let opts = passes::Options { spec, kind: p.kind, targets: options.targets };
            passes::run_pass(&mut p.graph, pass, &opts)
        })
        .collect();
    for r in results {
        r?;
    }
    Ok(())
}

/// Runs `build` and the passes on every program: the module kernels are formed from, and the spec,
/// if any. The observer sees the stages of the first program (the others go through the same).
pub fn make_module(
    source: Source,
    options: &Options,
    obs: &mut dyn Observer,
) -> Result<(Module, Option<ModelSpec>), CompileError> {
    let (mut module, spec) = stage(
        obs,
        Stage::Build,
        || match source {
            Source::Spec(spec) => Ok((build_module(&spec, options)?, Some(spec))),
            Source::Graph { graph, spec } => {
                verify(&graph)?;
                let mut module = Module::new(graph.name().to_string());
                module.programs.push(Program {
                    name: "forward".into(),
                    kind: ProgramKind::Forward,
                    graph: *graph,
                });
                Ok((module, spec))
            }
        },
        |(m, _)| Dump::Graph(&m.programs[0].graph),
    )?;
    if let Some(spec) = &spec {
        for pass in passes::PASSES {
            // A pipeline's programs are cut on the final graph, before kernels are formed.
            if pass.name == FUSE_KERNELS_PASS {
                cut_into_stages(&mut module, spec, options)?;
            }
            if !obs.runs_pass(pass.name) {
                continue;
            }
            obs.started(Stage::Pass(pass.name));
            run_on_programs(&mut module, pass, spec, options)?;
            obs.finished(Stage::Pass(pass.name), &Dump::Graph(&module.programs[0].graph));
        }
    }
    declare(&mut module)?;
    Ok((module, spec))
}

const FUSE_KERNELS_PASS: &str = "fuse-kernels";

/// With `--train` and `--pp`, replaces the train step's programs by the pipeline's
/// ([`crate::pipeline`]): each stage's forward, backward and weight programs, cut from the
/// `accumulate` program, and each rank's optimizer step over the parameters of its stages.
fn cut_into_stages(module: &mut Module, spec: &ModelSpec, options: &Options) -> Result<(), CompileError> {
    use crate::pipeline::{self, Cut};
    let (Some(t), Some(_)) = (&options.train, options.parallel) else { return Ok(()) };
    if module.programs.iter().any(|p| p.name.starts_with("stage.")) {
        return Ok(());
    }
    let plan = parallel_plan(Some(spec), options)?.ok_or_else(|| CompileError::Options("no plan".into()))?;
    if plan.ep > 1 && t.expert_parallel != Some(u64::from(plan.ep)) {
        return Err(CompileError::Options(format!(
            "--train --pp --ep {}: the train step was built for {} expert-parallel ranks",
            plan.ep,
            t.expert_parallel.unwrap_or(1)
        )));
    }
    // Expert parallelism alone: the step itself, one of the ranks' (`crate::expert_parallel`).
    if plan.pp == 1 && plan.ep > 1 {
        return Ok(());
    }
    let acc = (module.programs.iter())
        .find(|p| p.kind == ProgramKind::Accumulate)
        .ok_or_else(|| CompileError::Options("internal error: no accumulate program to cut".into()))?;
    let states: std::collections::HashSet<&str> = module.states.iter().map(|s| s.name.as_str()).collect();
    let cut = Cut { stages: &plan.stages, layers: spec.model.num_hidden_layers };
    let parts =
        pipeline::split(&acc.graph, &cut, &states).map_err(|e| CompileError::Options(e.to_string()))?;
    let mut programs: Vec<Program> = (parts.into_iter())
        .map(|sp| Program {
            name: pipeline::program_name(sp.stage, sp.phase),
            kind: ProgramKind::Accumulate,
            graph: sp.graph,
        })
        .collect();
    for r in &plan.ranks {
        let held = |name: &str| cut.of_name(name).is_some_and(|s| r.stages.contains(&s));
        let params: Vec<(String, kiln_ir::TensorType)> = (module.states.iter())
            .filter(|s| s.role == StateRole::Trainable && held(&s.name))
            .map(|s| (s.name.clone(), s.ty.clone()))
            .collect();
        let mut routers = Vec::new();
        for s in &module.states {
            let Some(scope) = s.name.strip_prefix(crate::build::LOAD_ACC_PREFIX) else { continue };
            if !held(&s.name) {
                continue;
            }
            let bias = (module.states.iter())
                .find(|b| b.role == StateRole::RoutingBias && b.name.starts_with(&format!("{scope}.")))
                .map(|b| b.name.clone());
            let experts = s.ty.known_numel().unwrap_or(0);
            routers.push(crate::train::StageRouter { scope: scope.to_string(), bias, experts });
        }
        let head = r.stages.iter().any(|&s| plan.stages[s as usize].head);
        // DualPipe holds every stage twice (one copy per direction): each rank's sums count twice.
        let copies = plan.lists.lanes.len() as u32;
        let graph = crate::train::pipeline_update(
            &params,
            &routers,
            head,
            copies,
            &t.optimizer,
            t.losses.bias_update_speed,
            t.data_parallel || t.expert_parallel.is_some_and(|e| e > 1),
            t.expert_parallel,
        )
        .map_err(|e| CompileError::Options(e.to_string()))?;
        programs.push(Program { name: pipeline::update_name(r.rank), kind: ProgramKind::TrainStep, graph });
    }
    module.programs = programs;
    Ok(())
}

/// A module after the passes, with its kernels and memory: everything [`prepare`] makes but the
/// lowered kernels (`kiln inspect --train` reads no more).
pub struct Planned {
    pub spec: Option<ModelSpec>,
    pub module: Module,
    /// The plans of each program of [`Planned::module`], in the same order.
    pub programs: Vec<PreparedProgram>,
    pub parallel: Option<ParallelPlan>,
}

/// Runs [`make_module`], kernel formation and the memory plan.
pub fn plan(source: Source, options: &Options, obs: &mut dyn Observer) -> Result<Planned, CompileError> {
    if options.max_batch == 0 || options.max_context == 0 {
        return Err(CompileError::Options("the maximum batch and context must be at least 1".into()));
    }
    let parallel = parallel_plan(source.spec(), options)?;
    let (module, spec) = make_module(source, options, obs)?;
    let plans = stage(
        obs,
        Stage::Kernels,
        || {
            let graphs: Vec<&Graph> = module.programs.iter().map(|p| &p.graph).collect();
            Ok(form_programs(&graphs)?)
        },
        |plans| Dump::Kernels(&plans[0]),
    )?;
    let state_names: Vec<&str> = module.states.iter().map(|s| s.name.as_str()).collect();
    let memories = stage(
        obs,
        Stage::PlanMemory,
        || {
            (module.programs.par_iter().zip(&plans))
                .map(|(p, plan)| plan_memory(&p.graph, plan, options.max_sizes_of(p.kind), &state_names))
                .collect::<Vec<_>>()
                .into_iter()
                .map(|r| Ok(r?))
                .collect::<Result<Vec<_>, CompileError>>()
        },
        |m| Dump::Memory(&m[0]),
    )?;
    let mut memories = memories;
    pair_arenas(&module, parallel.as_ref(), &mut memories);
    let programs: Vec<PreparedProgram> =
        plans.into_iter().zip(memories).map(|(plan, memory)| PreparedProgram { plan, memory }).collect();
    Ok(Planned { spec, module, programs, parallel })
}

/// A schedule that overlaps a forward chunk with a backward chunk (DualPipe's and DualPipeV's
/// pairs, run interleaved by the runtime's `Executor::run_pair`) needs both programs' activations
/// at once: each stage's backward-for-inputs program is laid out in the arena after every stage's
/// forward program, so that any forward and any backward are disjoint. Other schedules run one
/// program at a time and share the arena from its start.
fn pair_arenas(module: &Module, parallel: Option<&ParallelPlan>, memories: &mut [MemoryPlan]) {
    use crate::pipeline::Phase;
    use kiln_ir::schedule::Instr;
    let pairs = parallel.is_some_and(|p| {
        (p.lists.ranks.iter()).any(|l| l.iter().any(|i| matches!(i, Instr::ForwardBackward { .. })))
    });
    if !pairs {
        return;
    }
    let phase_of = |name: &str| -> Option<Phase> {
        let rest = name.strip_prefix("stage.")?;
        let (_, word) = rest.split_once('.')?;
        Phase::ALL.into_iter().find(|p| p.word() == word)
    };
    let forward_end = (module.programs.iter().zip(memories.iter()))
        .filter(|(p, _)| phase_of(&p.name) == Some(Phase::Forward))
        .map(|(_, m)| m.arena_bytes)
        .max()
        .unwrap_or(0);
    let base = forward_end.next_multiple_of(kiln_ir::artifact::ARENA_ALIGN);
    for (p, m) in module.programs.iter().zip(memories.iter_mut()) {
        if phase_of(&p.name) == Some(Phase::Backward) {
            m.place_after(base);
        }
    }
}

/// Runs the pure stages: [`plan`], then lowering.
pub fn prepare(source: Source, options: &Options, obs: &mut dyn Observer) -> Result<Prepared, CompileError> {
    if options.max_batch == 0 || options.max_context == 0 {
        return Err(CompileError::Options("the maximum batch and context must be at least 1".into()));
    }
    // Before any work: a missing tool or an impossible plan should not cost a whole compile.
    let ptxas = if options.targets.gpu() { Some(require_ptxas()?) } else { None };
    let Planned { spec, module, programs, parallel } = plan(source, options, obs)?;
    let kernels = &programs[0].plan.kernels;
    let modules = stage(
        obs,
        Stage::Lower,
        || {
            let mut modules = Vec::new();
            for (wanted, target) in
                [(options.targets.cpu(), Target::Cpu), (options.targets.gpu(), Target::Gpu)]
            {
                if wanted {
                    // Each kernel on its own, in parallel; the module keeps the kernels' order.
                    let lowered = (kernels.par_iter())
                        .map(|k| lower_kernel(k, target))
                        .collect::<Vec<_>>()
                        .into_iter()
                        .collect::<Result<Vec<_>, LowerError>>()?;
                    modules.push(LoweredModule { target, kernels: lowered });
                }
            }
            Ok(modules)
        },
        |m| Dump::Mlir(m),
    )?;
    let mut cpu = None;
    let mut gpu = None;
    for m in modules {
        match m.target {
            Target::Cpu => cpu = Some(m),
            Target::Gpu => gpu = Some(m),
        }
    }
    Ok(Prepared { spec, module, programs, cpu, gpu, parallel, ptxas })
}

/// The prefix of the private temporary directories the CPU library is linked in:
/// `kiln-pack-{pid}-{random}` in the system's temporary directory.
const LINK_DIR_PREFIX: &str = "kiln-pack-";

/// Links the CPU library in a private temporary directory and returns its bytes. The directories
/// that killed earlier compiles left there are removed first.
fn shared_library(module: &LoweredModule) -> Result<(Vec<u8>, cache::Use, Vec<KernelTime>), CompileError> {
    let (objects, used, times) = cache::objects(module)?;
    let temp = std::env::temp_dir();
    let link_error =
        |path: &std::path::Path, message: String| EmitError::Link { path: path.to_path_buf(), message };
    // Housekeeping of a shared directory, best effort: a failure there is not this compile's.
    let _ = kiln_ir::output::remove_stale(&temp, |name| kiln_ir::output::pid_after(name, LINK_DIR_PREFIX));
    let dir = tempfile::Builder::new()
        .prefix(&format!("{LINK_DIR_PREFIX}{}-", std::process::id()))
        .tempdir()
        .map_err(|e| link_error(&temp, e.to_string()))?;
    let path = dir.path().join(artifact::KERNELS_SO);
    let bytes = cpu::link_objects(&objects, &path)
        .and_then(|()| std::fs::read(&path).map_err(|e| link_error(&path, e.to_string())));
    Ok((bytes?, used, times))
}

/// SHA-256 as 64 lowercase hex digits.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// `kernels.mlir`: the MLIR of every lowered target, as one module that MLIR parses.
pub fn kernels_mlir(p: &Prepared) -> String {
    combined_mlir(p.cpu.as_ref(), p.gpu.as_ref())
}

/// Both targets' MLIR as one module: the CPU `func.func`s and the `gpu.module` side by side (their
/// symbol tables are separate, so the shared kernel names do not clash).
fn combined_mlir(cpu: Option<&LoweredModule>, gpu: Option<&LoweredModule>) -> String {
    match (cpu, gpu) {
        (Some(c), Some(g)) => format!(
            "module attributes {{gpu.container_module}} {{\n{}{}\n  gpu.module @{} {{\n{}  }}\n}}\n",
            c.globals(),
            c.funcs(),
            crate::codegen::lower::GPU_MODULE,
            g.funcs()
        ),
        (Some(m), None) | (None, Some(m)) => m.text(),
        (None, None) => String::new(),
    }
}

/// Runs the emit stages and packs the artifact.
pub fn emit(prepared: Prepared, options: &Options, obs: &mut dyn Observer) -> Result<Artifact, CompileError> {
    // The PTX is made first, so that ptxas (a process of its own) checks it while the CPU library
    // is made; the texts of module.kir and kernels.mlir and the manifest (all but its list of
    // files) are made on the pool beside both. Two cores then stay busy to the end.
    let threads = rayon::current_num_threads();
    let host = match &prepared.cpu {
        Some(_) => Some(toolchain::probe_host()?),
        None => None,
    };
    // module.kir and kernels.mlir, each with its SHA-256.
    let mut texts: Option<((String, String), (String, String))> = None;
    let mut manifest_result: Option<Result<Manifest, CompileError>> = None;
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    let mut report = None;
    let mut kernel_cache = cache::Report::default();
    let (mut cpu_times, mut gpu_times) = (Vec::new(), Vec::new());
    let p = &prepared;
    rayon::in_place_scope(|s| -> Result<(), CompileError> {
        let out = &mut texts;
        let hashed = |text: String| {
            let sha = sha256_hex(text.as_bytes());
            (text, sha)
        };
        s.spawn(move |_| {
            *out = Some(rayon::join(|| hashed(kiln_ir::print_module(&p.module)), || hashed(kernels_mlir(p))))
        });
        let (out, host) = (&mut manifest_result, host.clone());
        s.spawn(move |_| *out = Some(manifest(p, options, host, Vec::new())));
        let ptx = match (&p.gpu, &p.ptxas) {
            (Some(module), Some(tool)) => {
                let ((ptx, used, times), checked) = stage(
                    obs,
                    Stage::EmitGpu,
                    || {
                        let ptx = cache::ptx(module)?;
                        // With a CPU library to make, ptxas runs beside it instead (emit-cpu).
                        let checked = match p.cpu {
                            Some(_) => None,
                            None => Some(cache::ptxas_check(tool, &ptx.0, gpu::SM, threads)?),
                        };
                        Ok((ptx, checked))
                    },
                    |((ptx, _, _), _)| Dump::Ptx(ptx),
                )?;
                kernel_cache.gpu = Some(used);
                gpu_times = times;
                report = checked;
                Some((ptx, tool))
            }
            _ => None,
        };
        if let Some(module) = &p.cpu {
            let (so, checked) = stage(
                obs,
                Stage::EmitCpu,
                || {
                    std::thread::scope(|t| {
                        let check = (ptx.as_ref()).map(|(ptx, tool)| {
                            t.spawn(move || cache::ptxas_check(tool, ptx, gpu::SM, threads))
                        });
                        let so = shared_library(module);
                        let checked =
                            check.map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)));
                        Ok((so?, checked.transpose()?))
                    })
                },
                |((so, _, _), _)| Dump::Library {
                    bytes: so.len(),
                    symbols: (module.kernels.iter())
                        .map(|k| format!("{}{}", k.name, cpu::PACKED_SUFFIX))
                        .collect(),
                },
            )?;
            if checked.is_some() {
                report = checked;
            }
            let (so, used, times) = so;
            kernel_cache.cpu = Some(used);
            cpu_times = times;
            files.push((artifact::KERNELS_SO.into(), so));
        }
        if let Some((ptx, _)) = ptx {
            files.push((artifact::KERNELS_PTX.into(), ptx.into_bytes()));
        }
        Ok(())
    })?;
    kernel_cache.ptxas_found = report.as_ref().map(|&(_, found)| found);
    let ptxas = report.map(|(r, _)| parse_report(&r));
    obs.started(Stage::Pack);
    let missing = |what: &str| CompileError::Internal(format!("{what} was not made"));
    let ((kir, kir_sha), (mlir, mlir_sha)) = texts.ok_or_else(|| missing("module.kir"))?;
    let mut manifest = manifest_result.ok_or_else(|| missing("the manifest"))??;
    let entry = |name: &str, bytes: &[u8], sha256: String| FileEntry {
        name: name.to_string(),
        sha256,
        bytes: bytes.len() as u64,
    };
    // The libraries are small; the two texts were hashed on the pool as they were made.
    manifest.files = files.iter().map(|(name, bytes)| entry(name, bytes, sha256_hex(bytes))).collect();
    manifest.files.push(entry(artifact::MODULE_KIR, kir.as_bytes(), kir_sha));
    manifest.files.push(entry(artifact::KERNELS_MLIR, mlir.as_bytes(), mlir_sha));
    files.push((artifact::MODULE_KIR.into(), kir.into_bytes()));
    files.push((artifact::KERNELS_MLIR.into(), mlir.into_bytes()));
    // The check and the text side by side: a manifest that fails the check is not written.
    let (checked, manifest_json) = rayon::join(|| manifest.validate(), || manifest_text(&manifest));
    checked.map_err(|e| CompileError::Internal(format!("the manifest kiln made is invalid: {e}")))?;
    let manifest_json = manifest_json?;
    obs.finished(Stage::Pack, &Dump::Manifest(&manifest_json));
    let kernel_times = cpu_times.into_iter().chain(gpu_times).collect();
    Ok(Artifact { manifest, manifest_json, files, ptxas, kernel_cache, kernel_times, prepared })
}

/// Runs the whole pipeline: [`prepare`], then [`emit`].
pub fn compile(source: Source, options: &Options, obs: &mut dyn Observer) -> Result<Artifact, CompileError> {
    let prepared = prepare(source, options, obs)?;
    emit(prepared, options, obs)
}

/// `manifest.json`: one top-level field per line and one element per line in the lists (a kernel, a
/// step, a buffer), so that a manifest reads and diffs line by line and stays a fraction of the size
/// of fully indented JSON. Fields keep their declaration order.
fn manifest_text(m: &Manifest) -> Result<String, CompileError> {
    json_lines(m, 1)
}

/// The JSON of a parallel plan (`kiln compile --emit plan`) in the layout of `manifest.json` one
/// level deeper: a field of the plan per line, and of its `lists` and `experts`; a stage, a rank, a
/// rank's list, a MoE layer per line.
pub fn plan_json(plan: &ParallelPlan) -> Result<String, CompileError> {
    json_lines(plan, 2)
}

/// `value` as JSON with the fields of objects down to depth `levels` (the top one is depth 1) and
/// the elements of the lists in them each on a line of their own, everything deeper compact.
fn json_lines(value: &impl serde::Serialize, levels: usize) -> Result<String, CompileError> {
    let mut out = Vec::new();
    let mut ser =
        serde_json::Serializer::with_formatter(&mut out, Lines { levels, depth: 0, items: Vec::new() });
    value.serialize(&mut ser).map_err(|e| CompileError::Internal(format!("serialising JSON: {e}")))?;
    out.push(b'\n');
    String::from_utf8(out).map_err(|e| CompileError::Internal(format!("the JSON is not UTF-8: {e}")))
}

/// The layout of [`json_lines`]: objects at depth `1..=levels` have a field per line, lists at depth
/// `2..=levels + 1` an element per line, indented two spaces a level.
struct Lines {
    levels: usize,
    depth: usize,
    /// For each open list, whether it has elements so far (so its `]` goes on a line of its own).
    items: Vec<bool>,
}

impl Lines {
    fn newline<W: ?Sized + std::io::Write>(w: &mut W, depth: usize) -> std::io::Result<()> {
        w.write_all(b"\n")?;
        w.write_all(&b" ".repeat(2 * depth))
    }

    fn broken_list(&self) -> bool {
        (2..=self.levels + 1).contains(&self.depth)
    }
}

impl serde_json::ser::Formatter for Lines {
    fn begin_object<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.depth += 1;
        w.write_all(b"{")
    }

    fn end_object<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.depth -= 1;
        if self.depth < self.levels {
            Self::newline(w, self.depth)?;
        }
        w.write_all(b"}")
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if !first {
            w.write_all(b",")?;
        }
        if self.depth <= self.levels {
            Self::newline(w, self.depth)?;
        }
        Ok(())
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(if self.depth <= self.levels { b": " } else { b":" })
    }

    fn begin_array<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.depth += 1;
        self.items.push(false);
        w.write_all(b"[")
    }

    fn end_array<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        let had_items = self.items.pop().unwrap_or(false);
        if self.broken_list() && had_items {
            Self::newline(w, self.depth - 1)?;
        }
        self.depth -= 1;
        w.write_all(b"]")
    }

    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if !first {
            w.write_all(b",")?;
        }
        if let Some(items) = self.items.last_mut() {
            *items = true;
        }
        if self.broken_list() {
            Self::newline(w, self.depth)?;
        }
        Ok(())
    }
}

/// The manifest of a prepared module whose files are `files`.
fn manifest(
    p: &Prepared,
    options: &Options,
    host: Option<(String, String)>,
    files: Vec<FileEntry>,
) -> Result<Manifest, CompileError> {
    let lowered = |module: &Option<LoweredModule>| -> HashMap<String, LaunchShape> {
        module.iter().flat_map(|m| &m.kernels).map(|k| (k.name.clone(), k.launch.clone())).collect()
    };
    let (cpu_launch, gpu_launch) = (lowered(&p.cpu), lowered(&p.gpu));
    let kernels_of = &p.plan().kernels;

    // An argument is a weight when every launch, in every program, binds it to a parameter.
    let mut weight: Vec<Vec<bool>> = kernels_of.iter().map(|k| vec![true; k.args.len()]).collect();
    for prog in &p.programs {
        for s in &prog.plan.steps {
            if let Step::Launch { kernel, args, .. } = s {
                for (w, &a) in weight[kernel.index()].iter_mut().zip(args) {
                    *w &= prog.memory.buffers[prog.memory.buffer(a).index()].kind == BufferKind::Param;
                }
            }
        }
    }
    let missing = |name: &str, target: Target| {
        CompileError::Internal(format!("kernel `{name}` has no {target} launch shape after lowering"))
    };
    // Each kernel's label: the fusion rule or op of the first node that launches it.
    let mut label: Vec<Option<String>> = vec![None; kernels_of.len()];
    for (graph, prog) in p.module.programs.iter().map(|m| &m.graph).zip(&p.programs) {
        for s in &prog.plan.steps {
            if let Step::Launch { kernel, node, .. } = s {
                label[kernel.index()].get_or_insert_with(|| match &graph.node(*node).op {
                    Op::Fused { name, .. } => name.clone(),
                    op => op.name().to_string(),
                });
            }
        }
    }
    let mut kernels = Vec::with_capacity(kernels_of.len());
    for k in kernels_of {
        let role = |i: usize| if weight[k.id.index()][i] { ArgRole::Param } else { ArgRole::Input };
        let args = (k.args.iter().enumerate().map(|(i, t)| (t, role(i))))
            .chain(k.results.iter().map(|t| (t, ArgRole::Output)))
            .chain(k.scratch.iter().map(|t| (t, ArgRole::Scratch)))
            .map(|(t, role)| ArgSig { dtype: t.dtype, shape: t.shape.clone(), role })
            .collect();
        let cpu = match (&p.cpu, cpu_launch.get(&k.name)) {
            (None, _) => None,
            (Some(_), Some(LaunchShape::Cpu { work })) => Some(CpuKernel {
                symbol: format!("{}{}", k.name, artifact::PACKED_SUFFIX),
                work: *work,
                phases: Vec::new(),
            }),
            (Some(_), Some(LaunchShape::CpuPhases { phases })) => Some(CpuKernel {
                symbol: format!("{}{}", k.name, artifact::PACKED_SUFFIX),
                work: kiln_ir::Dim::known(0),
                phases: phases.clone(),
            }),
            (Some(_), _) => return Err(missing(&k.name, Target::Cpu)),
        };
        let gpu = match (&p.gpu, gpu_launch.get(&k.name)) {
            (None, _) => None,
            (Some(_), Some(LaunchShape::Gpu { grid, block })) => Some(GpuKernel {
                entry: k.name.clone(),
                grid: grid.map(|d| GridAxis { work: d.work, per_block: d.per_block }),
                block: *block,
                shared_mem_bytes: 0,
            }),
            (Some(_), _) => return Err(missing(&k.name, Target::Gpu)),
        };
        kernels.push(KernelEntry {
            id: KernelIndex(k.id.index() as u32),
            name: k.name.clone(),
            label: label[k.id.index()].clone(),
            args,
            sym_args: k.syms.clone(),
            cpu,
            gpu,
        });
    }
    let params = p
        .module
        .params
        .iter()
        .map(|d: &ParamDecl| ParamEntry {
            name: d.name.clone(),
            dtype: d.ty.dtype,
            shape: d.ty.shape.clone(),
        })
        .collect();
    let states = p
        .module
        .states
        .iter()
        .map(|d| StateEntry {
            name: d.name.clone(),
            dtype: d.ty.dtype,
            shape: d.ty.shape.clone(),
            role: d.role,
        })
        .collect();
    let programs = (p.module.programs.iter().zip(&p.programs))
        .map(|(prog, pp)| program(prog, &pp.plan, &pp.memory, options.max_sizes_of(prog.kind)))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Manifest {
        format_version: artifact::FORMAT_VERSION,
        kiln_version: env!("CARGO_PKG_VERSION").to_string(),
        model: p.spec.clone(),
        name: p.module.name.clone(),
        cpu: host.map(|(triple, cpu)| CpuTarget { triple, cpu, library: artifact::KERNELS_SO.into() }),
        gpu: p.gpu.as_ref().map(|_| GpuTarget { arch: gpu::SM.into(), module: artifact::KERNELS_PTX.into() }),
        kernels,
        params,
        states,
        programs,
        files,
        train: options.train.map(|t| artifact::TrainEntry {
            mtp_lambda: t.losses.mtp_lambda,
            balance_alpha: t.losses.balance_alpha,
            bias_update_speed: t.losses.bias_update_speed,
            beta1: t.optimizer.beta1,
            beta2: t.optimizer.beta2,
            eps: t.optimizer.eps,
            weight_decay: t.optimizer.weight_decay,
            clip: t.optimizer.clip,
            moments: t.optimizer.moments,
            token_weights: t.losses.token_weights,
        }),
        parallel: p.parallel.clone(),
    })
}

/// The parallel plan [`Options::parallel`] asks for ([`crate::schedule::plan`]), for the compile's
/// sizes: attention costed at `max_context` tokens, and `max_batch · max_context` tokens (a run's
/// largest `B·T`) routed through each MoE layer together. `None` when none was asked for; an error
/// when one was but there is no spec to cut.
pub fn parallel_plan(
    spec: Option<&ModelSpec>,
    options: &Options,
) -> Result<Option<ParallelPlan>, CompileError> {
    let Some(p) = options.parallel else { return Ok(None) };
    let Some(spec) = spec else {
        return Err(CompileError::Options(
            "--pp cuts a model into pipeline stages, and a .kir graph without --spec has no model to cut"
                .into(),
        ));
    };
    let tokens = options.max_batch.checked_mul(options.max_context).ok_or_else(|| {
        CompileError::Options(format!(
            "--max-batch {} times --max-context {} tokens overflows 64 bits",
            options.max_batch, options.max_context
        ))
    })?;
    let req = crate::schedule::Request {
        kind: p.kind,
        pp: p.pp,
        ep: p.ep,
        micro_batches: p.micro_batches,
        seq_len: options.max_context,
        tokens,
    };
    Ok(Some(crate::schedule::plan(spec, &req)?))
}

/// One program of the manifest: steps, buffers, inputs and outputs, and what a runtime must know
/// of its structure (the inputs that index something, the MoE dispatches), found from the ops.
fn program(
    prog: &Program,
    plan: &KernelPlan,
    m: &MemoryPlan,
    max: SymBindings,
) -> Result<artifact::Program, CompileError> {
    let g = &prog.graph;
    let buf = |v| m.buffer(v);
    let mut steps = Vec::with_capacity(plan.steps.len());
    let mut step_of_node = HashMap::new();
    for (i, s) in plan.steps.iter().enumerate() {
        steps.push(match s {
            Step::Launch { kernel, node, args, results } => {
                step_of_node.insert(*node, i);
                artifact::Step::Launch {
                    kernel: KernelIndex(kernel.index() as u32),
                    buffers: args
                        .iter()
                        .chain(results)
                        .map(|&v| buf(v))
                        .chain(m.scratch[i].iter().copied())
                        .collect(),
                    scope: g.node(*node).scope.clone(),
                }
            }
            Step::Alias { result, source, .. } => {
                artifact::Step::Alias { buffer: buf(*result), source: buf(*source) }
            }
            Step::Runtime { node } => {
                let n = g.node(*node);
                match (&n.op, n.inputs.as_slice(), n.results.as_slice()) {
                    (Op::Send { peer, tag }, [v], _) => {
                        artifact::Step::Send { buffer: buf(*v), peer: *peer, tag: *tag }
                    }
                    (Op::Recv { peer, tag }, _, [v]) => {
                        artifact::Step::Recv { buffer: buf(*v), peer: *peer, tag: *tag }
                    }
                    (Op::AllReduce { group }, [x], [v]) => {
                        artifact::Step::AllReduce { buffer: buf(*v), source: buf(*x), group: group.clone() }
                    }
                    (Op::AllGather { group, size }, [x], [v]) => artifact::Step::AllGather {
                        buffer: buf(*v),
                        source: buf(*x),
                        group: group.clone(),
                        size: *size,
                    },
                    (Op::AllToAll { group, size }, [x, keep @ ..], [v]) if keep.len() <= 1 => {
                        artifact::Step::AllToAll {
                            buffer: buf(*v),
                            source: buf(*x),
                            keep: keep.first().map(|k| buf(*k)),
                            group: group.clone(),
                            size: *size,
                        }
                    }
                    (op, ..) => {
                        return Err(CompileError::Internal(format!("runtime step for `{}`", op.name())));
                    }
                }
            }
        });
    }
    let named = |(name, v): (&str, kiln_ir::ValueId)| NamedBuffer { name: name.to_string(), buffer: buf(v) };
    let used =
        |s: Sym| m.buffers.iter().any(|b| b.shape.iter().any(|&d| crate::codegen::kernel::has_sym(d, s)));
    let symbols =
        Sym::ALL.into_iter().filter(|&s| used(s)).map(|sym| SymbolEntry { sym, max: max.get(sym) }).collect();
    let outputs: Vec<NamedBuffer> = g.outputs().iter().map(|(n, v)| named((n.as_str(), *v))).collect();
    let moe_dispatches = structure::moe_dispatches(g, &step_of_node, buf);
    Ok(artifact::Program {
        name: prog.name.clone(),
        kind: prog.kind,
        symbols,
        steps,
        buffers: m.buffers.clone(),
        arena_bytes: m.arena_bytes,
        inputs: g.inputs().into_iter().map(named).collect(),
        outputs,
        index_inputs: structure::index_inputs(g),
        moe_dispatches,
    })
}
