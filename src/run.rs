//! `kiln run` and `kiln bench run`: generation from an artifact on the CPU backend (or the CUDA
//! backend, `--device cuda`; `--dump-logits` records the logits rows generation reads), or from a spec
//! (or an artifact's `module.kir`) on the reference interpreter, through the runtime's one
//! generation loop (`kiln_runtime::generate`).
//!
//! A directory is an artifact (`kiln compile -o DIR`); anything else is a model spec, which only
//! the interpreter runs (`--interp`; without it, [`not_an_artifact`] says what the path is): the graph keeps the MTP module, as artifacts do, so checkpoints
//! that carry it bind as they are (only the main logits are used). Weights come from a Hugging Face checkpoint folder or a seeded random
//! initialisation. An artifact compiled with a KV cache (the default) prefills the prompt and then
//! decodes one token per step over its cache; the interpreter recomputes the whole sequence.
//!
//! The output contract ([`Sink`]): standard output carries only what was generated: the decoded
//! text as it comes, or with a prompt of ids the new ids, comma-separated as `--prompt-ids` takes
//! them, in one line at the end (so that on a terminal they do not interleave with the per-token
//! lines); or with `--json` one JSON document at the end and nothing else. The header, each token's
//! logit and probability, the speeds, `--expert-load` (the rows each expert of each MoE layer
//! received) and `--profile` go to standard error; with `--json` the last two are in the document
//! too. So `kiln run ... > out.txt` keeps exactly the continuation.
//!
//! A prompt is token ids (`--prompt-ids`) or text (`--prompt`), which the `tokenizer.json` of the
//! weights folder encodes (`crate::tokenize`).
//!
//! A compiled artifact binds a checkpoint without copying what needs no conversion
//! (`weights::bind_mapped`): a tensor stored in its parameter's compiled dtype is read by the kernels
//! straight from the file's memory mapping. The report says how many parameter bytes were mapped
//! and how many converted.

use std::cell::RefCell;
use std::io::Write;
use std::ops::Range;
use std::path::Path;

use anyhow::{bail, Context, Result};

use kiln_compiler::{build, spec};
use kiln_ir::ModelSpec;
use kiln_runtime::artifact::{self, Artifact};
use kiln_runtime::cpu::{CpuModel, CpuOptions, LayerLoad};
use kiln_runtime::exec::{Backend, Executor};
use kiln_runtime::generate::{
    generate, generate_speculative, Engine, Flow, GenerateOptions, Generation, KvCache, Limits, Sampling,
    TokenEvent,
};
use kiln_runtime::gpu::{GpuModel, GpuOptions};
use kiln_runtime::reference::Reference;
use kiln_runtime::weights::{self, HostTensor, Param, ParamDecl, WeightError};
use kiln_runtime::RuntimeError;

use crate::dist::Dist;
use crate::tokenize::{self, TextStream, TextTokenizer};

/// Where the parameters come from.
pub enum Weights<'a> {
    Checkpoint(&'a Path),
    Random(u64),
}

/// Where an artifact runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Device {
    Cpu,
    Cuda,
}

/// Standard deviation of random weights: Hugging Face's default `initializer_range`.
pub(crate) const RANDOM_STD: f64 = 0.02;

pub struct Request<'a> {
    /// An artifact directory or a model spec.
    pub model: &'a Path,
    pub weights: Weights<'a>,
    /// Run on the reference interpreter.
    pub interp: bool,
    pub device: Device,
    pub threads: Option<usize>,
    /// The prompt as token ids; empty when it is given as text.
    pub prompt: Vec<i64>,
    /// The prompt as text (`--prompt`), for the weights folder's tokenizer to encode.
    pub prompt_text: Option<String>,
    pub max_new_tokens: u64,
    pub ignore_eos: bool,
    pub stop_ids: Vec<i64>,
    pub sampling: Sampling,
    /// Print the per-expert load of the compiled kernels after generation.
    pub expert_load: bool,
    /// `--profile`: time per kernel after generation.
    pub profile: bool,
    /// Write every logits row generation read to this file (`--dump-logits`).
    pub dump_logits: Option<&'a Path>,
    /// `--trace FILE`: a Chrome/Perfetto trace of every run and launch.
    pub trace: Option<&'a Path>,
    /// `--speculative`: greedy speculative decoding with the MTP module
    /// ([`kiln_runtime::generate::generate_speculative`]).
    pub speculative: bool,
    /// `--ep N` under mpirun: this process is one of N holding a share of the routed experts
    /// ([`kiln_compiler::expert_parallel`]).
    pub ep: Option<&'a crate::dist::Dist>,
}

/// Where `kiln run` writes (see the module documentation): `out` the generated text or the JSON
/// document, `log` everything else.
pub struct Sink<'o> {
    pub out: &'o mut dyn Write,
    pub log: &'o mut dyn Write,
    /// `--json`: `out` gets one JSON document at the end and nothing else.
    pub json: bool,
}

/// What `--json` prints, filled in as the run goes.
type Report = serde_json::Map<String, serde_json::Value>;

/// `--temperature`, `--top-p` and `--seed` as a sampling mode: temperature 0 is greedy.
pub fn sampling(temperature: f32, top_p: f32, seed: u64) -> Sampling {
    if temperature == 0.0 {
        Sampling::Greedy
    } else {
        Sampling::Sample { temperature, top_p, seed }
    }
}

fn describe(s: Sampling) -> String {
    match s {
        Sampling::Greedy => "greedy".into(),
        Sampling::Sample { temperature, top_p, seed } => {
            format!("sampled at temperature {temperature}, top-p {top_p}, seed {seed}")
        }
    }
}

/// The program the interpreter generates with: the prefill (its caches fed empty), else the first.
fn first_program(m: &kiln_ir::artifact::Manifest) -> &str {
    let p =
        m.program_of_kind(kiln_ir::ProgramKind::Prefill).or(m.program_of_kind(kiln_ir::ProgramKind::Forward));
    p.or(m.programs.first()).map_or("forward", |p| p.name.as_str())
}

/// Whether `path` is to be run as an artifact: any directory (a directory without a manifest is
/// reported as not an artifact rather than as a bad spec).
pub fn is_artifact(path: &Path) -> bool {
    path.is_dir()
}

/// Why `path`, which is not a directory, cannot be what `kiln COMMAND` compiles and runs: what it
/// is (absent, a model spec, a checkpoint, a graph, some other file) and what to give instead.
pub(crate) fn not_an_artifact(path: &Path, command: &str) -> anyhow::Error {
    let p = path.display();
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    let wanted = format!(
        "`kiln {command}` runs an artifact directory from `kiln compile SPEC --target cpu -o DIR`, or with \
         --interp a model spec (a .toml file or a Hugging Face config.json) on the reference interpreter"
    );
    if path.symlink_metadata().is_err() {
        return anyhow::anyhow!("{p} does not exist: {wanted}");
    }
    match ext.as_str() {
        "toml" | "json" => anyhow::anyhow!(
            "{p} is a model spec; compiled execution runs an artifact: compile it with `kiln compile {p} \
             --target cpu -o DIR` and run `kiln {command} DIR`, or pass --interp to run the reference \
             interpreter"
        ),
        "safetensors" => anyhow::anyhow!("{p} is a checkpoint, not an artifact: give it with --weights; {wanted}"),
        "kir" => anyhow::anyhow!(
            "{p} is a graph (.kir), not an artifact: compile it with `kiln compile {p} --target cpu -o DIR` and \
             run `kiln {command} DIR`"
        ),
        _ => anyhow::anyhow!("{p} is a file, not an artifact directory: {wanted}"),
    }
}

/// The prompt's ids, with the tokenizer that made them from text.
struct Prompt {
    ids: Vec<i64>,
    tokenizer: Option<TextTokenizer>,
}

/// `--prompt-ids` as they are, or `--prompt` encoded by the weights folder's `tokenizer.json`.
fn prompt(req: &Request) -> Result<Prompt> {
    let Some(text) = &req.prompt_text else {
        return Ok(Prompt { ids: req.prompt.clone(), tokenizer: None });
    };
    let Weights::Checkpoint(path) = req.weights else {
        bail!(
            "--prompt \"text\" needs the model's {} from the --weights folder, and --random-weights \
             has none: give the prompt as token ids with --prompt-ids instead",
            tokenize::TOKENIZER_FILE
        );
    };
    let tokenizer = tokenize::load(tokenize::weights_folder(path))?;
    let ids = tokenizer.encode(text)?;
    if ids.is_empty() {
        bail!("the prompt text encodes to no tokens: give some text, or token ids with --prompt-ids");
    }
    Ok(Prompt { ids, tokenizer: Some(tokenizer) })
}

fn check_prompt(spec: &ModelSpec, prompt: &[i64], req: &Request) -> Result<()> {
    if prompt.is_empty() {
        bail!("the prompt is empty: give at least one token id with --prompt-ids");
    }
    let vocab = spec.model.vocab_size;
    if let Some((i, &t)) = prompt.iter().enumerate().find(|&(_, &t)| t < 0 || t as u64 >= vocab) {
        bail!("prompt token {i} is {t}, outside the vocabulary: ids must be in 0..{vocab}");
    }
    // In u128: --max-new-tokens may be as large as a u64 goes.
    let total = prompt.len() as u128 + u128::from(req.max_new_tokens);
    let max = spec.model.max_position_embeddings;
    if total > u128::from(max) {
        bail!(
            "{} prompt tokens + {} new tokens = {total} exceed the model's context of {max} positions",
            prompt.len(),
            req.max_new_tokens
        );
    }
    Ok(())
}

fn tensors(n: usize) -> String {
    if n == 1 {
        "1 tensor".into()
    } else {
        format!("{n} tensors")
    }
}

/// Bytes of `decls` at `per_value(dtype)` bytes each, saturating.
fn decl_bytes(decls: &[ParamDecl], per_value: impl Fn(kiln_ir::DType) -> u64) -> u64 {
    decls.iter().map(|d| (d.numel as u64).saturating_mul(per_value(d.dtype))).fold(0, u64::saturating_add)
}

/// The parameters `decls` from `weights`, one at a time (a checkpoint is checked against them
/// first, whole). Whoever takes them as host tensors holds them all as f32 (the interpreter), so
/// that much must fit in the machine.
pub(crate) fn params<'c>(
    decls: Vec<ParamDecl>,
    weights: &Weights,
    spec: Option<&ModelSpec>,
    ckpt: &'c mut Option<weights::Checkpoint>,
) -> Result<Box<dyn Iterator<Item = Result<HostTensor, WeightError>> + 'c>> {
    let what = format!("the parameters as f32 ({})", tensors(decls.len()));
    kiln_runtime::host::check_fits(decl_bytes(&decls, |_| 4), &what)?;
    Ok(match weights {
        Weights::Checkpoint(dir) => {
            let c = weights::open_checkpoint(dir)?;
            let c = match spec.and_then(|s| s.quantization.as_ref()) {
                Some(q) => c.with_weight_block(q.weight_block)?,
                None => c,
            };
            Box::new(weights::bind_params(decls, ckpt.insert(c))?)
        }
        Weights::Random(seed) => Box::new(weights::random_tensors(decls, *seed, RANDOM_STD).map(Ok)),
    })
}

/// [`params`] for the compiled CPU model: a checkpoint's tensors that need no conversion are
/// borrowed from its mapping ([`weights::bind_mapped`]).
pub(crate) fn mapped_params<'c>(
    decls: Vec<ParamDecl>,
    weights: &Weights,
    spec: Option<&ModelSpec>,
    ckpt: &'c mut Option<weights::Checkpoint>,
) -> Result<Box<dyn Iterator<Item = Result<Param, WeightError>> + 'c>> {
    Ok(match weights {
        Weights::Checkpoint(dir) => {
            let c = weights::open_checkpoint(dir)?;
            let c = match spec.and_then(|s| s.quantization.as_ref()) {
                Some(q) => c.with_weight_block(q.weight_block)?,
                None => c,
            };
            Box::new(weights::bind_mapped(decls, ckpt.insert(c))?)
        }
        Weights::Random(seed) => {
            // Made one at a time as f32, each then copied into the model's memory.
            let largest = decls.iter().map(|d| (d.numel as u64).saturating_mul(4)).max().unwrap_or(0);
            let bytes = decl_bytes(&decls, |d| d.size_bytes()).saturating_add(largest);
            kiln_runtime::host::check_fits(bytes, &format!("the random weights ({})", tensors(decls.len())))?;
            Box::new(weights::random_tensors(decls, *seed, RANDOM_STD).map(|t| Ok(Param::Host(t))))
        }
    })
}

fn threads(n: usize) -> String {
    if n == 1 {
        "1 thread".into()
    } else {
        format!("{n} threads")
    }
}

pub(crate) fn cpu_options(threads: Option<usize>) -> CpuOptions {
    let mut o = CpuOptions::default();
    if let Some(t) = threads {
        o.threads = t;
    }
    o
}

/// Runs `kiln run` and writes the report to `out`.
pub fn run(req: &Request, sink: &mut Sink) -> Result<()> {
    let mut inputs = vec![req.model];
    if let Weights::Checkpoint(dir) = req.weights {
        inputs.push(dir);
    }
    crate::check_output_file(req.dump_logits, &inputs)?;
    crate::check_output_file(req.trace, &inputs)?;
    let prompt = prompt(req)?;
    if req.profile && req.interp {
        bail!("--profile times the compiled kernels; run an artifact (no --interp)");
    }
    if req.trace.is_some() && req.interp {
        bail!("--trace records the compiled kernels' launches; run an artifact (no --interp)");
    }
    if req.expert_load && req.interp {
        bail!(
            "--expert-load reports what the compiled kernels routed; it is not available with --interp: \
             run an artifact from `kiln compile --target cpu`"
        );
    }
    if !is_artifact(req.model) {
        if !req.interp {
            return Err(not_an_artifact(req.model, "run"));
        }
        let report = run_spec(req, &prompt, sink)?;
        return finish(report, sink);
    }
    if req.device == Device::Cuda && !req.interp {
        check_cuda_request(req)?;
    }
    let mut art = artifact::load(req.model)?;
    let ep_rank = expert_parallel(&mut art, req)?;
    let m = art.manifest();
    let spec = m.model.as_ref();
    let name = spec.map_or(m.name.as_str(), |s| s.model.name.as_str());
    let decls = weights::manifest_params(m)?;
    let mut ckpt = None;
    let eos = spec.and_then(|s| s.model.eos_token_id);
    if req.interp {
        let params = params(decls, &req.weights, spec, &mut ckpt)?;
        let tensors = params.collect::<Result<Vec<_>, _>>()?;
        let max_positions = spec.map(|s| s.model.max_position_embeddings);
        let mut engine = Reference::new(art.program_graph(first_program(m))?, tensors, max_positions)?;
        let what = "reference interpreter on module.kir";
        let report = generate_and_report(&mut engine, name, what, eos, &prompt, req, sink)?;
        return finish(report, sink);
    }
    // The parameters alone: `param_bytes` also counts the artifact's constants, which are not
    // checkpoint tensors and so neither mapped nor converted.
    let declared: usize = decls.iter().map(|d| d.numel * d.dtype.size_bytes() as usize).sum();
    let params = mapped_params(decls, &req.weights, spec, &mut ckpt)?;
    if req.device == Device::Cuda {
        let mut model = GpuModel::load(&art, params, &GpuOptions::default())?;
        let device = format!("CUDA device 0, {}", model.device_name());
        let report = run_compiled(&mut model, &device, declared, name, eos, &prompt, req, None, sink)?;
        return finish(report, sink);
    }
    let mut model = CpuModel::load(&art, params, &cpu_options(req.threads))?;
    let mut device = format!("the CPU, {}", threads(model.threads()));
    if let (Some(d), Some(rank)) = (req.ep, ep_rank) {
        model.set_communicator(d.expert_ranks())?;
        model.write_state(&weights::HostTensor {
            name: kiln_compiler::expert_parallel::EP_RANK.into(),
            dtype: kiln_ir::DType::F32,
            shape: Vec::new(),
            data: weights::HostData::F32(vec![rank as f32]),
        })?;
        device += &format!(", expert-parallel rank {rank} of {} (MPI)", d.dp_size());
    }
    let ranks = req.ep.filter(|_| ep_rank.is_some());
    let report = run_compiled(&mut model, &device, declared, name, eos, &prompt, req, ranks, sink)?;
    finish(report, sink)
}

/// Every expert-parallel rank's expert load put together: rank `r` counted the rows of its own
/// experts (`r·E/N ..`; its slots of the others' have no expert there and are not counted), so each
/// layer's counts are the ranks' laid end to end in rank order. Every rank calls it (a collective).
/// A count travels as two f32 halves of 24 bits, which f32 holds exactly.
fn gather_expert_load(d: &Dist, layers: &[LayerLoad]) -> Result<Vec<LayerLoad>> {
    const HALF: u64 = 1 << 24;
    let mine: Vec<f32> = layers
        .iter()
        .flat_map(|l| l.counts.iter())
        .flat_map(|&c| [(c / HALF) as f32, (c % HALF) as f32])
        .collect();
    let all = d.gather(&mine)?;
    let (per_rank, ranks) = (mine.len() / 2, all.len() / mine.len().max(1));
    let count = |i: usize| all[2 * i] as u64 * HALF + all[2 * i + 1] as u64;
    let mut out = Vec::with_capacity(layers.len());
    let mut first = 0;
    for l in layers {
        let n = l.counts.len();
        let counts = (0..ranks).flat_map(|r| (0..n).map(move |e| r * per_rank + first + e)).map(count);
        out.push(LayerLoad { counts: counts.collect(), ..l.clone() });
        first += n;
    }
    Ok(out)
}

/// Narrows the artifact to the programs this process runs: without `--ep`, the whole programs
/// (an artifact from `kiln compile --pp 1 --ep E` also holds their expert-parallel copies); with
/// it, the copies under the plain names, bound to this rank's experts. Returns the rank.
fn expert_parallel(art: &mut Artifact, req: &Request) -> Result<Option<u64>> {
    use kiln_compiler::expert_parallel::{rank_param, SUFFIX};
    let has_copies = art.manifest().programs.iter().any(|p| p.name.ends_with(SUFFIX));
    let Some(d) = req.ep else {
        if has_copies {
            art.keep_programs(|name| (!name.ends_with(SUFFIX)).then(|| name.to_string()));
        }
        return Ok(None);
    };
    if req.interp || req.device == Device::Cuda {
        bail!("--ep runs the compiled CPU programs in each process; leave out --interp and --device cuda");
    }
    let (rank, size) = (d.dp_rank() as u64, d.dp_size() as u64);
    if !has_copies {
        bail!(
            "{}: the artifact has no expert-parallel programs: compile it with `kiln compile --pp 1 --ep {size}`",
            req.model.display()
        );
    }
    let m = art.manifest();
    let ranks = m.parallel.as_ref().map_or(0, |p| u64::from(p.ep));
    if ranks != size {
        bail!(
            "{}: the artifact splits the experts over {ranks} ranks, and mpirun started {size} processes: start \
             {ranks} (`mpirun -n {ranks}`)",
            req.model.display()
        );
    }
    let experts = m.model.as_ref().and_then(|s| s.moe.as_ref()).map_or(0, |moe| moe.n_routed_experts);
    let per_rank = experts / size.max(1);
    art.keep_programs(|name| name.strip_suffix(SUFFIX).map(str::to_string));
    art.rename_params(|name| rank_param(name, rank, per_rank));
    Ok(Some(rank))
}

/// With `--json`, the document on `out`.
fn finish(report: Report, sink: &mut Sink) -> Result<()> {
    if sink.json {
        let text = serde_json::to_string_pretty(&serde_json::Value::Object(report))?;
        writeln!(sink.out, "{text}")?;
        sink.out.flush()?;
    }
    Ok(())
}

/// Generation on a loaded artifact, on any backend: the header line (memory, KV cache, folded
/// weights, parameters), the tokens, then the expert load and the profile when asked for.
#[allow(clippy::too_many_arguments)]
fn run_compiled<B: Backend>(
    model: &mut Executor<B>,
    device: &str,
    declared: usize,
    name: &str,
    eos: Option<u64>,
    prompt: &Prompt,
    req: &Request,
    ranks: Option<&Dist>,
    sink: &mut Sink,
) -> Result<Report> {
    let (total, mapped) = (model.param_bytes(), model.mapped_param_bytes());
    let cache = match Engine::kv_cache(model) {
        None => "no KV cache".to_string(),
        Some(c) => {
            let tokens = (model.max_sizes().b * c.capacity).max(1);
            format!("KV cache {} bytes ({} bytes per token)", c.bytes, c.bytes / tokens)
        }
    };
    let cache = match model.folded_bytes() {
        0 => cache,
        n => format!("{cache}, weights folded at load {n} bytes"),
    };
    let what = format!(
        "compiled artifact on {device}, arena {} bytes, {cache}, parameters {total} bytes ({mapped} \
         mapped from the checkpoint, {} converted)",
        model.arena_bytes(),
        declared.saturating_sub(mapped)
    );
    model.set_profiling(req.profile);
    model.set_tracing(req.trace.is_some());
    let mut report = generate_and_report(model, name, &what, eos, prompt, req, sink)?;
    if let Some(path) = req.trace {
        let spans = model.trace();
        write_trace(path, &spans, device)?;
        let launches = spans.iter().filter(|s| s.kernel.is_some()).count();
        writeln!(
            sink.log,
            "trace: {} runs and {launches} launches written to {}",
            spans.len() - launches,
            path.display()
        )?;
    }
    if req.expert_load {
        let layers = model.expert_load();
        let layers = match ranks {
            Some(d) => gather_expert_load(d, &layers)?,
            None => layers,
        };
        write_expert_load(&layers, sink.log)?;
        let layers = (layers.iter())
            .map(|l| serde_json::json!({"layer": l.label, "top_k": l.top_k, "rows_per_expert": l.counts}))
            .collect();
        report.insert("expert_load".into(), serde_json::Value::Array(layers));
    }
    if req.profile {
        let times = model.profile();
        write_profile(&times, sink.log)?;
        let kernels = (times.iter().filter(|t| t.nanos > 0))
            .map(
                |t| serde_json::json!({"kernel": t.name, "ms": t.nanos as f64 / 1e6, "launches": t.launches}),
            )
            .collect();
        report.insert("profile".into(), serde_json::Value::Array(kernels));
    }
    Ok(report)
}

fn write_profile(times: &[kiln_runtime::cpu::KernelTime], out: &mut dyn Write) -> Result<()> {
    write_profile_of(times, "prefill and decode runs together", &mut &mut *out)
}

/// The 20 kernels that took the most time, of `times` (over the runs `what` says).
pub(crate) fn write_profile_of(
    times: &[kiln_runtime::cpu::KernelTime],
    what: &str,
    out: &mut impl Write,
) -> Result<()> {
    let total: u64 = times.iter().map(|t| t.nanos).sum();
    writeln!(out, "profile: {:.1} ms in kernels ({what})", total as f64 / 1e6)?;
    // By kind: the kernel's name without its `k_` prefix and content hash.
    let mut kinds: Vec<(String, u64)> = Vec::new();
    for t in times {
        let name = t.name.strip_prefix("k_").unwrap_or(&t.name);
        let kind = name.rsplit_once('_').map_or(name, |(k, _)| k);
        match kinds.iter_mut().find(|(k, _)| k == kind) {
            Some((_, n)) => *n += t.nanos,
            None => kinds.push((kind.to_string(), t.nanos)),
        }
    }
    kinds.sort_by_key(|k| std::cmp::Reverse(k.1));
    let by_kind: Vec<String> = (kinds.iter().take(8))
        .map(|(k, n)| format!("{k} {:.0}%", 100.0 * *n as f64 / total.max(1) as f64))
        .collect();
    writeln!(out, "by kind: {}", by_kind.join(", "))?;
    use crate::table::Align::{Left, Right};
    let mut table =
        crate::table::new(&[("ms", Right), ("share", Right), ("launches", Right), ("kernel", Left)]);
    for t in times.iter().filter(|t| t.nanos > 0).take(20) {
        let share = 100.0 * t.nanos as f64 / total.max(1) as f64;
        table.add_row(vec![
            format!("{:.2}", t.nanos as f64 / 1e6),
            format!("{share:.1}%"),
            t.launches.to_string(),
            t.name.clone(),
        ]);
    }
    write!(out, "{}", crate::table::render(&table))?;
    Ok(())
}

/// `--expert-load`: one line per MoE layer. The counts are rows the kernels routed in every forward
/// pass (padding rows included; with a KV cache each token is routed once, without one each pass
/// routes the whole sequence again).
fn write_expert_load(layers: &[LayerLoad], out: &mut dyn Write) -> Result<()> {
    if layers.is_empty() {
        writeln!(out, "expert load: the artifact has no MoE layers")?;
        return Ok(());
    }
    writeln!(out, "expert load over every forward pass (padding rows count):")?;
    for l in layers {
        let (min, max) =
            (l.counts.iter().min().copied().unwrap_or(0), l.counts.iter().max().copied().unwrap_or(0));
        let imbalance = l.imbalance().map_or("-".into(), |r| format!("{r:.2}"));
        let busiest: Vec<String> =
            l.busiest(3).into_iter().filter(|&(_, n)| n > 0).map(|(e, n)| format!("e{e} {n}")).collect();
        writeln!(
            out,
            "{}: {} tokens x top-{} over {} experts; rows per expert min {min} mean {:.1} max {max}; \
             max/mean {imbalance}; busiest {}",
            l.label,
            l.tokens(),
            l.top_k,
            l.counts.len(),
            l.mean(),
            if busiest.is_empty() { "-".into() } else { busiest.join(", ") }
        )?;
    }
    Ok(())
}

/// `kiln run SPEC --interp`: the graph built from the spec, on the interpreter.
fn run_spec(req: &Request, prompt: &Prompt, sink: &mut Sink) -> Result<Report> {
    // The MTP module stays in the graph, as in compiled artifacts: a checkpoint that carries it
    // (every DeepSeek-V3 release does) binds as it is, and its logits are simply not used here.
    let spec = spec::load(req.model)?;
    check_prompt(&spec, &prompt.ids, req)?;
    let graph = build::build_graph(&spec)?;
    let decls = weights::graph_params(&graph)?;
    let mut ckpt = None;
    let tensors = params(decls, &req.weights, Some(&spec), &mut ckpt)?.collect::<Result<Vec<_>, _>>()?;
    let mut engine = Reference::new(graph, tensors, Some(spec.model.max_position_embeddings))?;
    let what = "reference interpreter";
    generate_and_report(&mut engine, &spec.model.name, what, spec.model.eos_token_id, prompt, req, sink)
}

/// `--device cuda` options that only the CPU has, refused before anything loads; then the driver,
/// so that a machine without one says so first ([`RuntimeError::NoCudaDriver`]).
fn check_cuda_request(req: &Request) -> Result<()> {
    if req.threads.is_some() {
        bail!("--threads sets the CPU backend's threads; it does not apply to --device cuda");
    }
    if !kiln_runtime::cuda::driver_present() {
        return Err(RuntimeError::NoCudaDriver.into());
    }
    Ok(())
}

/// `--dump-logits`: the engine, keeping a copy of every [`kiln_runtime::generate::LOGITS`] row the
/// generation loop reads (one per sequence per step: the last position's logits) when `keep`.
/// Without `--dump-logits` it keeps nothing: a copy per token cost a decode step of
/// `models/bench.toml` 0.1-0.4 ms (a fresh vocabulary-sized allocation, page-faulted in), and the
/// memory grew with every token.
struct LogitsRecorder<'e> {
    engine: &'e mut dyn Engine,
    keep: bool,
    rows: RefCell<Vec<Vec<f32>>>,
}

impl Engine for LogitsRecorder<'_> {
    fn programs(&self) -> Vec<(String, kiln_ir::ProgramKind)> {
        self.engine.programs()
    }

    fn inputs(&self, program: &str) -> Result<Vec<(String, kiln_ir::DType)>, RuntimeError> {
        self.engine.inputs(program)
    }

    fn vocab_size(&self) -> Option<u64> {
        self.engine.vocab_size()
    }

    fn limits(&self, program: &str) -> Limits {
        self.engine.limits(program)
    }

    fn run(&mut self, program: &str, inputs: &[HostTensor]) -> Result<(), RuntimeError> {
        self.engine.run(program, inputs)
    }

    fn kv_cache(&self) -> Option<KvCache> {
        self.engine.kv_cache()
    }

    fn output_len(&self, name: &str) -> Result<usize, RuntimeError> {
        self.engine.output_len(name)
    }

    fn output_f32(&self, name: &str, range: Range<usize>) -> Result<Vec<f32>, RuntimeError> {
        let v = self.engine.output_f32(name, range)?;
        if self.keep && name == kiln_runtime::generate::LOGITS {
            self.rows.borrow_mut().push(v.clone());
        }
        Ok(v)
    }
}

/// One line per logits row, in the order read, each value in Rust's shortest round-trip form
/// (`awk` and Python read it back exactly).
/// Writes `spans` as a Chrome trace (the JSON object format Perfetto also reads): one complete
/// event (`"ph": "X"`, microseconds) per run on thread 1 and per launch on thread 2 of process 1,
/// the device named in the process's metadata.
fn write_trace(path: &Path, spans: &[kiln_runtime::exec::Span], device: &str) -> Result<()> {
    let mut events = vec![
        serde_json::json!({"name": "process_name", "ph": "M", "pid": 1, "args": {"name": format!("kiln run ({device})")}}),
        serde_json::json!({"name": "thread_name", "ph": "M", "pid": 1, "tid": 1, "args": {"name": "programs"}}),
        serde_json::json!({"name": "thread_name", "ph": "M", "pid": 1, "tid": 2, "args": {"name": "kernels"}}),
    ];
    for s in spans {
        let mut e = serde_json::json!({
            "name": s.name, "cat": s.program, "ph": "X", "pid": 1,
            "tid": if s.kernel.is_some() { 2 } else { 1 },
            "ts": s.start_ns as f64 / 1e3, "dur": s.dur_ns as f64 / 1e3,
        });
        if let Some(k) = &s.kernel {
            e["args"] =
                serde_json::json!({"kernel": k, "label": s.label, "scope": s.scope, "program": s.program});
        }
        events.push(e);
    }
    let doc = serde_json::json!({"traceEvents": events, "displayTimeUnit": "ms"});
    kiln_ir::output::write_file(path, (serde_json::to_string(&doc)? + "\n").as_bytes())
        .with_context(|| format!("cannot write --trace {}", path.display()))
}

fn write_logits(path: &Path, rows: &[Vec<f32>]) -> Result<()> {
    let mut text = String::new();
    for r in rows {
        let line: Vec<String> = r.iter().map(|x| format!("{x:e}")).collect();
        text += &line.join(" ");
        text.push('\n');
    }
    kiln_ir::output::write_file(path, text.as_bytes())
        .with_context(|| format!("cannot write --dump-logits {}", path.display()))
}

fn generate_and_report(
    engine: &mut dyn Engine,
    name: &str,
    what: &str,
    eos: Option<u64>,
    prompt: &Prompt,
    req: &Request,
    sink: &mut Sink,
) -> Result<Report> {
    let mut stop_tokens = req.stop_ids.clone();
    if let Some(e) = eos.filter(|_| !req.ignore_eos) {
        stop_tokens.push(e as i64);
    }
    let opts =
        GenerateOptions { max_new_tokens: req.max_new_tokens as usize, sampling: req.sampling, stop_tokens };
    // Everything generate checks, it checks before the first forward pass; printing the header only
    // after the engine is ready keeps a failed run's output to the error.
    let prompts = [prompt.ids.clone()];
    let mut stream: Option<TextStream> =
        prompt.tokenizer.as_ref().map(|t| t.stream(&prompt.ids)).transpose()?;
    let mut header =
        format!("{name}: {} prompt tokens, {}, {what}\n", prompt.ids.len(), describe(req.sampling));
    let prompt_text = stream.as_ref().map(|s| s.prompt_text().to_string());
    if let Some(text) = &prompt_text {
        // The text as the model sees it: the prompt re-decoded.
        header += &format!("prompt ids: {:?}\nprompt: {text}\n", prompt.ids);
    }
    let mut header = Some(header);
    let mut failed: Option<anyhow::Error> = None;
    let (json, out, log) = (sink.json, &mut *sink.out, &mut *sink.log);
    let mut text = String::new();
    let mut events: Vec<TokenEvent> = Vec::new();
    let mut on_token = |e: &TokenEvent| {
        events.push(*e);
        let mut logged = header.take().unwrap_or_default();
        let new = match &mut stream {
            Some(s) => match s.push(e.token) {
                Ok(new) => new,
                Err(err) => {
                    failed.get_or_insert(err);
                    String::new()
                }
            },
            None if e.step == 0 => e.token.to_string(),
            None => format!(",{}", e.token),
        };
        text += &new;
        if stream.is_none() {
            logged += &format!("token {:>6}  logit {:>9.4}  p {:.4}\n", e.token, e.logit, e.prob);
        }
        // Text streams to `out` as it comes; ids are written at the end, in one line, so that on a
        // terminal they do not interleave with the per-token lines on `log`.
        let streams = !json && stream.is_some();
        let written = log.write_all(logged.as_bytes()).and_then(|()| log.flush());
        let written = written.and_then(|()| {
            if !streams {
                Ok(())
            } else {
                out.write_all(new.as_bytes()).and_then(|()| out.flush())
            }
        });
        if let Err(err) = written {
            failed.get_or_insert(err.into());
        }
    };
    let keep = req.dump_logits.is_some();
    let mut recorder = LogitsRecorder { engine, keep, rows: RefCell::new(Vec::new()) };
    let g = if req.speculative {
        generate_speculative(&mut recorder, &prompts, &opts, &mut |e| {
            on_token(e);
            Flow::Continue
        })?
    } else {
        generate(&mut recorder, &prompts, &opts, &mut on_token)?
    };
    if let Some(path) = req.dump_logits {
        write_logits(path, &recorder.rows.into_inner())?;
    }
    if let Some(e) = failed {
        return Err(e);
    }
    if let Some(h) = header {
        write!(sink.log, "{h}")?;
    }
    if let Some(s) = &mut stream {
        let rest = s.finish();
        text += &rest;
        if !json {
            write!(sink.out, "{rest}")?;
        }
    }
    if !json {
        if stream.is_none() {
            write!(sink.out, "{text}")?;
        }
        // The continuation ends its line, so that a shell prompt or the next output starts clean.
        writeln!(sink.out)?;
        sink.out.flush()?;
    }
    let tokens = &g.tokens[0];
    if g.stopped[0] {
        writeln!(sink.log, "stopped at stop token {}", tokens.last().copied().unwrap_or_default())?;
    }
    writeln!(sink.log, "generated {} tokens: {:?}", tokens.len(), tokens)?;
    writeln!(sink.log, "{}", speeds(&g))?;
    let s = &g.stats;
    let mut report = Report::new();
    report.insert("model".into(), name.into());
    report.insert("engine".into(), what.into());
    report.insert("sampling".into(), describe(req.sampling).into());
    report.insert("prompt_ids".into(), prompt.ids.clone().into());
    if let Some(t) = prompt_text {
        report.insert("prompt".into(), t.into());
    }
    report.insert("tokens".into(), tokens.clone().into());
    if stream.is_some() {
        report.insert("text".into(), text.into());
    }
    report.insert("logits".into(), events.iter().map(|e| e.logit).collect::<Vec<f32>>().into());
    report.insert("probs".into(), events.iter().map(|e| e.prob).collect::<Vec<f32>>().into());
    let finish = if g.stopped[0] { "stop" } else { "length" };
    report.insert("finish_reason".into(), finish.into());
    report.insert(
        "stats".into(),
        serde_json::json!({
            "prompt_tokens": s.prompt_tokens,
            "first_token_ms": s.first_token.as_secs_f64() * 1e3,
            "prefill_tokens_per_s": s.prefill_tokens_per_s(),
            "decode_tokens": s.decode_tokens,
            "decode_tokens_per_s": s.decode_tokens_per_s(),
            "forward_passes": s.forwards,
            "kv_cache": g.cached,
            "drafts": s.drafted,
            "drafts_accepted": s.accepted,
            "acceptance": s.acceptance(),
        }),
    );
    Ok(report)
}

fn speeds(g: &Generation) -> String {
    let s = &g.stats;
    let decode = match s.decode_tokens_per_s() {
        Some(r) => format!("decode {} tokens at {r:.1} tokens/s", s.decode_tokens),
        None => "no decode steps".into(),
    };
    let drafts = match s.acceptance() {
        Some(a) => format!("; {} of {} drafts accepted ({:.1}%)", s.accepted, s.drafted, 100.0 * a),
        None => String::new(),
    };
    format!(
        "time to first token {:.1} ms; prefill {} tokens at {:.1} tokens/s; {decode} \
         ({} forward passes{}{drafts})",
        s.first_token.as_secs_f64() * 1e3,
        s.prompt_tokens,
        s.prefill_tokens_per_s(),
        s.forwards,
        if g.cached {
            "; decode over the KV cache"
        } else {
            "; no KV cache: each step recomputes the sequence"
        }
    )
}

/// `kiln bench run`: the artifact and the reference interpreter on the same graph and weights.
pub struct BenchRequest<'a> {
    pub artifact: &'a Path,
    pub weights: Weights<'a>,
    pub prompt_len: usize,
    pub new_tokens: usize,
    /// Sequences decoded together, each with its own prompt ([`bench_prompt`]).
    pub batch: usize,
    pub threads: Option<usize>,
    /// Leave the reference interpreter out (it recomputes every sequence at each step).
    pub no_interp: bool,
    /// After the timed rounds, one more of plain decoding (and one of speculative decoding) with
    /// every launch traced into this Chrome/Perfetto trace, as `kiln run --trace` writes it.
    pub trace: Option<&'a Path>,
    /// Also decode speculatively with the MTP module, and compare with plain decoding.
    pub speculative: bool,
}

/// A deterministic prompt of `n` ids spread over the vocabulary, the `seq`-th of a batch (each
/// sequence starts elsewhere in the same walk).
fn bench_prompt(n: usize, vocab: u64, seq: usize) -> Vec<i64> {
    (0..n as u64).map(|i| ((i * 7919 + 3 + seq as u64 * 104_729) % vocab) as i64).collect()
}

pub fn bench(req: &BenchRequest, tables: &mut crate::bench::Tables) -> Result<serde_json::Value> {
    if req.prompt_len == 0 || req.new_tokens == 0 || req.batch == 0 {
        bail!("--prompt-len, --new-tokens and --batch must be at least 1");
    }
    crate::check_output_file(req.trace, &[req.artifact])?;
    let art: Artifact = artifact::load(req.artifact)?;
    let m = art.manifest();
    let spec = m.model.as_ref();
    let name = spec.map_or(m.name.as_str(), |s| s.model.name.as_str());
    let mut ckpt = None;
    let tensors = params(weights::manifest_params(m)?, &req.weights, spec, &mut ckpt)?
        .collect::<Result<Vec<_>, _>>()?;
    let mut compiled = CpuModel::load(&art, tensors.iter().cloned().map(Ok), &cpu_options(req.threads))?;
    let max_positions = spec.map(|s| s.model.max_position_embeddings);
    let mut reference = match req.no_interp {
        false => Some(Reference::new(art.program_graph(first_program(m))?, tensors, max_positions)?),
        true => None,
    };
    let vocab = compiled.vocab_size().context("the artifact has no `logits` output")?;
    let prompts: Vec<Vec<i64>> = (0..req.batch).map(|s| bench_prompt(req.prompt_len, vocab, s)).collect();
    let opts =
        GenerateOptions { max_new_tokens: req.new_tokens, sampling: Sampling::Greedy, stop_tokens: vec![] };
    // One warm-up token, so that the first timed pass does not pay for page faults in the arena.
    generate(&mut compiled, &prompts, &GenerateOptions { max_new_tokens: 1, ..opts.clone() }, &mut |_| {})?;
    let a = generate(&mut compiled, &prompts, &opts, &mut |_| {})?;
    // Speculative decoding, its rounds interleaved with plain decoding's, so that both see the
    // same machine; the faster of three rounds of each counts.
    let spec = match req.speculative {
        true => {
            let mut best: Option<(Generation, Generation)> = None;
            for _ in 0..3 {
                let s = generate_speculative(&mut compiled, &prompts, &opts, &mut |_| Flow::Continue)?;
                let p = generate(&mut compiled, &prompts, &opts, &mut |_| {})?;
                best = Some(match best {
                    None => (s, p),
                    Some((bs, bp)) => (faster(bs, s), faster(bp, p)),
                });
            }
            best
        }
        false => None,
    };
    let r = match &mut reference {
        Some(reference) => Some(generate(reference, &prompts, &opts, &mut |_| {})?),
        None => None,
    };
    // Traced apart from the timed rounds: tracing waits for each launch.
    let traced = match req.trace {
        Some(path) => {
            compiled.set_tracing(true);
            generate(&mut compiled, &prompts, &opts, &mut |_| {})?;
            if req.speculative {
                generate_speculative(&mut compiled, &prompts, &opts, &mut |_| Flow::Continue)?;
            }
            let spans = compiled.trace();
            compiled.set_tracing(false);
            write_trace(path, &spans, &format!("the CPU, {}", threads(compiled.threads())))?;
            Some((path, spans.len()))
        }
        None => None,
    };

    let out = tables.text();
    writeln!(
        out,
        "bench run {name}: {}{} prompt tokens, {} new tokens, greedy, {}; the artifact decodes {}, {}",
        match req.batch {
            1 => String::new(),
            b => format!("a batch of {b} sequences, each with "),
        },
        req.prompt_len,
        req.new_tokens,
        threads(compiled.threads()),
        if a.cached { "over its KV cache" } else { "without a KV cache (recomputing)" },
        match r {
            Some(_) => "the interpreter recomputes the whole sequence at each step",
            None => "no interpreter (--no-interp)",
        }
    )?;
    use crate::table::Align::{Left, Right};
    let mut table = crate::table::new(&[
        ("engine", Left),
        ("prefill tok/s", Right),
        ("decode tok/s", Right),
        ("first token ms", Right),
    ]);
    let row = |label: &str, g: &Generation| {
        let d = g.stats.decode_tokens_per_s().map_or("-".into(), |r| format!("{r:.1}"));
        vec![
            label.to_string(),
            format!("{:.1}", g.stats.prefill_tokens_per_s()),
            d,
            format!("{:.2}", g.stats.first_token.as_secs_f64() * 1e3),
        ]
    };
    table.add_row(row("kiln artifact", &a));
    let ratio = |x: Option<f64>, y: Option<f64>| match (x, y) {
        (Some(x), Some(y)) if y > 0.0 => format!("{:.1}x", x / y),
        _ => "-".into(),
    };
    if let Some(r) = &r {
        table.add_row(row("interpreter", r));
        table.add_row(vec![
            "ratio".to_string(),
            ratio(Some(a.stats.prefill_tokens_per_s()), Some(r.stats.prefill_tokens_per_s())),
            ratio(a.stats.decode_tokens_per_s(), r.stats.decode_tokens_per_s()),
        ]);
    }
    write!(out, "{}", crate::table::render(&table))?;
    // The roofline: this machine's read bandwidth, measured now with the same threads, over the
    // weight bytes a decoded token reads.
    // At batch 1 only: in a batch the tokens of a step share weight reads.
    let weight_bytes = crate::membw::decode_weight_bytes(m).filter(|_| req.batch == 1);
    let bandwidth = crate::membw::measure(256 << 20, compiled.threads(), 8).bytes_per_s;
    let roofline = weight_bytes.filter(|&b| b > 0).map(|b| bandwidth / b as f64);
    let reached = roofline.zip(a.stats.decode_tokens_per_s()).map(|(r, d)| d / r);
    match (weight_bytes, roofline, reached) {
        (Some(b), Some(r), Some(f)) => writeln!(
            out,
            "roofline: a decoded token reads {b} weight bytes; this machine reads {:.1} GB/s with {}, so \
             decode can reach {r:.1} tok/s; the artifact reaches {:.1}% of it",
            bandwidth / 1e9,
            threads(compiled.threads()),
            f * 100.0
        )?,
        _ if req.batch > 1 => writeln!(
            out,
            "roofline: for batch 1 only (a batch's tokens share the dense weights and the experts they both pick)"
        )?,
        _ => writeln!(out, "roofline: not known (the artifact records no model, or no token was decoded)")?,
    }
    // The first sequence whose tokens differ from the interpreter's, and the new token where.
    let differ = r.as_ref().and_then(|r| {
        (a.tokens.iter().zip(&r.tokens).enumerate())
            .find_map(|(q, (ta, tr))| ta.iter().zip(tr).position(|(x, y)| x != y).map(|i| (q, i)))
    });
    let made: usize = a.tokens.iter().map(Vec::len).sum();
    match (differ, &r) {
        (_, None) => {}
        (None, Some(_)) => writeln!(out, "tokens: the same ({made} of {made})")?,
        (Some((q, i)), Some(r)) => writeln!(
            out,
            "tokens: differ from new token {i}{}: kiln {:?}, interpreter {:?}",
            if req.batch > 1 { format!(" of sequence {q}") } else { String::new() },
            a.tokens[q],
            r.tokens[q]
        )?,
    }
    // A sequence's tokens at batch 1 (as before batches), else the batch's.
    let tokens = |t: &[Vec<i64>]| match t {
        [one] => serde_json::json!(one),
        all => serde_json::json!(all),
    };
    if let Some((path, spans)) = traced {
        writeln!(
            out,
            "trace: one more round of plain decoding{} traced into {} ({spans} spans)",
            if req.speculative { " and one of speculative decoding" } else { "" },
            path.display()
        )?;
    }
    let speculative = match &spec {
        Some((s, p)) => {
            let (ds, dp) = (s.stats.decode_tokens_per_s(), p.stats.decode_tokens_per_s());
            let same = s.tokens == p.tokens;
            writeln!(
                out,
                "speculative (MTP draft, best of 3 rounds interleaved with plain decoding): decode {} tok/s \
                 against {} tok/s, {}; {} of {} drafts accepted ({}), {} main-model passes against {}; \
                 tokens: {}",
                ds.map_or("-".into(), |d| format!("{d:.1}")),
                dp.map_or("-".into(), |d| format!("{d:.1}")),
                ratio(ds, dp),
                s.stats.accepted,
                s.stats.drafted,
                s.stats.acceptance().map_or("-".into(), |a| format!("{:.1}%", a * 100.0)),
                s.stats.forwards,
                p.stats.forwards,
                if same { "the same as plain decoding" } else { "DIFFER from plain decoding" },
            )?;
            serde_json::json!({
                "decode_tokens_per_s": ds,
                "plain_decode_tokens_per_s": dp,
                "drafts": s.stats.drafted,
                "drafts_accepted": s.stats.accepted,
                "acceptance": s.stats.acceptance(),
                "forward_passes": s.stats.forwards,
                "plain_forward_passes": p.stats.forwards,
                "tokens_same": same,
                "tokens": tokens(&s.tokens),
            })
        }
        None => serde_json::Value::Null,
    };
    let engine = |label: &str, g: &Generation| {
        serde_json::json!({
            "engine": label,
            "prefill_tokens_per_s": g.stats.prefill_tokens_per_s(),
            "decode_tokens_per_s": g.stats.decode_tokens_per_s(),
            "first_token_ms": g.stats.first_token.as_secs_f64() * 1e3,
            "tokens": tokens(&g.tokens),
        })
    };
    Ok(serde_json::json!({
        "bench": "run",
        "model": name,
        "prompt_tokens": req.prompt_len,
        "new_tokens": req.new_tokens,
        "batch": req.batch,
        "threads": compiled.threads(),
        "kv_cache": a.cached,
        "engines": std::iter::once(engine("kiln artifact", &a))
            .chain(r.as_ref().map(|r| engine("interpreter", r)))
            .collect::<Vec<_>>(),
        "tokens_differ_from": differ.map(|(_, i)| i),
        "tokens_differ_in_sequence": differ.map(|(q, _)| q),
        "decode_weight_bytes_per_token": weight_bytes,
        "read_bytes_per_s": bandwidth,
        "roofline_decode_tokens_per_s": roofline,
        "roofline_fraction": reached,
        "speculative": speculative,
    }))
}

/// The one of two generations whose decode was faster.
fn faster(a: Generation, b: Generation) -> Generation {
    let rate = |g: &Generation| g.stats.decode_tokens_per_s().unwrap_or(0.0);
    if rate(&b) > rate(&a) {
        b
    } else {
        a
    }
}
