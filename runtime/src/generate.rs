//! Decoding: prompts in, tokens out, greedy or sampled, over any [`Engine`] (the compiled CPU model
//! or the reference interpreter, so the two can be compared token for token).
//!
//! With a KV cache ([`Engine::kv_cache`], an artifact compiled with its decode program), the first
//! step is the prefill of every prompt, which fills the cache from position 0, and each later step
//! runs the decode program on one token per sequence at its own position. Without one (the
//! reference interpreter, or an artifact compiled with `--no-kv-cache`), every step runs the whole
//! sequence so far and reads the logits of its last position, so a step costs a prefill.
//!
//! Batches: prompts of different lengths run together, right-padded to the longest (pad id 0) with
//! positions `0..T` on every row. This is exact, not an approximation: attention is causal, so a
//! position never sees the padding after it, and everything else in the model (norms, routing,
//! experts) works per token. Each sequence reads its logits at its own last position. A sequence
//! that stops leaves the batch. MTP inputs (`mtp_tokens`, `mtp_tokens.k`) are filled with each
//! row's tokens shifted by `k` and padded; their outputs are not used for decoding.
//!
//! Sampling: greedy (the first maximum, like `argmax`), or temperature and top-p (nucleus)
//! sampling with a seeded SplitMix64 stream per sequence, so a sequence draws the same numbers
//! whether it runs alone or in a batch. Stop tokens end a sequence (the stop token is reported and
//! kept); `max_new_tokens` ends it otherwise. Tokens are reported through a callback as they come.
//!
//! Options per sequence ([`generate_each`]): each sequence of a batch may have its own
//! `max_new_tokens`, sampling and stop tokens (a server batches requests that differ in all three),
//! and its callback may end it early ([`Flow::Stop`]: a stop string, a client gone). A sequence then
//! generates exactly what it would alone: its logits do not depend on the other rows, and it draws
//! from the stream of its own seed. [`generate`] is the case of one set of options for every
//! prompt, where sequence `i` draws from stream `i` of the seed, so that prompts sharing a seed
//! still sample independently.

use std::ops::Range;
use std::time::{Duration, Instant};

use kiln_ir::module::ProgramKind;
use kiln_ir::DType;

use crate::weights::{HostData, HostTensor};
use crate::RuntimeError;

/// The output generation reads.
pub const LOGITS: &str = "logits";

/// What bounds one run of an engine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Sequences per run.
    pub max_batch: u64,
    /// Tokens per sequence per run.
    pub max_tokens: u64,
    /// What sets `max_tokens`, for messages (`the artifact (compiled for T <= 64)`).
    pub what: String,
}

/// Something that runs a model's programs on batches of token sequences: a compiled artifact on any
/// backend ([`crate::exec::Executor`]) or the reference interpreter.
pub trait Engine {
    /// The programs, by name and kind.
    fn programs(&self) -> Vec<(String, ProgramKind)>;
    /// The caller inputs of `program` with their dtypes.
    fn inputs(&self, program: &str) -> Result<Vec<(String, DType)>, RuntimeError>;
    /// The size of the last dimension of the [`LOGITS`] output, when the model has it.
    fn vocab_size(&self) -> Option<u64>;
    /// What bounds one run of `program`.
    fn limits(&self, program: &str) -> Limits;
    /// Runs `program`; its outputs stay readable until the next run.
    fn run(&mut self, program: &str, inputs: &[HostTensor]) -> Result<(), RuntimeError>;
    /// Elements `range` of a float output of the last run.
    fn output_f32(&self, name: &str, range: Range<usize>) -> Result<Vec<f32>, RuntimeError>;
    /// The number of elements of an output of the last run. Only speculative decoding asks (for the
    /// hidden states it hands from the main model to the draft); an engine without its programs
    /// need not answer.
    fn output_len(&self, name: &str) -> Result<usize, RuntimeError> {
        Err(RuntimeError::NoSpeculation(format!("the engine cannot tell the size of its output `{name}`")))
    }
    /// The KV cache, when the engine has a prefill and a decode program over it: the prefill fills
    /// the cache from position 0 and the decode program runs new tokens over it.
    fn kv_cache(&self) -> Option<KvCache> {
        None
    }
}

/// The name of the first program of `kind` an engine has.
pub fn program_of(engine: &dyn Engine, kind: ProgramKind) -> Option<String> {
    engine.programs().into_iter().find(|(_, k)| *k == kind).map(|(n, _)| n)
}

/// The programs generation runs: the prefill and the decode program over a KV cache, or one
/// forward program run over the whole sequence at every step.
enum Plan {
    Cached { prefill: String, decode: String },
    Stateless { forward: String },
}

fn plan(engine: &dyn Engine) -> Result<Plan, RuntimeError> {
    let (prefill, decode) =
        (program_of(engine, ProgramKind::Prefill), program_of(engine, ProgramKind::Decode));
    match (prefill, decode, engine.kv_cache()) {
        (Some(prefill), Some(decode), Some(_)) => Ok(Plan::Cached { prefill, decode }),
        _ => program_of(engine, ProgramKind::Forward).map(|forward| Plan::Stateless { forward }).ok_or_else(
            || RuntimeError::NoSuchProgram {
                name: "prefill and decode, or forward,".into(),
                known: engine.programs().iter().map(|(n, _)| format!("`{n}`")).collect::<Vec<_>>().join(", "),
            },
        ),
    }
}

impl Plan {
    /// The program of the first step, which reads the prompts.
    fn first(&self) -> &str {
        match self {
            Plan::Cached { prefill, .. } => prefill,
            Plan::Stateless { forward } => forward,
        }
    }
}

/// An engine's KV cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvCache {
    /// Positions per sequence (`S`).
    pub capacity: u64,
    /// Bytes of every layer's cache for the whole batch.
    pub bytes: u64,
}

/// How to pick each token.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Sampling {
    /// The most likely token (the first one on ties).
    Greedy,
    /// Sample from the softmax at `temperature` (> 0), restricted to the smallest set of most likely
    /// tokens whose probability reaches `top_p` (in `(0, 1]`; 1 keeps every token).
    Sample { temperature: f32, top_p: f32, seed: u64 },
}

/// What to generate.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    /// Token ids that end a sequence (reported and kept as its last token).
    pub stop_tokens: Vec<i64>,
}

/// What a [`generate_each`] callback wants done with the sequence of the token it saw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// End the sequence here, the token kept (it counts as stopped, like a stop token).
    Stop,
}

/// One generated token, as it comes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TokenEvent {
    /// The prompt it continues (index into the prompts).
    pub sequence: usize,
    /// Its index among the sequence's new tokens.
    pub step: usize,
    pub token: i64,
    /// Its logit, and its probability under the model's distribution (temperature 1).
    pub logit: f32,
    pub prob: f32,
}

/// Timings of a generation.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Stats {
    /// Prompt tokens of the first forward pass (padding not counted).
    pub prompt_tokens: usize,
    /// The first forward pass over the prompts, with picking the first tokens.
    pub prefill: Duration,
    /// From the call to the first token.
    pub first_token: Duration,
    /// Tokens made after the first step, and the time the steps that made them took.
    pub decode_tokens: usize,
    pub decode: Duration,
    /// Forward passes run (of the main model: a speculative step's draft is not counted).
    pub forwards: usize,
    /// Speculative decoding ([`generate_speculative`]): drafts checked against the main model, and
    /// how many of them it accepted.
    pub drafted: usize,
    pub accepted: usize,
}

impl Stats {
    pub fn prefill_tokens_per_s(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill.as_secs_f64().max(f64::MIN_POSITIVE)
    }

    /// The fraction of drafts the main model accepted; `None` without speculation.
    pub fn acceptance(&self) -> Option<f64> {
        (self.drafted > 0).then(|| self.accepted as f64 / self.drafted as f64)
    }

    /// `None` when no token was decoded after the first.
    pub fn decode_tokens_per_s(&self) -> Option<f64> {
        (self.decode_tokens > 0)
            .then(|| self.decode_tokens as f64 / self.decode.as_secs_f64().max(f64::MIN_POSITIVE))
    }
}

/// The result of [`generate`].
#[derive(Clone, Debug, PartialEq)]
pub struct Generation {
    /// The new tokens of each prompt.
    pub tokens: Vec<Vec<i64>>,
    /// Whether each sequence ended at a stop token, or where its callback said [`Flow::Stop`]
    /// (otherwise at `max_new_tokens`).
    pub stopped: Vec<bool>,
    pub stats: Stats,
    /// Whether the decode steps ran over a KV cache.
    pub cached: bool,
}

/// SplitMix64 (Steele, Lea and Flood 2014): small, seeded, the same on every platform.
struct Rng(u64);

impl Rng {
    fn for_sequence(seed: u64, sequence: usize) -> Rng {
        let mut r = Rng(seed);
        r.0 ^= Rng(sequence as u64).next();
        r
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// The index of the token to emit, or `None` when no logit is finite.
fn pick(logits: &[f32], sampling: Sampling, rng: &mut Rng) -> Option<usize> {
    match nucleus(logits, sampling)? {
        Nucleus::Greedy(best) => Some(best),
        Nucleus::Sample { weights, kept } => draw(&weights, kept, None, rng),
    }
}

/// What [`pick`] chooses from: the greedy token, or the tokens a sample may take with their
/// weights (`exp((logit - max) / T)`), most likely first (equal weights in index order), cut to
/// the smallest prefix whose weight reaches `top_p` of the total, and that prefix's total.
enum Nucleus {
    Greedy(usize),
    Sample { weights: Vec<(usize, f64)>, kept: f64 },
}

/// The [`Nucleus`] of `logits` under `sampling`; `None` when no logit is finite.
fn nucleus(logits: &[f32], sampling: Sampling) -> Option<Nucleus> {
    let finite = |x: f32| x.is_finite().then_some(x);
    // The first of the largest finite logits (NaN equals nothing).
    let max = finite_max(logits);
    let best = logits.iter().position(|&x| x == max)?;
    let Sampling::Sample { temperature, top_p, .. } = sampling else { return Some(Nucleus::Greedy(best)) };
    // `exp` of what is below -87 (under f32's smallest normal number) counts as 0.
    let weight = |x: f32| {
        let z = (x - max) / temperature;
        if z >= -87.0 {
            f64::from(exp_nonpositive(z))
        } else {
            0.0
        }
    };
    let mut weights: Vec<(usize, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &x)| (i, finite(x).map_or(0.0, weight)))
        .filter(|&(_, w)| w > 0.0)
        .collect();
    // Most likely first; equal weights keep index order, so the draw is deterministic.
    weights.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let total: f64 = weights.iter().map(|w| w.1).sum();
    let mut kept = 0.0;
    let mut n = 0;
    for &(_, w) in &weights {
        kept += w;
        n += 1;
        if kept >= f64::from(top_p) * total {
            break;
        }
    }
    weights.truncate(n);
    Some(Nucleus::Sample { weights, kept })
}

/// One draw from `weights` (summing to `kept`), leaving out token `except` (whose weight the
/// caller has taken out of `kept`).
fn draw(weights: &[(usize, f64)], kept: f64, except: Option<usize>, rng: &mut Rng) -> Option<usize> {
    let mut r = rng.unit() * kept;
    let mut last = None;
    for &(i, w) in weights.iter().filter(|w| Some(w.0) != except) {
        if r < w {
            return Some(i);
        }
        r -= w;
        last = Some(i);
    }
    last
}

/// The logit of `token` and its probability under `softmax(logits)` (non-finite logits left out).
///
/// Every generated token pays for this sum over the vocabulary, so it is [`exp_sum`]'s vectorised
/// f32 exponentials, not f64 `exp` calls: over a 32000-token vocabulary those took about 0.5 ms a
/// token, more than a tenth of a decode step of `models/bench.toml` in FP8, and kept the thread pool's
/// workers asleep by the next step's first launch.
fn logit_and_prob(logits: &[f32], token: usize) -> (f32, f32) {
    let max = finite_max(logits);
    let l = logits[token];
    (l, (f64::from(l - max).exp() / exp_sum(logits, max)) as f32)
}

/// The largest finite value of `logits` (`-inf` when none is), in lanes of 16 that vectorise
/// (`f32::max` over an iterator does not: it was 50 us of a 32000-token vocabulary).
fn finite_max(logits: &[f32]) -> f32 {
    const LANES: usize = 16;
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut lanes = logits.chunks_exact(LANES);
    for c in &mut lanes {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a = if x > *a && x.is_finite() { x } else { *a };
        }
    }
    let tail = lanes.remainder().iter().copied().filter(|x| x.is_finite()).fold(f32::NEG_INFINITY, f32::max);
    acc.iter().copied().fold(tail, f32::max)
}

/// `sum exp(x - max)` over the finite `x` of `logits` (`max` their maximum): f32 exponentials in
/// lanes of 16, summed in f32 over blocks of 1024 and the blocks in f64. Each term is within 2 ulp
/// of the exact exponential ([`exp_nonpositive`]), so the sum is within about 1e-6 relative.
fn exp_sum(logits: &[f32], max: f32) -> f64 {
    const LANES: usize = 16;
    let mut total = 0.0f64;
    for block in logits.chunks(1024) {
        let mut acc = [0.0f32; LANES];
        let mut lanes = block.chunks_exact(LANES);
        for c in &mut lanes {
            for (a, &x) in acc.iter_mut().zip(c) {
                let e = exp_nonpositive(x - max);
                *a += if x.is_finite() { e } else { 0.0 };
            }
        }
        let tail: f32 = (lanes.remainder().iter())
            .map(|&x| if x.is_finite() { exp_nonpositive(x - max) } else { 0.0 })
            .sum();
        total += f64::from(acc.iter().sum::<f32>() + tail);
    }
    total
}

/// `e^x` for `x <= 0` in f32 arithmetic that vectorises on any x86-64 (no calls, no rounding or
/// conversion instructions): `x = n ln 2 + r` with `|r| <= ln 2 / 2` (`n` rounded by adding and
/// subtracting 1.5 * 2^23, `ln 2` in two parts so `r` is exact to f32), `e^r` by its Taylor
/// polynomial of degree 6 (remainder below 1.3e-7 relative), times `2^n` built in the exponent
/// bits from the low mantissa bits of the rounding sum, which hold `n`. Below -87 (where `e^x` is
/// under f32's smallest normal number, and nothing a sum of at least 1 can see) it gives `e^-87`;
/// NaN gives that too, and the caller leaves non-finite logits out.
#[inline(always)]
fn exp_nonpositive(x: f32) -> f32 {
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.0, 0.0);
    let t = x * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0 + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    p * f32::from_bits(t.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127) << 23)
}

/// The MTP depth `k` an input named `mtp_tokens` (1) or `mtp_tokens.k` stands for.
fn mtp_shift(name: &str) -> Option<usize> {
    match name.strip_prefix("mtp_tokens")? {
        "" => Some(1),
        rest => rest.strip_prefix('.')?.parse().ok().filter(|&k| k > 0),
    }
}

fn check_sampling(sampling: Sampling) -> Result<(), RuntimeError> {
    if let Sampling::Sample { temperature, top_p, .. } = sampling {
        if !(temperature.is_finite() && temperature > 0.0) {
            return Err(RuntimeError::BadOption(format!(
                "the temperature must be a positive number (0 means greedy), not {temperature}"
            )));
        }
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(RuntimeError::BadOption(format!("top-p must be in (0, 1], not {top_p}")));
        }
    }
    Ok(())
}

fn check(
    engine: &dyn Engine,
    plan: &Plan,
    prompts: &[Vec<i64>],
    opts: &[GenerateOptions],
) -> Result<u64, RuntimeError> {
    if opts.len() != prompts.len() {
        return Err(RuntimeError::BadOption(format!(
            "{} sets of options for {} prompts: give one per prompt",
            opts.len(),
            prompts.len()
        )));
    }
    for o in opts {
        check_sampling(o.sampling)?;
    }
    for (name, _) in engine.inputs(plan.first())? {
        if name != "tokens" && name != "positions" && name != LAST && mtp_shift(&name).is_none() {
            return Err(RuntimeError::UnknownModelInput(name));
        }
    }
    let vocab = engine.vocab_size().ok_or_else(|| RuntimeError::NoLogits(LOGITS.into()))?;
    if prompts.is_empty() {
        return Err(RuntimeError::NoPrompts);
    }
    let mut limits = engine.limits(plan.first());
    if let Some(cache) = engine.kv_cache() {
        // The prefill holds the prompt (T), the cache every position of the sequence (S).
        if let Some(p) = prompts.iter().find(|p| p.len() as u64 > limits.max_tokens) {
            return Err(RuntimeError::PromptTooLong {
                prompt: p.len(),
                max: limits.max_tokens,
                what: limits.what,
            });
        }
        limits.max_tokens = cache.capacity;
        limits.what = format!("the KV cache ({} positions; kiln compile --max-context)", cache.capacity);
    }
    if prompts.len() as u64 > limits.max_batch {
        return Err(RuntimeError::BatchTooLarge {
            count: prompts.len(),
            max: limits.max_batch,
            what: limits.what,
        });
    }
    for (p, (prompt, opts)) in prompts.iter().zip(opts).enumerate() {
        if prompt.is_empty() {
            return Err(RuntimeError::EmptyPrompt(p));
        }
        if let Some((i, &value)) = prompt.iter().enumerate().find(|&(_, &t)| t < 0 || t as u64 >= vocab) {
            let which = if prompts.len() == 1 {
                format!("prompt token {i}")
            } else {
                format!("prompt {p} token {i}")
            };
            return Err(RuntimeError::PromptToken { which, value, vocab });
        }
        // The last forward pass reads the prompt and every new token but the last.
        // In u128: `max_new_tokens` may be anything a caller passes, `usize::MAX` included.
        let needed = prompt.len() as u128 + (opts.max_new_tokens as u128).saturating_sub(1);
        if needed > u128::from(limits.max_tokens) {
            return Err(RuntimeError::ContextTooLong {
                prompt: prompt.len(),
                new: opts.max_new_tokens,
                needed,
                max: limits.max_tokens,
                what: limits.what,
            });
        }
    }
    Ok(vocab)
}

/// The inputs of one forward pass over the sequences `rows`, right-padded to the longest.
fn batch_inputs(engine: &dyn Engine, program: &str, rows: &[&[i64]]) -> Result<Batch, RuntimeError> {
    let t = rows.iter().map(|r| r.len()).max().unwrap_or(1);
    let shape = vec![rows.len() as u64, t as u64];
    let shifted = |k: usize| -> Vec<i64> {
        rows.iter().flat_map(|r| (0..t).map(move |i| r.get(i + k).copied().unwrap_or(0))).collect()
    };
    let mut last_only = false;
    let inputs = engine
        .inputs(program)?
        .into_iter()
        .map(|(name, dtype)| {
            let (data, shape) = match name.as_str() {
                "tokens" => (shifted(0), shape.clone()),
                "positions" => (rows.iter().flat_map(|_| 0..t as i64).collect(), shape.clone()),
                // A prefill that computes the logits at each row's last token alone.
                LAST => {
                    last_only = true;
                    let last = rows.iter().map(|r| r.len().saturating_sub(1) as i64).collect();
                    (last, vec![rows.len() as u64])
                }
                other => (shifted(mtp_shift(other).unwrap_or(0)), shape.clone()),
            };
            HostTensor { name, dtype, shape, data: HostData::I64(data) }
        })
        .collect();
    Ok(Batch { inputs, t, last_only })
}

/// The input of a prefill program that computes the logits at each row's last token alone
/// (`kiln_compiler::build::LAST`): its logits are `[B, 1, V]`.
pub const LAST: &str = "last";

/// A batch of rows as a program's inputs: `t` new tokens a row, and whether the program's logits
/// are each row's last token's alone.
struct Batch {
    inputs: Vec<HostTensor>,
    t: usize,
    last_only: bool,
}

impl Batch {
    /// The row of the logits that holds the last token of row `r` of `len` tokens.
    fn logits_row(&self, r: usize, len: usize) -> usize {
        match self.last_only {
            true => r,
            false => r * self.t + len - 1,
        }
    }
}

/// The decode step's inputs: each sequence's token at `position[s]`; its logits are one row per
/// sequence.
fn decode_inputs(seqs: &[Vec<i64>], position: &[usize]) -> Batch {
    let shape = vec![seqs.len() as u64, 1];
    let tokens = seqs.iter().zip(position).map(|(s, &p)| s[p]).collect();
    let positions = position.iter().map(|&p| p as i64).collect();
    let tensor = |name: &str, data| HostTensor {
        name: name.into(),
        dtype: DType::I32,
        shape: shape.clone(),
        data: HostData::I64(data),
    };
    Batch { inputs: vec![tensor("tokens", tokens), tensor("positions", positions)], t: 1, last_only: true }
}

/// Generates from each prompt with the same options; see the module documentation. `on_token` sees
/// every token as it is picked. Every check (prompts, ids, lengths, options) is done before the
/// first forward pass.
pub fn generate(
    engine: &mut dyn Engine,
    prompts: &[Vec<i64>],
    opts: &GenerateOptions,
    on_token: &mut dyn FnMut(&TokenEvent),
) -> Result<Generation, RuntimeError> {
    let each = vec![opts.clone(); prompts.len()];
    let streams: Vec<u64> = (0..prompts.len() as u64).collect();
    generate_streams(engine, prompts, &each, &streams, &mut |e| {
        on_token(e);
        Flow::Continue
    })
}

/// Generates from each prompt with its own options (`opts[i]` for `prompts[i]`), in one batch: a
/// sequence's tokens are those it would generate alone with the same options. `on_token` sees every
/// token as it is picked and may end its sequence there. Every check is done before the first
/// forward pass.
pub fn generate_each(
    engine: &mut dyn Engine,
    prompts: &[Vec<i64>],
    opts: &[GenerateOptions],
    on_token: &mut dyn FnMut(&TokenEvent) -> Flow,
) -> Result<Generation, RuntimeError> {
    generate_streams(engine, prompts, opts, &vec![0; prompts.len()], on_token)
}

/// The loop of [`generate`] and [`generate_each`]: sequence `s` draws from stream `streams[s]` of
/// its seed.
fn generate_streams(
    engine: &mut dyn Engine,
    prompts: &[Vec<i64>],
    opts: &[GenerateOptions],
    streams: &[u64],
    on_token: &mut dyn FnMut(&TokenEvent) -> Flow,
) -> Result<Generation, RuntimeError> {
    let plan = plan(engine)?;
    let vocab = check(engine, &plan, prompts, opts)? as usize;
    let start = Instant::now();
    let mut seqs: Vec<Vec<i64>> = prompts.to_vec();
    let mut tokens: Vec<Vec<i64>> = vec![Vec::new(); prompts.len()];
    let mut stopped = vec![false; prompts.len()];
    let mut rngs: Vec<Rng> = opts
        .iter()
        .zip(streams)
        .map(|(o, &stream)| match o.sampling {
            Sampling::Sample { seed, .. } => Rng::for_sequence(seed, stream as usize),
            Sampling::Greedy => Rng(0),
        })
        .collect();
    let mut active: Vec<usize> = (0..prompts.len()).filter(|&s| opts[s].max_new_tokens > 0).collect();
    // With a KV cache: the positions of each sequence the cache holds (the prompt's, after the
    // prefill, then one more per decode step the sequence took part in).
    let mut written: Vec<usize> = prompts.iter().map(Vec::len).collect();
    let mut stats = Stats { prompt_tokens: prompts.iter().map(Vec::len).sum(), ..Stats::default() };
    let mut step = 0;
    let cached = matches!(plan, Plan::Cached { .. });
    while !active.is_empty() {
        let t0 = Instant::now();
        let batch = if cached && step > 0 {
            // Every sequence stays in the batch (its cache row is its own). An active one feeds its
            // newest token at the next position; one that has ended feeds its last cached token
            // again at that token's position, which rewrites the slot with what it holds (never a
            // position past the cache: an ended sequence may have used all of it).
            let position: Vec<usize> = (0..seqs.len())
                .map(|s| if active.contains(&s) { seqs[s].len() - 1 } else { written[s] - 1 })
                .collect();
            for &s in &active {
                written[s] = seqs[s].len();
            }
            decode_inputs(&seqs, &position)
        } else if cached {
            let rows: Vec<&[i64]> = seqs.iter().map(Vec::as_slice).collect();
            batch_inputs(engine, plan.first(), &rows)?
        } else {
            let rows: Vec<&[i64]> = active.iter().map(|&s| seqs[s].as_slice()).collect();
            batch_inputs(engine, plan.first(), &rows)?
        };
        match (&plan, step) {
            (Plan::Cached { decode, .. }, 1..) => engine.run(decode, &batch.inputs)?,
            (p, _) => engine.run(p.first(), &batch.inputs)?,
        }
        let mut made = 0;
        let mut still = Vec::with_capacity(active.len());
        for (r, &s) in active.iter().enumerate() {
            // A cached run's batch holds every sequence, a stateless one the active ones.
            let row = batch.logits_row(if cached { s } else { r }, seqs[s].len());
            let logits = engine.output_f32(LOGITS, row * vocab..(row + 1) * vocab)?;
            let token = pick(&logits, opts[s].sampling, &mut rngs[s])
                .ok_or(RuntimeError::NonFiniteLogits { sequence: s, step })?;
            let (logit, prob) = logit_and_prob(&logits, token);
            let token = token as i64;
            seqs[s].push(token);
            tokens[s].push(token);
            made += 1;
            if step == 0 && s == active[0] {
                stats.first_token = start.elapsed();
            }
            let flow = on_token(&TokenEvent { sequence: s, step, token, logit, prob });
            if opts[s].stop_tokens.contains(&token) || flow == Flow::Stop {
                stopped[s] = true;
            } else if tokens[s].len() < opts[s].max_new_tokens {
                still.push(s);
            }
        }
        stats.forwards += 1;
        if step == 0 {
            stats.prefill = t0.elapsed();
        } else {
            stats.decode += t0.elapsed();
            stats.decode_tokens += made;
        }
        active = still;
        step += 1;
    }
    Ok(Generation { tokens, stopped, stats, cached })
}

mod speculative;

pub use speculative::{check_speculative, generate_speculative, generate_speculative_each};

#[cfg(test)]
mod batch_tests;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_first_maximum_and_skips_nan() {
        let mut rng = Rng(0);
        assert_eq!(pick(&[1.0, 3.0, 3.0, 2.0], Sampling::Greedy, &mut rng), Some(1));
        assert_eq!(pick(&[f32::NAN, 0.5, f32::NAN], Sampling::Greedy, &mut rng), Some(1));
        assert_eq!(pick(&[f32::NAN, f32::INFINITY], Sampling::Greedy, &mut rng), None);
    }

    #[test]
    fn sampling_follows_the_softmax_and_top_p_cuts_the_tail() {
        // Probabilities 0.5, 0.25, 0.125, 0.125 at temperature 1.
        let logits = [2f32.ln() * 3.0, 2f32.ln() * 2.0, 2f32.ln(), 2f32.ln()];
        let count = |top_p: f32, temperature: f32| {
            let mut rng = Rng::for_sequence(7, 0);
            let mut n = [0usize; 4];
            for _ in 0..40_000 {
                n[pick(&logits, Sampling::Sample { temperature, top_p, seed: 7 }, &mut rng).unwrap()] += 1;
            }
            n.map(|c| c as f64 / 40_000.0)
        };
        let all = count(1.0, 1.0);
        for (got, want) in all.iter().zip([0.5, 0.25, 0.125, 0.125]) {
            assert!((got - want).abs() < 0.01, "{all:?}");
        }
        // top-p 0.7 keeps the two most likely (0.5 + 0.25 >= 0.7), renormalised to 2/3 and 1/3.
        let nucleus = count(0.7, 1.0);
        assert!(
            (nucleus[0] - 2.0 / 3.0).abs() < 0.01 && nucleus[2] == 0.0 && nucleus[3] == 0.0,
            "{nucleus:?}"
        );
        // A low temperature is nearly greedy.
        assert!(count(1.0, 0.05)[0] > 0.999);
    }

    #[test]
    fn the_softmax_sum_matches_f64_exponentials() {
        let mut rng = Rng::for_sequence(3, 0);
        for (spread, len) in [(1.0, 1000), (10.0, 32000), (60.0, 32000), (200.0, 5000), (0.0, 17)] {
            let mut logits: Vec<f32> = (0..len).map(|_| ((rng.unit() * 2.0 - 1.0) * spread) as f32).collect();
            logits[len / 2] = f32::NAN;
            logits[len / 3] = f32::NEG_INFINITY;
            let max = logits.iter().copied().filter(|x| x.is_finite()).fold(f32::NEG_INFINITY, f32::max);
            let want: f64 = logits.iter().filter(|x| x.is_finite()).map(|&x| f64::from(x - max).exp()).sum();
            let got = exp_sum(&logits, max);
            assert!(((got - want) / want).abs() < 2e-6, "spread {spread}: {got} against {want}");
        }
        for x in [0.0f32, -1e-3, -0.346, -0.347, -1.0, -10.5, -50.0, -86.9] {
            let (got, want) = (f64::from(exp_nonpositive(x)), f64::from(x).exp());
            assert!(((got - want) / want).abs() < 3e-7, "e^{x}: {got} against {want}");
        }
        assert_eq!(logit_and_prob(&[0.0, 0.0, f32::NAN, 0.0, 0.0], 1), (0.0, 0.25));
        let mut wide: Vec<f32> = (0..37).map(|i| (i as f32 * 0.7).sin()).collect();
        wide[20] = f32::INFINITY;
        wide[3] = f32::NAN;
        let want = wide.iter().copied().filter(|x| x.is_finite()).fold(f32::NEG_INFINITY, f32::max);
        assert_eq!(finite_max(&wide), want);
        assert_eq!(finite_max(&[f32::NAN, f32::INFINITY]), f32::NEG_INFINITY);
    }

    #[test]
    fn sequences_draw_from_their_own_streams() {
        let a: Vec<u64> = (0..3).map(|_| Rng::for_sequence(1, 0).next()).collect();
        assert_eq!(a[0], a[1]);
        assert_ne!(Rng::for_sequence(1, 0).next(), Rng::for_sequence(1, 1).next());
        assert_ne!(Rng::for_sequence(1, 0).next(), Rng::for_sequence(2, 0).next());
    }

    #[test]
    fn mtp_inputs_are_named_by_depth() {
        assert_eq!(mtp_shift("mtp_tokens"), Some(1));
        assert_eq!(mtp_shift("mtp_tokens.3"), Some(3));
        assert_eq!(mtp_shift("mtp_tokens.0"), None);
        assert_eq!(mtp_shift("mtp_tokensx"), None);
        assert_eq!(mtp_shift("tokens"), None);
    }
}
