//! Elementwise kernels: unary functions, binary operations with NumPy broadcasting, and casts.
//!
//! Assumes a one-op kernel whose types shape inference accepted (the frame checked the signature).
//! Iteration is over the flat index of the output: on the CPU a loop over the work items `[lo, hi)`
//! (work = output elements); on the GPU one thread per output element, 256 threads per block.
//!
//! Broadcast operands are read through the cheapest correct index: the output index itself when the
//! shapes are equal, `i mod n` when the operand is a suffix of the output shape (a bias or a norm
//! weight), `(i / inner) mod n` when it is a run of the output's dimensions with ones after it (a
//! per-token scale), element 0 for one-element operands, and otherwise the output index decomposed
//! into coordinates (one division per output dimension).
//!
//! Semantics: floats are computed in f32 and rounded to the result dtype on store; `max`/`min`
//! propagate NaN; integer arithmetic wraps; float-to-integer casts truncate and saturate, NaN giving
//! 0 (LLVM's `fptosi.sat`, Rust's `as`; the interpreter rejects NaN and out-of-range values, so the
//! two agree wherever both are defined); casts to `bool` test `!= 0`. Not handled (typed
//! `Unsupported`): integer division (a zero divisor would trap in the kernel rather than be reported),
//! arithmetic on `bool`, and f8e4m3 (see the frame).

use kiln_ir::{BinaryOp, DType, Dim, UnaryOp};

use super::{compute_type, Frame, GridDim, LaunchShape, LowerError, Target};
use crate::codegen::mlir::{for_loop, if_then, Value};

/// Threads per block of elementwise GPU kernels.
const BLOCK: u32 = 256;

/// Runs `body(f, i)` for each flat output index `i` of an output of `n` elements.
pub(super) fn each_element(f: &mut Frame, n: Dim, body: impl FnOnce(&mut Frame, &Value)) -> LaunchShape {
    match f.target {
        Target::Cpu => {
            let (lo, hi) = f.range.clone().expect("CPU frames have a work range");
            let one = f.b.index(1);
            for_loop(f, &lo, &hi, &one, body);
            LaunchShape::Cpu { work: n }
        }
        Target::Gpu => {
            let total = f.dim(n);
            let tid = f.gpu_id("thread_id", 'x');
            let bid = f.gpu_id("block_id", 'x');
            let bs = f.b.index(i64::from(BLOCK));
            let base = f.b.muli(&bid, &bs);
            let i = f.b.addi(&base, &tid);
            let inside = f.b.op("p", format_args!("arith.cmpi ult, {i}, {total} : index"));
            if_then(f, &inside, |f| body(f, &i));
            LaunchShape::Gpu {
                grid: [GridDim { work: n, per_block: u64::from(BLOCK) }, GridDim::one(), GridDim::one()],
                block: [BLOCK, 1, 1],
            }
        }
    }
}

fn output_numel(f: &Frame, op: &str) -> Result<Dim, LowerError> {
    f.result(0).ty.numel().ok_or_else(|| f.unsupported(op, "the element count does not fit a dimension"))
}

pub(super) fn unary(f: &mut Frame, u: UnaryOp) -> Result<LaunchShape, LowerError> {
    let n = output_numel(f, u.name())?;
    Ok(each_element(f, n, |f, i| {
        let x = f.load(0, i);
        let y = f.unary(u, &x);
        f.store(1, i, &y);
    }))
}

/// The index of the element of an operand of shape `arg` that broadcasts to output index `i` of
/// shape `out`.
pub(super) fn broadcast_index(f: &mut Frame, arg: &[Dim], out: &[Dim], i: &Value) -> Value {
    let one = Dim::known(1);
    let core: &[Dim] = {
        let lead = arg.iter().take_while(|&&d| d == one).count();
        &arg[lead..]
    };
    if arg == out {
        return i.clone();
    }
    if core.iter().all(|&d| d == one) {
        return f.b.index(0);
    }
    if out.ends_with(core) {
        let n = f.prod(core);
        return f.b.remui(i, &n);
    }
    // A contiguous run of the output's dimensions with ones around it (a per-token scale
    // `[B, T, 1]` of `[B, T, D]`): one division, and a remainder unless the run starts the shape.
    let trail = core.iter().rev().take_while(|&&d| d == one).count();
    let run = &core[..core.len() - trail];
    let start = out.len() - trail - run.len();
    if out[start..out.len() - trail] == *run {
        let inner = f.prod(&out[out.len() - trail..]);
        let q = f.b.divui(i, &inner);
        if start == 0 {
            return q;
        }
        let n = f.prod(run);
        return f.b.remui(&q, &n);
    }
    // General case: peel coordinates off the output index from the innermost dimension out.
    let offset = out.len() - arg.len();
    let mut rest = i.clone();
    let mut index = f.b.index(0);
    let mut stride = f.b.index(1);
    for k in (0..out.len()).rev() {
        let d = f.dim(out[k]);
        let coord = if k == 0 { rest.clone() } else { f.b.remui(&rest, &d) };
        if k > 0 {
            rest = f.b.divui(&rest, &d);
        }
        if k >= offset && arg[k - offset] != one {
            let term = f.b.muli(&coord, &stride);
            index = f.b.addi(&index, &term);
            let ad = f.dim(arg[k - offset]);
            stride = f.b.muli(&stride, &ad);
        }
    }
    index
}

/// The `arith` op computing `op` on operands of `dtype`, or why there is none.
pub(super) fn binary_arith(op: BinaryOp, dtype: DType) -> Result<&'static str, &'static str> {
    Ok(match (op, dtype) {
        (_, DType::Bool) => return Err("arithmetic on bool is not defined"),
        (BinaryOp::Div, DType::I32 | DType::I64) => {
            return Err("integer division (a zero divisor would trap) is not lowered yet")
        }
        (_, DType::I32 | DType::I64) => match op {
            BinaryOp::Add => "addi",
            BinaryOp::Sub => "subi",
            BinaryOp::Mul => "muli",
            BinaryOp::Max => "maxsi",
            BinaryOp::Min => "minsi",
            BinaryOp::Div => unreachable!("handled above"),
        },
        _ => match op {
            BinaryOp::Add => "addf",
            BinaryOp::Sub => "subf",
            BinaryOp::Mul => "mulf",
            BinaryOp::Div => "divf",
            BinaryOp::Max => "maximumf",
            BinaryOp::Min => "minimumf",
        },
    })
}

pub(super) fn binary(f: &mut Frame, op: BinaryOp) -> Result<LaunchShape, LowerError> {
    let dtype = f.bufs[0].ty.dtype;
    let name = binary_arith(op, dtype).map_err(|reason| f.unsupported(op.name(), reason))?;
    let ty = compute_type(dtype);
    let n = output_numel(f, op.name())?;
    let out = f.result(0).ty.shape.clone();
    let (sa, sb) = (f.bufs[0].ty.shape.clone(), f.bufs[1].ty.shape.clone());
    Ok(each_element(f, n, |f, i| {
        let ia = broadcast_index(f, &sa, &out, i);
        let ib = broadcast_index(f, &sb, &out, i);
        let a = f.load(0, &ia);
        let b = f.load(1, &ib);
        let y = f.b.op("y", format_args!("arith.{name} {a}, {b} : {ty}"));
        f.store(2, i, &y);
    }))
}

pub(super) fn cast(f: &mut Frame) -> Result<LaunchShape, LowerError> {
    let from = f.bufs[0].ty.dtype;
    let to = f.result(0).ty.dtype;
    let n = output_numel(f, "cast")?;
    Ok(each_element(f, n, |f, i| {
        let x = f.load(0, i);
        let y = convert(f, &x, from, to);
        f.store(1, i, &y);
    }))
}

/// Converts a value in the compute type of `from` to the compute type of `to`.
pub(super) fn convert(f: &mut Frame, x: &Value, from: DType, to: DType) -> Value {
    let (cf, ct) = (compute_type(from), compute_type(to));
    if cf == ct {
        return x.clone();
    }
    match (cf, ct) {
        ("f32", "i1") => {
            let zero = f.b.f32(0.0);
            f.b.op("y", format_args!("arith.cmpf une, {x}, {zero} : f32"))
        }
        // LLVM's saturating conversion is exactly Rust's `as`: clamped to the integer range, NaN to 0.
        ("f32", int) => f
            .b
            .op("y", format_args!("llvm.call_intrinsic \"llvm.fptosi.sat.{int}.f32\"({x}) : (f32) -> {int}")),
        ("i1", "f32") => f.b.op("y", format_args!("arith.uitofp {x} : i1 to f32")),
        (int, "f32") => f.b.op("y", format_args!("arith.sitofp {x} : {int} to f32")),
        ("i1", int) => f.b.op("y", format_args!("arith.extui {x} : i1 to {int}")),
        (int, "i1") => {
            let zero = f.b.constant("0", int);
            f.b.op("y", format_args!("arith.cmpi ne, {x}, {zero} : {int}"))
        }
        ("i32", "i64") => f.b.op("y", format_args!("arith.extsi {x} : i32 to i64")),
        _ => f.b.op("y", format_args!("arith.trunci {x} : {cf} to {ct}")),
    }
}
