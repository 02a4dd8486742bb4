//! Collectives between processes: the `all_reduce`, `all_gather` and `all_to_all` steps of a
//! program (data-parallel training's gradient, loss and expert-load sums, ZeRO-1's gathers, expert
//! parallelism's dispatch and combine) run through a [`Communicator`] the caller gives the
//! executor ([`crate::exec::Executor::set_communicator`]). The runtime holds no transport of its
//! own: `kiln` implements the trait over MPI (`src/dist.rs`, OpenMPI through the `mpi` crate), and
//! a process given none is a group of one, whose sum is its own value.
//!
//! Every collective is bounded in time: a peer that dies or never answers ends the call with
//! [`RuntimeError::Collective`] naming the group, the ranks and the wait, never a hang.

use std::time::Duration;

use crate::RuntimeError;

/// The processes a program's collectives run over, by group name (`"dp"`).
pub trait Communicator {
    /// This process's rank in `group`, and the group's size; `None` for a group it does not know.
    fn rank_in(&self, group: &str) -> Option<(usize, usize)>;
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
    /// How long a collective waits for its peers before it fails.
    fn timeout(&self) -> Duration;
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
