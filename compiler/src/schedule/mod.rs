//! Pipeline schedules: generators for 1F1B, ZB1P, DualPipe and DualPipeV (one file each), the
//! verifier that checks any schedule ([`verify`], kept with the data in [`kiln_ir::schedule`] so
//! that a manifest's lists are checked without the compiler), and an event-driven simulator that
//! runs one with given costs ([`simulate`]). The data types are [`kiln_ir::schedule`].
//!
//! The parallel plan of `kiln compile --pp` ([`plan`]) is built on them: [`partition`] cuts a model
//! into a schedule's stages by the cost model of [`cost`] and places them on ranks, and the plan
//! adds the verified lists, their simulation with the stages' costs and the expert-parallel
//! dispatch plan, which the artifact's manifest carries ([`kiln_ir::artifact::ParallelPlan`]).
//!
//! A train step's programs are cut per stage by [`crate::pipeline`], and `kiln train --pp` runs 1F1B
//! and ZB1P across processes over MPI (`src/pipeline.rs`). What this does not do yet: run DualPipe
//! or DualPipeV, expert parallelism or NCCL, or plan memory per rank.
//!
//! Every generator is a plain function of the number of ranks and micro-batches; each returns a
//! schedule that [`verify()`] accepts (tested for every schedule over a grid of sizes).

use kiln_ir::schedule::Schedule;

pub mod cost;
pub mod dualpipe;
pub mod dualpipev;
pub mod one_f_one_b;
pub mod partition;
pub mod plan;
mod program;
pub mod simulate;
pub mod zb1p;

pub use kiln_ir::schedule::verify;
pub use plan::{plan, PlanError, Request};
pub use simulate::{simulate, simulate_stages, Costs, Simulation, StageCost};

/// The schedules kiln generates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// 1F1B (PipeDream-flush): one forward, one full backward, in turn.
    OneFOneB,
    /// ZB1P: 1F1B with the backward split into input and weight gradients, the weight gradients
    /// deferred into the bubbles (ZB-H1 of the zero-bubble paper).
    Zb1p,
    /// DualPipe (DeepSeek-V3): two directions, each rank holding a stage of each.
    DualPipe,
    /// DualPipeV: DualPipe cut in half, a V-shaped pipeline of `2·pp` stages on `pp` ranks.
    DualPipeV,
}

impl Kind {
    /// Every schedule, in the order tables list them.
    pub const ALL: [Kind; 4] = [Kind::OneFOneB, Kind::Zb1p, Kind::DualPipe, Kind::DualPipeV];

    /// The name `kiln schedule --schedule` takes and [`Schedule::name`] holds.
    pub fn name(self) -> &'static str {
        match self {
            Kind::OneFOneB => "1f1b",
            Kind::Zb1p => "zb1p",
            Kind::DualPipe => "dualpipe",
            Kind::DualPipeV => "dualpipev",
        }
    }

    /// The schedule of a name, case-insensitively.
    pub fn parse(name: &str) -> Result<Kind, ScheduleError> {
        Kind::ALL.into_iter().find(|k| k.name().eq_ignore_ascii_case(name)).ok_or_else(|| {
            ScheduleError::UnknownSchedule {
                name: name.to_string(),
                known: Kind::ALL.iter().map(|k| k.name()).collect::<Vec<_>>().join(", "),
            }
        })
    }

    /// The fewest micro-batches the schedule takes on `pp` ranks: 1 for 1F1B and ZB1P; `2·pp` for
    /// DualPipe and DualPipeV, as DeepSeek's reference asserts (`num_chunks >= num_ranks * 2`).
    pub fn min_micro_batches(self, pp: u32) -> u32 {
        match self {
            Kind::OneFOneB | Kind::Zb1p => 1,
            Kind::DualPipe | Kind::DualPipeV => 2 * pp,
        }
    }
}

/// Why a schedule cannot be generated: the request, not the generator, is wrong.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    #[error("unknown schedule `{name}`: the schedules are {known}")]
    UnknownSchedule { name: String, known: String },
    #[error("--pp {pp}: a pipeline needs at least 1 rank")]
    NoRanks { pp: u32 },
    #[error("--pp {pp}: {schedule} needs an even number of ranks (rank i pairs with rank pp-1-i); try --pp {}", pp + 1)]
    OddRanks { schedule: &'static str, pp: u32 },
    #[error(
        "--micro-batches {micro_batches}: {schedule} on {pp} ranks needs at least {min} micro-batch{}{why}",
        if *min == 1 { "" } else { "es" }
    )]
    TooFewMicroBatches { schedule: &'static str, pp: u32, micro_batches: u32, min: u32, why: &'static str },
    #[error(
        "--micro-batches {micro_batches}: {schedule} splits the micro-batches evenly between its two \
         directions, so it needs an even number; try --micro-batches {}",
        micro_batches + 1
    )]
    OddMicroBatches { schedule: &'static str, micro_batches: u32 },
    #[error(
        "--pp {pp} --micro-batches {micro_batches}: {schedule} would place {works} (stage, micro-batch) \
         works; kiln schedules at most {MAX_WORKS} (for example 64 ranks and 16384 micro-batches; \
         that many take some 10 s and 1.5 GB to verify and simulate)"
    )]
    TooLarge { schedule: &'static str, pp: u32, micro_batches: u32, works: u64 },
}

/// The most (stage, micro-batch) works a schedule may hold: each is several steps (its forward,
/// backward and transfers), so a schedule is six million steps at most, which the verifier and
/// the simulator go through in about 10 s and 1.5 GB (1F1B on a thousand ranks with a thousand
/// micro-batches, 2^20 works, on a 2-core EPYC). Far beyond it a request ran for minutes and was
/// killed for memory (`kiln schedule --pp 100000 --micro-batches 100000`).
pub const MAX_WORKS: u64 = 1 << 20;

/// The schedule `kind` for `pp` ranks and `micro_batches` micro-batches, after checking that the
/// schedule exists for those sizes.
pub fn generate(kind: Kind, pp: u32, micro_batches: u32) -> Result<Schedule, ScheduleError> {
    if pp == 0 {
        return Err(ScheduleError::NoRanks { pp });
    }
    let schedule = kind.name();
    if kind == Kind::DualPipe && pp % 2 == 1 {
        return Err(ScheduleError::OddRanks { schedule, pp });
    }
    let min = kind.min_micro_batches(pp);
    if micro_batches < min {
        let why = match kind {
            Kind::OneFOneB | Kind::Zb1p => "",
            Kind::DualPipe | Kind::DualPipeV => {
                " (2 per rank: every rank must reach the steady overlapped phase, as in DeepSeek's \
                 reference)"
            }
        };
        return Err(ScheduleError::TooFewMicroBatches { schedule, pp, micro_batches, min, why });
    }
    if kind == Kind::DualPipe && micro_batches % 2 == 1 {
        return Err(ScheduleError::OddMicroBatches { schedule, micro_batches });
    }
    let stages = match kind {
        Kind::OneFOneB | Kind::Zb1p => u64::from(pp),
        Kind::DualPipe | Kind::DualPipeV => 2 * u64::from(pp),
    };
    let works = stages * u64::from(micro_batches);
    if works > MAX_WORKS {
        return Err(ScheduleError::TooLarge { schedule, pp, micro_batches, works });
    }
    Ok(match kind {
        Kind::OneFOneB => one_f_one_b::generate(pp, micro_batches),
        Kind::Zb1p => zb1p::generate(pp, micro_batches),
        Kind::DualPipe => dualpipe::generate(pp, micro_batches),
        Kind::DualPipeV => dualpipev::generate(pp, micro_batches),
    })
}
#[cfg(test)]
mod tests;
