//! An event-driven simulation of a schedule: every rank runs its list in order from time 0, each
//! compute step taking its cost, each send handing its data to the network (the sender does not
//! wait; the data arrives `comm` later) and each receive waiting until its data has arrived.
//!
//! Costs follow the DualPipe README: `F` a forward chunk, `B` a *full* backward chunk (inputs and
//! weights), `W` the backward for weights, `F&B` an overlapped forward and full backward pair. So a
//! backward for inputs alone ([`Instr::BackwardInput`]) takes `B - W`.
//!
//! What it reports, per rank:
//!
//! - **busy**: the sum of the rank's compute steps.
//! - **bubble**: the makespan (the time the last rank finishes) minus busy: the time the rank sits
//!   idle while the step is not over, at the start waiting for its first input, in the middle
//!   waiting for data, and at the end waiting for the others. The DualPipe table's bubble is the
//!   largest of these over the ranks: for 1F1B and ZB1P every rank has it; for DualPipe the middle
//!   ranks (`pp/2-1`, `pp/2`) have it and ranks nearer the ends idle a little less; for DualPipeV
//!   the last rank has it (the tests pin each).
//! - **peak activations**, in micro-batches: a micro-batch's activations on a chunk are live from
//!   the start of its forward until the step that finishes its backward ends: the full backward, or,
//!   when the backward is split, the backward for weights (which still reads them). An overlapped
//!   pair holds its forward's and its backward's activations together. The peak counts live
//!   (micro-batch, chunk) pairs; one stage's activations for one micro-batch is the unit.
//! - **parameter copies**: [`kiln_ir::schedule::Schedule::parameter_copies`].
//!
//! [`simulate`] gives every stage the same costs, as the DualPipe table does. [`simulate_stages`]
//! gives each stage its own ([`StageCost`], from the partition's cost model): a step takes the
//! costs of the stage its work is on, and an overlapped pair its forward's F plus its backward's B
//! (no overlap gain: how much of a pair hides under the other is not modelled per stage).
//!
//! What it does not model: contention (transfers are independent and take `comm` each, however many
//! are in flight), the overlap of communication with computation inside a step (an `F&B` simply
//! takes the `F&B` cost), memory other than activations.

use rustc_hash::FxHashMap as HashMap;

use kiln_ir::schedule::{Instr, Rank, Schedule, Slot, Transfer, Work};

/// The cost of each kind of step and of a transfer, in any one unit of time.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Costs {
    /// F: a forward chunk.
    pub forward: f64,
    /// B: a full backward chunk (input and weight gradients).
    pub backward: f64,
    /// W: the backward for weights alone.
    pub weight: f64,
    /// F&B: an overlapped forward and full backward.
    pub overlapped: f64,
    /// C: one point-to-point transfer, send to arrival.
    pub comm: f64,
}

/// The largest cost a step may have: a timeline adds up millions of them (1e308 made the
/// makespan infinite and the bubbles NaN).
pub const MAX_COST: f64 = 1e15;

/// `v` as a user wrote it: plainly, or in exponent form past 1e16 (`1e308`, not its 309 digits).
pub fn number_text(v: f64) -> String {
    if v.abs() < 1e16 {
        v.to_string()
    } else {
        format!("{v:e}")
    }
}

/// Costs that cannot be simulated.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum CostError {
    #[error("the cost {name} = {} must be a number from 0 to {MAX_COST:e}", number_text(*value))]
    Invalid { name: &'static str, value: f64 },
    #[error(
        "the cost W = {weight} is more than B = {backward}: B is the full backward (inputs and weights), \
         so the backward for weights alone takes at most B"
    )]
    WeightAboveBackward { weight: f64, backward: f64 },
}

impl Costs {
    /// Checked costs; `overlapped` defaults to `forward + backward` (no overlap gain).
    pub fn new(
        forward: f64,
        backward: f64,
        weight: f64,
        overlapped: Option<f64>,
        comm: f64,
    ) -> Result<Costs, CostError> {
        let overlapped = overlapped.unwrap_or(forward + backward);
        for (name, value) in
            [("F", forward), ("B", backward), ("W", weight), ("F&B", overlapped), ("comm", comm)]
        {
            if !(0.0..=MAX_COST).contains(&value) {
                return Err(CostError::Invalid { name, value });
            }
        }
        if weight > backward {
            return Err(CostError::WeightAboveBackward { weight, backward });
        }
        Ok(Costs { forward, backward, weight, overlapped, comm })
    }

    /// How long a step computes; sends and receives take no compute time.
    pub fn duration(&self, instr: &Instr) -> f64 {
        match instr {
            Instr::Forward(_) => self.forward,
            Instr::BackwardInput(_) => self.backward - self.weight,
            Instr::Weight(_) => self.weight,
            Instr::Backward(_) => self.backward,
            Instr::ForwardBackward { .. } => self.overlapped,
            Instr::SendActivation(_)
            | Instr::RecvActivation(_)
            | Instr::SendGradient(_)
            | Instr::RecvGradient(_) => 0.0,
        }
    }
}

/// One step as it ran. A compute step spans its computation; a send is an instant; a receive spans
/// the wait for its data (empty when the data was there).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Event {
    pub rank: Rank,
    /// The step's index in its rank's list.
    pub index: usize,
    pub instr: Instr,
    pub start: f64,
    pub end: f64,
}

/// What the simulation reports for one rank (the module documentation defines each).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RankReport {
    pub rank: Rank,
    pub busy: f64,
    pub bubble: f64,
    /// When the rank's first compute step starts and its last one ends.
    pub first_start: f64,
    pub last_end: f64,
    pub peak_activations: u32,
    pub parameter_copies: f64,
}

/// A finished simulation.
#[derive(Clone, Debug, PartialEq)]
pub struct Simulation {
    /// Every step of every rank, rank by rank in list order.
    pub events: Vec<Event>,
    pub ranks: Vec<RankReport>,
    /// When the last rank finishes.
    pub makespan: f64,
}

/// The costs of a micro-batch on one stage, for [`simulate_stages`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StageCost {
    /// F: the forward.
    pub forward: f64,
    /// B: the full backward (input and weight gradients).
    pub backward: f64,
    /// W: the backward for weights alone.
    pub weight: f64,
}

/// Why a simulation could not finish.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum SimulateError {
    #[error("the schedule deadlocks: {}", waiting.iter().map(|(r, i, s)| format!("{r} waits at step {i} (`{s}`)")).collect::<Vec<_>>().join(", "))]
    Deadlock { waiting: Vec<(Rank, usize, Instr)> },
    #[error("{given} stage costs for a schedule of {stages} stages: give one per stage")]
    StageCount { given: usize, stages: usize },
    #[error("stage {stage}: {source}")]
    StageCost { stage: usize, source: CostError },
}

/// Runs `schedule` with `costs`. The schedule should have passed [`super::verify`]; a receive with
/// no send, or receives waiting in a cycle, are reported as a deadlock.
pub fn simulate(schedule: &Schedule, costs: &Costs) -> Result<Simulation, SimulateError> {
    run(schedule, costs.comm, |_, instr| costs.duration(instr))
}

/// Runs `schedule` with the costs of each stage (`stages[i]` for stage `i`, the `i`-th slot of
/// every lane) and `comm` per transfer; see the module documentation. The schedule should have
/// passed [`super::verify`].
pub fn simulate_stages(
    schedule: &Schedule,
    stages: &[StageCost],
    comm: f64,
) -> Result<Simulation, SimulateError> {
    if stages.len() != schedule.stages() {
        return Err(SimulateError::StageCount { given: stages.len(), stages: schedule.stages() });
    }
    for (i, c) in stages.iter().enumerate() {
        Costs::new(c.forward, c.backward, c.weight, None, comm)
            .map_err(|source| SimulateError::StageCost { stage: i, source })?;
    }
    let stage_of: HashMap<Slot, usize> =
        schedule.lanes.iter().flat_map(|lane| lane.iter().enumerate().map(|(i, s)| (*s, i))).collect();
    // A work on a slot no lane has is caught by the verifier; here it costs nothing.
    let cost = |rank: Rank, w: &Work| stage_of.get(&Slot { rank, chunk: w.chunk }).map(|&i| stages[i]);
    run(schedule, comm, |rank, instr| match instr {
        Instr::Forward(w) => cost(rank, w).map_or(0.0, |c| c.forward),
        Instr::BackwardInput(w) => cost(rank, w).map_or(0.0, |c| c.backward - c.weight),
        Instr::Weight(w) => cost(rank, w).map_or(0.0, |c| c.weight),
        Instr::Backward(w) => cost(rank, w).map_or(0.0, |c| c.backward),
        Instr::ForwardBackward { forward, backward } => {
            cost(rank, forward).map_or(0.0, |c| c.forward) + cost(rank, backward).map_or(0.0, |c| c.backward)
        }
        Instr::SendActivation(_)
        | Instr::RecvActivation(_)
        | Instr::SendGradient(_)
        | Instr::RecvGradient(_) => 0.0,
    })
}

/// The event loop: `duration` is how long a compute step of a rank takes.
fn run(
    schedule: &Schedule,
    comm: f64,
    duration: impl Fn(Rank, &Instr) -> f64,
) -> Result<Simulation, SimulateError> {
    let n = schedule.ranks.len();
    let mut pc = vec![0usize; n];
    let mut clock = vec![0.0f64; n];
    let mut events: Vec<Vec<Event>> = vec![Vec::new(); n];
    // (is a gradient, transfer) to its arrival time.
    let mut arrivals: HashMap<(bool, Transfer), f64> = HashMap::default();
    // The ranks stopped at a receive whose send has not run, by what they wait for: a send wakes
    // its receiver, so each step is looked at once (a sweep over every rank until none moves
    // took minutes at hundreds of ranks). Times do not depend on the order ranks run in: a
    // step's start is its rank's clock, or its data's arrival, which the sender's clock fixes.
    let mut waiting: HashMap<(bool, Transfer), Vec<usize>> = HashMap::default();
    let mut ready: Vec<usize> = (0..n).rev().collect();
    while let Some(r) = ready.pop() {
        let list = &schedule.ranks[r];
        while let Some(&instr) = list.get(pc[r]) {
            let start = clock[r];
            let end = match instr {
                Instr::SendActivation(t) | Instr::SendGradient(t) => {
                    let key = (matches!(instr, Instr::SendGradient(_)), t);
                    arrivals.insert(key, start + comm);
                    if let Some(woken) = waiting.remove(&key) {
                        ready.extend(woken);
                    }
                    start
                }
                Instr::RecvActivation(t) | Instr::RecvGradient(t) => {
                    let key = (matches!(instr, Instr::RecvGradient(_)), t);
                    match arrivals.get(&key) {
                        Some(&at) => start.max(at),
                        None => {
                            waiting.entry(key).or_default().push(r);
                            break;
                        }
                    }
                }
                _ => start + duration(Rank(r as u32), &instr),
            };
            events[r].push(Event { rank: Rank(r as u32), index: pc[r], instr, start, end });
            clock[r] = end;
            pc[r] += 1;
        }
    }
    if (0..n).any(|r| pc[r] < schedule.ranks[r].len()) {
        let waiting = (0..n)
            .filter(|&r| pc[r] < schedule.ranks[r].len())
            .map(|r| (Rank(r as u32), pc[r], schedule.ranks[r][pc[r]]))
            .collect();
        return Err(SimulateError::Deadlock { waiting });
    }
    let makespan = events.iter().flatten().map(|e| e.end).fold(0.0, f64::max);
    let ranks =
        events.iter().enumerate().map(|(r, evs)| report(schedule, Rank(r as u32), evs, makespan)).collect();
    Ok(Simulation { events: events.into_iter().flatten().collect(), ranks, makespan })
}

fn report(schedule: &Schedule, rank: Rank, events: &[Event], makespan: f64) -> RankReport {
    let compute: Vec<&Event> = events.iter().filter(|e| e.instr.is_compute()).collect();
    let busy: f64 = compute.iter().map(|e| e.end - e.start).sum();
    let (mut live, mut peak) = (0u32, 0u32);
    for e in &compute {
        match e.instr {
            Instr::Forward(_) => {
                live += 1;
                peak = peak.max(live);
            }
            Instr::ForwardBackward { .. } => {
                peak = peak.max(live + 1);
            }
            Instr::Backward(_) | Instr::Weight(_) => live -= 1,
            _ => {}
        }
    }
    RankReport {
        rank,
        busy,
        bubble: makespan - busy,
        first_start: compute.first().map_or(0.0, |e| e.start),
        last_end: compute.last().map_or(0.0, |e| e.end),
        peak_activations: peak,
        parameter_copies: schedule.parameter_copies(rank),
    }
}
