//! The gradient of attention, `attention_grad`: operands `q`, `k`, `v`, optional `positions`, `do`
//! (of the forward's shapes, see the parent module); results `dq`, `dk`, `dv`. It recomputes the
//! probabilities with the forward's own scores, online softmax and masking (the parent's
//! `visible`, `score`, `online`), and computes, per query row `r` and visible key `s`,
//! `P = exp(score - m) / l`, `dP = do_r . v_s`, `w_r = sum_s P dP`, `dS = P (dP - w_r) scale`,
//! `dq_r = sum_s dS k_s`, `dk_s = sum_r dS q_r`, `dv_s = sum_r round(P) do_r` (`round`: to the
//! activation dtype, as the forward weighs `v`; the rest unrounded, as the interpreter), in f32.
//!
//! The work split is race-free by ownership: a work item is one `(b, kh)`, a batch and a key/value
//! head, which owns the `dq` rows of every query `(b, t, h)` of its head group (`h / (H / Hk) = kh`)
//! and the `dk`, `dv` rows of every key `(b, s, kh)`, so the grouped query heads that share a key
//! head are summed by the one work item that owns it. It runs two stages, one after the other:
//!
//! 1. each of its query rows in turn: `(m, l)` (one pass), `w` (a second), then `dq` (a third),
//!    written rounded once; the row's `(m, l, w)` go to the kernel's **workspace**, `f32[B, T, H,
//!    3]` (a scratch buffer the runtime provides for the launch, [`crate::codegen::fusion::workspace`]);
//! 2. each of its key rows in turn: the sums over every query row that sees the key (the same mask),
//!    reading back that row's statistics, so no statistics are computed twice.
//!
//! CPU: the `Dk`/`Dv` accumulators of a row are scratch arrays. GPU: a block per `(b, kh)` (the
//! power of two covering `max(Dk, Dv)`, 32 to 128 threads). Stage 1 is the forward's block per row
//! (query and `do` rows staged in shared memory, a per-thread online `(m, l)` merged by a tree, `w`
//! by a tree sum, `dq` over chunks of `block` keys: each thread one key's `dS` into shared memory,
//! then each thread its own `dq` columns over the chunk); thread 0 writes the statistics, and a
//! barrier makes them visible to the block. Stage 2 stages the key and value rows, then takes the
//! `T * H / Hk` query rows a chunk of `block` at a time: each thread one row's rounded `P` and `dS`
//! into shared memory, then each thread its own `dk` and `dv` columns over the chunk. Work:
//! `O(T * S * (Dk + Dv))` per work item, each score computed three times in stage 1 and once more in
//! stage 2; parallelism `B * Hk` blocks. `H`, `Hk`, `Dk` and `Dv` must be constants.
//!
//! Tolerance against the interpreter (f64 sums, f32 probabilities): the score gradients of a row
//! sum to 0, so `dq` and `dk` are cancelling sums of terms up to about 10: within `1e-5` absolute
//! below 1 and relative above (a few `1e-7` measured on the families' shapes).
//!
//! A fast one would need FlashAttention-2's backward: the forward saving each row's log-sum-exp and a
//! pre-pass for `w = rowsum(do * out)`, a grid over key tiles (`B * Hk * S / 64` blocks, not
//! `B * Hk`) each keeping its `dk`/`dv` tile in registers while it streams query tiles through
//! shared memory (TMA, double-buffered), the five products as tensor-core GEMMs (`wgmma` on sm_90a),
//! and `dq` accumulated across key tiles with f32 atomics or by a second kernel over query tiles.

use kiln_ir::Dim;

use super::super::reduce::block_sum;
use super::super::{Frame, GridDim, LaunchShape, LowerError, Target};
use super::{
    block_stats, constants, dot, dot_cpu, known, online, owned_columns, row, score, score_cpu, softmax_at,
    visible, Mask, NEG_INF,
};
use crate::codegen::mlir::{for_carry, for_loop, if_else, if_then, Value};

/// The buffers and constant sizes of an `attention_grad` kernel.
struct Grad {
    heads: u64,
    kv_heads: u64,
    dk: u64,
    dv: u64,
    scale: f64,
    mask: Mask,
    /// `do`, the last argument.
    d_out: usize,
    /// The results `dq`, `dk`, `dv`, then the workspace of row statistics.
    dq_buf: usize,
    dk_buf: usize,
    dv_buf: usize,
    stats: usize,
}

/// A key/value row `(b, s, kh)`: where its key, value and their gradients are.
struct KeyRow {
    k: Value,
    v: Value,
}

/// The work item of `(b, kh)`: its batch and key/value head.
fn item_of(f: &mut Frame, g: &Grad, item: &Value) -> (Value, Value) {
    let hk = f.b.index(g.kv_heads as i64);
    (f.b.divui(item, &hk), f.b.remui(item, &hk))
}

/// Query row `(b * T + t) * H + kh * G + j`, head `j` of key head `kh`'s group.
fn query_row(f: &mut Frame, g: &Grad, (b, kh): (&Value, &Value), t: &Value, j: &Value) -> (Value, Value) {
    let t_len = f.bufs[0].ty.shape[1];
    let t_len = f.dim(t_len);
    let (h_v, g_v) = (f.b.index(g.heads as i64), f.b.index((g.heads / g.kv_heads) as i64));
    let bt0 = f.b.muli(b, &t_len);
    let bt = f.b.addi(&bt0, t);
    let h0 = f.b.muli(kh, &g_v);
    let h = f.b.addi(&h0, j);
    let r0 = f.b.muli(&bt, &h_v);
    (bt, f.b.addi(&r0, &h))
}

/// Key/value row `s` of `(b, kh)`.
fn key_row(f: &mut Frame, g: &Grad, (b, kh): (&Value, &Value), s: &Value) -> KeyRow {
    let s_len = f.bufs[1].ty.shape[1];
    let s_len = f.dim(s_len);
    let hk = f.b.index(g.kv_heads as i64);
    let (dk, dv) = (f.b.index(g.dk as i64), f.b.index(g.dv as i64));
    let bs = f.b.muli(b, &s_len);
    let bss = f.b.addi(&bs, s);
    let at = f.b.muli(&bss, &hk);
    let at = f.b.addi(&at, kh);
    KeyRow { k: f.b.muli(&at, &dk), v: f.b.muli(&at, &dv) }
}

/// The statistics of query row `r` in the workspace: `(max, sum, sum_s P_s dP_s)`.
fn stat_at(f: &mut Frame, r: &Value, which: i64) -> Value {
    let three = f.b.index(3);
    let base = f.b.muli(r, &three);
    let w = f.b.index(which);
    f.b.addi(&base, &w)
}

fn load_stats(f: &mut Frame, g: &Grad, r: &Value) -> [Value; 3] {
    [0, 1, 2].map(|w| {
        let at = stat_at(f, r, w);
        f.load(g.stats, &at)
    })
}

fn store_stats(f: &mut Frame, g: &Grad, r: &Value, stats: [&Value; 3]) {
    for (w, v) in stats.into_iter().enumerate() {
        let at = stat_at(f, r, w as i64);
        f.store(g.stats, &at, v);
    }
}

/// The gradient terms of one (query, key) pair of score `x`, value-gradient product `dp = do . v`
/// and row statistics `(m, l, w)`: the probability rounded to the dtype (what `dv` sums) and
/// `dS = P * (dP - w) * scale` (what `dq` and `dk` sum).
fn pair_terms(f: &mut Frame, g: &Grad, x: &Value, dp: &Value, [m, l, w]: [&Value; 3]) -> (Value, Value) {
    let p = softmax_at(f, m, l, x);
    let dtype = f.bufs[0].ty.dtype;
    let rounded = f.round_to(&p, dtype);
    let centred = f.binf("subf", dp, w);
    let ds = f.binf("mulf", &p, &centred);
    let scale = f.b.f32(g.scale);
    (rounded, f.binf("mulf", &ds, &scale))
}

/// `attention_grad`: operands `q`, `k`, `v`, optional `positions`, `do`; results `dq`, `dk`, `dv`;
/// workspace `stats f32[B, T, H, 3]`. See the module documentation.
pub(in crate::codegen::lower) fn attention_grad(
    f: &mut Frame,
    scale: f64,
    causal: bool,
) -> Result<LaunchShape, LowerError> {
    let name = "attention_grad";
    let (heads, kv_heads, dv) = constants(f, name)?;
    let dk = known(f, name, f.bufs[0].ty.shape[3], "the query head dimension")?;
    let args = f.kernel.args.len();
    if f.kernel.scratch.len() != 1 {
        return Err(f.unsupported(name, "its kernel lacks the workspace of row statistics"));
    }
    let g = Grad {
        heads,
        kv_heads,
        dk,
        dv,
        scale,
        mask: Mask::of(f, 4, causal),
        d_out: args - 1,
        dq_buf: args,
        dk_buf: args + 1,
        dv_buf: args + 2,
        stats: args + 3,
    };
    let items = f.bufs[0].ty.shape[0]
        .checked_mul(Dim::known(kv_heads))
        .ok_or_else(|| f.unsupported(name, "the work item count does not fit a dimension"))?;
    match f.target {
        Target::Cpu => grad_cpu(f, &g, items),
        Target::Gpu => grad_gpu(f, &g, items),
    }
}

fn grad_cpu(f: &mut Frame, g: &Grad, items: Dim) -> Result<LaunchShape, LowerError> {
    let (dq_acc, dq_ty) = f.scratch("f32", g.dk);
    let (dk_acc, dk_ty) = f.scratch("f32", g.dk);
    let (dv_acc, dv_ty) = f.scratch("f32", g.dv);
    let (t_len, s_len) = (f.bufs[0].ty.shape[1], f.bufs[1].ty.shape[1]);
    let (t_len, s_len) = (f.dim(t_len), f.dim(s_len));
    let (zero, one) = (f.b.index(0), f.b.index(1));
    let (dk, dv) = (f.b.index(g.dk as i64), f.b.index(g.dv as i64));
    let group = f.b.index((g.heads / g.kv_heads) as i64);
    let fzero = f.b.f32(0.0);
    let get = |f: &mut Frame, (a, ty): (&Value, &str), i: &Value| {
        f.b.op("acc", format_args!("memref.load {a}[{i}] : {ty}"))
    };
    let put = |f: &mut Frame, (a, ty): (&Value, &str), i: &Value, v: &Value| {
        f.b.line(format_args!("memref.store {v}, {a}[{i}] : {ty}"));
    };
    let (dq_acc, dk_acc, dv_acc) =
        ((&dq_acc, dq_ty.as_str()), (&dk_acc, dk_ty.as_str()), (&dv_acc, dv_ty.as_str()));
    let (lo, hi) = f.range.clone().expect("CPU frames have a work range");
    for_loop(f, &lo, &hi, &one, |f, item| {
        let (b, kh) = item_of(f, g, item);
        // Stage 1, the query rows of (b, kh): statistics, then dq.
        for_loop(f, &zero, &t_len, &one, |f, t| {
            for_loop(f, &zero, &group, &one, |f, j| {
                let (_, r) = query_row(f, g, (&b, &kh), t, j);
                let row = row(f, &r, (g.heads, g.kv_heads), g.scale, g.mask);
                let dp_of = |f: &mut Frame, s: &Value| {
                    let vs = f.b.muli(s, &row.v_step);
                    let vbase = f.b.addi(&row.v, &vs);
                    dot_cpu(f, &row.dv, (g.d_out, &row.out), (2, &vbase))
                };
                let ninf = f.b.constant(NEG_INF, "f32");
                let ml = for_carry(
                    f,
                    &zero,
                    &row.visible,
                    &one,
                    &[(ninf, "f32"), (fzero.clone(), "f32")],
                    |f, s, c| {
                        let x = score_cpu(f, &row, s);
                        let (m, l) = online(f, &c[0], &c[1], &x);
                        vec![m, l]
                    },
                );
                let (m, l) = (&ml[0], &ml[1]);
                let w = for_carry(f, &zero, &row.visible, &one, &[(fzero.clone(), "f32")], |f, s, acc| {
                    let x = score_cpu(f, &row, s);
                    let p = softmax_at(f, m, l, &x);
                    let dp = dp_of(f, s);
                    vec![f.fma(&p, &dp, &acc[0])]
                })
                .remove(0);
                for_loop(f, &zero, &dk, &one, |f, i| put(f, dq_acc, i, &fzero));
                for_loop(f, &zero, &row.visible, &one, |f, s| {
                    let x = score_cpu(f, &row, s);
                    let dp = dp_of(f, s);
                    let (_, ds) = pair_terms(f, g, &x, &dp, [m, l, &w]);
                    let ks = f.b.muli(s, &row.k_step);
                    let kbase = f.b.addi(&row.k, &ks);
                    for_loop(f, &zero, &dk, &one, |f, i| {
                        let ki = f.b.addi(&kbase, i);
                        let kv = f.load(1, &ki);
                        let a = get(f, dq_acc, i);
                        let a = f.fma(&ds, &kv, &a);
                        put(f, dq_acc, i, &a);
                    });
                });
                for_loop(f, &zero, &dk, &one, |f, i| {
                    let a = get(f, dq_acc, i);
                    let at = f.b.addi(&row.q, i);
                    f.store(g.dq_buf, &at, &a);
                });
                store_stats(f, g, &r, [m, l, &w]);
            });
        });
        // Stage 2, the key rows of (b, kh): each sums over the query rows that see it.
        for_loop(f, &zero, &s_len, &one, |f, s| {
            let key = key_row(f, g, (&b, &kh), s);
            for_loop(f, &zero, &dk, &one, |f, i| put(f, dk_acc, i, &fzero));
            for_loop(f, &zero, &dv, &one, |f, i| put(f, dv_acc, i, &fzero));
            for_loop(f, &zero, &t_len, &one, |f, t| {
                let (bt, _) = query_row(f, g, (&b, &kh), t, &zero);
                let visible = visible(f, g.mask, &bt, t);
                let seen = f.cmp("ult", s, &visible, "index");
                if_then(f, &seen, |f| {
                    for_loop(f, &zero, &group, &one, |f, j| {
                        let (_, r) = query_row(f, g, (&b, &kh), t, j);
                        let q_off = f.b.muli(&r, &dk);
                        let o_off = f.b.muli(&r, &dv);
                        let at = |base: &Value, buf: usize| {
                            let base = base.clone();
                            move |f: &mut Frame, i: &Value| {
                                let a = f.b.addi(&base, i);
                                f.load(buf, &a)
                            }
                        };
                        let (query, d_out) = (at(&q_off, 0), at(&o_off, g.d_out));
                        // The forward's score, summed in the same order (`score_cpu`).
                        let x = dot_cpu(f, &dk, (0, &q_off), (1, &key.k));
                        let scale = f.b.f32(g.scale);
                        let x = f.binf("mulf", &x, &scale);
                        let dp = dot_cpu(f, &dv, (g.d_out, &o_off), (2, &key.v));
                        let [m, l, w] = load_stats(f, g, &r);
                        let (p, ds) = pair_terms(f, g, &x, &dp, [&m, &l, &w]);
                        for_loop(f, &zero, &dk, &one, |f, i| {
                            let qv = query(f, i);
                            let a = get(f, dk_acc, i);
                            let a = f.fma(&ds, &qv, &a);
                            put(f, dk_acc, i, &a);
                        });
                        for_loop(f, &zero, &dv, &one, |f, i| {
                            let ov = d_out(f, i);
                            let a = get(f, dv_acc, i);
                            let a = f.fma(&p, &ov, &a);
                            put(f, dv_acc, i, &a);
                        });
                    });
                });
            });
            for_loop(f, &zero, &dk, &one, |f, i| {
                let a = get(f, dk_acc, i);
                let at = f.b.addi(&key.k, i);
                f.store(g.dk_buf, &at, &a);
            });
            for_loop(f, &zero, &dv, &one, |f, i| {
                let a = get(f, dv_acc, i);
                let at = f.b.addi(&key.v, i);
                f.store(g.dv_buf, &at, &a);
            });
        });
    });
    Ok(LaunchShape::Cpu { work: items })
}

fn grad_gpu(f: &mut Frame, g: &Grad, items: Dim) -> Result<LaunchShape, LowerError> {
    let block = f.gpu_block(g.dk.max(g.dv).next_power_of_two().clamp(32, 128) as i64);
    let (item, tid) = (f.gpu_id("block_id", 'x'), f.gpu_id("thread_id", 'x'));
    let (b, kh) = item_of(f, g, &item);
    let (t_len, s_len) = (f.bufs[0].ty.shape[1], f.bufs[1].ty.shape[1]);
    let (t_len, s_len) = (f.dim(t_len), f.dim(s_len));
    let (zero, one, bs) = (f.b.index(0), f.b.index(1), f.b.index(block));
    let (dk, dv) = (f.b.index(g.dk as i64), f.b.index(g.dv as i64));
    let group = f.b.index((g.heads / g.kv_heads) as i64);
    let fzero = f.b.f32(0.0);
    // Rows staged in shared memory, and a chunk's probabilities and score gradients.
    let shared = |f: &mut Frame, name: &str, n: u64| {
        let (v, ty) = f.workgroup(name, "f32", n);
        let get = {
            let (v, ty) = (v.clone(), ty.clone());
            move |f: &mut Frame, i: &Value| f.b.op("x", format_args!("memref.load {v}[{i}] : {ty}"))
        };
        let put = move |f: &mut Frame, i: &Value, x: &Value| {
            f.b.line(format_args!("memref.store {x}, {v}[{i}] : {ty}"));
        };
        (get, put)
    };
    let (q_get, q_put) = shared(f, "query", g.dk);
    let (o_get, o_put) = shared(f, "d_out", g.dv);
    let (k_get, k_put) = shared(f, "key", g.dk);
    let (v_get, v_put) = shared(f, "value", g.dv);
    let (p_get, p_put) = shared(f, "probs", block as u64);
    let (s_get, s_put) = shared(f, "dscores", block as u64);
    let (dq_cols, dq_safe) = owned_columns(f, g.dk, block);
    let (dv_cols, dv_safe) = owned_columns(f, g.dv, block);
    let zeros = |n: usize| vec![(fzero.clone(), "f32"); n];
    let stage =
        |f: &mut Frame, n: &Value, buf: usize, base: &Value, put: &dyn Fn(&mut Frame, &Value, &Value)| {
            for_loop(f, &tid, n, &bs, |f, i| {
                let at = f.b.addi(base, i);
                let x = f.load(buf, &at);
                put(f, i, &x);
            });
        };

    // Stage 1, the query rows of (b, kh), one after another: statistics, then dq.
    for_loop(f, &zero, &t_len, &one, |f, t| {
        for_loop(f, &zero, &group, &one, |f, j| {
            // The previous row is done with the shared rows and trees.
            f.b.line("gpu.barrier");
            let (_, r) = query_row(f, g, (&b, &kh), t, j);
            let row = row(f, &r, (g.heads, g.kv_heads), g.scale, g.mask);
            stage(f, &dk, 0, &row.q, &q_put);
            stage(f, &dv, g.d_out, &row.out, &o_put);
            f.b.line("gpu.barrier");
            let dp_of = |f: &mut Frame, s: &Value| {
                let vs = f.b.muli(s, &row.v_step);
                let vbase = f.b.addi(&row.v, &vs);
                let value = |f: &mut Frame, i: &Value| {
                    let at = f.b.addi(&vbase, i);
                    f.load(2, &at)
                };
                dot(f, &dv, &o_get, &value)
            };
            let (m, l) = block_stats(f, &row, &q_get, block);
            let partial = for_carry(f, &tid, &row.visible, &bs, &zeros(1), |f, s, acc| {
                let x = score(f, &row, s, &q_get);
                let p = softmax_at(f, &m, &l, &x);
                let dp = dp_of(f, s);
                vec![f.fma(&p, &dp, &acc[0])]
            })
            .remove(0);
            let w = block_sum(f, &partial, block);
            // dq: a chunk of `block` keys at a time, each thread one key's dS, then its columns.
            let acc = for_carry(f, &zero, &row.visible, &bs, &zeros(dq_cols.len()), |f, s0, acc| {
                let s = f.b.addi(s0, &tid);
                let inside = f.cmp("ult", &s, &row.visible, "index");
                let ds = if_else(
                    f,
                    &inside,
                    "f32",
                    |f| {
                        let x = score(f, &row, &s, &q_get);
                        let dp = dp_of(f, &s);
                        pair_terms(f, g, &x, &dp, [&m, &l, &w]).1
                    },
                    |f| f.b.f32(0.0),
                );
                s_put(f, &tid, &ds);
                f.b.line("gpu.barrier");
                let left = f.b.subi(&row.visible, s0);
                let n = f.b.minui(&left, &bs);
                let carried: Vec<(Value, &str)> = acc.iter().map(|a| (a.clone(), "f32")).collect();
                let next = for_carry(f, &zero, &n, &one, &carried, |f, jj, acc| {
                    let dsj = s_get(f, jj);
                    let sj = f.b.addi(s0, jj);
                    let ks = f.b.muli(&sj, &row.k_step);
                    let kbase = f.b.addi(&row.k, &ks);
                    dq_safe
                        .iter()
                        .zip(acc)
                        .map(|(c, a)| {
                            let ki = f.b.addi(&kbase, c);
                            let kv = f.load(1, &ki);
                            f.fma(&dsj, &kv, a)
                        })
                        .collect()
                });
                // Everyone is done with this chunk's dS before the next chunk writes them.
                f.b.line("gpu.barrier");
                next
            });
            for (c, a) in dq_cols.iter().zip(&acc) {
                let ok = f.cmp("ult", c, &dk, "index");
                if_then(f, &ok, |f| {
                    let at = f.b.addi(&row.q, c);
                    f.store(g.dq_buf, &at, a);
                });
            }
            let first = f.cmp("eq", &tid, &zero, "index");
            if_then(f, &first, |f| store_stats(f, g, &r, [&m, &l, &w]));
        });
    });
    // Thread 0's statistics (global memory) are visible to the whole block after this.
    f.b.line("gpu.barrier");

    // Stage 2, the key rows of (b, kh), one after another: a chunk of `block` query rows at a time,
    // each thread one row's rounded P and dS, then the block's columns of dk and dv.
    let rows = f.b.muli(&t_len, &group);
    for_loop(f, &zero, &s_len, &one, |f, s| {
        f.b.line("gpu.barrier");
        let key = key_row(f, g, (&b, &kh), s);
        stage(f, &dk, 1, &key.k, &k_put);
        stage(f, &dv, 2, &key.v, &v_put);
        f.b.line("gpu.barrier");
        let inits = zeros(dq_cols.len() + dv_cols.len());
        let acc = for_carry(f, &zero, &rows, &bs, &inits, |f, u0, acc| {
            p_put(f, &tid, &fzero);
            s_put(f, &tid, &fzero);
            let u = f.b.addi(u0, &tid);
            let inside = f.cmp("ult", &u, &rows, "index");
            if_then(f, &inside, |f| {
                let t = f.b.divui(&u, &group);
                let j = f.b.remui(&u, &group);
                let (bt, r) = query_row(f, g, (&b, &kh), &t, &j);
                let visible = visible(f, g.mask, &bt, &t);
                let seen = f.cmp("ult", s, &visible, "index");
                if_then(f, &seen, |f| {
                    let q_off = f.b.muli(&r, &dk);
                    let o_off = f.b.muli(&r, &dv);
                    let query = |f: &mut Frame, i: &Value| {
                        let at = f.b.addi(&q_off, i);
                        f.load(0, &at)
                    };
                    let d_out = |f: &mut Frame, i: &Value| {
                        let at = f.b.addi(&o_off, i);
                        f.load(g.d_out, &at)
                    };
                    let x = dot(f, &dk, &query, &k_get);
                    let scale = f.b.f32(g.scale);
                    let x = f.binf("mulf", &x, &scale);
                    let dp = dot(f, &dv, &d_out, &v_get);
                    let [m, l, w] = load_stats(f, g, &r);
                    let (p, ds) = pair_terms(f, g, &x, &dp, [&m, &l, &w]);
                    p_put(f, &tid, &p);
                    s_put(f, &tid, &ds);
                });
            });
            f.b.line("gpu.barrier");
            let left = f.b.subi(&rows, u0);
            let n = f.b.minui(&left, &bs);
            let carried: Vec<(Value, &str)> = acc.iter().map(|a| (a.clone(), "f32")).collect();
            let next = for_carry(f, &zero, &n, &one, &carried, |f, ii, acc| {
                let u = f.b.addi(u0, ii);
                let t = f.b.divui(&u, &group);
                let j = f.b.remui(&u, &group);
                let (_, r) = query_row(f, g, (&b, &kh), &t, &j);
                let q_off = f.b.muli(&r, &dk);
                let o_off = f.b.muli(&r, &dv);
                let (p, ds) = (p_get(f, ii), s_get(f, ii));
                let (acc_k, acc_v) = acc.split_at(dq_cols.len());
                let mut next = Vec::with_capacity(acc.len());
                for (c, a) in dq_safe.iter().zip(acc_k) {
                    let at = f.b.addi(&q_off, c);
                    let qv = f.load(0, &at);
                    next.push(f.fma(&ds, &qv, a));
                }
                for (c, a) in dv_safe.iter().zip(acc_v) {
                    let at = f.b.addi(&o_off, c);
                    let ov = f.load(g.d_out, &at);
                    next.push(f.fma(&p, &ov, a));
                }
                next
            });
            // Everyone is done with this chunk's terms before the next chunk writes them.
            f.b.line("gpu.barrier");
            next
        });
        let (acc_k, acc_v) = acc.split_at(dq_cols.len());
        for (cols, accs, (dim, base, buf)) in
            [(&dq_cols, acc_k, (&dk, &key.k, g.dk_buf)), (&dv_cols, acc_v, (&dv, &key.v, g.dv_buf))]
        {
            for (c, a) in cols.iter().zip(accs) {
                let ok = f.cmp("ult", c, dim, "index");
                if_then(f, &ok, |f| {
                    let at = f.b.addi(base, c);
                    f.store(buf, &at, a);
                });
            }
        }
    });
    Ok(LaunchShape::Gpu {
        grid: [GridDim { work: items, per_block: 1 }, GridDim::one(), GridDim::one()],
        block: [block as u32, 1, 1],
    })
}
