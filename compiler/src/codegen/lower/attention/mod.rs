//! Scaled dot-product attention: `q[B, T, H, Dk]`, `k[B, S, Hk, Dk]`, `v[B, S, Hk, Dv]` ->
//! `[B, T, H, Dv]`, query head `h` reading key/value head `h / (H / Hk)`. Its gradient
//! `attention_grad` is in `grad`, sharing the masking and scores written here.
//!
//! A row is one query `(b, t, h)`. With `causal` it sees keys `0..t + 1 + S - T` (the new tokens
//! come after `S - T` cached ones); without, all `S`. With a fourth operand `positions[B, T]` (a KV
//! cache whose slot `j` holds position `j`) it sees keys `0..=positions[b, t]`, clamped to `S`, so a
//! decode step reads only the filled part of the cache, and each sequence its own length. Scores
//! `(q . k_s) * scale` and the softmax are f32. Each row makes two passes over its keys:
//!
//! 1. the maximum `m` and the sum `l = sum_s exp(score_s - m)`, kept online (`l` is rescaled by
//!    `exp(m_old - m_new)` when the maximum grows), so no array of scores is needed;
//! 2. `p_s = exp(score_s - m) / l`, **rounded to the activation dtype** as the interpreter (and
//!    Hugging Face, `softmax(..., dtype=float32).to(query.dtype)`) does, then `out += p_s * v_s` in
//!    f32, rounded to the dtype once at the end.
//!
//! The scores are computed twice; that is the price of not storing `S` of them per row.
//!
//! CPU: work items are rows; the `Dv` accumulators live in a scratch array. The dot products of
//! the scores and the accumulation of `p_s * v_s` go 16 lanes at a time (so the scores' sums are
//! reassociated, as the GEMMs' are), the last `Dk mod 16` / `Dv mod 16` one by one. Both passes
//! take the keys in blocks of 16: a block's scores form one vector (lanes past the visible keys
//! masked), whose exponentials are one [`Frame::exp_vec`] rather than a libm call per key, and pass
//! 1 moves `(m, l)` once a block. A decode step of `models/bench.toml` in FP8 spent as long in
//! libm's `expf` (three calls per key and head) as in the rest of this kernel. GPU: one block per row.
//! The query row is staged in shared memory; in pass 1 each thread keeps its own `(m, l)` over keys
//! `tid, tid + block, ...`, and the block combines the pairs with a shared-memory tree; in pass 2 the
//! keys are taken a block at a time: each thread computes one probability into shared memory, then
//! each thread accumulates the output columns it owns (`tid`, `tid + block`, ...) over the chunk, so
//! reads of `v` rows are coalesced. The block is the power of two covering `Dv`, between 32 and 128.
//!
//! A row that sees no key (causal attention with `S < T`, which the interpreter rejects) is written
//! as zeros. `H`, `Hk` and `Dv` must be constants (inference requires the heads to be), and on the
//! GPU `Dk` too (the staged query's size).
//!
//! Not done: FlashAttention-style tiling (several rows per block, keys staged through shared memory,
//! tensor cores), which is a later slice.

mod grad;

use kiln_ir::{DType, Dim};

use super::matmul::{VEC, VL};
use super::{Frame, GridDim, LaunchShape, LowerError, Target};
use crate::codegen::mlir::{for_carry, for_loop, if_else, if_then, Value};

const NEG_INF: &str = "0xFF800000";

/// What every row needs: sizes, and where its query, keys, values and output are.
struct Row {
    dk: Value,
    dv: Value,
    /// Offset of the row's query (and, times `Dv / Dk`, of its output).
    q: Value,
    /// Offset of key 0 of the row's key/value head; key `s` is at `kv + s * Hk * Dk`.
    k: Value,
    v: Value,
    /// Distance between consecutive keys (`Hk * Dk`) and values (`Hk * Dv`).
    k_step: Value,
    v_step: Value,
    out: Value,
    visible: Value,
    scale: Value,
    dtype: DType,
}

/// What a kernel's masking depends on: the `positions` buffer if it has one, and `causal`.
#[derive(Clone, Copy)]
struct Mask {
    positions: Option<usize>,
    causal: bool,
}

impl Mask {
    /// The mask of `attention` (positions are operand 3 of 4) or `attention_grad` (of 5).
    fn of(f: &Frame, forward_operands: usize, causal: bool) -> Mask {
        Mask { positions: (f.kernel.args.len() > forward_operands).then_some(3), causal }
    }
}

fn known(f: &Frame, op: &str, d: Dim, what: &str) -> Result<u64, LowerError> {
    d.as_known().ok_or_else(|| f.unsupported(op, format!("{what} must be a constant, found {d}")))
}

/// The constant sizes: query heads, key/value heads, value head dimension.
fn constants(f: &Frame, op: &str) -> Result<(u64, u64, u64), LowerError> {
    let heads = known(f, op, f.bufs[0].ty.shape[2], "the query heads")?;
    let kv_heads = known(f, op, f.bufs[1].ty.shape[2], "the key/value heads")?;
    let dv = known(f, op, f.bufs[2].ty.shape[3], "the value head dimension")?;
    Ok((heads, kv_heads, dv))
}

/// The number of keys query `(b, t)` sees (keys `0..visible`), `bt = b * T + t`: the masking of
/// `attention`, shared by its gradient.
fn visible(f: &mut Frame, mask: Mask, bt: &Value, t: &Value) -> Value {
    let (t_len, s_len) = (f.bufs[0].ty.shape[1], f.bufs[1].ty.shape[1]);
    let (t_len, s_len) = (f.dim(t_len), f.dim(s_len));
    if let Some(buf) = mask.positions {
        // Keys 0..=positions[b, t], clamped to 0..=S: slot j of the cache holds position j.
        let p = f.load(buf, bt);
        let wide = match f.bufs[buf].ty.dtype {
            DType::I64 => p,
            _ => f.b.op("i", format_args!("arith.extsi {p} : i32 to i64")),
        };
        let one = f.b.constant("1", "i64");
        let zero = f.b.constant("0", "i64");
        let reach = f.b.op("i", format_args!("arith.addi {wide}, {one} : i64"));
        let reach = f.b.op("i", format_args!("arith.maxsi {reach}, {zero} : i64"));
        let reach = f.b.op("i", format_args!("arith.index_cast {reach} : i64 to index"));
        f.b.op("i", format_args!("arith.minui {reach}, {s_len} : index"))
    } else if mask.causal {
        // t + 1 + S - T, or 0 when that is negative.
        let one = f.b.index(1);
        let t1 = f.b.addi(t, &one);
        let reach = f.b.addi(&t1, &s_len);
        let some = f.b.op("p", format_args!("arith.cmpi ugt, {reach}, {t_len} : index"));
        let n = f.b.subi(&reach, &t_len);
        let zero = f.b.index(0);
        f.select(&some, &n, &zero, "index")
    } else {
        s_len
    }
}

/// The row of query row `r` (`(b * T + t) * H + h`).
fn row(f: &mut Frame, r: &Value, (heads, kv_heads): (u64, u64), scale: f64, mask: Mask) -> Row {
    let q = f.bufs[0].ty.shape.clone();
    let k = f.bufs[1].ty.shape.clone();
    let v = f.bufs[2].ty.shape.clone();
    let (t_len, s_len) = (f.dim(q[1]), f.dim(k[1]));
    let (dk, dv) = (f.dim(q[3]), f.dim(v[3]));
    let h_v = f.b.index(heads as i64);
    let hk_v = f.b.index(kv_heads as i64);
    let group = f.b.index((heads / kv_heads) as i64);
    let h = f.b.remui(r, &h_v);
    let bt = f.b.divui(r, &h_v);
    let t = f.b.remui(&bt, &t_len);
    let b = f.b.divui(&bt, &t_len);
    let kh = f.b.divui(&h, &group);
    // Key s of head kh of batch b: ((b * S + s) * Hk + kh) * D.
    let bs = f.b.muli(&b, &s_len);
    let bshk = f.b.muli(&bs, &hk_v);
    let first = f.b.addi(&bshk, &kh);
    let k_off = f.b.muli(&first, &dk);
    let v_off = f.b.muli(&first, &dv);
    let k_step = f.b.muli(&hk_v, &dk);
    let v_step = f.b.muli(&hk_v, &dv);
    let q_off = f.b.muli(r, &dk);
    let out = f.b.muli(r, &dv);
    let visible = visible(f, mask, &bt, &t);
    let scale = f.b.f32(scale);
    let dtype = f.bufs[0].ty.dtype;
    Row { dk, dv, q: q_off, k: k_off, v: v_off, k_step, v_step, out, visible, scale, dtype }
}

/// A value of one element of a row: `read(f, i)`.
type Read<'a> = &'a dyn Fn(&mut Frame, &Value) -> Value;

/// `sum_i a(i) * b(i)` over `i` in `0..n`, fused multiply-adds in f32 in index order.
fn dot(f: &mut Frame, n: &Value, a: Read, b: Read) -> Value {
    let (zero, one) = (f.b.index(0), f.b.index(1));
    let init = f.b.f32(0.0);
    for_carry(f, &zero, n, &one, &[(init, "f32")], |f, i, acc| {
        let x = a(f, i);
        let y = b(f, i);
        vec![f.fma(&x, &y, &acc[0])]
    })
    .remove(0)
}

/// `(q . k_s) * scale`, with the query read by `query(f, i)`.
fn score(f: &mut Frame, row: &Row, s: &Value, query: Read) -> Value {
    let ks = f.b.muli(s, &row.k_step);
    let kbase = f.b.addi(&row.k, &ks);
    let key = |f: &mut Frame, i: &Value| {
        let ki = f.b.addi(&kbase, i);
        f.load(1, &ki)
    };
    let d = dot(f, &row.dk, query, &key);
    f.binf("mulf", &d, &row.scale)
}

/// `sum_i a[a0 + i] * b[b0 + i]` over `i` in `0..n`, elements of buffers `a` and `b`, on the CPU:
/// 16 f32 lanes at a time (f16/bf16 widened as they load), their horizontal sum, then the last
/// `n mod 16` in index order.
fn dot_cpu(f: &mut Frame, n: &Value, (a, a0): (usize, &Value), (b, b0): (usize, &Value)) -> Value {
    let (zero, one, vl) = (f.b.index(0), f.b.index(1), f.b.index(VL));
    let q = f.b.divui(n, &vl);
    let nv = f.b.muli(&q, &vl);
    let zv = f.b.constant("dense<0.0>", VEC);
    let acc = for_carry(f, &zero, &nv, &vl, &[(zv, VEC)], |f, i, acc| {
        let (ai, bi) = (f.b.addi(a0, i), f.b.addi(b0, i));
        let (x, y) = (f.load_vec(a, &ai), f.load_vec(b, &bi));
        let c = &acc[0];
        vec![f.b.op("acc", format_args!("vector.fma {x}, {y}, {c} : {VEC}"))]
    })
    .remove(0);
    let sum = f.b.op("s", format_args!("vector.reduction <add>, {acc} fastmath<reassoc> : {VEC} into f32"));
    for_carry(f, &nv, n, &one, &[(sum, "f32")], |f, i, acc| {
        let (ai, bi) = (f.b.addi(a0, i), f.b.addi(b0, i));
        let (x, y) = (f.load(a, &ai), f.load(b, &bi));
        vec![f.fma(&x, &y, &acc[0])]
    })
    .remove(0)
}

/// [`score`] on the CPU, with [`dot_cpu`].
fn score_cpu(f: &mut Frame, row: &Row, s: &Value) -> Value {
    let ks = f.b.muli(s, &row.k_step);
    let kbase = f.b.addi(&row.k, &ks);
    let d = dot_cpu(f, &row.dk, (0, &row.q), (1, &kbase));
    f.binf("mulf", &d, &row.scale)
}

/// The online softmax step: `(m, l)` after one more score `x`.
fn online(f: &mut Frame, m: &Value, l: &Value, x: &Value) -> (Value, Value) {
    let m2 = f.binf("maximumf", m, x);
    let l2 = merge(f, (m, l), (x, None), &m2);
    (m2, l2)
}

/// `l1 * exp(m1 - m) + l2 * exp(m2 - m)` for the combined maximum `m`, a pair with `m_i = -inf`
/// contributing nothing (its `exp(-inf - -inf)` would be NaN). `l2 = None` stands for 1.
fn merge(f: &mut Frame, (m1, l1): (&Value, &Value), (m2, l2): (&Value, Option<&Value>), m: &Value) -> Value {
    let ninf = f.b.constant(NEG_INF, "f32");
    let zero = f.b.f32(0.0);
    let mut terms = Vec::new();
    for (mi, li) in [(m1, Some(l1)), (m2, l2)] {
        let d = f.binf("subf", mi, m);
        let e = f.exp(&d);
        let t = match li {
            Some(l) => f.binf("mulf", l, &e),
            None => e,
        };
        let empty = f.cmp("oeq", mi, &ninf, "f32");
        terms.push(f.select(&empty, &zero, &t, "f32"));
    }
    f.binf("addf", &terms[0], &terms[1])
}

/// The softmax probability of a score `x` of a row of maximum `m` and sum `l`, in f32.
fn softmax_at(f: &mut Frame, m: &Value, l: &Value, x: &Value) -> Value {
    let d = f.binf("subf", x, m);
    let e = f.exp(&d);
    f.binf("divf", &e, l)
}

/// The probability of key `s`, rounded to the dtype.
fn probability(f: &mut Frame, row: &Row, m: &Value, l: &Value, x: &Value) -> Value {
    let p = softmax_at(f, m, l, x);
    f.round_to(&p, row.dtype)
}

pub(super) fn attention(f: &mut Frame, scale: f64, causal: bool) -> Result<LaunchShape, LowerError> {
    let q = f.bufs[0].ty.shape.clone();
    let rows = q[..3].iter().try_fold(Dim::known(1), |a, &d| a.checked_mul(d));
    let rows = rows.ok_or_else(|| f.unsupported("attention", "the row count does not fit a dimension"))?;
    let mask = Mask::of(f, 3, causal);
    match f.target {
        Target::Cpu => cpu(f, rows, scale, mask),
        Target::Gpu => gpu(f, rows, scale, mask),
    }
}

fn cpu(f: &mut Frame, rows: Dim, scale: f64, mask: Mask) -> Result<LaunchShape, LowerError> {
    let (heads, kv_heads, dv_n) = constants(f, "attention")?;
    let out_buf = f.kernel.args.len();
    let (acc, acc_ty) = f.scratch("f32", dv_n);
    let (lo, hi) = f.range.clone().expect("CPU frames have a work range");
    let one = f.b.index(1);
    // The output's columns in vectors of 16 (the accumulators' scratch is `Dv` floats), then the
    // last `Dv mod 16` one by one.
    let dv_vec = f.b.index((dv_n - dv_n % VL as u64) as i64);
    let vl = f.b.index(VL);
    let (sc, sc_ty) = f.scratch("f32", VL as u64);
    for_loop(f, &lo, &hi, &one, |f, r| {
        let row = row(f, r, (heads, kv_heads), scale, mask);
        let zero = f.b.index(0);
        let (ninf, fzero) = (f.b.constant(NEG_INF, "f32"), f.b.f32(0.0));
        // Keys in blocks of 16: a block's scores go to the `sc` scratch (the lanes past the
        // visible keys -inf) and are taken as one vector, so their exponentials are one
        // `exp_vec` and the online maximum and sum move once a block.
        let vl1 = f.b.index(VL - 1);
        let blocks = f.b.addi(&row.visible, &vl1);
        let blocks = f.b.divui(&blocks, &vl);
        let scores = |f: &mut Frame, blk: &Value| -> (Value, Value, Value) {
            let s0 = f.b.muli(blk, &vl);
            let left = f.b.subi(&row.visible, &s0);
            let count = f.b.minui(&left, &vl);
            let zero = f.b.index(0);
            for_loop(f, &zero, &count, &one, |f, i| {
                let s = f.b.addi(&s0, i);
                let x = score_cpu(f, &row, &s);
                f.b.line(format_args!("memref.store {x}, {sc}[{i}] : {sc_ty}"));
            });
            let ninf = f.b.constant(NEG_INF, "f32");
            for_loop(f, &count, &vl, &one, |f, i| {
                f.b.line(format_args!("memref.store {ninf}, {sc}[{i}] : {sc_ty}"));
            });
            let sv = f.b.op("sv", format_args!("vector.load {sc}[{zero}] : {sc_ty}, {VEC}"));
            let ninf_v = f.b.op("ninf", format_args!("vector.broadcast {ninf} : f32 to {VEC}"));
            let masked = f.b.op("p", format_args!("arith.cmpf oeq, {sv}, {ninf_v} : {VEC}"));
            (s0, sv, masked)
        };
        // `exp(sv - m)` with the masked lanes 0.
        let exps = |f: &mut Frame, sv: &Value, masked: &Value, m: &Value| -> Value {
            let mv = f.b.op("mv", format_args!("vector.broadcast {m} : f32 to {VEC}"));
            let d = f.b.op("d", format_args!("arith.subf {sv}, {mv} : {VEC}"));
            let e = f.exp_vec(&d);
            let zv = f.b.constant("dense<0.0>", VEC);
            f.b.op("e", format_args!("arith.select {masked}, {zv}, {e} : vector<16xi1>, {VEC}"))
        };
        let ml = for_carry(f, &zero, &blocks, &one, &[(ninf, "f32"), (fzero.clone(), "f32")], |f, blk, c| {
            let (_, sv, masked) = scores(f, blk);
            let bm = f.b.op("m", format_args!("vector.reduction <maximumf>, {sv} : {VEC} into f32"));
            let m = f.binf("maximumf", &c[0], &bm);
            let e = exps(f, &sv, &masked, &m);
            let sum =
                f.b.op("s", format_args!("vector.reduction <add>, {e} fastmath<reassoc> : {VEC} into f32"));
            // The sum so far rescaled to the new maximum (nothing while it was empty), plus the block's.
            let ninf = f.b.constant(NEG_INF, "f32");
            let d = f.binf("subf", &c[0], &m);
            let g = f.exp(&d);
            let old = f.binf("mulf", &c[1], &g);
            let empty = f.cmp("oeq", &c[0], &ninf, "f32");
            let old = f.select(&empty, &fzero, &old, "f32");
            vec![m, f.binf("addf", &old, &sum)]
        });
        for_loop(f, &zero, &row.dv, &one, |f, d| {
            f.b.line(format_args!("memref.store {fzero}, {acc}[{d}] : {acc_ty}"));
        });
        for_loop(f, &zero, &blocks, &one, |f, blk| {
            let (s0, sv, masked) = scores(f, blk);
            let e = exps(f, &sv, &masked, &ml[0]);
            let lv = f.b.op("lv", format_args!("vector.broadcast {} : f32 to {VEC}", ml[1]));
            let pv = f.b.op("p", format_args!("arith.divf {e}, {lv} : {VEC}"));
            let zero = f.b.index(0);
            f.b.line(format_args!("vector.store {pv}, {sc}[{zero}] : {sc_ty}, {VEC}"));
            let left = f.b.subi(&row.visible, &s0);
            let count = f.b.minui(&left, &vl);
            for_loop(f, &zero, &count, &one, |f, i| {
                let p = f.b.op("p", format_args!("memref.load {sc}[{i}] : {sc_ty}"));
                let p = f.round_to(&p, row.dtype);
                let s = f.b.addi(&s0, i);
                let vs = f.b.muli(&s, &row.v_step);
                let vbase = f.b.addi(&row.v, &vs);
                let pv = f.b.op("p", format_args!("vector.broadcast {p} : f32 to {VEC}"));
                for_loop(f, &zero, &dv_vec, &vl, |f, d| {
                    let vi = f.b.addi(&vbase, d);
                    let v = f.load_vec(2, &vi);
                    let a = f.b.op("acc", format_args!("vector.load {acc}[{d}] : {acc_ty}, {VEC}"));
                    let a = f.b.op("acc", format_args!("vector.fma {pv}, {v}, {a} : {VEC}"));
                    f.b.line(format_args!("vector.store {a}, {acc}[{d}] : {acc_ty}, {VEC}"));
                });
                for_loop(f, &dv_vec, &row.dv, &one, |f, d| {
                    let vi = f.b.addi(&vbase, d);
                    let v = f.load(2, &vi);
                    let a = f.b.op("acc", format_args!("memref.load {acc}[{d}] : {acc_ty}"));
                    let a = f.fma(&p, &v, &a);
                    f.b.line(format_args!("memref.store {a}, {acc}[{d}] : {acc_ty}"));
                });
            });
        });
        for_loop(f, &zero, &row.dv, &one, |f, d| {
            let a = f.b.op("acc", format_args!("memref.load {acc}[{d}] : {acc_ty}"));
            let oi = f.b.addi(&row.out, d);
            f.store(out_buf, &oi, &a);
        });
    });
    Ok(LaunchShape::Cpu { work: rows })
}

/// The row's softmax maximum and sum on the GPU: each thread's online `(m, l)` over keys `tid,
/// tid + block, ...`, then a tree over the block in shared memory. Every thread gets both; a caller
/// that computes another row's afterwards puts a barrier between (the buffers are reused).
fn block_stats(f: &mut Frame, row: &Row, query: Read, block: i64) -> (Value, Value) {
    let tid = f.gpu_id("thread_id", 'x');
    let (zero, bs) = (f.b.index(0), f.b.index(block));
    let (ms, ms_ty) = f.workgroup("row_max", "f32", block as u64);
    let (ls, ls_ty) = f.workgroup("row_sum", "f32", block as u64);
    let (ninf, fzero) = (f.b.constant(NEG_INF, "f32"), f.b.f32(0.0));
    let ml = for_carry(f, &tid, &row.visible, &bs, &[(ninf, "f32"), (fzero, "f32")], |f, s, c| {
        let x = score(f, row, s, query);
        let (m, l) = online(f, &c[0], &c[1], &x);
        vec![m, l]
    });
    f.b.line(format_args!("memref.store {}, {ms}[{tid}] : {ms_ty}", ml[0]));
    f.b.line(format_args!("memref.store {}, {ls}[{tid}] : {ls_ty}", ml[1]));
    f.b.line("gpu.barrier");
    let mut half = block / 2;
    while half >= 1 {
        let hv = f.b.index(half);
        let active = f.b.op("p", format_args!("arith.cmpi ult, {tid}, {hv} : index"));
        if_then(f, &active, |f| {
            let other = f.b.addi(&tid, &hv);
            let m1 = f.b.op("x", format_args!("memref.load {ms}[{tid}] : {ms_ty}"));
            let l1 = f.b.op("x", format_args!("memref.load {ls}[{tid}] : {ls_ty}"));
            let m2 = f.b.op("x", format_args!("memref.load {ms}[{other}] : {ms_ty}"));
            let l2 = f.b.op("x", format_args!("memref.load {ls}[{other}] : {ls_ty}"));
            let m = f.binf("maximumf", &m1, &m2);
            let l = merge(f, (&m1, &l1), (&m2, Some(&l2)), &m);
            f.b.line(format_args!("memref.store {m}, {ms}[{tid}] : {ms_ty}"));
            f.b.line(format_args!("memref.store {l}, {ls}[{tid}] : {ls_ty}"));
        });
        f.b.line("gpu.barrier");
        half /= 2;
    }
    let m = f.b.op("m", format_args!("memref.load {ms}[{zero}] : {ms_ty}"));
    let l = f.b.op("l", format_args!("memref.load {ls}[{zero}] : {ls_ty}"));
    (m, l)
}

/// The columns `tid + j * block` (`j < ceil(n / block)`) a GPU thread owns of a row of `n`, each
/// with a copy clamped to `n - 1` (safe to read; only the unclamped ones below `n` are written).
fn owned_columns(f: &mut Frame, n: u64, block: i64) -> (Vec<Value>, Vec<Value>) {
    let tid = f.gpu_id("thread_id", 'x');
    let columns: Vec<Value> = (0..n.div_ceil(block as u64))
        .map(|j| {
            let off = f.b.index(j as i64 * block);
            f.b.addi(&tid, &off)
        })
        .collect();
    let last = f.b.index(n as i64 - 1);
    let safe = columns.iter().map(|c| f.b.minui(c, &last)).collect();
    (columns, safe)
}

fn gpu(f: &mut Frame, rows: Dim, scale: f64, mask: Mask) -> Result<LaunchShape, LowerError> {
    let (heads, kv_heads, dv_n) = constants(f, "attention")?;
    let dk_n = known(f, "attention", f.bufs[0].ty.shape[3], "the query head dimension (on the GPU)")?;
    let out_buf = f.kernel.args.len();
    let block = f.gpu_block(dv_n.next_power_of_two().clamp(32, 128) as i64);
    let r = f.gpu_id("block_id", 'x');
    let tid = f.gpu_id("thread_id", 'x');
    let row = row(f, &r, (heads, kv_heads), scale, mask);
    let bs = f.b.index(block);
    let (zero, one) = (f.b.index(0), f.b.index(1));
    let (qs, qs_ty) = f.workgroup("query", "f32", dk_n);
    let (ps, ps_ty) = f.workgroup("probs", "f32", block as u64);

    // Stage the query row.
    for_loop(f, &tid, &row.dk, &bs, |f, i| {
        let qi = f.b.addi(&row.q, i);
        let x = f.load(0, &qi);
        f.b.line(format_args!("memref.store {x}, {qs}[{i}] : {qs_ty}"));
    });
    f.b.line("gpu.barrier");
    let query = |f: &mut Frame, i: &Value| f.b.op("x", format_args!("memref.load {qs}[{i}] : {qs_ty}"));

    // Pass 1: the row's (m, l).
    let (m, l) = block_stats(f, &row, &query, block);
    let fzero = f.b.f32(0.0);

    // Pass 2: a chunk of `block` keys at a time.
    let (columns, safe_cols) = owned_columns(f, dv_n, block);
    let inits: Vec<(Value, &str)> = columns.iter().map(|_| (fzero.clone(), "f32")).collect();
    let acc = for_carry(f, &zero, &row.visible, &bs, &inits, |f, s0, acc| {
        let s = f.b.addi(s0, &tid);
        let inside = f.b.op("p", format_args!("arith.cmpi ult, {s}, {} : index", row.visible));
        let p = if_else(
            f,
            &inside,
            "f32",
            |f| {
                let x = score(f, &row, &s, &query);
                probability(f, &row, &m, &l, &x)
            },
            |f| f.b.f32(0.0),
        );
        f.b.line(format_args!("memref.store {p}, {ps}[{tid}] : {ps_ty}"));
        f.b.line("gpu.barrier");
        let left = f.b.subi(&row.visible, s0);
        let n = f.b.minui(&left, &bs);
        let carried: Vec<(Value, &str)> = acc.iter().map(|a| (a.clone(), "f32")).collect();
        let next = for_carry(f, &zero, &n, &one, &carried, |f, j, acc| {
            let pj = f.b.op("p", format_args!("memref.load {ps}[{j}] : {ps_ty}"));
            let sj = f.b.addi(s0, j);
            let vs = f.b.muli(&sj, &row.v_step);
            let vbase = f.b.addi(&row.v, &vs);
            safe_cols
                .iter()
                .zip(acc)
                .map(|(c, a)| {
                    let vi = f.b.addi(&vbase, c);
                    let v = f.load(2, &vi);
                    f.fma(&pj, &v, a)
                })
                .collect()
        });
        // Everyone is done with this chunk's probabilities before the next chunk writes them.
        f.b.line("gpu.barrier");
        next
    });
    for (c, a) in columns.iter().zip(&acc) {
        let ok = f.b.op("p", format_args!("arith.cmpi ult, {c}, {} : index", row.dv));
        if_then(f, &ok, |f| {
            let oi = f.b.addi(&row.out, c);
            f.store(out_buf, &oi, a);
        });
    }
    Ok(LaunchShape::Gpu {
        grid: [GridDim { work: rows, per_block: 1 }, GridDim::one(), GridDim::one()],
        block: [block as u32, 1, 1],
    })
}

pub(super) use grad::attention_grad;
