//! The schedule verifier. A schedule kiln generates must pass it (a failure is a generator bug); a
//! schedule read from elsewhere (an artifact, a test) is checked with it before it is simulated or
//! run. It lives here, beside the data, so that [`crate::artifact::Manifest::validate`] checks the
//! lists of an artifact's parallel plan without the compiler (the generators and the simulator are
//! `kiln_compiler::schedule`, which re-exports this module).
//!
//! Invariants:
//!
//! 1. Shape: one list per rank (`ranks.len() == pp`), one lane per micro-batch
//!    (`lane_of.len() == micro_batches`, each naming a lane), lanes of equal, non-zero length, every
//!    slot on a rank below `pp`, no slot on two lanes or twice on one, and each rank's chunks
//!    numbered `0, 1, ...` without gaps.
//! 2. Placement, for the schedules kiln knows by name: 1F1B and ZB1P put stage `i` on rank `i`;
//!    DualPipe has two lanes, the forward one with stage `i` on rank `i` and the reverse one with
//!    stage `i` on rank `pp-1-i`, so rank `i` holds stages `i` and `pp-1-i`, and the first half of
//!    the micro-batches take the forward lane; DualPipeV has one lane of `2·pp` stages in a V,
//!    stage `i` on rank `i` for `i < pp` and on rank `2·pp-1-i` after.
//! 3. Work: every compute step names a micro-batch of the schedule on a chunk of its own rank that
//!    is on that micro-batch's lane.
//! 4. Each micro-batch, on each stage of its lane, is computed exactly once forward and exactly once
//!    backward: one full backward (alone or in an overlapped pair), or one backward for inputs and
//!    one backward for weights. On its rank, the forward comes before the backward, and the
//!    backward for inputs before the one for weights.
//! 5. Data flows along the lane: for consecutive stages on one rank, the earlier stage's forward
//!    comes first and the later stage's backward comes first (a local hand-off); across ranks,
//!    exactly one send of the activations after the earlier stage's forward, matched by exactly one
//!    receive before the later stage's forward, and exactly one send of the gradient after the
//!    later stage's backward (for inputs or full), matched by exactly one receive before the earlier
//!    stage's backward. No other send or receive exists, and each sits on the rank it names.
//!
//! Deliberately not checked here: that the ranks cannot deadlock (receives waiting in a cycle).
//! That depends on the whole interleaving; the simulator (`kiln_compiler::schedule::simulate`) finds
//! it and reports the waiting ranks.

use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};
use std::fmt;

use super::{Chunk, Instr, MicroBatch, Rank, Schedule, Slot, Transfer, Work};

/// One broken invariant, with the step it was found at when there is one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// The rank and the index of the step in its list.
    pub at: Option<(Rank, usize)>,
    pub message: String,
}

/// Everything wrong with a schedule.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct VerifyError {
    pub schedule: String,
    pub problems: Vec<Problem>,
}

impl fmt::Display for VerifyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        write!(f, "schedule `{}` is invalid ({n} problem{}):", self.schedule, if n == 1 { "" } else { "s" })?;
        for p in &self.problems {
            match p.at {
                Some((rank, i)) => write!(f, "\n  {rank} step {i}: {}", p.message)?,
                None => write!(f, "\n  {}", p.message)?,
            }
        }
        Ok(())
    }
}

/// The most problems reported; a broken generator breaks many steps the same way.
const MAX_PROBLEMS: usize = 20;

/// Where each kind of step sits: (slot, micro-batch) to the step indices on the slot's rank.
#[derive(Default)]
struct Index {
    forward: HashMap<(Slot, MicroBatch), Vec<usize>>,
    backward: HashMap<(Slot, MicroBatch), Vec<usize>>,
    backward_input: HashMap<(Slot, MicroBatch), Vec<usize>>,
    weight: HashMap<(Slot, MicroBatch), Vec<usize>>,
    /// (is a gradient, is a send, transfer) to the steps, as (rank, index).
    comm: HashMap<(bool, bool, Transfer), Vec<(Rank, usize)>>,
}

/// Checks every invariant of the module documentation.
pub fn verify(s: &Schedule) -> Result<(), VerifyError> {
    let mut problems = Vec::new();
    check_shape(s, &mut problems);
    if problems.is_empty() {
        check_placement(s, &mut problems);
        let index = index(s, &mut problems);
        check_work(s, &index, &mut problems);
    }
    if problems.is_empty() {
        Ok(())
    } else {
        problems.truncate(MAX_PROBLEMS);
        Err(VerifyError { schedule: s.name.clone(), problems })
    }
}

fn problem(at: Option<(Rank, usize)>, message: String) -> Problem {
    Problem { at, message }
}

/// Invariant 1.
fn check_shape(s: &Schedule, problems: &mut Vec<Problem>) {
    if s.ranks.len() != s.pp as usize {
        problems.push(problem(None, format!("pp is {} but there are {} rank lists", s.pp, s.ranks.len())));
    }
    if s.lane_of.len() != s.micro_batches as usize {
        problems.push(problem(
            None,
            format!("{} micro-batches but lane_of names {} lanes", s.micro_batches, s.lane_of.len()),
        ));
    }
    if let Some((m, l)) = s.lane_of.iter().enumerate().find(|(_, &l)| l as usize >= s.lanes.len()) {
        problems.push(problem(
            None,
            format!("{} follows lane {l}, but there are {} lanes", MicroBatch(m as u32), s.lanes.len()),
        ));
    }
    let stages = s.stages();
    if stages == 0 || s.lanes.iter().any(|l| l.len() != stages) {
        let lens: Vec<usize> = s.lanes.iter().map(Vec::len).collect();
        problems
            .push(problem(None, format!("lanes must have the same, non-zero length; they have {lens:?}")));
    }
    let mut seen = HashSet::default();
    for slot in s.lanes.iter().flatten() {
        if slot.rank.0 >= s.pp {
            problems.push(problem(None, format!("slot {slot} is on a rank past the last (pp = {})", s.pp)));
        }
        if !seen.insert(*slot) {
            problems.push(problem(None, format!("slot {slot} holds two stages")));
        }
    }
    // Only over the lists there are: a `pp` read from a file may be anything.
    for r in 0..s.ranks.len() as u32 {
        let chunks = s.chunks(Rank(r));
        if chunks.iter().enumerate().any(|(i, c)| c.0 as usize != i) {
            problems.push(problem(
                None,
                format!("{} has chunks {chunks:?}: they must be numbered 0, 1, ...", Rank(r)),
            ));
        }
    }
}

/// Invariant 2.
fn check_placement(s: &Schedule, problems: &mut Vec<Problem>) {
    let slot = |r: u32, c: u32| Slot { rank: Rank(r), chunk: Chunk(c) };
    let pp = s.pp;
    let expected: Option<(Vec<Vec<Slot>>, &str)> = match s.name.as_str() {
        "1f1b" | "zb1p" => Some((vec![(0..pp).map(|r| slot(r, 0)).collect()], "stage i on rank i")),
        "dualpipe" => Some((
            vec![(0..pp).map(|r| slot(r, 0)).collect(), (0..pp).rev().map(|r| slot(r, 1)).collect()],
            "rank i holds stage i of the forward lane and stage pp-1-i of the reverse lane",
        )),
        "dualpipev" => Some((
            vec![(0..pp).map(|r| slot(r, 0)).chain((0..pp).rev().map(|r| slot(r, 1))).collect()],
            "a V of 2·pp stages: stage i on rank i, then back up, stage 2·pp-1-i on rank i",
        )),
        _ => None,
    };
    if let Some((lanes, rule)) = expected {
        if s.lanes != lanes {
            problems.push(problem(None, format!("{} places its stages wrongly: expected {rule}", s.name)));
        }
    }
    if s.name == "dualpipe" {
        let half = s.micro_batches / 2;
        if let Some(m) = (0..s.micro_batches).find(|&m| s.lane_of[m as usize] != u32::from(m >= half)) {
            problems.push(problem(
                None,
                format!("dualpipe sends the first half of the micro-batches forward and the rest in reverse; {} does not", MicroBatch(m)),
            ));
        }
    }
}

/// Invariant 3, and the index the others are checked on.
fn index(s: &Schedule, problems: &mut Vec<Problem>) -> Index {
    let mut ix = Index::default();
    // Each lane's slots as a set: a lane has a slot per stage, so a search of it per step cost
    // pp times the steps (seconds at a thousand ranks).
    let on_lane: Vec<HashSet<Slot>> = s.lanes.iter().map(|l| l.iter().copied().collect()).collect();
    for (r, list) in s.ranks.iter().enumerate() {
        let rank = Rank(r as u32);
        for (i, instr) in list.iter().enumerate() {
            let at = Some((rank, i));
            let mut work = |w: Work, map: &mut HashMap<(Slot, MicroBatch), Vec<usize>>| {
                let slot = Slot { rank, chunk: w.chunk };
                if w.mb.0 >= s.micro_batches {
                    problems
                        .push(problem(at, format!("`{instr}` names {}, past the last micro-batch", w.mb)));
                } else if !on_lane[s.lane_of[w.mb.0 as usize] as usize].contains(&slot) {
                    problems.push(problem(at, format!("`{instr}`: {slot} is not on the lane of {}", w.mb)));
                } else {
                    map.entry((slot, w.mb)).or_default().push(i);
                }
            };
            match *instr {
                Instr::Forward(w) => work(w, &mut ix.forward),
                Instr::BackwardInput(w) => work(w, &mut ix.backward_input),
                Instr::Weight(w) => work(w, &mut ix.weight),
                Instr::Backward(w) => work(w, &mut ix.backward),
                Instr::ForwardBackward { forward, backward } => {
                    work(forward, &mut ix.forward);
                    work(backward, &mut ix.backward);
                }
                Instr::SendActivation(t) | Instr::SendGradient(t) => {
                    if t.from.rank != rank {
                        problems.push(problem(
                            at,
                            format!("`{instr}` sends from {}, not from this rank", t.from),
                        ));
                    }
                    let grad = matches!(instr, Instr::SendGradient(_));
                    ix.comm.entry((grad, true, t)).or_default().push((rank, i));
                }
                Instr::RecvActivation(t) | Instr::RecvGradient(t) => {
                    if t.to.rank != rank {
                        problems
                            .push(problem(at, format!("`{instr}` receives into {}, not on this rank", t.to)));
                    }
                    let grad = matches!(instr, Instr::RecvGradient(_));
                    ix.comm.entry((grad, false, t)).or_default().push((rank, i));
                }
            }
        }
    }
    ix
}

/// The single step of a kind for a work, or a problem saying how many there are.
fn one(
    map: &HashMap<(Slot, MicroBatch), Vec<usize>>,
    slot: Slot,
    mb: MicroBatch,
    what: &str,
    problems: &mut Vec<Problem>,
) -> Option<usize> {
    match map.get(&(slot, mb)).map(Vec::as_slice) {
        Some([i]) => Some(*i),
        found => {
            let at = found.and_then(|v| v.get(1)).map(|&i| (slot.rank, i));
            let n = found.map_or(0, <[usize]>::len);
            problems.push(problem(at, format!("{mb} on {slot} has {n} {what} steps; it needs exactly one")));
            None
        }
    }
}

/// Invariants 4 and 5.
fn check_work(s: &Schedule, ix: &Index, problems: &mut Vec<Problem>) {
    let mut expected_comm = HashSet::default();
    for m in 0..s.micro_batches {
        let mb = MicroBatch(m);
        let lane = s.lane(mb);
        // Per stage: the forward, and the step that makes the input gradient (the backward for
        // inputs or the full backward).
        let mut steps: Vec<Option<(usize, usize)>> = Vec::new();
        for &slot in lane {
            let f = one(&ix.forward, slot, mb, "forward", problems);
            let full = ix.backward.contains_key(&(slot, mb));
            let split = ix.backward_input.contains_key(&(slot, mb)) || ix.weight.contains_key(&(slot, mb));
            let b = if full && split {
                problems.push(problem(None, format!("{mb} on {slot} has both a full and a split backward")));
                None
            } else if split {
                let b = one(&ix.backward_input, slot, mb, "backward-for-inputs", problems);
                let w = one(&ix.weight, slot, mb, "backward-for-weights", problems);
                if let (Some(b), Some(w)) = (b, w) {
                    if w < b {
                        problems.push(problem(Some((slot.rank, w)), format!("the weight gradient of {mb} on {slot} comes before its backward for inputs (step {b})")));
                    }
                }
                b
            } else {
                one(&ix.backward, slot, mb, "backward", problems)
            };
            if let (Some(f), Some(b)) = (f, b) {
                if b < f {
                    problems.push(problem(
                        Some((slot.rank, b)),
                        format!("the backward of {mb} on {slot} comes before its forward (step {f})"),
                    ));
                }
            }
            steps.push(f.zip(b));
        }
        for k in 1..lane.len() {
            let (a, b) = (lane[k - 1], lane[k]);
            let (Some((fa, ba)), Some((fb, bb))) = (steps[k - 1], steps[k]) else { continue };
            if a.rank == b.rank {
                if fb < fa {
                    problems.push(problem(
                        Some((b.rank, fb)),
                        format!(
                            "{mb}: the forward on {b} comes before the forward on {a}, the stage before it"
                        ),
                    ));
                }
                if ba < bb {
                    problems.push(problem(
                        Some((a.rank, ba)),
                        format!(
                            "{mb}: the backward on {a} comes before the backward on {b}, the stage after it"
                        ),
                    ));
                }
                continue;
            }
            let act = Transfer { mb, from: a, to: b };
            let grad = Transfer { mb, from: b, to: a };
            for (is_grad, t, produced, consumed) in [(false, act, fa, fb), (true, grad, bb, ba)] {
                expected_comm.insert((is_grad, true, t));
                expected_comm.insert((is_grad, false, t));
                let what = if is_grad { "gradient" } else { "activations" };
                let send = exactly_one(ix, (is_grad, true, t), what, "send", problems);
                let recv = exactly_one(ix, (is_grad, false, t), what, "receive", problems);
                if let Some((r, i)) = send {
                    if i < produced {
                        problems.push(problem(
                            Some((r, i)),
                            format!("the {what} of {t} are sent before they are computed (step {produced})"),
                        ));
                    }
                }
                if let Some((r, i)) = recv {
                    if i > consumed {
                        problems.push(problem(Some((r, i)), format!("the {what} of {t} are received after the step that needs them (step {consumed})")));
                    }
                }
            }
        }
    }
    let mut extra: Vec<_> = ix.comm.iter().filter(|(k, _)| !expected_comm.contains(*k)).collect();
    extra.sort_by_key(|(_, at)| at[0]);
    for ((is_grad, is_send, t), at) in extra {
        let (what, verb) =
            (if *is_grad { "gradient" } else { "activations" }, if *is_send { "send" } else { "receive" });
        problems.push(problem(Some(at[0]), format!("a {verb} of the {what} of {t}, which do not flow there (not consecutive stages of the lane of {} on two ranks)", t.mb)));
    }
}

fn exactly_one(
    ix: &Index,
    key: (bool, bool, Transfer),
    what: &str,
    verb: &str,
    problems: &mut Vec<Problem>,
) -> Option<(Rank, usize)> {
    match ix.comm.get(&key).map(Vec::as_slice) {
        Some([at]) => Some(*at),
        found => {
            let n = found.map_or(0, <[(Rank, usize)]>::len);
            let other = if verb == "send" { "receive" } else { "send" };
            problems.push(problem(
                found.and_then(|v| v.get(1)).copied(),
                format!("the {what} of {} have {n} {verb}s; each {other} needs exactly one", key.2),
            ));
            None
        }
    }
}
