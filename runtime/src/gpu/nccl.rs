//! NCCL on the CUDA backend: a run's sums and gathers (data-parallel gradients and losses, the
//! expert replicas' sums, ZeRO-1's gathers) on device memory, between the processes MPI started
//! (`kiln train --device cuda --nccl` under `mpirun`).
//!
//! [`Nccl::join`] forms one NCCL communicator per group of more than one process: the group's
//! rank 0 asks NCCL for a unique id, the host communicator broadcasts it
//! ([`Communicator::broadcast`], MPI), and every process joins with `ncclCommInitRank` on its own
//! device. A peer that never joins ends the wait after the run's timeout with an error naming the
//! group and the rank.
//!
//! Each message is the host path's ([`DeviceMessage::moves`]): its parts are copied into a staging
//! buffer on the stream of the launches (so after the launch that made them, and before any later
//! launch can reuse their bytes), an event hands the staging buffer to a second stream, which sums
//! or gathers it with one NCCL call and copies the results out, and a second event marks the
//! message done. The launches after the message keep running on the first stream meanwhile; the
//! executor waits for the message (polling its event, [`InFlight::wait`]) only before the first
//! launch that reads a result. That wait is bounded: once the sources are staged, a message that
//! does not finish within the timeout (a peer died, or stopped calling) fails with an error naming
//! the group and the rank, and the communicators are aborted rather than waited for.
//!
//! What stays on the host: the all-to-alls of expert parallelism (a dispatch sends only the rows of
//! the tokens routed to each rank, and their flags are needed on the host to size the exchange)
//! and a pipeline's activations and gradients between stages, which go over MPI as before.
//!
//! Nothing here has run on a device yet: the plan is tested without one (`comm::tests`,
//! `tests/it/device_comm.rs` through a transport on host memory), and `NoNccl` on a machine without
//! libnccl.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cudarc::driver::{CudaContext, CudaEvent, CudaSlice, CudaStream, DevicePtr};
use cudarc::nccl::{result, sys};

use super::device::Device;
use crate::comm::{Communicator, DeviceCollectives, DeviceMessage, InFlight, Move};
use crate::RuntimeError;

/// Whether NCCL's library can be loaded on this machine.
pub fn present() -> bool {
    // SAFETY: only tries to dlopen the library by its usual names; no NCCL call is made.
    unsafe { sys::is_culib_present() }
}

/// NCCL's version, as `major.minor.patch`; `NoNccl` without the library.
pub fn version() -> Result<String, RuntimeError> {
    if !present() {
        return Err(RuntimeError::NoNccl);
    }
    let v = result::get_nccl_version().map_err(|e| RuntimeError::Cuda(format!("NCCL: {}", text(e.0))))?;
    // NCCL 2.9 and later code the version as major·10000 + minor·100 + patch.
    Ok(format!("{}.{}.{}", v / 10000, v / 100 % 100, v % 100))
}

/// A fresh communicator identity: what a group's rank 0 makes and the others receive.
pub fn unique_id() -> Result<[u8; 128], RuntimeError> {
    if !present() {
        return Err(RuntimeError::NoNccl);
    }
    let id = result::get_uniqueid().map_err(|e| RuntimeError::Cuda(format!("NCCL: {}", text(e.0))))?;
    Ok(id.internal.map(|c| c as u8))
}

/// NCCL's words for `r`.
fn text(r: sys::ncclResult_t) -> String {
    // SAFETY: ncclGetErrorString returns a static NUL-terminated string for every result code.
    let s = unsafe { std::ffi::CStr::from_ptr(sys::ncclGetErrorString(r)) };
    format!("{} ({r:?})", s.to_string_lossy())
}

/// One group's communicator.
struct Group {
    name: String,
    comm: sys::ncclComm_t,
    rank: usize,
    size: usize,
}

/// A communicator made on another thread (its init blocks until every peer has joined).
struct Made(sys::ncclComm_t);
// SAFETY: an NCCL communicator may be used from any thread, one call at a time; it is handed
// over once, from the thread that made it.
unsafe impl Send for Made {}

/// The NCCL communicators of one process's groups on its device, with the stream their messages
/// run on. Dropping it aborts them (never waits for a peer).
pub struct Nccl {
    ctx: Arc<CudaContext>,
    /// The stream of the launches, on which sources are staged.
    launches: Arc<CudaStream>,
    /// The stream the messages run on.
    side: Arc<CudaStream>,
    groups: Vec<Group>,
    /// Staging buffers no message holds.
    free: Rc<RefCell<Vec<CudaSlice<u8>>>>,
    timeout: Duration,
    version: String,
}

impl Nccl {
    /// Joins every group of `groups` that `comm` has with more than one process, on `device`.
    pub(super) fn join(
        device: &Device,
        comm: &dyn Communicator,
        groups: &[String],
    ) -> Result<Nccl, RuntimeError> {
        let version = version()?;
        let ctx = device.context().clone();
        let cuda = |e: cudarc::driver::DriverError| RuntimeError::Cuda(e.to_string());
        let side = ctx.new_stream().map_err(cuda)?;
        let timeout = comm.timeout();
        let mut joined = Vec::new();
        for name in groups {
            let Some((rank, size)) = comm.rank_in(name) else { continue };
            if size <= 1 {
                continue;
            }
            let mut id = [0u8; 128];
            if rank == 0 {
                id = unique_id()?;
            }
            comm.broadcast(name, &mut id)?;
            let failed = |what: String| RuntimeError::Nccl { group: name.clone(), rank, size, what };
            let (tx, rx) = std::sync::mpsc::channel();
            let on = ctx.clone();
            std::thread::spawn(move || {
                let made = on.bind_to_thread().map_err(|e| e.to_string()).and_then(|()| {
                    let id = sys::ncclUniqueId { internal: id.map(|b| b as std::ffi::c_char) };
                    let mut comm = std::mem::MaybeUninit::uninit();
                    // SAFETY: `comm` is written by a successful init, and read only then.
                    unsafe {
                        result::comm_init_rank(comm.as_mut_ptr(), size as i32, id, rank as i32)
                            .map(|_| Made(comm.assume_init()))
                            .map_err(|e| text(e.0))
                    }
                });
                let _ = tx.send(made);
            });
            let comm = match rx.recv_timeout(timeout) {
                Ok(Ok(made)) => made.0,
                Ok(Err(e)) => {
                    return Err(failed(format!(
                    "ncclCommInitRank failed: {e} (NCCL needs a GPU of its own for each process of a group)"
                )))
                }
                Err(_) => {
                    return Err(failed(format!(
                        "the communicator did not form within {timeout:?}: a peer never joined (did every \
                         process pass --nccl?)"
                    )))
                }
            };
            joined.push(Group { name: name.clone(), comm, rank, size });
        }
        Ok(Nccl {
            ctx,
            launches: device.stream().clone(),
            side,
            groups: joined,
            free: Rc::default(),
            timeout,
            version,
        })
    }

    fn group(&self, name: &str) -> Result<&Group, RuntimeError> {
        self.groups.iter().find(|g| g.name == name).ok_or_else(|| RuntimeError::Collective {
            group: name.to_string(),
            what: "NCCL has no communicator for this group".into(),
        })
    }

    /// A staging buffer of at least `bytes`, from those free or newly allocated.
    fn staging(&self, bytes: usize) -> Result<CudaSlice<u8>, RuntimeError> {
        let mut free = self.free.borrow_mut();
        if let Some(i) = free.iter().position(|b| b.len() >= bytes) {
            return Ok(free.swap_remove(i));
        }
        // SAFETY: every byte is written by the message's moves before any is read.
        unsafe { self.launches.alloc::<u8>(bytes.max(4)) }.map_err(|e| RuntimeError::OutOfMemory {
            bytes: bytes as u64,
            what: format!("an NCCL staging buffer on the GPU ({e})"),
        })
    }
}

impl DeviceCollectives for Nccl {
    fn has_group(&self, group: &str) -> bool {
        self.groups.iter().any(|g| g.name == group)
    }

    fn start(&self, message: &DeviceMessage) -> Result<Box<dyn InFlight>, RuntimeError> {
        let g = self.group(&message.group)?;
        let failed =
            |what: String| RuntimeError::Nccl { group: g.name.clone(), rank: g.rank, size: g.size, what };
        let cuda = |e: cudarc::driver::DriverError| failed(format!("CUDA: {e}"));
        let staging = self.staging(message.staging())?;
        // Event tracking is off on this context (`device.rs`): the record does nothing.
        let base = staging.device_ptr(&self.launches).0;
        self.ctx.bind_to_thread().map_err(cuda)?;
        let (launches, side) = (self.launches.cu_stream(), self.side.cu_stream());
        let mut ready = None;
        for m in message.moves() {
            // SAFETY: every address is of live device memory of this context: the parts are in the
            // executor's arena or states (alive while it runs), the staging buffer is held by the
            // flight until its event is done; the moves stay inside both (`DeviceMessage::moves`).
            unsafe {
                match m {
                    Move::In { src, at, bytes } => {
                        cudarc::driver::result::memcpy_dtod_async(base + at as u64, src, bytes, launches)
                            .map_err(cuda)?
                    }
                    Move::Sum { values } => {
                        let r = self.launches.record_event(None).map_err(cuda)?;
                        self.side.wait(&r).map_err(cuda)?;
                        ready = Some(r);
                        result::all_reduce(
                            base as *const std::ffi::c_void,
                            base as *mut std::ffi::c_void,
                            values,
                            sys::ncclDataType_t::ncclFloat32,
                            sys::ncclRedOp_t::ncclSum,
                            g.comm,
                            side as sys::cudaStream_t,
                        )
                        .map_err(|e| failed(format!("ncclAllReduce of {values} values: {}", text(e.0))))?;
                    }
                    Move::Gather { values, to, .. } => {
                        let r = self.launches.record_event(None).map_err(cuda)?;
                        self.side.wait(&r).map_err(cuda)?;
                        ready = Some(r);
                        result::all_gather(
                            base as *const std::ffi::c_void,
                            (base + to as u64) as *mut std::ffi::c_void,
                            values,
                            sys::ncclDataType_t::ncclFloat32,
                            g.comm,
                            side as sys::cudaStream_t,
                        )
                        .map_err(|e| failed(format!("ncclAllGather of {values} values: {}", text(e.0))))?;
                    }
                    Move::Out { at, dst, bytes } => {
                        cudarc::driver::result::memcpy_dtod_async(dst, base + at as u64, bytes, side)
                            .map_err(cuda)?
                    }
                }
            }
        }
        let ready = ready.expect("every message sums or gathers once");
        let done = self.side.record_event(None).map_err(cuda)?;
        Ok(Box::new(Flight {
            ready,
            done,
            staging: Some(staging),
            free: self.free.clone(),
            comm: g.comm,
            what: format!("the {} bytes of `{}` (rank {} of {})", message.bytes(), g.name, g.rank, g.size),
            group: g.name.clone(),
            rank: g.rank,
            size: g.size,
            timeout: self.timeout,
        }))
    }

    fn describe(&self) -> String {
        let groups: Vec<String> = self.groups.iter().map(|g| format!("`{}` of {}", g.name, g.size)).collect();
        match groups.is_empty() {
            true => format!("NCCL {} (no group of more than one process)", self.version),
            false => format!("NCCL {} (groups {})", self.version, groups.join(", ")),
        }
    }
}

impl Drop for Nccl {
    fn drop(&mut self) {
        for g in &self.groups {
            // SAFETY: each communicator was made by `join` and is aborted once, here; aborting
            // (rather than destroying) never waits for a peer that is gone.
            let _ = unsafe { result::comm_abort(g.comm) };
        }
    }
}

/// One message under way.
struct Flight {
    /// Recorded on the launches' stream after the sources were staged.
    ready: CudaEvent,
    /// Recorded on the side stream after the results were copied out.
    done: CudaEvent,
    staging: Option<CudaSlice<u8>>,
    free: Rc<RefCell<Vec<CudaSlice<u8>>>>,
    comm: sys::ncclComm_t,
    what: String,
    group: String,
    rank: usize,
    size: usize,
    timeout: Duration,
}

impl Flight {
    fn failed(&self, what: String) -> RuntimeError {
        RuntimeError::Nccl { group: self.group.clone(), rank: self.rank, size: self.size, what }
    }

    /// An error NCCL raised asynchronously on this communicator (a peer's failure), if any.
    fn async_error(&self) -> Result<(), RuntimeError> {
        let mut r = sys::ncclResult_t::ncclSuccess;
        // SAFETY: the communicator lives as long as the transport, which outlives its flights.
        unsafe { sys::ncclCommGetAsyncError(self.comm, &mut r) };
        match r {
            sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress => Ok(()),
            e => Err(self.failed(format!("{} failed: {}", self.what, text(e)))),
        }
    }
}

impl InFlight for Flight {
    fn test(&mut self) -> Result<bool, RuntimeError> {
        self.async_error()?;
        self.done.try_is_complete().map_err(|e| self.failed(format!("CUDA: {e}")))
    }

    fn wait(mut self: Box<Self>) -> Result<Vec<f32>, RuntimeError> {
        // The clock starts once this process's sources are staged: before, the wait is for its
        // own launches, which may take as long as they take.
        let mut staged: Option<Instant> = None;
        loop {
            if self.test()? {
                break;
            }
            if staged.is_none()
                && self.ready.try_is_complete().map_err(|e| self.failed(format!("CUDA: {e}")))?
            {
                staged = Some(Instant::now());
            }
            if staged.is_some_and(|t| t.elapsed() > self.timeout) {
                return Err(self.failed(format!(
                    "{} did not finish within {:?} of being staged: a peer died or stopped calling",
                    self.what, self.timeout
                )));
            }
            std::thread::sleep(Duration::from_micros(20));
        }
        let staging = self.staging.take().expect("a flight is waited for once");
        self.free.borrow_mut().push(staging);
        Ok(Vec::new())
    }
}

impl Drop for Flight {
    fn drop(&mut self) {
        // A message not waited for (a run that failed) may still read or write its staging
        // buffer: it is leaked rather than freed under NCCL.
        if let Some(s) = self.staging.take() {
            if self.done.try_is_complete().unwrap_or(false) {
                self.free.borrow_mut().push(s);
            } else {
                std::mem::forget(s);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without libnccl every entry point says so, typed; with it, the version reads as NCCL's.
    #[test]
    fn nccl_or_a_typed_error() {
        if !present() {
            assert!(matches!(version(), Err(RuntimeError::NoNccl)));
            assert!(matches!(unique_id(), Err(RuntimeError::NoNccl)));
            let e = RuntimeError::NoNccl.to_string();
            assert!(e.contains("libnccl.so.2") && e.contains("leave out --nccl"), "{e}");
            eprintln!("skipped the NCCL checks: no libnccl on this machine");
            return;
        }
        let v = version().unwrap();
        assert!(v.starts_with("2."), "{v}");
        assert_eq!(unique_id().unwrap().len(), 128);
    }
}
