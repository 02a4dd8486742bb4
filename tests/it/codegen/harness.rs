//! Test harness for compiled kernels: builds CPU kernels into a shared library, runs them on host
//! buffers through their packed entry points, and compares with references computed here in f64.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use kiln_compiler::codegen::{cpu, lower_module, Kernel, LaunchShape, LoweredModule, Target};
use kiln_ir::interp::numerics::f8e4m3_to_f32;
use kiln_ir::types::{Sym, SymBindings};
use kiln_ir::{DType, Dim, TensorType};

/// `"f32[B, T, 37]"` as a type.
pub fn ty(s: &str) -> TensorType {
    let (d, rest) = s.split_once('[').unwrap();
    let dims = rest.trim_end_matches(']');
    let shape: Vec<Dim> = if dims.is_empty() {
        vec![]
    } else {
        dims.split(',').map(|x| Dim::parse(x.trim()).unwrap()).collect()
    };
    TensorType::new(DType::from_name(d).unwrap(), shape)
}

pub const BIND: SymBindings = SymBindings { b: 2, t: 3, s: 5 };

pub fn numel(t: &TensorType, bind: &SymBindings) -> usize {
    t.eval_numel(bind).unwrap() as usize
}

pub fn dims(t: &TensorType, bind: &SymBindings) -> Vec<usize> {
    t.shape.iter().map(|d| d.eval(bind).unwrap() as usize).collect()
}

/// A deterministic generator of test data (64-bit LCG, top bits).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// Uniform in `[lo, hi)`.
    pub fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let u = (self.0 >> 40) as f32 / (1u64 << 24) as f32;
        lo + (hi - lo) * u
    }

    pub fn vec(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform(lo, hi)).collect()
    }
}

/// A host buffer of one of the element types kernels take.
#[derive(Clone, Debug, PartialEq)]
pub enum Buf {
    F32(Vec<f32>),
    /// bf16 bit patterns.
    Bf16(Vec<u16>),
    I32(Vec<i32>),
    I64(Vec<i64>),
    /// bool, one byte each.
    Bool(Vec<u8>),
    /// f8e4m3 bit patterns.
    F8(Vec<u8>),
}

impl Buf {
    /// A zeroed buffer for a value of type `t`.
    pub fn zeros(t: &TensorType, bind: &SymBindings) -> Buf {
        let n = numel(t, bind);
        match t.dtype {
            DType::F32 => Buf::F32(vec![0.0; n]),
            DType::BF16 => Buf::Bf16(vec![0; n]),
            DType::I32 => Buf::I32(vec![0; n]),
            DType::I64 => Buf::I64(vec![0; n]),
            DType::Bool => Buf::Bool(vec![0; n]),
            DType::F8E4M3 => Buf::F8(vec![0; n]),
            d => panic!("no test buffers of {d}"),
        }
    }

    fn ptr(&mut self) -> *mut u8 {
        match self {
            Buf::F32(v) => v.as_mut_ptr().cast(),
            Buf::Bf16(v) => v.as_mut_ptr().cast(),
            Buf::I32(v) => v.as_mut_ptr().cast(),
            Buf::I64(v) => v.as_mut_ptr().cast(),
            Buf::Bool(v) => v.as_mut_ptr().cast(),
            Buf::F8(v) => v.as_mut_ptr().cast(),
        }
    }

    /// The bits of element `i`.
    pub fn bits(&self, i: usize) -> u64 {
        match self {
            Buf::F32(v) => u64::from(v[i].to_bits()),
            Buf::Bf16(v) => u64::from(v[i]),
            Buf::I32(v) => v[i] as u32 as u64,
            Buf::I64(v) => v[i] as u64,
            Buf::Bool(v) => u64::from(v[i]),
            Buf::F8(v) => u64::from(v[i]),
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Buf::F32(v) => v.len(),
            Buf::Bf16(v) => v.len(),
            Buf::I32(v) => v.len(),
            Buf::I64(v) => v.len(),
            Buf::Bool(v) => v.len(),
            Buf::F8(v) => v.len(),
        }
    }

    pub fn f32(&self) -> &[f32] {
        match self {
            Buf::F32(v) => v,
            other => panic!("not f32: {other:?}"),
        }
    }
}

/// bf16 bits of `x`, rounded to nearest even (NaN kept quiet).
pub fn to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    let round = 0x7FFF + ((b >> 16) & 1);
    ((b + round) >> 16) as u16
}

pub fn from_bf16(h: u16) -> f32 {
    f32::from_bits(u32::from(h) << 16)
}

/// Kernels compiled into a shared library and loaded.
pub struct CpuLib {
    module: LoweredModule,
    lib: libloading::Library,
    path: PathBuf,
}

impl Drop for CpuLib {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

type Packed = unsafe extern "C" fn(*const *mut u8, *const i64, i64, i64);

impl CpuLib {
    pub fn build(kernels: &[&Kernel]) -> CpuLib {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let module = lower_module(kernels.iter().copied(), Target::Cpu).unwrap_or_else(|e| panic!("{e}"));
        let obj = cpu::object(&module).unwrap_or_else(|e| panic!("{e}\n{}", module.text()));
        let path = std::env::temp_dir().join(format!(
            "kiln-it-codegen-{}-{}.so",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        cpu::link_shared_library(&obj, &path).unwrap_or_else(|e| panic!("{e}"));
        // SAFETY: the library is the one just linked from kiln's kernels; it has no initialisers.
        let lib = unsafe { libloading::Library::new(&path) }.unwrap();
        CpuLib { module, lib, path }
    }

    /// Runs `kernel` on `bufs` (arguments, results, then scratch), computing its work (each phase's,
    /// phase by phase, for a phased kernel) in three pieces to exercise the `[lo, hi)` ranges.
    pub fn run(&self, kernel: &Kernel, bufs: &mut [Buf], bind: &SymBindings) {
        let lowered = self.module.kernels.iter().find(|k| k.name == kernel.name).expect("kernel in library");
        let phases = match &lowered.launch {
            LaunchShape::Cpu { work } => vec![*work],
            LaunchShape::CpuPhases { phases } => phases.clone(),
            LaunchShape::Gpu { .. } => panic!("not a CPU kernel"),
        };
        // Each phase in turn, in three pieces.
        let mut first = 0;
        for work in phases {
            let work = work.eval(bind).unwrap() as i64;
            let cuts = [0, work / 3, 2 * work / 3, work];
            for w in cuts.windows(2) {
                self.run_range(kernel, bufs, bind, first + w[0], first + w[1]);
            }
            first += work;
        }
    }

    pub fn run_range(&self, kernel: &Kernel, bufs: &mut [Buf], bind: &SymBindings, lo: i64, hi: i64) {
        assert_eq!(bufs.len(), kernel.args.len() + kernel.results.len() + kernel.scratch.len());
        for (b, t) in bufs.iter().zip(kernel.args.iter().chain(&kernel.results).chain(&kernel.scratch)) {
            assert_eq!(b.len(), numel(t, bind), "buffer for {t}");
        }
        let ptrs: Vec<*mut u8> = bufs.iter_mut().map(Buf::ptr).collect();
        let sizes: Vec<i64> = kernel.syms.iter().map(|&s| sym_value(s, bind)).collect();
        let symbol = format!("{}{}", kernel.name, cpu::PACKED_SUFFIX);
        // SAFETY: the packed entry has exactly this signature (see `codegen::cpu`), the buffers have
        // the element counts the kernel's types give for `bind`, and `[lo, hi)` is within its work.
        unsafe {
            let f: libloading::Symbol<Packed> = self.lib.get(symbol.as_bytes()).unwrap();
            f(ptrs.as_ptr(), sizes.as_ptr(), lo, hi);
        }
    }
}

fn sym_value(s: Sym, bind: &SymBindings) -> i64 {
    bind.get(s) as i64
}

/// Asserts `|got - want| <= tol * max(|want|, floor)` elementwise, with NaN equal to NaN.
#[track_caller]
pub fn assert_close(what: &str, got: &[f32], want: &[f64], tol: f64, floor: f64) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        if w.is_nan() && g.is_nan() {
            continue;
        }
        let err = (f64::from(g) - w).abs();
        assert!(
            err <= tol * w.abs().max(floor) || (w.is_infinite() && f64::from(g) == w),
            "{what}: element {i}: got {g}, want {w} (error {err:e})"
        );
    }
}

/// Row-major strides of a shape.
pub fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// The coordinates of flat index `i` in `shape`.
pub fn coords(mut i: usize, shape: &[usize]) -> Vec<usize> {
    let mut c = vec![0; shape.len()];
    for k in (0..shape.len()).rev() {
        c[k] = i % shape[k];
        i /= shape[k];
    }
    c
}

/// The flat index in `arg` (right-aligned, broadcasting dims of 1) of output coordinates `c`.
pub fn broadcast_at(c: &[usize], arg: &[usize]) -> usize {
    let off = c.len() - arg.len();
    let st = strides(arg);
    arg.iter().enumerate().map(|(k, &d)| if d == 1 { 0 } else { c[k + off] * st[k] }).sum()
}

/// The buffer as the interpreter's tensor of type `t`.
pub fn to_tensor(b: &Buf, t: &TensorType, bind: &SymBindings) -> kiln_ir::interp::Tensor {
    use kiln_ir::interp::Tensor;
    let shape: Vec<u64> = dims(t, bind).into_iter().map(|d| d as u64).collect();
    match b {
        Buf::F32(v) => Tensor::from_f32(t.dtype, shape, v.clone()),
        Buf::Bf16(v) => Tensor::from_f32(t.dtype, shape, v.iter().map(|&h| from_bf16(h)).collect()),
        Buf::I32(v) => Tensor::from_i64(t.dtype, shape, v.iter().map(|&x| i64::from(x)).collect()),
        Buf::I64(v) => Tensor::from_i64(t.dtype, shape, v.clone()),
        Buf::Bool(v) => Tensor::from_bool(shape, v.iter().map(|&x| x != 0).collect()),
        Buf::F8(v) => Tensor::from_f32(t.dtype, shape, v.iter().map(|&b| f8e4m3_to_f32(b)).collect()),
    }
    .unwrap()
}

/// The buffer's values as f64.
pub fn values(b: &Buf) -> Vec<f64> {
    match b {
        Buf::F32(v) => v.iter().map(|&x| f64::from(x)).collect(),
        Buf::Bf16(v) => v.iter().map(|&h| f64::from(from_bf16(h))).collect(),
        Buf::I32(v) => v.iter().map(|&x| f64::from(x)).collect(),
        Buf::I64(v) => v.iter().map(|&x| x as f64).collect(),
        Buf::Bool(v) => v.iter().map(|&x| f64::from(x)).collect(),
        Buf::F8(v) => v.iter().map(|&b| f64::from(f8e4m3_to_f32(b))).collect(),
    }
}

/// Runs the kernel's body in the reference interpreter on `args`; returns its results as f64.
pub fn interpret(kernel: &Kernel, args: &[Buf], bind: &SymBindings) -> Vec<Vec<f64>> {
    use kiln_ir::interp::Data;
    let inputs = kernel
        .body
        .inputs()
        .iter()
        .zip(args.iter().zip(&kernel.args))
        .map(|((name, _), (b, t))| (name.to_string(), to_tensor(b, t, bind)))
        .collect();
    let outs =
        kiln_ir::interp::run(&kernel.body, &inputs, &Default::default()).unwrap_or_else(|e| panic!("{e}"));
    kernel
        .body
        .outputs()
        .iter()
        .map(|(name, _)| match outs[name].data() {
            Data::Float(v) => v.iter().map(|&x| f64::from(x)).collect(),
            Data::Int(v) => v.iter().map(|&x| x as f64).collect(),
            Data::Bool(v) => v.iter().map(|&x| f64::from(u8::from(x))).collect(),
        })
        .collect()
}

/// Random arguments for a kernel: floats uniform in `[lo, hi)` (rounded to bf16 for bf16 buffers).
pub fn random_args(kernel: &Kernel, rng: &mut Rng, (lo, hi): (f32, f32), bind: &SymBindings) -> Vec<Buf> {
    kernel
        .args
        .iter()
        .map(|t| {
            let n = numel(t, bind);
            match t.dtype {
                DType::F32 => Buf::F32(rng.vec(n, lo, hi)),
                DType::BF16 => Buf::Bf16(rng.vec(n, lo, hi).into_iter().map(to_bf16).collect()),
                d => panic!("no random {d} arguments"),
            }
        })
        .collect()
}
