//! Backward ops of training that scatter or reduce across rows: `embedding_grad`,
//! `scatter_add_along`, `grouped_linear_wgrad` and `moe_combine_grad`. (`cross_entropy_grad` is a
//! row kernel in `reduce`, `attention_grad` is in `attention`, `rope`'s gradient is `rope` with
//! `inverse`, and `take_along` is data movement in `shape`.)
//!
//! The rule every kernel here follows: **each output element has exactly one owner**, a CPU work
//! item or a GPU thread that writes it (every element of every result, zeros included, since
//! result buffers come from the arena with stale contents) and that adds up all of its
//! contributions itself, in a fixed order. No atomics, no two work items writing one element, so
//! results do not depend on the split into `[lo, hi)` ranges or on scheduling, and are the same
//! on every run. Sums are in f32, in index order (the interpreter sums in f64 and rounds once).
//!
//! - **`embedding_grad {rows}`** (`ids[...]`, `dy[..., D]` -> `f32[rows, D]`): the table is cut into
//!   blocks of [`ROWS_PER_ITEM`] rows. A CPU work item owns one block (all `D` columns): it zeroes
//!   its rows, then scans all `N` ids and adds `dy[n]` into row `ids[n]` when that row is its own.
//!   A GPU thread owns one column of one block (grid `ceil(D / 256) x blocks`): the same, one
//!   column at a time, so the threads of a warp read and write consecutive addresses, and each id
//!   is one broadcast load per warp. Cost: `rows * D` stores of zeros (which any scheme pays),
//!   `N * D` additions, and `N` id reads per work item: `ceil(rows / 2048)` scans of the ids on the
//!   CPU (64 for DeepSeek-V3's 129280 rows), `ceil(D / 256) * ceil(rows / 2048)` on the GPU (1792
//!   for `D = 7168`), each an L2-resident read of `N` ids. A work item per table row scanning all
//!   ids would cost `rows * N` id reads (2 * 10^9 for 16K tokens): ruled out. An id outside
//!   `0..rows` matches no row and adds nothing (the interpreter reports it; the runtime checks
//!   caller ids before a run).
//! - **`scatter_add_along {axis, size}`** (`indices`, `src` -> `f32`, `axis` resized to `size`):
//!   one work item (GPU thread, 256 per block) per output element `(o, p, i)`, summing
//!   `src[o, j, i]` over the `j` in `0..n` whose `indices[o, j, i] == p`: `n` reads per element
//!   (the router's `top_k` per expert score). An index outside `0..size` matches nothing.
//! - **`grouped_linear_wgrad {num_experts}`** (`x_sorted[M, K]`, `offsets[E + 1]`, `dy[M, N]` ->
//!   `E` times `f32[N, K]`): `dw_e[a, c] = sum_r dy[r, a] * x[r, c]` over expert `e`'s rows
//!   `offsets[e]..offsets[e + 1]` (clamped to `0..=M`; an expert of no rows gets zeros). The
//!   expert's result buffer is picked at run time by a switch, as `grouped_linear` picks weights.
//!   CPU: a work item per `(e, a)`, an output row: zeroed, then each row `r` of the expert adds
//!   `dy[r, a] * x[r, :]` into it (contiguous, the row its own f32 accumulator). GPU: grid
//!   `E * N` (x) by `ceil(K / 256)` (y), a thread per output element accumulating in a register:
//!   a block's threads read one `dy` element (broadcast) and consecutive `x` elements per row.
//! - **`moe_combine_grad {top_k}`** (`dy[N, D]`, `y_sorted[K*N, D]`, `perm[K*N]`, `weights[N, K]`
//!   -> `dy_sorted`, `dweights`): the owner of sorted row `r` (a CPU work item, or a GPU block of
//!   the power of two covering `D`, 32 to 256 threads, threads over columns) writes
//!   `dy_sorted[r] = dy[t] * weights[s]` and `dweights[s] = y_sorted[r] . dy[t]` for its slot
//!   `s = perm[r]`, token `t = s / K` (the dot a block-wide tree on the GPU). A dispatch's `perm`
//!   holds every slot once, so every `dweights` element has one owner. A row whose slot is outside
//!   `0..K*N` is written as zeros and writes no weight gradient.
//!
//! Not done (what fast versions need): `embedding_grad` by sorting the ids (or a segmented
//! reduction over the dispatch-like permutation of tokens by id) so that each row's contributions
//! are contiguous; `grouped_linear_wgrad` as a tiled grouped GEMM (`x^T dy` per expert, K-major
//! tiles through shared memory, tensor cores); `moe_combine_grad` with several rows per block.

use kiln_ir::{DType, Dim};

use super::elementwise::each_element;
use super::moe::pick_buffers;
use super::reduce::block_sum;
use super::{Frame, GridDim, LaunchShape, LowerError, Target};
use crate::codegen::mlir::{for_carry, for_loop, if_else, if_then, Value};

/// Table rows owned by one `embedding_grad` work item (CPU) or one block row of the grid (GPU).
pub(super) const ROWS_PER_ITEM: u64 = 2048;
/// Threads per block of the GPU kernels here that go by columns.
const BLOCK: i64 = 256;

fn numel(f: &Frame, buf: usize, op: &str) -> Result<Dim, LowerError> {
    f.bufs[buf].ty.numel().ok_or_else(|| f.unsupported(op, "the element count does not fit a dimension"))
}

/// An integer value of `dtype` as an `index` clamped to `[0, n]` (a bound, where
/// [`Frame::clamped_index`] gives an element).
pub(super) fn clamped_bound(f: &mut Frame, v: &Value, dtype: DType, n: &Value) -> Value {
    let wide = match dtype {
        DType::I64 => v.clone(),
        _ => f.b.op("i", format_args!("arith.extsi {v} : i32 to i64")),
    };
    let zero = f.b.constant("0", "i64");
    let top = f.b.op("i", format_args!("arith.index_cast {n} : index to i64"));
    let lo = f.b.op("i", format_args!("arith.maxsi {wide}, {zero} : i64"));
    let c = f.b.op("i", format_args!("arith.minsi {lo}, {top} : i64"));
    f.b.op("i", format_args!("arith.index_cast {c} : i64 to index"))
}

/// `embedding_grad`: see the module documentation.
pub(super) fn embedding_grad(f: &mut Frame, rows: u64) -> Result<LaunchShape, LowerError> {
    let name = "embedding_grad";
    let n = numel(f, 0, name)?;
    let dy = f.bufs[1].ty.shape.clone();
    let id_type = f.bufs[0].ty.dtype;
    let d_dim = dy[dy.len() - 1];
    let out = 2;
    let blocks = rows.div_ceil(ROWS_PER_ITEM);
    let (count, d, rows_v) = (f.dim(n), f.dim(d_dim), f.b.index(rows as i64));
    let per = f.b.index(ROWS_PER_ITEM as i64);
    let (zero, one) = (f.b.index(0), f.b.index(1));
    // The rows `[r0, r1)` of block `blk`.
    let block_rows = |f: &mut Frame, blk: &Value| {
        let r0 = f.b.muli(blk, &per);
        let end = f.b.addi(&r0, &per);
        let r1 = f.b.minui(&end, &rows_v);
        (r0, r1)
    };
    // Calls `add(f, row, n)` for every token `n` whose id is a row in `[r0, r1)`.
    let scan = |f: &mut Frame, r0: &Value, r1: &Value, add: &dyn Fn(&mut Frame, &Value, &Value)| {
        for_loop(f, &zero, &count, &one, |f, t| {
            let id = f.load(0, t);
            let row = f.int_to_index(&id, id_type);
            let ge = f.cmp("uge", &row, r0, "index");
            let lt = f.cmp("ult", &row, r1, "index");
            let mine = f.b.op("p", format_args!("arith.andi {ge}, {lt} : i1"));
            if_then(f, &mine, |f| add(f, &row, t));
        });
    };
    let fzero = f.b.f32(0.0);
    Ok(match f.target {
        Target::Cpu => {
            let (lo, hi) = f.range.clone().expect("CPU frames have a work range");
            for_loop(f, &lo, &hi, &one, |f, blk| {
                let (r0, r1) = block_rows(f, blk);
                let first = f.b.muli(&r0, &d);
                let last = f.b.muli(&r1, &d);
                for_loop(f, &first, &last, &one, |f, i| f.store(out, i, &fzero));
                scan(f, &r0, &r1, &|f, row, t| {
                    let dst = f.b.muli(row, &d);
                    let src = f.b.muli(t, &d);
                    for_loop(f, &zero, &d, &one, |f, c| {
                        let di = f.b.addi(&dst, c);
                        let si = f.b.addi(&src, c);
                        let acc = f.load(out, &di);
                        let g = f.load(1, &si);
                        let sum = f.binf("addf", &acc, &g);
                        f.store(out, &di, &sum);
                    });
                });
            });
            LaunchShape::Cpu { work: Dim::known(blocks) }
        }
        Target::Gpu => {
            let block = f.gpu_block(BLOCK);
            let (tid, bx, by) =
                (f.gpu_id("thread_id", 'x'), f.gpu_id("block_id", 'x'), f.gpu_id("block_id", 'y'));
            let bs = f.b.index(block);
            let base = f.b.muli(&bx, &bs);
            let c = f.b.addi(&base, &tid);
            let inside = f.cmp("ult", &c, &d, "index");
            if_then(f, &inside, |f| {
                let (r0, r1) = block_rows(f, &by);
                for_loop(f, &r0, &r1, &one, |f, r| {
                    let rd = f.b.muli(r, &d);
                    let i = f.b.addi(&rd, &c);
                    f.store(out, &i, &fzero);
                });
                scan(f, &r0, &r1, &|f, row, t| {
                    let rd = f.b.muli(row, &d);
                    let di = f.b.addi(&rd, &c);
                    let td = f.b.muli(t, &d);
                    let si = f.b.addi(&td, &c);
                    let acc = f.load(out, &di);
                    let g = f.load(1, &si);
                    let sum = f.binf("addf", &acc, &g);
                    f.store(out, &di, &sum);
                });
            });
            LaunchShape::Gpu {
                grid: [
                    GridDim { work: d_dim, per_block: block as u64 },
                    GridDim { work: Dim::known(blocks), per_block: 1 },
                    GridDim::one(),
                ],
                block: [block as u32, 1, 1],
            }
        }
    })
}

/// `scatter_add_along`: see the module documentation.
pub(super) fn scatter_add_along(f: &mut Frame, axis: usize) -> Result<LaunchShape, LowerError> {
    let n_out = numel(f, 2, "scatter_add_along")?;
    let src = f.bufs[1].ty.shape.clone();
    let out = f.bufs[2].ty.shape.clone();
    let index_type = f.bufs[0].ty.dtype;
    let (size, picks) = (f.dim(out[axis]), f.dim(src[axis]));
    let inner = f.prod(&src[axis + 1..]);
    let (zero, one) = (f.b.index(0), f.b.index(1));
    let fzero = f.b.f32(0.0);
    Ok(each_element(f, n_out, |f, e| {
        // Output element (o, p, i) gathers src[o, j, i] for every j with indices[o, j, i] == p.
        let i = f.b.remui(e, &inner);
        let q = f.b.divui(e, &inner);
        let p = f.b.remui(&q, &size);
        let o = f.b.divui(&q, &size);
        let on = f.b.muli(&o, &picks);
        let sum = for_carry(f, &zero, &picks, &one, &[(fzero.clone(), "f32")], |f, j, acc| {
            let row = f.b.addi(&on, j);
            let ri = f.b.muli(&row, &inner);
            let at = f.b.addi(&ri, &i);
            let idx = f.load(0, &at);
            let idx = f.int_to_index(&idx, index_type);
            let hit = f.cmp("eq", &idx, &p, "index");
            let x = f.load(1, &at);
            let plus = f.binf("addf", &acc[0], &x);
            vec![f.select(&hit, &plus, &acc[0], "f32")]
        })
        .remove(0);
        f.store(2, e, &sum);
    }))
}

/// `grouped_linear_wgrad`: see the module documentation.
pub(super) fn grouped_linear_wgrad(f: &mut Frame, num_experts: u64) -> Result<LaunchShape, LowerError> {
    let x = f.bufs[0].ty.shape.clone();
    let dy = f.bufs[2].ty.shape.clone();
    let offsets_type = f.bufs[1].ty.dtype;
    let e_count = num_experts as usize;
    let (m, kd, n_dim) = (f.dim(x[0]), f.dim(x[1]), dy[1]);
    let n = f.dim(n_dim);
    let (zero, one) = (f.b.index(0), f.b.index(1));
    let fzero = f.b.f32(0.0);
    let work = Dim::known(num_experts).checked_mul(n_dim).ok_or_else(|| {
        f.unsupported("grouped_linear_wgrad", "the output row count does not fit a dimension")
    })?;
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
        let (w, _) = pick_buffers(f, &e, e_count, (3, 1, 1), &|_| 0);
        (a, start, end, w.into_iter().next().expect("one buffer"))
    };
    Ok(match f.target {
        Target::Cpu => {
            let (lo, hi) = f.range.clone().expect("CPU frames have a work range");
            for_loop(f, &lo, &hi, &one, |f, item| {
                let (a, start, end, w) = expert(f, item);
                let base = f.b.muli(&a, &kd);
                for_loop(f, &zero, &kd, &one, |f, c| {
                    let at = f.b.addi(&base, c);
                    f.b.line(format_args!("memref.store {fzero}, {w}[{at}] : {view}"));
                });
                for_loop(f, &start, &end, &one, |f, r| {
                    let rn = f.b.muli(r, &n);
                    let di = f.b.addi(&rn, &a);
                    let g = f.load(2, &di);
                    let rk = f.b.muli(r, &kd);
                    for_loop(f, &zero, &kd, &one, |f, c| {
                        let xi = f.b.addi(&rk, c);
                        let xv = f.load(0, &xi);
                        let at = f.b.addi(&base, c);
                        let acc = f.b.op("acc", format_args!("memref.load {w}[{at}] : {view}"));
                        let acc = f.fma(&g, &xv, &acc);
                        f.b.line(format_args!("memref.store {acc}, {w}[{at}] : {view}"));
                    });
                });
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
                let sum = for_carry(f, &start, &end, &one, &[(fzero.clone(), "f32")], |f, r, acc| {
                    let rn = f.b.muli(r, &n);
                    let di = f.b.addi(&rn, &a);
                    let g = f.load(2, &di);
                    let rk = f.b.muli(r, &kd);
                    let xi = f.b.addi(&rk, &c);
                    let xv = f.load(0, &xi);
                    vec![f.fma(&g, &xv, &acc[0])]
                })
                .remove(0);
                let ak = f.b.muli(&a, &kd);
                let at = f.b.addi(&ak, &c);
                f.b.line(format_args!("memref.store {sum}, {w}[{at}] : {view}"));
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

/// `moe_combine_grad`: see the module documentation.
pub(super) fn moe_combine_grad(f: &mut Frame, top_k: u64) -> Result<LaunchShape, LowerError> {
    let y = f.bufs[1].ty.clone();
    let perm_type = f.bufs[2].ty.dtype;
    let (dy_sorted, dweights) = (4, 5);
    let (rows_dim, d_dim) = (y.shape[0], y.shape[1]);
    let (rows, d) = (f.dim(rows_dim), f.dim(d_dim));
    let kv = f.b.index(top_k as i64);
    let (zero, one) = (f.b.index(0), f.b.index(1));
    let fzero = f.b.f32(0.0);
    let block =
        f.gpu_block(d_dim.as_known().map_or(BLOCK, |d| d.next_power_of_two().clamp(32, BLOCK as u64) as i64));
    // The columns of a row this thread owns: all of them on the CPU, a strided share on the GPU.
    let columns = |f: &mut Frame| match f.target {
        Target::Cpu => (f.b.index(0), f.b.index(1)),
        Target::Gpu => (f.gpu_id("thread_id", 'x'), f.b.index(block)),
    };
    let body = |f: &mut Frame, r: &Value| {
        let slot = f.load(2, r);
        let slot = f.int_to_index(&slot, perm_type);
        let valid = f.cmp("ult", &slot, &rows, "index");
        let rd = f.b.muli(r, &d);
        let (start, step) = columns(f);
        let dot = if_else(
            f,
            &valid,
            "f32",
            |f| {
                let token = f.b.divui(&slot, &kv);
                let w = f.load(3, &slot);
                let td = f.b.muli(&token, &d);
                // This thread's share of the dot product, each column's `dy_sorted` written on
                // the way.
                for_carry(f, &start, &d, &step, &[(fzero.clone(), "f32")], |f, c, acc| {
                    let gi = f.b.addi(&td, c);
                    let g = f.load(0, &gi);
                    let yi = f.b.addi(&rd, c);
                    let yv = f.load(1, &yi);
                    let gw = f.binf("mulf", &g, &w);
                    f.store(dy_sorted, &yi, &gw);
                    vec![f.fma(&yv, &g, &acc[0])]
                })
                .remove(0)
            },
            |f| {
                for_loop(f, &start, &d, &step, |f, c| {
                    let yi = f.b.addi(&rd, c);
                    f.store(dy_sorted, &yi, &fzero);
                });
                fzero.clone()
            },
        );
        let dot = match f.target {
            Target::Cpu => dot,
            Target::Gpu => block_sum(f, &dot, block),
        };
        let first = match f.target {
            Target::Cpu => valid.clone(),
            Target::Gpu => {
                let tid = f.gpu_id("thread_id", 'x');
                let t0 = f.cmp("eq", &tid, &zero, "index");
                f.b.op("p", format_args!("arith.andi {valid}, {t0} : i1"))
            }
        };
        if_then(f, &first, |f| f.store(dweights, &slot, &dot));
    };
    Ok(match f.target {
        Target::Cpu => {
            let (lo, hi) = f.range.clone().expect("CPU frames have a work range");
            for_loop(f, &lo, &hi, &one, body);
            LaunchShape::Cpu { work: rows_dim }
        }
        Target::Gpu => {
            let r = f.gpu_id("block_id", 'x');
            body(f, &r);
            LaunchShape::Gpu {
                grid: [GridDim { work: rows_dim, per_block: 1 }, GridDim::one(), GridDim::one()],
                block: [block as u32, 1, 1],
            }
        }
    })
}
