//! The threads the CPU backend's launches share: `N - 1` workers started once ([`Workers`], kept
//! for the backend's life), plus the thread that launches.
//!
//! A launch is split into chunks of its work range `[0, work)` (a few per thread, so that kernels
//! whose items cost unequal amounts, such as causal attention rows, still balance); every thread
//! claims chunks until none are left, and [`Pool::launch`] returns when all of them have finished.
//! The packed ABI guarantees that any split of the range, run in any order or in parallel,
//! computes the kernel, so no chunk depends on another.
//!
//! Between launches a worker first spins for up to [`SPIN`] watching the launch counter (yielding
//! its core every few turns, so an oversubscribed machine still runs the others), then sleeps on a
//! condition variable; the launching thread spins the same way before it sleeps waiting for the
//! last chunk. A decode step is ~150 launches tens of microseconds apart, and a futex sleep and
//! wake-up per launch cost about 5 % of it. Starting the workers once, rather than once per launch
//! or once per run of a program, matters for the same reason.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long an idle thread spins before it sleeps.
const SPIN: Duration = Duration::from_micros(50);

/// Spins until `done()` or [`SPIN`] has passed; returns whether `done()` held.
fn spin(done: impl Fn() -> bool) -> bool {
    let start = Instant::now();
    let mut turns = 0u32;
    loop {
        if done() {
            return true;
        }
        turns += 1;
        if turns % 64 == 0 {
            if start.elapsed() >= SPIN {
                return false;
            }
            std::thread::yield_now();
        }
        std::hint::spin_loop();
    }
}

/// The chunks a launch of `work` items is split into on `threads` threads: a few per thread, so
/// that unequal items still balance.
pub fn chunks(work: i64, threads: usize) -> i64 {
    work.min(4 * threads as i64)
}

/// The packed entry of a CPU kernel: `void f(void *const *buffers, const int64_t *sizes, int64_t lo,
/// int64_t hi)`.
pub type Packed = unsafe extern "C" fn(*const *mut u8, *const i64, i64, i64);

/// One kernel call over items `[first, first + work)` split into `chunks` ranges (`first` is 0 but
/// for the later phases of a phased kernel).
#[derive(Clone, Copy)]
pub struct Job {
    pub entry: Packed,
    pub buffers: *const *mut u8,
    pub sizes: *const i64,
    pub first: i64,
    pub work: i64,
    pub chunks: i64,
}

// SAFETY: a job is only run while `Pool::launch` (or the sequential caller) keeps the pointer arrays
// and the memory they point to alive, and its chunks write disjoint parts of the results.
unsafe impl Send for Job {}

impl Job {
    /// Runs chunk `c` of the job: items `first + [work * c / chunks, work * (c + 1) / chunks)`.
    fn run_chunk(&self, c: i64) {
        let lo = self.first + self.work * c / self.chunks;
        let hi = self.first + self.work * (c + 1) / self.chunks;
        // SAFETY: see `run_range`.
        unsafe { run_range(self, lo, hi) }
    }
}

/// Calls the kernel on `[lo, hi)`.
///
/// # Safety
/// `job.entry` must be a packed entry whose buffers and sizes are `job.buffers` and `job.sizes`,
/// each pointing to memory that holds the kernel's argument types at those sizes.
pub unsafe fn run_range(job: &Job, lo: i64, hi: i64) {
    if lo < hi {
        (job.entry)(job.buffers, job.sizes, lo, hi);
    }
}

struct State {
    job: Option<Job>,
    next: i64,
    unfinished: i64,
    quit: bool,
}

/// The shared state of a pool; lives outside the scope its workers run in.
struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    done: Condvar,
    /// Launches so far (and one more at quit), for spinning workers to watch.
    epoch: AtomicU64,
    /// `State::unfinished`, for a spinning launcher to watch.
    left: AtomicI64,
    /// Workers asleep on `wake`, and whether the launcher is asleep on `done`: a notification is
    /// a system call, which a decode step's ~150 launches would otherwise make twice each while
    /// every thread is spinning and none is waiting to be woken. Both change under the lock.
    sleepers: AtomicUsize,
    launcher_asleep: AtomicBool,
}

impl Shared {
    fn new() -> Shared {
        Shared {
            state: Mutex::new(State { job: None, next: 0, unfinished: 0, quit: false }),
            wake: Condvar::new(),
            done: Condvar::new(),
            epoch: AtomicU64::new(0),
            left: AtomicI64::new(0),
            sleepers: AtomicUsize::new(0),
            launcher_asleep: AtomicBool::new(false),
        }
    }

    /// Kernels do not panic, so the lock is never poisoned by a worker; if it were, its state is
    /// still consistent (every update is a single field write under the lock).
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Claims and runs chunks of the current job until none are left. Returns with the lock held.
    fn drain<'a>(&'a self, mut st: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        while let Some(job) = st.job.filter(|j| st.next < j.chunks) {
            let c = st.next;
            st.next += 1;
            drop(st);
            job.run_chunk(c);
            st = self.lock();
            st.unfinished -= 1;
            self.left.store(st.unfinished, Ordering::Release);
            if st.unfinished == 0 && self.launcher_asleep.load(Ordering::Relaxed) {
                self.done.notify_all();
            }
        }
        st
    }

    fn worker(&self) {
        let mut st = self.lock();
        loop {
            st = self.drain(st);
            if st.quit {
                return;
            }
            let seen = self.epoch.load(Ordering::Acquire);
            drop(st);
            spin(|| self.epoch.load(Ordering::Acquire) != seen);
            // Under the lock, sleep only if there is nothing to claim: a launch made after the
            // check notifies, and one made before it is seen here.
            st = self.lock();
            self.sleepers.fetch_add(1, Ordering::Relaxed);
            st = self
                .wake
                .wait_while(st, |s| !s.quit && s.job.is_none_or(|j| s.next >= j.chunks))
                .unwrap_or_else(PoisonError::into_inner);
            self.sleepers.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// The worker threads of a backend, started once and kept until it is dropped (which stops and
/// joins them). A decode step is one run of a program; starting the workers once per run cost the
/// step's first launch a thread's start (45-95 us of a 4 ms FP8 step of `models/bench.toml`).
pub struct Workers {
    shared: Arc<Shared>,
    handles: Vec<JoinHandle<()>>,
}

impl Workers {
    /// Starts up to `threads - 1` workers; the caller of each launch is the last thread. When the
    /// OS refuses a thread (its limit on threads or memory), the pool runs with those it started.
    pub fn start(threads: usize) -> Workers {
        let shared = Arc::new(Shared::new());
        let mut handles = Vec::new();
        while handles.len() + 1 < threads {
            let s = Arc::clone(&shared);
            match std::thread::Builder::new().name("kiln-cpu".into()).spawn(move || s.worker()) {
                Ok(h) => handles.push(h),
                Err(_) => break,
            }
        }
        Workers { shared, handles }
    }

    /// The pool to launch on: these workers and the calling thread.
    pub fn pool(&self) -> Pool<'_> {
        Pool { shared: &self.shared, threads: self.handles.len() + 1 }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        st.quit = true;
        self.shared.epoch.fetch_add(1, Ordering::Release);
        self.shared.wake.notify_all();
        drop(st);
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

/// Launches on a set of [`Workers`]: one thread launches at a time (the caller holds the workers).
pub struct Pool<'s> {
    shared: &'s Shared,
    threads: usize,
}

impl<'s> Pool<'s> {
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs `job` split into its chunks on every thread, and returns when all are done.
    ///
    /// # Safety
    ///
    /// As [`run_range`]'s, for every item of the job.
    pub unsafe fn launch(&self, job: Job) {
        let mut st = self.shared.lock();
        st.job = Some(job);
        st.next = 0;
        st.unfinished = job.chunks;
        self.shared.left.store(job.chunks, Ordering::Release);
        self.shared.epoch.fetch_add(1, Ordering::Release);
        // A worker that went to sleep did so under the lock, which is held here: it is counted.
        if self.shared.sleepers.load(Ordering::Relaxed) > 0 {
            self.shared.wake.notify_all();
        }
        st = self.shared.drain(st);
        if st.unfinished > 0 {
            drop(st);
            spin(|| self.shared.left.load(Ordering::Acquire) == 0);
            st = self.shared.lock();
        }
        self.shared.launcher_asleep.store(true, Ordering::Relaxed);
        while st.unfinished > 0 {
            st = self.shared.done.wait(st).unwrap_or_else(PoisonError::into_inner);
        }
        self.shared.launcher_asleep.store(false, Ordering::Relaxed);
        st.job = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A "kernel" that adds one to every item of its range in a counter array.
    unsafe extern "C" fn bump(buffers: *const *mut u8, _sizes: *const i64, lo: i64, hi: i64) {
        let counts = *buffers as *const AtomicU32;
        for i in lo..hi {
            (*counts.add(i as usize)).fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn every_item_runs_exactly_once_across_launches() {
        let counts: Vec<AtomicU32> = (0..1000).map(|_| AtomicU32::new(0)).collect();
        let ptrs = [counts.as_ptr() as *mut u8];
        let workers = Workers::start(3);
        {
            let pool = workers.pool();
            for (first, work) in [(0, 1000i64), (0, 7), (0, 1), (0, 999), (10, 5)] {
                let chunks = work.min(12);
                // SAFETY: `bump` reads one array of 1000 counters, which outlives the launch.
                unsafe {
                    pool.launch(Job {
                        entry: bump,
                        buffers: ptrs.as_ptr(),
                        sizes: std::ptr::null(),
                        first,
                        work,
                        chunks,
                    })
                };
            }
        }
        drop(workers);
        for (i, c) in counts.iter().enumerate() {
            let want = 1
                + u32::from(i < 7)
                + u32::from(i < 1)
                + u32::from(i < 999)
                + u32::from((10..15).contains(&i));
            assert_eq!(c.load(Ordering::Relaxed), want, "item {i}");
        }
    }
}
