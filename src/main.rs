//! The `kiln` command line. Each verb is a function that does its I/O here and its work in the
//! library crates; errors carry their own diagnostics and are printed as they are.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

use kiln_compiler::{build, inspect, passes, spec};
use kiln_ir::{text, ProgramKind};

/// `eprintln!`, but the line goes out in one write. Rust's stderr is unbuffered, so `eprintln!`
/// writes each piece of its format separately, and under `mpirun` the ranks' lines, which share
/// one pipe, interleave mid-line. A single write of a line (under `PIPE_BUF`) stays whole.
macro_rules! say {
    ($($arg:tt)*) => {{
        let mut line = format!($($arg)*);
        line.push('\n');
        // Like `eprintln!` a failed write to stderr has nowhere to be reported, but unlike it
        // this does not panic.
        let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), line.as_bytes());
    }};
}

mod bench;
mod bench_train;
mod cache;
mod chat;
mod compile;
mod dist;
mod export_hf;
mod grpo;
mod inspect_train;
mod membw;
mod model;
mod monitor;
mod perplexity;
mod pipeline;
mod plot;
mod report;
mod run;
mod schedule;
mod serve;
mod sft;
mod table;
mod tokenize;
mod train;

/// kiln: an ahead-of-time compiler for DeepSeek-V3-class models.
#[derive(Parser)]
#[command(name = "kiln", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the graph IR of a model spec (`.toml` or Hugging Face `config.json`).
    Ir {
        /// Model spec: `models/*.toml` or a Hugging Face `config.json`.
        spec: PathBuf,
        /// Print only this decoder layer (an MTP layer counts after the main ones).
        #[arg(long)]
        layer: Option<u64>,
        /// Run the pipeline up to and including this pass first (see `kiln passes`).
        #[arg(long)]
        after: Option<String>,
        /// Print one program of the module `kiln compile` builds (`prefill` or `decode`, over the
        /// KV cache, or `score`, the next-token loss) instead of the stateless forward graph.
        #[arg(long, value_parser = ["prefill", "decode", "score"], conflicts_with = "layer")]
        program: Option<String>,
        /// Print the whole module `kiln compile` builds: its parameters, states and every program.
        #[arg(long, conflicts_with_all = ["layer", "program"])]
        module: bool,
        /// `kir`, the text IR (which `kiln check` and the parser read), or `dot`, a Graphviz drawing
        /// (`kiln ir models/tiny.toml --format dot | dot -Tsvg > tiny.svg`).
        #[arg(long, value_enum, default_value = "kir")]
        format: IrFormat,
        /// Write to this file (atomically) instead of standard output.
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// Parse and verify a `.kir` file.
    Check {
        /// The `.kir` file.
        file: PathBuf,
    },
    /// Summarise a model: parameters, activated parameters, FLOPs and KV-cache bytes per token;
    /// with --train, the memory of a training run, per device and in total, counted from the
    /// compiled train steps' buffers.
    Inspect {
        spec: PathBuf,
        /// Context length for the attention FLOPs of one decoded token, at most the model's
        /// positions [default: 4096].
        #[arg(long)]
        context: Option<u64>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Print the memory table of a training run: a baseline (the spec's dtype, f32 moments, no
        /// recomputation, no FP8) against kiln's recipe (BF16 moments, recomputation, FP8 with
        /// --fp8 or a spec with [quantization]).
        #[arg(long)]
        train: bool,
        /// With --train: the recipe trains in FP8 (DeepSeek-V3's 128x128 blocks when the spec has no
        /// [quantization]).
        #[arg(long, requires = "train", conflicts_with = "no_fp8")]
        fp8: bool,
        /// With --train: the recipe leaves the spec's [quantization] out.
        #[arg(long, requires = "train")]
        no_fp8: bool,
        /// With --train: sequences per micro-batch.
        #[arg(long, requires = "train", default_value_t = 1, value_name = "M")]
        micro_batch: u64,
        /// With --train: tokens per sequence [default: 4096, or the model's context when shorter].
        #[arg(long, requires = "train", value_name = "T")]
        seq_len: Option<u64>,
        /// With --train: data-parallel replicas.
        #[arg(long, requires = "train", default_value_t = 1, value_name = "N")]
        dp: u64,
        /// With --train: pipeline ranks (the schedule's stages, from the cost model's partition).
        #[arg(long, requires = "train", default_value_t = 1, value_name = "N")]
        pp: u32,
        /// With --train: expert-parallel ranks, which divide the routed experts.
        #[arg(long, requires = "train", default_value_t = 1, value_name = "N")]
        ep: u64,
        /// With --train and --dp: AdamW's states split over the replicas (ZeRO stage 1).
        #[arg(long, requires = "train")]
        zero1: bool,
        /// With --train and --pp: `dualpipe` (default), `dualpipev`, `1f1b` or `zb1p`.
        #[arg(long, requires = "train")]
        schedule: Option<String>,
        /// With --train and --pp: micro-batches per step (default 2·P).
        #[arg(long, requires = "train", value_name = "N")]
        micro_batches: Option<u32>,
        /// With --train: λ of the MTP loss (its modules are trained, and counted, when positive).
        #[arg(long, requires = "train", default_value_t = 0.0)]
        mtp_lambda: f64,
        /// With --train: compile every decoder layer, not one of each kind (slow on large models).
        #[arg(long, requires = "train")]
        full: bool,
    },
    /// Convert a Hugging Face `config.json` (deepseek_v3, deepseek_v2) into a kiln TOML spec.
    ImportHf {
        config: PathBuf,
        /// Write to this file (atomically) instead of standard output.
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// Write a Hugging Face checkpoint folder (config.json, model.safetensors) of a model spec with
    /// seeded random weights, which transformers loads as it is.
    ExportHf {
        spec: PathBuf,
        /// The seed of the random weights (the same weights as `kiln run --random-weights SEED`).
        #[arg(long, value_name = "SEED")]
        random_weights: u64,
        /// The folder to write (atomically).
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Generate tokens from a prompt (token ids, or text with the weights' tokenizer.json): an
    /// artifact on the CPU, or a spec (or an artifact's graph) on the reference interpreter with
    /// --interp.
    #[command(group(clap::ArgGroup::new("params").args(["weights", "random_weights"])))]
    #[command(group(clap::ArgGroup::new("prompt_source").required(true).args(["prompt", "prompt_ids"])))]
    Run {
        /// An artifact directory from `kiln compile`; a Hugging Face model folder (config.json,
        /// weights, tokenizer), compiled for this CPU on first use into a cache and reused after;
        /// or with --interp a model spec (`models/*.toml`, a Hugging Face `config.json` or folder).
        model: PathBuf,
        /// A Hugging Face checkpoint: a folder with `model.safetensors` or a sharded index.
        #[arg(long)]
        weights: Option<PathBuf>,
        /// Use seeded random weights instead of a checkpoint.
        #[arg(long, value_name = "SEED")]
        random_weights: Option<u64>,
        /// Run on the reference interpreter (exact, slow) instead of the compiled kernels.
        #[arg(long)]
        interp: bool,
        /// Where an artifact runs: the CPU (`kernels.so`) or CUDA device 0 (`kernels.ptx`).
        #[arg(long, value_enum, default_value = "cpu")]
        device: run::Device,
        /// Threads per kernel launch on the CPU (default: every core).
        #[arg(long)]
        threads: Option<usize>,
        /// The prompt as comma-separated token ids, e.g. `0,17,42`.
        #[arg(long, value_delimiter = ',', allow_negative_numbers = true)]
        prompt_ids: Vec<i64>,
        /// The prompt as text, encoded by the `tokenizer.json` in the --weights folder; the
        /// continuation is printed as text as it comes.
        #[arg(long)]
        prompt: Option<String>,
        /// How many tokens to generate at most.
        #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..))]
        max_new_tokens: u64,
        /// Keep generating past the end-of-sequence token.
        #[arg(long)]
        ignore_eos: bool,
        /// More token ids that end generation, comma-separated.
        #[arg(long, value_delimiter = ',', allow_negative_numbers = true)]
        stop_ids: Vec<i64>,
        #[command(flatten)]
        sampling: SamplingArgs,
        /// After generation, print the rows each expert of each MoE layer received (compiled
        /// artifacts only).
        #[arg(long)]
        expert_load: bool,
        /// After generation, print the time spent in each kernel, most first (compiled artifacts on
        /// the CPU only).
        #[arg(long)]
        profile: bool,
        /// Write a Chrome/Perfetto trace of the run to FILE: every program run and every kernel
        /// launch in it, named by the kernel's fusion rule (or op) and scope (compiled artifacts
        /// only; open it at ui.perfetto.dev or chrome://tracing).
        #[arg(long, value_name = "FILE")]
        trace: Option<PathBuf>,
        /// Write every logits row generation reads (the last position of each sequence, each step)
        /// to FILE, one line of numbers per row: to compare devices (scripts/gpu-check.sh).
        #[arg(long, value_name = "FILE")]
        dump_logits: Option<PathBuf>,
        /// Decode speculatively with the MTP module (DeepSeek-V3 §5.4.3): each step checks the
        /// module's draft of the next token with the main model while making the token before it,
        /// so an accepted draft gives two tokens per pass. Greedy, the tokens are those of plain
        /// greedy decoding; sampled, they have plain sampling's distribution. The report gives the
        /// acceptance rate. Needs an artifact compiled with `kiln compile --speculative`.
        #[arg(long, conflicts_with = "interp")]
        speculative: bool,
        /// Print one JSON document on standard output at the end (the tokens, the text, each
        /// token's logit and probability, the speeds, and what --expert-load and --profile
        /// measured) instead of the generated text; the report still goes to standard error.
        #[arg(long)]
        json: bool,
        /// Split the routed experts over N processes started by `mpirun -n N`, each holding its
        /// share of every MoE layer's experts (an artifact from `kiln compile --pp 1 --ep N`).
        #[arg(long, value_name = "N")]
        ep: Option<u64>,
        /// With --ep: how long a process waits for the others in a collective before it ends the
        /// job.
        #[arg(long, value_name = "SECS", default_value_t = 300.0, requires = "ep")]
        comm_timeout: f64,
    },
    /// Chat with a model on the terminal: each line of standard input (or each --message) is a user
    /// turn; the conversation is rendered with the chat template of the tokenizer folder's
    /// tokenizer_config.json and the reply is printed as it comes.
    #[command(group(clap::ArgGroup::new("params").args(["weights", "random_weights"])))]
    Chat {
        #[command(flatten)]
        model: ModelArgs,
        /// A system message that opens the conversation (and stays after /reset).
        #[arg(long)]
        system: Option<String>,
        /// A user turn to send instead of reading standard input (repeatable: one turn each, in
        /// order).
        #[arg(long)]
        message: Vec<String>,
        /// Tokens per reply at most (fewer when the context leaves less room).
        #[arg(long, default_value_t = 256, value_parser = at_least_one)]
        max_new_tokens: usize,
        #[command(flatten)]
        sampling: SamplingArgs,
        /// Print each turn's prompt and reply token ids to standard error (and, with --speculative,
        /// the drafts accepted).
        #[arg(long)]
        verbose: bool,
        /// Decode each reply speculatively with the MTP module (DeepSeek-V3 §5.4.3), as `kiln run
        /// --speculative` does: greedy replies are plain decoding's. Needs an artifact compiled
        /// with `kiln compile --speculative`.
        #[arg(long)]
        speculative: bool,
    },
    /// Serve a model over HTTP with OpenAI's API (completions and chat completions, streamed or
    /// not), batching concurrent requests.
    #[command(group(clap::ArgGroup::new("params").args(["weights", "random_weights"])))]
    Serve {
        #[command(flatten)]
        model: ModelArgs,
        /// The address to listen on.
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        /// The port to listen on (0: any free one; the first line printed says which).
        #[arg(long, default_value_t = 8000)]
        port: u16,
        /// Requests per batch at most (default: the artifact's --max-batch).
        #[arg(long)]
        max_batch: Option<u64>,
        /// Milliseconds a batch's first request waits for others before the batch starts (it starts
        /// at once when full).
        #[arg(long, value_name = "MS", default_value_t = 0)]
        batch_window: u64,
        /// Decode every request speculatively with the MTP module (DeepSeek-V3 §5.4.3), as `kiln
        /// run --speculative` does: greedy answers are plain decoding's. Needs an artifact compiled
        /// with `kiln compile --speculative`.
        #[arg(long)]
        speculative: bool,
    },
    /// Compile a model spec or a `.kir` graph into an artifact directory (see README: the artifact).
    Compile(compile::Args),
    /// Train a model spec on token data: forward, loss, backward, clipping and AdamW as one
    /// train-step program, with checkpoints and a metrics log.
    Train {
        #[command(flatten)]
        args: TrainArgs,
        /// Optimizer steps.
        #[arg(long)]
        steps: u64,
    },
    /// Supervised fine-tuning on conversations: `kiln train` on chat JSONL (one `{"messages":
    /// [{"role", "content"}, ...]}` per line) rendered with the model's chat template, the loss over
    /// the assistant's tokens alone. Defaults are DeepSeek-V3's SFT: 2 epochs, lr 5e-6 decayed by a
    /// cosine to 1e-6.
    Sft {
        #[command(flatten)]
        args: TrainArgs,
        /// Passes over the conversations.
        #[arg(long, default_value_t = sft::EPOCHS)]
        epochs: u64,
        /// Optimizer steps, instead of --epochs.
        #[arg(long, conflicts_with = "epochs")]
        steps: Option<u64>,
    },
    /// Reinforcement learning with GRPO (DeepSeekMath, DeepSeek-V3 §5.2.2): per prompt, a group of
    /// completions sampled from the compiled model, rule-based rewards, group-relative advantages,
    /// and the clipped policy-ratio objective with a KL penalty to the initial model.
    Grpo {
        /// A model spec, a Hugging Face `config.json`, or a Hugging Face folder (with its weights
        /// and tokenizer unless --weights/--random-weights and --tokenizer say otherwise).
        model: PathBuf,
        /// Initial weights: a Hugging Face checkpoint folder (an SFT run's `step-N`, say).
        #[arg(long)]
        weights: Option<PathBuf>,
        /// Seeded random initial weights instead of a checkpoint.
        #[arg(long, value_name = "SEED")]
        random_weights: Option<u64>,
        /// The folder of tokenizer.json (and tokenizer_config.json for `messages` prompts).
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        /// JSONL, one prompt per line: `{"prompt": TEXT, "answer": TEXT}` or `{"messages": [...],
        /// "answer": TEXT}` (rendered by the chat template with the assistant's turn opened).
        #[arg(long)]
        prompts: PathBuf,
        /// Where `metrics.jsonl`, the compiled programs and the checkpoints go.
        #[arg(long)]
        out: PathBuf,
        /// Steps: each samples, rewards and updates once per --updates.
        #[arg(long, default_value_t = 10)]
        steps: u64,
        /// Prompts per step (in order, wrapping around).
        #[arg(long, default_value_t = 4)]
        prompts_per_step: usize,
        /// Completions per prompt (G).
        #[arg(long, default_value_t = 8)]
        group: usize,
        #[arg(long, default_value_t = 1.0)]
        temperature: f32,
        #[arg(long, default_value_t = 1.0, value_parser = probability)]
        top_p: f32,
        #[arg(long, default_value_t = 32, value_parser = at_least_one)]
        max_new_tokens: usize,
        /// The learning rate (DeepSeekMath's GRPO: 1e-6).
        #[arg(long, default_value_t = 1e-6)]
        lr: f64,
        /// β, the weight of the KL penalty to the reference model (DeepSeekMath: 0.04).
        #[arg(long, default_value_t = 0.04)]
        kl: f64,
        /// ε, the clip of the policy ratio.
        #[arg(long, default_value_t = 0.2)]
        clip_ratio: f64,
        /// Optimizer updates per sampled batch (1: on-policy, as DeepSeekMath).
        #[arg(long, default_value_t = 1)]
        updates: usize,
        /// The rewards, summed: `exact` (1 for the exact answer) and `format` (0.1 when the
        /// completion ends on its own and matches --format-pattern).
        #[arg(long, default_values_t = ["exact".to_string()])]
        reward: Vec<String>,
        /// The regular expression the whole completion must match for the `format` reward.
        #[arg(long, default_value = r"\S+")]
        format_pattern: String,
        /// The sampling seed (step k samples with seed + k).
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Threads per kernel launch (default: every core).
        #[arg(long)]
        threads: Option<usize>,
        /// Save a checkpoint every K steps, K at least 1 (and always after the last).
        #[arg(long, value_name = "K", value_parser = clap::value_parser!(u64).range(1..))]
        save_every: Option<u64>,
        /// Continue the run a checkpoint of it (`--out`'s `step-N`) left, to --steps in all: give
        /// the run's model and initial weights (its reference model) and sampling settings again.
        #[arg(long, value_name = "DIR")]
        resume: Option<PathBuf>,
        #[command(flatten)]
        settings: train::Settings,
    },
    /// One self-contained HTML page of a `kiln train` run (loss, gradient norms, learning rate,
    /// expert-load heatmaps, bias trajectories, alerts), from its metrics.jsonl.
    Report {
        /// The `--out` folder of a `kiln train` run.
        run_dir: PathBuf,
        /// Where to write the page (default: RUN_DIR/report.html), atomically.
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// Another run whose loss the loss chart draws too (repeatable); each run's mean loss over
        /// its last 20 steps is printed against RUN_DIR's.
        #[arg(long, value_name = "RUN_DIR")]
        compare: Vec<PathBuf>,
        /// Also write the loss chart alone to this SVG file.
        #[arg(long, value_name = "FILE")]
        loss_svg: Option<PathBuf>,
    },
    /// Mean next-token cross-entropy and perplexity of a model on token data, from an artifact's
    /// `score` program (or, with --interp, the reference interpreter).
    Perplexity {
        /// An artifact directory from `kiln compile`, or with --interp a model spec.
        model: PathBuf,
        /// A Hugging Face checkpoint: a folder with `model.safetensors` or a sharded index.
        #[arg(long)]
        weights: Option<PathBuf>,
        /// Use seeded random weights instead of a checkpoint.
        #[arg(long, value_name = "SEED")]
        random_weights: Option<u64>,
        /// The tokens: a `.safetensors` file with an integer tensor `tokens` [N, T+1], or a `.bin`
        /// stream of little-endian ids (with --dtype and --seq-len).
        #[arg(long)]
        data: PathBuf,
        /// The ids' type in a `.bin` stream: u16 or u32.
        #[arg(long)]
        dtype: Option<String>,
        /// The targets per row of a `.bin` stream (each row holds one token more).
        #[arg(long)]
        seq_len: Option<u64>,
        /// Rows per run (at most the artifact's --max-batch).
        #[arg(long, default_value_t = 1)]
        batch: usize,
        /// Run on the reference interpreter (exact, slow) instead of the compiled kernels.
        #[arg(long)]
        interp: bool,
        /// Where an artifact runs: the CPU (`kernels.so`) or CUDA device 0 (`kernels.ptx`).
        #[arg(long, value_enum, default_value = "cpu")]
        device: run::Device,
        /// Threads per kernel launch on the CPU (default: every core).
        #[arg(long)]
        threads: Option<usize>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Measure generated code against a reference.
    Bench {
        /// Print one JSON document with the figures instead of the table.
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        what: bench::BenchCommand,
    },
    /// Simulate a pipeline schedule (1F1B, ZB1P, DualPipe, DualPipeV): per rank the bubble, the
    /// peak activations and the parameter copies; optionally an SVG timeline and a Perfetto trace.
    Schedule {
        /// Pipeline ranks.
        #[arg(long)]
        pp: u32,
        /// Micro-batches per step (DualPipe: both directions together).
        #[arg(long)]
        micro_batches: u32,
        /// `1f1b`, `zb1p`, `dualpipe` or `dualpipev`.
        #[arg(long)]
        schedule: String,
        /// Costs F,B,W[,FB]: a forward chunk, a full backward chunk, the backward for weights, and
        /// an overlapped forward and backward pair (default F+B).
        #[arg(long, default_value = "1,2,1", allow_hyphen_values = true)]
        cost: String,
        /// Cost of one point-to-point transfer, send to arrival.
        #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
        comm: f64,
        /// Write the timeline as SVG to FILE (atomically).
        #[arg(long, value_name = "FILE")]
        svg: Option<PathBuf>,
        /// Write a Chrome/Perfetto trace (JSON) to FILE (atomically).
        #[arg(long, value_name = "FILE")]
        trace: Option<PathBuf>,
        /// Print JSON (the report and the per-rank lists) instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// List the compiler passes in pipeline order.
    Passes,
    /// Check the toolchain: MLIR, LLVM (NVPTX and host targets), ptxas, and CUDA devices.
    Doctor,
    /// What the caches hold: the kernel cache (each kernel's object, PTX and ptxas check, reused by
    /// later compiles) and the artifacts of Hugging Face folders compiled on first run; --clear
    /// removes both.
    Cache {
        /// Remove every cached kernel and compiled model folder (later compiles make them again).
        #[arg(long)]
        clear: bool,
        /// Print JSON instead of the lines.
        #[arg(long)]
        json: bool,
    },
}

/// The model of `kiln chat` and `kiln serve`.
#[derive(clap::Args)]
struct ModelArgs {
    /// An artifact directory from `kiln compile`; a Hugging Face model folder (its config.json,
    /// weights, tokenizer and chat template), compiled for this CPU on first use into a cache; or
    /// with --interp a model spec.
    model: PathBuf,
    /// A Hugging Face checkpoint folder (its tokenizer.json and tokenizer_config.json give the text
    /// side unless --tokenizer says otherwise).
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Use seeded random weights instead of a checkpoint.
    #[arg(long, value_name = "SEED")]
    random_weights: Option<u64>,
    /// The folder of the model's tokenizer.json and tokenizer_config.json (default: --weights).
    #[arg(long, value_name = "DIR")]
    tokenizer: Option<PathBuf>,
    /// Run on the reference interpreter (exact, slow) instead of the compiled kernels.
    #[arg(long)]
    interp: bool,
    /// Threads per kernel launch on the CPU (default: every core).
    #[arg(long)]
    threads: Option<usize>,
}

impl ModelArgs {
    fn source(&self, command: &str) -> Result<model::Source> {
        check_threads(self.threads)?;
        let given = self.weights.is_some() || self.random_weights.is_some();
        let resolved = cache::resolve(&self.model, given, self.interp, command)?;
        Ok(model::Source {
            model: resolved.model,
            weights: self.weights.clone().or(resolved.weights),
            random_seed: self.random_weights,
            interp: self.interp,
            threads: self.threads,
        })
    }
}

/// A count of at least 1, for clap.
fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        Ok(_) => Err("must be at least 1".into()),
        Err(e) => Err(format!("not a whole number: {e}")),
    }
}

/// Nucleus sampling's top-p, in (0, 1], for clap (checked even when decoding is greedy and does
/// not read it: a value outside is a mistake either way).
fn probability(s: &str) -> Result<f32, String> {
    match s.parse::<f32>() {
        Ok(p) if p > 0.0 && p <= 1.0 => Ok(p),
        Ok(p) => Err(format!("top-p is a probability in (0, 1], not {p}")),
        Err(e) => Err(format!("not a number: {e}")),
    }
}

/// Sampling flags, as `kiln run` has them.
#[derive(clap::Args)]
struct SamplingArgs {
    /// Sampling temperature; 0 (the default) is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Nucleus sampling: keep the most likely tokens up to this probability (with --temperature).
    #[arg(long, default_value_t = 1.0, value_parser = probability)]
    top_p: f32,
    /// Seed of the sampler (with --temperature).
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    cache::configure_kernel_cache();
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // A closed pipe (`kiln ir ... | head`) is not an error.
            if e.downcast_ref::<io::Error>().is_some_and(|io| io.kind() == io::ErrorKind::BrokenPipe) {
                return ExitCode::SUCCESS;
            }
            say!("{}", render(&e));
            ExitCode::FAILURE
        }
    }
}

/// Diagnostics render themselves (`error: ...` with a source excerpt); other errors get the prefix.
/// Causes are appended unless the message already says them (many library errors include their
/// source in their own text).
fn render(e: &anyhow::Error) -> String {
    let mut text = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !text.contains(&c) {
            text = format!("{text}: {c}");
        }
    }
    if text.starts_with("error:") {
        text
    } else {
        format!("error: {text}")
    }
}

/// The arguments `kiln train` and `kiln sft` share.
#[derive(clap::Args)]
struct TrainArgs {
    /// A model spec (`models/*.toml`), a Hugging Face `config.json`, or a Hugging Face folder
    /// (its config.json, and its weights unless --weights or --random-weights says otherwise).
    model: PathBuf,
    /// Initial weights: a Hugging Face checkpoint folder.
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Seeded random initial weights instead of a checkpoint.
    #[arg(long, value_name = "SEED")]
    random_weights: Option<u64>,
    /// The training data. `kiln train`: tokens in `kiln perplexity`'s formats (`.safetensors` with
    /// `tokens` [N, T+1], or a `.bin` stream with --dtype and --seq-len), or text tokenised by the
    /// model's tokenizer.json (`.txt`/`.md` one document, `.jsonl` one `{"text": ...}` per line;
    /// with --seq-len). `kiln sft`: chat JSONL, one `{"messages": [...]}` per line.
    #[arg(long)]
    data: PathBuf,
    /// The tokenizer.json (or its folder, which for `kiln sft` also holds tokenizer_config.json's
    /// chat template) of text data (default: the model's folder, or the initial weights').
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    #[arg(long)]
    dtype: Option<String>,
    /// Tokens per row (`kiln sft`: longer conversations are cut; default: the longest one).
    #[arg(long)]
    seq_len: Option<u64>,
    /// Rows per step.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Rows per micro-batch: each step's batch is split into batch / M micro-batches whose
    /// gradients are accumulated before the update (the same step, in less memory).
    #[arg(long, value_name = "M")]
    micro_batch: Option<usize>,
    /// The peak learning rate [default: 1e-3; kiln sft: 5e-6].
    #[arg(long)]
    lr: Option<f64>,
    /// The floor of the cosine and DeepSeek schedules [default: 0; kiln sft: 1e-6].
    #[arg(long)]
    min_lr: Option<f64>,
    /// [default: constant; kiln sft: cosine]
    #[arg(long, value_enum)]
    schedule: Option<train::Schedule>,
    /// Linear warmup steps.
    #[arg(long, default_value_t = 0)]
    warmup: u64,
    #[command(flatten)]
    settings: train::Settings,
    /// Where checkpoints (`step-N/`) and `metrics.jsonl` go.
    #[arg(long)]
    out: PathBuf,
    /// Save a checkpoint every K steps, K at least 1 (and always after the last).
    #[arg(long, value_name = "K", value_parser = clap::value_parser!(u64).range(1..))]
    save_every: Option<u64>,
    /// Continue from a checkpoint folder of an earlier run.
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Take the rows in a fresh seeded permutation each epoch instead of in order (a resume
    /// keeps the checkpoint's seed).
    #[arg(long, value_name = "SEED")]
    shuffle: Option<u64>,
    /// Run the train step on the reference interpreter (exact, slow) instead of compiling it
    /// for the CPU.
    #[arg(long)]
    interp: bool,
    /// Threads per kernel launch of the compiled train step (default: every core).
    #[arg(long)]
    threads: Option<usize>,
    /// Where the compiled train step runs: the CPU (`kernels.so`) or CUDA (`kernels.ptx`; not with
    /// --interp; with --dp, --ep or --pp each process takes the device of its local rank, and the
    /// collectives go over MPI through host memory).
    #[arg(long, value_enum, default_value = "cpu")]
    device: run::Device,
    /// Train with DeepSeek-V3's FP8 recipe (every linear DeepSeek stores in FP8 runs its forward,
    /// input-gradient and weight-gradient GEMMs in E4M3 with online block scales and FP32
    /// accumulation promoted every 128 elements). It is the default for a spec with
    /// [quantization]; given for one without, it uses DeepSeek's 128x128 blocks.
    #[arg(long, conflicts_with = "no_fp8")]
    fp8: bool,
    /// Train in the model's dtype although the spec has [quantization].
    #[arg(long)]
    no_fp8: bool,
    /// Keep the RMS norms' and MLA up-projections' outputs for the backward pass instead of
    /// recomputing them there (the `rematerialize` pass, DeepSeek-V3 §3.2): more memory, less
    /// computation; the results are the same.
    #[arg(long)]
    no_recompute: bool,
    /// Keep the attention outputs and SwiGLU inputs the backward pass reads in the model's dtype
    /// instead of FP8 (the `cache-activations` pass, DeepSeek-V3 §3.3.3): more memory, and the
    /// backward pass computes with them unrounded; the rest of the FP8 recipe is unchanged.
    #[arg(long)]
    no_fp8_cache: bool,
    /// Data-parallel replicas: run under `mpirun -n N`, each process trains on batch / N rows of
    /// every batch and the gradients are summed over MPI (the same steps as one process).
    #[arg(long, value_name = "N")]
    dp: Option<usize>,
    /// With --dp: split AdamW's moments (and f32 master weights) over the replicas, each keeping and
    /// updating one N-th of every tensor and gathering the rest (ZeRO stage 1). With --ep (and
    /// --pp): the other weights' states over every process of a stage, a routed expert's over the
    /// --dp processes that hold it.
    #[arg(long)]
    zero1: bool,
    /// Expert parallelism over N processes (N·D with --dp D, N·D·P with --pp P), launched with
    /// `mpirun -n N`: each process (pipeline) trains on its own rows and holds 1/N of every MoE
    /// layer's routed experts; the tokens go to the experts' ranks and back over MPI (the same steps
    /// as one process).
    #[arg(long, value_name = "N")]
    ep: Option<usize>,
    /// Pipeline parallelism over N processes, launched with `mpirun -n N`: the model is cut into N
    /// stages by the cost model, and each process runs one stage's forward and backward programs in
    /// the order of --pp-schedule, sending activations and gradients over MPI (the same steps as one
    /// process with the same micro-batches).
    #[arg(long, value_name = "N")]
    pp: Option<usize>,
    /// With --pp: the pipeline schedule, `1f1b` (default), `zb1p`, `dualpipe` or `dualpipev`.
    #[arg(long, value_name = "NAME", requires = "pp")]
    pp_schedule: Option<String>,
    /// With --pp: write the last step's measured timeline of every rank to FILE, a Chrome/Perfetto
    /// trace, and beside it as SVG (FILE with the extension .svg).
    #[arg(long, value_name = "FILE", requires = "pp")]
    pp_trace: Option<PathBuf>,
    /// How long a process waits for the others in a collective before it ends the job.
    #[arg(long, value_name = "SECS", default_value_t = 300.0)]
    comm_timeout: f64,
    /// With --device cuda and --dp, --ep or --pp: sum and gather over NCCL on the GPUs' memory
    /// (gradients, losses, ZeRO-1's gathers) instead of over MPI through host memory; the
    /// all-to-alls of --ep and the pipeline's messages still go over MPI. Needs libnccl.so.2.
    #[arg(long)]
    nccl: bool,
    // Boxed: the variants would be far larger than the others.
    #[command(flatten)]
    monitor: Box<monitor::Args>,
}

/// Runs `kiln train` or `kiln sft`: in this process, or with `--dp N` as one of the N replicas
/// mpirun started (`crate::dist`).
fn replicated(args: &TrainArgs, req: train::Request) -> Result<()> {
    if let Some(pp) = args.pp {
        return pipelined(args, req, pp);
    }
    if let Some(ep) = args.ep {
        return expert_parallel(args, req, ep);
    }
    let Some(dp) = args.dp else { return train::run(&req, &mut io::stdout().lock()) };
    if dp == 0 {
        bail!("--dp 0: give the number of data-parallel processes, at least 1");
    }
    if !(args.comm_timeout > 0.0 && args.comm_timeout.is_finite()) {
        bail!("--comm-timeout {}: give a positive number of seconds", args.comm_timeout);
    }
    let d = dist::Dist::init(dp, std::time::Duration::from_secs_f64(args.comm_timeout))?;
    // The request, for as long as the world lives.
    in_group(&d, &train::Request { dist: Some(&d), ..req })
}

/// Runs `kiln train --ep N [--dp D]` as one of the N·D processes mpirun started: each trains on
/// its own rows with its share of the routed experts.
fn expert_parallel(args: &TrainArgs, req: train::Request, ep: usize) -> Result<()> {
    if ep == 0 {
        bail!("--ep 0: give the number of expert-parallel processes, at least 1");
    }
    if args.dp == Some(0) {
        bail!("--dp 0: give the number of data-parallel replicas of the expert-parallel group, at least 1");
    }
    if !(args.comm_timeout > 0.0 && args.comm_timeout.is_finite()) {
        bail!("--comm-timeout {}: give a positive number of seconds", args.comm_timeout);
    }
    let dp = args.dp.unwrap_or(1);
    let flags = match args.dp {
        Some(dp) => format!("--ep {ep} --dp {dp}"),
        None => format!("--ep {ep}"),
    };
    let d =
        dist::Dist::init_experts(&flags, 1, dp, ep, std::time::Duration::from_secs_f64(args.comm_timeout))?;
    in_group(&d, &train::Request { dist: Some(&d), ..req })
}

/// Runs one process of a group mpirun started: the first speaks for the job; a failure anywhere
/// ends every process.
fn in_group(d: &dist::Dist, req: &train::Request) -> Result<()> {
    let ran = match d.leader() {
        true => train::run(req, &mut io::stdout().lock()),
        false => train::run(req, &mut io::sink()),
    };
    if let Err(e) = ran {
        d.fail(&render(&e));
    }
    Ok(())
}

/// Runs `kiln train --pp N` as one of the N pipeline ranks mpirun started (`crate::pipeline`).
fn pipelined(args: &TrainArgs, req: train::Request, pp: usize) -> Result<()> {
    use kiln_compiler::schedule::Kind;
    if pp == 0 {
        bail!("--pp 0: give the number of pipeline processes, at least 1");
    }
    if args.dp == Some(0) {
        bail!("--dp 0: give the number of data-parallel replicas of the pipeline, at least 1");
    }
    let kind = Kind::parse(args.pp_schedule.as_deref().unwrap_or("1f1b"))?;
    if !(args.comm_timeout > 0.0 && args.comm_timeout.is_finite()) {
        bail!("--comm-timeout {}: give a positive number of seconds", args.comm_timeout);
    }
    let timeout = std::time::Duration::from_secs_f64(args.comm_timeout);
    if args.ep == Some(0) {
        bail!("--ep 0: give the number of expert-parallel processes, at least 1");
    }
    let mut flags = format!("--pp {pp}");
    for (flag, n) in [("--ep", args.ep), ("--dp", args.dp)] {
        if let Some(n) = n {
            flags += &format!(" {flag} {n}");
        }
    }
    // `ep · dp` replicas of the pipeline: each runs its share of every batch through its stages,
    // each group of `ep` splitting the routed experts.
    let ep = args.ep.unwrap_or(1);
    let d = dist::Dist::init_experts(&flags, pp, args.dp.unwrap_or(1), ep, timeout)?;
    crate::check_output_file(args.pp_trace.as_deref(), &[])?;
    let dist = (args.dp.is_some() || ep > 1).then_some(&d);
    in_group(
        &d,
        &train::Request { pipeline: Some((&d, kind)), dist, pp_trace: args.pp_trace.as_deref(), ..req },
    )
}

/// The learning rate, its floor and schedule of a run when not given.
struct LrDefaults {
    lr: f64,
    min_lr: f64,
    schedule: train::Schedule,
}

/// `kiln train`'s or `kiln sft`'s request from its arguments.
fn train_request<'a>(
    a: &'a TrainArgs,
    steps: u64,
    epochs: Option<u64>,
    d: LrDefaults,
    chat: bool,
) -> Result<train::Request<'a>> {
    check_threads(a.threads)?;
    let weights = match (&a.weights, a.random_weights, &a.resume) {
        (Some(_), Some(_), _) => {
            bail!("give either --weights DIR or --random-weights SEED, not both")
        }
        (Some(dir), _, _) => run::Weights::Checkpoint(dir),
        (None, Some(seed), _) => run::Weights::Random(seed),
        (None, None, Some(dir)) => run::Weights::Checkpoint(dir),
        // A Hugging Face folder as the model brings its weights.
        (None, None, None) if a.model.is_dir() && a.model.join("config.json").is_file() => {
            run::Weights::Checkpoint(&a.model)
        }
        (None, None, None) => {
            bail!(
                "give the initial weights: --weights DIR, --random-weights SEED or --resume DIR \
                 (or a Hugging Face folder as the model)"
            )
        }
    };
    let hyper = train::Hyper {
        lr: a.lr.unwrap_or(d.lr),
        min_lr: a.min_lr.unwrap_or(d.min_lr),
        schedule: a.schedule.unwrap_or(d.schedule),
        warmup: a.warmup,
        steps,
        batch: a.batch,
        ..train::Hyper::default()
    };
    Ok(train::Request {
        model: &a.model,
        weights,
        data: &a.data,
        dtype: a.dtype.as_deref(),
        seq_len: a.seq_len,
        hyper,
        out: &a.out,
        save_every: a.save_every,
        resume: a.resume.as_deref(),
        shuffle: a.shuffle,
        interp: a.interp,
        threads: a.threads,
        device: a.device,
        micro_batch: a.micro_batch,
        tokenizer: a.tokenizer.as_deref(),
        settings: a.settings.clone(),
        chat,
        epochs,
        monitor: (*a.monitor).clone(),
        dist: None,
        pipeline: None,
        pp_trace: None,
        nccl: a.nccl,
        zero1: a.zero1,
        recompute: !a.no_recompute,
        fp8_cache: !a.no_fp8_cache,
        fp8: match (a.fp8, a.no_fp8) {
            (true, _) => Some(true),
            (_, true) => Some(false),
            _ => None,
        },
    })
}

fn run(command: Command) -> Result<()> {
    match command {
        Command::Ir { spec, layer, after, program, module, format, output } => {
            ir(&spec, layer, after.as_deref(), program.as_deref(), module, format, output.as_deref())
        }
        Command::Check { file } => check(&file),
        Command::Inspect {
            spec,
            context,
            json,
            train: true,
            fp8,
            no_fp8,
            micro_batch,
            seq_len,
            dp,
            pp,
            ep,
            zero1,
            schedule,
            micro_batches,
            mtp_lambda,
            full,
        } => {
            let _ = context;
            let text = inspect_train::run(&inspect_train::Request {
                spec: &spec,
                fp8: if fp8 {
                    Some(true)
                } else if no_fp8 {
                    Some(false)
                } else {
                    None
                },
                micro_batch,
                seq_len,
                dp,
                pp,
                ep,
                zero1,
                schedule,
                micro_batches,
                mtp_lambda,
                full,
                json,
            })?;
            emit(&text, None)
        }
        Command::Inspect { spec, context, json, .. } => inspect(&spec, context, json),
        Command::ImportHf { config, output } => import_hf(&config, output.as_deref()),
        Command::ExportHf { spec, random_weights, output } => {
            export_hf::run(&spec, random_weights, &output, &mut io::stdout().lock())
        }
        Command::Run {
            model,
            weights,
            random_weights,
            interp,
            device,
            threads,
            prompt_ids,
            prompt,
            max_new_tokens,
            ignore_eos,
            stop_ids,
            sampling,
            expert_load,
            profile,
            trace,
            dump_logits,
            speculative,
            json,
            ep,
            comm_timeout,
        } => {
            check_threads(threads)?;
            let resolved =
                cache::resolve(&model, weights.is_some() || random_weights.is_some(), interp, "run")?;
            let weights = match (&weights, random_weights, &resolved.weights) {
                (Some(dir), _, _) => run::Weights::Checkpoint(dir),
                (None, Some(seed), _) => run::Weights::Random(seed),
                (None, None, Some(dir)) => run::Weights::Checkpoint(dir),
                (None, None, None) => unreachable!("resolve requires weights"),
            };
            let model = resolved.model;
            let req = run::Request {
                model: &model,
                weights,
                interp,
                device,
                threads,
                prompt: prompt_ids,
                prompt_text: prompt,
                max_new_tokens,
                ignore_eos,
                stop_ids,
                sampling: run::sampling(sampling.temperature, sampling.top_p, sampling.seed),
                expert_load,
                profile,
                trace: trace.as_deref(),
                dump_logits: dump_logits.as_deref(),
                speculative,
                ep: None,
            };
            let Some(n) = ep else {
                let (mut out, mut log) = (io::stdout().lock(), io::stderr().lock());
                return run::run(&req, &mut run::Sink { out: &mut out, log: &mut log, json });
            };
            // One of N expert-parallel processes: the first prints, a failure anywhere ends the job.
            if n == 0 {
                bail!("--ep 0: give the number of expert-parallel processes, at least 1");
            }
            if !(comm_timeout > 0.0 && comm_timeout.is_finite()) {
                bail!("--comm-timeout {comm_timeout}: give a positive number of seconds");
            }
            let timeout = std::time::Duration::from_secs_f64(comm_timeout);
            let d = dist::Dist::init_grid(&format!("--ep {n}"), 1, n as usize, timeout)?;
            let req = run::Request { ep: Some(&d), ..req };
            let ran = match d.leader() {
                true => {
                    let (mut out, mut log) = (io::stdout().lock(), io::stderr().lock());
                    run::run(&req, &mut run::Sink { out: &mut out, log: &mut log, json })
                }
                // The first process writes the files asked for.
                false => {
                    let req = run::Request { dump_logits: None, trace: None, ..req };
                    run::run(&req, &mut run::Sink { out: &mut io::sink(), log: &mut io::sink(), json })
                }
            };
            if let Err(e) = ran {
                d.fail(&render(&e));
            }
            Ok(())
        }
        Command::Chat { model, system, message, max_new_tokens, sampling, verbose, speculative } => {
            let req = chat::Request {
                source: model.source("chat")?,
                tokenizer: model.tokenizer.as_deref(),
                system,
                messages: message,
                max_new_tokens,
                sampling: run::sampling(sampling.temperature, sampling.top_p, sampling.seed),
                verbose,
                speculative,
            };
            chat::run(&req, &mut io::stdin().lock(), &mut io::stdout().lock())
        }
        Command::Serve { model, host, port, max_batch, batch_window, speculative } => {
            // A window longer than a minute would hold a lone request for as long.
            if batch_window > MAX_BATCH_WINDOW_MS {
                bail!(
                    "--batch-window {batch_window}: a batch's first request waits at most \
                     {MAX_BATCH_WINDOW_MS} ms for others"
                );
            }
            let req = serve::Request {
                source: model.source("serve")?,
                tokenizer: model.tokenizer.as_deref(),
                host,
                port,
                max_batch,
                batch_window: std::time::Duration::from_millis(batch_window),
                speculative,
            };
            serve::run(&req, &mut io::stdout().lock())
        }
        Command::Compile(args) => compile::run(&args, &mut io::stdout().lock()),
        Command::Train { args, steps } => {
            let d = LrDefaults { lr: 1e-3, min_lr: 0.0, schedule: train::Schedule::Constant };
            let req = train_request(&args, steps, None, d, false)?;
            replicated(&args, req)
        }
        Command::Sft { args, epochs, steps } => {
            let d = LrDefaults { lr: sft::LR, min_lr: sft::MIN_LR, schedule: train::Schedule::Cosine };
            let req = train_request(&args, steps.unwrap_or(0), steps.is_none().then_some(epochs), d, true)?;
            replicated(&args, req)
        }
        Command::Grpo {
            model,
            weights,
            random_weights,
            tokenizer,
            prompts,
            out,
            steps,
            prompts_per_step,
            group,
            temperature,
            top_p,
            max_new_tokens,
            lr,
            kl,
            clip_ratio,
            updates,
            reward,
            format_pattern,
            seed,
            threads,
            save_every,
            resume,
            settings,
        } => {
            check_threads(threads)?;
            let weights = match (&weights, random_weights) {
                (Some(_), Some(_)) => bail!("give either --weights DIR or --random-weights SEED, not both"),
                (Some(dir), _) => run::Weights::Checkpoint(dir),
                (None, Some(seed)) => run::Weights::Random(seed),
                (None, None) if model.is_dir() && model.join("config.json").is_file() => {
                    run::Weights::Checkpoint(&model)
                }
                (None, None) => bail!(
                    "give the initial weights: --weights DIR or --random-weights SEED (or a Hugging Face folder \
                     as the model)"
                ),
            };
            let req = grpo::Request {
                model: &model,
                weights,
                tokenizer: tokenizer.as_deref(),
                prompts: &prompts,
                out: &out,
                steps,
                prompts_per_step,
                group,
                temperature,
                top_p,
                max_new_tokens,
                lr,
                objective: grpo::objective::Objective { beta: kl, clip: clip_ratio },
                updates,
                rewards: reward,
                format_pattern,
                seed,
                threads,
                save_every,
                resume: resume.as_deref(),
                settings,
            };
            grpo::run(&req, &mut io::stdout().lock())
        }
        Command::Report { run_dir, output, compare, loss_svg } => {
            let req = report::Request {
                dir: &run_dir,
                out: output.as_deref(),
                compare: &compare,
                loss_svg: loss_svg.as_deref(),
            };
            let (path, run, finals) = report::write(&req)?;
            println!("wrote {} ({} steps, {} alerts)", path.display(), run.steps.len(), run.alerts.len());
            if let Some(first) = run.unparsed.first() {
                let n = run.unparsed.len();
                eprintln!(
                    "warning: {}: {n} line{} not JSON, left out (the first is line {first}); a run \
                     killed while writing leaves its last line cut short",
                    run_dir.join("metrics.jsonl").display(),
                    if n == 1 { " is" } else { "s are" },
                );
            }
            for line in finals {
                println!("{line}");
            }
            Ok(())
        }
        Command::Perplexity {
            model,
            weights,
            random_weights,
            data,
            dtype,
            seq_len,
            batch,
            interp,
            device,
            threads,
            json,
        } => {
            check_threads(threads)?;
            let weights = match (&weights, random_weights) {
                (Some(_), Some(_)) => bail!("give either --weights DIR or --random-weights SEED, not both"),
                (Some(dir), _) => run::Weights::Checkpoint(dir),
                (None, Some(seed)) => run::Weights::Random(seed),
                (None, None) => bail!("give the model's weights: --weights DIR or --random-weights SEED"),
            };
            let req = perplexity::Request {
                model: &model,
                weights,
                data: &data,
                dtype: dtype.as_deref(),
                seq_len,
                batch,
                interp,
                device,
                threads,
                json,
            };
            perplexity::run(&req, &mut io::stdout().lock())
        }
        Command::Bench { what, json } => bench::run(what, json, &mut io::stdout().lock()),
        Command::Schedule { pp, micro_batches, schedule, cost, comm, svg, trace, json } => {
            let req = schedule::Request {
                pp,
                micro_batches,
                schedule: &schedule,
                cost: &cost,
                comm,
                svg: svg.as_deref(),
                trace: trace.as_deref(),
                json,
            };
            schedule::run(&req, &mut io::stdout().lock())
        }
        Command::Passes => {
            let mut out = String::new();
            for p in passes::PASSES {
                out.push_str(&format!("{:<16} {}\n", p.name, p.summary));
            }
            emit(&out, None)
        }
        Command::Doctor => doctor(),
        Command::Cache { clear, json } => cache::command(clear, json, &mut std::io::stdout().lock()),
    }
}

fn ir(
    spec_path: &Path,
    layer: Option<u64>,
    after: Option<&str>,
    program: Option<&str>,
    module: bool,
    format: IrFormat,
    output: Option<&Path>,
) -> Result<()> {
    check_output_file(output, &[spec_path])?;
    let spec = spec::load(spec_path)?;
    if module {
        // The module `kiln compile` makes by default.
        let options = kiln_compiler::pack::Options {
            last_logits: true,
            ..kiln_compiler::pack::Options::new(kiln_compiler::pack::Targets::All, 1, 1)
        };
        let m = kiln_compiler::pack::module_after(&spec, &options, after)?;
        let printed = match format {
            IrFormat::Kir => text::print_module(&m),
            IrFormat::Dot => text::print_module_dot(&m),
        };
        return emit(&printed, output);
    }
    let (mut graph, kind) = match (layer, program) {
        (Some(l), _) => (build::build_layer(&spec, l)?, ProgramKind::Forward),
        (None, Some("prefill")) => (build::build_prefill_last(&spec, false)?, ProgramKind::Prefill),
        (None, Some("score")) => (build::build_score(&spec)?, ProgramKind::Score),
        (None, Some(_)) => (build::build_cached(&spec, build::Phase::Decode)?, ProgramKind::Decode),
        (None, None) => (build::build_graph(&spec)?, ProgramKind::Forward),
    };
    if let Some(pass) = after {
        passes::run_until(&mut graph, &spec, kind, pass)?;
    }
    let printed = match format {
        IrFormat::Kir => text::print(&graph),
        IrFormat::Dot => text::print_dot(&graph),
    };
    emit(&printed, output)
}

/// What `kiln ir` prints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum IrFormat {
    Kir,
    Dot,
}

fn check(file: &Path) -> Result<()> {
    let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let line = match text::read_file(&file.display().to_string(), &bytes)? {
        text::KirFile::Module(m) => {
            let programs: Vec<String> =
                m.programs.iter().map(|p| format!("{} ({})", p.name, p.kind)).collect();
            format!(
                "{}: ok: module @{}, {} parameters, {} states, programs {}\n",
                file.display(),
                m.name,
                m.params.len(),
                m.states.len(),
                programs.join(", ")
            )
        }
        text::KirFile::Graph(graph) => format!(
            "{}: ok: graph @{}, {} nodes, {} parameters, {} outputs\n",
            file.display(),
            graph.name(),
            graph.node_count(),
            graph.params().len(),
            graph.outputs().len()
        ),
    };
    emit(&line, None)
}

fn inspect(spec_path: &Path, context: Option<u64>, json: bool) -> Result<()> {
    let spec = spec::load(spec_path)?;
    let most = spec.model.max_position_embeddings;
    if let Some(context) = context.filter(|&c| c == 0 || c > most) {
        bail!(
            "--context {context}: the context must be from 1 to the model's {most} positions \
             (max_position_embeddings)"
        );
    }
    let context = context.unwrap_or(DEFAULT_CONTEXT);
    let graph = build::build_graph(&spec)?;
    let summary = inspect::summarize(&spec, &graph, context);
    if json {
        emit(&(serde_json::to_string_pretty(&summary)? + "\n"), None)
    } else {
        emit(&summary.to_string(), None)
    }
}

fn import_hf(config: &Path, output: Option<&Path>) -> Result<()> {
    if config.extension().and_then(|e| e.to_str()) != Some("json") {
        bail!("{} is not a Hugging Face config.json (expected a .json file)", config.display());
    }
    check_output_file(output, &[config])?;
    let spec = spec::load(config)?;
    emit(&spec::to_toml(&spec), output)
}

fn doctor() -> Result<()> {
    let report = kiln_compiler::toolchain::probe()?;
    let (maj, min, pat) = report.llvm_version;
    let mut out = String::new();
    out.push_str(&format!(
        "LLVM        {maj}.{min}.{pat} (NVPTX sm_90a: PTX emitted, {} lines)\n",
        report.ptx.lines().count()
    ));
    out.push_str(&format!("MLIR        {} dialects loaded, probe module verified\n", report.mlir_dialects));
    out.push_str(&format!("host        {} ({})\n", report.host_triple, report.host_cpu));
    let cpu = kiln_compiler::codegen::cpu::host_features();
    let yes = |on: bool| if on { "yes" } else { "no" };
    out.push_str(&format!(
        "CPU GEMMs   packed panels: {}; bf16 dot products (AVX512_BF16): {}; AMX tiles (AMX-BF16, granted by Linux): {}\n",
        match (cpu.packed_gemm, cpu.avx512) {
            (false, _) => "no",
            (true, true) => "yes (AVX-512's register blocks, 6 rows x 64 columns)",
            (true, false) => "yes (AVX2's register blocks, 6 rows x 16 columns; bf16 widened to f32)",
        },
        yes(cpu.bf16_dot),
        yes(cpu.amx)
    ));
    match &report.ptxas {
        Some((path, version)) => out.push_str(&format!(
            "ptxas       {} ({version}); probe kernel assembled for sm_90a\n",
            path.display()
        )),
        None => out.push_str("ptxas       not found: run scripts/setup.sh (or set KILN_PTXAS)\n"),
    }
    match kiln_runtime::cuda::devices() {
        Ok(devs) if devs.is_empty() => out.push_str("CUDA        driver present, no devices\n"),
        Ok(devs) => {
            for d in devs {
                out.push_str(&format!(
                    "CUDA        device {}: {} (sm_{}{}), {:.1} GiB\n",
                    d.ordinal,
                    d.name,
                    d.compute_capability.0,
                    d.compute_capability.1,
                    d.total_memory as f64 / (1u64 << 30) as f64
                ));
            }
        }
        Err(e) => out.push_str(&format!("CUDA        unavailable: {e}\n")),
    }
    match kiln_runtime::gpu::nccl::version() {
        Ok(v) => {
            out.push_str(&format!("NCCL        {v}: `kiln train --device cuda --nccl` sums on the GPUs\n"))
        }
        Err(e) => out.push_str(&format!("NCCL        unavailable: {e}\n")),
    }
    out.push_str(&format!("MPI         {}\n", dist::describe()));
    use kiln_compiler::codegen::cache as kernel_cache;
    match kernel_cache::dir() {
        Some(dir) => {
            let (entries, bytes) = kernel_cache::usage(&dir);
            out.push_str(&format!(
                "cache       kernels in {}: {entries} entries, {:.1} of {} MiB (KILN_NO_KERNEL_CACHE=1 turns it off)\n",
                dir.display(),
                bytes as f64 / (1u64 << 20) as f64,
                kernel_cache::limit() >> 20
            ));
        }
        None => out.push_str("cache       kernels: off (KILN_NO_KERNEL_CACHE, or no cache directory)\n"),
    }
    emit(&out, None)
}

/// Writes `text` to standard output, or atomically to `path` (`kiln_ir::output::write_file`: a
/// temporary sibling renamed into place, so a failure never leaves a half-written file).
fn emit(text: &str, path: Option<&Path>) -> Result<()> {
    match path {
        None => {
            let mut stdout = io::stdout().lock();
            stdout.write_all(text.as_bytes())?;
            stdout.flush()?;
            Ok(())
        }
        Some(path) => Ok(kiln_ir::output::write_file(path, text.as_bytes())?),
    }
}

/// `kiln inspect`'s context when `--context` is not given (the FLOPs of a token at this context,
/// whatever the model's positions).
const DEFAULT_CONTEXT: u64 = 4096;

/// The longest `kiln serve --batch-window`, in milliseconds.
const MAX_BATCH_WINDOW_MS: u64 = 60_000;

/// Refuses a `--threads` the CPU backend would refuse, before any work (a train run would otherwise
/// compile its step first).
fn check_threads(threads: Option<usize>) -> Result<()> {
    if let Some(n) = threads {
        kiln_runtime::cpu::check_threads(n).with_context(|| format!("--threads {n}"))?;
    }
    Ok(())
}

/// Refuses an `-o FILE` that is not a new path or a regular file, or that is one of the command's
/// `inputs`, before any work is done (`kiln_ir::output`).
pub(crate) fn check_output_file(output: Option<&Path>, inputs: &[&Path]) -> Result<()> {
    if let Some(path) = output {
        kiln_ir::output::check_file_target(path)?;
        kiln_ir::output::check_not_input(path, inputs)?;
    }
    Ok(())
}
