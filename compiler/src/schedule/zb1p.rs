//! ZB1P, the ZB-H1 schedule of the zero-bubble paper (Qi et al., "Zero Bubble Pipeline
//! Parallelism", ICLR 2024): 1F1B with each backward split into the input gradient (B) and the
//! weight gradient (W), the weight gradients deferred so that the input gradients, which the
//! previous stage waits for, run as early as possible.
//!
//! Rank `i` (stage `i`) runs `pp-1-i` forwards to fill the pipeline, then rounds of a forward and a
//! backward for inputs, then the remaining backwards for inputs; its weight gradients run `i`
//! behind its backwards for inputs (after the `j`-th backward comes the weight gradient of
//! micro-batch `j-i`), and the last `i` run at the end. So the last rank, whose input gradients the
//! whole pipeline waits for, defers the most, and the first rank, which waits for everyone, none.
//!
//! Memory: activations stay live until the weight gradient, so rank `i` holds at most
//! `(pp-i) + i = pp` micro-batches: every rank peaks at what 1F1B's first rank does, the bound
//! ZB-H1 keeps.
//!
//! Guarantees: a schedule [`super::verify`] accepts, for any `pp >= 1` and `micro_batches >= 1`.
//! With no communication cost and `micro_batches >= pp`, every rank is idle `(pp-1)(F+B-2W)` of
//! the makespan (B the full backward; tested for pp = 4, 8, 16).

use kiln_ir::schedule::{Chunk, Rank, Schedule, Slot};

use super::program::RankProgram;

/// The ZB1P schedule of `pp` ranks and `micro_batches` micro-batches.
pub fn generate(pp: u32, micro_batches: u32) -> Schedule {
    let lanes = vec![(0..pp).map(|r| Slot { rank: Rank(r), chunk: Chunk(0) }).collect::<Vec<_>>()];
    let lane_of = vec![0; micro_batches as usize];
    let c = Chunk(0);
    let ranks = (0..pp)
        .map(|r| {
            let mut p = RankProgram::new(Rank(r), &lanes, &lane_of);
            let warmup = (pp - 1 - r).min(micro_batches);
            // Backwards for inputs run so far, and weight gradients.
            let (mut b, mut w) = (0, 0);
            let mut backward = |p: &mut RankProgram| {
                p.backward(c, true, true, true);
                b += 1;
                if b - w > r {
                    p.weight();
                    w += 1;
                }
            };
            for _ in 0..warmup {
                p.forward(c, true, true);
            }
            for _ in warmup..micro_batches {
                p.forward(c, true, true);
                backward(&mut p);
            }
            for _ in 0..warmup {
                backward(&mut p);
            }
            for _ in w..b {
                p.weight();
            }
            p.finish()
        })
        .collect();
    Schedule { name: "zb1p".into(), pp, micro_batches, lanes, lane_of, ranks }
}
