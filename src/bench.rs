//! `kiln bench gemm`: kiln's generated CPU `linear` in f32, bf16 and FP8 (DeepSeek-V3's `fp8-gemm`
//! fusion) against the `matrixmultiply` crate and PyTorch, all multi-threaded, at square sizes or
//! a model's (`--rows`, `--k`). A measurement to read, not a test: nothing here asserts a speed.
//!
//! kiln's side compiles `x[M, K] @ w[N, K]^T` for each dtype and size into a shared library (the
//! same path as `kiln compile --target cpu`) and splits its work items (rows of column panels) over
//! `std::thread::scope` threads through the packed entry's `[lo, hi)` range. matrixmultiply
//! computes the same product in f32 (`w^T` by strides; for bf16, on the same bf16 values) on its
//! own thread pool, sized from `MATMUL_NUM_THREADS`, which this command sets from `--threads`
//! (matrixmultiply uses at most 4). PyTorch runs `tools/bench/gemm_torch.py` once for every case,
//! on the operands written to a temporary folder, and writes its results back there. Each side
//! runs once to warm up, then `--reps` times; the best time counts. Every result is compared with
//! matrixmultiply's before anything is printed.
//!
//! `kiln bench run` (an artifact against the reference interpreter) lives with `kiln run` in
//! `run.rs`, whose weight loading and generation it shares. `kiln bench run SPEC --compare-without
//! PASS` is here: it compiles the spec twice for the CPU in the same run, with the whole pipeline
//! and without `PASS` (`fuse-kernels`, say), generates the same greedy tokens from both on the same
//! random weights, and prints both decode speeds and their ratio (each side warmed up by one token
//! first). Nothing is written but two temporary artifact directories, removed afterwards.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use kiln_compiler::codegen::{cpu, form_kernels, lower_module, Kernel, LaunchShape, Target};
use kiln_ir::{DType, Op, TensorType};
use kiln_runtime::weights::{bf16_to_f32, f32_to_bf16};

/// The packed entry of a CPU kernel (see `kiln_compiler::codegen::cpu`).
use kiln_runtime::cpu::pool::{chunks, Job, Packed, Pool, Workers};
use kiln_runtime::host::Memory;

/// What `kiln bench` measures.
#[derive(clap::Subcommand)]
pub enum BenchCommand {
    /// kiln's CPU `linear` in f32, bf16 and FP8 against the matrixmultiply crate and PyTorch
    /// (oneDNN), in GFLOP/s and the weights' GB/s.
    Gemm {
        /// Sizes N = K, comma-separated; square (M = N = K) unless --rows or --k.
        #[arg(long, value_delimiter = ',', default_values_t = [256usize, 1024, 2048])]
        sizes: Vec<usize>,
        /// Rows of x (M) for every size instead of M = N: the shape of a prefill (M = its tokens)
        /// or a decode step (M = 1).
        #[arg(long)]
        rows: Option<usize>,
        /// Columns of x and of the weight (K) for every size instead of K = N: a model's shapes,
        /// such as an output head's N = vocabulary, K = hidden size.
        #[arg(long)]
        k: Option<usize>,
        /// Threads on every side (default: every core).
        #[arg(long)]
        threads: Option<usize>,
        /// Timed runs per size after a warm-up; the best counts.
        #[arg(long, default_value_t = 5)]
        reps: usize,
        /// Operand dtypes, comma-separated: `f32`, `bf16` (bf16 operands and result, f32 sums),
        /// `fp8` (E4M3 weights with an f32 scale per 128 x 128 block, as DeepSeek-V3 stores them,
        /// times a bf16 x into a bf16 result; PyTorch has no such CPU GEMM and is left out).
        #[arg(long, value_delimiter = ',', default_values_t = ["f32".to_string(), "bf16".to_string()],
              value_parser = ["f32", "bf16", "fp8"])]
        dtype: Vec<String>,
        /// A Python with torch for the PyTorch column (default: $KILN_PYTHON, else
        /// ~/.cache/kiln-venv/bin/python).
        #[arg(long, conflicts_with = "no_torch")]
        python: Option<std::path::PathBuf>,
        /// Leave PyTorch out.
        #[arg(long)]
        no_torch: bool,
    },
    /// This machine's memory read bandwidth, in GB/s, with one thread and with --threads: the limit
    /// of decoding at batch 1, which reads every weight a token needs once.
    Membw {
        /// The buffer read, in MiB (well beyond the caches).
        #[arg(long, default_value_t = 1024)]
        mib: usize,
        /// Threads of the parallel read (default: every core).
        #[arg(long)]
        threads: Option<usize>,
        /// Timed passes after a warm-up; the best counts.
        #[arg(long, default_value_t = 5)]
        reps: usize,
    },
    /// An artifact's prefill and decode tokens/s against the reference interpreter on the same
    /// graph (its prefill in `module.kir`) and weights.
    Run {
        /// The artifact directory.
        artifact: std::path::PathBuf,
        /// Prompt tokens (a fixed sequence of ids).
        #[arg(long, default_value_t = 32)]
        prompt_len: usize,
        /// Tokens to generate, greedily.
        #[arg(long, default_value_t = 16)]
        new_tokens: usize,
        /// Sequences decoded together, each with a prompt of its own (tokens/s count every
        /// sequence's tokens). At batch 1 a decode step reads each weight it needs for one token; in
        /// a batch the tokens share the dense weights and the experts more than one of them picks.
        #[arg(long, default_value_t = 1, conflicts_with = "compare_without")]
        batch: usize,
        /// A Hugging Face checkpoint (default: random weights).
        #[arg(long)]
        weights: Option<std::path::PathBuf>,
        /// The seed of the random weights.
        #[arg(long, value_name = "SEED", default_value_t = 1, conflicts_with = "weights")]
        random_weights: u64,
        /// Threads per kernel launch (default: every core).
        #[arg(long)]
        threads: Option<usize>,
        /// Take a model spec instead of an artifact, compile it with every pass and without this
        /// one, and compare the two artifacts' decode tokens/s (random weights only).
        #[arg(long, value_name = "PASS", conflicts_with = "weights")]
        compare_without: Option<String>,
        /// Also decode speculatively with the MTP module (an artifact from `kiln compile
        /// --speculative`) and compare it with plain decoding on the same artifact: tokens/s,
        /// acceptance, and whether the tokens are the same.
        #[arg(long, conflicts_with = "compare_without")]
        speculative: bool,
        /// Leave the reference interpreter out: it recomputes every sequence at each step, which
        /// takes minutes on models/bench.toml in a batch.
        #[arg(long, conflicts_with = "compare_without")]
        no_interp: bool,
        /// After the timed rounds, trace one more round of plain decoding (and with --speculative
        /// one of speculative decoding) into this Chrome/Perfetto trace, as `kiln run --trace`.
        #[arg(long, value_name = "FILE", conflicts_with = "compare_without")]
        trace: Option<std::path::PathBuf>,
    },
    /// The compiled train step's tokens/s and peak memory against PyTorch eager (transformers) on
    /// the same model, weights and batch.
    Train {
        /// A model spec (`models/bench.toml`) or a Hugging Face config.json.
        spec: std::path::PathBuf,
        /// Rows per step.
        #[arg(long, default_value_t = 1)]
        batch: usize,
        /// Tokens per row.
        #[arg(long, default_value_t = 128)]
        seq_len: usize,
        /// Timed steps after one warm-up; the median counts.
        #[arg(long, default_value_t = 3)]
        steps: usize,
        /// The seed of the random weights.
        #[arg(long, value_name = "SEED", default_value_t = 1)]
        random_weights: u64,
        /// Threads on both sides (default: every core).
        #[arg(long)]
        threads: Option<usize>,
        /// A Python with torch and transformers for the baseline (default: $KILN_PYTHON, else
        /// ~/.cache/kiln-venv/bin/python).
        #[arg(long)]
        python: Option<std::path::PathBuf>,
        /// Print kiln's time per kernel over the timed steps.
        #[arg(long)]
        profile: bool,
        /// kiln's AdamW moments in bf16, as DeepSeek-V3 stores them (PyTorch's stay f32: its AdamW
        /// has no such option).
        #[arg(long, default_value = "f32", value_parser = ["f32", "bf16"])]
        moments: String,
        /// Instead of PyTorch, compare kiln's train step in these precisions, in one run, against
        /// the first: `f32` (weights and moments f32), `bf16` (bf16 weights with f32 masters,
        /// bf16 moments), `fp8` (bf16's, with DeepSeek-V3's FP8 GEMMs), e.g. `bf16,fp8,f32`.
        #[arg(long, value_delimiter = ',', value_parser = ["f32", "bf16", "fp8"])]
        precision: Vec<String>,
    },
}

/// Runs `kiln bench`.
/// With `json`, the figures as one JSON document on `out` instead of the table (see [`Tables`]).
pub fn run(what: BenchCommand, json: bool, out: &mut dyn Write) -> Result<()> {
    let mut tables = Tables::new(json, out);
    let doc = run_into(what, &mut tables)?;
    tables.finish(doc)
}

/// Where a benchmark writes: its table on `out`, or with `--json` nowhere (the figures go into the
/// document [`Tables::finish`] prints instead).
pub struct Tables<'o> {
    out: &'o mut dyn Write,
    discard: std::io::Sink,
    json: bool,
}

impl<'o> Tables<'o> {
    pub fn new(json: bool, out: &'o mut dyn Write) -> Tables<'o> {
        Tables { out, discard: std::io::sink(), json }
    }

    /// The table's writer.
    pub fn text(&mut self) -> &mut dyn Write {
        if self.json {
            &mut self.discard
        } else {
            &mut *self.out
        }
    }

    /// With `--json`, prints `doc`.
    pub fn finish(self, doc: serde_json::Value) -> Result<()> {
        if self.json {
            writeln!(self.out, "{}", serde_json::to_string_pretty(&doc)?)?;
        }
        Ok(())
    }
}

fn run_into(what: BenchCommand, out: &mut Tables) -> Result<serde_json::Value> {
    match what {
        BenchCommand::Gemm { sizes, rows, k, threads, reps, dtype, python, no_torch } => {
            let threads =
                threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
            kiln_runtime::cpu::check_threads(threads)?;
            let python = if no_torch { None } else { Some(crate::bench_train::python(python.as_deref())) };
            gemm(&GemmRequest { sizes, rows, k, threads, reps, dtypes: dtype, python }, out)
        }
        BenchCommand::Membw { mib, threads, reps } => {
            let threads =
                threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
            kiln_runtime::cpu::check_threads(threads)?;
            if mib == 0 {
                bail!("--mib must be at least 1");
            }
            if reps == 0 {
                bail!("--reps must be at least 1");
            }
            let bytes = mib
                .checked_mul(1 << 20)
                .with_context(|| format!("--mib {mib} is more bytes than a machine can address"))?;
            kiln_runtime::host::check_fits(bytes as u64, &format!("the {mib} MiB read by --mib"))?;
            membw(mib, threads, reps, out)
        }
        BenchCommand::Run {
            artifact: spec,
            prompt_len,
            new_tokens,
            random_weights,
            threads,
            compare_without: Some(pass),
            ..
        } => {
            let req = CompareRequest {
                spec: &spec,
                pass: &pass,
                prompt_len,
                new_tokens,
                seed: random_weights,
                threads,
            };
            compare_without(&req, out)
        }
        BenchCommand::Train {
            spec,
            batch,
            seq_len,
            steps,
            random_weights,
            threads,
            python,
            profile,
            moments,
            precision,
        } => {
            let req = crate::bench_train::Request {
                precisions: precision,
                spec: &spec,
                batch,
                seq_len,
                steps,
                seed: random_weights,
                threads,
                python: python.as_deref(),
                profile,
                bf16_moments: moments == "bf16",
            };
            crate::bench_train::run(&req, out)
        }
        BenchCommand::Run {
            artifact,
            prompt_len,
            new_tokens,
            weights,
            random_weights,
            threads,
            speculative,
            batch,
            no_interp,
            trace,
            ..
        } => {
            let weights = match &weights {
                Some(dir) => crate::run::Weights::Checkpoint(dir),
                None => crate::run::Weights::Random(random_weights),
            };
            let req = crate::run::BenchRequest {
                artifact: &artifact,
                weights,
                prompt_len,
                new_tokens,
                batch,
                threads,
                no_interp,
                trace: trace.as_deref(),
                speculative,
            };
            crate::run::bench(&req, out)
        }
    }
}

/// `kiln bench membw`: the read bandwidth with one thread and with `threads`.
fn membw(mib: usize, threads: usize, reps: usize, tables: &mut Tables) -> Result<serde_json::Value> {
    let bytes = mib << 20; // checked by the caller
    let mut counts = vec![1];
    if threads > 1 {
        counts.push(threads);
    }
    let rates: Vec<crate::membw::Read> =
        counts.iter().map(|&t| crate::membw::measure(bytes, t, reps)).collect();
    let out = tables.text();
    writeln!(
        out,
        "bench membw: sum of 64-bit words over {mib} MiB, each thread reading {:?} streams at once, best of \
         {reps} passes",
        crate::membw::STREAMS
    )?;
    use crate::table::Align::Right;
    let mut table = crate::table::new(&[("threads", Right), ("GB/s", Right), ("streams", Right)]);
    for (t, r) in counts.iter().zip(&rates) {
        table.add_row(vec![t.to_string(), format!("{:.1}", r.bytes_per_s / 1e9), r.streams.to_string()]);
    }
    write!(out, "{}", crate::table::render(&table))?;
    let rows: Vec<serde_json::Value> = (counts.iter().zip(&rates))
        .map(|(t, r)| serde_json::json!({"threads": t, "bytes_per_s": r.bytes_per_s, "streams": r.streams}))
        .collect();
    Ok(serde_json::json!({"bench": "membw", "mib": mib, "reps": reps, "reads": rows}))
}

/// `kiln bench run SPEC --compare-without PASS`.
struct CompareRequest<'a> {
    spec: &'a std::path::Path,
    pass: &'a str,
    prompt_len: usize,
    new_tokens: usize,
    seed: u64,
    threads: Option<usize>,
}

/// Skips one pass of the pipeline.
struct Without<'a>(&'a str);

impl kiln_compiler::pack::Observer for Without<'_> {
    fn runs_pass(&mut self, pass: &str) -> bool {
        pass != self.0
    }
}

/// Decode tokens/s and the tokens of a greedy generation from the artifact in `dir`.
fn decode_speed(dir: &std::path::Path, req: &CompareRequest) -> Result<(Option<f64>, Vec<i64>, usize)> {
    use kiln_runtime::generate::{generate, Engine, GenerateOptions, Sampling};
    let art = kiln_runtime::artifact::load(dir)?;
    let m = art.manifest();
    let decls = kiln_runtime::weights::manifest_params(m)?;
    let tensors = kiln_runtime::weights::random_tensors(decls, req.seed, crate::run::RANDOM_STD);
    let mut options = kiln_runtime::cpu::CpuOptions::default();
    if let Some(t) = req.threads {
        options.threads = t;
    }
    let mut model = kiln_runtime::cpu::CpuModel::load(&art, tensors.map(Ok), &options)?;
    let vocab = model.vocab_size().context("the artifact has no `logits` output")? as u64;
    let prompts = [(0..req.prompt_len as u64).map(|i| ((i * 7919 + 3) % vocab) as i64).collect::<Vec<_>>()];
    let opts =
        GenerateOptions { max_new_tokens: req.new_tokens, sampling: Sampling::Greedy, stop_tokens: vec![] };
    generate(&mut model, &prompts, &GenerateOptions { max_new_tokens: 1, ..opts.clone() }, &mut |_| {})?;
    let g = generate(&mut model, &prompts, &opts, &mut |_| {})?;
    // The decode program's launches when there is one: that is what a decode step runs, less the
    // weight-only launches the runtime ran once at load.
    let program = m.program_of_kind(kiln_ir::ProgramKind::Decode).unwrap_or(&m.programs[0]);
    let folded = program.weight_only_steps(&m.kernels);
    let launches = (program.steps.iter().enumerate())
        .filter(|(i, s)| matches!(s, kiln_ir::artifact::Step::Launch { .. }) && !folded.contains(i))
        .count();
    Ok((g.stats.decode_tokens_per_s(), g.tokens[0].clone(), launches))
}

fn compare_without(req: &CompareRequest, tables: &mut Tables) -> Result<serde_json::Value> {
    use kiln_compiler::pack::{self, Options, Source, Targets};
    if req.prompt_len == 0 || req.new_tokens == 0 {
        bail!("--prompt-len and --new-tokens must be at least 1");
    }
    kiln_compiler::passes::find(req.pass)?;
    if req.spec.is_dir() {
        bail!("--compare-without compiles a model spec; {} is a directory", req.spec.display());
    }
    let spec = kiln_compiler::spec::load(req.spec)?;
    let context = (req.prompt_len + req.new_tokens + 1) as u64;
    let options = Options { score: false, last_logits: true, ..Options::new(Targets::Cpu, 1, context) };
    let root = std::env::temp_dir().join(format!("kiln-bench-compare-{}", std::process::id()));
    let mut rows = Vec::new();
    for skip in [None, Some(req.pass)] {
        let source = Source::Spec(spec.clone());
        let artifact = match skip {
            None => pack::compile(source, &options, &mut ())?,
            Some(p) => pack::compile(source, &options, &mut Without(p))?,
        };
        let dir = root.join(if skip.is_some() { "without" } else { "with" });
        pack::write(&artifact, &dir)?;
        let measured = decode_speed(&dir, req);
        let _ = std::fs::remove_dir_all(&dir);
        rows.push(measured?);
    }
    let _ = std::fs::remove_dir_all(&root);
    let out = tables.text();
    writeln!(
        out,
        "bench run {}: {} prompt tokens, {} new tokens, greedy, random weights (seed {}), CPU",
        spec.model.name, req.prompt_len, req.new_tokens, req.seed
    )?;
    use crate::table::Align::{Left, Right};
    let mut table = crate::table::new(&[("artifact", Left), ("launches", Right), ("decode tok/s", Right)]);
    let speed = |v: Option<f64>| v.map_or("-".to_string(), |r| format!("{r:.1}"));
    let labels = ["every pass".to_string(), format!("without {}", req.pass)];
    for (label, (tps, _, launches)) in labels.iter().zip(&rows) {
        table.add_row(vec![label.clone(), launches.to_string(), speed(*tps)]);
    }
    let ratio = match (rows[0].0, rows[1].0) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    };
    table.add_row(vec![
        "ratio".to_string(),
        String::new(),
        ratio.map_or("-".to_string(), |r| format!("{r:.2}x")),
    ]);
    write!(out, "{}", crate::table::render(&table))?;
    let differ = rows[0].1.iter().zip(&rows[1].1).position(|(a, b)| a != b);
    match differ {
        None => writeln!(out, "tokens: the same ({})", rows[0].1.len())?,
        Some(i) => writeln!(out, "tokens: differ from new token {i} (kernels sum in another order)")?,
    }
    let artifacts: Vec<serde_json::Value> = (labels.iter().zip(&rows))
        .map(|(label, (tps, _, launches))| {
            serde_json::json!({"artifact": label, "launches": launches, "decode_tokens_per_s": tps})
        })
        .collect();
    Ok(serde_json::json!({
        "bench": "run",
        "model": spec.model.name,
        "prompt_tokens": req.prompt_len,
        "new_tokens": req.new_tokens,
        "seed": req.seed,
        "artifacts": artifacts,
        "decode_ratio": ratio,
        "tokens_differ_from": differ,
    }))
}

/// Runs `once` once to warm up, then `reps` times; returns the best time.
fn best_of(reps: usize, mut once: impl FnMut()) -> Duration {
    once();
    (0..reps.max(1))
        .map(|_| {
            let t = Instant::now();
            once();
            t.elapsed()
        })
        .min()
        .unwrap_or_default()
}

/// kiln's product over `work` items (the kernel's launch shape) on `pool`, split into chunks as a
/// run's launches are; `bufs` are the addresses of the kernel's buffers (x, the weight's and y).
fn kiln_gemm(pool: &Pool, f: Packed, bufs: &[usize], work: usize) {
    let ptrs: Vec<*mut u8> = bufs.iter().map(|&p| p as *mut u8).collect();
    let work = work as i64;
    let job = Job { entry: f, buffers: ptrs.as_ptr(), sizes: std::ptr::null(), first: 0, work, chunks: 0 };
    // SAFETY: `f` is the packed entry of a linear kernel over the buffers of its dtypes and shapes
    // at `bufs`, alive for the launch, and `work` is its work; no sizes are read (the shapes are
    // known).
    unsafe { pool.launch(Job { chunks: chunks(work, pool.threads()), ..job }) };
}

/// `y[m, n] = x[m, k] @ w[n, k]^T` in f32.
fn reference_gemm(x: &[f32], w: &[f32], y: &mut [f32], (m, n, k): (usize, usize, usize)) {
    // SAFETY: x is m x k, w is n x k and y is m x n, row-major; `w^T` is read with row stride 1 and
    // column stride k, which stays inside `w`.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            x.as_ptr(),
            k as isize,
            1,
            w.as_ptr(),
            1,
            k as isize,
            0.0,
            y.as_mut_ptr(),
            n as isize,
            1,
        );
    }
}

/// Deterministic values in [-1, 1).
fn data(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 23) as f32) - 1.0
        })
        .collect()
}

/// What `kiln bench gemm` measures.
struct GemmRequest {
    sizes: Vec<usize>,
    /// M for every size, when not `N`.
    rows: Option<usize>,
    /// K for every size, when not `N`.
    k: Option<usize>,
    threads: usize,
    reps: usize,
    /// `f32`, `bf16`, `fp8`.
    dtypes: Vec<String>,
    /// The Python of the PyTorch column, if one was found; `None` inside when none was, and `None`
    /// for `--no-torch`.
    python: Option<Option<(PathBuf, &'static str)>>,
}

/// The operand types of one row of `kiln bench gemm`.
#[derive(Clone, Copy, Debug, PartialEq)]
enum GemmType {
    F32,
    /// bf16 x, weight and result.
    Bf16,
    /// DeepSeek-V3's FP8 GEMM: x in E4M3 codes with an f32 scale per 1 x [`FP8_BLOCK`] tile, the
    /// weight in codes with one per [`FP8_BLOCK`]-square block, f32 sums, a bf16 result.
    Fp8,
}

/// The weight blocks of `kiln bench gemm --dtype fp8`: DeepSeek-V3's 128 x 128.
const FP8_BLOCK: usize = 128;

impl GemmType {
    fn parse(name: &str) -> GemmType {
        match name {
            "bf16" => GemmType::Bf16,
            "fp8" => GemmType::Fp8,
            _ => GemmType::F32,
        }
    }

    fn name(self) -> &'static str {
        match self {
            GemmType::F32 => "f32",
            GemmType::Bf16 => "bf16",
            GemmType::Fp8 => "fp8",
        }
    }

    /// The dtype of x and of the result.
    fn io(self) -> DType {
        if self == GemmType::F32 {
            DType::F32
        } else {
            DType::BF16
        }
    }

    /// Bytes per weight element (an FP8 weight's scales add 1 / 128^2 of a float each).
    fn weight_bytes(self) -> f64 {
        match self {
            GemmType::F32 => 4.0,
            GemmType::Bf16 => 2.0,
            GemmType::Fp8 => 1.0 + 4.0 / (FP8_BLOCK * FP8_BLOCK) as f64,
        }
    }
}

/// One size of one dtype: the operands as raw bytes of the dtype, and their values in f32.
struct GemmCase {
    ty: GemmType,
    /// Rows of x.
    m: usize,
    /// Rows of the weight.
    n: usize,
    /// Columns of x and the weight.
    k: usize,
    /// The values of x and w (for bf16, the bf16 values, exactly; for FP8, each code times its
    /// block's scale).
    x: Vec<f32>,
    w: Vec<f32>,
    /// For FP8: the codes and scales of x (`[m, k]`, scales `[m, ceil(k / 128)]`) and of the
    /// weight (`[n, k]`, scales `[ceil(n / 128), ceil(k / 128)]`).
    fp8: Option<[(Vec<u8>, Vec<f32>); 2]>,
}

impl GemmCase {
    fn new(ty: GemmType, m: usize, n: usize, k: usize) -> GemmCase {
        let bf16 = |v: Vec<f32>| -> Vec<f32> { v.into_iter().map(|x| bf16_to_f32(f32_to_bf16(x))).collect() };
        let (x, w) = (data(m * k, 1), data(n * k, 2));
        match ty {
            GemmType::F32 => GemmCase { ty, m, n, k, x, w, fp8: None },
            GemmType::Bf16 => GemmCase { ty, m, n, k, x: bf16(x), w: bf16(w), fp8: None },
            GemmType::Fp8 => {
                // x as the bf16 activation it quantises, in DeepSeek-V3's 1 x 128 tiles.
                let (xc, xs, x) = quantize_blocks(&bf16(x), k, 1);
                let (wc, ws, w) = quantize_blocks(&w, k, FP8_BLOCK);
                GemmCase { ty, m, n, k, x, w, fp8: Some([(xc, xs), (wc, ws)]) }
            }
        }
    }

    /// The kernel's input buffers as bytes: x, then the weight (for FP8 each as its codes, then
    /// its scales).
    fn inputs(&self) -> Vec<Vec<u8>> {
        let f32s = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
        let bf16s = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|&x| f32_to_bf16(x).to_le_bytes()).collect() };
        match (self.ty, &self.fp8) {
            (GemmType::F32, _) => vec![f32s(&self.x), f32s(&self.w)],
            (GemmType::Fp8, Some([(xc, xs), (wc, ws)])) => vec![xc.clone(), f32s(xs), wc.clone(), f32s(ws)],
            _ => vec![bf16s(&self.x), bf16s(&self.w)],
        }
    }

    /// The kernel of `y = x @ w^T` for these operands: one op, or for FP8 the `fp8-gemm` fusion of
    /// `dequantize` into `linear` that fuse-kernels makes of a model's FP8 linears.
    fn kernel(&self) -> Result<Kernel> {
        let (m, n, k) = (self.m as u64, self.n as u64, self.k as u64);
        let io = self.ty.io();
        if self.ty != GemmType::Fp8 {
            let x = TensorType::known(io, &[m, k]);
            let w = TensorType::known(io, &[n, k]);
            return Ok(Kernel::for_op(&Op::Linear, &[x, w])?);
        }
        // As fuse-kernels makes a model's FP8 linears (models/bench.toml with FP8).
        let b = FP8_BLOCK as u64;
        let inputs = [
            format!("input {{name = \"x\"}} : f8e4m3[{m}, {k}]"),
            format!("input {{name = \"xs\"}} : f32[{m}, {}]", k.div_ceil(b)),
            format!("input {{name = \"w\"}} : f8e4m3[{n}, {k}]"),
            format!("input {{name = \"ws\"}} : f32[{}, {}]", n.div_ceil(b), k.div_ceil(b)),
        ];
        let mut src = String::from("graph @gemm {\n");
        inputs.iter().enumerate().for_each(|(i, d)| src += &format!("  %{i} = {d}\n"));
        src += &format!("  %4 = fused %0, %1, %2, %3 {{name = \"fp8-gemm\"}} : {io}[{m}, {n}] {{\n");
        inputs.iter().enumerate().for_each(|(i, d)| src += &format!("    %{i} = {d}\n"));
        src += &format!("    %4 = dequantize %0, %1 {{to = f32, block = [1, {b}]}} : f32[{m}, {k}]\n");
        src += &format!("    %5 = dequantize %2, %3 {{to = f32, block = [{b}, {b}]}} : f32[{n}, {k}]\n");
        src += &format!("    %6 = linear %4, %5 : f32[{m}, {n}]\n");
        src += &format!("    %7 = cast %6 {{to = {io}}} : {io}[{m}, {n}]\n");
        src += "    output \"y\" = %7\n  }\n  output \"y\" = %4\n}\n";
        let g = kiln_ir::parse(&src).map_err(|e| anyhow::anyhow!("the FP8 GEMM's graph: {e}"))?;
        let plan = form_kernels(&g)?;
        match plan.kernels.as_slice() {
            [kernel] => Ok(kernel.clone()),
            ks => bail!("the FP8 GEMM formed {} kernels, not one", ks.len()),
        }
    }

    /// The values of a result in the dtype's storage.
    fn values(&self, bytes: &[u8]) -> Vec<f32> {
        match self.ty.io() {
            DType::BF16 => {
                bytes.chunks_exact(2).map(|b| bf16_to_f32(u16::from_le_bytes([b[0], b[1]]))).collect()
            }
            _ => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        }
    }

    /// The largest error of `got` against the f32 reference `want`, as a fraction of what this
    /// dtype allows: sums of k products of values in [-1, 1) differ by their order (1e-4 of
    /// sqrt(k), their typical size), and a bf16 result is also rounded (2^-8 of its value).
    fn error(&self, got: &[f32], want: &[f32]) -> f32 {
        let scale = 1e-4 * (self.k as f32).sqrt();
        let rounding = if self.ty.io() == DType::BF16 { 2f32.powi(-8) } else { 0.0 };
        (got.iter().zip(want))
            .map(|(a, b)| if a.is_nan() { f32::NAN } else { (a - b).abs() / (scale + rounding * b.abs()) })
            .fold(0f32, |m, e| if e.is_nan() || m.is_nan() { f32::NAN } else { m.max(e) })
    }
}

/// `w` (rows of `k`) quantised as DeepSeek-V3 quantises its weights and activations: per block of
/// `rows` x 128 (smaller at the edges), `scale = amax / 448` and each element's E4M3 code of `w /
/// scale`. Returns the codes, the scales (`[ceil(w.len() / k / rows), ceil(k / 128)]`) and the
/// values the codes stand for (code times scale, rounded once in f32, as the kernel's `dequantize`
/// computes them).
fn quantize_blocks(w: &[f32], k: usize, rows: usize) -> (Vec<u8>, Vec<f32>, Vec<f32>) {
    use kiln_ir::interp::numerics::{f8e4m3_from_f32, f8e4m3_to_f32};
    let (nb, kb) = ((w.len() / k).div_ceil(rows), k.div_ceil(FP8_BLOCK));
    let block = |r: usize, c: usize| (r / rows) * kb + c / FP8_BLOCK;
    let mut amax = vec![0f32; nb * kb];
    for (i, v) in w.iter().enumerate() {
        let b = block(i / k, i % k);
        amax[b] = amax[b].max(v.abs());
    }
    let scales: Vec<f32> = amax.iter().map(|&a| if a > 0.0 { a / 448.0 } else { 1.0 }).collect();
    let codes: Vec<u8> =
        w.iter().enumerate().map(|(i, v)| f8e4m3_from_f32(v / scales[block(i / k, i % k)])).collect();
    let values =
        codes.iter().enumerate().map(|(i, &c)| f8e4m3_to_f32(c) * scales[block(i / k, i % k)]).collect();
    (codes, scales, values)
}

/// Runs the benchmark and prints a table to `out`.
fn gemm(req: &GemmRequest, tables: &mut Tables) -> Result<serde_json::Value> {
    let (sizes, threads, reps) = (&req.sizes, req.threads.max(1), req.reps);
    if sizes.is_empty() || sizes.contains(&0) {
        bail!("--sizes needs at least one size, each at least 1");
    }
    if req.rows == Some(0) {
        bail!("--rows 0: give the rows of x, at least 1");
    }
    if req.k == Some(0) {
        bail!("--k 0: give the columns of x and the weight, at least 1");
    }
    if req.dtypes.is_empty() {
        bail!("--dtype needs at least one of f32, bf16, fp8");
    }
    let types: Vec<GemmType> = req.dtypes.iter().map(|d| GemmType::parse(d)).collect();
    // Every case's operands are made before the first runs: an estimate of them (x and w in f32
    // and their prepared copies, the result and the reference's) against the memory free now, so
    // that a size too large is an error and not an allocation failure.
    const GIB: f64 = (1u64 << 30) as f64;
    let need: u128 = (types.iter())
        .flat_map(|_| sizes.iter())
        .map(|&n| {
            let (m, k) = (req.rows.unwrap_or(n) as u128, req.k.unwrap_or(n) as u128);
            8 * (m * k + n as u128 * k) + 8 * m * n as u128
        })
        .sum();
    if let Some(free) = kiln_runtime::host::available_memory() {
        if need > u128::from(free) {
            bail!(
                "--sizes {}: the cases need about {:.1} GiB of memory (each GEMM's operands in f32 and \
                 their prepared copies, its result and the reference's), more than the {:.1} GiB free \
                 now (MemAvailable + SwapFree in /proc/meminfo); give smaller sizes",
                sizes.iter().map(usize::to_string).collect::<Vec<_>>().join(","),
                need as f64 / GIB,
                free as f64 / GIB
            );
        }
    }
    // matrixmultiply reads this once, on its first call.
    std::env::set_var("MATMUL_NUM_THREADS", threads.to_string());

    let (rows, k) = (req.rows, req.k);
    let cases: Vec<GemmCase> = (types.iter())
        .flat_map(|&t| sizes.iter().map(move |&n| GemmCase::new(t, rows.unwrap_or(n), n, k.unwrap_or(n))))
        .collect();
    let kernels: Vec<Kernel> = cases.iter().map(GemmCase::kernel).collect::<Result<_>>()?;
    let module = lower_module(&kernels, Target::Cpu)?;
    let object = cpu::object(&module)?;
    let dir = std::env::temp_dir().join(format!("kiln-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let result = gemm_in(req, &dir, &cases, &kernels, &module, &object, tables);
    let _ = std::fs::remove_dir_all(&dir);
    result.map(|(rows, torch)| {
        serde_json::json!({
            "bench": "gemm", "dtypes": req.dtypes, "threads": threads, "reps": reps.max(1),
            "torch": torch, "sizes": rows,
        })
    })
}

/// [`gemm`] with its scratch folder `dir` (removed by the caller): the table's rows as JSON, and
/// the PyTorch version or why it was skipped.
fn gemm_in(
    req: &GemmRequest,
    dir: &Path,
    cases: &[GemmCase],
    kernels: &[Kernel],
    module: &kiln_compiler::codegen::LoweredModule,
    object: &[u8],
    tables: &mut Tables,
) -> Result<(Vec<serde_json::Value>, serde_json::Value)> {
    let (threads, reps) = (req.threads.max(1), req.reps.max(1));
    let path = dir.join("gemm.so");
    cpu::link_shared_library(object, &path)?;
    // SAFETY: the library was just linked from kiln's kernels; its one initialiser (where kernels
    // use AMX) asks Linux for the tile state.
    let lib = unsafe { libloading::Library::new(&path) }.context("loading the benchmark kernels")?;
    // kiln's kernels run on the runtime's thread pool, started once as a run starts it (the
    // calling thread is one of the threads), not on threads started per call.
    let workers = Workers::start(threads);
    let pool = workers.pool();

    // References first (matrixmultiply, f32 on the operands' values), then PyTorch on the same
    // operands in one process, then kiln.
    let mut reference = Vec::with_capacity(cases.len());
    for c in cases {
        let mut y = vec![0f32; c.m * c.n];
        let t = best_of(reps, || reference_gemm(&c.x, &c.w, &mut y, (c.m, c.n, c.k)));
        reference.push((y, t));
    }
    let torch = match &req.python {
        None => Err("--no-torch".to_string()),
        Some(None) => Err("no Python with torch: pass --python or set KILN_PYTHON".to_string()),
        Some(Some((python, _))) => torch_gemm(python, dir, cases, req),
    };

    let out = tables.text();
    write!(out, "gemm, y = x @ w^T, {threads} threads, best of {reps} after a warm-up")?;
    match &torch {
        Ok((version, _)) => writeln!(out, "; PyTorch {version}")?,
        Err(why) => writeln!(out, "; PyTorch skipped: {why}")?,
    }
    use crate::table::Align::{Left, Right};
    let mut table = crate::table::new(&[
        ("dtype", Left),
        ("M", Right),
        ("N", Right),
        ("K", Right),
        ("kiln GFLOP/s", Right),
        ("kiln weight GB/s", Right),
        ("matrixmultiply GFLOP/s", Right),
        ("PyTorch GFLOP/s", Right),
        ("kiln / matrixmultiply", Right),
        ("kiln / PyTorch", Right),
    ]);
    let mut rows = Vec::new();
    for (i, ((c, kernel), lowered)) in cases.iter().zip(kernels).zip(&module.kernels).enumerate() {
        let (m, n, k) = (c.m, c.n, c.k);
        let work = match lowered.launch {
            LaunchShape::Cpu { work } => work.as_known().unwrap_or(n as u64) as usize,
            LaunchShape::CpuPhases { .. } => bail!("the GEMM kernel is phased, not one pass"),
            LaunchShape::Gpu { .. } => bail!("the CPU module has a GPU kernel"),
        };
        let symbol = format!("{}{}", kernel.name, cpu::PACKED_SUFFIX);
        // SAFETY: every packed entry has the `Packed` signature.
        let f: Packed = unsafe { *lib.get::<Packed>(symbol.as_bytes())? };
        // In the runtime's aligned memory, as a run's buffers are (a tile row of x split over two
        // cache lines costs AMX a quarter of its speed).
        let aligned = |bytes: &[u8]| -> Result<Memory> {
            let mut mem = Memory::zeroed(bytes.len() as u64).context("allocating the GEMM's operands")?;
            mem.bytes_mut().copy_from_slice(bytes);
            Ok(mem)
        };
        let inputs = c.inputs().iter().map(|b| aligned(b)).collect::<Result<Vec<Memory>>>()?;
        let mut y = aligned(&vec![0u8; m * n * c.ty.io().size_bytes() as usize])?;
        let mut bufs: Vec<usize> = inputs.iter().map(|mem| mem.as_ptr() as usize).collect();
        bufs.push(y.bytes_mut().as_mut_ptr() as usize);
        let t_kiln = best_of(reps, || kiln_gemm(&pool, f, &bufs, work));
        let (want, t_ref) = &reference[i];
        let what = c.ty.name();
        let shape = format!("M = {m}, N = {n}, K = {k}");
        let err = c.error(&c.values(y.bytes()), want);
        if err.is_nan() || err > 1.0 {
            bail!("kiln's {what} GEMM and matrixmultiply disagree at {shape} ({err:.2} of the tolerance)");
        }
        let gflops = |t: Duration| 2.0 * (m * n * k) as f64 / t.as_secs_f64() / 1e9;
        let (g, r) = (gflops(t_kiln), gflops(*t_ref));
        let gbs = (n * k) as f64 * c.ty.weight_bytes() / t_kiln.as_secs_f64() / 1e9;
        let p = match (&torch, c.ty) {
            (_, GemmType::Fp8) | (Err(_), _) => None,
            (Ok((_, secs)), _) => {
                let got = read_f32(&dir.join(format!("y-{what}-{n}.f32")))?;
                let err = c.error(&got, want);
                if err.is_nan() || err > 1.0 {
                    bail!("PyTorch's {what} GEMM and matrixmultiply disagree at {shape} ({err:.2} of the tolerance)");
                }
                let at = (cases.iter().filter(|c| c.ty != GemmType::Fp8)).position(|o| std::ptr::eq(o, c));
                at.map(|at| gflops(Duration::from_secs_f64(secs[at])))
            }
        };
        let cell = |v: Option<f64>, digits: usize| v.map_or("-".to_string(), |v| format!("{v:.digits$}"));
        table.add_row(vec![
            what.to_string(),
            m.to_string(),
            n.to_string(),
            k.to_string(),
            format!("{g:.1}"),
            format!("{gbs:.1}"),
            format!("{r:.1}"),
            cell(p, 1),
            format!("{:.2}", g / r),
            cell(p.map(|p| g / p), 2),
        ]);
        rows.push(serde_json::json!({
            "dtype": what, "m": m, "n": n, "k": k, "kiln_gflops": g, "kiln_weight_gbs": gbs,
            "matrixmultiply_gflops": r, "ratio": g / r, "torch_gflops": p, "torch_ratio": p.map(|p| g / p),
        }));
    }
    write!(out, "{}", crate::table::render(&table))?;
    if cases.iter().any(|c| c.ty != GemmType::F32) {
        writeln!(out, "(bf16 and fp8 rows: matrixmultiply computes in f32 on the same values)")?;
    }
    let torch = match torch {
        Ok((version, _)) => serde_json::json!({"version": version}),
        Err(why) => serde_json::json!({"skipped": why}),
    };
    Ok((rows, torch))
}

/// A file of little-endian f32 values.
fn read_f32(path: &Path) -> Result<Vec<f32>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
}

/// Runs tools/bench/gemm_torch.py on the f32 and bf16 cases' operands, written to `dir`: the torch
/// version and the best seconds of each of those cases, in order; or why it could not run.
fn torch_gemm(
    python: &Path,
    dir: &Path,
    cases: &[GemmCase],
    req: &GemmRequest,
) -> Result<(String, Vec<f64>), String> {
    let cases: Vec<&GemmCase> = cases.iter().filter(|c| c.ty != GemmType::Fp8).collect();
    if cases.is_empty() {
        return Err("no f32 or bf16 GEMM asked for".to_string());
    }
    for c in &cases {
        for (name, v) in [("x", &c.x), ("w", &c.w)] {
            let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            let path = dir.join(format!("{name}-{}-{}.f32", c.ty.name(), c.n));
            std::fs::write(&path, bytes).map_err(|e| format!("writing {}: {e}", path.display()))?;
        }
    }
    let join = |v: Vec<String>| v.join(",");
    let dtypes: Vec<String> = req.dtypes.iter().filter(|d| *d != "fp8").cloned().collect();
    let mut args: Vec<std::ffi::OsString> = vec![
        "--dir".into(),
        dir.into(),
        "--sizes".into(),
        join(req.sizes.iter().map(|n| n.to_string()).collect()).into(),
        "--dtypes".into(),
        join(dtypes).into(),
        "--threads".into(),
        req.threads.to_string().into(),
        "--reps".into(),
        req.reps.max(1).to_string().into(),
    ];
    if let Some(k) = req.k {
        args.extend(["--k".into(), k.to_string().into()]);
    }
    let json = crate::bench_train::python_json(python, "gemm_torch.py", &args)?;
    let results = json["results"].as_array().ok_or("gemm_torch.py printed no results")?;
    let mut seconds = Vec::with_capacity(cases.len());
    for c in cases {
        let what = c.ty.name();
        let s = results
            .iter()
            .find(|r| r["dtype"] == what && r["n"].as_u64() == Some(c.n as u64))
            .and_then(|r| r["seconds"].as_f64())
            .ok_or_else(|| format!("gemm_torch.py timed no {what} GEMM at n = {}", c.n))?;
        seconds.push(s);
    }
    let version = json["torch"].as_str().unwrap_or("?");
    let onednn = if json["mkldnn"].as_bool() == Some(true) { " (oneDNN)" } else { "" };
    Ok((format!("{version}{onednn}"), seconds))
}
