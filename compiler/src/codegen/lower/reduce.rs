//! Row kernels: reductions over a contiguous run of axes, softmax along one axis, RMS norm, and
//! cross-entropy and its gradient over the last axis.
//!
//! Each op is viewed as `[outer, n, inner]`: `n` is the size of the reduced (or normalised) axes and
//! `inner` the size of the axes after them, so element `t` of row `r` is at
//! `(r / inner) * n * inner + r % inner + t * inner`. A row is one output element of a reduction, or one
//! vector normalised by softmax / RMS norm.
//!
//! CPU: the work items are rows; each row is a sequential loop (sums are added in index order, so
//! results do not depend on the split into `[lo, hi)`). GPU: one block per row (256 threads, or the row length rounded up to a power of two when shorter); each
//! thread reduces a strided slice, then the block combines the partial results with a tree in shared
//! memory (`gpu.barrier` between levels).
//!
//! Semantics: float sums in f32; `mean` divides by `n`; `max`/`min` propagate NaN, and start from
//! -inf/+inf (integer min/max from the type's extremes). Softmax is `exp(x - max) / sum`, in f32.
//! RMS norm follows Hugging Face: `weight * (x * rsqrt(mean(x^2) + eps)).to(dtype)`, the product
//! rounded to the input dtype before the weight multiplies it. Cross-entropy is one row per target:
//! a max pass, a sum-of-exp pass, then `log(sum) - (x[target] - max)`, in f32 (the target's logit
//! less the maximum first, so a large maximum costs no precision); a target outside `0..V` reads
//! nothing (its load sits under an `scf.if`) and gives NaN, and one equal to `ignore_index` gives 0.
//! Its gradient `cross_entropy_grad` is the same row with a third pass writing
//! `(exp(x - max) / sum - onehot(target)) * dloss` at every class, in f32 (the interpreter: the
//! differences in f32, the rest in f64, rounded once); the target is only compared with the class
//! index, so a target outside `0..V` reads and writes nothing outside the row: its row is NaN (as
//! the forward's loss), and a row whose target is `ignore_index` is 0 whatever it holds.
//!
//! Each op is a template (`reduce_with`, `softmax_with`, `rms_norm_with`) whose loads of the input
//! and stores of the result are hooks ([`Load`], [`Store`]): plain loads and stores for the op's own
//! kernel, a fused prologue and epilogue for `fused` kernels (`fused`). A load is called once per
//! element per pass over the row, each in its own loop body.
//!
//! Not handled (typed `Unsupported`): reductions over axes that are not adjacent, and `bool`.

use kiln_ir::{DType, Dim, ReduceOp, TensorType};

use super::{compute_type, Frame, GridDim, LaunchShape, LowerError, Target};
use crate::codegen::mlir::{for_carry, for_loop, if_else, if_then, Value};

/// Most threads per block of row kernels on the GPU; rows of known length `n` get the smallest power
/// of two >= `n` (at least one warp) instead, so short rows do not leave most threads idle.
const MAX_BLOCK: i64 = 256;

/// The `[outer, n, inner]` view of a shape around the axes `first..=last`.
struct Rows {
    /// Rows: `outer * inner`.
    rows: Dim,
    n: Value,
    /// `n` when it is a constant.
    n_known: Option<u64>,
    inner: Value,
    /// GPU threads per row.
    block: i64,
}

fn block_for(n: Option<u64>) -> i64 {
    match n {
        Some(n) => (n.next_power_of_two() as i64).clamp(32, MAX_BLOCK),
        None => MAX_BLOCK,
    }
}

fn rows_of(f: &mut Frame, op: &str, shape: &[Dim], first: usize, last: usize) -> Result<Rows, LowerError> {
    let rows =
        shape[..first].iter().chain(&shape[last + 1..]).try_fold(Dim::known(1), |a, &d| a.checked_mul(d));
    let rows = rows.ok_or_else(|| f.unsupported(op, "the row count does not fit a dimension"))?;
    let n_known = shape[first..=last].iter().try_fold(1u64, |a, d| a.checked_mul(d.as_known()?));
    let n = f.prod(&shape[first..=last]);
    let inner = f.prod(&shape[last + 1..]);
    Ok(Rows { rows, n, n_known, inner, block: f.gpu_block(block_for(n_known)) })
}

/// Reads element `i` (a flat index) of a row op's input: a load, or a fused prologue.
pub(super) type Load<'a> = &'a dyn Fn(&mut Frame, &Value) -> Value;
/// Writes a row op's result `y` (computed, not yet rounded) as element `i`: a store, or a fused
/// epilogue.
pub(super) type Store<'a> = &'a dyn Fn(&mut Frame, &Value, &Value);

/// The index of element `t` of row `r`.
fn element(f: &mut Frame, rows: &Rows, r: &Value, t: &Value) -> Value {
    let o = f.b.divui(r, &rows.inner);
    let j = f.b.remui(r, &rows.inner);
    let on = f.b.muli(&o, &rows.n);
    let oni = f.b.muli(&on, &rows.inner);
    let base = f.b.addi(&oni, &j);
    let ti = f.b.muli(t, &rows.inner);
    f.b.addi(&base, &ti)
}

/// Runs `body(f, r)` for every row: a loop over `[lo, hi)` on the CPU, the block id on the GPU.
fn each_row(f: &mut Frame, rows: &Rows, body: impl FnOnce(&mut Frame, &Value)) -> LaunchShape {
    match f.target {
        Target::Cpu => {
            let (lo, hi) = f.range.clone().expect("CPU frames have a work range");
            let one = f.b.index(1);
            for_loop(f, &lo, &hi, &one, body);
            LaunchShape::Cpu { work: rows.rows }
        }
        Target::Gpu => {
            let r = f.gpu_id("block_id", 'x');
            body(f, &r);
            LaunchShape::Gpu {
                grid: [GridDim { work: rows.rows, per_block: 1 }, GridDim::one(), GridDim::one()],
                block: [rows.block as u32, 1, 1],
            }
        }
    }
}

/// A combining operation and its identity, in compute type `ty`.
#[derive(Clone, Copy)]
struct Combine {
    op: &'static str,
    identity: &'static str,
    ty: &'static str,
}

const SUM_F32: Combine = Combine { op: "addf", identity: "0.0", ty: "f32" };
const MAX_F32: Combine = Combine { op: "maximumf", identity: "0xFF800000", ty: "f32" };

fn combine_for(op: ReduceOp, dtype: DType) -> Option<Combine> {
    let ty = compute_type(dtype);
    Some(match (op, ty) {
        (ReduceOp::Sum | ReduceOp::Mean, "f32") => SUM_F32,
        (ReduceOp::Max, "f32") => MAX_F32,
        (ReduceOp::Min, "f32") => Combine { op: "minimumf", identity: "0x7F800000", ty },
        (ReduceOp::Sum, "i32" | "i64") => Combine { op: "addi", identity: "0", ty },
        (ReduceOp::Max, "i32") => Combine { op: "maxsi", identity: "-2147483648", ty },
        (ReduceOp::Min, "i32") => Combine { op: "minsi", identity: "2147483647", ty },
        (ReduceOp::Max, "i64") => Combine { op: "maxsi", identity: "-9223372036854775808", ty },
        (ReduceOp::Min, "i64") => Combine { op: "minsi", identity: "9223372036854775807", ty },
        _ => return None,
    })
}

fn apply(f: &mut Frame, c: Combine, a: &Value, b: &Value) -> Value {
    f.b.op("r", format_args!("arith.{} {a}, {b} : {}", c.op, c.ty))
}

/// Reduces `value(f, t)` over `t` in `0..n` for the current row: sequentially on the CPU; on the GPU
/// a strided loop per thread, then a shared-memory tree across the block. Every GPU thread gets the
/// total.
fn reduce_row(f: &mut Frame, c: Combine, rows: &Rows, value: &dyn Fn(&mut Frame, &Value) -> Value) -> Value {
    let n = &rows.n;
    let init = f.b.constant(c.identity, c.ty);
    match f.target {
        Target::Cpu => {
            let zero = f.b.index(0);
            let one = f.b.index(1);
            for_carry(f, &zero, n, &one, &[(init, c.ty)], |f, t, acc| {
                let x = value(f, t);
                vec![apply(f, c, &acc[0], &x)]
            })
            .remove(0)
        }
        Target::Gpu => {
            let tid = f.gpu_id("thread_id", 'x');
            let step = f.b.index(rows.block);
            let partial = for_carry(f, &tid, n, &step, &[(init, c.ty)], |f, t, acc| {
                let x = value(f, t);
                vec![apply(f, c, &acc[0], &x)]
            })
            .remove(0);
            block_combine(f, c, &partial, rows.block)
        }
    }
}

/// Combines the `partial` of every thread of a GPU block of `block` threads (a power of two) with a
/// tree in shared memory (`gpu.barrier` between levels); every thread gets the total.
fn block_combine(f: &mut Frame, c: Combine, partial: &Value, block: i64) -> Value {
    let tid = f.gpu_id("thread_id", 'x');
    let (sh, sh_ty) = f.workgroup("partials", c.ty, block as u64);
    f.b.line(format_args!("memref.store {partial}, {sh}[{tid}] : {sh_ty}"));
    f.b.line("gpu.barrier");
    let mut s = block / 2;
    while s >= 1 {
        let sv = f.b.index(s);
        let active = f.b.op("p", format_args!("arith.cmpi ult, {tid}, {sv} : index"));
        if_then(f, &active, |f| {
            let other = f.b.addi(&tid, &sv);
            let a = f.b.op("x", format_args!("memref.load {sh}[{tid}] : {sh_ty}"));
            let b = f.b.op("x", format_args!("memref.load {sh}[{other}] : {sh_ty}"));
            let r = apply(f, c, &a, &b);
            f.b.line(format_args!("memref.store {r}, {sh}[{tid}] : {sh_ty}"));
        });
        f.b.line("gpu.barrier");
        s /= 2;
    }
    let zero = f.b.index(0);
    let total = f.b.op("total", format_args!("memref.load {sh}[{zero}] : {sh_ty}"));
    // Everyone has read the total before the buffer is reused by a later reduction.
    f.b.line("gpu.barrier");
    total
}

/// The f32 sum of every thread's `partial` over a GPU block of `block` threads (a power of two):
/// [`block_combine`] for the families whose work is not a row of this file.
pub(super) fn block_sum(f: &mut Frame, partial: &Value, block: i64) -> Value {
    block_combine(f, SUM_F32, partial, block)
}

/// Runs `body(f, t)` for `t` in `0..n` of the current row: all of it on the CPU, a strided share
/// per thread on the GPU.
fn each_in_row(f: &mut Frame, rows: &Rows, body: impl FnOnce(&mut Frame, &Value)) {
    let (start, step) = match f.target {
        Target::Cpu => (f.b.index(0), f.b.index(1)),
        Target::Gpu => (f.gpu_id("thread_id", 'x'), f.b.index(rows.block)),
    };
    for_loop(f, &start, &rows.n, &step, body);
}

/// The row length as an f32 value.
fn length_f32(f: &mut Frame, rows: &Rows) -> Value {
    if let Some(n) = rows.n_known {
        return f.b.f32(n as f64);
    }
    let n = &rows.n;
    let i = f.b.op("n", format_args!("arith.index_cast {n} : index to i64"));
    f.b.op("n", format_args!("arith.sitofp {i} : i64 to f32"))
}

pub(super) fn reduce(f: &mut Frame, op: ReduceOp, axes: &[usize]) -> Result<LaunchShape, LowerError> {
    let x = f.bufs[0].ty.clone();
    let out = f.kernel.args.len();
    reduce_with(f, op, axes, &x, &|f, i| f.load(0, i), &|f, r, v| f.store(out, r, v))
}

/// `reduce` of an input of type `x` read by `load`, each result written by `store`.
pub(super) fn reduce_with(
    f: &mut Frame,
    op: ReduceOp,
    axes: &[usize],
    x: &TensorType,
    load: Load,
    store: Store,
) -> Result<LaunchShape, LowerError> {
    let name = kiln_ir::Op::Reduce { op, axes: axes.to_vec(), keep_dims: false }.name();
    let shape = x.shape.clone();
    let dtype = x.dtype;
    let c = combine_for(op, dtype).ok_or_else(|| f.unsupported(name, format!("reduction of {dtype}")))?;
    let mut sorted = axes.to_vec();
    sorted.sort_unstable();
    let (first, last) = match (sorted.first(), sorted.last()) {
        (Some(&a), Some(&b)) if b - a + 1 == sorted.len() => (a, b),
        (None, None) => (shape.len(), shape.len()),
        _ => return Err(f.unsupported(name, format!("axes {axes:?} are not adjacent"))),
    };
    // With no axes each output element is its input element: a reduction over one element.
    let rows = if first == shape.len() {
        let numel = x.numel().ok_or_else(|| f.unsupported(name, "too many elements"))?;
        let one = f.b.index(1);
        Rows {
            rows: numel,
            n: one.clone(),
            n_known: Some(1),
            inner: one,
            block: f.gpu_block(block_for(Some(1))),
        }
    } else {
        rows_of(f, name, &shape, first, last)?
    };
    Ok(each_row(f, &rows, |f, r| {
        let total = reduce_row(f, c, &rows, &|f, t| {
            let i = element(f, &rows, r, t);
            load(f, &i)
        });
        let out = if op == ReduceOp::Mean {
            let n = length_f32(f, &rows);
            f.binf("divf", &total, &n)
        } else {
            total
        };
        store_once(f, r, &out, store);
    }))
}

/// Stores a row's single result: every GPU thread has it, thread 0 writes it.
fn store_once(f: &mut Frame, r: &Value, v: &Value, store: Store) {
    match f.target {
        Target::Cpu => store(f, r, v),
        Target::Gpu => {
            let tid = f.gpu_id("thread_id", 'x');
            let zero = f.b.index(0);
            let first = f.b.op("p", format_args!("arith.cmpi eq, {tid}, {zero} : index"));
            if_then(f, &first, |f| store(f, r, v));
        }
    }
}

pub(super) fn softmax(f: &mut Frame, axis: usize) -> Result<LaunchShape, LowerError> {
    let shape = f.bufs[0].ty.shape.clone();
    softmax_with(f, axis, &shape, &|f, i| f.load(0, i), &|f, i, y| f.store(1, i, y))
}

/// `softmax` of an input of shape `shape` read by `load`, each result written by `store`.
pub(super) fn softmax_with(
    f: &mut Frame,
    axis: usize,
    shape: &[Dim],
    load: Load,
    store: Store,
) -> Result<LaunchShape, LowerError> {
    let rows = rows_of(f, "softmax", shape, axis, axis)?;
    Ok(each_row(f, &rows, |f, r| {
        let max = reduce_row(f, MAX_F32, &rows, &|f, t| {
            let i = element(f, &rows, r, t);
            load(f, &i)
        });
        let shifted_exp = |f: &mut Frame, t: &Value| {
            let i = element(f, &rows, r, t);
            let x = load(f, &i);
            let d = f.binf("subf", &x, &max);
            (i, f.exp(&d))
        };
        let sum = reduce_row(f, SUM_F32, &rows, &|f, t| shifted_exp(f, t).1);
        each_in_row(f, &rows, |f, t| {
            let (i, e) = shifted_exp(f, t);
            let y = f.binf("divf", &e, &sum);
            store(f, &i, &y);
        });
    }))
}

/// `cross_entropy`: operands `logits[..., V]` and `targets[...]` (i32 or i64), result `loss[...]`
/// in f32, one row of `V` logits per target. See the module documentation.
pub(super) fn cross_entropy(f: &mut Frame, ignore_index: Option<i64>) -> Result<LaunchShape, LowerError> {
    let logits = f.bufs[0].ty.shape.clone();
    let targets = f.bufs[1].ty.dtype;
    let out = f.kernel.args.len();
    let last = logits.len() - 1;
    let rows = rows_of(f, "cross_entropy", &logits, last, last)?;
    Ok(each_row(f, &rows, |f, r| {
        let logit = |f: &mut Frame, t: &Value| {
            let i = element(f, &rows, r, t);
            f.load(0, &i)
        };
        let max = reduce_row(f, MAX_F32, &rows, &logit);
        let shifted = |f: &mut Frame, t: &Value| {
            let x = logit(f, t);
            f.binf("subf", &x, &max)
        };
        let sum = reduce_row(f, SUM_F32, &rows, &|f, t| {
            let d = shifted(f, t);
            f.exp(&d)
        });
        let log_sum = f.log(&sum);
        let target = f.load(1, r);
        let target = match targets {
            DType::I64 => target,
            _ => f.b.op("i", format_args!("arith.extsi {target} : i32 to i64")),
        };
        // Negative targets become huge indices: one unsigned comparison checks both ends.
        let t = f.b.op("i", format_args!("arith.index_cast {target} : i64 to index"));
        let n = rows.n.clone();
        let inside = f.b.op("p", format_args!("arith.cmpi ult, {t}, {n} : index"));
        let loss = if_else(
            f,
            &inside,
            "f32",
            |f| {
                let d = shifted(f, &t);
                f.binf("subf", &log_sum, &d)
            },
            |f| f.b.f32(f64::NAN),
        );
        let loss = match ignore_index {
            Some(ignored) => {
                let ignored = f.b.constant(&ignored.to_string(), "i64");
                let skip = f.cmp("eq", &target, &ignored, "i64");
                let zero = f.b.f32(0.0);
                f.select(&skip, &zero, &loss, "f32")
            }
            None => loss,
        };
        store_once(f, r, &loss, &|f, r, v| f.store(out, r, v));
    }))
}

/// `cross_entropy_grad`: operands `logits[..., V]`, `targets[...]` (i32 or i64) and `dloss[...]`
/// (f32), result `dlogits[..., V]` (f32). The rows of `cross_entropy` (a max pass and a
/// sum-of-exp pass), then a third pass writing `(exp(x - max) / sum - onehot(target)) * dloss` at
/// every class. See the module documentation.
pub(super) fn cross_entropy_grad(
    f: &mut Frame,
    ignore_index: Option<i64>,
) -> Result<LaunchShape, LowerError> {
    let logits = f.bufs[0].ty.shape.clone();
    let targets = f.bufs[1].ty.dtype;
    let out = f.kernel.args.len();
    let last = logits.len() - 1;
    let rows = rows_of(f, "cross_entropy_grad", &logits, last, last)?;
    Ok(each_row(f, &rows, |f, r| {
        let shifted = |f: &mut Frame, t: &Value, max: &Value| {
            let i = element(f, &rows, r, t);
            let x = f.load(0, &i);
            f.binf("subf", &x, max)
        };
        let max = reduce_row(f, MAX_F32, &rows, &|f, t| {
            let i = element(f, &rows, r, t);
            f.load(0, &i)
        });
        let sum = reduce_row(f, SUM_F32, &rows, &|f, t| {
            let d = shifted(f, t, &max);
            f.exp(&d)
        });
        let target = f.load(1, r);
        let t = f.int_to_index(&target, targets);
        let inside = f.cmp("ult", &t, &rows.n, "index");
        // The row's factor: dloss for a class, NaN for a target outside 0..V (never read).
        let dloss = f.load(2, r);
        let nan = f.b.f32(f64::NAN);
        let factor = f.select(&inside, &dloss, &nan, "f32");
        let skip = ignore_index.map(|ignored| {
            let wide = match targets {
                DType::I64 => target.clone(),
                _ => f.b.op("i", format_args!("arith.extsi {target} : i32 to i64")),
            };
            let ignored = f.b.constant(&ignored.to_string(), "i64");
            f.cmp("eq", &wide, &ignored, "i64")
        });
        let (zero, one) = (f.b.f32(0.0), f.b.f32(1.0));
        each_in_row(f, &rows, |f, j| {
            let d = shifted(f, j, &max);
            let e = f.exp(&d);
            let p = f.binf("divf", &e, &sum);
            let hit = f.cmp("eq", j, &t, "index");
            let onehot = f.select(&hit, &one, &zero, "f32");
            let g = f.binf("subf", &p, &onehot);
            let g = f.binf("mulf", &g, &factor);
            // An ignored row is 0 whatever it holds (NaN times 0 would not be).
            let g = match &skip {
                Some(skip) => f.select(skip, &zero, &g, "f32"),
                None => g,
            };
            let i = element(f, &rows, r, j);
            f.store(out, &i, &g);
        });
    }))
}

pub(super) fn rms_norm(f: &mut Frame, eps: f64) -> Result<LaunchShape, LowerError> {
    let shape = f.bufs[0].ty.shape.clone();
    let dtype = f.bufs[0].ty.dtype;
    let out = f.kernel.args.len();
    rms_norm_with(f, eps, (&shape, dtype), &|f, i| f.load(0, i), &|f, t| f.load(1, t), &|f, i, y| {
        f.store(out, i, y)
    })
}

/// `rms_norm` of an input of `(shape, dtype)` read by `load`, with the weight's element `t` read by
/// `weight`, each result written by `store`.
pub(super) fn rms_norm_with(
    f: &mut Frame,
    eps: f64,
    (shape, dtype): (&[Dim], DType),
    load: Load,
    weight: Load,
    store: Store,
) -> Result<LaunchShape, LowerError> {
    let last = shape.len() - 1;
    let rows = rows_of(f, "rms_norm", shape, last, last)?;
    Ok(each_row(f, &rows, |f, r| {
        let ss = reduce_row(f, SUM_F32, &rows, &|f, t| {
            let i = element(f, &rows, r, t);
            let x = load(f, &i);
            f.binf("mulf", &x, &x)
        });
        let n = length_f32(f, &rows);
        let mean = f.binf("divf", &ss, &n);
        let eps = f.b.f32(eps);
        let var = f.binf("addf", &mean, &eps);
        let scale = f.rsqrt(&var);
        each_in_row(f, &rows, |f, t| {
            let i = element(f, &rows, r, t);
            let x = load(f, &i);
            let y = f.binf("mulf", &x, &scale);
            let y = f.round_to(&y, dtype);
            let w = weight(f, t);
            let out = f.binf("mulf", &w, &y);
            store(f, &i, &out);
        });
    }))
}
