//! Lowering: a [`Kernel`] into the MLIR text of one function for a [`Target`], plus the launch shape
//! the runtime needs to run it. One file per op family; this file holds what they share: the kernel
//! signature and prologue ([`Frame`]), element loads and stores with dtype conversion, scalar math for
//! each target, and module assembly.
//!
//! The ABI every lowering follows (both targets):
//! - Parameters: one bare pointer per buffer (arguments, results, then [`Kernel::scratch`]), typed
//!   as a rank-0 `memref<T>` (`use-bare-ptr-memref-call-conv`), then one `i64` per symbolic size of
//!   [`Kernel::syms`]. On the CPU two more `i64`s, `lo` and `hi`, select the work items
//!   `[lo, hi)` of [`LaunchShape::Cpu`] to compute, so a thread pool can split any kernel.
//! - Buffers are dense, row-major, 1-D views made with `memref.reinterpret_cast`; element types are
//!   `f32`, `f16`, `bf16`, `i32`, `i64`, `bool` (stored as `i8`) and `f8e4m3` (its bits, stored as
//!   `i8`, encoded and decoded with integer arithmetic in `quant`). Floats are computed in f32; data
//!   movement (`shape`) copies stored bits without converting them.
//! - On the GPU, math goes through LLVM/NVVM intrinsics (`ex2.approx`, `lg2.approx`, `sqrt.rn`) rather
//!   than the `math` dialect, whose NVVM lowering calls libdevice, which kiln does not link. Where
//!   the two targets must agree closely and libm has no intrinsic (sine and cosine for `rope`), both
//!   use the same arithmetic written out here.
//! - Scratch arrays are `memref.alloca`s placed at the function's entry (per thread on the GPU), so a
//!   loop over work items reuses them rather than growing the stack.
//!
//! Every kernel goes through its fusion plan ([`super::fusion`]): a one-op kernel is one phase whose
//! pattern is the op itself, lowered by its family; `fused` kernels are lowered by `fused` (one-pass
//! patterns, built on the families' templates with prologue and epilogue hooks, and the phased
//! fallback) with `chain`, the elementwise evaluator.
//!
//! Guarantees: the text is a function that parses and verifies in MLIR 22 (checked by the emit
//! stage); a kernel that a family cannot lower yields [`LowerError::Unsupported`], never a panic.

/// f32 lanes of the CPU kernels' vectors (`vector<16xf32>`): one AVX-512 register, two on an
/// AVX2-only host, where LLVM splits them. Measured on bench.toml (AVX-512, 2 threads) against 8
/// lanes: prefill 1.1-2x and decode 1.05-1.4x faster, the most for bf16 and FP8, whose widening
/// loads cost instructions per value. Blocks of FP8 scales must span a multiple of it.
pub const CPU_LANES: u64 = 16;

mod attention;
mod chain;
mod elementwise;
mod fused;
mod grad;
mod matmul;
mod moe;
mod promoted;
mod quant;
mod reduce;
mod rope;
mod shape;

use std::fmt;

use kiln_ir::types::Sym;
use kiln_ir::verify::verify;
use kiln_ir::{DType, Dim, Op, TensorType, UnaryOp};

use super::fusion;
use super::kernel::{syms_of, Kernel};
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
    /// A phased kernel: the phases' work items end to end, each phase finished before the next
    /// starts ([`kiln_ir::artifact::CpuKernel::phases`]).
    CpuPhases { phases: Vec<Dim> },
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
    /// The buffers that are parameters of the function, in order (on the CPU, those its body
    /// uses; the packed entry passes these).
    pub passed: Vec<usize>,
    /// Whether the function's last parameter is the table of every buffer's address (the packed
    /// entry's `buffers`), from which it picks experts' weights at run time (CPU).
    pub table: bool,
    pub syms: Vec<Sym>,
    /// For the CPU: the kernel's signature line ([`kiln_ir::artifact::signature`]: buffer types,
    /// sizes and work), which the library carries so a runtime can check the manifest against it.
    pub signature: Option<String>,
}

/// Kernels of one target in one MLIR module.
#[derive(Clone, Debug, PartialEq)]
pub struct LoweredModule {
    pub target: Target,
    pub kernels: Vec<LoweredKernel>,
}

/// The CPU library's thread-local scratch ([`Frame::thread_scratch`]): its symbol, which the CPU
/// back end makes thread-local and shares between the kernels' objects (`cpu::optimized`).
pub const THREAD_SCRATCH: &str = "kiln_thread_scratch";
/// Its size: the AMX path's packed panels and partial sums (`matmul/packed/amx.rs`). Each thread
/// that runs a kernel using it gets its own copy, allocated by the C library when the thread first
/// touches it.
pub const THREAD_SCRATCH_BYTES: u64 = (2 << 20) + (256 << 10);

/// Bytes of a scratch element type.
fn storage_bytes(elem: &str) -> u64 {
    match elem {
        "i8" => 1,
        "bf16" | "f16" => 2,
        "f32" | "i32" => 4,
        "i64" | "f64" => 8,
        other => panic!("no size for scratch element `{other}`"),
    }
}

/// The name of the `gpu.module` GPU kernels live in.
pub const GPU_MODULE: &str = "kiln_kernels";

impl LoweredModule {
    /// The module as MLIR text: a plain module of `func.func`s, or a `gpu.container_module` holding
    /// one `gpu.module` of kernels.
    pub fn text(&self) -> String {
        let funcs = self.funcs();
        match self.target {
            Target::Cpu => format!("module {{\n{}{funcs}}}\n", self.globals()),
            Target::Gpu => {
                format!("module attributes {{gpu.container_module}} {{\n  gpu.module @{GPU_MODULE} {{\n{funcs}  }}\n}}\n")
            }
        }
    }

    /// The kernels' functions, one after another.
    pub fn funcs(&self) -> String {
        self.kernels.iter().map(|k| k.func.as_str()).collect::<Vec<_>>().join("\n")
    }

    /// What the CPU kernels declare at module scope: the thread scratch, where one uses it.
    pub fn globals(&self) -> String {
        let uses = |k: &LoweredKernel| k.func.contains(&format!("@{THREAD_SCRATCH} "));
        if self.target == Target::Cpu && self.kernels.iter().any(uses) {
            format!(
                "memref.global \"private\" @{THREAD_SCRATCH} : memref<{THREAD_SCRATCH_BYTES}xi8> = \
                 uninitialized {{alignment = 64 : i64}}\n"
            )
        } else {
            String::new()
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
    let malformed = |message: String| LowerError::Malformed { kernel: kernel.name.clone(), message };
    let plan = fusion::plan(&kernel.body).map_err(|e| malformed(e.to_string()))?;
    if plan.scratch != kernel.scratch {
        return Err(malformed(format!(
            "it declares {} scratch buffer(s) but its body needs {}",
            kernel.scratch.len(),
            plan.scratch.len()
        )));
    }
    // Every size a phase computes with must be a size argument.
    for p in &plan.phases {
        for n in p.body.nodes() {
            for &r in &p.body.node(n).results {
                let t = p.body.ty(r);
                if let Some(s) = syms_of([t].into_iter()).into_iter().find(|s| !kernel.syms.contains(s)) {
                    return Err(malformed(format!(
                        "its body computes a {t}, but no argument or result binds {}",
                        s.name()
                    )));
                }
            }
        }
    }
    let mut f = Frame::new(kernel, target);
    let launch = fused::lower_plan(&mut f, &plan)?;
    Ok(f.finish(launch))
}

/// Lowers the one op of a kernel in canonical one-op form (buffers: its operands, then its results).
fn lower_op(f: &mut Frame, op: &Op) -> Result<LaunchShape, LowerError> {
    Ok(match op {
        Op::Unary(u) => elementwise::unary(f, *u)?,
        Op::Binary(b) => elementwise::binary(f, *b)?,
        Op::Cast { .. } => elementwise::cast(f)?,
        Op::Reduce { op, axes, .. } => reduce::reduce(f, *op, axes)?,
        Op::Softmax { axis } => reduce::softmax(f, *axis)?,
        Op::RmsNorm { eps } => reduce::rms_norm(f, *eps)?,
        Op::CrossEntropy { ignore_index } => reduce::cross_entropy(f, *ignore_index)?,
        Op::CrossEntropyGrad { ignore_index } => reduce::cross_entropy_grad(f, *ignore_index)?,
        Op::Linear => matmul::linear(f)?,
        Op::MatMul => matmul::matmul(f)?,
        Op::Concat { axis } => shape::concat(f, *axis)?,
        Op::Split { axis, .. } => shape::split(f, *axis)?,
        Op::Broadcast { .. } => shape::broadcast(f)?,
        Op::Transpose { perm } => shape::transpose(f, perm)?,
        Op::Embedding => shape::embedding(f)?,
        Op::Gather { axis } => shape::gather(f, *axis)?,
        Op::Rope(cfg) => rope::rope(f, cfg)?,
        Op::Attention { scale, causal, .. } => attention::attention(f, *scale, *causal)?,
        Op::CacheUpdate => shape::cache_update(f)?,
        Op::TopK { k } => moe::topk(f, *k)?,
        Op::MoeRoute(r) => moe::route(f, r)?,
        Op::MoeExperts { num_experts } => moe::experts(f, *num_experts)?,
        Op::MoeDispatch(d) => moe::dispatch(f, d)?,
        Op::GroupedLinear { num_experts } => moe::grouped_linear(f, *num_experts)?,
        Op::MoeCombine { top_k } => moe::combine(f, *top_k)?,
        Op::Quantize { spec, .. } => quant::quantize(f, spec)?,
        Op::Dequantize { block, .. } => quant::dequantize(f, block)?,
        Op::TakeAlong { axis } => shape::take_along(f, *axis)?,
        Op::AttentionGrad { scale, causal } => attention::attention_grad(f, *scale, *causal)?,
        Op::EmbeddingGrad { rows } => grad::embedding_grad(f, *rows)?,
        Op::ScatterAddAlong { axis, .. } => grad::scatter_add_along(f, *axis)?,
        Op::GroupedLinearWgrad { num_experts } => grad::grouped_linear_wgrad(f, *num_experts)?,
        Op::MoeCombineGrad { top_k } => grad::moe_combine_grad(f, *top_k)?,
        Op::PromotedGemm { form, k_block } => promoted::promoted_gemm(f, *form, *k_block)?,
        // Formation turns these into aliases, runtime steps or buffers; a kernel holding one was
        // built by hand.
        op @ (Op::Reshape { .. }
        | Op::Input { .. }
        | Op::Param { .. }
        | Op::Constant { .. }
        | Op::Send { .. }
        | Op::Recv { .. }
        | Op::AllReduce { .. }
        | Op::AllGather { .. }
        | Op::AllToAll { .. }
        | Op::Fused { .. }) => {
            return Err(f.unsupported(op.name(), "not a computing op: formation never makes it a kernel"))
        }
    })
}

fn check_signature(kernel: &Kernel) -> Result<(), LowerError> {
    let malformed = |message: String| LowerError::Malformed { kernel: kernel.name.clone(), message };
    verify(&kernel.body).map_err(|e| malformed(e.to_string()))?;
    let ins: Vec<&TensorType> = kernel.body.inputs().iter().map(|&(_, v)| kernel.body.ty(v)).collect();
    let outs: Vec<&TensorType> = kernel.body.outputs().iter().map(|&(_, v)| kernel.body.ty(v)).collect();
    if ins != kernel.args.iter().collect::<Vec<_>>() || outs != kernel.results.iter().collect::<Vec<_>>() {
        return Err(malformed("the argument or result types disagree with the body".into()));
    }
    if kernel.syms != syms_of(kernel.args.iter().chain(&kernel.results).chain(&kernel.scratch)) {
        return Err(malformed(format!(
            "size arguments {:?} do not match the symbols of its types",
            kernel.syms
        )));
    }
    Ok(())
}

/// A buffer of the kernel seen as a flat 1-D memref.
#[derive(Clone)]
pub(crate) struct Buffer {
    /// Its number among the kernel's buffers (arguments, results, scratch): its place in the
    /// packed entry's `buffers`, whatever frame (a phase's) sees it.
    pub index: usize,
    pub view: Value,
    /// `memref<?xf32>` or `memref<64xf32>`.
    pub memref: String,
    pub ty: TensorType,
}

/// One buffer of each expert, picked at run time from the table of buffer addresses
/// ([`Frame::table_view`]): expert `e`'s is buffer number `base + stride * e` of the kernel.
pub(crate) struct TableSlot {
    base: usize,
    stride: usize,
    elem: &'static str,
    numel: Value,
}

impl TableSlot {
    /// On the CPU, where `slots[j][e]` (the frame's buffer numbers of expert `e`'s `j`-th buffer)
    /// lie evenly spaced among the kernel's buffers and each slot's buffers share a storage type
    /// and shape: the slots, to be read from the table. `None` elsewhere (the caller picks by
    /// `scf.index_switch`).
    pub fn plan(f: &mut Frame, slots: &[Vec<usize>]) -> Option<Vec<TableSlot>> {
        if f.target != Target::Cpu {
            return None;
        }
        let mut out = Vec::with_capacity(slots.len());
        for bufs in slots {
            let first = &f.bufs[*bufs.first()?];
            let (base, elem, ty) = (first.index, storage_type(first.ty.dtype), first.ty.clone());
            let stride = match bufs.get(1) {
                Some(&b) => f.bufs[b].index.checked_sub(base)?,
                None => 0,
            };
            for (e, &b) in bufs.iter().enumerate() {
                let buf = &f.bufs[b];
                if buf.index != base + stride * e || buf.ty.dtype != ty.dtype || buf.ty.shape != ty.shape {
                    return None;
                }
            }
            let numel = f.numel(&ty.shape);
            out.push(TableSlot { base, stride, elem, numel });
        }
        Some(out)
    }

    /// Expert `e`'s buffer (`e` an `index` value below the number of experts) as a
    /// `memref<?xT>`.
    pub fn view(&self, f: &mut Frame, e: &Value) -> Value {
        let (base, stride) = (f.b.index(self.base as i64), f.b.index(self.stride as i64));
        let at = f.b.muli(e, &stride);
        let at = f.b.addi(&at, &base);
        f.table_view(&at, self.elem, &self.numel)
    }
}

/// The function being written: its signature, prologue values and body.
pub(crate) struct Frame<'k> {
    pub kernel: &'k Kernel,
    pub target: Target,
    pub b: Body,
    /// Arguments, then results.
    pub bufs: Vec<Buffer>,
    syms: Vec<(Sym, Value)>,
    /// The parameter of each buffer (`%a0: memref<f32>`), in buffer order.
    buf_params: Vec<String>,
    /// The line that makes each buffer's view from its parameter, in buffer order; written at the
    /// function's entry by [`Frame::finish`] (on the CPU, only for buffers the body uses).
    view_lines: Vec<String>,
    /// The size and range parameters, after the buffers'.
    params: Vec<String>,
    /// On the CPU, once [`Frame::table_view`] has read one: the table of the buffers' addresses
    /// (the packed entry's `buffers`), its view and memref type; it is the last parameter.
    table: Option<(Value, String)>,
    /// The kernel's buffers, all frames' together: the table's length.
    all_bufs: usize,
    /// `workgroup(...)` attributions of a GPU kernel (shared memory).
    workgroup: Vec<String>,
    /// `lo`, `hi` on the CPU.
    pub range: Option<(Value, Value)>,
    /// Scratch arrays made so far (they are numbered).
    scratches: usize,
    /// On the GPU, inside a phase of a phased kernel (`fused`): the block ids the phase's code sees
    /// (loop variables over its grid, run by the one block of the kernel), whose block has
    /// [`fused::PHASE_BLOCK`] threads whatever a family would choose.
    virtual_blocks: Option<[Value; 3]>,
}

/// The element type kiln stores a dtype as: bool and f8e4m3 as bytes.
fn storage_type(d: DType) -> &'static str {
    match d {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        DType::I32 => "i32",
        DType::I64 => "i64",
        DType::Bool | DType::F8E4M3 => "i8",
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
    fn new(kernel: &'k Kernel, target: Target) -> Frame<'k> {
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
            buf_params: Vec::new(),
            view_lines: Vec::new(),
            params: Vec::new(),
            table: None,
            all_bufs: 0,
            workgroup: Vec::new(),
            range: None,
            scratches: 0,
            virtual_blocks: None,
        };
        let tys: Vec<(String, &TensorType)> =
            (kernel.args.iter().enumerate().map(|(i, t)| (format!("a{i}"), t)))
                .chain(kernel.results.iter().enumerate().map(|(i, t)| (format!("r{i}"), t)))
                .chain(kernel.scratch.iter().enumerate().map(|(i, t)| (format!("s{i}"), t)))
                .collect();
        let mut ptrs = Vec::new();
        for (name, ty) in &tys {
            let elem = storage_type(ty.dtype);
            let p = f.b.named(name);
            f.buf_params.push(format!("{p}: memref<{elem}>"));
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
            let view = f.b.fresh("v");
            let pad = f.b.entry_pad();
            f.view_lines.push(format!(
                "{pad}{view} = memref.reinterpret_cast {p} to offset: [0], sizes: [{size_text}], strides: [1] : memref<{elem}> to {memref}\n"
            ));
            f.bufs.push(Buffer { index: f.bufs.len(), view, memref, ty: (*ty).clone() });
        }
        f.all_bufs = f.bufs.len();
        f
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

    /// On the CPU: buffer number `index` ([`Buffer::index`], an `index` value at run time) as a
    /// `memref<?x{elem}>` of `numel` elements, its address read from the table of every buffer's
    /// address that the packed entry is given (`buffers`). A kernel picking one expert's weights
    /// out of many reads them so, instead of taking each as a parameter and choosing among them by
    /// `scf.index_switch`: for DeepSeek-V3's 256 experts that was a thousand parameters and a tree
    /// of switches whose results LLVM took most of a second to compile, per kernel.
    pub fn table_view(&mut self, index: &Value, elem: &str, numel: &Value) -> Value {
        debug_assert_eq!(self.target, Target::Cpu, "GPU kernels take every buffer as a parameter");
        let n = self.all_bufs;
        let (table, ty) = match &self.table {
            Some((v, _)) => (v.clone(), format!("memref<{n}xi64>")),
            None => {
                let p = self.b.named("tbl");
                let ty = format!("memref<{n}xi64>");
                let v = self.b.entry_op(
                    "buffer table",
                    "tv",
                    format_args!(
                        "memref.reinterpret_cast {p} to offset: [0], sizes: [{n}], strides: [1] : memref<i64> to {ty}"
                    ),
                );
                self.table = Some((v.clone(), format!("{p}: memref<i64>")));
                (v, ty)
            }
        };
        const DESC: &str = "!llvm.struct<(ptr, ptr, i64, array<1 x i64>, array<1 x i64>)>";
        let addr = self.b.op("ta", format_args!("memref.load {table}[{index}] : {ty}"));
        let ptr = self.b.op("tp", format_args!("llvm.inttoptr {addr} : i64 to !llvm.ptr"));
        let (zero, one) = (self.b.constant("0", "i64"), self.b.constant("1", "i64"));
        let size = self.b.op("tn", format_args!("arith.index_cast {numel} : index to i64"));
        let mut d = self.b.op("td", format_args!("llvm.mlir.poison : {DESC}"));
        for (v, at) in [(&ptr, "0"), (&ptr, "1"), (&zero, "2"), (&size, "3, 0"), (&one, "4, 0")] {
            d = self.b.op("td", format_args!("llvm.insertvalue {v}, {d}[{at}] : {DESC}"));
        }
        self.b.op("tw", format_args!("builtin.unrealized_conversion_cast {d} : {DESC} to memref<?x{elem}>"))
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
        let x = self.load_raw(buf, idx);
        self.widen(x, self.bufs[buf].ty.dtype)
    }

    /// Loads element `idx` of buffer `buf` as stored (no conversion): data movement copies bits.
    pub fn load_raw(&mut self, buf: usize, idx: &Value) -> Value {
        let Buffer { view, memref, .. } = &self.bufs[buf];
        let (view, memref) = (view.clone(), memref.clone());
        self.b.op("x", format_args!("memref.load {view}[{idx}] : {memref}"))
    }

    /// Stores a value of the buffer's storage type (from [`Frame::load_raw`]) as element `idx`.
    pub fn store_raw(&mut self, buf: usize, idx: &Value, v: &Value) {
        let Buffer { view, memref, .. } = &self.bufs[buf];
        self.b.line(format_args!("memref.store {v}, {view}[{idx}] : {memref}"));
    }

    /// The storage element type of buffer `buf` (`bf16`, `i8`, ...).
    pub fn storage(&self, buf: usize) -> &'static str {
        storage_type(self.bufs[buf].ty.dtype)
    }

    /// Loads element `idx` of a 1-D memref value of `memref` type holding `dtype` elements (a buffer
    /// chosen at run time, such as one expert's weight), converted to the compute type.
    pub fn load_view(&mut self, view: &Value, memref: &str, dtype: DType, idx: &Value) -> Value {
        let x = self.b.op("x", format_args!("memref.load {view}[{idx}] : {memref}"));
        self.widen(x, dtype)
    }

    /// A scratch array of `n` elements of MLIR type `elem`, allocated once at the function's entry
    /// (per thread on the GPU). Returns the array and its memref type.
    /// `n` elements of `elem` of the CPU library's thread-local scratch ([`THREAD_SCRATCH`]), from
    /// its byte `offset`: for scratch too big for a thread's stack. Every kernel of the library
    /// shares the one array (a thread runs one kernel at a time); what a kernel leaves in it is
    /// never read by another.
    pub fn thread_scratch(&mut self, offset: u64, elem: &str, n: u64) -> (Value, String) {
        let bytes = n * storage_bytes(elem);
        assert!(
            offset + bytes <= THREAD_SCRATCH_BYTES,
            "{bytes} bytes from {offset} overflow the thread scratch"
        );
        let all = format!("memref<{THREAD_SCRATCH_BYTES}xi8>");
        let g = self.b.entry_op(
            "thread scratch",
            "tls",
            format_args!("memref.get_global @{THREAD_SCRATCH} : {all}"),
        );
        let at = self.b.index(offset as i64);
        let ty = format!("memref<{n}x{elem}>");
        let v = self.b.op("tls", format_args!("memref.view {g}[{at}][] : {all} to {ty}"));
        (v, ty)
    }

    pub fn scratch(&mut self, elem: &str, n: u64) -> (Value, String) {
        let ty = format!("memref<{n}x{elem}>");
        self.scratches += 1;
        let key = format!("scratch {}", self.scratches);
        let v = self.b.entry_op(&key, "scratch", format_args!("memref.alloca() : {ty}"));
        (v, ty)
    }

    /// An integer value of `dtype` (i32 or i64, in its compute type) as an `index` clamped to
    /// `[0, n - 1]`: how kernels read ids and indices without ever addressing outside a buffer.
    pub fn clamped_index(&mut self, v: &Value, dtype: DType, n: &Value) -> Value {
        let wide = match dtype {
            DType::I64 => v.clone(),
            _ => self.b.op("i", format_args!("arith.extsi {v} : i32 to i64")),
        };
        let zero = self.b.constant("0", "i64");
        let one = self.b.index(1);
        let last = self.b.subi(n, &one);
        let last = self.b.op("i", format_args!("arith.index_cast {last} : index to i64"));
        let lo = self.b.op("i", format_args!("arith.maxsi {wide}, {zero} : i64"));
        let c = self.b.op("i", format_args!("arith.minsi {lo}, {last} : i64"));
        self.b.op("i", format_args!("arith.index_cast {c} : i64 to index"))
    }

    /// An integer value of `dtype` (i32 or i64, in its compute type) as an `index`, negative values
    /// becoming huge ones, so one unsigned comparison checks both ends of a range.
    pub fn int_to_index(&mut self, v: &Value, dtype: DType) -> Value {
        let wide = match dtype {
            DType::I64 => v.clone(),
            _ => self.b.op("i", format_args!("arith.extsi {v} : i32 to i64")),
        };
        self.b.op("i", format_args!("arith.index_cast {wide} : i64 to index"))
    }

    /// An `index` as an integer of the compute type of `dtype` (i32 or i64), truncating.
    pub fn index_to_int(&mut self, i: &Value, dtype: DType) -> Value {
        let ty = compute_type(dtype);
        self.b.op("i", format_args!("arith.index_cast {i} : index to {ty}"))
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
            DType::F8E4M3 => self.f8_decode(&x),
            DType::F16 | DType::BF16 => {
                let from = storage_type(dtype);
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
            DType::F8E4M3 => self.f8_encode(&v),
            DType::F16 | DType::BF16 => {
                let to = storage_type(dtype);
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
        // The phases of one kernel may ask for the same name at different sizes: the later sizes get
        // names of their own.
        let taken = |w: &Vec<String>, n: &str| w.iter().any(|k| k.starts_with(&format!("%{n}: ")));
        let mut full = format!("{name}_{elem}");
        let mut key = format!("%{full}: {ty}");
        if !self.workgroup.contains(&key) && taken(&self.workgroup, &full) {
            full = format!("{name}{elems}_{elem}");
            key = format!("%{full}: {ty}");
        }
        if !self.workgroup.contains(&key) {
            self.workgroup.push(key);
        }
        (Value::named(&full), ty)
    }

    /// Threads per block for a GPU family that would choose `natural`: [`fused::PHASE_BLOCK`]
    /// inside a phase of a phased kernel, whose one block runs every phase.
    pub fn gpu_block(&self, natural: i64) -> i64 {
        match self.virtual_blocks {
            Some(_) => i64::from(fused::PHASE_BLOCK),
            None => natural,
        }
    }

    /// `gpu.thread_id x`, `gpu.block_id y`, ...: computed once, at the kernel's entry.
    pub fn gpu_id(&mut self, what: &str, axis: char) -> Value {
        if let (Some(ids), "block_id") = (&self.virtual_blocks, what) {
            return ids[(axis as usize).saturating_sub('x' as usize).min(2)].clone();
        }
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
            DType::F16 | DType::BF16 | DType::F8E4M3 => {
                let r = self.narrow(v.clone(), dtype);
                self.widen(r, dtype)
            }
            _ => v.clone(),
        }
    }

    /// `c ? a : b` on values of MLIR type `ty`.
    pub fn select(&mut self, c: &Value, a: &Value, b: &Value, ty: &str) -> Value {
        self.b.op("s", format_args!("arith.select {c}, {a}, {b} : {ty}"))
    }

    /// `arith.cmpi {pred}` (or `cmpf` for `f32`) of two values of MLIR type `ty`.
    pub fn cmp(&mut self, pred: &str, a: &Value, b: &Value, ty: &str) -> Value {
        let op = if ty == "f32" { "cmpf" } else { "cmpi" };
        self.b.op("p", format_args!("arith.{op} {pred}, {a}, {b} : {ty}"))
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

    /// `exp` of the 16 lanes of a `vector<16xf32>` on the CPU, in vector arithmetic (no calls:
    /// `math.exp` on a vector becomes 16 libm calls). `x = n ln 2 + r` with `|r| <= ln 2 / 2`: `n`
    /// rounded to nearest by adding and subtracting 1.5 * 2^23, whose sum also holds `n` in its low
    /// mantissa bits, from which `2^n` is built in the exponent field; `ln 2` in two parts so that `r`
    /// is exact; `e^r` by its Taylor polynomial of degree 7 (remainder below 6e-9 relative), so the
    /// result is within about an ulp of the exact value, as libm's `expf` is. `x` is first clamped to `[-87, 88]`: below,
    /// the result is `e^-87` (about 1.6e-38, the smallest normal magnitude's order) where libm's would
    /// be subnormal or 0, and `-inf` gives that too, so callers mask the lanes that must be 0; above,
    /// `e^88` where libm's overflows. NaN stays NaN. Like the GPU's `ex2.approx`, not libm's result
    /// to the last bit.
    pub fn exp_vec(&mut self, x: &Value) -> Value {
        use matmul::VEC;
        const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23
        let splat = |f: &mut Self, c: f64| {
            f.b.constant(&format!("dense<{}>", crate::codegen::mlir::f32_literal(c)), VEC)
        };
        let (lo, hi) = (splat(self, -87.0), splat(self, 88.0));
        let x = self.b.op("e", format_args!("arith.maximumf {x}, {lo} : {VEC}"));
        let x = self.b.op("e", format_args!("arith.minimumf {x}, {hi} : {VEC}"));
        let (log2e, round) = (splat(self, std::f64::consts::LOG2_E), splat(self, f64::from(ROUND)));
        let t = self.b.op("e", format_args!("arith.mulf {x}, {log2e} : {VEC}"));
        let t = self.b.op("e", format_args!("arith.addf {t}, {round} : {VEC}"));
        let n = self.b.op("e", format_args!("arith.subf {t}, {round} : {VEC}"));
        let (ln2_hi, ln2_lo) = (splat(self, 0.693_359_375), splat(self, -2.121_944_4e-4));
        let a = self.b.op("e", format_args!("arith.mulf {n}, {ln2_hi} : {VEC}"));
        let r = self.b.op("e", format_args!("arith.subf {x}, {a} : {VEC}"));
        let a = self.b.op("e", format_args!("arith.mulf {n}, {ln2_lo} : {VEC}"));
        let r = self.b.op("e", format_args!("arith.subf {r}, {a} : {VEC}"));
        let mut p = splat(self, 1.0 / 5040.0);
        for c in [1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
            let c = splat(self, c);
            p = self.b.op("e", format_args!("vector.fma {p}, {r}, {c} : {VEC}"));
        }
        let ivec = "vector<16xi32>";
        let bits = self.b.op("e", format_args!("arith.bitcast {t} : {VEC} to {ivec}"));
        let bias = self.b.constant(&format!("dense<{}>", 127 - ROUND.to_bits() as i64), ivec);
        let bits = self.b.op("e", format_args!("arith.addi {bits}, {bias} : {ivec}"));
        let shift = self.b.constant("dense<23>", ivec);
        let bits = self.b.op("e", format_args!("arith.shli {bits}, {shift} : {ivec}"));
        let scale = self.b.op("e", format_args!("arith.bitcast {bits} : {ivec} to {VEC}"));
        self.b.op("e", format_args!("arith.mulf {p}, {scale} : {VEC}"))
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
        // On the CPU a buffer whose view the body never uses is not a parameter: the experts'
        // weights a kernel reads through the table ([`Frame::table_view`]), or a buffer it does
        // not read. The packed entry passes the others. A GPU kernel takes every buffer.
        let passed: Vec<usize> = match self.target {
            Target::Cpu => {
                let mentioned = self.b.mentioned();
                (0..self.bufs.len())
                    .filter(|&i| mentioned.contains(self.bufs[i].view.to_string().trim_start_matches('%')))
                    .collect()
            }
            Target::Gpu => (0..self.bufs.len()).collect(),
        };
        let params: Vec<&str> = (passed.iter().map(|&i| self.buf_params[i].as_str()))
            .chain(self.params.iter().map(String::as_str))
            .collect();
        let mut params = params.join(", ");
        let prologue: String = passed.iter().map(|&i| self.view_lines[i].as_str()).collect();
        if let Some((_, decl)) = &self.table {
            params.push_str(", ");
            params.push_str(decl);
        }
        let table = self.table.is_some();
        let body = self.b.finish_with(&prologue);
        let func = match self.target {
            Target::Cpu => format!("  func.func @{name}({params}) {{\n{body}    return\n  }}\n"),
            Target::Gpu => {
                let block = match &launch {
                    LaunchShape::Gpu { block, .. } => *block,
                    LaunchShape::Cpu { .. } | LaunchShape::CpuPhases { .. } => [1, 1, 1],
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
        let (work, phases) = match &launch {
            LaunchShape::Cpu { work } => (Some(*work), &[][..]),
            LaunchShape::CpuPhases { phases } => (Some(Dim::known(0)), &phases[..]),
            LaunchShape::Gpu { .. } => (None, &[][..]),
        };
        let signature = match work {
            Some(work) => {
                use kiln_ir::artifact::{ArgRole, ArgSig};
                let k = self.kernel;
                let sig = |t: &TensorType, role| ArgSig { dtype: t.dtype, shape: t.shape.clone(), role };
                let args: Vec<ArgSig> = (k.args.iter().map(|t| sig(t, ArgRole::Input)))
                    .chain(k.results.iter().map(|t| sig(t, ArgRole::Output)))
                    .chain(k.scratch.iter().map(|t| sig(t, ArgRole::Scratch)))
                    .collect();
                Some(kiln_ir::artifact::signature(&args, &k.syms, work, phases))
            }
            None => None,
        };
        LoweredKernel {
            name: name.clone(),
            target: self.target,
            func,
            launch,
            buffers: self.bufs.len(),
            passed,
            table,
            syms: self.kernel.syms.clone(),
            signature,
        }
    }
}
