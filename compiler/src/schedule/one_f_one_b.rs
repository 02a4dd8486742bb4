//! 1F1B (PipeDream-flush, as in Megatron-LM): stage `i` on rank `i`; rank `i` runs `pp-1-i`
//! forwards to fill the pipeline, then alternates one forward and one full backward, then drains
//! the remaining backwards.
//!
//! Guarantees: a schedule [`super::verify`] accepts, for any `pp >= 1` and `micro_batches >= 1`.
//! Peak activations on rank `i`: `min(pp-i, micro_batches)` micro-batches. With no communication
//! cost and `micro_batches >= pp`, every rank is idle `(pp-1)(F+B)` of the makespan
//! `(micro_batches+pp-1)(F+B)`.

use kiln_ir::schedule::{Chunk, Rank, Schedule, Slot};

use super::program::RankProgram;

/// The 1F1B schedule of `pp` ranks and `micro_batches` micro-batches.
pub fn generate(pp: u32, micro_batches: u32) -> Schedule {
    let lanes = vec![(0..pp).map(|r| Slot { rank: Rank(r), chunk: Chunk(0) }).collect::<Vec<_>>()];
    let lane_of = vec![0; micro_batches as usize];
    let c = Chunk(0);
    let ranks = (0..pp)
        .map(|r| {
            let mut p = RankProgram::new(Rank(r), &lanes, &lane_of);
            let warmup = (pp - 1 - r).min(micro_batches);
            for _ in 0..warmup {
                p.forward(c, true, true);
            }
            for _ in warmup..micro_batches {
                p.forward(c, true, true);
                p.backward(c, false, true, true);
            }
            for _ in 0..warmup {
                p.backward(c, false, true, true);
            }
            p.finish()
        })
        .collect();
    Schedule { name: "1f1b".into(), pp, micro_batches, lanes, lane_of, ranks }
}
