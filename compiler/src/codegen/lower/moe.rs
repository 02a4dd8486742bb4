//! Mixture of experts: `moe_route`, `topk`, `moe_experts`, and the `moe_dispatch` /
//! `grouped_linear` / `moe_combine` trio. Every kernel here is written to be correct and to round
//! exactly where the interpreter does, not to be fast; the numbers it must reproduce are in
//! `kiln_ir::interp` (`ops/moe.rs`, `ops/reduce.rs`).
//!
//! **Top-k** (`topk`, and every selection inside the router) orders entries largest first, NaN above
//! every number, ties to the lower index, as the interpreter's stable sort does. It is computed
//! without scratch space: pick `r` is the best entry that ranks after pick `r - 1` in that total
//! order, found by one scan (`k * n` comparisons; `k` and `n` are small).
//!
//! **`moe_route`**, one token per CPU work item or GPU thread, with per-thread scratch arrays of `E`
//! scores: `sigmoid` (or `softmax`) scores in f32, selection scores `scores + bias`, group scores (sum
//! of the top two, or the maximum) when `num_groups > 1`, the top `topk_groups` groups kept and the
//! others' selection scores read as -inf, the top `top_k` experts, their unbiased scores as weights,
//! divided by `sum + 1e-20` when normalising (an f32 sum in pick order; the interpreter sums in f64),
//! times `scaling`. The f32 `exp` inside sigmoid may differ from the interpreter's f64 one by an ulp,
//! so two experts whose selection scores are within an ulp of each other can swap.
//!
//! **`moe_experts`**: per token, its `K` slots in ascending (expert, slot) order; for each, the
//! expert's `gate`, `up`, `down` are picked at run time from the `3E` pointer arguments by an
//! `scf.index_switch` (a jump table), then `h = round(round(silu(round(gate x))) * round(up x))` and
//! `out = round(out + round(round(down h) * w))`, rounding to the activation dtype exactly where HF
//! and the interpreter do; the output buffer is the accumulator. CPU: one token per work item, `h` in
//! a scratch array. GPU: one block per token (the power of two covering `max(I, D)`, 32 to 256
//! threads); threads share out the rows of `h` (kept in shared memory) and then the output columns.
//! An expert index outside `0..E` contributes nothing. `D`, `K` and every expert's `I` must be
//! constants.
//!
//! **`moe_dispatch`** is a stable counting sort of the `N*K` slots by expert (so rows are ordered by
//! expert, token, slot, as the interpreter's), done sequentially: the CPU kernel has a single work
//! item and the GPU kernel a single block: thread 0 sorts, then, after a barrier, the whole block
//! copies the rows. A slot of no expert (index `E`; the kernel reads any index outside `0..E` so)
//! goes after every expert's rows, past `offsets[E]`. The group limit (`num_groups`,
//! `topk_groups`) is the router's promise; the interpreter checks it, the kernel relies on nothing.
//! **`grouped_linear`**: output element `(m, n)` is row `m` of `x` times row `n` of the weight of the
//! expert whose offsets range holds `m` (found by counting offsets, then a switch); rows past
//! `offsets[E]` are zeros. CPU work items are rows; GPU threads are elements. With float operands
//! (f32, or f16/bf16 widened as they load) the CPU kernel is `matmul::grouped_with`'s register
//! blocks of 4 rows of one expert, vectors of 16 along K; FP8 weights go element by element with
//! their scales. **`moe_combine`**:
//! GPU threads are output columns, CPU work items a token and a run of 256 columns (its rows found
//! by scanning the permutation); each walks the rows in ascending order and adds `round(y * w)`
//! into its token's output in the dtype, which is exactly the interpreter's order per token. Rows
//! whose slot is out of range are skipped.
//!
//! Not done: a parallel dispatch (prefix sums across blocks), grouped GEMM tiling, and anything
//! fused.

use kiln_ir::op::{Dispatch, GroupScore, Router, Scoring};
use kiln_ir::{DType, Dim, UnaryOp};

use super::elementwise::each_element;
use super::matmul::vector_float;
use super::{compute_type, Frame, GridDim, LaunchShape, LowerError, Target};
use crate::codegen::mlir::{for_carry, for_loop, if_then, if_then_else, index_switch, Value};

const NEG_INF: &str = "0xFF800000";
/// Threads per block of the single-block and per-element GPU kernels.
const BLOCK: i64 = 256;

fn known(f: &Frame, op: &str, d: Dim, what: &str) -> Result<u64, LowerError> {
    d.as_known().ok_or_else(|| f.unsupported(op, format!("{what} must be a constant, found {d}")))
}

fn and(f: &mut Frame, a: &Value, b: &Value) -> Value {
    f.b.op("p", format_args!("arith.andi {a}, {b} : i1"))
}

fn or(f: &mut Frame, a: &Value, b: &Value) -> Value {
    f.b.op("p", format_args!("arith.ori {a}, {b} : i1"))
}

/// `a` ranks before `b` by value: larger, with NaN above every number.
fn ranks_above(f: &mut Frame, a: &Value, b: &Value, ty: &str) -> Value {
    if ty != "f32" {
        return f.cmp("sgt", a, b, ty);
    }
    let gt = f.cmp("ogt", a, b, ty);
    let a_nan = f.cmp("uno", a, a, ty);
    let b_num = f.cmp("ord", b, b, ty);
    let nan_first = and(f, &a_nan, &b_num);
    or(f, &gt, &nan_first)
}

/// `a` and `b` rank equal: equal, or both NaN.
fn ranks_equal(f: &mut Frame, a: &Value, b: &Value, ty: &str) -> Value {
    if ty != "f32" {
        return f.cmp("eq", a, b, ty);
    }
    let eq = f.cmp("oeq", a, b, ty);
    let a_nan = f.cmp("uno", a, a, ty);
    let b_nan = f.cmp("uno", b, b, ty);
    let both = and(f, &a_nan, &b_nan);
    or(f, &eq, &both)
}

/// The top `k` of `value(f, i)` for `i` in `0..n` (values of MLIR type `ty`), in order; calls
/// `emit(f, r, i, value)` for pick `r`. Needs `k <= n`. See the module documentation.
fn select_top(
    f: &mut Frame,
    n: &Value,
    k: &Value,
    ty: &str,
    value: &dyn Fn(&mut Frame, &Value) -> Value,
    emit: &dyn Fn(&mut Frame, &Value, &Value, &Value),
) {
    let (zero, one) = (f.b.index(0), f.b.index(1));
    let init = f.b.constant(if ty == "f32" { "0.0" } else { "0" }, ty);
    // Pick index n means "none": before the first pick, everything ranks after the previous pick.
    let start = [(init.clone(), ty), (n.clone(), "index")];
    for_carry(f, &zero, k, &one, &start, |f, r, prev| {
        let first = f.cmp("eq", &prev[1], n, "index");
        let best = for_carry(f, &zero, n, &one, &start, |f, i, best| {
            let v = value(f, i);
            let below = ranks_above(f, &prev[0], &v, ty);
            let same = ranks_equal(f, &prev[0], &v, ty);
            let later = f.cmp("ugt", i, &prev[1], "index");
            let tie_after = and(f, &same, &later);
            let after = or(f, &below, &tie_after);
            let eligible = or(f, &first, &after);
            let none = f.cmp("eq", &best[1], n, "index");
            let beats = ranks_above(f, &v, &best[0], ty);
            let better = or(f, &none, &beats);
            let take = and(f, &eligible, &better);
            vec![f.select(&take, &v, &best[0], ty), f.select(&take, i, &best[1], "index")]
        });
        emit(f, r, &best[1], &best[0]);
        best
    });
}

pub(super) fn topk(f: &mut Frame, k: u64) -> Result<LaunchShape, LowerError> {
    let x = f.bufs[0].ty.clone();
    if x.dtype == DType::Bool {
        return Err(f.unsupported("topk", "top-k of booleans is not defined"));
    }
    let n_dim = x.shape[x.rank() - 1];
    let rows = x.shape[..x.rank() - 1].iter().try_fold(Dim::known(1), |a, &d| a.checked_mul(d));
    let rows = rows.ok_or_else(|| f.unsupported("topk", "the row count does not fit a dimension"))?;
    let ty = compute_type(x.dtype);
    let n = f.dim(n_dim);
    let kv = f.b.index(k as i64);
    Ok(each_element(f, rows, |f, row| {
        let base = f.b.muli(row, &n);
        let out = f.b.muli(row, &kv);
        select_top(
            f,
            &n,
            &kv,
            ty,
            &|f, i| {
                let at = f.b.addi(&base, i);
                f.load(0, &at)
            },
            &|f, r, i, v| {
                let at = f.b.addi(&out, r);
                f.store(1, &at, v);
                let i32v = f.index_to_int(i, DType::I32);
                f.store(2, &at, &i32v);
            },
        );
    }))
}

/// Loads element `i` of a scratch array.
fn get(f: &mut Frame, (a, ty): (&Value, &str), i: &Value) -> Value {
    f.b.op("x", format_args!("memref.load {a}[{i}] : {ty}"))
}

fn put(f: &mut Frame, (a, ty): (&Value, &str), i: &Value, v: &Value) {
    f.b.line(format_args!("memref.store {v}, {a}[{i}] : {ty}"));
}

pub(super) fn route(f: &mut Frame, r: &Router) -> Result<LaunchShape, LowerError> {
    let logits = f.bufs[0].ty.clone();
    let has_bias = f.kernel.args.len() == 2;
    let (weights, indices) = (f.kernel.args.len(), f.kernel.args.len() + 1);
    let (e, k, groups) = (r.num_experts, r.top_k, r.num_groups);
    let group_size = e / groups;
    if groups > 1 && r.group_score == GroupScore::Top2Sum && group_size < 2 {
        return Err(f.unsupported("moe_route", "top2_sum group scores need at least 2 experts per group"));
    }
    let rows = logits.shape[..logits.rank() - 1].iter().try_fold(Dim::known(1), |a, &d| a.checked_mul(d));
    let rows = rows.ok_or_else(|| f.unsupported("moe_route", "the row count does not fit a dimension"))?;
    let (scores, scores_ty) = f.scratch("f32", e);
    let (sel, sel_ty) = f.scratch("f32", e);
    let (gscore, gscore_ty) = f.scratch("f32", groups);
    let (kept, kept_ty) = f.scratch("f32", groups);
    let (pair, pair_ty) = f.scratch("f32", 2);
    let (scores, sel, gscore, kept, pair) = (
        (&scores, scores_ty.as_str()),
        (&sel, sel_ty.as_str()),
        (&gscore, gscore_ty.as_str()),
        (&kept, kept_ty.as_str()),
        (&pair, pair_ty.as_str()),
    );
    let (ev, kv, gv, gsv) =
        (f.b.index(e as i64), f.b.index(k as i64), f.b.index(groups as i64), f.b.index(group_size as i64));
    let topk_groups = f.b.index(r.topk_groups as i64);
    let (zero, one) = (f.b.index(0), f.b.index(1));
    Ok(each_element(f, rows, |f, row| {
        let base = f.b.muli(row, &ev);
        let logit = |f: &mut Frame, i: &Value| {
            let at = f.b.addi(&base, i);
            f.load(0, &at)
        };
        match r.scoring {
            Scoring::Sigmoid => for_loop(f, &zero, &ev, &one, |f, i| {
                let l = logit(f, i);
                let s = f.unary(UnaryOp::Sigmoid, &l);
                put(f, scores, i, &s);
            }),
            Scoring::Softmax => {
                let ninf = f.b.constant(NEG_INF, "f32");
                let max = for_carry(f, &zero, &ev, &one, &[(ninf, "f32")], |f, i, m| {
                    let l = logit(f, i);
                    vec![f.binf("maximumf", &m[0], &l)]
                })
                .remove(0);
                let fzero = f.b.f32(0.0);
                let sum = for_carry(f, &zero, &ev, &one, &[(fzero, "f32")], |f, i, acc| {
                    let l = logit(f, i);
                    let d = f.binf("subf", &l, &max);
                    let x = f.exp(&d);
                    put(f, scores, i, &x);
                    vec![f.binf("addf", &acc[0], &x)]
                })
                .remove(0);
                for_loop(f, &zero, &ev, &one, |f, i| {
                    let x = get(f, scores, i);
                    let p = f.binf("divf", &x, &sum);
                    put(f, scores, i, &p);
                });
            }
        }
        for_loop(f, &zero, &ev, &one, |f, i| {
            let s = get(f, scores, i);
            let s = if has_bias {
                let b = f.load(1, i);
                f.binf("addf", &s, &b)
            } else {
                s
            };
            put(f, sel, i, &s);
        });
        if groups > 1 {
            let picks = match r.group_score {
                GroupScore::Top2Sum => 2,
                GroupScore::Max => 1,
            };
            let picks_v = f.b.index(picks);
            for_loop(f, &zero, &gv, &one, |f, g| {
                let fzero = f.b.f32(0.0);
                put(f, kept, g, &fzero);
                let first = f.b.muli(g, &gsv);
                select_top(
                    f,
                    &gsv,
                    &picks_v,
                    "f32",
                    &|f, i| {
                        let at = f.b.addi(&first, i);
                        get(f, sel, &at)
                    },
                    &|f, pick, _, v| put(f, pair, pick, v),
                );
                let top = get(f, pair, &zero);
                let score = if picks == 2 {
                    let second = get(f, pair, &one);
                    f.binf("addf", &top, &second)
                } else {
                    top
                };
                put(f, gscore, g, &score);
            });
            select_top(f, &gv, &topk_groups, "f32", &|f, g| get(f, gscore, g), &|f, _, g, _| {
                let fone = f.b.f32(1.0);
                put(f, kept, g, &fone);
            });
        }
        let out = f.b.muli(row, &kv);
        select_top(
            f,
            &ev,
            &kv,
            "f32",
            &|f, i| {
                let s = get(f, sel, i);
                if groups == 1 {
                    return s;
                }
                let g = f.b.divui(i, &gsv);
                let flag = get(f, kept, &g);
                let fzero = f.b.f32(0.0);
                let on = f.cmp("une", &flag, &fzero, "f32");
                let ninf = f.b.constant(NEG_INF, "f32");
                f.select(&on, &s, &ninf, "f32")
            },
            &|f, rank, i, _| {
                let at = f.b.addi(&out, rank);
                let w = get(f, scores, i);
                f.store(weights, &at, &w);
                let i32v = f.index_to_int(i, DType::I32);
                f.store(indices, &at, &i32v);
            },
        );
        let denom = if r.normalize {
            let fzero = f.b.f32(0.0);
            let sum = for_carry(f, &zero, &kv, &one, &[(fzero, "f32")], |f, rank, acc| {
                let at = f.b.addi(&out, rank);
                let w = f.load(weights, &at);
                vec![f.binf("addf", &acc[0], &w)]
            })
            .remove(0);
            let tiny = f.b.f32(1e-20);
            Some(f.binf("addf", &sum, &tiny))
        } else {
            None
        };
        let scaling = f.b.f32(r.scaling);
        for_loop(f, &zero, &kv, &one, |f, rank| {
            let at = f.b.addi(&out, rank);
            let w = f.load(weights, &at);
            let w = match &denom {
                Some(d) => f.binf("divf", &w, d),
                None => w,
            };
            let w = f.binf("mulf", &w, &scaling);
            f.store(weights, &at, &w);
        });
    }))
}

/// Runs `body(f, i)` for the `i` in `0..n` this thread owns: all of them on the CPU, `tid, tid +
/// block, ...` on the GPU.
fn owned(f: &mut Frame, n: &Value, block: i64, body: impl FnOnce(&mut Frame, &Value)) {
    let (start, step) = match f.target {
        Target::Cpu => (f.b.index(0), f.b.index(1)),
        Target::Gpu => (f.gpu_id("thread_id", 'x'), f.b.index(block)),
    };
    for_loop(f, &start, n, &step, body);
}

fn sync(f: &mut Frame) {
    if f.target == Target::Gpu {
        f.b.line("gpu.barrier");
    }
}

/// The `count` buffers starting at `first` (one per expert, `per` buffers apart), picked by `e`
/// at run time, each as a `memref<?xT>`; plus, for each expert, `extra(expert)` as an index.
pub(super) fn pick_buffers(
    f: &mut Frame,
    e: &Value,
    experts: usize,
    (first, per, count): (usize, usize, usize),
    extra: &dyn Fn(usize) -> i64,
) -> (Vec<Value>, Value) {
    let slots: Vec<Vec<usize>> =
        (0..count).map(|j| (0..experts).map(|x| first + per * x + j).collect()).collect();
    if let Some(table) = super::TableSlot::plan(f, &slots) {
        // On the CPU, from the table of buffer addresses; the extra index by arithmetic where it
        // is affine in the expert (as callers' are), else by a switch of indexes alone.
        // An expert number outside 0..E (callers never use what it picks) reads expert 0's.
        let (ev, zero) = (f.b.index(experts as i64), f.b.index(0));
        let valid = f.cmp("ult", e, &ev, "index");
        let clamped = f.select(&valid, e, &zero, "index");
        let views: Vec<Value> = table.iter().map(|slot| slot.view(f, &clamped)).collect();
        let (e0, step) = (extra(0), if experts > 1 { extra(1) - extra(0) } else { 0 });
        let last = if (0..experts).all(|x| extra(x) == e0 + step * x as i64) {
            let (e0, step) = (f.b.index(e0), f.b.index(step));
            let at = f.b.muli(e, &step);
            f.b.addi(&at, &e0)
        } else {
            index_switch(f, e, experts, &["index"], |f, case| vec![f.b.index(extra(case.unwrap_or(0)))])
                .remove(0)
        };
        return (views, last);
    }
    let elem = f.storage(first);
    let dynamic = format!("memref<?x{elem}>");
    let mut types: Vec<&str> = vec![dynamic.as_str(); count];
    types.push("index");
    let mut picked = index_switch(f, e, experts, &types, |f, case| {
        // The default (an index outside 0..E, which callers never use) yields expert 0.
        let x = case.unwrap_or(0);
        let mut vals: Vec<Value> = (0..count)
            .map(|j| {
                let buf = &f.bufs[first + per * x + j];
                let (view, memref) = (buf.view.clone(), buf.memref.clone());
                if memref == dynamic {
                    view
                } else {
                    f.b.op("w", format_args!("memref.cast {view} : {memref} to {dynamic}"))
                }
            })
            .collect();
        vals.push(f.b.index(extra(x)));
        vals
    });
    let last = picked.pop().expect("the extra value");
    (picked, last)
}

pub(super) fn experts(f: &mut Frame, num_experts: u64) -> Result<LaunchShape, LowerError> {
    let name = "moe_experts";
    let x = f.bufs[0].ty.clone();
    let dtype = x.dtype;
    let index_type = f.bufs[2].ty.dtype;
    let e_count = num_experts as usize;
    let out = 3 + 3 * e_count;
    let d = known(f, name, x.shape[x.rank() - 1], "the model dimension")?;
    let w = f.bufs[1].ty.clone();
    let k = known(f, name, w.shape[w.rank() - 1], "top_k")?;
    let inter: Vec<u64> = (0..e_count)
        .map(|e| known(f, name, f.bufs[3 + 3 * e].ty.shape[0], "an expert's size"))
        .collect::<Result<_, _>>()?;
    let i_max = inter.iter().copied().max().unwrap_or(0).max(1);
    let tokens = x.shape[..x.rank() - 1].iter().try_fold(Dim::known(1), |a, &d| a.checked_mul(d));
    let tokens = tokens.ok_or_else(|| f.unsupported(name, "the token count does not fit a dimension"))?;
    let block = f.gpu_block(i_max.max(d).next_power_of_two().clamp(32, BLOCK as u64) as i64);
    let (h, h_ty) = match f.target {
        Target::Cpu => f.scratch("f32", i_max),
        Target::Gpu => f.workgroup("hidden", "f32", i_max),
    };
    let (dv, kv, ev) = (f.b.index(d as i64), f.b.index(k as i64), f.b.index(num_experts as i64));
    let (zero, one) = (f.b.index(0), f.b.index(1));
    let elem_view = format!("memref<?x{}>", f.storage(3));
    let body = |f: &mut Frame, t: &Value| {
        let xb = f.b.muli(t, &dv);
        let slots = f.b.muli(t, &kv);
        owned(f, &dv, block, |f, o| {
            let at = f.b.addi(&xb, o);
            let fzero = f.b.f32(0.0);
            f.store(out, &at, &fzero);
        });
        // Slot keys e * K + s (invalid experts sort last as E * K + s); take them in order.
        let ek = f.b.muli(&ev, &kv);
        let past = f.b.addi(&ek, &kv);
        for_carry(f, &zero, &kv, &one, &[(zero.clone(), "index")], |f, _, lower| {
            let key = for_carry(f, &zero, &kv, &one, &[(past.clone(), "index")], |f, s, best| {
                let at = f.b.addi(&slots, s);
                let id = f.load(2, &at);
                let e = f.int_to_index(&id, index_type);
                let valid = f.cmp("ult", &e, &ev, "index");
                let ok_key = f.b.muli(&e, &kv);
                let ok_key = f.b.addi(&ok_key, s);
                let bad_key = f.b.addi(&ek, s);
                let key = f.select(&valid, &ok_key, &bad_key, "index");
                let ge = f.cmp("uge", &key, &lower[0], "index");
                let lt = f.cmp("ult", &key, &best[0], "index");
                let take = and(f, &ge, &lt);
                vec![f.select(&take, &key, &best[0], "index")]
            })
            .remove(0);
            let e = f.b.divui(&key, &kv);
            let s = f.b.remui(&key, &kv);
            let valid = f.cmp("ult", &e, &ev, "index");
            if_then(f, &valid, |f| {
                let at = f.b.addi(&slots, &s);
                let weight = f.load(1, &at);
                let (m, i_e) = pick_buffers(f, &e, e_count, (3, 3, 3), &|x| inter[x] as i64);
                let load =
                    |f: &mut Frame, which: usize, idx: &Value| f.load_view(&m[which], &elem_view, dtype, idx);
                owned(f, &i_e, block, |f, j| {
                    let row = f.b.muli(j, &dv);
                    let fzero = f.b.f32(0.0);
                    let gu = for_carry(
                        f,
                        &zero,
                        &dv,
                        &one,
                        &[(fzero.clone(), "f32"), (fzero, "f32")],
                        |f, i, acc| {
                            let xi = f.b.addi(&xb, i);
                            let xv = f.load(0, &xi);
                            let wi = f.b.addi(&row, i);
                            let g = load(f, 0, &wi);
                            let u = load(f, 1, &wi);
                            vec![f.fma(&xv, &g, &acc[0]), f.fma(&xv, &u, &acc[1])]
                        },
                    );
                    let g = f.round_to(&gu[0], dtype);
                    let a = f.unary(UnaryOp::Silu, &g);
                    let a = f.round_to(&a, dtype);
                    let u = f.round_to(&gu[1], dtype);
                    let hv = f.binf("mulf", &a, &u);
                    let hv = f.round_to(&hv, dtype);
                    put(f, (&h, &h_ty), j, &hv);
                });
                sync(f);
                owned(f, &dv, block, |f, o| {
                    let row = f.b.muli(o, &i_e);
                    let fzero = f.b.f32(0.0);
                    let y = for_carry(f, &zero, &i_e, &one, &[(fzero, "f32")], |f, j, acc| {
                        let hj = get(f, (&h, &h_ty), j);
                        let wi = f.b.addi(&row, j);
                        let dw = load(f, 2, &wi);
                        vec![f.fma(&hj, &dw, &acc[0])]
                    })
                    .remove(0);
                    let y = f.round_to(&y, dtype);
                    let c = f.binf("mulf", &y, &weight);
                    let c = f.round_to(&c, dtype);
                    let at = f.b.addi(&xb, o);
                    let acc = f.load(out, &at);
                    let sum = f.binf("addf", &acc, &c);
                    f.store(out, &at, &sum);
                });
                // `hidden` is rewritten by the next expert.
                sync(f);
            });
            vec![f.b.addi(&key, &one)]
        });
    };
    Ok(match f.target {
        Target::Cpu => {
            let (lo, hi) = f.range.clone().expect("CPU frames have a work range");
            for_loop(f, &lo, &hi, &one, body);
            LaunchShape::Cpu { work: tokens }
        }
        Target::Gpu => {
            let t = f.gpu_id("block_id", 'x');
            body(f, &t);
            LaunchShape::Gpu {
                grid: [GridDim { work: tokens, per_block: 1 }, GridDim::one(), GridDim::one()],
                block: [block as u32, 1, 1],
            }
        }
    })
}

pub(super) fn dispatch(f: &mut Frame, plan: &Dispatch) -> Result<LaunchShape, LowerError> {
    let x = f.bufs[0].ty.shape.clone();
    let index_type = f.bufs[1].ty.dtype;
    let (sorted, offsets, perm) = (2, 3, 4);
    let slots_dim = f.bufs[perm].ty.shape[0];
    let slots = f.dim(slots_dim);
    let d = f.dim(x[1]);
    let kv = f.b.index(plan.top_k as i64);
    let e = plan.num_experts;
    let ev = f.b.index(e as i64);
    // One cursor per expert and one for the slots of no expert (index `E`, or any index outside
    // `0..E`), which go after every expert's rows.
    let (cursor, cursor_ty) = match f.target {
        Target::Cpu => f.scratch("i32", e + 1),
        Target::Gpu => f.workgroup("cursor", "i32", e + 1),
    };
    let cursor = (&cursor, cursor_ty.as_str());
    let (zero, one) = (f.b.index(0), f.b.index(1));
    let sort = |f: &mut Frame| {
        let e1 = f.b.addi(&ev, &one);
        let izero = f.b.constant("0", "i32");
        let ione = f.b.constant("1", "i32");
        for_loop(f, &zero, &e1, &one, |f, i| f.store(offsets, i, &izero));
        // The slot's expert, `E` for none (a negative index reads as a huge one).
        let expert_of = |f: &mut Frame, s: &Value| {
            let id = f.load(1, s);
            let id = f.int_to_index(&id, index_type);
            f.b.minui(&id, &ev)
        };
        for_loop(f, &zero, &slots, &one, |f, s| {
            let ex = expert_of(f, s);
            let real = f.cmp("ult", &ex, &ev, "index");
            if_then(f, &real, |f| {
                let at = f.b.addi(&ex, &one);
                let c = f.load(offsets, &at);
                let c = f.b.op("n", format_args!("arith.addi {c}, {ione} : i32"));
                f.store(offsets, &at, &c);
            });
        });
        for_loop(f, &zero, &ev, &one, |f, ex| {
            let at = f.b.addi(ex, &one);
            let start = f.load(offsets, ex);
            let count = f.load(offsets, &at);
            let end = f.b.op("n", format_args!("arith.addi {start}, {count} : i32"));
            f.store(offsets, &at, &end);
            put(f, cursor, ex, &start);
        });
        let none_start = f.load(offsets, &ev);
        put(f, cursor, &ev, &none_start);
        for_loop(f, &zero, &slots, &one, |f, s| {
            let ex = expert_of(f, s);
            let row = get(f, cursor, &ex);
            let next = f.b.op("n", format_args!("arith.addi {row}, {ione} : i32"));
            put(f, cursor, &ex, &next);
            let row = f.int_to_index(&row, DType::I32);
            let slot = f.index_to_int(s, DType::I32);
            f.store(perm, &row, &slot);
        });
    };
    let copy = |f: &mut Frame| {
        let total = f.b.muli(&slots, &d);
        owned(f, &total, BLOCK, |f, i| {
            let r = f.b.divui(i, &d);
            let c = f.b.remui(i, &d);
            let slot = f.load(perm, &r);
            let slot = f.int_to_index(&slot, DType::I32);
            let token = f.b.divui(&slot, &kv);
            let td = f.b.muli(&token, &d);
            let src = f.b.addi(&td, &c);
            let v = f.load_raw(0, &src);
            f.store_raw(sorted, i, &v);
        });
    };
    Ok(match f.target {
        Target::Cpu => {
            let (lo, hi) = f.range.clone().expect("CPU frames have a work range");
            for_loop(f, &lo, &hi, &one, |f, _| {
                sort(f);
                copy(f);
            });
            LaunchShape::Cpu { work: Dim::known(1) }
        }
        Target::Gpu => {
            let tid = f.gpu_id("thread_id", 'x');
            let first = f.cmp("eq", &tid, &zero, "index");
            if_then(f, &first, sort);
            // The permutation thread 0 wrote to global memory is visible to the block after this.
            sync(f);
            copy(f);
            LaunchShape::Gpu { grid: [GridDim::one(); 3], block: [BLOCK as u32, 1, 1] }
        }
    })
}

/// The expert whose rows (buffer 1 holds the `offsets[E + 1]`) hold row `m`, by counting the
/// experts that end at or before it (`E` when none holds it), and whether one does.
pub(super) fn expert_of_row(
    f: &mut Frame,
    m: &Value,
    num_experts: u64,
    offsets_type: DType,
) -> (Value, Value) {
    let (zero, one) = (f.b.index(0), f.b.index(1));
    let ev = f.b.index(num_experts as i64);
    let e = for_carry(f, &zero, &ev, &one, &[(zero.clone(), "index")], |f, e, count| {
        let at = f.b.addi(e, &one);
        let end = f.load(1, &at);
        let end = f.int_to_index(&end, offsets_type);
        let before = f.cmp("ule", &end, m, "index");
        let next = f.b.addi(&count[0], &one);
        vec![f.select(&before, &next, &count[0], "index")]
    })
    .remove(0);
    let valid = f.cmp("ult", &e, &ev, "index");
    (e, valid)
}

pub(super) fn grouped_linear(f: &mut Frame, num_experts: u64) -> Result<LaunchShape, LowerError> {
    let x = f.bufs[0].ty.shape.clone();
    // Float operands on the CPU (f32, or f16/bf16 widened as they load): the register-blocked
    // rows of `matmul::grouped_with`.
    let floats = (0..2 + num_experts as usize).filter(|&b| b != 1).all(|b| vector_float(f.bufs[b].ty.dtype));
    if f.target == Target::Cpu && floats {
        use super::matmul::{grouped_with, Operand};
        let out = 2 + num_experts as usize;
        let weights = vec![(2..out).map(Operand::Plain).collect::<Vec<_>>()];
        let w = f.bufs[2].ty.shape.clone();
        let store = move |f: &mut Frame, at: &Value, ys: &[Value]| f.store(out, at, &ys[0]);
        return grouped_with(f, &Operand::Plain(0), 1, &weights, (&x, &w), &store);
    }
    let offsets_type = f.bufs[1].ty.dtype;
    let e_count = num_experts as usize;
    let out = 2 + e_count;
    let y = f.bufs[out].ty.shape.clone();
    let (m_dim, n_dim) = (y[0], y[1]);
    let (n, kd) = (f.dim(n_dim), f.dim(x[1]));
    let (zero, one) = (f.b.index(0), f.b.index(1));
    let dtype = f.bufs[2].ty.dtype;
    let elem_view = format!("memref<?x{}>", f.storage(2));
    // The expert whose rows hold `m` (E when none does), and its weight.
    let expert = |f: &mut Frame, m: &Value| {
        let (e, valid) = expert_of_row(f, m, num_experts, offsets_type);
        let (w, _) = pick_buffers(f, &e, e_count, (2, 1, 1), &|_| 0);
        (valid, w.into_iter().next().expect("one buffer"))
    };
    // A row of no expert is zeros, computed from nothing.
    let element = |f: &mut Frame, m: &Value, col: &Value, valid: &Value, w: &Value| {
        let mn = f.b.muli(m, &n);
        let at = f.b.addi(&mn, col);
        let dot = |f: &mut Frame| {
            let xb = f.b.muli(m, &kd);
            let wb = f.b.muli(col, &kd);
            let fzero = f.b.f32(0.0);
            // Scalar loads and FMAs along K (FP8 weights on the CPU, every dtype on the GPU).
            let dot = for_carry(f, &zero, &kd, &one, &[(fzero, "f32")], |f, i, acc| {
                let xi = f.b.addi(&xb, i);
                let xv = f.load(0, &xi);
                let wi = f.b.addi(&wb, i);
                let wv = f.load_view(w, &elem_view, dtype, &wi);
                vec![f.fma(&xv, &wv, &acc[0])]
            })
            .remove(0);
            f.store(out, &at, &dot);
        };
        let zero_out = |f: &mut Frame| {
            let fzero = f.b.f32(0.0);
            f.store(out, &at, &fzero);
        };
        if_then_else(f, valid, dot, zero_out);
    };
    Ok(match f.target {
        Target::Cpu => {
            let (lo, hi) = f.range.clone().expect("CPU frames have a work range");
            for_loop(f, &lo, &hi, &one, |f, m| {
                let (valid, w) = expert(f, m);
                for_loop(f, &zero, &n, &one, |f, col| element(f, m, col, &valid, &w));
            });
            LaunchShape::Cpu { work: m_dim }
        }
        Target::Gpu => {
            let (tid, bx, m) =
                (f.gpu_id("thread_id", 'x'), f.gpu_id("block_id", 'x'), f.gpu_id("block_id", 'y'));
            let bs = f.b.index(BLOCK);
            let base = f.b.muli(&bx, &bs);
            let col = f.b.addi(&base, &tid);
            let inside = f.cmp("ult", &col, &n, "index");
            if_then(f, &inside, |f| {
                let (valid, w) = expert(f, &m);
                element(f, &m, &col, &valid, &w);
            });
            LaunchShape::Gpu {
                grid: [
                    GridDim { work: n_dim, per_block: BLOCK as u64 },
                    GridDim { work: m_dim, per_block: 1 },
                    GridDim::one(),
                ],
                block: [BLOCK as u32, 1, 1],
            }
        }
    })
}

/// Columns per CPU work item of `moe_combine`.
const COMBINE_COLS: u64 = 256;

pub(super) fn combine(f: &mut Frame, top_k: u64) -> Result<LaunchShape, LowerError> {
    let y = f.bufs[0].ty.clone();
    let perm_type = f.bufs[1].ty.dtype;
    let tokens_dim = f.bufs[2].ty.shape[0];
    let (rows, d, tokens) = (f.dim(y.shape[0]), f.dim(y.shape[1]), f.dim(tokens_dim));
    let kv = f.b.index(top_k as i64);
    let (zero, one) = (f.b.index(0), f.b.index(1));
    let dtype = y.dtype;
    if let (Target::Cpu, Some(dn)) = (f.target, y.shape[1].as_known()) {
        // Work items are (token, chunk of COMBINE_COLS columns): each finds its token's rows by
        // scanning the permutation (a few integer loads per row) and adds them in row order, as
        // the column items below do, so the sums are the same; but it reads and writes whole
        // runs of a row instead of one column of every row.
        let chunks = dn.div_ceil(COMBINE_COLS).max(1);
        let work = tokens_dim
            .checked_mul(Dim::known(chunks))
            .ok_or_else(|| f.unsupported("moe_combine", "the work does not fit a dimension"))?;
        let (lo, hi) = f.range.clone().expect("CPU frames have a work range");
        let (chv, cw) = (f.b.index(chunks as i64), f.b.index(COMBINE_COLS as i64));
        for_loop(f, &lo, &hi, &one, |f, i| {
            let t = f.b.divui(i, &chv);
            let tc = f.b.muli(&t, &chv);
            let ch = f.b.subi(i, &tc);
            let c0 = f.b.muli(&ch, &cw);
            let c1 = f.b.addi(&c0, &cw);
            let c1 = f.b.minui(&c1, &d);
            let td = f.b.muli(&t, &d);
            let fzero = f.b.f32(0.0);
            for_loop(f, &c0, &c1, &one, |f, c| {
                let at = f.b.addi(&td, c);
                f.store(3, &at, &fzero);
            });
            for_loop(f, &zero, &rows, &one, |f, r| {
                let slot = f.load(1, r);
                let slot = f.int_to_index(&slot, perm_type);
                let valid = f.cmp("ult", &slot, &rows, "index");
                let token = f.b.divui(&slot, &kv);
                let same = f.cmp("eq", &token, &t, "index");
                let mine = f.b.op("p", format_args!("arith.andi {valid}, {same} : i1"));
                if_then(f, &mine, |f| {
                    let w = f.load(2, &slot);
                    let rd = f.b.muli(r, &d);
                    for_loop(f, &c0, &c1, &one, |f, c| {
                        let yi = f.b.addi(&rd, c);
                        let v = f.load(0, &yi);
                        let contrib = f.binf("mulf", &v, &w);
                        let contrib = f.round_to(&contrib, dtype);
                        let at = f.b.addi(&td, c);
                        let acc = f.load(3, &at);
                        let sum = f.binf("addf", &acc, &contrib);
                        f.store(3, &at, &sum);
                    });
                });
            });
        });
        return Ok(LaunchShape::Cpu { work });
    }
    Ok(each_element(f, y.shape[1], |f, c| {
        let fzero = f.b.f32(0.0);
        for_loop(f, &zero, &tokens, &one, |f, t| {
            let td = f.b.muli(t, &d);
            let at = f.b.addi(&td, c);
            f.store(3, &at, &fzero);
        });
        for_loop(f, &zero, &rows, &one, |f, r| {
            let slot = f.load(1, r);
            let slot = f.int_to_index(&slot, perm_type);
            let valid = f.cmp("ult", &slot, &rows, "index");
            if_then(f, &valid, |f| {
                let token = f.b.divui(&slot, &kv);
                let w = f.load(2, &slot);
                let rd = f.b.muli(r, &d);
                let yi = f.b.addi(&rd, c);
                let v = f.load(0, &yi);
                let contrib = f.binf("mulf", &v, &w);
                let contrib = f.round_to(&contrib, dtype);
                let td = f.b.muli(&token, &d);
                let at = f.b.addi(&td, c);
                let acc = f.load(3, &at);
                let sum = f.binf("addf", &acc, &contrib);
                f.store(3, &at, &sum);
            });
        });
    }))
}
