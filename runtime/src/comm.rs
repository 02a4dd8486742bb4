//! Collectives between processes: the `all_reduce` steps of a program (data-parallel training's
//! gradient, loss and expert-load sums) run through a [`Communicator`] the caller gives the
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
    /// How long a collective waits for its peers before it fails.
    fn timeout(&self) -> Duration;
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
