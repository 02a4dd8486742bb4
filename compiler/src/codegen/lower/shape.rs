//! Data movement: `concat`, `split`, `broadcast`, `transpose`, `embedding`, `gather` and
//! `take_along`. (`reshape` is not a kernel: formation makes it an alias of its operand's buffer.)
//!
//! Every kernel here copies stored bits ([`Frame::load_raw`] / [`Frame::store_raw`]), so it works for
//! every dtype, f8e4m3 and bool included, and values arrive exactly as they left. Iteration is over
//! the flat index of one tensor, as for elementwise kernels: CPU work items and GPU threads (256 per
//! block) are elements of the output, except for `split`, whose work items are elements of its one
//! operand (each goes to exactly one result). An index is decomposed into the coordinates the copy
//! needs with one division and one remainder per dimension involved.
//!
//! Ids and indices (`embedding`, `gather`, `take_along`): an index outside `0..n` is **clamped**
//! into range (a negative one reads row 0, a too-large one row `n - 1`). The interpreter reports
//! such an index as an error; a kernel cannot, so it does the one thing that never reads outside the
//! buffer, and the runtime validates token ids before it launches anything.
//!
//! A CPU transpose of the last two axes with a constant column count copies panels of 8 columns
//! (`transpose_rows_cpu`), and a CPU `concat` or `split` whose rows from the axis on have known
//! lengths copies each part's contiguous runs (`runs_cpu`). Not done: vectorised copies, a GPU transpose through shared memory, row
//! copies for the other permutations on the CPU.

use kiln_ir::Dim;

use super::elementwise::{broadcast_index, each_element};
use super::{Frame, LaunchShape, LowerError, Target};
use crate::codegen::mlir::{for_loop, if_else, if_then, Value};

fn numel(f: &Frame, buf: usize, op: &str) -> Result<Dim, LowerError> {
    f.bufs[buf].ty.numel().ok_or_else(|| f.unsupported(op, "the element count does not fit a dimension"))
}

/// `(outer, a, inner)` of flat index `i` of a tensor viewed as `[outer, len, inner]`.
fn split_index(f: &mut Frame, i: &Value, len: &Value, inner: &Value) -> (Value, Value, Value) {
    let j = f.b.remui(i, inner);
    let q = f.b.divui(i, inner);
    let a = f.b.remui(&q, len);
    let o = f.b.divui(&q, len);
    (o, a, j)
}

/// `(o * len + a) * inner + j`.
fn join_index(f: &mut Frame, (o, a, j): (&Value, &Value, &Value), len: &Value, inner: &Value) -> Value {
    let ol = f.b.muli(o, len);
    let row = f.b.addi(&ol, a);
    let ri = f.b.muli(&row, inner);
    f.b.addi(&ri, j)
}

/// The sizes along `axis` of the given buffers and their running offsets (`offsets[p]` is where
/// part `p` starts; the last entry is the total).
fn parts_along(f: &mut Frame, bufs: &[usize], axis: usize) -> (Vec<Value>, Vec<Value>) {
    let dims: Vec<Dim> = bufs.iter().map(|&b| f.bufs[b].ty.shape[axis]).collect();
    let sizes: Vec<Value> = dims.into_iter().map(|d| f.dim(d)).collect();
    let mut offsets = vec![f.b.index(0)];
    for s in &sizes {
        let next = f.b.addi(offsets.last().expect("starts with 0"), s);
        offsets.push(next);
    }
    (sizes, offsets)
}

pub(super) fn concat(f: &mut Frame, axis: usize) -> Result<LaunchShape, LowerError> {
    let parts: Vec<usize> = (0..f.kernel.args.len()).collect();
    let out = parts.len();
    if let Some(shape) = runs_cpu(f, out, &parts, axis, true) {
        return Ok(shape);
    }
    let out_shape = f.bufs[out].ty.shape.clone();
    let n = numel(f, out, "concat")?;
    let len = f.dim(out_shape[axis]);
    let inner = f.prod(&out_shape[axis + 1..]);
    let (sizes, offsets) = parts_along(f, &parts, axis);
    let elem = f.storage(0);
    Ok(each_element(f, n, |f, i| {
        let (o, a, j) = split_index(f, i, &len, &inner);
        let v = pick(f, 0, &o, &a, &j, (&sizes, &offsets, &inner), elem);
        f.store_raw(out, i, &v);
    }))
}

/// The element at `(o, a, j)` of the concatenation, from part `p` or a later one: a chain of
/// `scf.if`s on `a`, so that only the part that holds the element is read.
fn pick(
    f: &mut Frame,
    p: usize,
    o: &Value,
    a: &Value,
    j: &Value,
    (sizes, offsets, inner): (&[Value], &[Value], &Value),
    elem: &str,
) -> Value {
    let read = |f: &mut Frame| {
        let local = f.b.subi(a, &offsets[p]);
        let idx = join_index(f, (o, &local, j), &sizes[p], inner);
        f.load_raw(p, &idx)
    };
    if p + 1 == sizes.len() {
        return read(f);
    }
    let end = offsets[p + 1].clone();
    let here = f.b.op("p", format_args!("arith.cmpi ult, {a}, {end} : index"));
    if_else(f, &here, elem, read, |f| pick(f, p + 1, o, a, j, (sizes, offsets, inner), elem))
}

pub(super) fn split(f: &mut Frame, axis: usize) -> Result<LaunchShape, LowerError> {
    let results: Vec<usize> = (1..f.bufs.len()).collect();
    if let Some(shape) = runs_cpu(f, 0, &results, axis, false) {
        return Ok(shape);
    }
    let shape = f.bufs[0].ty.shape.clone();
    let n = numel(f, 0, "split")?;
    let len = f.dim(shape[axis]);
    let inner = f.prod(&shape[axis + 1..]);
    let (sizes, offsets) = parts_along(f, &results, axis);
    Ok(each_element(f, n, |f, i| {
        let (o, a, j) = split_index(f, i, &len, &inner);
        let x = f.load_raw(0, i);
        for (p, &r) in results.iter().enumerate() {
            // Part p holds a in offsets[p]..offsets[p + 1].
            let (start, end) = (offsets[p].clone(), offsets[p + 1].clone());
            let ge = f.b.op("p", format_args!("arith.cmpi uge, {a}, {start} : index"));
            let lt = f.b.op("p", format_args!("arith.cmpi ult, {a}, {end} : index"));
            let inside = f.b.op("p", format_args!("arith.andi {ge}, {lt} : i1"));
            if_then(f, &inside, |f| {
                let local = f.b.subi(&a, &start);
                let idx = join_index(f, (&o, &local, &j), &sizes[p], &inner);
                f.store_raw(r, &idx, &x);
            });
        }
    }))
}

/// Elements of a row of the whole tensor per CPU work item of [`runs_cpu`].
const RUN_CHUNK: u64 = 2048;

/// `concat` (`into_whole`: the parts are read and `whole` written) or `split` (the other way) on
/// the CPU, where a row of the whole tensor (`axis` and the axes after it) has a known length and
/// each part a known share of it. Seen as `[outer, row]`, each row of the whole is the parts' rows
/// one after the other, so a work item takes a chunk of [`RUN_CHUNK`] elements of one row and
/// copies, for each part, the contiguous run the chunk overlaps, in a unit-stride loop: no index
/// decomposition or choice of part per element, as the flat-index loop has (a prefill's
/// `[B, T, 16, 64] ++ [B, T, 16, 32]` of the query heads' two halves copied 1.4 GB/s that way).
/// `None` where the lengths are not known: the flat-index loop then does it.
fn runs_cpu(
    f: &mut Frame,
    whole: usize,
    parts: &[usize],
    axis: usize,
    into_whole: bool,
) -> Option<LaunchShape> {
    if f.target != Target::Cpu {
        return None;
    }
    let shape = f.bufs[whole].ty.shape.clone();
    let known = |dims: &[Dim]| dims.iter().try_fold(1u64, |a, d| a.checked_mul(d.as_known()?));
    let inner = known(&shape[axis + 1..])?;
    let row = known(&shape[axis..]).filter(|&r| r > 0)?;
    let runs: Vec<u64> = parts
        .iter()
        .map(|&p| f.bufs[p].ty.shape[axis].as_known()?.checked_mul(inner))
        .collect::<Option<_>>()?;
    let chunks = row.div_ceil(RUN_CHUNK);
    let outer = shape[..axis].iter().try_fold(Dim::known(1), |a, &d| a.checked_mul(d))?;
    let work = outer.checked_mul(Dim::known(chunks))?;
    let (lo, hi) = f.range.clone().expect("CPU frames have a work range");
    let (one, per, chunk, row_len) =
        (f.b.index(1), f.b.index(chunks as i64), f.b.index(RUN_CHUNK as i64), f.b.index(row as i64));
    for_loop(f, &lo, &hi, &one, |f, w| {
        let o = f.b.divui(w, &per);
        let c = f.b.remui(w, &per);
        let start = f.b.muli(&c, &chunk);
        let stop = f.b.addi(&start, &chunk);
        let end = f.b.minui(&stop, &row_len);
        let base = f.b.muli(&o, &row_len);
        let mut offset = 0u64;
        for (&p, &run) in parts.iter().zip(&runs) {
            // The chunk's overlap with the part's run `offset .. offset + run` of the row.
            let (from, to) = (f.b.index(offset as i64), f.b.index((offset + run) as i64));
            let a = f.b.op("i", format_args!("arith.maxui {start}, {from} : index"));
            let b = f.b.minui(&end, &to);
            let run_v = f.b.index(run as i64);
            let part_base = f.b.muli(&o, &run_v);
            // Element `e` of the whole's row is element `e - offset` of the part's row `o`.
            let part_start = f.b.subi(&part_base, &from);
            for_loop(f, &a, &b, &one, |f, e| {
                let at_whole = f.b.addi(&base, e);
                let at_part = f.b.addi(&part_start, e);
                if into_whole {
                    let v = f.load_raw(p, &at_part);
                    f.store_raw(whole, &at_whole, &v);
                } else {
                    let v = f.load_raw(whole, &at_whole);
                    f.store_raw(p, &at_part, &v);
                }
            });
            offset += run;
        }
    });
    Some(LaunchShape::Cpu { work })
}

pub(super) fn broadcast(f: &mut Frame) -> Result<LaunchShape, LowerError> {
    let n = numel(f, 1, "broadcast")?;
    let (from, to) = (f.bufs[0].ty.shape.clone(), f.bufs[1].ty.shape.clone());
    Ok(each_element(f, n, |f, i| {
        let src = broadcast_index(f, &from, &to, i);
        let x = f.load_raw(0, &src);
        f.store_raw(1, i, &x);
    }))
}

pub(super) fn transpose(f: &mut Frame, perm: &[usize]) -> Result<LaunchShape, LowerError> {
    let n = numel(f, 1, "transpose")?;
    let r = perm.len();
    let swaps_last_two = r >= 2
        && perm[r - 2] == r - 1
        && perm[r - 1] == r - 2
        && perm[..r - 2].iter().enumerate().all(|(k, &p)| p == k);
    if f.target == Target::Cpu && swaps_last_two && f.bufs[0].ty.shape[r - 1].as_known().is_some() {
        return transpose_rows_cpu(f);
    }
    let x = f.bufs[0].ty.shape.clone();
    let out = f.bufs[1].ty.shape.clone();
    let x_strides: Vec<Value> = (0..x.len()).map(|k| f.prod(&x[k + 1..])).collect();
    let out_dims: Vec<Value> = out.iter().map(|&d| f.dim(d)).collect();
    Ok(each_element(f, n, |f, i| {
        // Output axis k is input axis perm[k]: peel output coordinates from the innermost out.
        let mut rest = i.clone();
        let mut src = f.b.index(0);
        for k in (0..out.len()).rev() {
            let c = if k == 0 { rest.clone() } else { f.b.remui(&rest, &out_dims[k]) };
            if k > 0 {
                rest = f.b.divui(&rest, &out_dims[k]);
            }
            let term = f.b.muli(&c, &x_strides[perm[k]]);
            src = f.b.addi(&src, &term);
        }
        let v = f.load_raw(0, &src);
        f.store_raw(1, i, &v);
    }))
}

/// Input columns per work item of [`transpose_rows_cpu`].
const TRANSPOSE_COLS: u64 = 8;

/// A CPU transpose of the last two axes, `[..., R, C] -> [..., C, R]` with `C` a constant: a work item is a panel of
/// [`TRANSPOSE_COLS`] output rows (input columns). It walks the input's rows once, reading each
/// row's run of the panel's columns (contiguous) and writing one element to each of the panel's
/// output rows (a few sequential streams), with one index division per panel instead of one per
/// element.
fn transpose_rows_cpu(f: &mut Frame) -> Result<LaunchShape, LowerError> {
    let x = f.bufs[0].ty.shape.clone();
    let rank = x.len();
    let lead = x[..rank - 2].iter().try_fold(Dim::known(1), |a, &d| a.checked_mul(d));
    let cols_known = x[rank - 1].as_known().expect("checked by transpose");
    let panels = Dim::known(cols_known.div_ceil(TRANSPOSE_COLS));
    let work = lead
        .and_then(|l| l.checked_mul(panels))
        .ok_or_else(|| f.unsupported("transpose", "the panel count does not fit a dimension"))?;
    let (rows, cols, per) = (f.dim(x[rank - 2]), f.dim(x[rank - 1]), f.dim(panels));
    let (lo, hi) = f.range.clone().expect("CPU frames have a work range");
    let (zero, one, width) = (f.b.index(0), f.b.index(1), f.b.index(TRANSPOSE_COLS as i64));
    let plane = f.b.muli(&rows, &cols);
    for_loop(f, &lo, &hi, &one, |f, w| {
        let b = f.b.divui(w, &per);
        let p = f.b.remui(w, &per);
        let j0 = f.b.muli(&p, &width);
        let left = f.b.subi(&cols, &j0);
        let n = f.b.minui(&left, &width);
        let base = f.b.muli(&b, &plane);
        let in_base = f.b.addi(&base, &j0);
        // Output row j0 + t of plane b starts at (b * C + j0 + t) * R = base + (j0 + t) * R.
        let out_row0 = f.b.muli(&j0, &rows);
        let out_base = f.b.addi(&base, &out_row0);
        for_loop(f, &zero, &rows, &one, |f, i| {
            let step = f.b.muli(i, &cols);
            let src0 = f.b.addi(&in_base, &step);
            let dst0 = f.b.addi(&out_base, i);
            for_loop(f, &zero, &n, &one, |f, t| {
                let src = f.b.addi(&src0, t);
                let tr = f.b.muli(t, &rows);
                let dst = f.b.addi(&dst0, &tr);
                let v = f.load_raw(0, &src);
                f.store_raw(1, &dst, &v);
            });
        });
    });
    Ok(LaunchShape::Cpu { work })
}

pub(super) fn embedding(f: &mut Frame) -> Result<LaunchShape, LowerError> {
    let n = numel(f, 2, "embedding")?;
    let table = f.bufs[0].ty.shape.clone();
    let id_type = f.bufs[1].ty.dtype;
    let rows = f.dim(table[0]);
    let d = f.dim(table[1]);
    Ok(each_element(f, n, |f, i| {
        let r = f.b.divui(i, &d);
        let c = f.b.remui(i, &d);
        let id = f.load(1, &r);
        let row = f.clamped_index(&id, id_type, &rows);
        let rd = f.b.muli(&row, &d);
        let src = f.b.addi(&rd, &c);
        let v = f.load_raw(0, &src);
        f.store_raw(2, i, &v);
    }))
}

pub(super) fn gather(f: &mut Frame, axis: usize) -> Result<LaunchShape, LowerError> {
    let n = numel(f, 2, "gather")?;
    let data = f.bufs[0].ty.shape.clone();
    let picks = numel(f, 1, "gather")?;
    let index_type = f.bufs[1].ty.dtype;
    let len = f.dim(data[axis]);
    let inner = f.prod(&data[axis + 1..]);
    let count = f.dim(picks);
    Ok(each_element(f, n, |f, i| {
        // Output [outer, picks, inner] reads data [outer, len, inner] at the picked position.
        let (o, p, j) = split_index(f, i, &count, &inner);
        let at = f.load(1, &p);
        let a = f.clamped_index(&at, index_type, &len);
        let src = join_index(f, (&o, &a, &j), &len, &inner);
        let v = f.load_raw(0, &src);
        f.store_raw(2, i, &v);
    }))
}

/// `take_along`: operands `data[...]` and `indices[...]` (data's rank), result of the indices' shape:
/// element `(o, j, i)` (`j` along `axis`) is `data[o, indices[o, j, i], i]`, the index clamped.
pub(super) fn take_along(f: &mut Frame, axis: usize) -> Result<LaunchShape, LowerError> {
    let n = numel(f, 2, "take_along")?;
    let data = f.bufs[0].ty.shape.clone();
    let picks = f.bufs[1].ty.shape[axis];
    let index_type = f.bufs[1].ty.dtype;
    let len = f.dim(data[axis]);
    let inner = f.prod(&data[axis + 1..]);
    let count = f.dim(picks);
    Ok(each_element(f, n, |f, i| {
        let (o, _, j) = split_index(f, i, &count, &inner);
        let at = f.load(1, i);
        let a = f.clamped_index(&at, index_type, &len);
        let src = join_index(f, (&o, &a, &j), &len, &inner);
        let v = f.load_raw(0, &src);
        f.store_raw(2, i, &v);
    }))
}

/// `cache_update`, **in place**: buffers `cache[B, S, ...]`, `new[B, T, ...]`, `positions[B, T]`,
/// result. The result is the cache's own buffer (the memory plan gives both one
/// `Storage::State`), so only the `B * T` new rows are written: one work item per element of
/// `new`, stored at slot `positions[b, t]` of sequence `b`. A position outside `0..S` writes
/// nothing (the runtime checks positions before a run; the interpreter reports them).
pub(super) fn cache_update(f: &mut Frame) -> Result<LaunchShape, LowerError> {
    let n = numel(f, 1, "cache_update")?;
    let cache = f.bufs[0].ty.shape.clone();
    let new = f.bufs[1].ty.shape.clone();
    let pos_type = f.bufs[2].ty.dtype;
    let slots = f.dim(cache[1]);
    let tokens = f.dim(new[1]);
    let row = f.prod(&cache[2..]);
    Ok(each_element(f, n, |f, i| {
        // new[(b * T + t) * row + j] -> cache[(b * S + positions[b, t]) * row + j].
        let j = f.b.remui(i, &row);
        let bt = f.b.divui(i, &row);
        let b = f.b.divui(&bt, &tokens);
        let p = f.load(2, &bt);
        let slot = f.int_to_index(&p, pos_type);
        let inside = f.b.op("p", format_args!("arith.cmpi ult, {slot}, {slots} : index"));
        if_then(f, &inside, |f| {
            let bs = f.b.muli(&b, &slots);
            let at = f.b.addi(&bs, &slot);
            let at = f.b.muli(&at, &row);
            let dst = f.b.addi(&at, &j);
            let v = f.load_raw(1, i);
            f.store_raw(3, &dst, &v);
        });
    }))
}
