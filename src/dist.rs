//! Processes that train together: `kiln train --dp N` under `mpirun -n N`, over MPI (OpenMPI from
//! Debian, through the `mpi` crate).
//!
//! Each process is one data-parallel replica. It trains on its share of every batch (rows
//! `rank·B/N ..`), and its compiled step sums the gradients, the loss and the routers' loads over
//! the replicas (`all_reduce` steps, which the executor runs through [`Replicas`], kiln_runtime's
//! [`Communicator`]). Every replica then makes the same update, so the run is the single-process
//! run of batch B, up to the order of the sums.
//!
//! Nothing waits forever. Every collective is non-blocking (`MPI_Iallreduce`, `MPI_Ibarrier`)
//! and polled against a deadline (`--comm-timeout`); past it, the process prints which rank
//! waited, in what and for how long, and ends the whole job (`MPI_Abort`). A process that fails
//! ends it the same way, naming its rank; one that dies is reported by mpirun.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use kiln_runtime::comm::Communicator;
use kiln_runtime::RuntimeError;
use mpi::collective::{CommunicatorCollectives, SystemOperation};
use mpi::topology::{Communicator as _, SimpleCommunicator};

/// The MPI world of a data-parallel run; MPI is finalised when it is dropped.
pub struct Dist {
    // Declared first: dropped (each communicator freed) before the universe finalises MPI.
    world: SimpleCommunicator,
    rank: usize,
    size: usize,
    timeout: Duration,
    _universe: mpi::environment::Universe,
}

impl Dist {
    /// Joins the job `mpirun` started, which must have `dp` processes.
    pub fn init(dp: usize, timeout: Duration) -> Result<Dist> {
        let launched =
            ["OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_SIZE"].iter().any(|v| std::env::var_os(v).is_some());
        if !launched {
            bail!(
                "--dp {dp} runs {dp} processes: launch them with `mpirun -n {dp} kiln train ... --dp {dp}` \
                 (as root, add --allow-run-as-root; with more processes than cores, --oversubscribe)"
            );
        }
        let Some(universe) = mpi::initialize() else {
            bail!("MPI was already initialised in this process");
        };
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        if size != dp {
            bail!("--dp {dp}: mpirun started {size} processes; start {dp} (`mpirun -n {dp}`)");
        }
        Ok(Dist { world, rank, size, timeout, _universe: universe })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// The first process, which writes the run's files and prints its progress.
    pub fn leader(&self) -> bool {
        self.rank == 0
    }

    /// Waits until every process has called it, for at most `wait` (at least `--comm-timeout`);
    /// `what` names the point in an error.
    pub fn barrier(&self, what: &str, wait: Duration) -> Result<()> {
        let wait = wait.max(self.timeout);
        let req = self.world.immediate_barrier();
        poll(req, wait, || stalled(&self.world, self.rank, self.size, wait, what));
        Ok(())
    }

    /// The executor's view of the replicas: a communicator of its own (`MPI_Comm_dup`), so that
    /// its sums never match another call's.
    pub fn replicas(&self) -> Box<dyn Communicator> {
        Box::new(Replicas {
            comm: self.world.duplicate(),
            rank: self.rank,
            size: self.size,
            timeout: self.timeout,
        })
    }

    /// Ends every process of the job: this one failed with `message`.
    pub fn fail(&self, message: &str) -> ! {
        eprintln!("{message} (rank {} of {}; ending every process of the job)", self.rank, self.size);
        self.world.abort(1)
    }
}

/// kiln_runtime's [`Communicator`] over an MPI communicator of the replicas (group `dp`).
struct Replicas {
    comm: SimpleCommunicator,
    rank: usize,
    size: usize,
    timeout: Duration,
}

impl Communicator for Replicas {
    fn rank_in(&self, group: &str) -> Option<(usize, usize)> {
        (group == kiln_compiler::train::DP_GROUP).then_some((self.rank, self.size))
    }

    fn all_reduce_sum(&self, group: &str, data: &mut [f32]) -> Result<(), RuntimeError> {
        if self.rank_in(group).is_none() {
            return Err(RuntimeError::Collective {
                group: group.into(),
                what: "not a group of this run (it has `dp`)".into(),
            });
        }
        let send = data.to_vec();
        let n = data.len();
        mpi::request::scope(|scope| {
            let req = self.comm.immediate_all_reduce_into(scope, &send[..], data, SystemOperation::sum());
            poll(req, self.timeout, || {
                stalled(
                    &self.comm,
                    self.rank,
                    self.size,
                    self.timeout,
                    &format!("the all-reduce of {n} values"),
                )
            });
        });
        Ok(())
    }

    fn timeout(&self) -> Duration {
        self.timeout
    }
}

/// Tests `req` until it completes: first yielding the core between tests (a sum of a few
/// kilobytes over shared memory takes microseconds), then sleeping a little longer each time (up to
/// a millisecond, so a long wait leaves the cores to the others). Past `timeout`, calls `late`,
/// which ends the job (a request cannot be dropped while MPI may still write its buffer).
fn poll<'a, R: ?Sized, S: mpi::request::Scope<'a>>(
    mut req: mpi::request::Request<'a, R, S>,
    timeout: Duration,
    late: impl Fn(),
) {
    let start = Instant::now();
    let mut nap = Duration::from_micros(10);
    for tries in 0u32.. {
        match req.test() {
            Ok(_) => return,
            Err(r) => req = r,
        }
        if start.elapsed() > timeout {
            late();
        }
        if tries < 1000 {
            std::thread::yield_now();
        } else {
            std::thread::sleep(nap);
            nap = (nap * 2).min(Duration::from_millis(1));
        }
    }
}

fn stalled(comm: &SimpleCommunicator, rank: usize, size: usize, timeout: Duration, what: &str) -> ! {
    eprintln!(
        "error: rank {rank} of {size} waited {} s for the other ranks in {what}, which never came: a process \
         died or is stuck (--comm-timeout sets the wait); ending every process of the job",
        timeout.as_secs_f64()
    );
    comm.abort(2)
}
