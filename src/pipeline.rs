//! `kiln train --pp P` under `mpirun -n P`: pipeline-parallel training, each process one rank of
//! the pipeline, running the artifact's per-stage programs (`kiln_compiler::pipeline`) in the order
//! of its instruction list (the plan's schedule, 1F1B or ZB1P), with the stages' activations and
//! gradients sent between the ranks over MPI.
//!
//! A step splits the batch into the schedule's micro-batches. For each instruction of this rank's
//! list it runs the program of the work's stage and phase (F: `stage.{s}.forward`, B:
//! `stage.{s}.backward`, W: `stage.{s}.weight`, a full backward B then W), feeding it:
//!
//! - the caller inputs of the micro-batch (tokens, targets, positions, `accumulate.keep`);
//! - `pp.saved.*`, what an earlier program of the same stage and micro-batch output;
//! - `pp.x.*`, what another stage sent: each program's values for one other stage travel as one
//!   message (`MPI_Isend`, tagged by micro-batch, phase and stages), received when first needed.
//!
//! Sends never wait: a message is handed to MPI and the rank computes on; every wait is bounded
//! by `--comm-timeout`, past which the job ends naming the rank and what it waited for. After its
//! list, each rank runs `rank.{r}.update`: the optimizer step over its stages' parameters, with
//! the global gradient norm and the loss summed over the ranks (`all_reduce` over `pp`), so that
//! every rank clips alike. Rank 0 gathers the other ranks' expert loads and layer norms for the
//! step's report, and, when a checkpoint is written, their stages' states.
//!
//! The gradients are those of the one-process step with the same micro-batches, added in the same
//! order; only the norm's sum is regrouped by rank.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Result;
use kiln_compiler::pipeline::{self as cut, Phase};
use kiln_compiler::train::master_of;
use kiln_ir::artifact::{Manifest, ParallelPlan, Step};
use kiln_ir::module::{ACCUMULATE_KEEP, DP_GROUP, EDP_GROUP, MICRO_BATCHES};
use kiln_ir::schedule::{Instr, Work};
use kiln_ir::DType;
use kiln_runtime::comm::CommStats;
use kiln_runtime::data::TokenRows;
use kiln_runtime::exec::{Backend, Executor, NonFinite};
use kiln_runtime::train::{split, stats, step_inputs, Gate, Gated, StepStats, Steps, Undo, Verdict};
use kiln_runtime::weights::{HostData, HostTensor, TensorHead};
use kiln_runtime::RuntimeError;
use mpi::point_to_point::{Destination, MatchedReceiveVec, Source};
use mpi::request::StaticScope;
use mpi::topology::{Communicator as _, SimpleCommunicator};

/// The tag of a rank's step report to rank 0.
const REPORT_TAG: i32 = 32000;
/// The tag of the updated weights a rank sends to the ranks that read them.
const WEIGHTS_TAG: i32 = 32002;
/// The tag of DualPipe's exchange of accumulators between the two copies of a stage.
const COPIES_TAG: i32 = 32003;
/// A streamed checkpoint's request for a state (its name; empty: the checkpoint is written), and
/// the state sent back.
const REQUEST_TAG: i32 = 32004;
const TENSOR_TAG: i32 = 32005;
/// The name of a step report's compute spans.
const SPANS: &str = "pp.spans";
/// The prefix of a state's name in a step report.
const STATE_PREFIX: &str = "pp.state.";

/// The MPI side of a pipeline rank: point-to-point messages between ranks.
pub struct Link {
    comm: SimpleCommunicator,
    rank: u32,
    size: u32,
    timeout: Duration,
    /// Sends under way, with their buffers.
    pending: Vec<Pending>,
    /// What the received messages cost since the last [`Link::take_stats`].
    stats: CommStats,
}

/// Microseconds since the Unix epoch: a clock every process of one machine shares (a message
/// carries its send time, so the receiver knows how long it was in flight).
fn wall_us() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

struct Pending {
    req: Option<mpi::request::Request<'static, [u8], StaticScope>>,
    buf: *mut [u8],
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Some(req) = self.req.take() {
            // MPI may still read the buffer: it cannot be freed, nor the job go on.
            say!("error: a pipeline send was dropped before it finished");
            std::mem::forget(req);
            SimpleCommunicator::world().abort(3);
        }
        // SAFETY: from `Box::into_raw` in `send`; the request has completed.
        unsafe { drop(Box::from_raw(self.buf)) };
    }
}

impl Link {
    pub fn new(comm: SimpleCommunicator, timeout: Duration) -> Link {
        let (rank, size) = (comm.rank() as u32, comm.size() as u32);
        Link { comm, rank, size, timeout, pending: Vec::new(), stats: CommStats::default() }
    }

    fn late(&self, what: &str) -> ! {
        say!(
            "error: rank {} of {} waited {} for {what}, which never came: a process died or is stuck \
             (--comm-timeout sets the wait); ending every process of the job",
            self.rank,
            self.size,
            crate::dist::waited(self.timeout)
        );
        self.comm.abort(2)
    }

    /// Hands `bytes` to MPI for rank `to`; returns at once.
    fn send(&mut self, to: u32, tag: i32, mut bytes: Vec<u8>) {
        // The send time, for the receiver's count of time in flight.
        bytes.extend(wall_us().to_le_bytes());
        let buf: *mut [u8] = Box::into_raw(bytes.into_boxed_slice());
        // SAFETY: `buf` comes from `Box::into_raw` just above and is freed only by `Pending`'s drop,
        // after the request completed; nothing writes it meanwhile.
        let data: &'static [u8] = unsafe { &*buf };
        let req = self.comm.process_at_rank(to as i32).immediate_send_with_tag(StaticScope, data, tag);
        self.pending.push(Pending { req: Some(req), buf });
        self.progress();
    }

    /// Drops the sends that have completed.
    fn progress(&mut self) {
        for p in &mut self.pending {
            if let Some(req) = p.req.take() {
                if let Err(req) = req.test() {
                    p.req = Some(req);
                }
            }
        }
        self.pending.retain(|p| p.req.is_some());
    }

    /// Waits until every send has completed.
    fn flush(&mut self) {
        let start = Instant::now();
        while !self.pending.is_empty() {
            self.progress();
            if start.elapsed() > crate::dist::wait_limit(self.timeout) {
                self.late("the other ranks to take this rank's messages");
            }
            std::thread::yield_now();
        }
    }

    /// What the received messages cost since the last call: each message's time from its send to
    /// its receipt (in flight, an upper bound: it may have waited, arrived, for the receiver to
    /// need it) and the time the receiver stood waiting for it while it was in flight (a wait for
    /// a message not yet sent is the pipeline's bubble, which the timeline shows).
    fn take_stats(&mut self) -> CommStats {
        std::mem::take(&mut self.stats)
    }

    /// The next message from rank `from` with `tag`, waiting at most the timeout.
    fn recv(&mut self, from: u32, tag: i32, what: &str) -> Vec<u8> {
        let start = Instant::now();
        let called = wall_us();
        let mut nap = Duration::from_micros(10);
        for tries in 0u32.. {
            let source = self.comm.process_at_rank(from as i32);
            if let Some(matched) = source.immediate_matched_probe_with_tag(tag) {
                let (mut data, _) = matched.matched_receive_vec::<u8>();
                let sent = data.len().checked_sub(8).map_or(0, |at| {
                    let t = u64::from_le_bytes(data[at..].try_into().expect("8 bytes"));
                    data.truncate(at);
                    t
                });
                // Waiting before the message was sent is the pipeline's dependency (its bubble),
                // not communication: only the wait while it was in flight counts.
                let now = wall_us();
                self.stats.messages += 1;
                self.stats.bytes += data.len() as u64;
                self.stats.waited_ns += now.saturating_sub(called.max(sent)) * 1000;
                self.stats.in_flight_ns += now.saturating_sub(sent) * 1000;
                return data;
            }
            // Our own sends must progress while we wait, or two ranks sending to each other stall.
            self.progress();
            if start.elapsed() > crate::dist::wait_limit(self.timeout) {
                self.late(what);
            }
            if tries < 1000 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(nap);
                nap = (nap * 2).min(Duration::from_millis(1));
            }
        }
        unreachable!("the loop returns or ends the job")
    }

    /// Rank 0's side of a streamed checkpoint: asks rank `r` for the state it holds as `name`, and
    /// waits for it (at most the timeout).
    pub fn ask_for_state(&mut self, r: u32, name: &str) -> Result<HostTensor, RuntimeError> {
        self.tell(&[r], name);
        self.take_state(r, name)
    }

    /// Rank 0: the state `name` rank `r` gives ([`Link::give_state`]), waiting at most the
    /// timeout.
    pub fn take_state(&mut self, r: u32, name: &str) -> Result<HostTensor, RuntimeError> {
        let bytes = self.recv(r, TENSOR_TAG, &format!("rank {r}'s state `{name}` for a checkpoint"));
        let mut got = decode(&bytes)?;
        match (got.pop(), got.is_empty()) {
            (Some(t), true) if t.name == name => Ok(t),
            _ => Err(RuntimeError::BadOption(format!(
                "rank {r} answered the request for `{name}` with another"
            ))),
        }
    }

    /// Sends state `t` to rank 0, for [`Link::take_state`].
    pub fn give_state(&mut self, t: HostTensor) {
        self.send(0, TENSOR_TAG, encode(&[t]));
        self.flush();
    }

    /// Another rank's side of a streamed checkpoint: answers each of rank 0's requests with
    /// `read(name)`, one state at a time, until rank 0 says the checkpoint is written
    /// ([`Link::states_served`]). Each request is waited for at most the timeout.
    pub fn serve_states(
        &mut self,
        read: impl Fn(&str) -> Result<HostTensor, RuntimeError>,
    ) -> Result<(), RuntimeError> {
        while let Some(name) = self.next_request("rank 0's request for a state of a checkpoint")? {
            self.give_state(read(&name)?);
        }
        Ok(())
    }

    /// Rank 0: the checkpoint is written; every other rank stops serving.
    pub fn states_served(&mut self) {
        self.tell_all("");
    }

    /// Rank 0: sends the state name `name` (empty: the end) to every other rank.
    pub fn tell_all(&mut self, name: &str) {
        self.tell(&(1..self.size).collect::<Vec<_>>(), name);
    }

    /// Rank 0: sends the state name `name` (empty: the end) to `ranks`.
    pub fn tell(&mut self, ranks: &[u32], name: &str) {
        for &r in ranks {
            self.send(r, REQUEST_TAG, name.as_bytes().to_vec());
        }
        self.flush();
    }

    /// The next state name rank 0 sends ([`Link::tell_all`]), `None` at the end; waits at most
    /// the timeout (`what` names it in the error).
    pub fn next_request(&mut self, what: &str) -> Result<Option<String>, RuntimeError> {
        let name = self.recv(0, REQUEST_TAG, what);
        if name.is_empty() {
            return Ok(None);
        }
        let name = String::from_utf8(name)
            .map_err(|_| RuntimeError::BadOption("a checkpoint request that is not a name".into()))?;
        Ok(Some(name))
    }
}

/// `a += b`, both f32 values as little-endian bytes of the same length.
fn add_f32_bytes(a: &mut [u8], b: &[u8]) {
    for (x, y) in a.chunks_exact_mut(4).zip(b.chunks_exact(4)) {
        let sum = f32::from_le_bytes(x.try_into().expect("4 bytes"))
            + f32::from_le_bytes(y.try_into().expect("4 bytes"));
        x.copy_from_slice(&sum.to_le_bytes());
    }
}

/// Tensors laid end to end with their names, dtypes and shapes (every value of a float dtype
/// travels as f32, which holds bf16, f16 and FP8 exactly; integers as i64).
fn encode(tensors: &[HostTensor]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend((tensors.len() as u32).to_le_bytes());
    for t in tensors {
        out.extend((t.name.len() as u32).to_le_bytes());
        out.extend(t.name.as_bytes());
        let dtype = t.dtype.to_string();
        out.extend((dtype.len() as u32).to_le_bytes());
        out.extend(dtype.as_bytes());
        out.extend((t.shape.len() as u32).to_le_bytes());
        for d in &t.shape {
            out.extend(d.to_le_bytes());
        }
        match &t.data {
            // The values' bytes written into room made for them at once (a byte at a time through
            // `extend` grows the buffer as it goes, several times slower for a stage's gradients).
            HostData::F32(v) => {
                out.push(0);
                out.extend((v.len() as u64).to_le_bytes());
                let at = out.len();
                out.resize(at + 4 * v.len(), 0);
                for (c, x) in out[at..].chunks_exact_mut(4).zip(v) {
                    c.copy_from_slice(&x.to_le_bytes());
                }
            }
            HostData::I64(v) => {
                out.push(1);
                out.extend((v.len() as u64).to_le_bytes());
                let at = out.len();
                out.resize(at + 8 * v.len(), 0);
                for (c, x) in out[at..].chunks_exact_mut(8).zip(v) {
                    c.copy_from_slice(&x.to_le_bytes());
                }
            }
        }
    }
    out
}

fn decode(bytes: &[u8]) -> Result<Vec<HostTensor>, RuntimeError> {
    let bad =
        || RuntimeError::BadOption("a pipeline message is malformed (a kiln bug; please report it)".into());
    let mut at = 0usize;
    let mut take = |n: usize| -> Result<&[u8], RuntimeError> {
        let s = bytes.get(at..at + n).ok_or_else(bad)?;
        at += n;
        Ok(s)
    };
    let u32_ = |s: &[u8]| u32::from_le_bytes(s.try_into().expect("4 bytes")) as usize;
    let u64_ = |s: &[u8]| u64::from_le_bytes(s.try_into().expect("8 bytes"));
    let count = u32_(take(4)?);
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let n = u32_(take(4)?);
        let name = String::from_utf8(take(n)?.to_vec()).map_err(|_| bad())?;
        let n = u32_(take(4)?);
        let dtype = DType::from_name(std::str::from_utf8(take(n)?).map_err(|_| bad())?).ok_or_else(bad)?;
        let rank = u32_(take(4)?);
        let mut shape = Vec::with_capacity(rank);
        for _ in 0..rank {
            shape.push(u64_(take(8)?));
        }
        let kind = take(1)?[0];
        let len = u64_(take(8)?) as usize;
        let data = match kind {
            0 => HostData::F32(
                take(4 * len)?
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().expect("4")))
                    .collect(),
            ),
            1 => HostData::I64(
                take(8 * len)?
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().expect("8")))
                    .collect(),
            ),
            _ => return Err(bad()),
        };
        out.push(HostTensor { name, dtype, shape, data });
    }
    Ok(out)
}

/// A rank that reads a weight another rank updates: (reader, owner, state).
type Read = (u32, u32, String);

/// One stage program: its name and inputs.
struct StageProgram {
    name: String,
    inputs: Vec<String>,
    outputs: Vec<String>,
}

/// A pipeline rank's trainer: [`Steps`] over the artifact's stage programs.
pub struct PipelineTrainer<B: Backend> {
    exec: Executor<B>,
    link: Link,
    plan: ParallelPlan,
    /// Whether every stage is held twice, by ranks `r` and `pp - 1 - r` (DualPipe's two
    /// directions): their accumulators are summed before the update.
    copies: bool,
    /// The accumulators this rank's stage programs write, in name order.
    accumulators: Vec<String>,
    /// Where rank 0 writes each step's measured timeline (`kiln train --pp-trace`).
    trace: Option<std::path::PathBuf>,
    /// The (stage, phase) programs run so far in this step.
    started: std::collections::HashSet<(u32, Phase)>,
    programs: HashMap<(u32, Phase), StageProgram>,
    update: StageProgram,
    /// The update's gate, where a step the monitor rejects stops before it changes the model
    /// (the rank's stage programs write nothing but accumulators), and its states' copies.
    gate: Option<(Gate, Undo)>,
    /// The states of each rank's stages, by name: those its programs write.
    states_of_rank: Vec<Vec<String>>,
    /// The states each rank's programs read and no program writes (a router's bias without the
    /// bias rule): a checkpoint asks the first rank that holds one for it.
    read_only_of_rank: Vec<Vec<String>>,
    /// The weights this rank reads and another updates (the embedding the MTP module looks up), by
    /// the rank that updates them; and the weights this rank updates that others read, by reader.
    reads: Vec<(u32, Vec<String>)>,
    sends: Vec<(u32, Vec<String>)>,
    /// On rank 0, the other ranks' states as [`Steps::gather_for_checkpoint`] last gathered them
    /// (cleared by a step).
    gathered: HashMap<String, HostTensor>,
    /// The data-parallel replicas of the pipeline (`--dp`), whose micro-batches the update's sums
    /// count together.
    replicas: usize,
    /// Whether DualPipe's forward-and-backward pairs run interleaved (`KILN_NO_OVERLAP_PAIRS=1`
    /// runs them one after the other, to measure what the overlap gives).
    overlap_pairs: bool,
    /// The artifact's whole manifest (the executor holds this rank's programs and states alone).
    model: Manifest,
    /// The routers' selection biases this rank's update moves, which it reports to rank 0 after
    /// each step (the monitor's bias statistics are rank 0's).
    biases: Vec<String>,
    /// The whole shape of each state an update may split over the replicas (ZeRO-1): AdamW's
    /// moments and the master weights, which have their parameter's.
    whole: HashMap<String, Vec<u64>>,
    /// On rank 0 during a streamed checkpoint ([`Steps::stream_for_checkpoint`]): the rank that
    /// holds each state rank 0 does not, which it asks for each as the file needs it.
    remote: HashMap<String, u32>,
    /// On rank 0: a streamed checkpoint is under way, whose end the other ranks wait for.
    streaming: bool,
    /// On rank 0 during a streamed checkpoint whose tensors the caller asks of their holders
    /// itself ([`Steps::plan_checkpoint`]): heads in the shapes held, and nothing asked here.
    by_request: bool,
    /// On rank 0 during a streamed checkpoint: the state asked for ahead ([`Steps::prefetch`]),
    /// whose answer is on its way.
    prefetched: std::cell::RefCell<Option<String>>,
    /// This pipeline's index among the data-parallel replicas (`--dp`): the first one's ranks
    /// stream a checkpoint, and the others, holding the same states, have nothing to give.
    replica: usize,
    /// The link a streamed checkpoint's requests and tensors travel on (a communicator of its
    /// own, so that they never match a step's messages).
    checkpoint_link: Option<std::cell::RefCell<Link>>,
    /// The link to the replicas of this rank's stages (`--dp` with `--zero1`): the first
    /// replica's rank names each split state it gathers for a streamed checkpoint, and the others
    /// join that gather.
    replica_link: Option<std::cell::RefCell<Link>>,
}

/// What a span of the measured timeline ran: a whole instruction of the list, or a piece of an
/// overlapped pair.
#[derive(Clone, Copy, PartialEq)]
enum Piece {
    Whole = 0,
    Forward = 1,
    Backward = 2,
    Weight = 3,
}

/// One micro-batch's step inputs, by name.
type Feed = HashMap<String, HostTensor>;
/// What each (micro-batch, stage) keeps for its later programs or received for them, by name.
type Held = HashMap<(u32, u32), HashMap<String, HostTensor>>;

impl<B: Backend> PipelineTrainer<B> {
    /// Takes the executor of an artifact compiled with `--train --pp` (its weights bound at load),
    /// loaded with this rank's programs alone ([`runs`]), and the artifact's whole manifest.
    pub fn new(exec: Executor<B>, model: Manifest, link: Link) -> Result<PipelineTrainer<B>, RuntimeError> {
        let plan = model.parallel.clone().ok_or_else(|| {
            RuntimeError::BadOption("the artifact has no pipeline plan: compile it with --train --pp".into())
        })?;
        if plan.pp != link.size {
            return Err(RuntimeError::BadOption(format!(
                "the artifact's pipeline has {} ranks, and mpirun started {} processes: start {} (`mpirun -n {}`)",
                plan.pp, link.size, plan.pp, plan.pp
            )));
        }
        let stages = plan.stages.len();
        if stages > 0 && (plan.micro_batches as usize) * 3 * stages * stages >= REPORT_TAG as usize {
            return Err(RuntimeError::BadOption(format!(
                "{} micro-batches over {stages} stages need more message tags than MPI promises (32767)",
                plan.micro_batches
            )));
        }
        let copies = plan.lists.lanes.len() > 1;
        let describe = |name: &str| -> Result<StageProgram, RuntimeError> {
            Ok(StageProgram {
                name: name.to_string(),
                inputs: exec.inputs(name)?.into_iter().map(|(n, _)| n).collect(),
                outputs: exec.outputs(name)?,
            })
        };
        let mut programs = HashMap::new();
        for s in 0..stages as u32 {
            for phase in Phase::ALL {
                let name = cut::program_name(s, phase);
                if exec.has_program(&name) {
                    programs.insert((s, phase), describe(&name)?);
                }
            }
        }
        let update = describe(&cut::update_name(link.rank))?;
        // The update's gate holds only where the stage programs before it write nothing a
        // rejected step would have to undo but accumulators (which it zeroes).
        let stages_accumulate =
            (exec.manifest().programs.iter()).filter(|p| p.name.starts_with("stage.")).all(|p| {
                p.outputs.iter().all(|o| match &p.buffer(o.buffer).storage {
                    kiln_ir::artifact::Storage::State { name } => (exec.manifest().state(name))
                        .is_some_and(|s| s.role == kiln_ir::module::StateRole::GradientAccumulator),
                    _ => true,
                })
            });
        let gate = (exec.manifest().program(&update.name))
            .filter(|_| stages_accumulate)
            .and_then(|p| Gate::find(exec.manifest(), p))
            .map(|g| {
                let undo = g.undo_buffers();
                (g, undo)
            });
        // The states each program reads and writes, from the manifest (the executor lists the
        // caller's inputs and outputs only).
        let manifest = &model;
        let declared: std::collections::HashSet<&str> =
            manifest.states.iter().map(|s| s.name.as_str()).collect();
        let state_io = |name: &str, outputs: bool| -> Vec<String> {
            let Some(p) = manifest.programs.iter().find(|p| p.name == name) else { return Vec::new() };
            let list = if outputs { &p.outputs } else { &p.inputs };
            list.iter().map(|b| b.name.clone()).filter(|n| declared.contains(n.as_str())).collect()
        };
        let stage_programs = |r: &kiln_ir::artifact::RankEntry| -> Vec<String> {
            let names = r.stages.iter().flat_map(|&s| Phase::ALL.map(|ph| cut::program_name(s, ph)));
            names.chain([cut::update_name(r.rank)]).collect()
        };
        // Each rank's states: those its programs write; and those they only read, which no program
        // writes (a router's bias without the bias rule), held where they are read.
        let mut states_of_rank = Vec::new();
        let mut read_only_of_rank = Vec::new();
        for r in &plan.ranks {
            let mut names: Vec<String> = stage_programs(r).iter().flat_map(|p| state_io(p, true)).collect();
            names.sort();
            names.dedup();
            let mut read: Vec<String> = stage_programs(r).iter().flat_map(|p| state_io(p, false)).collect();
            read.sort();
            read.dedup();
            read_only_of_rank.push(read);
            states_of_rank.push(names);
        }
        for read in &mut read_only_of_rank {
            read.retain(|n| !states_of_rank.iter().any(|names| names.contains(n)));
        }
        // Who reads whose weights: a stage program's state input another rank writes.
        let owner = |name: &str| states_of_rank.iter().position(|names| names.iter().any(|n| n == name));
        let mut pairs: Vec<Read> = Vec::new();
        for r in &plan.ranks {
            for input in stage_programs(r).iter().flat_map(|p| state_io(p, false)) {
                if let Some(o) = owner(&input).filter(|&o| o as u32 != r.rank) {
                    pairs.push((r.rank, o as u32, input));
                }
            }
        }
        pairs.sort();
        pairs.dedup();
        let group = |key: &dyn Fn(&Read) -> Option<u32>| {
            let mut out: Vec<(u32, Vec<String>)> = Vec::new();
            for p in &pairs {
                let Some(k) = key(p) else { continue };
                match out.iter_mut().find(|(r, _)| *r == k) {
                    Some((_, names)) => names.push(p.2.clone()),
                    None => out.push((k, vec![p.2.clone()])),
                }
            }
            out
        };
        let me = link.rank;
        let reads = group(&|p| (p.0 == me).then_some(p.1));
        let sends = group(&|p| (p.1 == me).then_some(p.0));
        let mut accumulators: Vec<String> = (plan.ranks[me as usize].stages.iter())
            .flat_map(|&s| Phase::ALL.map(|ph| cut::program_name(s, ph)))
            .flat_map(|p| state_io(&p, true))
            .collect();
        accumulators.sort();
        accumulators.dedup();
        let mut whole = HashMap::new();
        for p in manifest.states.iter().filter(|s| s.role == kiln_ir::module::StateRole::Trainable) {
            let shape: Vec<u64> = p.shape.iter().filter_map(|d| d.as_known()).collect();
            for name in [format!("adam.m.{}", p.name), format!("adam.v.{}", p.name), master_of(&p.name)] {
                whole.insert(name, shape.clone());
            }
        }
        let biases = (states_of_rank[me as usize].iter())
            .filter(|n| {
                let role = manifest.states.iter().find(|s| &s.name == *n).map(|s| s.role);
                role == Some(kiln_ir::module::StateRole::RoutingBias)
            })
            .cloned()
            .collect();
        Ok(PipelineTrainer {
            model,
            biases,
            whole,
            accumulators,
            started: Default::default(),
            trace: None,
            reads,
            sends,
            exec,
            link,
            plan,
            copies,
            programs,
            update,
            gate,
            states_of_rank,
            read_only_of_rank,
            gathered: Default::default(),
            remote: Default::default(),
            streaming: false,
            by_request: false,
            prefetched: Default::default(),
            replica: 0,
            checkpoint_link: None,
            replica_link: None,
            replicas: 1,
            overlap_pairs: std::env::var_os("KILN_NO_OVERLAP_PAIRS").is_none_or(|v| v.is_empty() || v == "0"),
        })
    }

    /// This pipeline's index among the replicas (see [`PipelineTrainer::set_replicas`]).
    pub fn set_replica_index(&mut self, index: usize) {
        self.replica = index;
    }

    /// Whether this rank holds a shard of some state (ZeRO-1 over the replicas).
    fn holds_shards(&self) -> bool {
        self.exec.manifest().states.iter().any(|s| self.is_shard(s))
    }

    /// Whether this rank holds only a shard of its state `name` (ZeRO-1 over the replicas).
    fn holds_shard_of(&self, name: &str) -> bool {
        self.exec.manifest().states.iter().find(|s| s.name == name).is_some_and(|s| self.is_shard(s))
    }

    /// Whether state `s` of this rank is a shard of a larger whole.
    fn is_shard(&self, s: &kiln_ir::artifact::StateEntry) -> bool {
        self.whole.get(&s.name).is_some_and(|w| {
            let n: Option<u64> = s.shape.iter().map(|d| d.as_known()).product();
            n.is_some_and(|n| n != w.iter().product::<u64>())
        })
    }

    /// The link of streamed checkpoints ([`Steps::stream_for_checkpoint`]), on a communicator of
    /// the pipeline's ranks of its own.
    pub fn set_checkpoint_link(&mut self, link: Link) {
        self.checkpoint_link = Some(std::cell::RefCell::new(link));
    }

    /// The link to the replicas of this rank's stages, over which a streamed checkpoint's split
    /// states are gathered ([`Steps::stream_for_checkpoint`]); a communicator of their own.
    pub fn set_replica_link(&mut self, link: Link) {
        self.replica_link = Some(std::cell::RefCell::new(link));
    }

    /// The name, dtype and whole shape of state `name` of the model.
    fn head(&self, name: &str) -> Result<TensorHead, RuntimeError> {
        let s = (self.model.states.iter().find(|s| s.name == name))
            .ok_or_else(|| RuntimeError::BadOption(format!("the model has no state `{name}`")))?;
        // A gathered state is whole, and so is every state of a streamed checkpoint; one this
        // rank holds, its own shard or all of it.
        let whole = self.gathered.contains_key(name) || (self.streaming && !self.by_request);
        let shape = match (whole, self.whole.get(name)) {
            (true, Some(w)) => w.clone(),
            _ => (s.shape.iter().map(|d| d.as_known())).collect::<Option<Vec<u64>>>().ok_or_else(|| {
                RuntimeError::BadOption(format!("state `{name}` has a shape of unknown size"))
            })?,
        };
        Ok(TensorHead { name: name.to_string(), dtype: s.dtype, shape })
    }

    /// This pipeline is one of `n` data-parallel replicas (an artifact compiled with
    /// `--data-parallel` sums the update's accumulators over them).
    pub fn set_replicas(&mut self, n: usize) {
        self.replicas = n.max(1);
    }

    /// Writes each step's measured timeline to `path` (a Chrome trace) and beside it as SVG.
    pub fn set_trace(&mut self, path: Option<&std::path::Path>) {
        self.trace = path.map(std::path::Path::to_path_buf);
    }

    /// The executor, to set its communicator.
    pub fn executor_mut(&mut self) -> &mut Executor<B> {
        &mut self.exec
    }

    /// A state as last gathered, or this process's copy.
    fn read(&self, name: &str) -> Result<HostTensor, RuntimeError> {
        match self.gathered.get(name) {
            Some(t) => Ok(t.clone()),
            None => self.exec.read_state(name),
        }
    }

    /// Whether this process holds state `name`: its stages' own, or one gathered from a rank.
    fn held(&self, name: &str) -> bool {
        self.gathered.contains_key(name) || self.exec.manifest().states.iter().any(|s| s.name == name)
    }

    /// Bytes of the states this rank allocated, and of all the model's states.
    pub fn held_state_bytes(&self) -> (u64, u64) {
        let max = self.exec.max_sizes();
        let bytes = |m: &Manifest| -> u64 {
            (m.states.iter()).map(|s| kiln_ir::artifact::bytes_of(s.dtype, &s.shape, &max).unwrap_or(0)).sum()
        };
        (bytes(self.exec.manifest()), bytes(&self.model))
    }

    /// Writes the step's measured timeline: a Chrome/Perfetto trace at `path` and the SVG drawing
    /// (`path` with the extension `svg`), as `kiln schedule` draws a simulated one, times in
    /// milliseconds from the step's first compute step.
    fn write_timeline(
        &self,
        path: &std::path::Path,
        spans: &[(u32, HostTensor)],
    ) -> Result<(), RuntimeError> {
        use kiln_compiler::schedule::simulate::{Event, RankReport};
        use kiln_ir::schedule::Rank;
        let s = &self.plan.lists;
        let mut events = Vec::new();
        for (r, t) in spans {
            let HostData::I64(v) = &t.data else { continue };
            for e in v.chunks_exact(4) {
                let listed = s.ranks[*r as usize][e[0] as usize];
                // A pair's pieces drawn as what each ran: its forward, its backward for inputs
                // (interleaved with the forward) and its backward for weights.
                let instr = match (listed, e[1]) {
                    (Instr::ForwardBackward { forward, .. }, 1) => Instr::Forward(forward),
                    (Instr::ForwardBackward { backward, .. }, 2) => Instr::BackwardInput(backward),
                    (Instr::ForwardBackward { backward, .. }, 3) => Instr::Weight(backward),
                    (i, _) => i,
                };
                events.push((*r, e[0] as usize, instr, e[2], e[3]));
            }
        }
        let origin = events.iter().map(|e| e.3).min().unwrap_or(0);
        let ms = |t: i64| (t - origin) as f64 / 1000.0;
        let events: Vec<Event> = (events.into_iter())
            .map(|(r, index, instr, a, b)| Event { rank: Rank(r), index, instr, start: ms(a), end: ms(b) })
            .collect();
        let makespan = events.iter().map(|e| e.end).fold(0.0, f64::max);
        let ranks: Vec<RankReport> = (0..s.pp)
            .map(|r| {
                let mine = events.iter().filter(|e| e.rank.0 == r);
                let busy: f64 = mine.clone().map(|e| e.end - e.start).sum();
                RankReport {
                    rank: Rank(r),
                    busy,
                    bubble: makespan - busy,
                    first_start: mine.clone().map(|e| e.start).fold(f64::INFINITY, f64::min),
                    last_end: mine.map(|e| e.end).fold(0.0, f64::max),
                    peak_activations: 0,
                    parameter_copies: s.parameter_copies(Rank(r)),
                }
            })
            .collect();
        let bubble = ranks.iter().map(|r| r.bubble).fold(0.0, f64::max);
        let sim = kiln_compiler::schedule::Simulation { events, ranks, makespan };
        let title = format!(
            "{}, measured · {} ranks · {} micro-batches · step {:.1} ms · largest idle time of a rank {:.1} ms ({:.0}%)",
            s.name,
            s.pp,
            s.micro_batches,
            makespan,
            bubble,
            100.0 * bubble / makespan.max(f64::MIN_POSITIVE)
        );
        let io = |e: kiln_ir::output::OutputError| RuntimeError::BadOption(e.to_string());
        let trace = crate::schedule::trace(s, &sim).to_string();
        kiln_ir::output::write_file(path, trace.as_bytes()).map_err(io)?;
        let svg = crate::schedule::svg_titled(s, &sim, &title);
        kiln_ir::output::write_file(&path.with_extension("svg"), svg.as_bytes()).map_err(io)?;
        Ok(())
    }

    /// DualPipe: adds the accumulators of the partner rank (`pp - 1 - r`, which holds the same
    /// stages for the other direction) to this rank's, so both make the same update. `a + b` on
    /// one and `b + a` on the other are the same floats.
    fn sum_copies(&mut self) -> Result<(), RuntimeError> {
        let me = self.link.rank;
        let partner = self.plan.pp - 1 - me;
        if partner == me {
            return Ok(());
        }
        // One accumulator at a time, both ranks in name order: a stage's gradients as one
        // message may pass MPI's 2^31 elements, and one at a time holds one copy of each. The
        // values travel as their bytes, and the sum is made in place in this rank's copy: each
        // accumulator is read once, sent once, received once and written back once.
        let names = self.accumulators.clone();
        let mut mine = Vec::new();
        for n in &names {
            let (dtype, _) = self.exec.state_type(n)?;
            if dtype != DType::F32 {
                return Err(RuntimeError::BadOption(format!("accumulator `{n}` is {dtype}, not f32")));
            }
            self.exec.copy_state(n, &mut mine)?;
            // Room for the send time `Link::send` appends, so that it does not copy again.
            let mut out = Vec::with_capacity(mine.len() + 8);
            out.extend_from_slice(&mine);
            self.link.send(partner, COPIES_TAG, out);
            let theirs = self.link.recv(partner, COPIES_TAG, &format!("rank {partner}'s gradient `{n}`"));
            if theirs.len() != mine.len() {
                return Err(RuntimeError::BadOption(format!(
                    "rank {partner} sent {} bytes for `{n}`, which holds {} (a kiln bug; please report it)",
                    theirs.len(),
                    mine.len()
                )));
            }
            add_f32_bytes(&mut mine, &theirs);
            self.exec.restore_state(n, &mine)?;
            self.link.flush();
        }
        Ok(())
    }

    /// The rank that runs `stage` for micro-batch `mb`: its lane's slot.
    fn rank_at(&self, mb: u32, stage: u32) -> u32 {
        let lanes = &self.plan.lists;
        lanes.lanes[lanes.lane_of[mb as usize] as usize][stage as usize].rank.0
    }

    fn tag(&self, mb: u32, phase: Phase, from: u32, to: u32) -> i32 {
        let s = self.plan.stages.len() as u32;
        let p = Phase::ALL.iter().position(|&x| x == phase).expect("a phase") as u32;
        (((mb * 3 + p) * s + from) * s + to) as i32
    }

    /// Runs `stage`'s `phase` program on micro-batch `mb`, if the stage has one.
    fn run_part(
        &mut self,
        mb: u32,
        stage: u32,
        phase: Phase,
        feeds: &[Feed],
        held: &mut Held,
    ) -> Result<(), RuntimeError> {
        let Some((name, given)) = self.inputs_of(mb, stage, phase, feeds, held)? else { return Ok(()) };
        self.exec.run(&name, &given)?;
        self.outputs_of(mb, stage, phase, held)
    }

    /// DualPipe's overlapped pair: the forward of `f` and the backward of `b` (micro-batch and
    /// stage each) run interleaved, so that one's expert-parallel all-to-alls travel under the
    /// other's compute (`Executor::run_pair`; both inputs received first, both outputs sent after,
    /// as in DeepSeek's reference), then the backward's weight gradients. With
    /// `KILN_NO_OVERLAP_PAIRS=1`, or where one of them has no program, they run one after the other.
    ///
    /// Returns the pieces it ran, for the measured timeline: each a [`Piece`] kind and its wall
    /// clock span in microseconds (receiving and sending between them are not in any piece).
    fn run_pair(
        &mut self,
        f: (u32, u32),
        b: (u32, u32),
        feeds: &[Feed],
        held: &mut Held,
    ) -> Result<Vec<[i64; 3]>, RuntimeError> {
        let mut pieces = Vec::new();
        fn timed(
            pieces: &mut Vec<[i64; 3]>,
            kind: Piece,
            run: impl FnOnce() -> Result<(), RuntimeError>,
        ) -> Result<(), RuntimeError> {
            let start = wall_us() as i64;
            run()?;
            pieces.push([kind as i64, start, wall_us() as i64]);
            Ok(())
        }
        if !self.overlap_pairs {
            timed(&mut pieces, Piece::Forward, || self.run_part(f.0, f.1, Phase::Forward, feeds, held))?;
            timed(&mut pieces, Piece::Backward, || self.run_part(b.0, b.1, Phase::Backward, feeds, held))?;
            timed(&mut pieces, Piece::Weight, || self.run_part(b.0, b.1, Phase::Weight, feeds, held))?;
            return Ok(pieces);
        }
        let fi = self.inputs_of(f.0, f.1, Phase::Forward, feeds, held)?;
        let bi = self.inputs_of(b.0, b.1, Phase::Backward, feeds, held)?;
        match (fi, bi) {
            (Some((fname, fgiven)), Some((bname, bgiven))) => {
                let start = wall_us() as i64;
                self.exec.run_pair((&fname, &fgiven), (&bname, &bgiven))?;
                for &(which, a, z) in self.exec.pair_pieces() {
                    let kind = if which == 0 { Piece::Forward } else { Piece::Backward };
                    pieces.push([kind as i64, start + (a / 1000) as i64, start + (z / 1000) as i64]);
                }
                self.outputs_of(f.0, f.1, Phase::Forward, held)?;
                self.outputs_of(b.0, b.1, Phase::Backward, held)?;
            }
            (fi, bi) => {
                for ((name, given), (mb, stage, phase)) in
                    (fi.into_iter().map(|x| (x, (f.0, f.1, Phase::Forward))))
                        .chain(bi.into_iter().map(|x| (x, (b.0, b.1, Phase::Backward))))
                {
                    let kind = if phase == Phase::Forward { Piece::Forward } else { Piece::Backward };
                    timed(&mut pieces, kind, || self.exec.run(&name, &given).map(|_| ()))?;
                    self.outputs_of(mb, stage, phase, held)?;
                }
            }
        }
        timed(&mut pieces, Piece::Weight, || self.run_part(b.0, b.1, Phase::Weight, feeds, held))?;
        Ok(pieces)
    }

    /// The program `stage` runs in `phase` and its inputs for micro-batch `mb`: from the step's
    /// feeds, what the stage kept, and what other stages send (received here); `None` if the stage
    /// has no program for the phase.
    fn inputs_of(
        &mut self,
        mb: u32,
        stage: u32,
        phase: Phase,
        feeds: &[Feed],
        held: &mut Held,
    ) -> Result<Option<(String, Vec<HostTensor>)>, RuntimeError> {
        let Some(p) = self.programs.get(&(stage, phase)) else { return Ok(None) };
        let (name, inputs) = (p.name.clone(), p.inputs.clone());
        let mut given = Vec::with_capacity(inputs.len());
        // Each accumulator starts its sum on the first micro-batch its program runs in the step
        // (in DualPipe's reverse direction, not micro-batch 0).
        let first = self.started.insert((stage, phase));
        for input in &inputs {
            if input == ACCUMULATE_KEEP {
                given.push(scalar(ACCUMULATE_KEEP, if first { 0.0 } else { 1.0 }));
                continue;
            }
            if let Some(t) = feeds[mb as usize].get(input) {
                given.push(t.clone());
                continue;
            }
            if !held.get(&(mb, stage)).is_some_and(|h| h.contains_key(input)) {
                let Some((from_phase, from, _)) = cut::parse_sent(input) else {
                    return Err(RuntimeError::BadOption(format!(
                        "{name}: input `{input}` of micro-batch {mb} was never made (a kiln bug; please report it)"
                    )));
                };
                let tag = self.tag(mb, from_phase, from, stage);
                let what = format!(
                    "stage {from}'s {} of micro-batch {mb} (rank {})",
                    if from_phase == Phase::Forward { "activations" } else { "gradients" },
                    self.rank_at(mb, from)
                );
                let bytes = self.link.recv(self.rank_at(mb, from), tag, &what);
                let h = held.entry((mb, stage)).or_default();
                for t in decode(&bytes)? {
                    // A re-checked step: a value that arrives non-finite came so from another
                    // rank, which finds where; this rank's first is the receive.
                    if let HostData::F32(v) = &t.data {
                        let count = v.iter().filter(|x| !x.is_finite()).count();
                        if count > 0 {
                            self.exec.note_non_finite(NonFinite {
                                program: name.clone(),
                                op: format!("{what}, as received"),
                                scope: None,
                                value: t.name.clone(),
                                count,
                            });
                        }
                    }
                    h.insert(t.name.clone(), t);
                }
            }
            let t = held.get(&(mb, stage)).and_then(|h| h.get(input)).ok_or_else(|| {
                RuntimeError::BadOption(format!(
                    "{name}: stage input `{input}` did not come (a kiln bug; please report it)"
                ))
            })?;
            given.push(t.clone());
        }
        Ok(Some((name, given)))
    }

    /// After `stage`'s `phase` program has run on micro-batch `mb`: keeps what the stage saves for
    /// later, and sends what other stages read (or keeps it, for a stage of this rank).
    fn outputs_of(&mut self, mb: u32, stage: u32, phase: Phase, held: &mut Held) -> Result<(), RuntimeError> {
        let Some(p) = self.programs.get(&(stage, phase)) else { return Ok(()) };
        let (name, outputs) = (p.name.clone(), p.outputs.clone());
        let mut out_by_stage: HashMap<u32, Vec<HostTensor>> = HashMap::new();
        for o in &outputs {
            if o.starts_with(cut::SAVED_PREFIX) {
                let t = self.exec.output_of(&name, o)?;
                held.entry((mb, stage)).or_default().insert(o.clone(), t);
            } else if let Some((_, _, to)) = cut::parse_sent(o) {
                out_by_stage.entry(to).or_default().push(self.exec.output_of(&name, o)?);
            }
        }
        let mut targets: Vec<u32> = out_by_stage.keys().copied().collect();
        targets.sort();
        for to in targets {
            let tensors = out_by_stage.remove(&to).expect("a key");
            let rank = self.rank_at(mb, to);
            if rank == self.link.rank {
                let h = held.entry((mb, to)).or_default();
                for t in tensors {
                    h.insert(t.name.clone(), t);
                }
            } else {
                let tag = self.tag(mb, phase, stage, to);
                self.link.send(rank, tag, encode(&tensors));
            }
        }
        // The stage's last program of the micro-batch: what it kept is no longer needed.
        let last = Phase::ALL.iter().rev().find(|&&ph| self.programs.contains_key(&(stage, ph)));
        if last == Some(&phase) {
            held.remove(&(mb, stage));
        }
        Ok(())
    }

    /// One step; with `go`, the update asks it at its gate ([`Steps::step_gated`]). Returns the
    /// step's figures and whether its update was applied.
    fn step_all(
        &mut self,
        rows: &TokenRows,
        lr: f32,
        go: Option<Verdict>,
    ) -> Result<(StepStats, bool), RuntimeError> {
        let m = self.plan.micro_batches as usize;
        let parts = split(rows, m)?;
        let mut names: Vec<String> = self.programs.values().flat_map(|p| p.inputs.iter().cloned()).collect();
        names.sort();
        names.dedup();
        let mut feeds = Vec::with_capacity(m);
        for part in &parts {
            let f: HashMap<String, HostTensor> =
                step_inputs(&names, part, lr)?.into_iter().map(|t| (t.name.clone(), t)).collect();
            feeds.push(f);
        }
        self.started.clear();
        let mut held = HashMap::new();
        let rank = self.link.rank as usize;
        let chunks: Vec<u32> = self.plan.ranks[rank].stages.clone();
        let list = self.plan.lists.ranks[rank].clone();
        // Each compute step's wall-clock spans: (index in the list, piece, start, end), in
        // microseconds; a pair's pieces one by one.
        let mut spans: Vec<i64> = Vec::new();
        for (index, instr) in list.iter().enumerate() {
            let stage = |w: &Work| chunks[w.chunk.0 as usize];
            let start = wall_us();
            match instr {
                Instr::Forward(w) => self.run_part(w.mb.0, stage(w), Phase::Forward, &feeds, &mut held)?,
                Instr::BackwardInput(w) => {
                    self.run_part(w.mb.0, stage(w), Phase::Backward, &feeds, &mut held)?
                }
                Instr::Weight(w) => self.run_part(w.mb.0, stage(w), Phase::Weight, &feeds, &mut held)?,
                Instr::Backward(w) => {
                    self.run_part(w.mb.0, stage(w), Phase::Backward, &feeds, &mut held)?;
                    self.run_part(w.mb.0, stage(w), Phase::Weight, &feeds, &mut held)?;
                }
                Instr::ForwardBackward { forward, backward } => {
                    let (f, b) = ((forward.mb.0, stage(forward)), (backward.mb.0, stage(backward)));
                    for [kind, a, z] in self.run_pair(f, b, &feeds, &mut held)? {
                        spans.extend([index as i64, kind, a, z]);
                    }
                    continue;
                }
                // Data moves when it is made and when it is needed (above).
                Instr::SendActivation(_)
                | Instr::RecvActivation(_)
                | Instr::SendGradient(_)
                | Instr::RecvGradient(_) => {}
            }
            if instr.is_compute() {
                spans.extend([index as i64, Piece::Whole as i64, start as i64, wall_us() as i64]);
            }
        }
        self.link.flush();
        if !held.is_empty() {
            return Err(RuntimeError::BadOption(
                "a pipeline step ended with micro-batches whose backward never ran (a kiln bug; please report it)"
                    .into(),
            ));
        }
        if self.copies {
            self.sum_copies()?;
        }
        let mut feeds = vec![scalar(MICRO_BATCHES, (m * self.replicas) as f32), scalar("lr", lr)];
        feeds.extend(kiln_runtime::train::rank_inputs(self.exec.communicator()));
        feeds.retain(|t| self.update.inputs.contains(&t.name));
        let name = self.update.name.clone();
        let applied = match (go, &mut self.gate) {
            (Some(go), Some((gate, undo))) => gate.run(undo, &mut self.exec, &name, &feeds, false, go)?.0,
            _ => {
                self.exec.run(&name, &feeds)?;
                true
            }
        };
        let mut outputs: Vec<(String, Vec<f32>)> = Vec::new();
        for o in &self.update.outputs {
            let wanted =
                o == "loss" || o == "grad_norm" || o.starts_with("load.") || o.starts_with("grad_norm.");
            let made = applied || self.gate.as_ref().is_some_and(|(g, _)| g.made(o));
            if wanted && made {
                outputs.push((o.clone(), f32s(self.exec.output(o)?)));
            }
        }
        // The updated weights other ranks read, to them; those this rank reads, from their owners.
        // A message per weight, in the lists' order (DeepSeek-V3's embedding alone is 3.7 GB in
        // f32, past what one MPI message holds). A step stopped at its gate (on every rank alike)
        // updated none.
        let (sends, reads) = match applied {
            true => (self.sends.clone(), self.reads.clone()),
            false => (Vec::new(), Vec::new()),
        };
        for (to, names) in sends {
            for n in &names {
                let t = self.exec.read_state(n)?;
                self.link.send(to, WEIGHTS_TAG, encode(&[t]));
            }
        }
        for (from, names) in reads {
            for n in &names {
                let bytes = self.link.recv(from, WEIGHTS_TAG, &format!("rank {from}'s updated weight `{n}`"));
                for t in decode(&bytes)? {
                    self.exec.write_state(&t)?;
                }
            }
        }
        self.link.flush();
        // Rank 0 reports the step: the other ranks' loads and layer norms join its own.
        let spans = HostTensor {
            name: SPANS.into(),
            dtype: DType::I64,
            shape: vec![spans.len() as u64],
            data: HostData::I64(spans),
        };
        if rank == 0 {
            let mut all_spans = vec![(0u32, spans)];
            for r in 1..self.link.size {
                let bytes = self.link.recv(r, REPORT_TAG, &format!("rank {r}'s report of the step"));
                for t in decode(&bytes)? {
                    if t.name == SPANS {
                        all_spans.push((r, t));
                    } else if let Some(name) = t.name.strip_prefix(STATE_PREFIX) {
                        // The rank's routers' biases, as it moved them: the monitor reads them here.
                        let name = name.to_string();
                        self.gathered.insert(name.clone(), HostTensor { name, ..t });
                    } else if t.name != "loss" && t.name != "grad_norm" {
                        outputs.push((t.name.clone(), f32s(t)));
                    }
                }
            }
            if let Some(path) = &self.trace {
                self.write_timeline(path, &all_spans)?;
            }
        } else {
            let mut tensors: Vec<HostTensor> = (outputs.iter())
                .map(|(n, v)| HostTensor {
                    name: n.clone(),
                    dtype: DType::F32,
                    shape: vec![v.len() as u64],
                    data: HostData::F32(v.clone()),
                })
                .collect();
            tensors.push(spans);
            for name in &self.biases {
                let t = self.exec.read_state(name)?;
                tensors.push(HostTensor { name: format!("{STATE_PREFIX}{name}"), ..t });
            }
            self.link.send(0, REPORT_TAG, encode(&tensors));
            self.link.flush();
        }
        Ok((stats(outputs.iter().map(|(n, v)| (n.as_str(), v.clone()))), applied))
    }
}

impl<B: Backend> PipelineTrainer<B> {
    /// Rank 0, before a streamed checkpoint: which rank holds each state it does not (every rank
    /// knows every rank's stages).
    fn map_remote(&mut self) {
        self.streaming = true;
        self.remote.clear();
        // The writer of each state, else a rank that reads it.
        let holders = self.states_of_rank.iter().enumerate().chain(self.read_only_of_rank.iter().enumerate());
        for (r, names) in holders.filter(|(r, _)| *r > 0) {
            for n in names {
                if !self.held(n) && !self.remote.contains_key(n) {
                    self.remote.insert(n.clone(), r as u32);
                }
            }
        }
    }

    /// State `name` whole for a streamed checkpoint, on the first replica: where it is split over
    /// the replicas, they are told its name first, so that they join its gather
    /// ([`Steps::stream_for_checkpoint`]).
    fn checkpoint_state(&self, name: &str) -> Result<HostTensor, RuntimeError> {
        if !self.holds_shard_of(name) || self.gathered.contains_key(name) {
            return self.read(name);
        }
        let link = self.replica_link.as_ref().ok_or_else(|| {
            RuntimeError::BadOption(format!("state `{name}` is split, and this process has no replicas"))
        })?;
        link.borrow_mut().tell_all(name);
        self.whole_state(name)
    }

    /// The first replica's rank, once its part of a streamed checkpoint is done: its replicas
    /// stop waiting for split states to gather.
    fn replicas_done(&self) {
        if let (Some(link), true) = (&self.replica_link, self.holds_shards()) {
            link.borrow_mut().tell_all("");
        }
    }

    /// State `name` whole: this process's, or, split over the replicas (ZeRO-1: it holds `m` of
    /// the `n` values), every replica's shard gathered, the padding dropped and the shape restored.
    fn whole_state(&self, name: &str) -> Result<HostTensor, RuntimeError> {
        let t = self.exec.read_state(name)?;
        let Some(shape) = self.whole.get(name) else { return Ok(t) };
        let n = shape.iter().product::<u64>() as usize;
        let HostData::F32(mine) = &t.data else { return Ok(t) };
        if mine.len() >= n {
            return Ok(t);
        }
        let comm = self.exec.communicator().ok_or_else(|| {
            RuntimeError::BadOption(format!("state `{name}` is split, and this process has no replicas"))
        })?;
        // A routed expert's state is split over the processes holding the expert (`--ep`), any
        // other over every replica of the stage.
        let group = match comm.rank_in(EDP_GROUP).is_some() && kiln_ir::module::expert_mark(name).is_some() {
            true => EDP_GROUP,
            false => DP_GROUP,
        };
        let mut all = comm.start_all_gather(group, mine.clone())?.wait()?;
        if all.len() < n {
            return Err(RuntimeError::BadOption(format!(
                "state `{name}`: the replicas' shards hold {} values, fewer than its {n}",
                all.len()
            )));
        }
        all.truncate(n);
        Ok(HostTensor { shape: shape.clone(), data: HostData::F32(all), ..t })
    }
}

/// Whether pipeline rank `rank` of `plan` runs program `name`: a stage program of one of its
/// stages, or its update.
pub fn runs(plan: &ParallelPlan, rank: u32, name: &str) -> bool {
    let Some(r) = plan.ranks.iter().find(|r| r.rank == rank) else { return false };
    let stage = r.stages.iter().any(|&s| Phase::ALL.iter().any(|&ph| cut::program_name(s, ph) == name));
    stage || cut::update_name(rank) == name
}

fn scalar(name: &str, v: f32) -> HostTensor {
    HostTensor { name: name.into(), dtype: DType::F32, shape: Vec::new(), data: HostData::F32(vec![v]) }
}

fn f32s(t: HostTensor) -> Vec<f32> {
    match t.data {
        HostData::F32(v) => v,
        HostData::I64(v) => v.into_iter().map(|x| x as f32).collect(),
    }
}

impl<B: Backend> Steps for PipelineTrainer<B> {
    fn step(&mut self, rows: &TokenRows, lr: f32) -> Result<StepStats, RuntimeError> {
        self.gathered.clear();
        Ok(self.step_all(rows, lr, None)?.0)
    }

    fn gated(&self) -> bool {
        self.gate.is_some()
    }

    /// Every rank's update asks `go` at its gate: the loss and the gradient norm it sees are
    /// summed over the pipeline's ranks, so each asks with the same figures. With `check`, each
    /// rank checks every launch of its stages and of its update up to the gate, and finds the
    /// first non-finite value of its own part ([`Steps::step_checked`]).
    fn step_gated(
        &mut self,
        rows: &TokenRows,
        lr: f32,
        check: bool,
        go: Verdict,
    ) -> Result<Gated, RuntimeError> {
        if self.gate.is_none() {
            if check {
                return self.step_checked(rows, lr).map(|(stats, found)| Gated {
                    stats,
                    applied: true,
                    found,
                });
            }
            return Err(RuntimeError::BadOption(format!(
                "program `{}` writes weights or moments before its loss and gradient norm are known: it has \
                 no gate to stop at",
                self.update.name
            )));
        }
        self.gathered.clear();
        self.exec.watching(check);
        let ran = self.step_all(rows, lr, Some(go));
        let found = self.exec.watching(false).filter(|_| check);
        let (stats, applied) = ran?;
        Ok(Gated { stats, applied, found })
    }

    /// Writes NaN into the results of the first launch in scope `scope` of the forward program
    /// of this rank's stage that has one. A rank whose stages have none does nothing, so long as
    /// another rank's does: a scope no stage has is refused, naming the scopes there are.
    fn set_poison(&mut self, scope: Option<&str>) -> Result<(), RuntimeError> {
        let Some(scope) = scope else { return self.exec.set_poison(None) };
        let in_scope = |p: &kiln_ir::artifact::Program| {
            p.steps.iter().any(|s| matches!(s, Step::Launch { scope: Some(x), .. } if x == scope))
        };
        let forward = |p: &&kiln_ir::artifact::Program| {
            p.name.starts_with("stage.") && p.name.ends_with(&format!(".{}", Phase::Forward.word()))
        };
        let mut mine: Vec<(u32, &StageProgram)> = (self.programs.iter())
            .filter(|((_, phase), _)| *phase == Phase::Forward)
            .map(|(&(s, _), p)| (s, p))
            .collect();
        mine.sort_by_key(|&(s, _)| s);
        for (_, p) in mine {
            if self.model.programs.iter().any(|m| m.name == p.name && in_scope(m)) {
                let name = p.name.clone();
                return self.exec.set_poison(Some((&name, scope)));
            }
        }
        if self.model.programs.iter().filter(forward).any(in_scope) {
            return self.exec.set_poison(None);
        }
        let mut known: Vec<&str> = (self.model.programs.iter().filter(forward))
            .flat_map(|p| p.steps.iter())
            .filter_map(|s| match s {
                Step::Launch { scope: Some(x), .. } => Some(x.as_str()),
                _ => None,
            })
            .collect();
        known.sort();
        known.dedup();
        Err(RuntimeError::BadOption(format!(
            "no launch of the pipeline's forward programs is in scope `{scope}`; their scopes: {}",
            known.join(", ")
        )))
    }

    fn take_comm_stats(&mut self) -> CommStats {
        let mut stats = self.exec.take_comm_stats();
        stats.add(&self.link.take_stats());
        stats
    }

    /// This process's copy of every trained weight and bias: rank 0's is whole after
    /// [`Steps::gather_for_checkpoint`] (which every rank calls before a checkpoint).
    fn weights(&self) -> Result<Vec<HostTensor>, RuntimeError> {
        let trained = self.model.states.iter().filter(|s| {
            matches!(s.role, kiln_ir::module::StateRole::Trainable | kiln_ir::module::StateRole::RoutingBias)
        });
        trained.filter(|s| self.held(&s.name)).map(|s| self.read(&s.name)).collect()
    }

    /// The states kept besides the weights: this process's (the whole model's on rank 0 after
    /// [`Steps::gather_for_checkpoint`]).
    fn states(&self) -> Result<Vec<HostTensor>, RuntimeError> {
        let kept = self.model.states.iter().filter(|s| kiln_runtime::train::kept(s.role));
        kept.filter(|s| self.held(&s.name)).map(|s| self.read(&s.name)).collect()
    }

    fn holds(&self, name: &str) -> bool {
        self.held(name)
    }

    /// Rank 0 learns which rank holds each state it does not (every rank knows every rank's
    /// stages); each other rank serves rank 0's requests, one state at a time, until rank 0 says
    /// the checkpoint is written ([`Steps::checkpoint_written`]). Nothing is gathered: rank 0 holds
    /// one state of another rank at a time. The first replica's ranks do this. The other replicas
    /// hold the same states, and give nothing unless the replicas split them (ZeRO-1): then each
    /// rank of the first replica names each split state it is about to make whole, and that rank's
    /// replicas join the gather ([`PipelineTrainer::checkpoint_state`]), so that no process holds
    /// more than one state whole.
    fn stream_for_checkpoint(&mut self) -> Result<(), RuntimeError> {
        if self.checkpoint_link.is_none() {
            return Err(RuntimeError::BadOption(
                "internal: a pipeline checkpoint without its link (`set_checkpoint_link`)".into(),
            ));
        }
        let shards = self.holds_shards();
        if shards && self.replica_link.is_none() {
            return Err(RuntimeError::BadOption(
                "internal: this pipeline rank holds split states, and no link to its replicas".into(),
            ));
        }
        if self.replica != 0 {
            // The first replica writes; this one joins the gathers of its split states.
            if shards {
                let link = self.replica_link.as_ref().expect("checked above");
                let mut link = link.borrow_mut();
                while let Some(name) =
                    link.next_request("the first replica's split state for a checkpoint")?
                {
                    self.whole_state(&name)?;
                }
            }
            return Ok(());
        }
        let rank = self.link.rank;
        if rank == 0 {
            self.map_remote();
            return Ok(());
        }
        let link = self.checkpoint_link.as_ref().expect("checked above");
        link.borrow_mut().serve_states(|name| self.checkpoint_state(name))?;
        self.replicas_done();
        Ok(())
    }

    fn plan_checkpoint(&mut self) -> Result<(), RuntimeError> {
        if self.link.rank == 0 && self.replica == 0 {
            self.map_remote();
            self.by_request = true;
        }
        Ok(())
    }

    fn checkpoint_written(&mut self) -> Result<(), RuntimeError> {
        if !self.streaming {
            return Ok(());
        }
        if self.by_request {
            // The caller asked the other processes and told them it is done.
            (self.streaming, self.by_request) = (false, false);
            self.remote.clear();
            return Ok(());
        }
        // Every other rank serves until told, even one that held nothing rank 0 lacked
        // (DualPipe's ranks hold two stages each). An answer asked for ahead and not taken is
        // taken first.
        let link = self.checkpoint_link.as_ref().expect("a streamed checkpoint has its link");
        let mut link = link.borrow_mut();
        if let Some(p) = self.prefetched.borrow_mut().take() {
            link.take_state(self.remote[&p], &p)?;
        }
        self.streaming = false;
        self.remote.clear();
        link.states_served();
        self.replicas_done();
        Ok(())
    }

    fn checkpoint_source(&self, name: &str) -> u32 {
        self.remote.get(name).copied().unwrap_or(self.link.rank)
    }

    /// Rank 0 during a streamed checkpoint: its own states' heads and those the other ranks hold,
    /// in the model's order; otherwise this process's.
    fn heads(&self) -> Result<(Vec<TensorHead>, Vec<TensorHead>), RuntimeError> {
        use kiln_ir::module::StateRole;
        let (mut weights, mut kept) = (Vec::new(), Vec::new());
        for s in &self.model.states {
            if !(self.held(&s.name) || self.remote.contains_key(&s.name)) {
                continue;
            }
            match s.role {
                StateRole::Trainable | StateRole::RoutingBias => weights.push(self.head(&s.name)?),
                r if kiln_runtime::train::kept(r) => kept.push(self.head(&s.name)?),
                _ => {}
            }
        }
        Ok((weights, kept))
    }

    /// A state this process holds, or, on rank 0 during a streamed checkpoint, one another rank
    /// holds, asked of it.
    fn tensor(&self, name: &str) -> Result<HostTensor, RuntimeError> {
        let Some(&r) = self.remote.get(name) else {
            return match self.streaming && !self.by_request {
                true => self.checkpoint_state(name),
                false => self.read(name),
            };
        };
        if self.by_request {
            return Err(RuntimeError::BadOption(format!(
                "internal: state `{name}` is rank {r}'s, which the checkpoint asks for itself"
            )));
        }
        let link = self.checkpoint_link.as_ref().expect("a streamed checkpoint has its link");
        let mut link = link.borrow_mut();
        match self.prefetched.borrow_mut().take() {
            Some(p) if p == name => return link.take_state(r, name),
            // Asked ahead but not wanted after all: its answer is taken and dropped.
            Some(p) => drop(link.take_state(self.remote[&p], &p)?),
            None => {}
        }
        link.ask_for_state(r, name)
    }

    fn prefetch(&self, name: &str) -> Result<(), RuntimeError> {
        let Some(&r) = self.remote.get(name).filter(|_| self.streaming && !self.by_request) else {
            return Ok(());
        };
        let mut prefetched = self.prefetched.borrow_mut();
        if prefetched.is_none() {
            let link = self.checkpoint_link.as_ref().expect("a streamed checkpoint has its link");
            link.borrow_mut().tell(&[r], name);
            *prefetched = Some(name.to_string());
        }
        Ok(())
    }

    fn set_state(&mut self, value: HostTensor) -> Result<(), RuntimeError> {
        self.gathered.remove(&value.name);
        self.exec.write_state(&value)
    }

    fn zero_accumulators(&mut self) -> Result<(), RuntimeError> {
        self.exec.zero_accumulators()
    }

    /// Puts back this rank's own states. A copy taken on rank 0 also holds the other ranks'
    /// routers' biases it gathered for the monitor's report, which those ranks put back
    /// themselves (rank 0 has no storage for them).
    fn restore(&mut self, from: &kiln_runtime::train::Saved) -> Result<(), RuntimeError> {
        for v in self.saved_tensors(from)? {
            if self.exec.manifest().state(&v.name).is_some() {
                self.set_state(v)?;
            }
        }
        self.zero_accumulators()
    }

    fn state(&self, name: &str) -> Result<HostTensor, RuntimeError> {
        self.read(name)
    }

    /// [`Steps::step`], each rank checking every launch of its stages and its update: the first
    /// non-finite value of this rank's part.
    fn step_checked(
        &mut self,
        rows: &TokenRows,
        lr: f32,
    ) -> Result<(StepStats, Option<NonFinite>), RuntimeError> {
        self.gathered.clear();
        self.exec.watching(true);
        let ran = self.step_all(rows, lr, None);
        let found = self.exec.watching(false);
        Ok((ran?.0, found))
    }
}
