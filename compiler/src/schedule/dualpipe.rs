//! DualPipe (DeepSeek-V3 §3.2.1), following the step sequence of DeepSeek's reference
//! implementation, `DualPipe.step` in `dualpipe/dualpipe.py` of github.com/deepseek-ai/DualPipe
//! (reference notes: `deepseek_v3_reference.md` §6.3).
//!
//! Placement: rank `i` holds stage `i` of the forward direction (chunk 0) and stage `pp-1-i` of the
//! reverse direction (chunk 1), two copies of the model's slices in all. Micro-batches
//! `0..M/2` enter at rank 0 and flow down (lane 0); `M/2..M` enter at the last rank and flow up
//! (lane 1). The reference's `phase` is a direction relative to the rank: for the first half of the
//! ranks phase 0 is the forward direction, for the second half the reverse one
//! (`phase ^= is_in_second_half`); here phase `p` is chunk `p ^ second_half`.
//!
//! Each rank runs the reference's eight steps, with `h = min(i, pp-1-i)` and `n = pp/2`:
//!
//! 1. `nF0`: `2(n-h-1)` forwards of phase 0 (warm-up).
//! 2. `nF0F1`: `h+1` rounds of a phase-0 then a phase-1 forward; the middle ranks (`n-1`, `n`) send
//!    the phase-0 output at once and hold back the last phase-1 output, the others send the phase-0
//!    output after the phase-1 forward.
//! 3. `nB1W1F1`: `n-h-1` rounds of a zero-bubble phase-1 backward, a deferred weight gradient and a
//!    phase-1 forward.
//! 4. `nF0B1F1B0` (the main step): `M/2-pp+h+1` rounds of an overlapped (F0, B1) pair and an
//!    overlapped (F1, B0) pair; in the first round the middle ranks run F0 and B1 apart, not
//!    overlapped, to shrink the bubble (the reference's comment).
//! 5. `nB1F1B0`: `n-h-1` rounds of a phase-1 backward and an overlapped (F1, B0) pair.
//! 6. `nB1B0`: `h+1` rounds of a phase-1 and a phase-0 backward; the second half of them are zero
//!    bubble (the switch is one backward earlier when `h` is odd).
//! 7. `nWB0`: `n-h-1` rounds of a deferred weight gradient and a zero-bubble phase-0 backward.
//! 8. `nW`: `h+1` deferred weight gradients, which empties the queue.
//!
//! Sends and receives are posted and issued at the next commit exactly where the reference posts
//! and commits them ([`super::program`]). The overlapped pairs are [`kiln_ir::schedule::Instr::ForwardBackward`]:
//! the reference runs them through a model's `overlapped_forward_backward` when the model has one.
//!
//! Guarantees: a schedule [`super::verify`] accepts, for even `pp >= 2` and even
//! `micro_batches >= 2·pp` (what the reference asserts; [`super::generate`] checks it).

use kiln_ir::schedule::{Chunk, Rank, Schedule, Slot};

use super::program::RankProgram;

fn slot(rank: u32, chunk: u32) -> Slot {
    Slot { rank: Rank(rank), chunk: Chunk(chunk) }
}

/// The DualPipe schedule of `pp` ranks (even) and `micro_batches` micro-batches (even, at least
/// `2·pp`).
pub fn generate(pp: u32, micro_batches: u32) -> Schedule {
    let down: Vec<Slot> = (0..pp).map(|r| slot(r, 0)).collect();
    let up: Vec<Slot> = (0..pp).rev().map(|r| slot(r, 1)).collect();
    let lanes = vec![down, up];
    let half = micro_batches / 2;
    let lane_of: Vec<u32> = (0..micro_batches).map(|m| u32::from(m >= half)).collect();
    let ranks =
        (0..pp).map(|r| rank_list(pp, half, RankProgram::new(Rank(r), &lanes, &lane_of), r)).collect();
    Schedule { name: "dualpipe".into(), pp, micro_batches, lanes, lane_of, ranks }
}

/// Rank `r`'s list: `DualPipe.step` with `num_ranks = pp` and `num_chunks = 2·half`.
fn rank_list(pp: u32, half: u32, mut p: RankProgram, r: u32) -> Vec<kiln_ir::schedule::Instr> {
    let n = pp / 2;
    let h = r.min(pp - 1 - r);
    let second_half = u32::from(r >= n);
    let middle = r + 1 == n || r == n;
    let (c0, c1) = (Chunk(second_half), Chunk(1 - second_half));

    // Step 1: nF0.
    for _ in 0..2 * (n - h - 1) {
        p.forward(c0, true, true);
    }
    // Step 2: nF0F1. The receive posted last in a round is the next round's phase-0 input.
    let step2 = h + 1;
    p.recv_forward(c0);
    for i in 0..step2 {
        p.forward(c0, false, middle);
        p.recv_forward(c0);
        p.forward(c1, true, !middle || i + 1 < step2);
        if !middle {
            p.send_forward(c0);
        }
    }
    steps_3_to_8(&mut p, (c0, c1), n - h - 1, half + h + 1 - pp, middle, h);
    p.finish()
}

/// Steps 3 to 8 of a rank's list, which DualPipe and DualPipeV share (`dualpipe.py` and
/// `dualpipev.py` run the same loops): `rest` is the count of steps 3, 5 and 7 (`n-h-1`; DualPipeV's
/// `pp-r-1`), `main` the rounds of step 4, `apart` whether the first of them runs F0 and B1 apart
/// (the middle ranks; DualPipeV's last), and `h + 1` the rounds of steps 6 and 8 (DualPipeV's `r`).
pub(super) fn steps_3_to_8(
    p: &mut RankProgram,
    (c0, c1): (Chunk, Chunk),
    rest: u32,
    main: u32,
    apart: bool,
    h: u32,
) {
    // Step 3: nB1W1F1 (zero bubble).
    for _ in 0..rest {
        p.backward(c1, true, true, true);
        p.recv_forward(c1);
        p.weight();
        p.forward(c1, false, true);
    }
    // Step 4: nF0B1F1B0, the main step. The first phase-0 input was received in step 2.
    for i in 0..main {
        if i == 0 && apart {
            p.forward(c0, false, false);
            p.send_forward(c1);
            p.backward(c1, false, true, false);
            p.send_forward(c0);
            p.send_backward(c1);
        } else {
            p.forward_backward(c0, c1, i > 0);
        }
        p.forward_backward(c1, c0, true);
    }
    // Step 5: nB1F1B0.
    for _ in 0..rest {
        p.backward(c1, false, true, true);
        p.forward_backward(c1, c0, true);
    }
    // Step 6: nB1B0; the second half of these backwards use zero bubble.
    let step6 = h + 1;
    let mut zero_bubble = false;
    for i in 0..step6 {
        if i == step6 / 2 && h % 2 == 1 {
            zero_bubble = true;
        }
        p.backward(c1, zero_bubble, true, true);
        if i == step6 / 2 && h % 2 == 0 {
            zero_bubble = true;
        }
        p.backward(c0, zero_bubble, true, true);
    }
    // Step 7: nWB0 (zero bubble).
    for _ in 0..rest {
        p.weight();
        p.backward(c0, true, true, true);
    }
    // Step 8: nW, which empties the queue of weight gradients.
    for _ in 0..h + 1 {
        p.weight();
    }
}
