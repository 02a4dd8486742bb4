//! `promoted_gemm`: the GEMMs of FP8 training, summed as the interpreter sums them (see
//! [`kiln_ir::Op::PromotedGemm`]): per output element, the contraction axis in blocks of
//! `k_block` aligned at 0, each block's products widened to f64 and added in index order, the
//! block's sum rounded once to f32 and added to an f32 accumulator, blocks in order. A product
//! of two f32 values is exact in f64 and no step is reassociated (no fast-math flags), so the
//! kernels agree with the interpreter bit for bit. The CPU's vector lanes add each product with a
//! fused multiply-add, which rounds once where `s + a * b` rounds once (the product being exact):
//! the same bits in half the instructions (`kiln bench train models/tiny_fp8.toml --precision fp8
//! --profile`, 2 threads, Zen 4: `promoted_gemm` 1.33-1.51 s over 7 steps before, 1.03-1.06 after).
//!
//! Each output element has one owner that computes it whole: on the GPU a thread per element (grid
//! over columns by rows), scalar; on the CPU eight output columns at once, a vector lane each (the
//! lanes' operations are the scalar ones, lane by lane, so the order of every sum is unchanged).
//! CPU work items: for `linear` and `grouped_linear` with f32 results and a known N, eight columns
//! of one weight (of one expert), whose weight rows are packed once K-major into the thread scratch
//! and then summed against the expert's rows of x, four rows at a time so that four chains of f64
//! additions overlap (K past the panel's 65536 sums each column alone); otherwise a row of x; for
//! `grouped_linear_wgrad` four rows `(e, a..a + 4)` of one expert's weight gradient (one row where
//! four do not divide N), eight columns of x at a time from one vector load.
//! The f64 block sums are what makes the kernels exact, and they cost: FP8 training on the CPU is
//! for checking the recipe on small models, not for speed.

use kiln_ir::{DType, Dim, GemmForm};

use super::grad::clamped_bound;
use super::moe::{expert_of_row, pick_buffers};
use super::{Frame, GridDim, LaunchShape, LowerError, Target};
use crate::codegen::mlir::{for_carry, for_loop, if_then, if_then_else, Value};

const BLOCK: i64 = 128;
/// The most thread scratch a CPU work item's packed eight weight rows take (K up to 65536).
const PANEL_BYTES: u64 = 2 << 20;
const _: () = assert!(PANEL_BYTES <= super::THREAD_SCRATCH_BYTES);
/// Rows of x a CPU work item sums against its packed weight rows at once.
const ROWS: usize = 4;

/// The promoted dot product over `lo..hi` of the contraction axis, `load(i)` giving the two f32
/// operands at index `i`. Returns the f32 sum.
fn promoted_dot(
    f: &mut Frame,
    (lo, hi): (&Value, &Value),
    k_block: u64,
    load: &dyn Fn(&mut Frame, &Value) -> (Value, Value),
) -> Value {
    let (one, kb) = (f.b.index(1), f.b.index(k_block as i64));
    let kb1 = f.b.index(k_block as i64 - 1);
    let first = f.b.divui(lo, &kb);
    let end = f.b.addi(hi, &kb1);
    let end = f.b.divui(&end, &kb);
    let fzero = f.b.f32(0.0);
    for_carry(f, &first, &end, &one, &[(fzero, "f32")], |f, blk, acc| {
        let start = f.b.muli(blk, &kb);
        let stop = f.b.addi(&start, &kb);
        let from = f.b.op("i", format_args!("arith.maxui {start}, {lo} : index"));
        let to = f.b.minui(&stop, hi);
        let dzero = f.b.constant("0.0", "f64");
        let s = for_carry(f, &from, &to, &one, &[(dzero, "f64")], |f, i, s| {
            let (a, b) = load(f, i);
            let a = f.b.op("d", format_args!("arith.extf {a} : f32 to f64"));
            let b = f.b.op("d", format_args!("arith.extf {b} : f32 to f64"));
            let p = f.b.op("d", format_args!("arith.mulf {a}, {b} : f64"));
            vec![f.b.op("d", format_args!("arith.addf {}, {p} : f64", s[0]))]
        })
        .remove(0);
        let s = f.b.op("f", format_args!("arith.truncf {s} : f64 to f32"));
        vec![f.binf("addf", &acc[0], &s)]
    })
    .remove(0)
}

/// The eight lanes' operands of one index of eight dot products: eight f32 scalars, or one
/// `vector<8xf32>` (eight consecutive elements, loaded at once).
enum Lanes {
    Scalars(Vec<Value>),
    Vector(Value),
}

/// Loads of one index of eight dot products for each of R rows: each row's shared operand and the
/// eight lanes' others, which every row shares.
type LanesLoad<'a> = dyn Fn(&mut Frame, &Value) -> (Vec<Value>, Lanes) + 'a;

/// [`promoted_dot`] for eight dot products at once, one per lane, each lane in the scalar order,
/// for each of R rows: `load(i)` gives the R rows' shared f32 operands at index `i` and the eight
/// lanes' other f32 operands. The rows' sums are independent chains the CPU overlaps (one
/// chain of f64 additions waits on each addition's latency). Returns a `vector<8xf32>` per row.
fn promoted_dot8(
    f: &mut Frame,
    (lo, hi): (&Value, &Value),
    k_block: u64,
    rows: usize,
    load: &LanesLoad<'_>,
) -> Vec<Value> {
    const VD: &str = "vector<8xf64>";
    const VF: &str = "vector<8xf32>";
    let (one, kb) = (f.b.index(1), f.b.index(k_block as i64));
    let kb1 = f.b.index(k_block as i64 - 1);
    let first = f.b.divui(lo, &kb);
    let end = f.b.addi(hi, &kb1);
    let end = f.b.divui(&end, &kb);
    let fzero = f.b.constant("dense<0.0>", VF);
    let init: Vec<(Value, &str)> = (0..rows).map(|_| (fzero.clone(), VF)).collect();
    for_carry(f, &first, &end, &one, &init, |f, blk, acc| {
        let start = f.b.muli(blk, &kb);
        let stop = f.b.addi(&start, &kb);
        let from = f.b.op("i", format_args!("arith.maxui {start}, {lo} : index"));
        let to = f.b.minui(&stop, hi);
        let dzero = f.b.constant("dense<0.0>", VD);
        let zeros: Vec<(Value, &str)> = (0..rows).map(|_| (dzero.clone(), VD)).collect();
        let sums = for_carry(f, &from, &to, &one, &zeros, |f, i, s| {
            let (xs, bs) = load(f, i);
            let b = match bs {
                Lanes::Scalars(bs) => {
                    let wide: Vec<String> = (bs.iter())
                        .map(|b| f.b.op("d", format_args!("arith.extf {b} : f32 to f64")).to_string())
                        .collect();
                    f.b.op("d", format_args!("vector.from_elements {} : {VD}", wide.join(", ")))
                }
                Lanes::Vector(v) => f.b.op("d", format_args!("arith.extf {v} : {VF} to {VD}")),
            };
            (xs.iter().zip(s))
                .map(|(a, s)| {
                    let a = f.b.op("d", format_args!("arith.extf {a} : f32 to f64"));
                    let a = f.b.op("d", format_args!("vector.broadcast {a} : f64 to {VD}"));
                    // One fused multiply-add: the product of two f32 values is exact in f64,
                    // so `fma(a, b, s)` rounds once, exactly where `s + a * b` does.
                    f.b.op("d", format_args!("math.fma {a}, {b}, {s} : {VD}"))
                })
                .collect()
        });
        (sums.iter().zip(acc))
            .map(|(s, acc)| {
                let s = f.b.op("f", format_args!("arith.truncf {s} : {VD} to {VF}"));
                f.b.op("f", format_args!("arith.addf {acc}, {s} : {VF}"))
            })
            .collect()
    })
}

fn check(f: &Frame, form: GemmForm, k_block: u64) -> Result<(), LowerError> {
    if k_block == 0 || k_block > i64::MAX as u64 {
        return Err(f.unsupported("promoted_gemm", format!("k_block {k_block}")));
    }
    let operands = match form {
        GemmForm::Linear => 2,
        GemmForm::Grouped { num_experts } => 2 + num_experts as usize,
        GemmForm::GroupedWgrad { .. } => 3,
    };
    for b in 0..operands {
        if b == 1 && form != GemmForm::Linear {
            continue;
        }
        let d = f.bufs[b].ty.dtype;
        if !matches!(d, DType::F32 | DType::BF16 | DType::F16) {
            return Err(f.unsupported("promoted_gemm", format!("{d} operands")));
        }
    }
    Ok(())
}

/// `promoted_gemm {form, k_block}`: see the module documentation.
pub(super) fn promoted_gemm(f: &mut Frame, form: GemmForm, k_block: u64) -> Result<LaunchShape, LowerError> {
    check(f, form, k_block)?;
    match form {
        GemmForm::Linear | GemmForm::Grouped { .. } => rows_times_weights(f, form, k_block),
        GemmForm::GroupedWgrad { num_experts } => wgrad(f, num_experts, k_block),
    }
}

/// `linear` and `grouped_linear`: `y[m, n] = x[m, :] . w[n, :]` with `w` the one weight, or the
/// weight of the expert whose rows hold `m` (rows of no expert get zeros).
fn rows_times_weights(f: &mut Frame, form: GemmForm, k_block: u64) -> Result<LaunchShape, LowerError> {
    let experts = match form {
        GemmForm::Grouped { num_experts } => Some(num_experts),
        _ => None,
    };
    let out = match experts {
        Some(e) => 2 + e as usize,
        None => 2,
    };
    let wbuf = if experts.is_some() { 2 } else { 1 };
    let x = f.bufs[0].ty.shape.clone();
    let y = f.bufs[out].ty.shape.clone();
    let k_dim = x[x.len() - 1];
    let n_dim = y[y.len() - 1];
    let m_dim = y[..y.len() - 1].iter().try_fold(Dim::known(1), |a, &d| a.checked_mul(d));
    let m_dim =
        m_dim.ok_or_else(|| f.unsupported("promoted_gemm", "the row count does not fit a dimension"))?;
    let (n, kd) = (f.dim(n_dim), f.dim(k_dim));
    let (zero, one) = (f.b.index(0), f.b.index(1));
    let wtype = f.bufs[wbuf].ty.dtype;
    let elem_view = format!("memref<?x{}>", f.storage(wbuf));
    // Row m's weight (a view of it) and whether m is inside some expert's rows.
    let weight = |f: &mut Frame, m: &Value| -> (Value, Option<Value>) {
        let Some(e_count) = experts else {
            let (view, memref) = (f.bufs[1].view.clone(), f.bufs[1].memref.clone());
            let w = if memref == elem_view {
                view
            } else {
                f.b.op("w", format_args!("memref.cast {view} : {memref} to {elem_view}"))
            };
            return (w, None);
        };
        let offsets_type = f.bufs[1].ty.dtype;
        let (e, valid) = expert_of_row(f, m, e_count, offsets_type);
        let (w, _) = pick_buffers(f, &e, e_count as usize, (2, 1, 1), &|_| 0);
        (w.into_iter().next().expect("one buffer"), Some(valid))
    };
    let element_dot = |f: &mut Frame, m: &Value, col: &Value, w: &Value, at: &Value| {
        let xb = f.b.muli(m, &kd);
        let wb = f.b.muli(col, &kd);
        let ev = elem_view.clone();
        let dot = promoted_dot(f, (&zero, &kd), k_block, &|f, i| {
            let xi = f.b.addi(&xb, i);
            let xv = f.load(0, &xi);
            let wi = f.b.addi(&wb, i);
            (xv, f.load_view(w, &ev, wtype, &wi))
        });
        f.store(out, at, &dot);
    };
    // Eight columns at once on the CPU (a lane each, summed as one column alone), then the rest.
    let element8_dot = |f: &mut Frame, m: &Value, col: &Value, w: &Value, at: &Value| {
        let xb = f.b.muli(m, &kd);
        let wb = f.b.muli(col, &kd);
        let ev = elem_view.clone();
        let dot = promoted_dot8(f, (&zero, &kd), k_block, 1, &|f, i| {
            let xi = f.b.addi(&xb, i);
            let xv = vec![f.load(0, &xi)];
            let ws = (0..8)
                .map(|j| {
                    let row = f.b.index(j);
                    let row = f.b.muli(&row, &kd);
                    let wi = f.b.addi(&wb, &row);
                    let wi = f.b.addi(&wi, i);
                    f.load_view(w, &ev, wtype, &wi)
                })
                .collect();
            (xv, Lanes::Scalars(ws))
        })
        .remove(0);
        let (view, memref) = (f.bufs[out].view.clone(), f.bufs[out].memref.clone());
        f.b.line(format_args!("vector.store {dot}, {view}[{at}] : {memref}, vector<8xf32>"));
    };
    // A row of no expert (`valid` false) is zeros, computed from nothing.
    let unless_none =
        |f: &mut Frame, valid: &Option<Value>, at: &Value, lanes: u32, body: &dyn Fn(&mut Frame)| {
            let Some(valid) = valid else { return body(f) };
            if_then_else(f, valid, body, |f| {
                let (view, memref) = (f.bufs[out].view.clone(), f.bufs[out].memref.clone());
                if lanes == 1 {
                    let fzero = f.b.f32(0.0);
                    f.store(out, at, &fzero);
                } else {
                    let vzero = f.b.constant("dense<0.0>", &format!("vector<{lanes}xf32>"));
                    f.b.line(format_args!(
                        "vector.store {vzero}, {view}[{at}] : {memref}, vector<{lanes}xf32>"
                    ));
                }
            });
        };
    let element = |f: &mut Frame, m: &Value, col: &Value, w: &Value, valid: &Option<Value>| {
        let mn = f.b.muli(m, &n);
        let at = f.b.addi(&mn, col);
        unless_none(f, valid, &at, 1, &|f| element_dot(f, m, col, w, &at));
    };
    let element8 = |f: &mut Frame, m: &Value, col: &Value, w: &Value, valid: &Option<Value>| {
        let mn = f.b.muli(m, &n);
        let at = f.b.addi(&mn, col);
        unless_none(f, valid, &at, 8, &|f| element8_dot(f, m, col, w, &at));
    };
    let f32_out = f.bufs[out].ty.dtype == DType::F32;
    // On the CPU, a work item per eight columns of one weight (per expert): the weight's eight rows
    // are packed once into the thread scratch, K-major, so that each of the expert's rows sums them
    // from one vector load per index of K (the lanes' operands would otherwise be eight loads a
    // row of the weight apart, every row of x again).
    // A K known at compile time sizes the panel; one known only at run time (a weight gradient's
    // tokens) takes the largest, and a K past it sums each column alone.
    let panel_k = PANEL_BYTES / (8 * 4);
    let panel = match (n_dim.as_known(), k_dim.as_known()) {
        (Some(n), Some(k)) if f32_out && k <= panel_k => Some((n, k)),
        (Some(n), None) if f32_out => Some((n, panel_k)),
        _ => None,
    };
    Ok(match f.target {
        Target::Cpu if panel.is_some() => {
            let (n_known, k_most) = panel.expect("matched");
            let groups = n_known.div_ceil(8);
            let e_count = experts.unwrap_or(1);
            let (lo, hi) = f.range.clone().expect("CPU frames have a work range");
            let (scratch, stype) = f.thread_scratch(0, "f32", k_most * 8);
            let (eight, gi) = (f.b.index(8), f.b.index(groups as i64));
            let m = f.dim(m_dim);
            let fits = match k_dim.as_known() {
                Some(_) => None,
                None => {
                    let most = f.b.index(k_most as i64);
                    Some(f.cmp("ule", &kd, &most, "index"))
                }
            };
            let x_at = |f: &mut Frame, r: &Value, i: &Value| {
                let rk = f.b.muli(r, &kd);
                let xi = f.b.addi(&rk, i);
                f.load(0, &xi)
            };
            for_loop(f, &lo, &hi, &one, |f, item| {
                let e = f.b.divui(item, &gi);
                let g = f.b.remui(item, &gi);
                let c0 = f.b.muli(&g, &eight);
                // The expert's rows, as `expert_of_row` assigns them (expert 0 from row 0), its
                // weight, and after the last expert's rows those of no expert, zeros.
                let (rows, w, none) = match experts {
                    None => ((zero.clone(), m.clone()), weight(f, &zero).0, None),
                    Some(e_count) => {
                        let offsets_type = f.bufs[1].ty.dtype;
                        let first = f.cmp("eq", &e, &zero, "index");
                        let start = f.load_raw(1, &e);
                        let start = clamped_bound(f, &start, offsets_type, &m);
                        let start = f.select(&first, &zero, &start, "index");
                        let e1 = f.b.addi(&e, &one);
                        let end = f.load_raw(1, &e1);
                        let end = clamped_bound(f, &end, offsets_type, &m);
                        let end = f.b.op("i", format_args!("arith.maxui {end}, {start} : index"));
                        let (w, _) = pick_buffers(f, &e, e_count as usize, (2, 1, 1), &|_| 0);
                        let last = f.b.index(e_count as i64 - 1);
                        let last = f.cmp("eq", &e, &last, "index");
                        let ev = f.b.index(e_count as i64);
                        let tail = f.load_raw(1, &ev);
                        let tail = clamped_bound(f, &tail, offsets_type, &m);
                        let tail = f.select(&last, &tail, &m, "index");
                        ((start, end), w.into_iter().next().expect("one buffer"), Some(tail))
                    }
                };
                let left = f.b.subi(&n, &c0);
                let whole = f.cmp("uge", &left, &eight, "index");
                let whole = match &fits {
                    Some(fits) => f.b.op("p", format_args!("arith.andi {whole}, {fits} : i1")),
                    None => whole,
                };
                let (wv, ev) = (w.clone(), elem_view.clone());
                if_then_else(
                    f,
                    &whole,
                    |f| {
                        let kb = f.b.muli(&c0, &kd);
                        for_loop(f, &zero, &kd, &one, |f, i| {
                            let at = f.b.muli(i, &eight);
                            for j in 0..8 {
                                let row = f.b.index(j);
                                let row = f.b.muli(&row, &kd);
                                let wi = f.b.addi(&kb, &row);
                                let wi = f.b.addi(&wi, i);
                                let v = f.load_view(&wv, &ev, wtype, &wi);
                                let to = f.b.index(j);
                                let to = f.b.addi(&at, &to);
                                f.b.line(format_args!("memref.store {v}, {scratch}[{to}] : {stype}"));
                            }
                        });
                        let (yview, ymemref) = (f.bufs[out].view.clone(), f.bufs[out].memref.clone());
                        // ROWS rows at a time, then the rest one by one.
                        let sum_rows = |f: &mut Frame, r: &Value, count: usize| {
                            let dots = promoted_dot8(f, (&zero, &kd), k_block, count, &|f, i| {
                                let xs = (0..count as i64)
                                    .map(|j| {
                                        let j = f.b.index(j);
                                        let rj = f.b.addi(r, &j);
                                        x_at(f, &rj, i)
                                    })
                                    .collect();
                                let at = f.b.muli(i, &eight);
                                let ws = f.b.op(
                                    "wv",
                                    format_args!("vector.load {scratch}[{at}] : {stype}, vector<8xf32>"),
                                );
                                (xs, Lanes::Vector(ws))
                            });
                            for (j, dot) in dots.iter().enumerate() {
                                let j = f.b.index(j as i64);
                                let rj = f.b.addi(r, &j);
                                let rn = f.b.muli(&rj, &n);
                                let at = f.b.addi(&rn, &c0);
                                f.b.line(format_args!(
                                    "vector.store {dot}, {yview}[{at}] : {ymemref}, vector<8xf32>"
                                ));
                            }
                        };
                        let (count, step) = (f.b.subi(&rows.1, &rows.0), f.b.index(ROWS as i64));
                        let blocks = f.b.divui(&count, &step);
                        let blocks = f.b.muli(&blocks, &step);
                        let split = f.b.addi(&rows.0, &blocks);
                        for_loop(f, &rows.0, &split, &step, |f, r| sum_rows(f, r, ROWS));
                        for_loop(f, &split, &rows.1, &one, |f, r| sum_rows(f, r, 1));
                        if let Some(tail) = &none {
                            let vzero = f.b.constant("dense<0.0>", "vector<8xf32>");
                            for_loop(f, tail, &m, &one, |f, r| {
                                let rn = f.b.muli(r, &n);
                                let at = f.b.addi(&rn, &c0);
                                f.b.line(format_args!(
                                    "vector.store {vzero}, {yview}[{at}] : {ymemref}, vector<8xf32>"
                                ));
                            });
                        }
                    },
                    |f| {
                        for_loop(f, &c0, &n, &one, |f, col| {
                            for_loop(f, &rows.0, &rows.1, &one, |f, r| {
                                let rn = f.b.muli(r, &n);
                                let at = f.b.addi(&rn, col);
                                element_dot(f, r, col, &w, &at);
                            });
                            if let Some(tail) = &none {
                                let fzero = f.b.f32(0.0);
                                for_loop(f, tail, &m, &one, |f, r| {
                                    let rn = f.b.muli(r, &n);
                                    let at = f.b.addi(&rn, col);
                                    f.store(out, &at, &fzero);
                                });
                            }
                        });
                    },
                );
            });
            LaunchShape::Cpu { work: Dim::known(e_count * groups) }
        }
        Target::Cpu => {
            let (lo, hi) = f.range.clone().expect("CPU frames have a work range");
            let eight = f.b.index(8);
            let n8 = f.b.divui(&n, &eight);
            let n8 = f.b.muli(&n8, &eight);
            let tail = if f32_out { n8 } else { zero.clone() };
            for_loop(f, &lo, &hi, &one, |f, m| {
                let (w, valid) = weight(f, m);
                if f32_out {
                    for_loop(f, &zero, &tail, &eight, |f, col| element8(f, m, col, &w, &valid));
                }
                for_loop(f, &tail, &n, &one, |f, col| element(f, m, col, &w, &valid));
            });
            LaunchShape::Cpu { work: m_dim }
        }
        Target::Gpu => {
            let block = f.gpu_block(BLOCK);
            let (tid, bx, m) =
                (f.gpu_id("thread_id", 'x'), f.gpu_id("block_id", 'x'), f.gpu_id("block_id", 'y'));
            let bs = f.b.index(block);
            let base = f.b.muli(&bx, &bs);
            let col = f.b.addi(&base, &tid);
            let inside = f.cmp("ult", &col, &n, "index");
            if_then(f, &inside, |f| {
                let (w, valid) = weight(f, &m);
                element(f, &m, &col, &w, &valid);
            });
            LaunchShape::Gpu {
                grid: [
                    GridDim { work: n_dim, per_block: block as u64 },
                    GridDim { work: m_dim, per_block: 1 },
                    GridDim::one(),
                ],
                block: [block as u32, 1, 1],
            }
        }
    })
}

/// `grouped_linear_wgrad`: `dw_e[a, c] = sum_r dy[r, a] x[r, c]` over expert `e`'s rows, the rows
/// being the contraction axis (blocks of `k_block` rows aligned at row 0).
fn wgrad(f: &mut Frame, num_experts: u64, k_block: u64) -> Result<LaunchShape, LowerError> {
    let x = f.bufs[0].ty.shape.clone();
    let dy = f.bufs[2].ty.shape.clone();
    let offsets_type = f.bufs[1].ty.dtype;
    let e_count = num_experts as usize;
    let (m, kd, n_dim) = (f.dim(x[0]), f.dim(x[1]), dy[1]);
    let n = f.dim(n_dim);
    let (zero, one) = (f.b.index(0), f.b.index(1));
    let work = Dim::known(num_experts)
        .checked_mul(n_dim)
        .ok_or_else(|| f.unsupported("promoted_gemm", "the output row count does not fit a dimension"))?;
    let view = "memref<?xf32>";
    // Output row `a` of expert `e`: the expert's rows and its result buffer.
    let expert = |f: &mut Frame, item: &Value| {
        let e = f.b.divui(item, &n);
        let a = f.b.remui(item, &n);
        let e1 = f.b.addi(&e, &one);
        let start = f.load(1, &e);
        let start = clamped_bound(f, &start, offsets_type, &m);
        let end = f.load(1, &e1);
        let end = clamped_bound(f, &end, offsets_type, &m);
        let end = f.b.op("i", format_args!("arith.maxui {end}, {start} : index"));
        let (w, _) = pick_buffers(f, &e, e_count, (3, 1, 1), &|_| 0);
        (a, start, end, w.into_iter().next().expect("one buffer"))
    };
    let element = |f: &mut Frame, a: &Value, c: &Value, (start, end): (&Value, &Value), w: &Value| {
        let dot = promoted_dot(f, (start, end), k_block, &|f, r| {
            let rn = f.b.muli(r, &n);
            let di = f.b.addi(&rn, a);
            let g = f.load(2, &di);
            let rk = f.b.muli(r, &kd);
            let xi = f.b.addi(&rk, c);
            (g, f.load(0, &xi))
        });
        let ak = f.b.muli(a, &kd);
        let at = f.b.addi(&ak, c);
        f.b.line(format_args!("memref.store {dot}, {w}[{at}] : {view}"));
    };
    // Eight columns at once on the CPU: the shared operand dy[r, a] against x[r, c..c + 8], one
    // vector load, each lane summed as its column alone.
    let (xview, xmemref, xtype) = (f.bufs[0].view.clone(), f.bufs[0].memref.clone(), f.bufs[0].ty.dtype);
    // With `count` output rows from `a` at once (their sums overlap), each with its own dy[r, a + j].
    let element8 =
        |f: &mut Frame, a: &Value, count: usize, c: &Value, (start, end): (&Value, &Value), w: &Value| {
            let dots = promoted_dot8(f, (start, end), k_block, count, &|f, r| {
                let rn = f.b.muli(r, &n);
                let di = f.b.addi(&rn, a);
                let g = (0..count as i64)
                    .map(|j| {
                        let j = f.b.index(j);
                        let dj = f.b.addi(&di, &j);
                        f.load(2, &dj)
                    })
                    .collect();
                let rk = f.b.muli(r, &kd);
                let xi = f.b.addi(&rk, c);
                let xs = match xtype {
                    DType::F16 | DType::BF16 => {
                        let e = super::storage_type(xtype);
                        let v = f
                            .b
                            .op("xv", format_args!("vector.load {xview}[{xi}] : {xmemref}, vector<8x{e}>"));
                        f.b.op("xv", format_args!("arith.extf {v} : vector<8x{e}> to vector<8xf32>"))
                    }
                    _ => f.b.op("xv", format_args!("vector.load {xview}[{xi}] : {xmemref}, vector<8xf32>")),
                };
                (g, Lanes::Vector(xs))
            });
            for (j, dot) in dots.iter().enumerate() {
                let j = f.b.index(j as i64);
                let aj = f.b.addi(a, &j);
                let ak = f.b.muli(&aj, &kd);
                let at = f.b.addi(&ak, c);
                f.b.line(format_args!("vector.store {dot}, {w}[{at}] : {view}, vector<8xf32>"));
            }
        };
    let rows4 = n_dim.as_known().filter(|n| n % ROWS as u64 == 0);
    Ok(match f.target {
        // A work item per ROWS output rows of one expert, where they divide N.
        Target::Cpu if rows4.is_some() => {
            let quarter = rows4.expect("matched") / ROWS as u64;
            let (lo, hi) = f.range.clone().expect("CPU frames have a work range");
            let (eight, per) = (f.b.index(8), f.b.index(ROWS as i64));
            let k8 = f.b.divui(&kd, &eight);
            let k8 = f.b.muli(&k8, &eight);
            for_loop(f, &lo, &hi, &one, |f, item| {
                // Item `e * N / ROWS + b` is rows `b * ROWS ..` of expert `e`: as `expert` sees
                // item `e * N + b * ROWS`.
                let q = f.b.index(quarter as i64);
                let e = f.b.divui(item, &q);
                let b = f.b.remui(item, &q);
                let en = f.b.muli(&e, &n);
                let a0 = f.b.muli(&b, &per);
                let first = f.b.addi(&en, &a0);
                let (a, start, end, w) = expert(f, &first);
                for_loop(f, &zero, &k8, &eight, |f, c| element8(f, &a, ROWS, c, (&start, &end), &w));
                for j in 0..ROWS as i64 {
                    let j = f.b.index(j);
                    let aj = f.b.addi(&a, &j);
                    for_loop(f, &k8, &kd, &one, |f, c| element(f, &aj, c, (&start, &end), &w));
                }
            });
            LaunchShape::Cpu { work: Dim::known(num_experts * quarter) }
        }
        Target::Cpu => {
            let (lo, hi) = f.range.clone().expect("CPU frames have a work range");
            let eight = f.b.index(8);
            let k8 = f.b.divui(&kd, &eight);
            let k8 = f.b.muli(&k8, &eight);
            for_loop(f, &lo, &hi, &one, |f, item| {
                let (a, start, end, w) = expert(f, item);
                for_loop(f, &zero, &k8, &eight, |f, c| element8(f, &a, 1, c, (&start, &end), &w));
                for_loop(f, &k8, &kd, &one, |f, c| element(f, &a, c, (&start, &end), &w));
            });
            LaunchShape::Cpu { work }
        }
        Target::Gpu => {
            let block = f.gpu_block(BLOCK);
            let (tid, item, by) =
                (f.gpu_id("thread_id", 'x'), f.gpu_id("block_id", 'x'), f.gpu_id("block_id", 'y'));
            let bs = f.b.index(block);
            let base = f.b.muli(&by, &bs);
            let c = f.b.addi(&base, &tid);
            let inside = f.cmp("ult", &c, &kd, "index");
            if_then(f, &inside, |f| {
                let (a, start, end, w) = expert(f, &item);
                element(f, &a, &c, (&start, &end), &w);
            });
            LaunchShape::Gpu {
                grid: [
                    GridDim { work, per_block: 1 },
                    GridDim { work: x[1], per_block: block as u64 },
                    GridDim::one(),
                ],
                block: [block as u32, 1, 1],
            }
        }
    })
}
