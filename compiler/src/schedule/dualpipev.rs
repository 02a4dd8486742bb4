//! DualPipeV: DualPipe "cut in half" (the V-shape of Sea AI Lab's zero-bubble work, adopted by
//! DeepSeek), following the step sequence of `DualPipeV.step` in `dualpipe/dualpipev.py` of
//! DeepSeek's DualPipe repository (reference notes: `deepseek_v3_reference.md` §6.3).
//!
//! Placement: the model is cut into `2·pp` stages; rank `r` holds stage `r` (chunk 0, on the way
//! down) and stage `2·pp-1-r` (chunk 1, on the way back up), so a micro-batch goes down the ranks
//! and back up them (one lane, a V) and the last rank hands its chunk 0's output to its chunk 1
//! locally. Every micro-batch enters and leaves at rank 0. Each rank holds two stages of a
//! `2·pp`-stage cut, one copy of the parameters in all.
//!
//! The steps are DualPipe's ([`super::dualpipe`]) with the rank `r` in place of `h` and `pp` in place
//! of `pp/2`, phase 0 always chunk 0 and phase 1 chunk 1:
//!
//! 1. `nF0`: `2(pp-r-1)` chunk-0 forwards.
//! 2. `nF0F1`: `r+1` rounds of a chunk-0 and a chunk-1 forward (the chunk-0 output is sent after the
//!    chunk-1 forward; the last rank holds back its last chunk-1 output).
//! 3. `nB1W1F1`: `pp-r-1` rounds of a zero-bubble chunk-1 backward, a weight gradient and a
//!    chunk-1 forward.
//! 4. `nF0B1F1B0`: `M-2pp+r+1` rounds of an overlapped (F0, B1) and an overlapped (F1, B0) pair; in
//!    the first round the last rank runs F0 and B1 apart.
//! 5. `nB1F1B0`: `pp-r-1` rounds of a chunk-1 backward and an overlapped (F1, B0).
//! 6. `nB1B0`: `r+1` rounds of a chunk-1 and a chunk-0 backward, the second half zero bubble.
//! 7. `nWB0`: `pp-r-1` rounds of a weight gradient and a zero-bubble chunk-0 backward.
//! 8. `nW`: `r+1` weight gradients.
//!
//! Guarantees: a schedule [`super::verify`] accepts, for `pp >= 1` and `micro_batches >= 2·pp`
//! (the reference's assertion; [`super::generate`] checks it).

use kiln_ir::schedule::{Chunk, Instr, Rank, Schedule, Slot};

use super::program::RankProgram;

/// The DualPipeV schedule of `pp` ranks and `micro_batches` micro-batches (at least `2·pp`).
pub fn generate(pp: u32, micro_batches: u32) -> Schedule {
    let down = (0..pp).map(|r| Slot { rank: Rank(r), chunk: Chunk(0) });
    let up = (0..pp).rev().map(|r| Slot { rank: Rank(r), chunk: Chunk(1) });
    let lanes = vec![down.chain(up).collect::<Vec<_>>()];
    let lane_of = vec![0; micro_batches as usize];
    let ranks = (0..pp)
        .map(|r| rank_list(pp, micro_batches, RankProgram::new(Rank(r), &lanes, &lane_of), r))
        .collect();
    Schedule { name: "dualpipev".into(), pp, micro_batches, lanes, lane_of, ranks }
}

/// Rank `r`'s list: `DualPipeV.step` with `num_ranks = pp` and `num_chunks = m`.
fn rank_list(pp: u32, m: u32, mut p: RankProgram, r: u32) -> Vec<Instr> {
    let last = r + 1 == pp;
    let (c0, c1) = (Chunk(0), Chunk(1));

    // Step 1: nF0.
    for _ in 0..2 * (pp - r - 1) {
        p.forward(c0, true, true);
    }
    // Step 2: nF0F1.
    let step2 = r + 1;
    p.recv_forward(c0);
    for i in 0..step2 {
        p.forward(c0, false, false);
        p.recv_forward(c0);
        p.forward(c1, true, !last || i + 1 < step2);
        p.send_forward(c0);
    }
    super::dualpipe::steps_3_to_8(&mut p, (c0, c1), pp - r - 1, m + r + 1 - 2 * pp, last, r);
    p.finish()
}
