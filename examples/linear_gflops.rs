//! Measures the CPU `linear` kernel: compiles `x[M, K] @ w[N, K]^T` for M = N = K = 256 and 1024 into
//! a shared library, runs it on one thread and on every core (splitting the rows with the kernel's
//! `[lo, hi)` range), and prints GFLOP/s. A measurement to read, not a test.
//!
//! ```text
//! cargo run --release --example linear_gflops
//! ```

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use kiln_compiler::codegen::{cpu, lower_module, Kernel, Target};
use kiln_ir::{DType, Op, TensorType};

type Packed = unsafe extern "C" fn(*const *mut u8, *const i64, i64, i64);

/// Calls the kernel on rows `[lo, hi)`.
fn call(f: Packed, bufs: &[usize; 3], lo: usize, hi: usize) {
    let ptrs: Vec<*mut u8> = bufs.iter().map(|&p| p as *mut u8).collect();
    // SAFETY: `f` is a packed entry with this signature; the buffers are sized for the kernel and
    // outlive the call; `[lo, hi)` is within its M rows.
    unsafe { f(ptrs.as_ptr(), std::ptr::null(), lo as i64, hi as i64) }
}

/// Runs `once` repeatedly for about half a second; returns the best time of one run.
fn best_time(mut once: impl FnMut()) -> Duration {
    once();
    let start = Instant::now();
    let mut best = Duration::MAX;
    while start.elapsed() < Duration::from_millis(500) {
        let t = Instant::now();
        once();
        best = best.min(t.elapsed());
    }
    best
}

fn main() -> Result<()> {
    let sizes = [256usize, 1024];
    let kernels: Vec<Kernel> = sizes
        .iter()
        .map(|&n| {
            let n = n as u64;
            let args = [TensorType::known(DType::F32, &[n, n]), TensorType::known(DType::F32, &[n, n])];
            Kernel::for_op(&Op::Linear, &args)
        })
        .collect::<Result<_, _>>()?;
    let module = lower_module(&kernels, Target::Cpu)?;
    let object = cpu::object(&module)?;
    let path = std::env::temp_dir().join(format!("kiln-linear-gflops-{}.so", std::process::id()));
    cpu::link_shared_library(&object, &path)?;
    // SAFETY: the library was just linked from kiln's kernels; it has no initialisers.
    let lib = unsafe { libloading::Library::new(&path) }.context("loading the kernels")?;
    let _ = std::fs::remove_file(&path);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());

    for (kernel, &n) in kernels.iter().zip(&sizes) {
        let symbol = format!("{}{}", kernel.name, cpu::PACKED_SUFFIX);
        // SAFETY: every packed entry has the `Packed` signature (see `codegen::cpu`).
        let f: Packed = unsafe { *lib.get::<Packed>(symbol.as_bytes())? };
        let x: Vec<f32> = (0..n * n).map(|i| ((i * 7 % 13) as f32 - 6.0) / 8.0).collect();
        let w: Vec<f32> = (0..n * n).map(|i| ((i * 5 % 11) as f32 - 5.0) / 8.0).collect();
        let mut y = vec![0.0f32; n * n];
        let bufs = [x.as_ptr() as usize, w.as_ptr() as usize, y.as_mut_ptr() as usize];
        let flops = 2.0 * (n * n * n) as f64;

        let one = best_time(|| call(f, &bufs, 0, n));
        let all = best_time(|| {
            std::thread::scope(|s| {
                for t in 0..threads {
                    let (lo, hi) = (n * t / threads, n * (t + 1) / threads);
                    s.spawn(move || call(f, &bufs, lo, hi));
                }
            })
        });
        // Spot-check one output against a direct dot product.
        let (r, c) = (n / 3, n / 2);
        let want: f32 = (0..n).map(|k| x[r * n + k] * w[c * n + k]).sum();
        let got = y[r * n + c];
        assert!((got - want).abs() <= 1e-3 * want.abs().max(1.0), "y[{r}, {c}] = {got}, want {want}");
        println!(
            "linear M=N=K={n}: {:.1} GFLOP/s on 1 thread, {:.1} GFLOP/s on {threads} threads",
            flops / one.as_secs_f64() / 1e9,
            flops / all.as_secs_f64() / 1e9
        );
    }
    Ok(())
}
