//! Collectives between processes: the `all_reduce`, `all_gather` and `all_to_all` steps of a
//! program (data-parallel training's gradient, loss and expert-load sums, ZeRO-1's gathers, expert
//! parallelism's dispatch and combine) run through a [`Communicator`] the caller gives the
//! executor ([`crate::exec::Executor::set_communicator`]). The runtime holds no transport of its
//! own: `kiln` implements the trait over MPI (`src/dist.rs`, OpenMPI through the `mpi` crate), and
//! a process given none is a group of one, whose sum is its own value.
//!
//! A backend whose memory the host cannot read directly may move a group's sums and gathers on
//! its own memory instead ([`DeviceCollectives`]: NCCL on CUDA, `gpu::nccl`). The executor then
//! hands it the device addresses of each message's parts ([`DeviceMessage`]); the data never
//! crosses to the host. [`DeviceMessage::moves`] is the plan such a transport carries out, the
//! same message, laid out the same way, as the host path's, and testable without a device.
//!
//! Every collective is bounded in time: a peer that dies or never answers ends the call with
//! [`RuntimeError::Collective`] naming the group, the ranks and the wait, never a hang.

use std::time::Duration;

use crate::RuntimeError;

/// The processes a program's collectives run over, by group name (`"dp"`).
pub trait Communicator {
    /// This process's rank in `group`, and the group's size; `None` for a group it does not know.
    fn rank_in(&self, group: &str) -> Option<(usize, usize)>;
    /// The names of the groups this process is in. Every process of a group lists it, so a
    /// transport that must form each group with all its members (NCCL) joins these, in name
    /// order. The default lists none.
    fn groups(&self) -> Vec<String> {
        Vec::new()
    }
    /// Replaces `data` by its element-wise sum over every process of `group`, each process giving
    /// the same length. Bit-identical on every process (the sum is reduced once and broadcast, as
    /// MPI's and NCCL's all-reduce guarantee for one communicator).
    fn all_reduce_sum(&self, group: &str, data: &mut [f32]) -> Result<(), RuntimeError>;
    /// Starts [`Communicator::all_reduce_sum`] of `data` and returns at once; the sum is taken
    /// from the [`InFlight`] when it is needed, while the caller computes. The default sums at once
    /// (a transport with no non-blocking call).
    fn start_all_reduce_sum(
        &self,
        group: &str,
        mut data: Vec<f32>,
    ) -> Result<Box<dyn InFlight>, RuntimeError> {
        self.all_reduce_sum(group, &mut data)?;
        Ok(Box::new(Done(Some(data))))
    }
    /// Starts gathering `data` (the same length on every process) from every process of `group`,
    /// laid end to end in rank order. The default refuses: a transport that cannot gather.
    fn start_all_gather(&self, group: &str, _data: Vec<f32>) -> Result<Box<dyn InFlight>, RuntimeError> {
        Err(RuntimeError::Collective {
            group: group.to_string(),
            what: "this communicator cannot gather".into(),
        })
    }
    /// Starts an all-to-all over `group`: `data` is one block per process of the group, block `q`
    /// for process `q`, each of `keep.len() / size` rows of `width` values, and only the rows whose
    /// flag in `keep` is nonzero travel (`MPI_Alltoallv`: expert parallelism's dispatch sends a
    /// token only to the ranks of its experts). The result has the same layout: block `q` is what
    /// process `q` sent this one, its rows not sent as zeros. The default refuses: a transport
    /// that cannot exchange.
    fn start_all_to_all(
        &self,
        group: &str,
        _data: Vec<f32>,
        _keep: Vec<f32>,
        _width: usize,
    ) -> Result<Box<dyn InFlight>, RuntimeError> {
        Err(RuntimeError::Collective {
            group: group.to_string(),
            what: "this communicator cannot run an all-to-all".into(),
        })
    }
    /// Replaces `data` on every process of `group` by the first process's (`MPI_Bcast` from the
    /// group's rank 0): how a device transport's processes agree on the identity of their
    /// communicator (NCCL's unique id). The default refuses: a transport that cannot broadcast.
    fn broadcast(&self, group: &str, _data: &mut [u8]) -> Result<(), RuntimeError> {
        Err(RuntimeError::Collective {
            group: group.to_string(),
            what: "this communicator cannot broadcast".into(),
        })
    }
    /// How long a collective waits for its peers before it fails.
    fn timeout(&self) -> Duration;
}

/// What a [`DeviceMessage`] does with its parts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceKind {
    /// Each part's result is its sum over the group.
    Sum,
    /// Each part's result is its value from every process of the group (`size` of them), laid
    /// end to end in rank order.
    Gather { size: usize },
}

/// One step's share of a [`DeviceMessage`]: `bytes` of f32 values at device address `src`, whose
/// result goes to `dst` (`bytes`, or `size · bytes` for a gather).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DevicePart {
    pub src: u64,
    pub dst: u64,
    pub bytes: usize,
}

/// One message of a bucket of collective steps, on device memory: the steps of one group and kind
/// that start after the same launch, as the host path sends them (one message, the parts laid end
/// to end in step order).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceMessage {
    pub group: String,
    pub kind: DeviceKind,
    pub parts: Vec<DevicePart>,
}

/// One move of a [`DeviceMessage`]'s plan, over a staging buffer of [`DeviceMessage::staging`]
/// bytes. Staging is what lets the message travel while later launches compute: the memory plan
/// may reuse a source's bytes as soon as the collective step has read them, so the sources are
/// copied in first, in stream order after the launches that made them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Move {
    /// Copy `bytes` from device address `src` to staging byte `at` (on the stream of the
    /// launches, so after the one that made the source).
    In { src: u64, at: usize, bytes: usize },
    /// Sum the `values` f32 values at staging byte 0 over the group, in place.
    Sum { values: usize },
    /// Gather the `values` f32 values at staging byte 0 from every process of the group (`size`)
    /// into staging byte `to`, in rank order.
    Gather { values: usize, size: usize, to: usize },
    /// Copy `bytes` from staging byte `at` to device address `dst`.
    Out { at: usize, dst: u64, bytes: usize },
}

impl DeviceMessage {
    /// The bytes of this process's message: the parts end to end.
    pub fn bytes(&self) -> usize {
        self.parts.iter().map(|p| p.bytes).sum()
    }

    /// The staging bytes [`DeviceMessage::moves`] uses: the message, and for a gather the
    /// message of every process after it.
    pub fn staging(&self) -> usize {
        match self.kind {
            DeviceKind::Sum => self.bytes(),
            DeviceKind::Gather { size } => self.bytes() * (1 + size),
        }
    }

    /// The plan: copy every part in, sum or gather once, copy every result out. A gather's
    /// result for part `p` is part `p` of each process's message in rank order, as the host path
    /// writes it.
    pub fn moves(&self) -> Vec<Move> {
        let total = self.bytes();
        let mut out = Vec::with_capacity(2 * self.parts.len() + 1);
        let mut at = 0;
        for p in &self.parts {
            out.push(Move::In { src: p.src, at, bytes: p.bytes });
            at += p.bytes;
        }
        match self.kind {
            DeviceKind::Sum => {
                out.push(Move::Sum { values: total / 4 });
                let mut at = 0;
                for p in &self.parts {
                    out.push(Move::Out { at, dst: p.dst, bytes: p.bytes });
                    at += p.bytes;
                }
            }
            DeviceKind::Gather { size } => {
                out.push(Move::Gather { values: total / 4, size, to: total });
                let mut start = 0;
                for p in &self.parts {
                    for r in 0..size {
                        let at = total + r * total + start;
                        out.push(Move::Out { at, dst: p.dst + (r * p.bytes) as u64, bytes: p.bytes });
                    }
                    start += p.bytes;
                }
            }
        }
        out
    }
}

/// A transport that sums and gathers on device memory (NCCL on CUDA), which the executor uses
/// for the groups it has instead of reading the values back to the host
/// ([`crate::exec::Executor::set_device_collectives`]). The host [`Communicator`] stays in charge
/// of the ranks, the all-to-alls and the pipeline's messages.
pub trait DeviceCollectives {
    /// Whether this transport carries `group`'s sums and gathers.
    fn has_group(&self, group: &str) -> bool;
    /// Starts `message` after every launch issued so far and returns at once; its results are
    /// in place once the returned flight has finished ([`InFlight::wait`] gives no values).
    fn start(&self, message: &DeviceMessage) -> Result<Box<dyn InFlight>, RuntimeError>;
    /// The transport, in words (`NCCL 2.21.5`), for the run's report.
    fn describe(&self) -> String;
}

/// A collective under way ([`Communicator::start_all_reduce_sum`]).
pub trait InFlight {
    /// Whether it has finished, letting the transport progress (a non-blocking test).
    fn test(&mut self) -> Result<bool, RuntimeError>;
    /// Waits until it has finished (within the communicator's timeout) and gives the result.
    fn wait(self: Box<Self>) -> Result<Vec<f32>, RuntimeError>;
}

/// A collective that finished when it started.
struct Done(Option<Vec<f32>>);

impl InFlight for Done {
    fn test(&mut self) -> Result<bool, RuntimeError> {
        Ok(true)
    }

    fn wait(self: Box<Self>) -> Result<Vec<f32>, RuntimeError> {
        Ok(self.0.unwrap_or_default())
    }
}

/// What a run's collectives cost, summed over its messages: how long each was in flight (from its
/// start to the first test that found it done, or the end of its wait) and how long the run stood
/// waiting for one. `1 - waited / in_flight` is the share of the communication hidden under the
/// computation.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CommStats {
    pub messages: u64,
    pub bytes: u64,
    pub in_flight_ns: u64,
    pub waited_ns: u64,
    /// Of the all-to-alls' rows for other processes, those sent (flagged) and all of them: a
    /// dispatch sends a token only to the ranks of its experts, so `rows_sent / rows_offered` is
    /// the share of the every-token-to-every-rank exchange that travelled.
    pub rows_sent: u64,
    pub rows_offered: u64,
    /// Of the messages, the all-to-alls with other processes: how many, their time in flight and
    /// waited for (included in the totals above), and the time their starts took (each start
    /// exchanges the rows' flags before it can size the rows' exchange, and waits for that).
    pub exchanges: u64,
    pub exchange_in_flight_ns: u64,
    pub exchange_waited_ns: u64,
    pub exchange_start_ns: u64,
}

impl CommStats {
    pub fn add(&mut self, o: &CommStats) {
        self.messages += o.messages;
        self.bytes += o.bytes;
        self.in_flight_ns += o.in_flight_ns;
        self.waited_ns += o.waited_ns;
        self.rows_sent += o.rows_sent;
        self.rows_offered += o.rows_offered;
        self.exchanges += o.exchanges;
        self.exchange_in_flight_ns += o.exchange_in_flight_ns;
        self.exchange_waited_ns += o.exchange_waited_ns;
        self.exchange_start_ns += o.exchange_start_ns;
    }

    /// [`CommStats::hidden`] of the all-to-alls alone.
    pub fn exchange_hidden(&self) -> f64 {
        if self.exchange_in_flight_ns == 0 {
            1.0
        } else {
            1.0 - self.exchange_waited_ns as f64 / self.exchange_in_flight_ns as f64
        }
    }

    /// The share of the in-flight time the run did not wait for (1 when nothing was sent).
    pub fn hidden(&self) -> f64 {
        if self.in_flight_ns == 0 {
            1.0
        } else {
            1.0 - self.waited_ns as f64 / self.in_flight_ns as f64
        }
    }
}

/// The size of `group` under `comm` (1 without one: a process alone).
pub fn group_size(comm: Option<&dyn Communicator>, group: &str) -> Result<usize, RuntimeError> {
    match comm {
        None => Ok(1),
        Some(c) => c.rank_in(group).map(|(_, n)| n).ok_or_else(|| RuntimeError::Collective {
            group: group.to_string(),
            what: "this process is in no such communication group (kiln knows `dp`)".into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Carries out `moves` for every process at once, each process's device memory a byte array
    /// (addresses are offsets into it): the sum adds the processes' staged values in rank order,
    /// as one reduction does for all.
    fn carry_out(moves: &[Move], staging: usize, memories: &mut [Vec<u8>]) {
        let mut stages = vec![vec![0u8; staging]; memories.len()];
        let f32s =
            |b: &[u8]| b.chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect::<Vec<_>>();
        for m in moves {
            match *m {
                Move::In { src, at, bytes } => {
                    for (mem, st) in memories.iter().zip(&mut stages) {
                        st[at..at + bytes].copy_from_slice(&mem[src as usize..src as usize + bytes]);
                    }
                }
                Move::Sum { values } => {
                    let mut sum = vec![0f32; values];
                    for st in &stages {
                        for (s, v) in sum.iter_mut().zip(f32s(&st[..4 * values])) {
                            *s += v;
                        }
                    }
                    let bytes: Vec<u8> = sum.iter().flat_map(|v| v.to_le_bytes()).collect();
                    for st in &mut stages {
                        st[..4 * values].copy_from_slice(&bytes);
                    }
                }
                Move::Gather { values, size, to } => {
                    assert_eq!(size, memories.len());
                    let all: Vec<u8> = stages.iter().flat_map(|st| st[..4 * values].to_vec()).collect();
                    for st in &mut stages {
                        st[to..to + all.len()].copy_from_slice(&all);
                    }
                }
                Move::Out { at, dst, bytes } => {
                    for (mem, st) in memories.iter_mut().zip(&stages) {
                        mem[dst as usize..dst as usize + bytes].copy_from_slice(&st[at..at + bytes]);
                    }
                }
            }
        }
    }

    fn floats(mem: &[u8], at: u64, n: usize) -> Vec<f32> {
        let at = at as usize;
        mem[at..at + 4 * n].chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
    }

    /// Three processes, three parts of different lengths at scattered addresses: each sum's
    /// result is its sum over the processes, each gather's its values from every process in rank
    /// order, and nothing outside the results is written.
    #[test]
    fn a_device_message_sums_and_gathers_each_part_as_the_host_path_does() {
        let lens = [5usize, 1, 3];
        let srcs = [0u64, 64, 96];
        let dsts = [200u64, 300, 400];
        let size = 3;
        for kind in [DeviceKind::Sum, DeviceKind::Gather { size }] {
            let parts: Vec<DevicePart> =
                (0..3).map(|i| DevicePart { src: srcs[i], dst: dsts[i], bytes: 4 * lens[i] }).collect();
            let msg = DeviceMessage { group: "dp".into(), kind, parts };
            let value = |rank: usize, part: usize, k: usize| (1 + rank * 100 + part * 10 + k) as f32 * 0.5;
            let mut memories: Vec<Vec<u8>> = (0..size)
                .map(|rank| {
                    let mut mem = vec![0xAAu8; 512];
                    for (i, &n) in lens.iter().enumerate() {
                        for k in 0..n {
                            let at = srcs[i] as usize + 4 * k;
                            mem[at..at + 4].copy_from_slice(&value(rank, i, k).to_le_bytes());
                        }
                    }
                    mem
                })
                .collect();
            let before = memories.clone();
            carry_out(&msg.moves(), msg.staging(), &mut memories);
            for (rank, mem) in memories.iter().enumerate() {
                let mut written = vec![false; mem.len()];
                for (i, &n) in lens.iter().enumerate() {
                    let (want, out): (Vec<f32>, usize) = match kind {
                        DeviceKind::Sum => {
                            ((0..n).map(|k| (0..size).map(|r| value(r, i, k)).sum()).collect(), n)
                        }
                        DeviceKind::Gather { size } => {
                            ((0..size).flat_map(|r| (0..n).map(move |k| value(r, i, k))).collect(), n * size)
                        }
                    };
                    assert_eq!(floats(mem, dsts[i], out), want, "{kind:?}, rank {rank}, part {i}");
                    written[dsts[i] as usize..dsts[i] as usize + 4 * out].iter_mut().for_each(|w| *w = true);
                }
                for (k, (&now, &was)) in mem.iter().zip(&before[rank]).enumerate() {
                    assert!(written[k] || now == was, "{kind:?}: byte {k} of rank {rank} changed");
                }
            }
        }
    }
}
