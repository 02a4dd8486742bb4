//! Lowering a kernel's fusion plan ([`crate::codegen::fusion`]): the one-pass patterns, and the phased
//! fallback for every other body.
//!
//! **One pass.** Each pattern is a family's template with hooks, so a fused kernel is exactly as
//! parallel as the op it is built around:
//!
//! - elementwise: `chain::elementwise`, one work item or thread per output element;
//! - row (`rms_norm`, `softmax`, `reduce`): `reduce`'s templates, whose loads of the input call the
//!   prologue (the chain evaluating the op's operand at that element) and whose stores call the
//!   epilogue (the op's result, rounded to its dtype, seeded into the chain, then every output of
//!   the body evaluated and stored at that element). Residual add + RMS norm reads `x` and `r` and
//!   writes `h = x + r` and the norm in one pass (the prologue runs in both passes over the row;
//!   an add is cheaper than a second kernel's load);
//! - linear: `matmul`'s register-blocked CPU kernel and shared-memory GPU tiles over several weights
//!   at once (one load of `x` serves each weight's accumulators; on the CPU a block holds
//!   `NR / weights` columns per weight so they stay in registers), and the epilogue at each output
//!   element: a gate/up pair with `silu(gate) * up`, or a residual add, never leave registers.
//!   `grouped_linear`s (routed experts) go through `matmul::grouped_with`, one work item per row.
//!   An FP8 operand (`dequantize` of codes and scales, `fp8-gemm`) is decoded and scaled by the
//!   GEMM's loads (`matmul::Operand::Fp8`).
//!
//! **Phases** (any other body). The phases must run one after another, and they need not iterate
//! over the same space, so they cannot split one work range: on the CPU the kernel's items are the
//! phases' items end to end ([`LaunchShape::CpuPhases`]), each phase lowered as its own pattern over
//! the part of the range that falls in its items, and the runtime launches one phase at a time over
//! its threads (a barrier between phases, as between kernels); on the GPU the
//! kernel is one block of [`PHASE_BLOCK`] threads that runs every phase in order, looping over each
//! phase's grid (the phase's code sees the loop variables as its block ids, and every family sizes
//! its block to [`PHASE_BLOCK`] there), with a barrier after every block of every phase. Values that
//! cross phases live in the kernel's results or its scratch buffers. Each phase is a one-pass
//! pattern lowered as above, into the same function.
//!
//! On the GPU the trade-off, chosen over splitting the kernel into several launches: the artifact's
//! launch description stays one grid per kernel, at the price of speed: one block does the whole
//! work. That is right for what falls back (small or rare groups) and wrong for big ones. On the
//! CPU a phase is as parallel as the pattern it is, at the cost of one pool barrier per phase.

use kiln_ir::{Graph, NodeId, Op, TensorType};

use super::chain::{self, Chain};
use super::{lower_op, matmul, reduce, Buffer, Frame, GridDim, LaunchShape, LowerError, Target};
use crate::codegen::fusion::{self, GemmOperand, Loc, Pattern, Phase, Plan};
use crate::codegen::kernel::Kernel;
use crate::codegen::mlir::{for_loop, Body, Value};

/// Threads of the one block of a phased GPU kernel, and of every phase's block inside it.
pub(super) const PHASE_BLOCK: u32 = 256;

/// Static shared memory a CUDA block may declare.
const MAX_STATIC_SHARED: u64 = 48 * 1024;

/// Bytes of a `workgroup` attribution `%name: memref<NxT, ...>`.
fn workgroup_bytes(decl: &str) -> u64 {
    let Some(ty) = decl.split("memref<").nth(1) else { return 0 };
    let Some((n, rest)) = ty.split_once('x') else { return 0 };
    let elem = rest.split(',').next().unwrap_or_default();
    let size = match elem {
        "f64" | "i64" => 8,
        "f32" | "i32" => 4,
        "f16" | "bf16" => 2,
        _ => 1,
    };
    n.parse::<u64>().unwrap_or(0) * size
}

impl Frame<'_> {
    /// A frame for `kernel` (a phase) writing into this frame's function: it takes the body, shared
    /// memory and counters until [`Frame::adopt`] gives them back.
    fn child<'p>(&mut self, kernel: &'p Kernel, bufs: Vec<Buffer>) -> Frame<'p> {
        Frame {
            kernel,
            target: self.target,
            b: std::mem::take(&mut self.b),
            bufs,
            syms: self.syms.clone(),
            buf_params: Vec::new(),
            view_lines: Vec::new(),
            params: Vec::new(),
            table: self.table.take(),
            all_bufs: self.all_bufs,
            workgroup: std::mem::take(&mut self.workgroup),
            range: self.range.clone(),
            scratches: self.scratches,
            virtual_blocks: self.virtual_blocks.clone(),
        }
    }

    /// A frame whose text is thrown away: lowering a phase once in it tells its launch shape.
    fn probe<'p>(&self, kernel: &'p Kernel, bufs: Vec<Buffer>) -> Frame<'p> {
        Frame {
            kernel,
            target: self.target,
            b: Body::new(0),
            bufs,
            syms: self.syms.clone(),
            buf_params: Vec::new(),
            view_lines: Vec::new(),
            params: Vec::new(),
            table: self.table.clone(),
            all_bufs: self.all_bufs,
            workgroup: self.workgroup.clone(),
            range: self.range.clone(),
            scratches: self.scratches,
            virtual_blocks: self.virtual_blocks.clone(),
        }
    }

    fn adopt(&mut self, child: Frame<'_>) {
        self.b = child.b;
        self.table = child.table;
        self.workgroup = child.workgroup;
        self.scratches = child.scratches;
    }

    /// The kernel buffer at `loc`.
    fn at(&self, loc: Loc) -> Buffer {
        let (args, results) = (self.kernel.args.len(), self.kernel.results.len());
        self.bufs[match loc {
            Loc::Arg(i) => i,
            Loc::Result(i) => args + i,
            Loc::Scratch(i) => args + results + i,
        }]
        .clone()
    }
}

/// The kernel of one phase: its body, its op's workspace (the parent's scratch buffers it uses),
/// and the name of the kernel it belongs to (for messages).
fn phase_kernel(parent: &Kernel, phase: &Phase) -> Kernel {
    let tys = |vs: Vec<kiln_ir::ValueId>| vs.into_iter().map(|v| phase.body.ty(v).clone()).collect();
    let scratch = phase
        .workspace
        .iter()
        .filter_map(|l| match l {
            Loc::Scratch(i) => parent.scratch.get(*i).cloned(),
            _ => None,
        })
        .collect();
    Kernel {
        id: parent.id,
        name: parent.name.clone(),
        body: phase.body.clone(),
        args: tys(phase.body.inputs().iter().map(|&(_, v)| v).collect()),
        results: tys(phase.body.outputs().iter().map(|&(_, v)| v).collect()),
        scratch,
        syms: parent.syms.clone(),
    }
}

/// The buffers of a phase: its arguments', results' and workspace's locations in the kernel.
fn phase_buffers(f: &Frame, k: &Kernel, phase: &Phase) -> Result<Vec<Buffer>, LowerError> {
    let bufs: Vec<Buffer> =
        phase.args.iter().chain(&phase.results).chain(&phase.workspace).map(|&l| f.at(l)).collect();
    if bufs.len() != k.args.len() + k.results.len() + k.scratch.len() {
        return Err(LowerError::Malformed {
            kernel: f.kernel.name.clone(),
            message: "a phase's workspace is not among its scratch buffers".into(),
        });
    }
    let want = k.args.iter().chain(&k.results).chain(&k.scratch);
    if bufs.iter().zip(want).any(|(b, t)| &b.ty != t) {
        return Err(LowerError::Malformed {
            kernel: f.kernel.name.clone(),
            message: "a phase of its fusion plan reads or writes a buffer of another type".into(),
        });
    }
    Ok(bufs)
}

/// Lowers a kernel by its plan: one pass when it has one, else phases.
pub(super) fn lower_plan(f: &mut Frame, plan: &Plan) -> Result<LaunchShape, LowerError> {
    if !plan.is_one_pass() {
        return phased(f, plan);
    }
    let phase = &plan.phases[0];
    let k = phase_kernel(f.kernel, phase);
    let bufs = phase_buffers(f, &k, phase)?;
    let mut child = f.child(&k, bufs);
    let launch = pattern(&mut child, &phase.body, &phase.pattern);
    f.adopt(child);
    launch
}

/// Lowers one pattern into `f`, whose buffers are the body's inputs then outputs.
fn pattern(f: &mut Frame, body: &Graph, pattern: &Pattern) -> Result<LaunchShape, LowerError> {
    match pattern {
        Pattern::Op => {
            let op = body
                .nodes()
                .into_iter()
                .map(|n| &body.node(n).op)
                .find(|op| !matches!(op, Op::Input { .. }))
                .ok_or_else(|| f.unsupported("fused", "a one-op phase without an op"))?;
            lower_op(f, op)
        }
        Pattern::Elementwise => chain::elementwise(f, body),
        Pattern::Row { anchor } => row(f, body, *anchor),
        Pattern::Linear { anchors } => linear(f, body, anchors),
    }
}

/// A row op with its prologue and epilogue. See the module documentation.
fn row(f: &mut Frame, body: &Graph, anchor: NodeId) -> Result<LaunchShape, LowerError> {
    let node = body.node(anchor);
    let chain = Chain::new(f, body);
    let x = node.inputs[0];
    let xt: TensorType = body.ty(x).clone();
    let y = node.results[0];
    let dtype = body.ty(y).dtype;
    // Loading the op's input starts an element: a new region in the row templates.
    let load = |f: &mut Frame, i: &Value| {
        chain.start();
        chain.at(f, x, i)
    };
    let epilogue = |f: &mut Frame, i: &Value, v: &Value| {
        let r = chain.round(f, v, dtype);
        chain.seed(y, i, r);
        chain.store_outputs(f, i);
    };
    let launch = match &node.op {
        Op::RmsNorm { eps } => {
            let w = node.inputs[1];
            let weight = |f: &mut Frame, t: &Value| chain.at(f, w, t);
            reduce::rms_norm_with(f, *eps, (&xt.shape, xt.dtype), &load, &weight, &epilogue)?
        }
        Op::Softmax { axis } => reduce::softmax_with(f, *axis, &xt.shape, &load, &epilogue)?,
        Op::Reduce { op, axes, .. } => {
            // The result is stored after the loop over the row: another region.
            let store = |f: &mut Frame, r: &Value, v: &Value| {
                chain.start();
                epilogue(f, r, v);
            };
            reduce::reduce_with(f, *op, axes, &xt, &load, &store)?
        }
        op => return Err(f.unsupported(op.name(), "not a row op")),
    };
    chain.finish()?;
    Ok(launch)
}

/// `linear`s (or `grouped_linear`s) sharing their input, with their epilogue. See the module
/// documentation.
fn linear(f: &mut Frame, body: &Graph, anchors: &[NodeId]) -> Result<LaunchShape, LowerError> {
    let inputs: Vec<kiln_ir::ValueId> = body.inputs().iter().map(|&(_, v)| v).collect();
    // The fusion analysis guarantees the input and weights are (reshapes of) arguments or
    // `dequantize`s of arguments; a reshape keeps the bytes, so the argument's buffer is read as
    // it is, and a `dequantize` is done by the loads.
    let arg = |v| inputs.iter().position(|&i| i == v);
    let operand = |v| -> Option<matmul::Operand> {
        Some(match fusion::gemm_operand(body, v)? {
            GemmOperand::Input(i) => matmul::Operand::Plain(arg(i)?),
            GemmOperand::Fp8 { codes, scales, rows, cols } => {
                matmul::Operand::Fp8 { codes: arg(codes)?, scales: arg(scales)?, rows, cols }
            }
        })
    };
    let bad = || f.unsupported("linear", "the fused GEMM's input or weight is not an argument");
    let first = body.node(anchors[0]);
    let x = operand(first.inputs[0]).ok_or_else(bad)?;
    let weights: Vec<Vec<matmul::Operand>> = anchors
        .iter()
        .map(|&a| fusion::gemm_weights(body, a).iter().map(|&w| operand(w)).collect::<Option<Vec<_>>>())
        .collect::<Option<_>>()
        .ok_or_else(bad)?;
    let results: Vec<kiln_ir::ValueId> = anchors.iter().map(|&a| body.node(a).results[0]).collect();
    let dtype = body.ty(results[0]).dtype;
    let chain = Chain::new(f, body);
    let epilogue = |f: &mut Frame, idx: &Value, ys: &[Value]| {
        chain.start();
        for (&r, y) in results.iter().zip(ys) {
            let y = chain.round(f, y, dtype);
            chain.seed(r, idx, y);
        }
        chain.store_outputs(f, idx);
    };
    let w0 = fusion::gemm_weights(body, anchors[0])[0];
    let shapes = (body.ty(first.inputs[0]).shape.clone(), body.ty(w0).shape.clone());
    let launch = match first.op {
        Op::GroupedLinear { .. } => {
            let offsets =
                fusion::input_behind_reshapes(body, first.inputs[1]).and_then(arg).ok_or_else(bad)?;
            matmul::grouped_with(f, &x, offsets, &weights, (&shapes.0, &shapes.1), &epilogue)?
        }
        _ => {
            let ws: Vec<matmul::Operand> = weights.into_iter().flatten().collect();
            matmul::linear_with(f, &x, &ws, (&shapes.0, &shapes.1), &epilogue)?
        }
    };
    chain.finish()?;
    Ok(launch)
}

/// The phased fallback. See the module documentation.
fn phased(f: &mut Frame, plan: &Plan) -> Result<LaunchShape, LowerError> {
    match f.target {
        Target::Cpu => {
            // The phases' items end to end: each phase runs the part of `[lo, hi)` that falls in
            // its own items, shifted to start at 0 (the runtime launches one phase at a time).
            let (lo, hi) = f.range.clone().expect("CPU frames have a work range");
            let mut start = f.b.index(0);
            let mut phases = Vec::with_capacity(plan.phases.len());
            for p in &plan.phases {
                let (work, next) = cpu_phase(f, p, (&lo, &hi), &start)?;
                phases.push(work);
                start = next;
            }
            Ok(LaunchShape::CpuPhases { phases })
        }
        Target::Gpu => {
            let zero = f.b.index(0);
            f.virtual_blocks = Some([zero.clone(), zero.clone(), zero]);
            for p in &plan.phases {
                gpu_phase(f, p)?;
            }
            f.virtual_blocks = None;
            // Shared memory is static: every phase's buffers at once (those of one name and size
            // are shared), within what a block may declare.
            let bytes: u64 = f.workgroup.iter().map(|w| workgroup_bytes(w)).sum();
            if bytes > MAX_STATIC_SHARED {
                return Err(f.unsupported(
                    "fused",
                    format!(
                        "its phases need {bytes} bytes of shared memory; a block has {MAX_STATIC_SHARED}"
                    ),
                ));
            }
            Ok(LaunchShape::Gpu { grid: [GridDim::one(); 3], block: [PHASE_BLOCK, 1, 1] })
        }
    }
}

/// One phase on the CPU, whose items start at item `start` of the kernel: the part of the kernel's
/// range `[lo, hi)` among them. Returns the phase's work and the item after its last.
fn cpu_phase(
    f: &mut Frame,
    phase: &Phase,
    (lo, hi): (&Value, &Value),
    start: &Value,
) -> Result<(kiln_ir::Dim, Value), LowerError> {
    let k = phase_kernel(f.kernel, phase);
    let bufs = phase_buffers(f, &k, phase)?;
    let mut probe = f.probe(&k, bufs.clone());
    let LaunchShape::Cpu { work } = pattern(&mut probe, &phase.body, &phase.pattern)? else {
        return Err(f.unsupported("fused", "a CPU phase without a one-range CPU launch shape"));
    };
    let n = f.dim(work);
    let end = f.b.addi(start, &n);
    // clamp(x, start, end) - start, for the range's two ends.
    let local = |f: &mut Frame, x: &Value| {
        let up = f.b.op("i", format_args!("arith.maxui {x}, {start} : index"));
        let clamped = f.b.minui(&up, &end);
        f.b.subi(&clamped, start)
    };
    let (plo, phi) = (local(f, lo), local(f, hi));
    let mut child = f.child(&k, bufs);
    child.range = Some((plo, phi));
    let launch = pattern(&mut child, &phase.body, &phase.pattern);
    f.adopt(child);
    launch.map(|_| (work, end))
}

/// One phase on the GPU: its grid walked by the kernel's one block.
fn gpu_phase(f: &mut Frame, phase: &Phase) -> Result<(), LowerError> {
    let k = phase_kernel(f.kernel, phase);
    let bufs = phase_buffers(f, &k, phase)?;
    let mut probe = f.probe(&k, bufs.clone());
    let LaunchShape::Gpu { grid, block } = pattern(&mut probe, &phase.body, &phase.pattern)? else {
        return Err(f.unsupported("fused", "a GPU phase without a GPU launch shape"));
    };
    if block.iter().product::<u32>() != PHASE_BLOCK {
        return Err(f.unsupported("fused", format!("a phase needs a block of {block:?} threads")));
    }
    // Blocks along each axis: a loop, or block 0 when there is one.
    let one = f.b.index(1);
    let counts: Vec<Option<Value>> = grid
        .iter()
        .map(|g: &GridDim| {
            let w = f.dim(g.work);
            let per = f.b.index(g.per_block as i64);
            let up = f.b.index(g.per_block as i64 - 1);
            let sum = f.b.addi(&w, &up);
            let n = f.b.divui(&sum, &per);
            (n != one).then_some(n)
        })
        .collect();
    let mut result = Ok(());
    let ids = f.virtual_blocks.clone().expect("set by `phased`");
    over_grid(f, &counts, 2, ids, &mut |f, ids| {
        let mut child = f.child(&k, bufs.clone());
        child.virtual_blocks = Some(ids);
        result = pattern(&mut child, &phase.body, &phase.pattern).map(|_| ());
        f.adopt(child);
        // After every block of every phase: the next block may reuse shared memory this one still
        // reads (a family's code assumes a fresh block), and the next phase reads what this one
        // wrote to global memory from other threads.
        f.b.line("gpu.barrier");
    });
    result
}

/// Runs `body` for every block id of the grid, axes `axis` down to x (z outermost).
fn over_grid(
    f: &mut Frame,
    counts: &[Option<Value>],
    axis: usize,
    ids: [Value; 3],
    body: &mut dyn FnMut(&mut Frame, [Value; 3]),
) {
    let next = |f: &mut Frame, ids: [Value; 3], body: &mut dyn FnMut(&mut Frame, [Value; 3])| match axis {
        0 => body(f, ids),
        _ => over_grid(f, counts, axis - 1, ids, body),
    };
    match &counts[axis] {
        None => next(f, ids, body),
        Some(n) => {
            let (zero, one) = (f.b.index(0), f.b.index(1));
            for_loop(f, &zero, n, &one, |f, iv| {
                let mut ids = ids;
                ids[axis] = iv.clone();
                next(f, ids, body);
            });
        }
    }
}
