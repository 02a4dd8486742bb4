//! Building one rank's list from the primitives DeepSeek's DualPipe reference is written in
//! (`dualpipe/dualpipe.py`: `_forward_chunk`, `_backward_chunk`, `_forward_backward_chunk`,
//! `_weight_chunk`, `_recv_forward`, `_send_forward`, `_recv_backward`, `_send_backward`,
//! `_commit_and_wait_comm`), so that the generators can follow the reference's step sequence line
//! by line. 1F1B and ZB1P are written with the same primitives.
//!
//! The communication model is the reference's: a receive or send is *posted* and only issued at
//! the next commit, which waits for every posted receive before the next computation. A commit
//! becomes the posted sends (which never wait: their data is buffered) followed by the posted
//! receives (each waits until its data has arrived), in posting order.
//!
//! Each chunk of the rank sits on one lane; which micro-batch a primitive works on is the next one
//! of that lane in order (a counter per chunk and per kind of step, as the reference keeps
//! `current_f_chunk_id` and its siblings). A neighbouring stage on the same rank (DualPipeV's turn
//! at the last rank) is handed over locally, without a transfer.
//!
//! The weight gradients of zero-bubble backward steps queue up and [`RankProgram::weight`] pops
//! them first in, first out, as the reference's `WeightGradStore` does.

use std::collections::VecDeque;

use kiln_ir::schedule::{Chunk, Instr, MicroBatch, Rank, Slot, Transfer, Work};

/// Where one chunk of the rank sits on its lane.
struct Place {
    /// The micro-batches of the lane, in the order they flow.
    mbs: Vec<MicroBatch>,
    prev: Option<Slot>,
    next: Option<Slot>,
}

/// Counters of the micro-batches a chunk has seen, one per kind of step.
#[derive(Default, Clone, Copy)]
struct Counters {
    forward: usize,
    backward: usize,
    send_forward: usize,
    send_backward: usize,
    recv_forward: usize,
    recv_backward: usize,
}

/// One rank's list under construction.
pub(crate) struct RankProgram {
    rank: Rank,
    places: Vec<Place>,
    counters: Vec<Counters>,
    posted_sends: Vec<Instr>,
    posted_recvs: Vec<Instr>,
    weights: VecDeque<Work>,
    out: Vec<Instr>,
}

impl RankProgram {
    /// The builder for `rank` of a pipeline with `lanes`, micro-batch `m` on lane `lane_of[m]`.
    /// The rank's chunks are numbered as on the lanes.
    pub(crate) fn new(rank: Rank, lanes: &[Vec<Slot>], lane_of: &[u32]) -> RankProgram {
        let mut places: Vec<(Chunk, Place)> = Vec::new();
        for (l, lane) in lanes.iter().enumerate() {
            let mbs: Vec<MicroBatch> = (0..lane_of.len() as u32)
                .filter(|&m| lane_of[m as usize] as usize == l)
                .map(MicroBatch)
                .collect();
            for (i, slot) in lane.iter().enumerate().filter(|(_, s)| s.rank == rank) {
                let prev = i.checked_sub(1).map(|p| lane[p]);
                let next = lane.get(i + 1).copied();
                places.push((slot.chunk, Place { mbs: mbs.clone(), prev, next }));
            }
        }
        places.sort_by_key(|(c, _)| *c);
        let places: Vec<Place> = places.into_iter().map(|(_, p)| p).collect();
        RankProgram {
            rank,
            counters: vec![Counters::default(); places.len()],
            places,
            posted_sends: Vec::new(),
            posted_recvs: Vec::new(),
            weights: VecDeque::new(),
            out: Vec::new(),
        }
    }

    fn slot(&self, chunk: Chunk) -> Slot {
        Slot { rank: self.rank, chunk }
    }

    fn mb(&self, chunk: Chunk, k: usize) -> MicroBatch {
        self.places[chunk.0 as usize].mbs[k]
    }

    /// The neighbour on another rank, if the stage has one there.
    fn remote(&self, neighbour: Option<Slot>) -> Option<Slot> {
        neighbour.filter(|s| s.rank != self.rank)
    }

    /// Posts the receive of the next forward input of `chunk` (`_recv_forward`).
    pub(crate) fn recv_forward(&mut self, chunk: Chunk) {
        let c = chunk.0 as usize;
        if let Some(from) = self.remote(self.places[c].prev) {
            let mb = self.mb(chunk, self.counters[c].recv_forward);
            self.counters[c].recv_forward += 1;
            self.posted_recvs.push(Instr::RecvActivation(Transfer { mb, from, to: self.slot(chunk) }));
        }
    }

    /// Posts the send of the next forward output of `chunk` (`_send_forward`).
    pub(crate) fn send_forward(&mut self, chunk: Chunk) {
        let c = chunk.0 as usize;
        if let Some(to) = self.remote(self.places[c].next) {
            let mb = self.mb(chunk, self.counters[c].send_forward);
            self.counters[c].send_forward += 1;
            self.posted_sends.push(Instr::SendActivation(Transfer { mb, from: self.slot(chunk), to }));
        }
    }

    /// Posts the receive of the next output gradient of `chunk` (`_recv_backward`).
    pub(crate) fn recv_backward(&mut self, chunk: Chunk) {
        let c = chunk.0 as usize;
        if let Some(from) = self.remote(self.places[c].next) {
            let mb = self.mb(chunk, self.counters[c].recv_backward);
            self.counters[c].recv_backward += 1;
            self.posted_recvs.push(Instr::RecvGradient(Transfer { mb, from, to: self.slot(chunk) }));
        }
    }

    /// Posts the send of the next input gradient of `chunk` (`_send_backward`).
    pub(crate) fn send_backward(&mut self, chunk: Chunk) {
        let c = chunk.0 as usize;
        if let Some(to) = self.remote(self.places[c].prev) {
            let mb = self.mb(chunk, self.counters[c].send_backward);
            self.counters[c].send_backward += 1;
            self.posted_sends.push(Instr::SendGradient(Transfer { mb, from: self.slot(chunk), to }));
        }
    }

    /// Issues what was posted (`_commit_and_wait_comm`): sends first, which do not wait, then the
    /// receives, which do.
    pub(crate) fn commit(&mut self) {
        self.out.append(&mut self.posted_sends);
        self.out.append(&mut self.posted_recvs);
    }

    fn next_forward(&mut self, chunk: Chunk) -> Work {
        let c = chunk.0 as usize;
        let mb = self.mb(chunk, self.counters[c].forward);
        self.counters[c].forward += 1;
        Work { mb, chunk }
    }

    fn next_backward(&mut self, chunk: Chunk) -> Work {
        let c = chunk.0 as usize;
        let mb = self.mb(chunk, self.counters[c].backward);
        self.counters[c].backward += 1;
        Work { mb, chunk }
    }

    /// A forward step (`_forward_chunk`): receive its input if `recv`, commit, compute, post the
    /// send of its output if `send`.
    pub(crate) fn forward(&mut self, chunk: Chunk, recv: bool, send: bool) {
        if recv {
            self.recv_forward(chunk);
        }
        self.commit();
        let w = self.next_forward(chunk);
        self.out.push(Instr::Forward(w));
        if send {
            self.send_forward(chunk);
        }
    }

    /// A backward step (`_backward_chunk`): with `zero_bubble` only the input gradient, the weight
    /// gradient queued for [`RankProgram::weight`]; otherwise the full backward.
    pub(crate) fn backward(&mut self, chunk: Chunk, zero_bubble: bool, recv: bool, send: bool) {
        if recv {
            self.recv_backward(chunk);
        }
        self.commit();
        let w = self.next_backward(chunk);
        if zero_bubble {
            self.out.push(Instr::BackwardInput(w));
            self.weights.push_back(w);
        } else {
            self.out.push(Instr::Backward(w));
        }
        if send {
            self.send_backward(chunk);
        }
    }

    /// An overlapped forward of `f` and full backward of `b` (`_forward_backward_chunk`).
    pub(crate) fn forward_backward(&mut self, f: Chunk, b: Chunk, recv_f: bool) {
        if recv_f {
            self.recv_forward(f);
        }
        self.recv_backward(b);
        self.commit();
        let forward = self.next_forward(f);
        let backward = self.next_backward(b);
        self.out.push(Instr::ForwardBackward { forward, backward });
        self.send_forward(f);
        self.send_backward(b);
    }

    /// The oldest deferred weight gradient (`_weight_chunk`). Panics when none is queued: a
    /// generator that asks for one has a bug.
    pub(crate) fn weight(&mut self) {
        self.commit();
        let w = self.weights.pop_front().expect("a deferred weight gradient to run");
        self.out.push(Instr::Weight(w));
    }

    /// The finished list: whatever is still posted is issued. Panics if a weight gradient is left
    /// (the reference asserts the same).
    pub(crate) fn finish(mut self) -> Vec<Instr> {
        self.commit();
        assert!(self.weights.is_empty(), "{} deferred weight gradients never ran", self.weights.len());
        self.out
    }
}
