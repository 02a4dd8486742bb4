//! Speculative decoding with the MTP module (DeepSeek-V3 §5.4.3): the module drafts the token
//! after next, and the main model checks the draft in the same forward pass that makes the next
//! token, so an accepted draft is a second token from one pass of the main model.
//!
//! An artifact compiled with `kiln compile --speculative` has three programs:
//! - `prefill` and `decode`, which also output the main model's hidden state after the final norm
//!   (`hidden`), the decode program taking two new tokens per sequence;
//! - `draft` (kind [`ProgramKind::Draft`]): MTP module 1 over a KV cache of its own layer. At
//!   position `i` it reads the main model's hidden state at `i` and the token at `i + 1`, and
//!   predicts the token at `i + 2` (reference §5).
//!
//! A sequence whose newest token `x` sits at position `n` (not yet in the cache) and whose draft is
//! `d` (the MTP module's guess for position `n + 1`) takes one step:
//!
//! 1. `decode` on `[x, d]` at positions `[n, n + 1]`: the main model's logits after `x` and after
//!    `d`.
//! 2. The token after `x` is picked from the first ([`verify`]): greedy decoding takes its own
//!    token, and the draft stands when that is `d`; sampling takes `d` with its probability, else
//!    draws another token from the rest (speculative sampling's rule). When `d` stands, the token
//!    after it is picked from the second position's logits as plain decoding would, since that
//!    position saw exactly the tokens plain decoding would feed: one pass made two tokens.
//!    Otherwise the sequence gains one token, and the cache slot `n + 1` (written from `d`) is
//!    overwritten by the next step before anything reads it: attention reads each position's own
//!    prefix only.
//! 3. `draft` on the main model's hidden states at the positions that are now final, with the tokens
//!    that follow them (`g1`, and `g2` when accepted): its logits at the last of them give the next
//!    draft. This also fills the module's cache, which its attention reads at later positions.
//!
//! After the prefill, `draft` runs once over the whole prompt (the token after position `i` is the
//! prompt's, and the first new token after the last), which fills the module's cache and gives the
//! first draft.
//!
//! Greedy, the tokens are those of plain greedy decoding when the decode program's logits at a
//! position do not depend on whether one or two tokens ran (every kernel computes each row on its
//! own; the tests compare the two). Sampled, each token has plain sampling's distribution, but the
//! draws differ (a checked draft costs one more number from the sequence's stream), so the tokens
//! of a seed are not plain decoding's.
//!
//! Batches: every sequence keeps its row (its cache rows are its own) and each step runs two tokens
//! per row. A row that does not check a draft (it has ended, needs one more token, or has no room
//! for a second position) runs its token twice at the same position; its hidden state is repeated
//! for the draft program, so both copies write the same values into the same cache slot.

use std::time::Instant;

use kiln_ir::module::ProgramKind;
use kiln_ir::DType;

use super::{
    batch_inputs, check, check_sampling, draw, logit_and_prob, nucleus, pick, program_of, Engine, Flow,
    GenerateOptions, Generation, Nucleus, Plan, Rng, Sampling, Stats, TokenEvent, LOGITS,
};
use crate::weights::{HostData, HostTensor};
use crate::RuntimeError;

/// The output of the main model's hidden states in a speculative artifact, and the draft program's
/// input of them (`kiln_compiler::build::HIDDEN`).
pub const HIDDEN: &str = "hidden";

/// The draft program's logits (`kiln_compiler::build::mtp_logits_name(1, 1)`), `[B, 1, V]`: one
/// row per sequence, at its position [`LAST`].
pub const MTP_LOGITS: &str = "mtp_logits";

/// The draft program's input of the position, per sequence, whose draft it computes
/// (`kiln_compiler::build::LAST`).
pub const LAST: &str = "last";

/// The three programs of speculative decoding.
struct Programs {
    prefill: String,
    decode: String,
    draft: String,
}

fn programs(engine: &dyn Engine) -> Result<Programs, RuntimeError> {
    let missing = |what: &str| RuntimeError::NoSpeculation(what.to_string());
    let (Some(prefill), Some(decode), Some(_)) = (
        program_of(engine, ProgramKind::Prefill),
        program_of(engine, ProgramKind::Decode),
        engine.kv_cache(),
    ) else {
        return Err(missing("it has no prefill and decode programs over a KV cache"));
    };
    let draft = program_of(engine, ProgramKind::Draft).ok_or_else(|| missing("it has no `draft` program"))?;
    if engine.limits(&decode).max_tokens < 2 {
        return Err(missing("its decode program takes one token per sequence, not the two a draft needs"));
    }
    let names = |p: &str| -> Result<Vec<String>, RuntimeError> {
        Ok(engine.inputs(p)?.into_iter().map(|(n, _)| n).collect())
    };
    let draft_inputs = names(&draft)?;
    for want in [HIDDEN, "tokens", "positions", LAST] {
        if !draft_inputs.iter().any(|n| n == want) {
            return Err(missing(&format!(
                "its draft program has no input `{want}` (an artifact from an older kiln: compile it again)"
            )));
        }
    }
    Ok(Programs { prefill, decode, draft })
}

/// One sequence of the batch.
struct Row {
    /// The prompt and the tokens made so far.
    seq: Vec<i64>,
    /// The prompt's length.
    prompt: usize,
    /// The MTP module's guess for the token after the newest one.
    draft: Option<i64>,
    /// Still generating.
    active: bool,
    stopped: bool,
}

impl Row {
    fn made(&self) -> usize {
        self.seq.len() - self.prompt
    }
}

/// Generates from each prompt with speculative decoding; see the module documentation. The options
/// and checks are [`super::generate`]'s (sequence `s` draws from stream `s` of the seed). The
/// [`Stats`] count the drafts checked and accepted.
pub fn generate_speculative(
    engine: &mut dyn Engine,
    prompts: &[Vec<i64>],
    opts: &GenerateOptions,
    on_token: &mut dyn FnMut(&TokenEvent) -> Flow,
) -> Result<Generation, RuntimeError> {
    generate_speculative_each(engine, prompts, &vec![opts.clone(); prompts.len()], on_token)
}

/// Whether `engine` can decode speculatively (it has the `draft` program and its partners); the
/// error says how to compile one that can.
pub fn check_speculative(engine: &dyn Engine) -> Result<(), RuntimeError> {
    programs(engine).map(|_| ())
}

/// [`generate_speculative`] with options per sequence, as [`super::generate_each`] takes them (a
/// server's batch of requests).
pub fn generate_speculative_each(
    engine: &mut dyn Engine,
    prompts: &[Vec<i64>],
    opts: &[GenerateOptions],
    on_token: &mut dyn FnMut(&TokenEvent) -> Flow,
) -> Result<Generation, RuntimeError> {
    for o in opts {
        check_sampling(o.sampling)?;
    }
    let progs = programs(engine)?;
    let plan = Plan::Cached { prefill: progs.prefill.clone(), decode: progs.decode.clone() };
    let vocab = check(engine, &plan, prompts, opts)? as usize;
    let capacity = engine.kv_cache().map_or(0, |c| c.capacity) as usize;
    let hidden_dtype = input_dtype(engine, &progs.draft, HIDDEN)?;
    let max_new = |s: usize| opts[s].max_new_tokens;

    let start = Instant::now();
    let mut stats = Stats { prompt_tokens: prompts.iter().map(Vec::len).sum(), ..Stats::default() };
    let mut rows: Vec<Row> = prompts
        .iter()
        .enumerate()
        .map(|(s, p)| Row {
            seq: p.clone(),
            prompt: p.len(),
            draft: None,
            active: max_new(s) > 0,
            stopped: false,
        })
        .collect();
    if rows.iter().all(|r| !r.active) {
        return Ok(finish(rows, stats));
    }
    // Sequence `s` draws from stream `s` of the seed, as in `generate`.
    let mut rngs: Vec<Rng> = (0..prompts.len())
        .map(|s| match opts[s].sampling {
            Sampling::Sample { seed, .. } => Rng::for_sequence(seed, s),
            Sampling::Greedy => Rng(0),
        })
        .collect();
    // The token of a row's logits: picked as plain decoding picks it, or, where the position
    // checks draft `d`, by `verify`; with its logit and probability, and whether `d` stood.
    let pick_row = |logits: &[f32],
                    rng: &mut Rng,
                    draft: Option<i64>,
                    sequence: usize,
                    step: usize|
     -> Result<((i64, f32, f32), bool), RuntimeError> {
        let sampling = opts[sequence].sampling;
        let picked = match draft {
            Some(d) => verify(logits, sampling, d, rng),
            None => pick(logits, sampling, rng).map(|t| (t, false)),
        };
        let (t, accepted) = picked.ok_or(RuntimeError::NonFiniteLogits { sequence, step })?;
        let (logit, prob) = logit_and_prob(logits, t);
        Ok(((t as i64, logit, prob), accepted))
    };
    // Emits `token` for row `s`; returns whether the row goes on.
    let mut emit = |row: &mut Row, s: usize, (token, logit, prob): (i64, f32, f32)| -> bool {
        let step = row.made();
        row.seq.push(token);
        let flow = on_token(&TokenEvent { sequence: s, step, token, logit, prob });
        if opts[s].stop_tokens.contains(&token) || flow == Flow::Stop {
            row.stopped = true;
            row.active = false;
        } else if row.made() >= max_new(s) {
            row.active = false;
        }
        row.active
    };

    // The prefill: the first token of every sequence, then the draft program over the prompts.
    let t0 = Instant::now();
    let prompt_rows: Vec<&[i64]> = prompts.iter().map(Vec::as_slice).collect();
    let batch = batch_inputs(engine, &progs.prefill, &prompt_rows)?;
    let t = batch.t;
    engine.run(&progs.prefill, &batch.inputs)?;
    stats.forwards += 1;
    for (s, row) in rows.iter_mut().enumerate() {
        if !row.active {
            continue;
        }
        let r = batch.logits_row(s, row.prompt);
        let logits = engine.output_f32(LOGITS, r * vocab..(r + 1) * vocab)?;
        let (picked, _) = pick_row(&logits, &mut rngs[s], None, s, 0)?;
        emit(row, s, picked);
    }
    stats.first_token = start.elapsed();
    stats.prefill = t0.elapsed();
    let t0 = Instant::now();
    if rows.iter().any(|r| r.active) {
        // Position `i` of the prompt is followed by the token at `i + 1`: the prompt's, then the
        // first new token; padding after it.
        let hidden = read_all(engine, HIDDEN, rows.len() * t)?;
        let next: Vec<i64> = rows
            .iter()
            .flat_map(|r| {
                (0..t).map(move |i| r.seq.get(i + 1).copied().filter(|_| i < r.prompt).unwrap_or(0))
            })
            .collect();
        let positions: Vec<i64> = rows.iter().flat_map(|_| 0..t as i64).collect();
        // Each prompt's last position drafts.
        let last = rows.iter().map(|r| r.prompt as i64 - 1).collect();
        let inputs = draft_inputs(hidden_dtype, rows.len(), t, hidden, next, positions, last);
        engine.run(&progs.draft, &inputs)?;
        for (s, row) in rows.iter_mut().enumerate() {
            if row.active {
                row.draft = argmax(engine, MTP_LOGITS, s, vocab)?;
            }
        }
    }
    stats.decode += t0.elapsed();

    // The decode steps.
    let mut step = 1;
    while rows.iter().any(|r| r.active) {
        let t0 = Instant::now();
        // Each row's newest token at its position `n`, then the draft at `n + 1` or the same token
        // again at `n`. A row that has ended runs its last cached token at that token's position,
        // which rewrites the slot with what it holds.
        let mut tokens = Vec::with_capacity(2 * rows.len());
        let mut positions = Vec::with_capacity(2 * rows.len());
        let mut checks = Vec::with_capacity(rows.len());
        for (s, row) in rows.iter().enumerate() {
            let n = row.seq.len() - 1;
            let (n, x) = if row.active { (n, row.seq[n]) } else { (n - 1, row.seq[n - 1]) };
            let check = row.active && max_new(s) - row.made() >= 2 && n + 1 < capacity;
            let d = row.draft.filter(|_| check);
            tokens.extend([x, d.unwrap_or(x)]);
            positions.extend([n as i64, (n + usize::from(d.is_some())) as i64]);
            checks.push(d);
        }
        let inputs = vec![
            tensor("tokens", rows.len(), 2, tokens),
            tensor("positions", rows.len(), 2, positions.clone()),
        ];
        engine.run(&progs.decode, &inputs)?;
        stats.forwards += 1;
        let mut made = 0;
        // Per row: how many of its two positions are final, and the token after each.
        let mut final_ = vec![0usize; rows.len()];
        let mut after = vec![[0i64; 2]; rows.len()];
        for (s, row) in rows.iter_mut().enumerate() {
            if !row.active {
                continue;
            }
            let logits = engine.output_f32(LOGITS, 2 * s * vocab..(2 * s + 1) * vocab)?;
            let (g1, accepted) = pick_row(&logits, &mut rngs[s], checks[s], s, step)?;
            final_[s] = 1;
            after[s] = [g1.0, g1.0];
            made += 1;
            let go_on = emit(row, s, g1);
            stats.drafted += usize::from(checks[s].is_some());
            if accepted {
                stats.accepted += 1;
                if go_on {
                    let logits = engine.output_f32(LOGITS, (2 * s + 1) * vocab..(2 * s + 2) * vocab)?;
                    let (g2, _) = pick_row(&logits, &mut rngs[s], None, s, step)?;
                    final_[s] = 2;
                    after[s][1] = g2.0;
                    made += 1;
                    emit(row, s, g2);
                }
            }
        }
        stats.decode_tokens += made;
        if rows.iter().any(|r| r.active) {
            // The draft program on the final positions; a row with one final position repeats it.
            let d = hidden_size(engine, rows.len() * 2)?;
            let mut hidden = read_all(engine, HIDDEN, rows.len() * 2)?;
            let mut next = Vec::with_capacity(2 * rows.len());
            for s in 0..rows.len() {
                if final_[s] < 2 {
                    let (row0, row1) = hidden[2 * s * d..(2 * s + 2) * d].split_at_mut(d);
                    row1.copy_from_slice(row0);
                    positions[2 * s + 1] = positions[2 * s];
                }
                next.extend(after[s]);
            }
            // The last final position drafts (a row that has ended: any).
            let last = final_.iter().map(|&f| f.max(1) as i64 - 1).collect();
            let inputs = draft_inputs(hidden_dtype, rows.len(), 2, hidden, next, positions, last);
            engine.run(&progs.draft, &inputs)?;
            for (s, row) in rows.iter_mut().enumerate() {
                if row.active {
                    row.draft = argmax(engine, MTP_LOGITS, s, vocab)?;
                }
            }
        }
        stats.decode += t0.elapsed();
        step += 1;
    }
    Ok(finish(rows, stats))
}

/// The token at a position whose draft is `d`, and whether the draft stood (the rule of
/// speculative sampling, Leviathan et al. 2023 and Chen et al. 2023, for a draft that is one
/// token, as a greedy draft is): greedy decoding takes its own token, which stands when it is `d`;
/// sampling takes `d` with its probability `p(d)` under `sampling` (temperature and top-p), and
/// otherwise draws from `p` without `d`, renormalised. Either way the token has exactly the
/// distribution plain decoding's would have: `d` with `p(d)`, any other `x` with
/// `(1 - p(d)) p(x) / (1 - p(d))`. `None` when no logit is finite.
fn verify(logits: &[f32], sampling: Sampling, d: i64, rng: &mut Rng) -> Option<(usize, bool)> {
    match nucleus(logits, sampling)? {
        Nucleus::Greedy(best) => Some((best, best as i64 == d)),
        Nucleus::Sample { weights, kept } => {
            let wd = weights.iter().find(|w| w.0 as i64 == d).map_or(0.0, |w| w.1);
            if rng.unit() * kept < wd {
                return Some((d as usize, true));
            }
            draw(&weights, kept - wd, usize::try_from(d).ok(), rng).map(|t| (t, false))
        }
    }
}

fn finish(rows: Vec<Row>, stats: Stats) -> Generation {
    let stopped = rows.iter().map(|r| r.stopped).collect();
    let tokens = rows.into_iter().map(|r| r.seq[r.prompt..].to_vec()).collect();
    Generation { tokens, stopped, stats, cached: true }
}

fn input_dtype(engine: &dyn Engine, program: &str, name: &str) -> Result<DType, RuntimeError> {
    engine
        .inputs(program)?
        .into_iter()
        .find(|(n, _)| n == name)
        .map(|(_, t)| t)
        .ok_or_else(|| RuntimeError::NoSpeculation(format!("its {program} program has no input `{name}`")))
}

fn tensor(name: &str, b: usize, t: usize, data: Vec<i64>) -> HostTensor {
    HostTensor {
        name: name.into(),
        dtype: DType::I32,
        shape: vec![b as u64, t as u64],
        data: HostData::I64(data),
    }
}

fn draft_inputs(
    hidden_dtype: DType,
    b: usize,
    t: usize,
    hidden: Vec<f32>,
    next: Vec<i64>,
    positions: Vec<i64>,
    last: Vec<i64>,
) -> Vec<HostTensor> {
    let d = hidden.len() / (b * t).max(1);
    vec![
        HostTensor {
            name: HIDDEN.into(),
            dtype: hidden_dtype,
            shape: vec![b as u64, t as u64, d as u64],
            data: HostData::F32(hidden),
        },
        tensor("tokens", b, t, next),
        tensor("positions", b, t, positions),
        HostTensor { name: LAST.into(), dtype: DType::I32, shape: vec![b as u64], data: HostData::I64(last) },
    ]
}

/// The size of the last dimension of the [`HIDDEN`] output of the last run, which holds `rows`
/// positions.
fn hidden_size(engine: &dyn Engine, rows: usize) -> Result<usize, RuntimeError> {
    Ok(engine.output_len(HIDDEN)? / rows.max(1))
}

/// The whole float output `name` of the last run, which holds `rows` positions.
fn read_all(engine: &dyn Engine, name: &str, rows: usize) -> Result<Vec<f32>, RuntimeError> {
    let d = hidden_size(engine, rows)?;
    engine.output_f32(name, 0..rows * d)
}

/// The greedy token of row `r` of the logits output `name`; `None` when no logit is finite (no
/// draft then: the step makes one token, as plain decoding does).
fn argmax(engine: &dyn Engine, name: &str, r: usize, vocab: usize) -> Result<Option<i64>, RuntimeError> {
    let logits = engine.output_f32(name, r * vocab..(r + 1) * vocab)?;
    Ok(pick(&logits, Sampling::Greedy, &mut Rng(0)).map(|t| t as i64))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Speculative sampling keeps the distribution: over many draws with a draft of each token in
    /// turn, every token's frequency is its probability under the temperature and top-p.
    #[test]
    fn a_checked_draft_leaves_the_sampled_distribution_as_it_was() {
        // Probabilities 0.5, 0.25, 0.125, 0.125 at temperature 1.
        let logits = [2f32.ln() * 3.0, 2f32.ln() * 2.0, 2f32.ln(), 2f32.ln()];
        let sampling = Sampling::Sample { temperature: 1.0, top_p: 1.0, seed: 3 };
        for d in 0..4i64 {
            let mut rng = Rng::for_sequence(3, d as usize);
            let (mut n, mut stood) = ([0usize; 4], 0usize);
            for _ in 0..40_000 {
                let (t, accepted) = verify(&logits, sampling, d, &mut rng).unwrap();
                n[t] += 1;
                stood += usize::from(accepted);
                assert_eq!(accepted, t as i64 == d);
            }
            for (got, want) in n.iter().map(|&c| c as f64 / 40_000.0).zip([0.5, 0.25, 0.125, 0.125]) {
                assert!((got - want).abs() < 0.01, "draft {d}: {n:?}");
            }
            assert_eq!(stood, n[d as usize]);
        }
        // Top-p 0.7 keeps the first two (2/3 and 1/3): a draft outside them never stands.
        let nucleus = Sampling::Sample { temperature: 1.0, top_p: 0.7, seed: 3 };
        let mut rng = Rng::for_sequence(3, 9);
        let mut n = [0usize; 4];
        for _ in 0..30_000 {
            n[verify(&logits, nucleus, 3, &mut rng).unwrap().0] += 1;
        }
        assert!(n[2] == 0 && n[3] == 0 && (n[0] as f64 / 30_000.0 - 2.0 / 3.0).abs() < 0.01, "{n:?}");
        // Greedy: the first maximum, standing only when it is the draft.
        assert_eq!(verify(&logits, Sampling::Greedy, 0, &mut rng), Some((0, true)));
        assert_eq!(verify(&logits, Sampling::Greedy, 2, &mut rng), Some((0, false)));
        assert_eq!(verify(&[f32::NAN; 4], sampling, 0, &mut rng), None);
    }
}
