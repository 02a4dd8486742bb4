//! Lowering: a [`Kernel`] into the MLIR text of one function for a [`Target`], plus the launch shape
//! the runtime needs to run it. One file per op family; this file holds what they share: the kernel
//! signature and prologue ([`Frame`]), element loads and stores with dtype conversion, scalar math for
//! each target, and module assembly.
//!
//! The ABI every lowering follows (both targets):
//! - Parameters: one bare pointer per buffer (arguments, then results), typed as a rank-0
//!   `memref<T>` (`use-bare-ptr-memref-call-conv`), then one `i64` per symbolic size of
//!   [`Kernel::syms`]. On the CPU two more `i64`s, `lo` and `hi`, select the work items
//!   `[lo, hi)` of [`LaunchShape::Cpu`] to compute, so a thread pool can split any kernel.
//! - Buffers are dense, row-major, 1-D views made with `memref.reinterpret_cast`; element types are
//!   `f32`, `f16`, `bf16`, `i32`, `i64` and `bool` (stored as `i8`). Floats are computed in f32.
//! - On the GPU, math goes through LLVM/NVVM intrinsics (`ex2.approx`, `lg2.approx`, `sqrt.rn`) rather
//!   than the `math` dialect, whose NVVM lowering calls libdevice, which kiln does not link.
//!
//! Guarantees: the text is a function that parses and verifies in MLIR 22 (checked by the emit
//! stage); a kernel that a family cannot lower yields [`LowerError::Unsupported`], never a panic.

mod elementwise;
mod matmul;
mod reduce;

use std::fmt;

use kiln_ir::types::Sym;
use kiln_ir::verify::verify;
use kiln_ir::{DType, Dim, Op, TensorType, UnaryOp};

use super::kernel::Kernel;
use super::mlir::{Body, Value};

/// Where a kernel runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    /// The host CPU: `func.func`, compiled to a shared library.
    Cpu,
    /// NVIDIA sm_90a: `gpu.func` in a `gpu.module`, compiled to PTX.
    Gpu,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Target::Cpu => "cpu",
            Target::Gpu => "gpu",
        })
    }
}

/// Why a kernel could not be lowered.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LowerError {
    /// The op, or this use of it, has no lowering for the target yet.
    #[error("kernel `{kernel}`: `{op}` cannot be lowered for the {target} yet: {reason}")]
    Unsupported { op: String, kernel: String, target: Target, reason: String },
    /// The kernel's body or signature is inconsistent (a kernel built by hand, not by formation).
    #[error("kernel `{kernel}` is malformed: {message}")]
    Malformed { kernel: String, message: String },
}

/// `ceil(work / per_block)` blocks along one grid axis.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GridDim {
    pub work: Dim,
    pub per_block: u64,
}

impl GridDim {
    pub fn one() -> GridDim {
        GridDim { work: Dim::known(1), per_block: 1 }
    }
}

/// How the runtime runs a lowered kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LaunchShape {
    /// Work items `0..work`; any split into `[lo, hi)` ranges, run in any order or in parallel,
    /// computes the kernel.
    Cpu { work: Dim },
    /// A grid of `grid[0] x grid[1] x grid[2]` blocks of `block` threads.
    Gpu { grid: [GridDim; 3], block: [u32; 3] },
}

/// One lowered kernel.
#[derive(Clone, Debug, PartialEq)]
pub struct LoweredKernel {
    pub name: String,
    pub target: Target,
    /// The `func.func` (CPU) or `gpu.func` (GPU), as MLIR text.
    pub func: String,
    pub launch: LaunchShape,
    /// Buffers (arguments then results) and symbolic sizes the function takes.
    pub buffers: usize,
    pub syms: Vec<Sym>,
}

/// Kernels of one target in one MLIR module.
#[derive(Clone, Debug, PartialEq)]
pub struct LoweredModule {
    pub target: Target,
    pub kernels: Vec<LoweredKernel>,
}

/// The name of the `gpu.module` GPU kernels live in.
pub const GPU_MODULE: &str = "kiln_kernels";

impl LoweredModule {
    /// The module as MLIR text: a plain module of `func.func`s, or a `gpu.container_module` holding
    /// one `gpu.module` of kernels.
    pub fn text(&self) -> String {
        let funcs: String = self.kernels.iter().map(|k| k.func.as_str()).collect::<Vec<_>>().join("\n");
        match self.target {
            Target::Cpu => format!("module {{\n{funcs}}}\n"),
            Target::Gpu => {
                format!("module attributes {{gpu.container_module}} {{\n  gpu.module @{GPU_MODULE} {{\n{funcs}  }}\n}}\n")
            }
        }
    }
}

/// Lowers several kernels into one module.
pub fn lower_module<'a>(
    kernels: impl IntoIterator<Item = &'a Kernel>,
    target: Target,
) -> Result<LoweredModule, LowerError> {
    let kernels = kernels.into_iter().map(|k| lower_kernel(k, target)).collect::<Result<_, _>>()?;
    Ok(LoweredModule { target, kernels })
}

/// Lowers one kernel for `target`.
pub fn lower_kernel(kernel: &Kernel, target: Target) -> Result<LoweredKernel, LowerError> {
    check_signature(kernel)?;
    let op = kernel.single_op().ok_or_else(|| LowerError::Unsupported {
        op: "fused".into(),
        kernel: kernel.name.clone(),
        target,
        reason: "only kernels of exactly one op are lowered yet".into(),
    })?;
    let mut f = Frame::new(kernel, target)?;
    let launch = match op {
        Op::Unary(u) => elementwise::unary(&mut f, *u)?,
        Op::Binary(b) => elementwise::binary(&mut f, *b)?,
        Op::Cast { .. } => elementwise::cast(&mut f)?,
        Op::Reduce { op, axes, .. } => reduce::reduce(&mut f, *op, axes)?,
        Op::Softmax { axis } => reduce::softmax(&mut f, *axis)?,
        Op::RmsNorm { eps } => reduce::rms_norm(&mut f, *eps)?,
        Op::Linear => matmul::linear(&mut f)?,
        Op::MatMul => matmul::matmul(&mut f)?,
        other => return Err(f.unsupported(other.name(), "no lowering for this op yet")),
    };
    Ok(f.finish(launch))
}

fn check_signature(kernel: &Kernel) -> Result<(), LowerError> {
    let malformed = |message: String| LowerError::Malformed { kernel: kernel.name.clone(), message };
    verify(&kernel.body).map_err(|e| malformed(e.to_string()))?;
    let ins: Vec<&TensorType> = kernel.body.inputs().iter().map(|&(_, v)| kernel.body.ty(v)).collect();
    let outs: Vec<&TensorType> = kernel.body.outputs().iter().map(|&(_, v)| kernel.body.ty(v)).collect();
    if ins != kernel.args.iter().collect::<Vec<_>>() || outs != kernel.results.iter().collect::<Vec<_>>() {
        return Err(malformed("the argument or result types disagree with the body".into()));
    }
    let used = |s: Sym| {
        kernel
            .args
            .iter()
            .chain(&kernel.results)
            .any(|t| t.shape.iter().any(|&d| super::kernel::has_sym(d, s)))
    };
    if kernel.syms != Sym::ALL.into_iter().filter(|&s| used(s)).collect::<Vec<_>>() {
        return Err(malformed(format!(
            "size arguments {:?} do not match the symbols of its types",
            kernel.syms
        )));
    }
    Ok(())
}

/// A buffer of the kernel seen as a flat 1-D memref.
pub(crate) struct Buffer {
    pub view: Value,
    /// `memref<?xf32>` or `memref<64xf32>`.
    pub memref: String,
    pub ty: TensorType,
}

/// The function being written: its signature, prologue values and body.
pub(crate) struct Frame<'k> {
    pub kernel: &'k Kernel,
    pub target: Target,
    pub b: Body,
    /// Arguments, then results.
    pub bufs: Vec<Buffer>,
    syms: Vec<(Sym, Value)>,
    params: Vec<String>,
    /// `workgroup(...)` attributions of a GPU kernel (shared memory).
    workgroup: Vec<String>,
    /// `lo`, `hi` on the CPU.
    pub range: Option<(Value, Value)>,
}

/// The element type kiln stores a dtype as, or why it cannot yet.
fn storage_type(d: DType) -> Result<&'static str, &'static str> {
    match d {
        DType::F32 => Ok("f32"),
        DType::F16 => Ok("f16"),
        DType::BF16 => Ok("bf16"),
        DType::I32 => Ok("i32"),
        DType::I64 => Ok("i64"),
        DType::Bool => Ok("i8"),
        DType::F8E4M3 => Err("f8e4m3 tensors are not lowered yet"),
    }
}

/// The type values of a dtype are computed in: f32 for every float, the integer itself, `i1`.
pub(crate) fn compute_type(d: DType) -> &'static str {
    match d {
        DType::F32 | DType::F16 | DType::BF16 | DType::F8E4M3 => "f32",
        DType::I32 => "i32",
        DType::I64 => "i64",
        DType::Bool => "i1",
    }
}

impl AsMut<Body> for Frame<'_> {
    fn as_mut(&mut self) -> &mut Body {
        &mut self.b
    }
}

impl<'k> Frame<'k> {
    fn new(kernel: &'k Kernel, target: Target) -> Result<Frame<'k>, LowerError> {
        let indent = match target {
            Target::Cpu => 2,
            Target::Gpu => 3,
        };
        let mut f = Frame {
            kernel,
            target,
            b: Body::new(indent),
            bufs: Vec::new(),
            syms: Vec::new(),
            params: Vec::new(),
            workgroup: Vec::new(),
            range: None,
        };
        let op_name = kernel.single_op().map_or("fused", Op::name);
        let tys: Vec<(String, &TensorType)> =
            (kernel.args.iter().enumerate().map(|(i, t)| (format!("a{i}"), t)))
                .chain(kernel.results.iter().enumerate().map(|(i, t)| (format!("r{i}"), t)))
                .collect();
        let mut ptrs = Vec::new();
        for (name, ty) in &tys {
            let elem = storage_type(ty.dtype).map_err(|reason| f.unsupported(op_name, reason))?;
            let p = f.b.named(name);
            f.params.push(format!("{p}: memref<{elem}>"));
            ptrs.push((p, elem));
        }
        for s in &kernel.syms {
            let v = f.b.named(&format!("{}_i64", s.name()));
            f.params.push(format!("{v}: i64"));
            let idx = f.b.entry_op(s.name(), s.name(), format_args!("arith.index_cast {v} : i64 to index"));
            f.syms.push((*s, idx));
        }
        if target == Target::Cpu {
            let lo = f.b.named("lo");
            let hi = f.b.named("hi");
            f.params.push(format!("{lo}: i64"));
            f.params.push(format!("{hi}: i64"));
            let lo_i = f.b.op("lo", format_args!("arith.index_cast {lo} : i64 to index"));
            let hi_i = f.b.op("hi", format_args!("arith.index_cast {hi} : i64 to index"));
            f.range = Some((lo_i, hi_i));
        }
        for ((p, elem), (_, ty)) in ptrs.into_iter().zip(&tys) {
            let (size_text, memref) = match ty.known_numel() {
                Some(n) => (n.to_string(), format!("memref<{n}x{elem}>")),
                None => {
                    let n = f.numel(&ty.shape);
                    (n.to_string(), format!("memref<?x{elem}>"))
                }
            };
            let view = f.b.op(
                "v",
                format_args!(
                    "memref.reinterpret_cast {p} to offset: [0], sizes: [{size_text}], strides: [1] : memref<{elem}> to {memref}"
                ),
            );
            f.bufs.push(Buffer { view, memref, ty: (*ty).clone() });
        }
        Ok(f)
    }

    pub fn unsupported(&self, op: &str, reason: impl Into<String>) -> LowerError {
        LowerError::Unsupported {
            op: op.to_string(),
            kernel: self.kernel.name.clone(),
            target: self.target,
            reason: reason.into(),
        }
    }

    /// The buffer of result `i`.
    pub fn result(&self, i: usize) -> &Buffer {
        &self.bufs[self.kernel.args.len() + i]
    }

    /// A dimension as an `index` value: its factor times the size arguments it mentions, computed
    /// once at the kernel's entry (so it can be used in any region).
    pub fn dim(&mut self, d: Dim) -> Value {
        let mut partial = Dim::known(d.factor());
        let mut rest = d;
        let mut v = self.b.index(d.factor() as i64);
        for (s, sv) in self.syms.clone() {
            while let Some(q) = rest.checked_div(Dim::sym(s)) {
                rest = q;
                let next = partial.checked_mul(Dim::sym(s)).expect("a factor of a valid dimension");
                v = if partial == Dim::known(1) {
                    sv.clone()
                } else {
                    self.b.entry_op(&format!("dim {next}"), "d", format_args!("arith.muli {v}, {sv} : index"))
                };
                partial = next;
            }
        }
        v
    }

    /// The product of dimensions as an `index` value (constants folded).
    pub fn prod(&mut self, dims: &[Dim]) -> Value {
        let d = dims.iter().try_fold(Dim::known(1), |acc, &d| acc.checked_mul(d));
        match d {
            Some(d) => self.dim(d),
            // A product that overflows a monomial's factor cannot be a real tensor; multiply at run
            // time instead of failing here.
            None => {
                let mut v = self.b.index(1);
                for &d in dims {
                    let dv = self.dim(d);
                    v = self.b.muli(&v, &dv);
                }
                v
            }
        }
    }

    pub fn numel(&mut self, shape: &[Dim]) -> Value {
        self.prod(shape)
    }

    /// Loads element `idx` of buffer `buf`, converted to its compute type.
    pub fn load(&mut self, buf: usize, idx: &Value) -> Value {
        let Buffer { view, memref, ty } = &self.bufs[buf];
        let (view, memref, dtype) = (view.clone(), memref.clone(), ty.dtype);
        let x = self.b.op("x", format_args!("memref.load {view}[{idx}] : {memref}"));
        self.widen(x, dtype)
    }

    /// Stores `v` (in the compute type) as element `idx` of buffer `buf`.
    pub fn store(&mut self, buf: usize, idx: &Value, v: &Value) {
        let dtype = self.bufs[buf].ty.dtype;
        let v = self.narrow(v.clone(), dtype);
        let Buffer { view, memref, .. } = &self.bufs[buf];
        self.b.line(format_args!("memref.store {v}, {view}[{idx}] : {memref}"));
    }

    /// A loaded value of `dtype` in its compute type.
    fn widen(&mut self, x: Value, dtype: DType) -> Value {
        match dtype {
            DType::F16 | DType::BF16 => {
                let from = storage_type(dtype).expect("checked in the prologue");
                self.b.op("x", format_args!("arith.extf {x} : {from} to f32"))
            }
            DType::Bool => {
                let zero = self.b.constant("0", "i8");
                self.b.op("x", format_args!("arith.cmpi ne, {x}, {zero} : i8"))
            }
            _ => x,
        }
    }

    /// A compute-type value as the storage type of `dtype` (rounding to nearest even for floats).
    fn narrow(&mut self, v: Value, dtype: DType) -> Value {
        match dtype {
            DType::F16 | DType::BF16 => {
                let to = storage_type(dtype).expect("checked in the prologue");
                self.b.op("y", format_args!("arith.truncf {v} : f32 to {to}"))
            }
            DType::Bool => self.b.op("y", format_args!("arith.extui {v} : i1 to i8")),
            _ => v,
        }
    }

    /// A shared-memory buffer of a GPU kernel (`workgroup` attribution), one per name: a second
    /// request for the same name gets the same buffer. Returns its value and memref type.
    pub fn workgroup(&mut self, name: &str, elem: &str, elems: u64) -> (Value, String) {
        let ty = format!("memref<{elems}x{elem}, #gpu.address_space<workgroup>>");
        let key = format!("%{name}_{elem}: {ty}");
        if !self.workgroup.contains(&key) {
            self.workgroup.push(key);
        }
        (Value::named(&format!("{name}_{elem}")), ty)
    }

    /// `gpu.thread_id x`, `gpu.block_id y`, ...: computed once, at the kernel's entry.
    pub fn gpu_id(&mut self, what: &str, axis: char) -> Value {
        let hint = match what {
            "thread_id" => "tid",
            "block_id" => "bid",
            _ => "gid",
        };
        self.b.entry_op(
            &format!("{what} {axis}"),
            &format!("{hint}_{axis}"),
            format_args!("gpu.{what} {axis}"),
        )
    }

    /// `v` rounded to `dtype`'s precision and back to f32 (a no-op for f32).
    pub fn round_to(&mut self, v: &Value, dtype: DType) -> Value {
        match dtype {
            DType::F16 | DType::BF16 => {
                let r = self.narrow(v.clone(), dtype);
                self.widen(r, dtype)
            }
            _ => v.clone(),
        }
    }

    // Scalar math on f32 values.

    pub fn binf(&mut self, op: &str, a: &Value, b: &Value) -> Value {
        self.b.op("f", format_args!("arith.{op} {a}, {b} : f32"))
    }

    pub fn exp(&mut self, x: &Value) -> Value {
        match self.target {
            Target::Cpu => self.b.op("e", format_args!("math.exp {x} : f32")),
            Target::Gpu => {
                // exp(x) = 2^(x * log2(e)), with PTX's ex2.approx (relative error about 2^-22).
                let log2e = self.b.f32(std::f64::consts::LOG2_E);
                let t = self.binf("mulf", x, &log2e);
                self.intrinsic("llvm.nvvm.ex2.approx.f32", &t)
            }
        }
    }

    fn log(&mut self, x: &Value) -> Value {
        match self.target {
            Target::Cpu => self.b.op("l", format_args!("math.log {x} : f32")),
            Target::Gpu => {
                let l2 = self.intrinsic("llvm.nvvm.lg2.approx.f", x);
                let ln2 = self.b.f32(std::f64::consts::LN_2);
                self.binf("mulf", &l2, &ln2)
            }
        }
    }

    pub fn sqrt(&mut self, x: &Value) -> Value {
        match self.target {
            Target::Cpu => self.b.op("s", format_args!("math.sqrt {x} : f32")),
            Target::Gpu => self.intrinsic("llvm.nvvm.sqrt.rn.f", x),
        }
    }

    /// `1 / sqrt(x)`, correctly rounded sqrt then division on both targets, so norms agree with the
    /// reference to a few ulp.
    pub fn rsqrt(&mut self, x: &Value) -> Value {
        let s = self.sqrt(x);
        let one = self.b.f32(1.0);
        self.binf("divf", &one, &s)
    }

    fn intrinsic(&mut self, name: &str, x: &Value) -> Value {
        self.b.op("m", format_args!("llvm.call_intrinsic \"{name}\"({x}) : (f32) -> f32"))
    }

    /// A unary function of an f32 value.
    pub fn unary(&mut self, op: UnaryOp, x: &Value) -> Value {
        let one = self.b.f32(1.0);
        match op {
            UnaryOp::Neg => self.b.op("f", format_args!("arith.negf {x} : f32")),
            UnaryOp::Abs => {
                let neg = self.b.op("f", format_args!("arith.negf {x} : f32"));
                self.binf("maximumf", x, &neg)
            }
            UnaryOp::Exp => self.exp(x),
            UnaryOp::Log => self.log(x),
            UnaryOp::Sqrt => self.sqrt(x),
            UnaryOp::Rsqrt => self.rsqrt(x),
            UnaryOp::Recip => self.binf("divf", &one, x),
            UnaryOp::Sigmoid | UnaryOp::Silu => {
                // sigmoid(x) = 1 / (1 + exp(-x)); silu(x) = x / (1 + exp(-x)). Both saturate
                // correctly: exp(-x) = inf gives 0.
                let neg = self.b.op("f", format_args!("arith.negf {x} : f32"));
                let e = self.exp(&neg);
                let d = self.binf("addf", &one, &e);
                let num = if op == UnaryOp::Silu { x.clone() } else { one };
                self.binf("divf", &num, &d)
            }
            UnaryOp::Tanh => match self.target {
                Target::Cpu => self.b.op("t", format_args!("math.tanh {x} : f32")),
                Target::Gpu => self.tanh_gpu(x),
            },
        }
    }

    /// tanh without libdevice: `(1 - t) / (1 + t)` with `t = exp(-2|x|)` and the sign of `x`, and the
    /// series `x - x^3/3 + 2x^5/15` below |x| = 1/16, where the quotient would cancel.
    fn tanh_gpu(&mut self, x: &Value) -> Value {
        let neg = self.b.op("f", format_args!("arith.negf {x} : f32"));
        let ax = self.binf("maximumf", x, &neg);
        let m2 = self.b.f32(-2.0);
        let arg = self.binf("mulf", &ax, &m2);
        let t = self.exp(&arg);
        let one = self.b.f32(1.0);
        let num = self.binf("subf", &one, &t);
        let den = self.binf("addf", &one, &t);
        let q = self.binf("divf", &num, &den);
        let neg_q = self.b.op("f", format_args!("arith.negf {q} : f32"));
        let zero = self.b.f32(0.0);
        let below = self.b.op("p", format_args!("arith.cmpf olt, {x}, {zero} : f32"));
        let signed = self.b.op("t", format_args!("arith.select {below}, {neg_q}, {q} : f32"));
        let x2 = self.binf("mulf", x, x);
        let c5 = self.b.f32(2.0 / 15.0);
        let c3 = self.b.f32(-1.0 / 3.0);
        let p = self.binf("mulf", &x2, &c5);
        let p = self.binf("addf", &p, &c3);
        let p = self.binf("mulf", &p, &x2);
        let p = self.binf("mulf", &p, x);
        let series = self.binf("addf", &p, x);
        let small_limit = self.b.f32(0.0625);
        let small = self.b.op("p", format_args!("arith.cmpf olt, {ax}, {small_limit} : f32"));
        self.b.op("t", format_args!("arith.select {small}, {series}, {signed} : f32"))
    }

    fn finish(self, launch: LaunchShape) -> LoweredKernel {
        let name = &self.kernel.name;
        let params = self.params.join(", ");
        let body = self.b.finish();
        let func = match self.target {
            Target::Cpu => format!("  func.func @{name}({params}) {{\n{body}    return\n  }}\n"),
            Target::Gpu => {
                let block = match &launch {
                    LaunchShape::Gpu { block, .. } => *block,
                    LaunchShape::Cpu { .. } => [1, 1, 1],
                };
                let workgroup = if self.workgroup.is_empty() {
                    String::new()
                } else {
                    format!(" workgroup({})", self.workgroup.join(", "))
                };
                format!(
                    "    gpu.func @{name}({params}){workgroup} kernel attributes {{known_block_size = array<i32: {}, {}, {}>}} {{\n{body}      gpu.return\n    }}\n",
                    block[0], block[1], block[2]
                )
            }
        };
        LoweredKernel {
            name: name.clone(),
            target: self.target,
            func,
            launch,
            buffers: self.bufs.len(),
            syms: self.kernel.syms.clone(),
        }
    }
}
