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

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use kiln_runtime::comm::{Communicator, InFlight};
use kiln_runtime::RuntimeError;
use mpi::collective::{CommunicatorCollectives, Root, SystemOperation};
use mpi::request::StaticScope;
use mpi::topology::{Color, Communicator as _, SimpleCommunicator};

/// The MPI library kiln links and the `mpirun` on PATH, in words (`kiln doctor`).
pub fn describe() -> String {
    let library = mpi::environment::library_version()
        .ok()
        .and_then(|v| v.split(',').next().map(|l| l.trim().to_string()))
        .unwrap_or_else(|| "an MPI library that does not say its version".into());
    let on_path = std::env::var_os("PATH")
        .and_then(|p| std::env::split_paths(&p).map(|d| d.join("mpirun")).find(|f| f.is_file()));
    match on_path {
        Some(m) => format!("{library}; mpirun at {} (kiln train --dp N under mpirun -n N)", m.display()),
        None => {
            format!("{library}; mpirun not found: run scripts/setup.sh (openmpi-bin) for kiln train --dp")
        }
    }
}

/// The MPI world of a data-parallel or pipeline run (or both: a grid of `dp` replicas of a
/// `pp`-rank pipeline); MPI is finalised when it is dropped.
///
/// World rank `w` is pipeline rank `w % pp` of replica `w / pp`: a replica's ranks are neighbours,
/// which keeps a pipeline's point-to-point messages between them.
pub struct Dist {
    // Declared first: dropped (each communicator freed) before the universe finalises MPI.
    world: SimpleCommunicator,
    /// The ranks of this process's replica (its pipeline), and the ranks of every replica that hold
    /// the same stages as this one.
    pipeline: SimpleCommunicator,
    replicas: SimpleCommunicator,
    /// `--ep`: the expert-parallel ranks of this process's group (consecutive world ranks), and
    /// the processes of the other groups that hold the same experts as this one.
    experts: SimpleCommunicator,
    expert_replicas: SimpleCommunicator,
    rank: usize,
    size: usize,
    pp: usize,
    ep: usize,
    timeout: Duration,
    _universe: mpi::environment::Universe,
}

impl Dist {
    /// Joins the job `mpirun` started, which must have `dp` processes.
    pub fn init(dp: usize, timeout: Duration) -> Result<Dist> {
        Dist::init_grid(&format!("--dp {dp}"), 1, dp, timeout)
    }

    /// Joins a job of `pp · dp` processes that `flags` (`--dp N`, `--pp N`, `--pp P --dp D`) asked
    /// for: `dp` replicas of a `pp`-rank pipeline.
    pub fn init_grid(flags: &str, pp: usize, dp: usize, timeout: Duration) -> Result<Dist> {
        Dist::init_world(flags, pp, dp, 1, timeout)
    }

    /// Joins a job of `pp · ep · dp` processes that train with `--ep ep` (and `--pp pp`, `--dp
    /// dp`): `ep · dp` replicas of a `pp`-rank pipeline (one process without `--pp`), each training
    /// on its own rows; each group of `ep` consecutive replicas splits the routed experts.
    pub fn init_experts(flags: &str, pp: usize, dp: usize, ep: usize, timeout: Duration) -> Result<Dist> {
        Dist::init_world(flags, pp, dp * ep, ep, timeout)
    }

    /// World rank `w` is pipeline rank `w % pp` of replica `w / pp`, and replica `j` is
    /// expert-parallel rank `j % ep` of expert group `j / ep`.
    fn init_world(flags: &str, pp: usize, dp: usize, ep: usize, timeout: Duration) -> Result<Dist> {
        let n = pp * dp;
        let launched =
            ["OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_SIZE"].iter().any(|v| std::env::var_os(v).is_some());
        if !launched {
            // The verb this process was started with (`run --ep`, `train --dp`, ...).
            let verb =
                std::env::args().nth(1).filter(|v| !v.starts_with('-')).unwrap_or_else(|| "train".into());
            bail!(
                "{flags} runs {n} processes: launch them with `mpirun -n {n} kiln {verb} ... {flags}` \
                 (as root, add --allow-run-as-root; with more processes than cores, --oversubscribe)"
            );
        }
        let Some(universe) = mpi::initialize() else {
            bail!("MPI was already initialised in this process");
        };
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        if size != n {
            bail!("{flags}: mpirun started {size} processes; start {n} (`mpirun -n {n}`)");
        }
        let split = |color: usize| {
            world.split_by_color(Color::with_value(color as i32)).expect("every process has a color")
        };
        let pipeline = split(rank / pp);
        let replicas = split(rank % pp);
        let (stage, replica) = (rank % pp, rank / pp);
        let experts = split(stage + pp * (replica / ep));
        let expert_replicas = split(stage + pp * (replica % ep));
        Ok(Dist {
            world,
            pipeline,
            replicas,
            experts,
            expert_replicas,
            rank,
            size,
            pp,
            ep,
            timeout,
            _universe: universe,
        })
    }

    /// This process's expert-parallel rank and the ranks that split the experts (`--ep`; 0 of 1
    /// without).
    pub fn ep_rank(&self) -> usize {
        self.dp_rank() % self.ep
    }

    pub fn ep_size(&self) -> usize {
        self.ep
    }

    /// The executor's view of an expert-parallel training process: every process (group `dp`,
    /// whose sums are the step's), its expert-parallel ranks (group `ep`, which exchange tokens)
    /// and the processes holding the same experts (group `edp`, which sum those experts'
    /// gradients), each on a communicator of its own.
    pub fn expert_training(&self) -> Box<dyn Communicator> {
        let mut groups = vec![self.replica_group()];
        groups.extend(self.expert_groups());
        Box::new(Groups { groups, timeout: self.timeout })
    }

    /// The groups `ep` and `edp` of an expert-parallel run (none without one).
    fn expert_groups(&self) -> Vec<Group> {
        if self.ep == 1 {
            return Vec::new();
        }
        let ep = Group::new(
            kiln_compiler::expert_parallel::EP_GROUP,
            self.experts.duplicate(),
            self.ep_rank(),
            self.ep,
        );
        let edp = Group::new(
            kiln_compiler::expert_parallel::EXPERT_DP_GROUP,
            self.expert_replicas.duplicate(),
            self.edp_rank(),
            self.edp_size(),
        );
        vec![ep, edp]
    }

    /// `data` of every replica of this process's stages (every process without `--pp`), laid end
    /// to end in replica order (the same length on each).
    pub fn gather_replicas(&self, data: &[f32]) -> Result<Vec<f32>> {
        let n = self.dp_size();
        let mut all = vec![0.0f32; data.len() * n];
        mpi::request::scope(|scope| {
            let req = self.replicas.immediate_all_gather_into(scope, data, &mut all[..]);
            let what = format!("the gather of {} values of a split state for a checkpoint", data.len());
            poll(req, self.timeout, || stalled(&self.replicas, self.dp_rank(), n, self.timeout, &what));
        });
        Ok(all)
    }

    /// `data` of every process holding this process's experts (`--ep` with `--dp`: one per
    /// replica of the expert-parallel group), laid end to end in their order (the same length on
    /// each).
    pub fn gather_expert_replicas(&self, data: &[f32]) -> Result<Vec<f32>> {
        let (rank, n) = (self.edp_rank(), self.edp_size());
        let mut all = vec![0.0f32; data.len() * n];
        mpi::request::scope(|scope| {
            let req = self.expert_replicas.immediate_all_gather_into(scope, data, &mut all[..]);
            let what = format!("the gather of {} values of an expert's split optimizer state", data.len());
            poll(req, self.timeout, || stalled(&self.expert_replicas, rank, n, self.timeout, &what));
        });
        Ok(all)
    }

    /// This process's rank among those holding the same experts, and their number (`--ep` with
    /// `--dp D`: D of them; 0 of 1 without expert parallelism).
    pub fn edp_rank(&self) -> usize {
        self.dp_rank() / self.ep
    }

    pub fn edp_size(&self) -> usize {
        self.dp_size() / self.ep
    }

    /// This process's replica and the number of replicas (`--dp`; 0 of 1 without).
    pub fn dp_rank(&self) -> usize {
        self.rank / self.pp
    }

    pub fn dp_size(&self) -> usize {
        self.size / self.pp
    }

    /// This process's rank in its replica's pipeline, and the pipeline's ranks (`--pp`; 0 of 1
    /// without).
    pub fn pp_rank(&self) -> usize {
        self.rank % self.pp
    }

    pub fn pp_size(&self) -> usize {
        self.pp
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

    /// What the processes of this job on this machine (which share its memory) hold together and
    /// have free: the sum of each one's `bytes`, and the least memory any of them sees available
    /// once every one has passed the sum (so each has allocated what it held then). Every process
    /// of the job must call it; each gets the same two numbers as the others of its machine.
    pub fn node_memory(&self, bytes: u64) -> (u64, Option<u64>) {
        let node = self.world.split_shared(self.rank as i32);
        let (rank, size) = (node.rank() as usize, node.size() as usize);
        let reduce = |value: u64, op: SystemOperation, what: &str| {
            let mut out = 0u64;
            mpi::request::scope(|scope| {
                let req = node.immediate_all_reduce_into(scope, &value, &mut out, op);
                poll(req, self.timeout, || stalled(&node, rank, size, self.timeout, what));
            });
            out
        };
        let total = reduce(bytes, SystemOperation::sum(), "the sum of the states this machine holds");
        let free = kiln_runtime::host::available_memory().unwrap_or(u64::MAX);
        let least = reduce(free, SystemOperation::min(), "the least memory free on this machine");
        (total, (least != u64::MAX).then_some(least))
    }

    /// Waits until every process has called it, for at most `wait` (at least `--comm-timeout`);
    /// `what` names the point in an error.
    pub fn barrier(&self, what: &str, wait: Duration) -> Result<()> {
        let wait = wait.max(self.timeout);
        let req = self.world.immediate_barrier();
        poll(req, wait, || stalled(&self.world, self.rank, self.size, wait, what));
        Ok(())
    }

    /// `data` of every process, laid end to end in rank order (the same length on each).
    pub fn gather(&self, data: &[f32]) -> Result<Vec<f32>> {
        let mut all = vec![0.0f32; data.len() * self.size];
        mpi::request::scope(|scope| {
            let req = self.world.immediate_all_gather_into(scope, data, &mut all[..]);
            let what = format!("the gather of {} values of a checkpoint", data.len());
            poll(req, self.timeout, || stalled(&self.world, self.rank, self.size, self.timeout, &what));
        });
        Ok(all)
    }

    /// The executor's view of the replicas (group `dp`): a communicator of its own
    /// (`MPI_Comm_dup`), so that its sums never match another call's.
    pub fn replicas(&self) -> Box<dyn Communicator> {
        Box::new(Groups { groups: vec![self.replica_group()], timeout: self.timeout })
    }

    fn replica_group(&self) -> Group {
        Group::new(kiln_compiler::train::DP_GROUP, self.replicas.duplicate(), self.dp_rank(), self.dp_size())
    }

    /// The executor's view of the expert-parallel ranks of `kiln run --ep` (group `ep`, every
    /// process of the job), on a communicator of its own.
    pub fn expert_ranks(&self) -> Box<dyn Communicator> {
        let ep = Group::new(
            kiln_compiler::expert_parallel::EP_GROUP,
            self.replicas.duplicate(),
            self.dp_rank(),
            self.dp_size(),
        );
        Box::new(Groups { groups: vec![ep], timeout: self.timeout })
    }

    /// The executor's view of a pipeline rank: its pipeline's ranks (group `pp`) and the replicas
    /// of its stages (group `dp`), each on a communicator of its own.
    pub fn pipeline_ranks(&self) -> Box<dyn Communicator> {
        let pp =
            Group::new(kiln_compiler::train::PP_GROUP, self.pipeline.duplicate(), self.pp_rank(), self.pp);
        let mut groups = vec![pp, self.replica_group()];
        groups.extend(self.expert_groups());
        Box::new(Groups { groups, timeout: self.timeout })
    }

    /// The point-to-point link of a pipeline rank (`crate::pipeline`) with the other ranks of its
    /// replica, on a communicator of its own.
    pub fn pipeline_link(&self) -> crate::pipeline::Link {
        crate::pipeline::Link::new(self.pipeline.duplicate(), self.timeout)
    }

    /// The point-to-point link of a process with the processes that hold the same stages in the
    /// other replicas (`--dp`; rank `r` of the link is replica `r`), on a communicator of its own.
    /// Every process must call it.
    pub fn replica_link(&self) -> crate::pipeline::Link {
        crate::pipeline::Link::new(self.replicas.duplicate(), self.timeout)
    }

    /// The point-to-point link of every process with every other (rank `r` of the link is world
    /// rank `r`), on a communicator of its own. Every process must call it.
    pub fn world_link(&self) -> crate::pipeline::Link {
        crate::pipeline::Link::new(self.world.duplicate(), self.timeout)
    }

    /// Ends every process of the job: this one failed with `message`.
    pub fn fail(&self, message: &str) -> ! {
        say!("{message} (rank {} of {}; ending every process of the job)", self.rank, self.size);
        self.world.abort(1)
    }
}

/// One communication group of a run: its name (`dp`, `pp`) and its MPI communicator.
struct Group {
    name: &'static str,
    comm: SimpleCommunicator,
    rank: usize,
    size: usize,
    /// The second phase of the group's all-to-alls ([`Exchange`]).
    rows: GroupQueue,
}

impl Group {
    /// Group `name` over `comm` (a communicator of its own), with a second one for the rows of
    /// its all-to-alls.
    fn new(name: &'static str, comm: SimpleCommunicator, rank: usize, size: usize) -> Group {
        let rows = GroupQueue { comm: Rc::new(comm.duplicate()), waiting: Default::default() };
        Group { name, comm, rank, size, rows }
    }
}

/// kiln_runtime's [`Communicator`] over MPI communicators, one per group.
struct Groups {
    groups: Vec<Group>,
    timeout: Duration,
}

impl Groups {
    fn group(&self, name: &str) -> Result<&Group, RuntimeError> {
        self.groups.iter().find(|g| g.name == name).ok_or_else(|| {
            let known: Vec<String> = self.groups.iter().map(|g| format!("`{}`", g.name)).collect();
            RuntimeError::Collective {
                group: name.into(),
                what: format!("not a group of this run (it has {})", known.join(" and ")),
            }
        })
    }
}

impl Communicator for Groups {
    fn rank_in(&self, group: &str) -> Option<(usize, usize)> {
        self.group(group).ok().map(|g| (g.rank, g.size))
    }

    fn groups(&self) -> Vec<String> {
        self.groups.iter().map(|g| g.name.to_string()).collect()
    }

    fn all_reduce_sum(&self, group: &str, data: &mut [f32]) -> Result<(), RuntimeError> {
        let g = self.group(group)?;
        let send = data.to_vec();
        let n = data.len();
        mpi::request::scope(|scope| {
            let req = g.comm.immediate_all_reduce_into(scope, &send[..], data, SystemOperation::sum());
            poll(req, self.timeout, || {
                stalled(&g.comm, g.rank, g.size, self.timeout, &format!("the all-reduce of {n} values"))
            });
        });
        Ok(())
    }

    fn start_all_reduce_sum(&self, group: &str, data: Vec<f32>) -> Result<Box<dyn InFlight>, RuntimeError> {
        self.start(self.group(group)?, data, false)
    }

    fn start_all_gather(&self, group: &str, data: Vec<f32>) -> Result<Box<dyn InFlight>, RuntimeError> {
        self.start(self.group(group)?, data, true)
    }

    fn start_all_to_all(
        &self,
        group: &str,
        data: Vec<f32>,
        keep: Vec<f32>,
        width: usize,
    ) -> Result<Box<dyn InFlight>, RuntimeError> {
        let g = self.group(group)?;
        Exchange::start(g, data, &keep, width, self.timeout)
    }

    fn broadcast(&self, group: &str, data: &mut [u8]) -> Result<(), RuntimeError> {
        let g = self.group(group)?;
        let n = data.len();
        mpi::request::scope(|scope| {
            let req = g.comm.process_at_rank(0).immediate_broadcast_into(scope, data);
            poll(req, self.timeout, || {
                stalled(
                    &g.comm,
                    g.rank,
                    g.size,
                    self.timeout,
                    &format!("the broadcast of {n} bytes over `{group}`"),
                )
            });
        });
        Ok(())
    }

    fn timeout(&self) -> Duration {
        self.timeout
    }
}

impl Groups {
    /// Starts a sum (`MPI_Iallreduce`) or, with `gather`, a gather (`MPI_Iallgather`) of `data`
    /// over `g`.
    fn start(&self, g: &Group, data: Vec<f32>, gather: bool) -> Result<Box<dyn InFlight>, RuntimeError> {
        let n = data.len();
        let out = if gather { n * g.size } else { n };
        // The buffers live on the heap, owned by the `Sum`, until MPI is done with them.
        let send: *mut [f32] = Box::into_raw(data.into_boxed_slice());
        let recv: *mut [f32] = Box::into_raw(vec![0.0f32; out].into_boxed_slice());
        // SAFETY: both pointers come from `Box::into_raw` just above and are freed only by `Sum`
        // (its `wait` or `Drop`) once the request has completed; nothing else touches them while
        // MPI may read `send` or write `recv`.
        let (s, r): (&'static [f32], &'static mut [f32]) = unsafe { (&*send, &mut *recv) };
        let req = match gather {
            true => g.comm.immediate_all_gather_into(StaticScope, s, r),
            false => g.comm.immediate_all_reduce_into(StaticScope, s, r, SystemOperation::sum()),
        };
        Ok(Box::new(Sum {
            req: Some(req),
            send,
            recv: Some(recv),
            deadline: Deadline::new(
                g,
                self.timeout,
                format!(
                    "the all-{} of {n} values over `{}`",
                    if gather { "gather" } else { "reduce" },
                    g.name
                ),
            ),
        }))
    }
}

/// A non-blocking sum or gather under way, owning its buffers.
struct Sum {
    req: Option<mpi::request::Request<'static, [f32], StaticScope>>,
    send: *mut [f32],
    /// Taken by `wait`.
    recv: Option<*mut [f32]>,
    deadline: Deadline,
}

impl InFlight for Sum {
    fn test(&mut self) -> Result<bool, RuntimeError> {
        Ok(test_pending(&mut self.req, &self.deadline))
    }

    fn wait(mut self: Box<Self>) -> Result<Vec<f32>, RuntimeError> {
        if let Some(req) = self.req.take() {
            self.deadline.wait(req);
        }
        let recv = self.recv.take().expect("a sum is waited for once");
        // SAFETY: from `Box::into_raw` in `start_all_reduce_sum`; the request has completed, so MPI
        // no longer writes it, and `recv` was taken, so `Drop` does not free it again.
        Ok(unsafe { Box::from_raw(recv) }.into_vec())
    }
}

impl Drop for Sum {
    fn drop(&mut self) {
        if self.req.is_some() {
            // MPI may still read and write the buffers: they cannot be freed, nor the job go on.
            say!(
                "error: rank {}: a sum over the replicas was dropped before it finished",
                self.deadline.rank
            );
            SimpleCommunicator::world().abort(3);
        }
        // SAFETY: from `Box::into_raw`; the request has completed (above), and each pointer is
        // freed once (`recv` only if `wait` did not take it).
        unsafe {
            drop(Box::from_raw(self.send));
            if let Some(recv) = self.recv.take() {
                drop(Box::from_raw(recv));
            }
        }
    }
}

/// The receive side of an all-to-all: the buffer with its counts and offsets per process.
type Parted = mpi::datatype::PartitionMut<'static, [f32], Vec<i32>, Vec<i32>>;
/// The send side.
type Sending = mpi::datatype::Partition<'static, [f32], Vec<i32>, Vec<i32>>;

/// A non-blocking all-to-all under way, in two phases, each a non-blocking collective: the
/// flags (one byte per row, `MPI_Ialltoall` on the group's communicator), so that each process
/// knows which rows it receives from each other, then the flagged rows, packed by destination
/// (`MPI_Ialltoallv` on the group's second communicator, [`Group::rows`]).
///
/// MPI matches the collectives of a communicator by the order they start in, which must be the
/// same on every process. The flags start when the exchange does, in program order. The rows
/// cannot start until the flags are in, and a test finds them in at different times on different
/// processes; so they go on a communicator of their own, each exchange's rows started strictly
/// after the rows of every exchange that started before it ([`Group::queue`], drained in order).
/// Both phases then travel while the process computes: under the other program of a DualPipe pair,
/// or under the launches before the exchange's result is read.
struct Exchange {
    rows: Rc<RefCell<Rows>>,
    group: GroupQueue,
    width: usize,
}

/// The second phase's communicator and the exchanges whose rows have not started yet, in the
/// order they started.
#[derive(Clone)]
struct GroupQueue {
    comm: Rc<SimpleCommunicator>,
    waiting: Rc<RefCell<VecDeque<Rc<RefCell<Rows>>>>>,
}

/// One exchange's buffers and requests, each buffer a `Box::into_raw` freed in `Drop` once no
/// request may touch it.
struct Rows {
    flags_req: Option<mpi::request::Request<'static, [u8], StaticScope>>,
    flags: *mut [u8],
    came: *mut [u8],
    /// The rows to send, until the second phase packs them.
    data: Option<Vec<f32>>,
    width: usize,
    size: usize,
    req: Option<mpi::request::Request<'static, Parted, StaticScope>>,
    /// Null until the second phase starts.
    send: *mut Sending,
    send_buf: *mut [f32],
    recv: *mut Parted,
    recv_buf: *mut [f32],
    deadline: Deadline,
    /// The first phase's, which names the flags.
    flags_deadline: Deadline,
}

impl Exchange {
    fn start(
        g: &Group,
        data: Vec<f32>,
        keep: &[f32],
        width: usize,
        timeout: Duration,
    ) -> Result<Box<dyn InFlight>, RuntimeError> {
        let bad = |what: String| RuntimeError::Collective { group: g.name.into(), what };
        let (size, rows) = (g.size, keep.len() / g.size.max(1));
        if rows * size != keep.len() || keep.len() * width != data.len() {
            return Err(bad(format!(
                "an all-to-all of {} values in {} rows of {width} cannot be cut into {size} blocks",
                data.len(),
                keep.len()
            )));
        }
        for n in [keep.len(), data.len()] {
            if i32::try_from(n).is_err() {
                return Err(bad(format!("an all-to-all of {n} values: over 2^31")));
            }
        }
        let what = format!("the all-to-all of {} rows of {width} values over `{}`", keep.len(), g.name);
        let flags: Vec<u8> = keep.iter().map(|&f| u8::from(f != 0.0)).collect();
        let came = vec![0u8; flags.len()];
        let flags: *mut [u8] = Box::into_raw(flags.into_boxed_slice());
        let came: *mut [u8] = Box::into_raw(came.into_boxed_slice());
        // SAFETY: both come from `Box::into_raw` just above and are freed only in `Rows::drop`,
        // after the request completed; nothing else touches them meanwhile.
        let (f, c): (&'static [u8], &'static mut [u8]) = unsafe { (&*flags, &mut *came) };
        let flags_req = g.comm.immediate_all_to_all_into(StaticScope, f, c);
        let rows = Rc::new(RefCell::new(Rows {
            flags_req: Some(flags_req),
            flags,
            came,
            data: Some(data),
            width,
            size,
            req: None,
            send: std::ptr::null_mut(),
            send_buf: std::ptr::slice_from_raw_parts_mut(std::ptr::null_mut(), 0),
            recv: std::ptr::null_mut(),
            recv_buf: std::ptr::slice_from_raw_parts_mut(std::ptr::null_mut(), 0),
            flags_deadline: Deadline::new(g, timeout, format!("the flags of {what}")),
            deadline: Deadline::new(g, timeout, what),
        }));
        g.rows.waiting.borrow_mut().push_back(rows.clone());
        Ok(Box::new(Exchange { rows, group: g.rows.clone(), width }))
    }
}

impl GroupQueue {
    /// Starts the rows of the waiting exchanges, in order, while their flags are in; with
    /// `through`, waits for the flags of every exchange up to that one.
    fn drain(&self, through: Option<&Rc<RefCell<Rows>>>) {
        // Done already when its rows have started (it left the queue).
        let mut reached = through.is_none_or(|t| !self.waiting.borrow().iter().any(|x| Rc::ptr_eq(x, t)));
        loop {
            let Some(front) = self.waiting.borrow().front().cloned() else { return };
            let mut guard = front.borrow_mut();
            let r = &mut *guard;
            if reached {
                if !test_pending(&mut r.flags_req, &r.flags_deadline) {
                    return;
                }
            } else if let Some(req) = r.flags_req.take() {
                r.flags_deadline.wait(req);
            }
            r.start_rows(&self.comm);
            drop(guard);
            self.waiting.borrow_mut().pop_front();
            if through.is_some_and(|t| Rc::ptr_eq(t, &front)) {
                reached = true;
            }
        }
    }
}

impl Rows {
    /// The second phase, once the flags are in: packs the flagged rows and starts their exchange.
    fn start_rows(&mut self, comm: &SimpleCommunicator) {
        // SAFETY: the flags' request has completed (the caller took it), so MPI no longer writes
        // `came`, and neither buffer is freed before `drop`.
        let (flags, came): (&[u8], &[u8]) = unsafe { (&*self.flags, &*self.came) };
        let (size, width) = (self.size, self.width);
        let rows = flags.len() / size.max(1);
        // The flagged rows, packed block by block, with each block's count and offset (within
        // i32: `Exchange::start` checked the totals).
        let layout = |flags: &[u8]| -> (Vec<i32>, Vec<i32>) {
            let (mut counts, mut displs, mut at) =
                (Vec::with_capacity(size), Vec::with_capacity(size), 0usize);
            for block in flags.chunks(rows.max(1)).take(size) {
                let n = block.iter().filter(|&&f| f != 0).count() * width;
                displs.push(at as i32);
                counts.push(n as i32);
                at += n;
            }
            counts.resize(size, 0);
            displs.resize(size, at as i32);
            (counts, displs)
        };
        let (send_counts, send_displs) = layout(flags);
        let (recv_counts, recv_displs) = layout(came);
        let total = |c: &[i32]| c.iter().map(|&n| n as usize).sum::<usize>();
        let data = self.data.take().unwrap_or_default();
        let mut packed = Vec::with_capacity(total(&send_counts));
        for (row, &f) in data.chunks(width.max(1)).zip(flags) {
            if f != 0 {
                packed.extend_from_slice(row);
            }
        }
        drop(data);
        self.send_buf = Box::into_raw(packed.into_boxed_slice());
        self.recv_buf = Box::into_raw(vec![0.0f32; total(&recv_counts)].into_boxed_slice());
        // SAFETY: the buffers and partitions come from `Box::into_raw` here and are freed only in
        // `Rows::drop`, after the request has completed; nothing else touches them meanwhile.
        let (s, r): (&'static [f32], &'static mut [f32]) = unsafe { (&*self.send_buf, &mut *self.recv_buf) };
        self.send = Box::into_raw(Box::new(Sending::new(s, send_counts, send_displs)));
        self.recv = Box::into_raw(Box::new(Parted::new(r, recv_counts, recv_displs)));
        // SAFETY: as above.
        let (sp, rp): (&'static Sending, &'static mut Parted) = unsafe { (&*self.send, &mut *self.recv) };
        self.req = Some(comm.immediate_all_to_all_varcount_into(StaticScope, sp, rp));
    }
}

impl InFlight for Exchange {
    fn test(&mut self) -> Result<bool, RuntimeError> {
        self.group.drain(None);
        let mut r = self.rows.borrow_mut();
        if r.flags_req.is_some() || r.send.is_null() {
            return Ok(false);
        }
        let Rows { req, deadline, .. } = &mut *r;
        Ok(test_pending(req, deadline))
    }

    fn wait(self: Box<Self>) -> Result<Vec<f32>, RuntimeError> {
        self.group.drain(Some(&self.rows));
        let mut r = self.rows.borrow_mut();
        if let Some(req) = r.req.take() {
            r.deadline.wait(req);
        }
        // SAFETY: both requests have completed, so MPI no longer writes the receive buffers.
        let (got, came): (&[f32], &[u8]) = unsafe { (&*r.recv_buf, &*r.came) };
        let n = came.iter().filter(|&&f| f != 0).count();
        if got.len() != n * self.width {
            return Err(RuntimeError::Collective {
                group: r.deadline.what.clone(),
                what: format!("{} values came for {n} rows of {}", got.len(), self.width),
            });
        }
        let mut out = vec![0.0f32; came.len() * self.width];
        let flagged = out.chunks_mut(self.width.max(1)).zip(came).filter(|(_, &f)| f != 0);
        for ((slot, _), row) in flagged.zip(got.chunks(self.width.max(1))) {
            slot.copy_from_slice(row);
        }
        Ok(out)
    }
}

impl Drop for Rows {
    fn drop(&mut self) {
        if self.flags_req.is_some() || self.req.is_some() {
            say!("error: rank {}: an all-to-all was dropped before it finished", self.deadline.rank);
            SimpleCommunicator::world().abort(3);
        }
        // SAFETY: each pointer comes from `Box::into_raw` and is freed once, here, after its
        // request completed (above); the partitions go before the buffers they borrow.
        unsafe {
            drop(Box::from_raw(self.flags));
            drop(Box::from_raw(self.came));
            if !self.send.is_null() {
                drop(Box::from_raw(self.send));
                drop(Box::from_raw(self.recv));
                drop(Box::from_raw(self.send_buf));
                drop(Box::from_raw(self.recv_buf));
            }
        }
    }
}

/// How long a process waits for the others while rank 0 writes a checkpoint ([`Saving`]): a
/// checkpoint may take far longer than any message (models/bench.toml's is 5.5 GB; DeepSeek-V3's
/// is terabytes), and a wait bounded by `--comm-timeout` would end a healthy job.
pub const CHECKPOINT_WAIT: Duration = Duration::from_secs(3600);

/// Whether this process is taking part in a checkpoint ([`Saving`]).
static SAVING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// While it lives, this process is taking part in a checkpoint: every wait for another process
/// (collectives, pipeline messages, a streamed checkpoint's requests) is bounded by
/// [`CHECKPOINT_WAIT`] instead of `--comm-timeout`, where that is longer.
pub struct Saving(());

impl Saving {
    pub fn begin() -> Saving {
        SAVING.store(true, std::sync::atomic::Ordering::Relaxed);
        Saving(())
    }
}

impl Drop for Saving {
    fn drop(&mut self) {
        SAVING.store(false, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The bound on a wait whose deadline is `timeout` (`--comm-timeout`): itself, or during a
/// checkpoint at least [`CHECKPOINT_WAIT`].
pub fn wait_limit(timeout: Duration) -> Duration {
    match SAVING.load(std::sync::atomic::Ordering::Relaxed) {
        true => timeout.max(CHECKPOINT_WAIT),
        false => timeout,
    }
}

/// What a wait bounded by `timeout` says it waited: the seconds, and whether a checkpoint made it
/// longer.
pub fn waited(timeout: Duration) -> String {
    let limit = wait_limit(timeout);
    match limit > timeout {
        true => format!("{} s (the wait during a checkpoint)", limit.as_secs_f64()),
        false => format!("{} s", limit.as_secs_f64()),
    }
}

/// When a non-blocking collective started, how long it may take, and what to say if it takes
/// longer: `rank` of `size` waited for `what`.
struct Deadline {
    start: Instant,
    timeout: Duration,
    rank: usize,
    size: usize,
    what: String,
}

impl Deadline {
    fn new(g: &Group, timeout: Duration, what: String) -> Deadline {
        Deadline { start: Instant::now(), timeout, rank: g.rank, size: g.size, what }
    }

    /// Ends the job, naming the collective that never finished.
    fn late(&self) -> ! {
        stalled(&SimpleCommunicator::world(), self.rank, self.size, self.timeout, &self.what)
    }

    /// Waits for `req` until the deadline.
    fn wait<'a, R: ?Sized, S: mpi::request::Scope<'a>>(&self, req: mpi::request::Request<'a, R, S>) {
        poll(req, wait_limit(self.timeout).saturating_sub(self.start.elapsed()), || self.late());
    }
}

/// Whether the request in `req` has completed (taking it), or, left there, not yet; past the
/// deadline, ends the job.
fn test_pending<R: ?Sized>(
    req: &mut Option<mpi::request::Request<'static, R, StaticScope>>,
    d: &Deadline,
) -> bool {
    let Some(r) = req.take() else { return true };
    match r.test() {
        Ok(_) => true,
        Err(r) => {
            *req = Some(r);
            if d.start.elapsed() > wait_limit(d.timeout) {
                d.late();
            }
            false
        }
    }
}

/// Tests `req` until it completes: first yielding the core between tests (a sum of a few
/// kilobytes over shared memory takes microseconds), then sleeping a little longer each time (up to
/// a millisecond, so a long wait leaves the cores to the others). Past `timeout` (longer during a
/// checkpoint, [`wait_limit`]), calls `late`, which ends the job (a request cannot be dropped while
/// MPI may still write its buffer).
fn poll<'a, R: ?Sized, S: mpi::request::Scope<'a>>(
    mut req: mpi::request::Request<'a, R, S>,
    timeout: Duration,
    late: impl Fn(),
) {
    let start = Instant::now();
    let timeout = wait_limit(timeout);
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
    say!(
        "error: rank {rank} of {size} waited {} for the other ranks in {what}, which never came: a process \
         died or is stuck (--comm-timeout sets the wait); ending every process of the job",
        waited(timeout)
    );
    comm.abort(2)
}
