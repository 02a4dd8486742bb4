//! Matrix products: `linear` (`x[..., K] @ w[N, K]^T`, PyTorch's weight layout) and `matmul`
//! (`a[..., M, K] @ b[..., K, N]` with broadcast batch dimensions).
//!
//! CPU `linear` is the kernel built to become fast. Its work items are `(column panel, row)` pairs,
//! `M * ceil(N / NB)` of them in panel-major order, so a thread pool splits both: a range of items
//! covers consecutive rows of one panel of [`NB`] weight rows (the `NB x K` panel stays in L2 while
//! those rows pass over it), and a single row (a decode step's GEMV) still splits by panels. Each
//! panel is
//! covered by [`MR`] x [`NR`] register blocks: `MR * NR` accumulators of `vector<16xf32>`, each a dot
//! product along `K` (both operands are contiguous in `K`), fed by `MR + NR` vector loads per
//! `MR * NR` `vector.fma`s; a horizontal sum and a scalar loop over the last `K mod 16` finish each
//! output. Rows and columns that do not fill a block use 1-row and 1-column variants of the same block,
//! so any `M`, `N`, `K` work. These blocks carry GEMVs (decode) and whatever the packed path does not
//! take: where `x` and the weights are all f32 or all bf16 (with AVX512_BF16), `K` is a multiple of
//! 16 lanes and the GEMM has enough rows (64 in bf16, 128 in f32), each panel is packed and run by
//! an outer-product micro-kernel instead ([`packed`]). Not yet done: vector widths chosen from the host.
//!
//! CPU `matmul` (used by nothing in DeepSeek's forward graph today) is simpler: per output row, one
//! `vector<16xf32>` of columns at a time, accumulated over `K` with broadcast FMAs, and a scalar tail.
//!
//! GPU (both ops): 32x32 output tiles, one block of 32x8 threads per tile (each thread computes 4
//! outputs of one column), the K dimension walked in steps of 32 through two shared-memory tiles
//! (rows padded to 33 floats to avoid bank conflicts). Global loads are coalesced: consecutive threads
//! read consecutive addresses of whichever dimension is contiguous (`K` for `x` and for `linear`'s
//! weight, `N` for `matmul`'s `b`). Loads outside the matrix read 0 and stores outside are skipped,
//! so no size needs to be a multiple of the tile. Grid: `ceil(N/32) x ceil(M/32) x batch`.
//!
//! `linear` takes several weights of one shape at once (`linear_with`, for fused kernels): the CPU
//! block shares each vector of `x` between `NR / weights` columns of every weight, the GPU tile shares
//! each shared-memory tile of `x` between one tile of every weight; each output element's sums go to
//! a [`Store`] hook (a plain store, or a fused epilogue such as SwiGLU or a residual add).
//!
//! Sums are reassociated (vector lanes, tiles), so results differ from a sequential loop by rounding.

use kiln_ir::{DType, Dim};

use super::elementwise::broadcast_index;
use super::{Frame, GridDim, LaunchShape, LowerError, Target};
use crate::codegen::mlir::{for_carry, for_loop, if_else, if_then, if_then_else, index_switch_tree, Value};

mod packed;

/// Rows of `x` per CPU register block.
pub const MR: usize = 4;
/// Weight rows (output columns) per CPU register block.
pub const NR: usize = 4;
/// Vector width in f32 lanes.
pub(super) const VL: i64 = super::CPU_LANES as i64;
/// Weight rows per CPU panel (a multiple of [`NR`]).
pub const NB: i64 = 64;
/// GPU output tile (rows and columns) and K step.
const TILE: i64 = 32;
/// Rows of threads per GPU block; each thread covers `TILE / ROWS` rows of its tile column.
const ROWS: i64 = 8;
/// Shared-memory row stride (a tile row plus one float of padding).
const PITCH: i64 = TILE + 1;

/// `vector<{CPU_LANES}xf32>`.
pub(super) const VEC: &str = "vector<16xf32>";
const _: () = assert!(VL == 16, "VEC and the vector types below are written for 16 lanes");

impl Frame<'_> {
    /// `vector<16xf32>` from 16 consecutive elements of a buffer starting at `idx`.
    pub(super) fn load_vec(&mut self, buf: usize, idx: &Value) -> Value {
        let (view, memref, dtype) =
            (self.bufs[buf].view.clone(), self.bufs[buf].memref.clone(), self.bufs[buf].ty.dtype);
        match dtype {
            DType::F16 | DType::BF16 => {
                let e = if dtype == DType::F16 { "f16" } else { "bf16" };
                let v = self.b.op("xv", format_args!("vector.load {view}[{idx}] : {memref}, vector<16x{e}>"));
                self.b.op("xv", format_args!("arith.extf {v} : vector<16x{e}> to {VEC}"))
            }
            _ => self.b.op("xv", format_args!("vector.load {view}[{idx}] : {memref}, {VEC}")),
        }
    }

    /// `vector<16xf32>` from 16 consecutive elements at `idx` of a 1-D memref value `view` of
    /// `dtype` elements (`memref<?x{storage}>`, a buffer chosen at run time, such as one expert's
    /// weight).
    fn load_view_vec(&mut self, view: &Value, dtype: DType, idx: &Value) -> Value {
        let e = super::storage_type(dtype);
        let memref = format!("memref<?x{e}>");
        match dtype {
            DType::F16 | DType::BF16 => {
                let v = self.b.op("wv", format_args!("vector.load {view}[{idx}] : {memref}, vector<16x{e}>"));
                self.b.op("wv", format_args!("arith.extf {v} : vector<16x{e}> to {VEC}"))
            }
            _ => self.b.op("wv", format_args!("vector.load {view}[{idx}] : {memref}, {VEC}")),
        }
    }

    pub(super) fn store_vec(&mut self, buf: usize, idx: &Value, v: &Value) {
        let (view, memref, dtype) =
            (self.bufs[buf].view.clone(), self.bufs[buf].memref.clone(), self.bufs[buf].ty.dtype);
        let (v, ty) = match dtype {
            DType::F16 | DType::BF16 => {
                let e = if dtype == DType::F16 { "f16" } else { "bf16" };
                (
                    self.b.op("yv", format_args!("arith.truncf {v} : {VEC} to vector<16x{e}>")),
                    format!("vector<16x{e}>"),
                )
            }
            _ => (v.clone(), VEC.to_string()),
        };
        self.b.line(format_args!("vector.store {v}, {view}[{idx}] : {memref}, {ty}"));
    }

    /// `a * b + c` on f32 with one rounding.
    pub(super) fn fma(&mut self, a: &Value, b: &Value, c: &Value) -> Value {
        match self.target {
            Target::Cpu => self.b.op("f", format_args!("math.fma {a}, {b}, {c} : f32")),
            Target::Gpu => {
                self.b.op("f", format_args!("llvm.intr.fma({a}, {b}, {c}) : (f32, f32, f32) -> f32"))
            }
        }
    }
}

/// How far ahead of where a CPU GEMM's loop reads a weight row it asks for the row's bytes
/// (`memref.prefetch`, x86's `prefetcht0`), in bytes. The hardware's streamers stop at each 4 KiB
/// page and learn each new one again, and a register block reads [`NR`] rows side by side: with
/// FP8 rows of 1 KiB the block's four rows are one page, so every block began with every stream
/// cold and decode read 16 GB/s of this Xeon's 25 (models/bench.toml's FP8 form). Asking for row
/// `j`'s bytes 4 KiB ahead asks for the next block's row `j` when rows are short, and further
/// along the same row when they are long; a prefetch past a buffer's end is dropped, never a
/// fault.
const PREFETCH_BYTES: i64 = 4096;

impl Frame<'_> {
    /// Asks for the cache line [`PREFETCH_BYTES`] past element `at` of `view` (a 1-D `memref` of
    /// `elem_bytes`-byte elements), on the CPU; nothing on the GPU.
    fn prefetch_ahead(&mut self, view: &Value, memref: &str, elem_bytes: i64, at: &Value) {
        // f32 rows are left to the hardware: the GEMV of models/bench.toml's f32 decode reads at
        // the bandwidth without help, and lost 6% of its tokens/s to the extra loads.
        if self.target != Target::Cpu || elem_bytes >= 4 {
            return;
        }
        let ahead = self.b.index(PREFETCH_BYTES / elem_bytes);
        let at = self.b.addi(at, &ahead);
        self.b.line(format_args!("memref.prefetch {view}[{at}], read, locality<3>, data : {memref}"));
    }

    /// `s * 2^8` broadcast to a vector: the block scale with [`Frame::f8_decode_vec_raw`]'s 2^-8
    /// folded back in (exact: a power of two).
    fn scale_vec_256(&mut self, s: &Value) -> Value {
        let two8 = self.b.f32(256.0);
        let s = self.binf("mulf", s, &two8);
        self.b.op("sv", format_args!("vector.broadcast {s} : f32 to {VEC}"))
    }
}

fn check_float(f: &Frame, buf: usize, op: &str) -> Result<(), LowerError> {
    match f.bufs[buf].ty.dtype {
        DType::F32 | DType::F16 | DType::BF16 => Ok(()),
        d => Err(f.unsupported(op, format!("{d} operands"))),
    }
}

/// A GEMM operand as the kernel reads it, viewed as a row-major `[R, K]` matrix: a buffer of its
/// values, or FP8 codes with their block scales, `dequantize` fused into the load (`fp8-gemm`):
/// element `(r, k)` is `decode(codes[r * K + k]) * scales[(r / rows) * ceil(K / cols) + k / cols]`,
/// the product rounded once to f32 as the interpreter's `dequantize` to f32 rounds it. The CPU's
/// vector loads need `cols` to be a multiple of the vector width (16), so that the lanes of one
/// load share a scale; the fusion analysis only forms such kernels. Where every weight is FP8
/// (`linear`'s blocks, grouped GEMMs' register blocks), the CPU's vector part sums each scale
/// block's products on the decoded codes and multiplies by the block's scales once
/// ([`fp8_blocked_dots`]): reassociated, as the vector lanes already are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Operand {
    Plain(usize),
    Fp8 { codes: usize, scales: usize, rows: u64, cols: u64 },
}

/// The buffer of a plain operand.
fn buffer_of(op: &Operand) -> usize {
    match *op {
        Operand::Plain(b) => b,
        Operand::Fp8 { codes, .. } => codes,
    }
}

/// The codes and scales buffers of an FP8 operand (a plain one's buffer twice).
fn fp8_parts(op: &Operand) -> (usize, usize) {
    match *op {
        Operand::Plain(b) => (b, b),
        Operand::Fp8 { codes, scales, .. } => (codes, scales),
    }
}

impl Operand {
    fn check(&self, f: &Frame, op: &str) -> Result<(), LowerError> {
        match *self {
            Operand::Plain(b) => check_float(f, b, op),
            Operand::Fp8 { codes, scales, cols, .. } => {
                let (c, s) = (f.bufs[codes].ty.dtype, f.bufs[scales].ty.dtype);
                if c != DType::F8E4M3 || s != DType::F32 || cols % VL as u64 != 0 {
                    return Err(f.unsupported(
                        op,
                        format!("FP8 operand of {c} codes, {s} scales, {cols} columns per block"),
                    ));
                }
                Ok(())
            }
        }
    }
}

/// One row of an [`Operand`]: where it starts, and for FP8 where its scales start.
struct OperandRow {
    op: Operand,
    /// `r * K`.
    start: Value,
    /// `(r / rows) * ceil(K / cols)`, and `cols`, for FP8 operands.
    scales: Option<(Value, Value)>,
}

impl OperandRow {
    fn new(f: &mut Frame, op: &Operand, r: &Value, k: &Value) -> OperandRow {
        let start = f.b.muli(r, k);
        let scales = match *op {
            Operand::Plain(_) => None,
            Operand::Fp8 { rows, cols, .. } => {
                let (br, bc, bc1) =
                    (f.b.index(rows as i64), f.b.index(cols as i64), f.b.index(cols as i64 - 1));
                let kb = f.b.addi(k, &bc1);
                let kb = f.b.divui(&kb, &bc);
                let block_row = f.b.divui(r, &br);
                Some((f.b.muli(&block_row, &kb), bc))
            }
        };
        OperandRow { op: op.clone(), start, scales }
    }

    /// The scale of column `kk`.
    fn scale(&self, f: &mut Frame, kk: &Value) -> Option<Value> {
        let (base, cols) = self.scales.as_ref()?;
        let Operand::Fp8 { scales, .. } = self.op else { return None };
        let c = f.b.divui(kk, cols);
        let at = f.b.addi(base, &c);
        Some(f.load(scales, &at))
    }

    /// Element `kk` of the row, in f32.
    fn at(&self, f: &mut Frame, kk: &Value) -> Value {
        let i = f.b.addi(&self.start, kk);
        match self.op {
            Operand::Plain(b) => f.load(b, &i),
            Operand::Fp8 { codes, .. } => {
                let q = f.load(codes, &i);
                let s = self.scale(f, kk).expect("FP8 rows have scales");
                f.binf("mulf", &q, &s)
            }
        }
    }

    /// For an FP8 row, the codes `kk .. kk + 16` decoded, times 2^-8 and without their scale (the
    /// blocked dot products apply it per block); a plain row's elements as [`Self::vec_at`].
    fn raw_vec_at(&self, f: &mut Frame, kk: &Value) -> Value {
        let Operand::Fp8 { codes, .. } = self.op else { return self.vec_at(f, kk) };
        let i = f.b.addi(&self.start, kk);
        let (view, memref) = (f.bufs[codes].view.clone(), f.bufs[codes].memref.clone());
        let q = f.b.op("qv", format_args!("vector.load {view}[{i}] : {memref}, vector<16xi8>"));
        f.f8_decode_vec_raw(&q)
    }

    /// Where an FP8 row's codes are, for [`fp8_block_sums`].
    fn codes(&self, f: &Frame) -> CodesRow {
        let Operand::Fp8 { codes, .. } = self.op else { unreachable!("only FP8 rows have codes") };
        let (view, memref) = (f.bufs[codes].view.clone(), f.bufs[codes].memref.clone());
        CodesRow { view, memref, base: self.start.clone() }
    }

    /// Asks for the row's bytes [`PREFETCH_BYTES`] past element `kk`.
    fn prefetch(&self, f: &mut Frame, kk: &Value) {
        let b = match self.op {
            Operand::Plain(b) => b,
            Operand::Fp8 { codes, .. } => codes,
        };
        let bytes = f.bufs[b].ty.dtype.size_bytes() as i64;
        if bytes < 4 {
            let i = f.b.addi(&self.start, kk);
            let (view, memref) = (f.bufs[b].view.clone(), f.bufs[b].memref.clone());
            f.prefetch_ahead(&view, &memref, bytes, &i);
        }
    }

    /// Elements `kk .. kk + 16` of the row (`kk` a multiple of 16), as a `vector<16xf32>`.
    fn vec_at(&self, f: &mut Frame, kk: &Value) -> Value {
        let i = f.b.addi(&self.start, kk);
        match self.op {
            Operand::Plain(b) => f.load_vec(b, &i),
            Operand::Fp8 { codes, .. } => {
                let (view, memref) = (f.bufs[codes].view.clone(), f.bufs[codes].memref.clone());
                let q = f.b.op("qv", format_args!("vector.load {view}[{i}] : {memref}, vector<16xi8>"));
                let q = f.f8_decode_vec_raw(&q);
                let s = self.scale(f, kk).expect("FP8 rows have scales");
                let sv = f.scale_vec_256(&s);
                f.b.op("wv", format_args!("arith.mulf {q}, {sv} : {VEC}"))
            }
        }
    }
}

/// Writes the results of one output element: its flat index and one f32 sum per weight, not yet
/// rounded. A store, or a fused epilogue.
pub(super) type Store<'a> = &'a dyn Fn(&mut Frame, &Value, &[Value]);

pub(super) fn linear(f: &mut Frame) -> Result<LaunchShape, LowerError> {
    let shapes = (f.bufs[0].ty.shape.clone(), f.bufs[1].ty.shape.clone());
    let (x, w) = (Operand::Plain(0), [Operand::Plain(1)]);
    let store: Store = &|f, idx, ys| f.store(2, idx, &ys[0]);
    linear_to(f, &x, &w, (&shapes.0, &shapes.1), store, Some(2))
}

/// `x @ w^T` for each weight buffer of `weights`, with the input in buffer `x`, of shapes `xs` and
/// `w` (a buffer may hold a reshape of its operand: the same bytes); `store` writes each output
/// element. Several weights share the loads of `x`: a gate/up pair is one pass over the input.
pub(super) fn linear_with(
    f: &mut Frame,
    x: &Operand,
    weights: &[Operand],
    (xs, w): (&[Dim], &[Dim]),
    store: Store,
) -> Result<LaunchShape, LowerError> {
    linear_to(f, x, weights, (xs, w), store, None)
}

/// [`linear_with`], where `direct` is the output buffer when `store` is a plain store into it (the
/// CPU may then store whole vectors).
fn linear_to(
    f: &mut Frame,
    x: &Operand,
    weights: &[Operand],
    (xs, w): (&[Dim], &[Dim]),
    store: Store,
    direct: Option<usize>,
) -> Result<LaunchShape, LowerError> {
    x.check(f, "linear")?;
    for w in weights {
        w.check(f, "linear")?;
    }
    let rows = xs[..xs.len() - 1].iter().try_fold(Dim::known(1), |a, &d| a.checked_mul(d));
    let rows = rows.ok_or_else(|| f.unsupported("linear", "the row count does not fit a dimension"))?;
    let m = f.dim(rows);
    let n = f.dim(w[0]);
    let k = f.dim(w[1]);
    Ok(match f.target {
        Target::Cpu => {
            let work = linear_cpu_work(f, rows, w[0])?;
            linear_cpu(f, x, weights, (&m, &n, &k), w[1].as_known(), store, direct);
            LaunchShape::Cpu { work }
        }
        Target::Gpu => {
            let zero = f.b.index(0);
            let bs: Vec<(Operand, Value)> = weights.iter().map(|w| (w.clone(), zero.clone())).collect();
            tiled_gpu(f, (&m, &n, &k), (x.clone(), &zero), &bs, &zero, true, store);
            gpu_launch(rows, w[0], Dim::known(1))
        }
    })
}

/// The code for one row of a grouped GEMM: the row, whether an expert holds it, and the buffers of
/// that expert's weights.
type RowBody<'a> = &'a dyn Fn(&mut Frame, &Value, &Value, &[Value]);

/// Threads per block of the fused grouped GEMM on the GPU.
const GROUPED_BLOCK: i64 = 256;

/// `grouped_linear`s of one input and one `offsets` (a routed gate/up pair, or one GEMM whose
/// weights are FP8), for fused kernels: `weights[a][e]` is expert `e`'s weight of GEMM `a`, of shape
/// `w`; each output element's sums go to `store` (rows no expert holds get 0, as `grouped_linear`
/// defines). One work item (CPU) or thread (GPU) per row and column, as `moe`'s `grouped_linear`:
/// the expert of row `m` is the number of `offsets[e + 1] <= m`, and its weights are picked by an
/// `scf.index_switch`. On the CPU, operands go in vectors of 16 along K (f16/bf16 widened to f32,
/// FP8 codes decoded in registers, each scale block's sums times its scale), 4 rows of one expert
/// at a time and an expert's last rows one at a time, through the same register blocks
/// ([`grouped_block`]), so that a row's sums do not depend on where the threads' ranges cut the
/// expert's rows. Packing the experts' weights is done only on AMX ([`packed::grouped_rows`]).
pub(super) fn grouped_with(
    f: &mut Frame,
    x: &Operand,
    offsets: usize,
    weights: &[Vec<Operand>],
    (xs, w): (&[Dim], &[Dim]),
    store: Store,
) -> Result<LaunchShape, LowerError> {
    x.check(f, "grouped_linear")?;
    for op in weights.iter().flatten() {
        op.check(f, "grouped_linear")?;
    }
    let experts = weights[0].len();
    let offsets_type = f.bufs[offsets].ty.dtype;
    let (m_dim, n_dim) = (xs[0], w[0]);
    let (n, k) = (f.dim(n_dim), f.dim(w[1]));
    let kn = w[1].as_known();
    let ev = f.b.index(experts as i64);
    let (zero, one) = (f.b.index(0), f.b.index(1));
    // The memref types of one expert's buffers of each GEMM: values, or codes and scales.
    let mut types: Vec<String> = Vec::new();
    for op in weights.iter().map(|ws| &ws[0]) {
        match *op {
            Operand::Plain(b) => types.push(format!("memref<?x{}>", f.storage(b))),
            Operand::Fp8 { .. } => types.extend(["memref<?xi8>".to_string(), "memref<?xf32>".to_string()]),
        }
    }
    // The expert of row `m`: the number of `offsets[e + 1] <= m` (`experts` for a row none holds).
    let expert_of = |f: &mut Frame, m: &Value| {
        for_carry(f, &zero, &ev, &one, &[(zero.clone(), "index")], |f, e, count| {
            let at = f.b.addi(e, &one);
            let end = f.load(offsets, &at);
            let end = f.int_to_index(&end, offsets_type);
            let before = f.cmp("ule", &end, m, "index");
            let next = f.b.addi(&count[0], &one);
            vec![f.select(&before, &next, &count[0], "index")]
        })
        .remove(0)
    };
    // The buffers of expert `e`, in the order of `types`: `slots[j][e]`.
    let slots: Vec<Vec<usize>> = {
        let mut slots = Vec::new();
        for ws in weights {
            match ws[0] {
                Operand::Plain(_) => slots.push(ws.iter().map(buffer_of).collect()),
                Operand::Fp8 { .. } => {
                    slots.push(ws.iter().map(|w| fp8_parts(w).0).collect());
                    slots.push(ws.iter().map(|w| fp8_parts(w).1).collect());
                }
            }
        }
        slots
    };
    let table = super::TableSlot::plan(f, &slots);
    // The views of expert `e`'s buffers: on the CPU read from the table of buffer addresses where
    // the experts' buffers lie evenly spaced among the kernel's; else one `scf.index_switch` over
    // the experts.
    let views_of = |f: &mut Frame, e: &Value| {
        if let Some(table) = &table {
            // The default (no expert holds the row) reads expert 0; its sums are discarded.
            let valid = f.cmp("ult", e, &ev, "index");
            let e = f.select(&valid, e, &zero, "index");
            return table.iter().map(|slot| slot.view(f, &e)).collect();
        }
        let tys: Vec<&str> = types.iter().map(String::as_str).collect();
        index_switch_tree(f, e, experts, &tys, |f, case| {
            // The default (no expert holds the row) reads expert 0; its sums are discarded.
            let at = case.unwrap_or(0);
            let mut out = Vec::new();
            for ws in weights {
                let bufs = match ws[at] {
                    Operand::Plain(b) => vec![b],
                    Operand::Fp8 { codes, scales, .. } => vec![codes, scales],
                };
                for b in bufs {
                    let (view, memref) = (f.bufs[b].view.clone(), f.bufs[b].memref.clone());
                    let dynamic = format!("memref<?x{}>", f.storage(b));
                    out.push(if memref == dynamic {
                        view
                    } else {
                        f.b.op("w", format_args!("memref.cast {view} : {memref} to {dynamic}"))
                    });
                }
            }
            out
        })
    };
    let row = |f: &mut Frame, m: &Value, col_body: RowBody| {
        let e = expert_of(f, m);
        let valid = f.cmp("ult", &e, &ev, "index");
        let views = views_of(f, &e);
        col_body(f, m, &valid, &views);
    };
    // FP8 input rows decoded to bf16 values for [`fp8_bf16_blocks`] where they apply (the CPU's).
    let fp8_cols = fp8_block_cols(weights);
    let raw_bf16 = fp8_bf16_applies(f, x, fp8_cols, kn);
    // One output element's dot products, scalar along K (the GPU's: one thread per element).
    let element_dots = |f: &mut Frame, xr: &InputRow, at: &Value, col: &Value, views: &[Value]| {
        let wstart = f.b.muli(col, &k);
        let reads = weight_reads(f, weights, views, col, &k);
        let fzero = f.b.f32(0.0);
        let inits: Vec<(Value, &str)> = weights.iter().map(|_| (fzero.clone(), "f32")).collect();
        let dots = for_carry(f, &zero, &k, &one, &inits, |f, i, acc| {
            let xv = xr.at(f, i);
            let wi = f.b.addi(&wstart, i);
            reads
                .iter()
                .zip(acc)
                .map(|(read, a)| {
                    let wv = read.at(f, &wi, i);
                    f.fma(&xv, &wv, a)
                })
                .collect()
        });
        store(f, at, &dots);
    };
    // One output element: its dot products when an expert holds row `m`, zeros (without reading
    // anything) for a row of no expert.
    let element = |f: &mut Frame, xr: &InputRow, m: &Value, col: &Value, valid: &Value, views: &[Value]| {
        let mn = f.b.muli(m, &n);
        let at = f.b.addi(&mn, col);
        let zeros = |f: &mut Frame| {
            let fzero = f.b.f32(0.0);
            store(f, &at, &vec![fzero; weights.len()]);
        };
        if_then_else(f, valid, |f| element_dots(f, xr, &at, col, views), zeros);
    };
    Ok(match f.target {
        Target::Cpu => {
            // Rows come sorted by expert, so the range is walked expert by expert (the views of
            // one expert's weights picked once: one switch in the kernel, whose size LLVM's time
            // follows, with 256 experts), then by blocks of [`GROUP_MR`] rows that share each
            // vector of the expert's weights, and [`GROUP_NC`] columns that share each vector of
            // the rows (a 4 x 4 register block, 4 x 2 for a gate/up pair), which cuts the loads
            // per multiply-add from 2 to a half. The expert's last `rows mod GROUP_MR` rows, and
            // rows no expert holds (index `E`, whose outputs are 0), go one row at a time.
            let (lo, hi) = f.range.clone().expect("CPU frames have a work range");
            let mr = f.b.index(GROUP_MR as i64);
            let amx = packed::grouped_applies(f, x, weights, n_dim, kn);
            // Where the input rows of a register block are decoded, for every block.
            let room = InputRow::room(f, x, GROUP_MR, kn, raw_bf16);
            // Rows `lo .. hi` (nonempty) times output columns `c0 .. c1` (`c0` a multiple of every
            // register block's columns).
            let rows_cols = |f: &mut Frame, lo: &Value, hi: &Value, c0: &Value, c1: &Value| {
                let last_row = f.b.subi(hi, &one);
                let (e_lo, e_hi) = (expert_of(f, lo), expert_of(f, &last_row));
                let e_end = f.b.addi(&e_hi, &one);
                for_loop(f, &e_lo, &e_end, &one, |f, e| {
                    let valid = f.cmp("ult", e, &ev, "index");
                    // Rows `offsets[e] .. offsets[e + 1]` (to the end for `E`), within the range.
                    let first = f.load(offsets, e);
                    let first = f.int_to_index(&first, offsets_type);
                    let next = f.b.addi(e, &one);
                    let next = f.b.minui(&next, &ev);
                    let end = f.load(offsets, &next);
                    let end = f.int_to_index(&end, offsets_type);
                    let end = f.select(&valid, &end, hi, "index");
                    let from = f.b.op("i", format_args!("arith.maxui {first}, {lo} : index"));
                    let to = f.b.minui(&end, hi);
                    let to = f.b.op("i", format_args!("arith.maxui {to}, {from} : index"));
                    let views = views_of(f, e);
                    let usual = |f: &mut Frame| {
                        let rows = f.b.subi(&to, &from);
                        let blocks = f.b.divui(&rows, &mr);
                        let blocks = f.select(&valid, &blocks, &zero, "index");
                        let span = f.b.muli(&blocks, &mr);
                        let blocked = f.b.addi(&from, &span);
                        // Rows `m0 ..` of `xrows`: GROUP_NC columns at a time (each input vector
                        // loaded once for them), then the last `N mod GROUP_NC` one by one. A
                        // single row takes its columns one by one: with 4 at a time a decode
                        // step's routed experts took 1.6-2x as long (Zen 4, AVX512_BF16,
                        // models/bench.toml in FP8, 2026-12-07), with 1 as long as before. FP8
                        // blocks of several rows take half as many columns: their accumulators
                        // are twice as many (each scale block's sums beside the running ones),
                        // and with GROUP_NC they spilled; the routed gate/up of a 128-token
                        // prefill took 53-56 ms instead of 62-64 on the same machine.
                        let columns = |f: &mut Frame, xrows: &[InputRow], m0: &Value| {
                            let nc = match xrows.len() {
                                1 => 1,
                                _ if fp8_cols.is_some() => (GROUP_NC / 2 / weights.len()).max(1),
                                _ => (GROUP_NC / weights.len()).max(1),
                            };
                            let ncv = f.b.index(nc as i64);
                            let width = f.b.subi(c1, c0);
                            let nq = f.b.divui(&width, &ncv);
                            let span = f.b.muli(&nq, &ncv);
                            let n_full = f.b.addi(c0, &span);
                            for_loop(f, c0, &n_full, &ncv, |f, col0| {
                                let cols: Vec<(Value, Vec<WeightRead>)> = (0..nc)
                                    .map(|c| {
                                        let ci = f.b.index(c as i64);
                                        let col = f.b.addi(col0, &ci);
                                        let reads = weight_reads(f, weights, &views, &col, &k);
                                        (col, reads)
                                    })
                                    .collect();
                                grouped_block(f, xrows, m0, &cols, (&n, &k), fp8_cols, store);
                            });
                            for_loop(f, &n_full, c1, &one, |f, col| {
                                let reads = weight_reads(f, weights, &views, col, &k);
                                let cols = [(col.clone(), reads)];
                                grouped_block(f, xrows, m0, &cols, (&n, &k), fp8_cols, store);
                            });
                        };
                        for_loop(f, &from, &blocked, &mr, |f, m0| {
                            let xrows = InputRow::rows(f, x, m0, GROUP_MR, &k, kn, raw_bf16, room.as_ref());
                            columns(f, &xrows, m0);
                        });
                        // The last `rows mod GROUP_MR` rows as one block of that many (each pass
                        // over the expert's weights serves every row in it), through the same
                        // register blocks (so a row gives the same bits in a block of any size,
                        // wherever the threads' ranges cut the expert's rows); or the rows of no
                        // expert: zeros, read from nothing.
                        let tail = |f: &mut Frame| {
                            let rest = f.b.subi(&to, &blocked);
                            for count in 1..GROUP_MR {
                                let c = f.b.index(count as i64);
                                let here = f.cmp("eq", &rest, &c, "index");
                                if_then(f, &here, |f| {
                                    let xrows = InputRow::rows(
                                        f,
                                        x,
                                        &blocked,
                                        count,
                                        &k,
                                        kn,
                                        raw_bf16,
                                        room.as_ref(),
                                    );
                                    columns(f, &xrows, &blocked);
                                });
                            }
                        };
                        let none = |f: &mut Frame| {
                            for_loop(f, &blocked, &to, &one, |f, m| {
                                for_loop(f, c0, c1, &one, |f, col| {
                                    let mn = f.b.muli(m, &n);
                                    let at = f.b.addi(&mn, col);
                                    let fzero = f.b.f32(0.0);
                                    store(f, &at, &vec![fzero; weights.len()]);
                                });
                            });
                        };
                        if_then_else(f, &valid, tail, none);
                    };
                    match amx {
                        // The experts of enough rows on AMX's tiles. The choice is each expert's
                        // (all its rows, wherever the range cuts them, so that a row's sums do not
                        // depend on the threads): packing an expert's weights into tiles (and
                        // decoding FP8 codes) pays over rows of that expert, not of others. Chosen
                        // by the GEMM's rows, a speculative step's two tokens (8 rows of one row
                        // per expert) packed every expert they picked, and their routed experts
                        // took 4.6 times one token's ([`packed::enough_expert_rows`]).
                        Some((xb, kn)) => {
                            // FP8: the views are each weight's codes then scales.
                            let fp8 = match (x, &weights[0][0]) {
                                (Operand::Fp8 { scales, cols, .. }, Operand::Fp8 { rows, .. }) => {
                                    Some(packed::GroupedFp8 {
                                        x_scales: *scales,
                                        w_scales: (views.iter().skip(1).step_by(2))
                                            .map(|v| (v.clone(), "memref<?xf32>".to_string()))
                                            .collect(),
                                        cols: *cols as i64,
                                        rows: *rows as i64,
                                    })
                                }
                                _ => None,
                            };
                            let ws: Vec<(Value, String)> = match &fp8 {
                                Some(_) => (views.iter().step_by(2))
                                    .map(|v| (v.clone(), "memref<?xi8>".to_string()))
                                    .collect(),
                                None => {
                                    views.iter().map(|v| (v.clone(), "memref<?xbf16>".to_string())).collect()
                                }
                            };
                            let e_rows = f.b.subi(&end, &first);
                            let elem = if fp8.is_some() { packed::Elem::Fp8 } else { packed::Elem::Bf16 };
                            let enough = packed::enough_expert_rows(f, elem, &e_rows);
                            let on = f.b.op("c", format_args!("arith.andi {valid}, {enough} : i1"));
                            let sizes = (&n, &k, kn);
                            if_then_else(
                                f,
                                &on,
                                |f| {
                                    packed::grouped_rows(f, xb, &ws, sizes, (&from, &to), store, fp8.as_ref())
                                },
                                usual,
                            );
                        }
                        None => usual(f),
                    }
                });
            };
            let nonempty = f.cmp("ult", &lo, &hi, "index");
            match (amx, n_dim.as_known()) {
                // Panels of [`NB`] output columns, as a `linear`'s: item `p * M + m` is row `m` of
                // panel `p`, so a thread's range is whole panels of every expert's rows (where
                // the rows are few, as in decode and short prefills) and no two threads read the
                // same weights. Split by rows, the threads' ranges (four per thread) cut through
                // experts, whose weights each side then read, and gave one thread more experts
                // than the other; a panel's weights also stay in cache for every row block of an
                // expert with many rows. The sums are the same: a row's do not depend on its block.
                (None, Some(known_n)) => {
                    let panels = known_n.div_ceil(NB as u64).max(1);
                    let work = m_dim.checked_mul(Dim::known(panels)).ok_or_else(|| {
                        f.unsupported("grouped_linear", "the work does not fit a dimension")
                    })?;
                    let m = f.dim(m_dim);
                    let nb = f.b.index(NB);
                    if_then(f, &nonempty, |f| {
                        // Panels the range touches: lo / M ..= (hi - 1) / M.
                        let first = f.b.divui(&lo, &m);
                        let m1 = f.b.subi(&m, &one);
                        let hi_up = f.b.addi(&hi, &m1);
                        let last = f.b.divui(&hi_up, &m);
                        for_loop(f, &first, &last, &one, |f, pi| {
                            let base = f.b.muli(pi, &m);
                            let top = f.b.addi(&base, &m);
                            let r_lo = f.b.op("i", format_args!("arith.maxui {lo}, {base} : index"));
                            let r_hi = f.b.minui(&hi, &top);
                            let r_lo = f.b.subi(&r_lo, &base);
                            let r_hi = f.b.subi(&r_hi, &base);
                            let c0 = f.b.muli(pi, &nb);
                            let c1 = f.b.addi(&c0, &nb);
                            let c1 = f.b.minui(&c1, &n);
                            rows_cols(f, &r_lo, &r_hi, &c0, &c1);
                        });
                    });
                    LaunchShape::Cpu { work }
                }
                // AMX packs an expert's weights whole, for all its rows: rows are the items.
                _ => {
                    if_then(f, &nonempty, |f| rows_cols(f, &lo, &hi, &zero, &n));
                    LaunchShape::Cpu { work: m_dim }
                }
            }
        }
        Target::Gpu => {
            let block = f.gpu_block(GROUPED_BLOCK);
            let (tid, bx, m) =
                (f.gpu_id("thread_id", 'x'), f.gpu_id("block_id", 'x'), f.gpu_id("block_id", 'y'));
            let bs = f.b.index(block);
            let base = f.b.muli(&bx, &bs);
            let col = f.b.addi(&base, &tid);
            let inside = f.cmp("ult", &col, &n, "index");
            if_then(f, &inside, |f| {
                row(f, &m, &|f, m, valid, views| {
                    let xr = InputRow::Operand(OperandRow::new(f, x, m, &k));
                    element(f, &xr, m, &col, valid, views)
                })
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

/// Whether the CPU's vector GEMM paths take plain operands of `dtype` (they widen f16 and bf16 to
/// f32 as they load).
pub(super) fn vector_float(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::F16 | DType::BF16)
}

/// Rows of one expert per CPU register block of a grouped GEMM.
const GROUP_MR: usize = 4;

/// Output columns per CPU register block of a grouped GEMM of one weight (shared by the GEMMs of a
/// gate/up pair, so the `GROUP_MR x GROUP_NC` accumulators stay in the 32 vector registers of
/// AVX-512 or spill a few on AVX2).
const GROUP_NC: usize = 4;

/// The columns per scale block shared by every weight of a grouped GEMM when all are FP8 (and so
/// [`fp8_blocked_dots`] applies); `None` otherwise.
fn fp8_block_cols(weights: &[Vec<Operand>]) -> Option<i64> {
    let mut cols = None;
    for ws in weights {
        let Operand::Fp8 { cols: c, .. } = ws[0] else { return None };
        if cols.is_some_and(|x| x != c) {
            return None;
        }
        cols = Some(c);
    }
    cols.map(|c| c as i64)
}

/// The vector part (`0 .. kvec`, a multiple of 16) of the dot products of the input rows `xrows`
/// with the FP8 weight rows `codes`, whose scale blocks span `cols` columns of K (`w_scale(f, j,
/// kk)`: the scale of column `kk` of weight row `j`): per block, the products of each input row
/// with the decoded codes (times 2^-8, [`fp8_block_sums`]: NaN codes found on the bytes) summed
/// in vector accumulators, then multiplied by the block's scale (times 2^8) into the running sums,
/// `inits` (input row `i` by weight row `j` is number `i * codes.len() + j`); a weight row whose
/// codes hold a NaN gives NaN sums after the last block. One multiply by the scale per block and
/// weight row instead of one per 16 codes; the sums are reassociated (the scale factored out of
/// each block's sum, as DeepSeek's FP8 GEMM kernels do), within the GEMMs' tolerance of the
/// interpreter's `dequantize` then `linear`. Each sum is the same computation whatever the other
/// rows and columns of the block, so a grouped GEMM's row gives the same bits in a register block
/// of 4 rows or alone.
fn fp8_blocked_dots(
    f: &mut Frame,
    xrows: &[InputRow],
    (codes, w_scale): (&[CodesRow], RowScale),
    (kvec, cols): (&Value, i64),
    inits: &[(Value, &str)],
) -> Vec<Value> {
    let (zero, one) = (f.b.index(0), f.b.index(1));
    let (bc, bc1) = (f.b.index(cols), f.b.index(cols - 1));
    let blocks = f.b.addi(kvec, &bc1);
    let blocks = f.b.divui(&blocks, &bc);
    let zero_v = f.b.constant("dense<0.0>", VEC);
    let (n, nw) = (inits.len(), codes.len());
    debug_assert_eq!(n, xrows.len() * nw, "one accumulator per input row and weight row");
    let carried = [inits, &nan_inits(f, nw)].concat();
    let out = for_carry(f, &zero, &blocks, &one, &carried, |f, b, c| {
        let (acc, nan) = c.split_at(n);
        let start = f.b.muli(b, &bc);
        let end = f.b.addi(&start, &bc);
        let end = f.b.minui(&end, kvec);
        let binits: Vec<(Value, &str)> = (0..n).map(|_| (zero_v.clone(), VEC)).collect();
        let step = |f: &mut Frame, kk: &Value, wv: &[Value], bacc: &[Value]| -> Vec<Value> {
            row_fmas(f, xrows, kk, wv, bacc)
        };
        let (block, nan) = fp8_block_sums(f, codes, (&start, &end), &binits, nan, &step);
        let svs: Vec<Value> = (0..nw)
            .map(|j| {
                let s = w_scale(f, j, &start);
                f.scale_vec_256(&s)
            })
            .collect();
        let mut next: Vec<Value> = (0..n)
            .map(|a| {
                let (sum, sv, acc) = (&block[a], &svs[a % nw], &acc[a]);
                f.b.op("acc", format_args!("vector.fma {sum}, {sv}, {acc} : {VEC}"))
            })
            .collect();
        next.extend(nan);
        next
    });
    let (acc, nan) = out.split_at(n);
    let any: Vec<Value> = nan.iter().map(|m| any_nan_code(f, m)).collect();
    acc.iter().enumerate().map(|(a, v)| nan_if(f, &any[a % nw], v)).collect()
}

/// Where one FP8 weight row's codes are, for [`fp8_block_sums`]: code `kk` of the row is element
/// `base + kk` of `view`.
struct CodesRow {
    view: Value,
    memref: String,
    base: Value,
}

/// One step of [`fp8_block_sums`]: `(frame, kk, the weight rows' 16 codes at kk decoded, the
/// accumulators)` to the next accumulators.
type BlockStep<'a> = &'a dyn Fn(&mut Frame, &Value, &[Value], &[Value]) -> Vec<Value>;

/// The codes one step of [`fp8_block_sums`]' main loop tests for NaN at once: one 512-bit vector.
const NAN_SPAN: i64 = 64;
const NAN_VEC: &str = "vector<64xi8>";

/// The running NaN tests of [`fp8_block_sums`], one per weight row, before the first block.
fn nan_inits(f: &mut Frame, rows: usize) -> Vec<(Value, &'static str)> {
    let zero = f.b.constant("dense<0>", NAN_VEC);
    (0..rows).map(|_| (zero.clone(), NAN_VEC)).collect()
}

/// The inner loop of a blocked FP8 dot product over columns `start .. end` of K (a multiple of 16
/// apart) for the weight rows `rows`: `step(f, kk, decoded, acc)` takes the 16 codes at `kk` of
/// every row decoded (times 2^-8) and returns the next accumulators. Returns the accumulators
/// and, per row, the running NaN test `nan` carried on.
///
/// The decode is most of an FP8 GEMV's work, and a NaN code must still make the sum NaN, as the
/// interpreter's `dequantize` then `linear` does. So 64 codes at a time are decoded without
/// their NaN test ([`Frame::f8_decode_vec_finite`]), and their magnitudes go into a running
/// unsigned max on the bytes, one `and` and one `max` per 64 codes per row: the row holds a NaN
/// code exactly when the max is 0x7F, and [`any_nan_code`] then [`nan_if`] make its sums NaN
/// after the last block. The last `(end - start) % 64` codes take the tested decode.
fn fp8_block_sums(
    f: &mut Frame,
    rows: &[CodesRow],
    (start, end): (&Value, &Value),
    inits: &[(Value, &str)],
    nan: &[Value],
    step: BlockStep,
) -> (Vec<Value>, Vec<Value>) {
    let (span, vl) = (f.b.index(NAN_SPAN), f.b.index(VL));
    let len = f.b.subi(end, start);
    let q = f.b.divui(&len, &span);
    let q = f.b.muli(&q, &span);
    let mid = f.b.addi(start, &q);
    let n = inits.len();
    let carried: Vec<(Value, &str)> =
        inits.iter().cloned().chain(nan.iter().map(|m| (m.clone(), NAN_VEC))).collect();
    let mag_mask = f.b.constant("dense<127>", NAN_VEC);
    let out = for_carry(f, start, &mid, &span, &carried, |f, i, c| {
        let (acc, nan) = c.split_at(n);
        let mut nan_next = Vec::with_capacity(rows.len());
        for (row, m) in rows.iter().zip(nan) {
            row.prefetch(f, i);
            let at = f.b.addi(&row.base, i);
            let (view, memref) = (&row.view, &row.memref);
            let v = f.b.op("qv", format_args!("vector.load {view}[{at}] : {memref}, {NAN_VEC}"));
            let mag = f.b.op("b", format_args!("arith.andi {v}, {mag_mask} : {NAN_VEC}"));
            nan_next.push(f.b.op("b", format_args!("arith.maxui {m}, {mag} : {NAN_VEC}")));
        }
        let mut acc = acc.to_vec();
        for sub in 0..NAN_SPAN / VL {
            let off = f.b.index(sub * VL);
            let kk = f.b.addi(i, &off);
            let wv: Vec<Value> = rows.iter().map(|row| row.load16(f, &kk, false)).collect();
            acc = step(f, &kk, &wv, &acc);
        }
        acc.extend(nan_next);
        acc
    });
    let (acc, nan) = out.split_at(n);
    let tail_inits: Vec<(Value, &str)> = acc.iter().zip(inits).map(|(a, (_, t))| (a.clone(), *t)).collect();
    let acc = for_carry(f, &mid, end, &vl, &tail_inits, |f, kk, acc| {
        let wv: Vec<Value> = rows.iter().map(|row| row.load16(f, kk, true)).collect();
        step(f, kk, &wv, acc)
    });
    (acc, nan.to_vec())
}

impl CodesRow {
    /// Asks for the codes [`PREFETCH_BYTES`] past `kk`.
    fn prefetch(&self, f: &mut Frame, kk: &Value) {
        let at = f.b.addi(&self.base, kk);
        f.prefetch_ahead(&self.view, &self.memref, 1, &at);
    }

    /// Codes `kk .. kk + 64` as bf16 values ([`Frame::f8_to_bf16_64`]).
    fn load_bf16_64(&self, f: &mut Frame, kk: &Value) -> [Value; 2] {
        let at = f.b.addi(&self.base, kk);
        let (view, memref) = (&self.view, &self.memref);
        let q = f.b.op("qv", format_args!("vector.load {view}[{at}] : {memref}, {NAN_VEC}"));
        f.f8_to_bf16_64(&q)
    }

    /// Codes `kk .. kk + 16` decoded (times 2^-8), NaN codes as NaN when `tested`.
    fn load16(&self, f: &mut Frame, kk: &Value, tested: bool) -> Value {
        let at = f.b.addi(&self.base, kk);
        let (view, memref) = (&self.view, &self.memref);
        let q = f.b.op("qv", format_args!("vector.load {view}[{at}] : {memref}, vector<16xi8>"));
        match tested {
            true => f.f8_decode_vec_raw(&q),
            false => f.f8_decode_vec_finite(&q),
        }
    }
}

/// Whether the running test of [`fp8_block_sums`] saw a NaN code: an `i1`.
fn any_nan_code(f: &mut Frame, max: &Value) -> Value {
    let m = f.b.op("m", format_args!("vector.reduction <maxui>, {max} : {NAN_VEC} into i8"));
    let c = f.b.constant("127", "i8");
    f.b.op("p", format_args!("arith.cmpi eq, {m}, {c} : i8"))
}

/// `acc` (a `vector<16xf32>` of partial sums), or NaN in every lane when `any`.
fn nan_if(f: &mut Frame, any: &Value, acc: &Value) -> Value {
    let nan = f.b.constant("dense<0x7FC00000>", VEC);
    f.b.op("acc", format_args!("arith.select {any}, {nan}, {acc} : {VEC}"))
}

/// One GEMM's weight of the expert a row belongs to, as the kernel reads it at one output column:
/// the view of its values (or FP8 codes), a buffer chosen at run time, and for FP8 the view of its
/// block scales, the column's first scale and the columns per scale block.
struct WeightRead {
    view: Value,
    dtype: DType,
    scales: Option<(Value, Value, Value)>,
}

impl WeightRead {
    /// The scale of column `kk` of an FP8 weight.
    fn scale(&self, f: &mut Frame, kk: &Value) -> Option<Value> {
        let (view, base, cols) = self.scales.as_ref()?;
        let c = f.b.divui(kk, cols);
        let at = f.b.addi(base, &c);
        Some(f.load_view(view, "memref<?xf32>", DType::F32, &at))
    }

    /// Element `wi` (column `kk` of the output column's row) in f32.
    fn at(&self, f: &mut Frame, wi: &Value, kk: &Value) -> Value {
        let memref = format!("memref<?x{}>", super::storage_type(self.dtype));
        let w = f.load_view(&self.view, &memref, self.dtype, wi);
        match self.scale(f, kk) {
            Some(s) => f.binf("mulf", &w, &s),
            None => w,
        }
    }

    /// Asks for the bytes [`PREFETCH_BYTES`] past element `wi`.
    fn prefetch(&self, f: &mut Frame, wi: &Value) {
        let memref = format!("memref<?x{}>", super::storage_type(self.dtype));
        f.prefetch_ahead(&self.view, &memref, self.dtype.size_bytes() as i64, wi);
    }

    /// The output column's weight row (starting at `wstart`) as a [`Bf16Row`] when it is bf16.
    fn bf16_row(&self, wstart: &Value) -> Option<Bf16Row> {
        (self.dtype == DType::BF16 && self.scales.is_none()).then(|| Bf16Row {
            view: self.view.clone(),
            memref: "memref<?xbf16>".into(),
            start: wstart.clone(),
        })
    }

    /// Elements `wi .. wi + 16` (columns `kk .. kk + 16`, one scale block: [`Operand::check`]) as a
    /// `vector<16xf32>`: f16/bf16 widened, FP8 decoded in registers and times its block's scale.
    fn vec_at(&self, f: &mut Frame, wi: &Value, kk: &Value) -> Value {
        if self.dtype != DType::F8E4M3 {
            return f.load_view_vec(&self.view, self.dtype, wi);
        }
        let view = &self.view;
        let q = f.b.op("qv", format_args!("vector.load {view}[{wi}] : memref<?xi8>, vector<16xi8>"));
        let q = f.f8_decode_vec_raw(&q);
        let s = self.scale(f, kk).expect("FP8 weights have scales");
        let sv = f.scale_vec_256(&s);
        f.b.op("wv", format_args!("arith.mulf {q}, {sv} : {VEC}"))
    }
}

/// A row of a grouped GEMM's input as the CPU loops read it: the operand itself, or, for FP8
/// codes, their f32 values (decoded and scaled exactly as [`OperandRow::at`] does) written once to
/// scratch before the loop over output columns, which would otherwise decode the row again for
/// every column.
enum InputRow {
    Operand(OperandRow),
    Decoded {
        view: Value,
        memref: String,
        start: Value,
    },
    /// An FP8 row's codes as their exact values in bf16, without their scales (which the
    /// operand's row still gives), written once to scratch for [`Gemv::fp8_bf16_block`].
    RawBf16 {
        view: Value,
        memref: String,
        start: Value,
        op: OperandRow,
    },
}

impl InputRow {
    /// The scratch that [`InputRow::rows`] decodes `count` rows of `x` into, when it decodes
    /// them (an FP8 input of known `K`), to be shared by calls of at most `count` rows.
    fn room(
        f: &mut Frame,
        x: &Operand,
        count: usize,
        kn: Option<u64>,
        raw_bf16: bool,
    ) -> Option<(Value, String)> {
        let (Operand::Fp8 { .. }, Some(kn)) = (x, kn) else { return None };
        Some(f.scratch(if raw_bf16 { "bf16" } else { "f32" }, count as u64 * kn))
    }

    /// Rows `m0 .. m0 + count` of `x` (`K` columns, `kn` when known); with `raw_bf16` (an FP8
    /// input whose `K`, known, is a multiple of 64) the rows' codes decoded to bf16 values
    /// ([`InputRow::RawBf16`]). FP8 rows are decoded into `room` ([`InputRow::room`] of at least
    /// `count` rows), or into scratch of their own.
    #[allow(clippy::too_many_arguments)]
    fn rows(
        f: &mut Frame,
        x: &Operand,
        m0: &Value,
        count: usize,
        k: &Value,
        kn: Option<u64>,
        raw_bf16: bool,
        room: Option<&(Value, String)>,
    ) -> Vec<InputRow> {
        let operands: Vec<OperandRow> = (0..count).map(|r| operand_row(f, x, m0, r, k)).collect();
        let (Operand::Fp8 { .. }, Some(kn)) = (x, kn) else {
            return operands.into_iter().map(InputRow::Operand).collect();
        };
        let (view, memref) = match room {
            Some(room) => room.clone(),
            None => InputRow::room(f, x, count, Some(kn), raw_bf16).expect("an FP8 input of known K"),
        };
        if raw_bf16 {
            let (zero, span) = (f.b.index(0), f.b.index(NAN_SPAN));
            return operands
                .into_iter()
                .enumerate()
                .map(|(r, op)| {
                    let start = f.b.index(r as i64 * kn as i64);
                    let codes = op.codes(f);
                    for_loop(f, &zero, k, &span, |f, kk| {
                        let [lo, hi] = codes.load_bf16_64(f, kk);
                        let at = f.b.addi(&start, kk);
                        let c32 = f.b.index(2 * VL);
                        let at_hi = f.b.addi(&at, &c32);
                        f.b.line(format_args!("vector.store {lo}, {view}[{at}] : {memref}, {BF16_PAIRS}"));
                        f.b.line(format_args!("vector.store {hi}, {view}[{at_hi}] : {memref}, {BF16_PAIRS}"));
                    });
                    InputRow::RawBf16 { view: view.clone(), memref: memref.clone(), start, op }
                })
                .collect();
        }
        let (zero, one, vl) = (f.b.index(0), f.b.index(1), f.b.index(VL));
        let kvec = f.b.index((kn - kn % VL as u64) as i64);
        operands
            .into_iter()
            .enumerate()
            .map(|(r, op)| {
                let start = f.b.index(r as i64 * kn as i64);
                for_loop(f, &zero, &kvec, &vl, |f, kk| {
                    let v = op.vec_at(f, kk);
                    let at = f.b.addi(&start, kk);
                    f.b.line(format_args!("vector.store {v}, {view}[{at}] : {memref}, {VEC}"));
                });
                for_loop(f, &kvec, k, &one, |f, kk| {
                    let v = op.at(f, kk);
                    let at = f.b.addi(&start, kk);
                    f.b.line(format_args!("memref.store {v}, {view}[{at}] : {memref}"));
                });
                InputRow::Decoded { view: view.clone(), memref: memref.clone(), start }
            })
            .collect()
    }

    /// Element `kk` of the row, in f32.
    fn at(&self, f: &mut Frame, kk: &Value) -> Value {
        match self {
            InputRow::Operand(op) | InputRow::RawBf16 { op, .. } => op.at(f, kk),
            InputRow::Decoded { view, memref, start } => {
                let i = f.b.addi(start, kk);
                f.b.op("x", format_args!("memref.load {view}[{i}] : {memref}"))
            }
        }
    }

    /// [`OperandRow::raw_vec_at`] of an operand's row; a decoded row's values.
    fn raw_vec_at(&self, f: &mut Frame, kk: &Value) -> Value {
        match self {
            InputRow::Operand(op) | InputRow::RawBf16 { op, .. } => op.raw_vec_at(f, kk),
            InputRow::Decoded { .. } => self.vec_at(f, kk),
        }
    }

    /// The scale of column `kk` of an FP8 operand's row; `None` for a decoded row (its values
    /// carry their scales).
    fn scale(&self, f: &mut Frame, kk: &Value) -> Option<Value> {
        match self {
            InputRow::Operand(op) | InputRow::RawBf16 { op, .. } => op.scale(f, kk),
            InputRow::Decoded { .. } => None,
        }
    }

    /// Elements `kk .. kk + 16` of the row, as a `vector<16xf32>`.
    fn vec_at(&self, f: &mut Frame, kk: &Value) -> Value {
        match self {
            InputRow::Operand(op) | InputRow::RawBf16 { op, .. } => op.vec_at(f, kk),
            InputRow::Decoded { view, memref, start } => {
                let i = f.b.addi(start, kk);
                f.b.op("xv", format_args!("vector.load {view}[{i}] : {memref}, {VEC}"))
            }
        }
    }
}

/// The reads of output column `col` of each GEMM of `weights` (`[N, K]` each), whose buffers of the
/// row's expert `views` holds: one view per plain weight, codes and scales for an FP8 one.
fn weight_reads(
    f: &mut Frame,
    weights: &[Vec<Operand>],
    views: &[Value],
    col: &Value,
    k: &Value,
) -> Vec<WeightRead> {
    let mut reads = Vec::new();
    let mut next = 0;
    for ws in weights {
        match ws[0] {
            Operand::Plain(b) => {
                reads.push(WeightRead { view: views[next].clone(), dtype: f.bufs[b].ty.dtype, scales: None });
                next += 1;
            }
            Operand::Fp8 { rows, cols, .. } => {
                let (br, bc, bc1) =
                    (f.b.index(rows as i64), f.b.index(cols as i64), f.b.index(cols as i64 - 1));
                let kb = f.b.addi(k, &bc1);
                let kb = f.b.divui(&kb, &bc);
                let block_row = f.b.divui(col, &br);
                let base = f.b.muli(&block_row, &kb);
                reads.push(WeightRead {
                    view: views[next].clone(),
                    dtype: DType::F8E4M3,
                    scales: Some((views[next + 1].clone(), base, bc)),
                });
                next += 2;
            }
        }
    }
    reads
}

/// Output columns `cols` (each with the reads of its weights, one per GEMM) of rows `m0 .. m0 +
/// GROUP_MR` (all of one expert) of the input rows `xrows`: `GROUP_MR x cols x GEMMs` vector
/// accumulators along `K`, each weight vector loaded (and for FP8 decoded and scaled) once for the
/// block's rows and each input vector once for its columns, a horizontal sum and a scalar tail;
/// each row and column's sums go to `store`.
fn grouped_block(
    f: &mut Frame,
    xrows: &[InputRow],
    m0: &Value,
    cols: &[(Value, Vec<WeightRead>)],
    (n, k): (&Value, &Value),
    fp8_cols: Option<i64>,
    store: Store,
) {
    let (zero, vl) = (f.b.index(0), f.b.index(VL));
    let kq = f.b.divui(k, &vl);
    let kvec = f.b.muli(&kq, &vl);
    let wstarts: Vec<Value> = cols.iter().map(|(col, _)| f.b.muli(col, k)).collect();
    let zero_v = f.b.constant("dense<0.0>", VEC);
    let g = cols[0].1.len();
    let per_row = cols.len() * g;
    // Accumulator (r, c, w) is number r * per_row + c * g + w.
    let inits: Vec<(Value, &str)> = (0..xrows.len() * per_row).map(|_| (zero_v.clone(), VEC)).collect();
    if let Some(span) = fp8_cols {
        let reads: Vec<(&WeightRead, &Value)> =
            cols.iter().zip(&wstarts).flat_map(|((_, rs), ws)| rs.iter().map(move |r| (r, ws))).collect();
        let codes: Vec<CodesRow> = (reads.iter())
            .map(|(r, ws)| CodesRow {
                view: r.view.clone(),
                memref: "memref<?xi8>".into(),
                base: (*ws).clone(),
            })
            .collect();
        let w_scale =
            |f: &mut Frame, j: usize, kk: &Value| reads[j].0.scale(f, kk).expect("FP8 weights have scales");
        let accs = if xrows.iter().all(|r| matches!(r, InputRow::RawBf16 { .. })) {
            // FP8 input rows decoded to bf16 values ([`InputRow::rows`] chose so,
            // `fp8_bf16_applies`): every FP8 weight's codes by table and the products by bf16 dot
            // products, block by block.
            let x_scale =
                |f: &mut Frame, i: usize, kk: &Value| xrows[i].scale(f, kk).expect("FP8 inputs have scales");
            fp8_bf16_blocks(f, (xrows, &x_scale), (&codes, &w_scale), (&kvec, span), &inits)
        } else {
            // Each scale block's products summed on the decoded codes, then times the scale.
            fp8_blocked_dots(f, xrows, (&codes, &w_scale), (&kvec, span), &inits)
        };
        return grouped_block_finish(f, xrows, m0, cols, &wstarts, (n, k, &kvec), accs, store);
    }
    // bf16 input and weights on a CPU with bf16 dot products: 32 columns of K a step first.
    let pairs: Option<(Vec<Bf16Row>, Vec<Bf16Row>)> = match f.has_bf16_dot() {
        true => (xrows.iter().map(|r| r.bf16_row(f)).collect::<Option<_>>()).zip(
            (cols.iter().zip(&wstarts))
                .flat_map(|((_, reads), wstart)| reads.iter().map(move |r| r.bf16_row(wstart)))
                .collect::<Option<_>>(),
        ),
        false => None,
    };
    let (start, inits) = match pairs {
        Some((xb, wb)) => bf16_dot_block(f, k, &xb, &wb, &inits),
        None => (zero.clone(), inits),
    };
    let accs = for_carry(f, &start, &kvec, &vl, &inits, |f, i, acc| {
        let mut wv = Vec::with_capacity(per_row);
        for ((_, reads), wstart) in cols.iter().zip(&wstarts) {
            let wi = f.b.addi(wstart, i);
            reads.iter().for_each(|read| read.prefetch(f, &wi));
            wv.extend(reads.iter().map(|read| read.vec_at(f, &wi, i)));
        }
        row_fmas(f, xrows, i, &wv, acc)
    });
    grouped_block_finish(f, xrows, m0, cols, &wstarts, (n, k, &kvec), accs, store)
}

/// One step of a register block along K: input rows `xrows`' 16 values at `kk` times the weight
/// vectors `wv`, added to the accumulators `acc` (input row `i` by weight vector `j` is number
/// `i * wv.len() + j`).
fn row_fmas(f: &mut Frame, xrows: &[InputRow], kk: &Value, wv: &[Value], acc: &[Value]) -> Vec<Value> {
    let mut out = Vec::with_capacity(acc.len());
    for (r, xr) in xrows.iter().enumerate() {
        let xv = xr.vec_at(f, kk);
        for (j, w) in wv.iter().enumerate() {
            let a = &acc[r * wv.len() + j];
            out.push(f.b.op("acc", format_args!("vector.fma {xv}, {w}, {a} : {VEC}")));
        }
    }
    out
}

/// The end of [`grouped_block`]: the vector sums `accs` of columns `0 .. kvec` reduced, the scalar
/// tail `kvec .. K` added, and the results stored.
#[allow(clippy::too_many_arguments)]
fn grouped_block_finish(
    f: &mut Frame,
    xrows: &[InputRow],
    m0: &Value,
    cols: &[(Value, Vec<WeightRead>)],
    wstarts: &[Value],
    (n, k, kvec): (&Value, &Value, &Value),
    accs: Vec<Value>,
    store: Store,
) {
    let one = f.b.index(1);
    let g = cols[0].1.len();
    let per_row = cols.len() * g;
    let sums: Vec<(Value, &str)> = accs
        .iter()
        .map(|a| {
            let r =
                f.b.op("s", format_args!("vector.reduction <add>, {a} fastmath<reassoc> : {VEC} into f32"));
            (r, "f32")
        })
        .collect();
    let dots = for_carry(f, kvec, k, &one, &sums, |f, i, acc| {
        let mut wv = Vec::with_capacity(per_row);
        for ((_, reads), wstart) in cols.iter().zip(wstarts) {
            let wi = f.b.addi(wstart, i);
            wv.extend(reads.iter().map(|read| read.at(f, &wi, i)));
        }
        let mut out = Vec::with_capacity(acc.len());
        for (r, xr) in xrows.iter().enumerate() {
            let xv = xr.at(f, i);
            for (j, wv) in wv.iter().enumerate() {
                out.push(f.fma(&xv, wv, &acc[r * per_row + j]));
            }
        }
        out
    });
    for r in 0..xrows.len() {
        let ri = f.b.index(r as i64);
        let m = f.b.addi(m0, &ri);
        let mn = f.b.muli(&m, n);
        for (c, (col, _)) in cols.iter().enumerate() {
            let at = f.b.addi(&mn, col);
            let base = r * per_row + c * g;
            store(f, &at, &dots[base..base + g]);
        }
    }
}

/// The CPU `linear` over work items `[lo, hi)` of `M * panels`: item `i` is row `i mod M` of column
/// panel `i / M` (`NB` weight rows). Panel-major order keeps a thread's range on one panel across
/// consecutive rows (the panel stays in cache), and a single row (a decode step's GEMV) still splits
/// over the threads by panels.
fn linear_cpu(
    f: &mut Frame,
    x: &Operand,
    weights: &[Operand],
    (m, n, k): (&Value, &Value, &Value),
    kn: Option<u64>,
    store: Store,
    direct: Option<usize>,
) {
    let (lo, hi) = f.range.clone().expect("CPU frames have a work range");
    let packed = packed::applies(f, x, weights, kn);
    let vl = f.b.index(VL);
    let kq = f.b.divui(k, &vl);
    let kvec = f.b.muli(&kq, &vl);
    // Each weight takes a share of the block's columns, so the accumulators stay in registers.
    let nr_full = (NR / weights.len()).max(1);
    let packed = packed.zip(kn);
    // AMX takes a range's whole panels several at a time (`packed::groups`), so its GEMMs leave
    // this loop, which then has the dot-product blocks alone; the choice is the GEMM's rows'.
    let grouped = packed.filter(|(elem, _)| elem.amx());
    // Where AMX takes every GEMM of `packed::AMX_MIN_ROWS` rows or more, the blocks below see
    // fewer: a decode step's one row, or the two of a speculative step (the token and its draft).
    // Blocks of two rows read (and for FP8, decode) each weight row once for both; one-row blocks
    // read it again for each row, which made a two-row FP8 GEMV cost three times one row's.
    let mr_main = if grouped.is_some() { 2 } else { MR };
    let (mr, nr, nb, one) =
        (f.b.index(mr_main as i64), f.b.index(nr_full as i64), f.b.index(NB), f.b.index(1));
    let g = Gemv { n: n.clone(), k: k.clone(), kvec, x: x.clone(), weights: weights.to_vec(), store };
    // A single row (a decode step's GEMV) with weights narrower than f32 takes its columns one at
    // a time: each thread then reads one weight row after the other, a single sequential stream.
    // Four rows at a time (each input vector loaded once for them) interleave four streams, which
    // the hardware's prefetchers followed worse: on a 2-core Zen 4 (2026-12-07) `kiln bench gemm
    // --rows 1 --n 32000 --k 1024` read bf16 at 44 GB/s instead of 30, FP8 (65536 rows) at 34-38
    // instead of 15-20, and models/bench.toml decoded 198-212 tokens/s in FP8 instead of 134-139,
    // 120-132 in bf16 instead of 107-111. f32 did not gain (18-26 GB/s against 24-28), and in
    // cache four columns stay faster (FP8 at N = 1024: 65 GB/s against 57), so a larger GEMM's
    // blocks of MR rows keep them.
    let one_column = f.target == Target::Cpu
        && weights.iter().all(|w| match *w {
            Operand::Plain(b) => f.bufs[b].ty.dtype.size_bytes() < 4,
            Operand::Fp8 { .. } => true,
        });
    // Every panel ([`NB`] rows, a multiple of any block's) splits into whole blocks when the weight
    // rows do: then the one-row blocks after them are never reached, and are not made.
    let n_whole_blocks = nr_full == 1 || f.b.known(n).is_some_and(|n| n % nr_full as i64 == 0);
    // Panels the range touches: lo / M ..= (hi - 1) / M.
    let first = f.b.divui(&lo, m);
    let m1 = f.b.subi(m, &one);
    let hi_up = f.b.addi(&hi, &m1);
    let last = f.b.divui(&hi_up, m);
    let per_panel = |f: &mut Frame, packed: Option<(packed::Elem, u64)>| {
        for_loop(f, &first, &last, &one, |f, pi| {
            let base = f.b.muli(pi, m);
            let top = f.b.addi(&base, m);
            let r_lo = f.b.op("i", format_args!("arith.maxui {lo}, {base} : index"));
            let r_hi = f.b.minui(&hi, &top);
            let r_lo = f.b.subi(&r_lo, &base);
            let r_hi = f.b.subi(&r_hi, &base);
            let span = f.b.subi(&r_hi, &r_lo);
            let blocks = f.b.divui(&span, &mr);
            let full = f.b.muli(&blocks, &mr);
            let m_full = f.b.addi(&r_lo, &full);
            let p = f.b.muli(pi, &nb);
            let end = f.b.addi(&p, &nb);
            let p_end = f.b.minui(&end, n);
            let len = f.b.subi(&p_end, &p);
            let q = f.b.divui(&len, &nr);
            let qn = f.b.muli(&q, &nr);
            let p_full = f.b.addi(&p, &qn);
            let blocks = |f: &mut Frame| {
                for (m_lo, m_hi, m_step, mr) in [(&r_lo, &m_full, &mr, mr_main), (&m_full, &r_hi, &one, 1)] {
                    for_loop(f, m_lo, m_hi, m_step, |f, m0| {
                        // An FP8 input's rows are decoded once for the panel, not once per column block.
                        let xrows = InputRow::rows(f, &g.x, m0, mr, &g.k, kn, g.fp8_bf16(f, kn), None);
                        if mr == 1 && one_column {
                            for_loop(f, &p, &p_end, &one, |f, n0| g.block(f, &xrows, m0, n0, 1));
                            return;
                        }
                        for_loop(f, &p, &p_full, &nr, |f, n0| g.block(f, &xrows, m0, n0, nr_full));
                        if !n_whole_blocks {
                            for_loop(f, &p_full, &p_end, &one, |f, n0| g.block(f, &xrows, m0, n0, 1));
                        }
                    });
                }
            };
            match packed {
                Some((elem, kn)) => {
                    let enough = packed::enough_rows(f, elem, m);
                    if_then_else(
                        f,
                        &enough,
                        |f| {
                            let (ops, sizes) = ((x, weights), (n, k, kn));
                            packed::panel(f, elem, ops, sizes, (&p, &p_end), (&r_lo, &r_hi), store, direct)
                        },
                        blocks,
                    );
                }
                None => blocks(f),
            }
        })
    };
    match (grouped, packed) {
        (Some((elem, kn)), _) => {
            let enough = packed::enough_rows(f, elem, m);
            if_then_else(
                f,
                &enough,
                |f| packed::groups(f, elem, (x, weights), (m, n, k, kn), (&lo, &hi), store, direct),
                |f| per_panel(f, None),
            );
        }
        (None, packed) => per_panel(f, packed),
    }
}

/// The CPU work of a `linear` of `rows` rows by `n` weight rows: one item per row and column panel.
pub(super) fn linear_cpu_work(f: &Frame, rows: Dim, n: Dim) -> Result<Dim, LowerError> {
    let n = n.as_known().ok_or_else(|| f.unsupported("linear", "the weight's rows must be a constant"))?;
    let panels = n.div_ceil(NB as u64).max(1);
    rows.checked_mul(Dim::known(panels))
        .ok_or_else(|| f.unsupported("linear", "the work does not fit a dimension"))
}

/// The sizes and buffers one CPU `linear` block needs.
struct Gemv<'s> {
    n: Value,
    k: Value,
    /// `K` rounded down to a multiple of the vector width.
    kvec: Value,
    x: Operand,
    weights: Vec<Operand>,
    store: Store<'s>,
}

impl Gemv<'_> {
    /// When every weight is FP8 with one span of scale block columns: that span, and whether the
    /// input is FP8 in blocks of the same span (so that its scale factors out of each block too).
    fn fp8_cols(&self) -> Option<(i64, bool)> {
        let mut cols = None;
        for w in &self.weights {
            let Operand::Fp8 { cols: c, .. } = *w else { return None };
            if cols.is_some_and(|x| x != c) {
                return None;
            }
            cols = Some(c);
        }
        let cols = cols?;
        let x_raw = matches!(self.x, Operand::Fp8 { cols: c, .. } if c == cols);
        Some((cols as i64, x_raw))
    }

    /// Whether the block takes [`Gemv::fp8_bf16_block`]: FP8 weights and an FP8 input in blocks of
    /// the same span, a multiple of 64 columns, a known `K` that is a multiple of 64, and a CPU
    /// with bf16 dot products and byte tables.
    fn fp8_bf16(&self, f: &Frame, kn: Option<u64>) -> bool {
        fp8_bf16_applies(f, &self.x, self.fp8_cols().map(|(c, _)| c), kn)
    }

    /// The FP8 blocks of [`Gemv::block`] when the input rows are [`InputRow::RawBf16`]: per scale
    /// block, 64 columns a step, each weight row's codes decoded to bf16 by table
    /// ([`Frame::f8_to_bf16_64`]) and multiplied with the input's bf16 values by `vdpbf16ps`; then
    /// the block's sums times the input's and the weight's scales. E4M3 values are bf16 values and
    /// their products are exact in f32 (and at least 2^-18 in magnitude, never flushed as
    /// subnormal), so this is the widening path's arithmetic but for the order of the sums. NaN
    /// codes decode to NaN.
    fn fp8_bf16_block(
        &self,
        f: &mut Frame,
        xrow: &[InputRow],
        wrow: &[OperandRow],
        cols: i64,
        inits: &[(Value, &'static str)],
    ) -> Vec<Value> {
        let codes: Vec<CodesRow> = wrow.iter().map(|r| r.codes(f)).collect();
        let w_scale =
            |f: &mut Frame, j: usize, kk: &Value| wrow[j].scale(f, kk).expect("FP8 weights have scales");
        let x_scale =
            |f: &mut Frame, i: usize, kk: &Value| xrow[i].scale(f, kk).expect("FP8 inputs have scales");
        fp8_bf16_blocks(f, (xrow, &x_scale), (&codes, &w_scale), (&self.kvec, cols), inits)
    }

    /// Computes `y_w[m0 + i, n0 + j]` for `i < mr`, `j < nr` and every weight `w`. Accumulator
    /// `(i, w, j)` is number `(i * weights + w) * nr + j`.
    fn block(&self, f: &mut Frame, xrow: &[InputRow], m0: &Value, n0: &Value, nr: usize) {
        let (nw, mr) = (self.weights.len(), xrow.len());
        // Row `j` of weight `w` is number `w * nr + j`.
        let wrow: Vec<OperandRow> = (self.weights.iter())
            .flat_map(|w| (0..nr).map(move |j| (w, j)))
            .map(|(w, j)| operand_row(f, w, n0, j, &self.k))
            .collect();
        let zero_v = f.b.constant("dense<0.0>", VEC);
        let (zero, vl, one) = (f.b.index(0), f.b.index(VL), f.b.index(1));
        let inits: Vec<(Value, &str)> = (0..mr * nr * nw).map(|_| (zero_v.clone(), VEC)).collect();
        let raw_bf16 = xrow.iter().all(|r| matches!(r, InputRow::RawBf16 { .. }));
        let accs = match self.fp8_cols() {
            Some((cols, true)) if raw_bf16 => self.fp8_bf16_block(f, xrow, &wrow, cols, &inits),
            Some((cols, x_raw)) => {
                // An input decoded to scratch is plain f32: only the weights' scales factor out.
                let x_raw = x_raw && xrow.iter().all(|r| matches!(r, InputRow::Operand(_)));
                // FP8 weights: each scale block's products summed on the codes (and, when the
                // input is FP8 in blocks of the same span, on its codes too), then times the
                // scales, as `fp8_blocked_dots` does for one row.
                let (bc, bc1) = (f.b.index(cols), f.b.index(cols - 1));
                let blocks = f.b.addi(&self.kvec, &bc1);
                let blocks = f.b.divui(&blocks, &bc);
                let codes: Vec<CodesRow> = wrow.iter().map(|r| r.codes(f)).collect();
                let n = inits.len();
                let carried = [&inits[..], &nan_inits(f, codes.len())].concat();
                let out = for_carry(f, &zero, &blocks, &one, &carried, |f, b, c| {
                    let (acc, nan) = c.split_at(n);
                    let start = f.b.muli(b, &bc);
                    let end = f.b.addi(&start, &bc);
                    let end = f.b.minui(&end, &self.kvec);
                    let step = |f: &mut Frame, kk: &Value, wv: &[Value], bacc: &[Value]| -> Vec<Value> {
                        let mut next = Vec::with_capacity(mr * nr * nw);
                        for (i, xr) in xrow.iter().enumerate() {
                            let xv = if x_raw { xr.raw_vec_at(f, kk) } else { xr.vec_at(f, kk) };
                            for (j, w) in wv.iter().enumerate() {
                                let a = &bacc[i * nr * nw + j];
                                next.push(f.b.op("acc", format_args!("vector.fma {xv}, {w}, {a} : {VEC}")));
                            }
                        }
                        next
                    };
                    let (block, nan) = fp8_block_sums(f, &codes, (&start, &end), &inits, nan, &step);
                    let two8 = f.b.f32(256.0);
                    let ws: Vec<Value> = (wrow.iter())
                        .map(|r| {
                            let s = r.scale(f, &start).expect("FP8 weights have scales");
                            f.binf("mulf", &s, &two8)
                        })
                        .collect();
                    let mut next = Vec::with_capacity(mr * nr * nw);
                    for (i, xr) in xrow.iter().enumerate() {
                        let xs = match x_raw {
                            true => {
                                let s = xr.scale(f, &start).expect("FP8 inputs have scales");
                                Some(f.binf("mulf", &s, &two8))
                            }
                            false => None,
                        };
                        for (j, w) in ws.iter().enumerate() {
                            let s = match &xs {
                                Some(xs) => f.binf("mulf", xs, w),
                                None => w.clone(),
                            };
                            let sv = f.b.op("sv", format_args!("vector.broadcast {s} : f32 to {VEC}"));
                            let (sum, a) = (&block[i * nr * nw + j], &acc[i * nr * nw + j]);
                            next.push(f.b.op("acc", format_args!("vector.fma {sum}, {sv}, {a} : {VEC}")));
                        }
                    }
                    next.extend(nan);
                    next
                });
                let (acc, nan) = out.split_at(n);
                // A weight row with a NaN code makes every sum it enters NaN.
                let any: Vec<Value> = nan.iter().map(|m| any_nan_code(f, m)).collect();
                (acc.iter().enumerate()).map(|(a, v)| nan_if(f, &any[a % (nr * nw)], v)).collect()
            }
            None => {
                // bf16 input and weights on a CPU with bf16 dot products: 32 columns of K a step,
                // two products summed into each lane; the 16-wide widening loop takes what is left.
                let pairs: Option<(Vec<Bf16Row>, Vec<Bf16Row>)> = match f.has_bf16_dot() {
                    true => (xrow.iter().map(|r| r.bf16_row(f)).collect::<Option<_>>())
                        .zip(wrow.iter().map(|r| r.bf16_row(f)).collect::<Option<_>>()),
                    false => None,
                };
                let (start, inits) = match pairs {
                    Some((xb, wb)) => bf16_dot_block(f, &self.k, &xb, &wb, &inits),
                    None => (zero.clone(), inits),
                };
                for_carry(f, &start, &self.kvec, &vl, &inits, |f, kk, acc| {
                    for r in &wrow {
                        r.prefetch(f, kk);
                    }
                    let wv: Vec<Value> = wrow.iter().map(|r| r.vec_at(f, kk)).collect();
                    let mut next = Vec::with_capacity(mr * nr * nw);
                    for (i, xr) in xrow.iter().enumerate() {
                        let xv = xr.vec_at(f, kk);
                        for (j, w) in wv.iter().enumerate() {
                            let a = &acc[i * nr * nw + j];
                            next.push(f.b.op("acc", format_args!("vector.fma {xv}, {w}, {a} : {VEC}")));
                        }
                    }
                    next
                })
            }
        };
        let sums: Vec<(Value, &str)> = accs
            .iter()
            .map(|a| {
                (
                    f.b.op(
                        "s",
                        format_args!("vector.reduction <add>, {a} fastmath<reassoc> : {VEC} into f32"),
                    ),
                    "f32",
                )
            })
            .collect();
        let totals = for_carry(f, &self.kvec, &self.k, &one, &sums, |f, kk, acc| {
            let ws: Vec<Value> = wrow.iter().map(|r| r.at(f, kk)).collect();
            let mut next = Vec::with_capacity(mr * nr * nw);
            for (i, xr) in xrow.iter().enumerate() {
                let x = xr.at(f, kk);
                for (j, w) in ws.iter().enumerate() {
                    next.push(f.fma(&x, w, &acc[i * nr * nw + j]));
                }
            }
            next
        });
        for i in 0..mr {
            let row = f.b.index(i as i64);
            let m = f.b.addi(m0, &row);
            let base = f.b.muli(&m, &self.n);
            for j in 0..nr {
                let col = f.b.index(j as i64);
                let c = f.b.addi(n0, &col);
                let idx = f.b.addi(&base, &c);
                let ys: Vec<Value> = (0..nw).map(|w| totals[(i * nw + w) * nr + j].clone()).collect();
                (self.store)(f, &idx, &ys);
            }
        }
    }
}

/// A row of bf16 values as the bf16 dot products read it: element `kk` is at `start + kk` of
/// `view`.
struct Bf16Row {
    view: Value,
    memref: String,
    start: Value,
}

impl Bf16Row {
    /// Elements `kk .. kk + 32`, as they are stored.
    fn load(&self, f: &mut Frame, kk: &Value) -> Value {
        let at = f.b.addi(&self.start, kk);
        let (view, memref) = (&self.view, &self.memref);
        f.b.op("bv", format_args!("vector.load {view}[{at}] : {memref}, {BF16_PAIRS}"))
    }

    /// Asks for the elements [`PREFETCH_BYTES`] past `kk`.
    fn prefetch(&self, f: &mut Frame, kk: &Value) {
        let at = f.b.addi(&self.start, kk);
        f.prefetch_ahead(&self.view, &self.memref, 2, &at);
    }
}

/// The part of a register block's dot products that bf16 dot products compute: columns `0 ..
/// K - K % 32` of K for input rows `xs` and weight rows `ws`, accumulator `i * ws.len() + j` for
/// input row `i` and weight row `j`, from `inits`. Returns where the 16-wide loop takes over, and
/// the accumulators to carry on with.
fn bf16_dot_block(
    f: &mut Frame,
    k: &Value,
    xs: &[Bf16Row],
    ws: &[Bf16Row],
    inits: &[(Value, &'static str)],
) -> (Value, Vec<(Value, &'static str)>) {
    let (zero, step) = (f.b.index(0), f.b.index(2 * VL));
    let q = f.b.divui(k, &step);
    let k2 = f.b.muli(&q, &step);
    let acc = for_carry(f, &zero, &k2, &step, inits, |f, kk, acc| {
        for r in ws {
            r.prefetch(f, kk);
        }
        let wv: Vec<Value> = ws.iter().map(|r| r.load(f, kk)).collect();
        let mut next = Vec::with_capacity(acc.len());
        for (i, xr) in xs.iter().enumerate() {
            let xv = xr.load(f, kk);
            for (j, w) in wv.iter().enumerate() {
                next.push(f.bf16_dot(&acc[i * ws.len() + j], &xv, w));
            }
        }
        next
    });
    (k2, acc.into_iter().map(|a| (a, VEC)).collect())
}

/// A scale of an FP8 row of a GEMM: `(frame, row, column)` to the scale of the row's block there.
type RowScale<'a> = &'a dyn Fn(&mut Frame, usize, &Value) -> Value;

/// The FP8 blocked dot products of input rows `xs` ([`InputRow::RawBf16`]: codes as bf16 values,
/// scales apart) with weight rows `ws` over K `0 .. kvec` (a multiple of 64) in scale blocks of
/// `cols` columns (a multiple of 64): per block, 64 columns a step, each weight row's codes decoded
/// to bf16 by table ([`Frame::f8_to_bf16_64`]) and multiplied with the input's values by
/// `vdpbf16ps`; then each block's sums times the input's and the weight's scales into the running
/// sums, accumulator `i * ws.len() + j` for input row `i` and weight row `j`, from `inits`. E4M3
/// values are bf16 values and their products are exact in f32 (and at least 2^-18 in magnitude,
/// never flushed as subnormal), so this is the f16 decode's arithmetic but for the order of the
/// sums; NaN codes decode to NaN.
fn fp8_bf16_blocks(
    f: &mut Frame,
    (xs, x_scale): (&[InputRow], RowScale),
    (ws, w_scale): (&[CodesRow], RowScale),
    (kvec, cols): (&Value, i64),
    inits: &[(Value, &'static str)],
) -> Vec<Value> {
    let (zero, one, span) = (f.b.index(0), f.b.index(1), f.b.index(NAN_SPAN));
    let (bc, bc1) = (f.b.index(cols), f.b.index(cols - 1));
    let blocks = f.b.addi(kvec, &bc1);
    let blocks = f.b.divui(&blocks, &bc);
    let rows: Vec<(Value, String, Value)> = xs
        .iter()
        .map(|r| match r {
            InputRow::RawBf16 { view, memref, start, .. } => (view.clone(), memref.clone(), start.clone()),
            _ => unreachable!("fp8_bf16_blocks takes bf16 rows"),
        })
        .collect();
    let nw = ws.len();
    for_carry(f, &zero, &blocks, &one, inits, |f, b, acc| {
        let start = f.b.muli(b, &bc);
        let end = f.b.addi(&start, &bc);
        let end = f.b.minui(&end, kvec);
        let block = for_carry(f, &start, &end, &span, inits, |f, kk, bacc| {
            for c in ws {
                c.prefetch(f, kk);
            }
            let wv: Vec<[Value; 2]> = ws.iter().map(|c| c.load_bf16_64(f, kk)).collect();
            let c32 = f.b.index(2 * VL);
            let kk32 = f.b.addi(kk, &c32);
            let mut next = Vec::with_capacity(bacc.len());
            for (i, (view, memref, xstart)) in rows.iter().enumerate() {
                let (a0, a1) = (f.b.addi(xstart, kk), f.b.addi(xstart, &kk32));
                let x0 = f.b.op("bv", format_args!("vector.load {view}[{a0}] : {memref}, {BF16_PAIRS}"));
                let x1 = f.b.op("bv", format_args!("vector.load {view}[{a1}] : {memref}, {BF16_PAIRS}"));
                for (j, [w0, w1]) in wv.iter().enumerate() {
                    let a = f.bf16_dot(&bacc[i * nw + j], &x0, w0);
                    next.push(f.bf16_dot(&a, &x1, w1));
                }
            }
            next
        });
        let wscales: Vec<Value> = (0..nw).map(|j| w_scale(f, j, &start)).collect();
        let mut next = Vec::with_capacity(acc.len());
        for i in 0..rows.len() {
            let xs = x_scale(f, i, &start);
            for (j, w) in wscales.iter().enumerate() {
                let s = f.binf("mulf", &xs, w);
                let sv = f.b.op("sv", format_args!("vector.broadcast {s} : f32 to {VEC}"));
                let (sum, a) = (&block[i * nw + j], &acc[i * nw + j]);
                next.push(f.b.op("acc", format_args!("vector.fma {sum}, {sv}, {a} : {VEC}")));
            }
        }
        next
    })
}

/// Whether an FP8 GEMM with input `x` and weights whose scale blocks span `cols` columns can take
/// [`fp8_bf16_blocks`]: `x` FP8 in blocks of the same span, a multiple of 64, a known `K` that is a
/// multiple of 64, and a CPU with bf16 dot products and byte tables.
fn fp8_bf16_applies(f: &Frame, x: &Operand, cols: Option<i64>, kn: Option<u64>) -> bool {
    let features = crate::codegen::cpu::host_features();
    let same =
        matches!((x, cols), (Operand::Fp8 { cols: c, .. }, Some(w)) if *c as i64 == w && w % NAN_SPAN == 0);
    f.target == Target::Cpu
        && features.bf16_dot
        && features.byte_permute
        && same
        && kn.is_some_and(|k| k > 0 && k % NAN_SPAN as u64 == 0)
}

/// 32 bf16 values: the operands of one `vdpbf16ps`.
const BF16_PAIRS: &str = "vector<32xbf16>";

impl OperandRow {
    /// The row as a [`Bf16Row`] when it is a plain bf16 buffer.
    fn bf16_row(&self, f: &Frame) -> Option<Bf16Row> {
        let Operand::Plain(b) = self.op else { return None };
        (f.bufs[b].ty.dtype == DType::BF16).then(|| Bf16Row {
            view: f.bufs[b].view.clone(),
            memref: f.bufs[b].memref.clone(),
            start: self.start.clone(),
        })
    }
}

impl InputRow {
    fn bf16_row(&self, f: &Frame) -> Option<Bf16Row> {
        match self {
            InputRow::Operand(op) => op.bf16_row(f),
            InputRow::Decoded { .. } | InputRow::RawBf16 { .. } => None,
        }
    }
}

impl Frame<'_> {
    /// Whether this kernel may use the CPU's bf16 dot products ([`crate::codegen::cpu::CpuFeatures::bf16_dot`]).
    fn has_bf16_dot(&self) -> bool {
        self.target == Target::Cpu && crate::codegen::cpu::host_features().bf16_dot
    }

    /// `acc + a[2i] * b[2i] + a[2i + 1] * b[2i + 1]` in each lane `i` of `acc` (a
    /// `vector<16xf32>`), for 32 bf16 values `a` and `b`: AVX512_BF16's `vdpbf16ps`. The products
    /// are exact in f32 and added one at a time with f32 rounding, as the widening loop's two
    /// multiply-adds would (the odd product first); the difference is that the instruction reads
    /// subnormal bf16 inputs as zero and flushes subnormal sums, values below 2^-126 that a GEMM's
    /// tolerance covers.
    fn bf16_dot(&mut self, acc: &Value, a: &Value, b: &Value) -> Value {
        self.b.op(
            "acc",
            format_args!(
                "llvm.call_intrinsic \"llvm.x86.avx512bf16.dpbf16ps.512\"({acc}, {a}, {b}) : \
                 ({VEC}, {BF16_PAIRS}, {BF16_PAIRS}) -> {VEC}"
            ),
        )
    }
}

/// Row `start + i` of an operand with `k` columns.
fn operand_row(f: &mut Frame, op: &Operand, start: &Value, i: usize, k: &Value) -> OperandRow {
    let iv = f.b.index(i as i64);
    let r = f.b.addi(start, &iv);
    OperandRow::new(f, op, &r, k)
}

fn gpu_launch(m: Dim, n: Dim, batch: Dim) -> LaunchShape {
    let t = TILE as u64;
    LaunchShape::Gpu {
        grid: [
            GridDim { work: n, per_block: t },
            GridDim { work: m, per_block: t },
            GridDim { work: batch, per_block: 1 },
        ],
        block: [TILE as u32, ROWS as u32, 1],
    }
}

pub(super) fn matmul(f: &mut Frame) -> Result<LaunchShape, LowerError> {
    check_float(f, 0, "matmul")?;
    let a = f.bufs[0].ty.shape.clone();
    let b = f.bufs[1].ty.shape.clone();
    let y = f.result(0).ty.shape.clone();
    let (ra, rb, ry) = (a.len(), b.len(), y.len());
    let batch = y[..ry - 2].iter().try_fold(Dim::known(1), |acc, &d| acc.checked_mul(d));
    let batch = batch.ok_or_else(|| f.unsupported("matmul", "the batch count does not fit a dimension"))?;
    let (md, nd) = (a[ra - 2], b[rb - 1]);
    let m = f.dim(md);
    let n = f.dim(nd);
    let k = f.dim(a[ra - 1]);
    let (a_batch, b_batch, y_batch) = (a[..ra - 2].to_vec(), b[..rb - 2].to_vec(), y[..ry - 2].to_vec());
    // Offsets of the matrices of batch entry `z` in a, b and y.
    let bases = |f: &mut Frame, z: &Value| {
        let mk = f.b.muli(&m, &k);
        let kn = f.b.muli(&k, &n);
        let mn = f.b.muli(&m, &n);
        let za = broadcast_index(f, &a_batch, &y_batch, z);
        let zb = broadcast_index(f, &b_batch, &y_batch, z);
        [f.b.muli(&za, &mk), f.b.muli(&zb, &kn), f.b.muli(z, &mn)]
    };
    Ok(match f.target {
        Target::Cpu => {
            let rows = batch.checked_mul(md).ok_or_else(|| f.unsupported("matmul", "too many rows"))?;
            let (lo, hi) = f.range.clone().expect("CPU frames have a work range");
            let one = f.b.index(1);
            for_loop(f, &lo, &hi, &one, |f, r| {
                let z = f.b.divui(r, &m);
                let row = f.b.remui(r, &m);
                let [ab, bb, _] = bases(f, &z);
                let rk = f.b.muli(&row, &k);
                let a_row = f.b.addi(&ab, &rk);
                let y_row = f.b.muli(r, &n);
                matmul_row_cpu(f, &a_row, &bb, &y_row, &n, &k);
            });
            LaunchShape::Cpu { work: rows }
        }
        Target::Gpu => {
            let z = f.gpu_id("block_id", 'z');
            let [a, b, y] = bases(f, &z);
            let store: Store = &|f, yi, v| f.store(2, yi, &v[0]);
            tiled_gpu(f, (&m, &n, &k), (Operand::Plain(0), &a), &[(Operand::Plain(1), b)], &y, false, store);
            gpu_launch(md, nd, batch)
        }
    })
}

/// Column vectors of a CPU matmul row computed together: independent sums, so that the loop over
/// K is not one chain of dependent multiply-adds (at decode, `q_nope` times the absorbed `W_UK`
/// is one row by K = 64: a single chain ran at the FMA latency, not its throughput).
const MATMUL_NC: i64 = 4;

/// One output row of a CPU matmul: `y[y_row + c] = sum_k a[a_row + k] * b[b_base + k * n + c]`,
/// each sum in the order of `k`.
fn matmul_row_cpu(f: &mut Frame, a_row: &Value, b_base: &Value, y_row: &Value, n: &Value, k: &Value) {
    let (zero, one, vl) = (f.b.index(0), f.b.index(1), f.b.index(VL));
    let q = f.b.divui(n, &vl);
    let nvec = f.b.muli(&q, &vl);
    let wide = f.b.index(VL * MATMUL_NC);
    let q = f.b.divui(n, &wide);
    let nwide = f.b.muli(&q, &wide);
    let zero_v = f.b.constant("dense<0.0>", VEC);
    // `count` column vectors from column `c` on.
    let columns = |f: &mut Frame, c: &Value, count: i64| {
        let inits: Vec<(Value, &str)> = (0..count).map(|_| (zero_v.clone(), VEC)).collect();
        let acc = for_carry(f, &zero, k, &one, &inits, |f, kk, acc| {
            let ai = f.b.addi(a_row, kk);
            let a = f.load(0, &ai);
            let av = f.b.op("av", format_args!("vector.broadcast {a} : f32 to {VEC}"));
            let kn = f.b.muli(kk, n);
            let bk = f.b.addi(b_base, &kn);
            let bk = f.b.addi(&bk, c);
            (0..count)
                .zip(acc)
                .map(|(j, acc)| {
                    let off = f.b.index(j * VL);
                    let bi = f.b.addi(&bk, &off);
                    let bv = f.load_vec(1, &bi);
                    f.b.op("acc", format_args!("vector.fma {av}, {bv}, {acc} : {VEC}"))
                })
                .collect()
        });
        for (j, acc) in (0..count).zip(&acc) {
            let off = f.b.index(j * VL);
            let yi = f.b.addi(y_row, c);
            let yi = f.b.addi(&yi, &off);
            f.store_vec(2, &yi, acc);
        }
    };
    for_loop(f, &zero, &nwide, &wide, |f, c| columns(f, c, MATMUL_NC));
    for_loop(f, &nwide, &nvec, &vl, |f, c| columns(f, c, 1));
    let init = f.b.f32(0.0);
    for_loop(f, &nvec, n, &one, |f, c| {
        let s = for_carry(f, &zero, k, &one, &[(init.clone(), "f32")], |f, kk, acc| {
            let ai = f.b.addi(a_row, kk);
            let a = f.load(0, &ai);
            let kn = f.b.muli(kk, n);
            let bk = f.b.addi(b_base, &kn);
            let bi = f.b.addi(&bk, c);
            let b = f.load(1, &bi);
            vec![f.fma(&a, &b, &acc[0])]
        });
        let yi = f.b.addi(y_row, c);
        f.store(2, &yi, &s[0]);
    });
}

/// The thread's column and row in a GPU tile of `TILE x ROWS` threads: its thread ids, or, in a phase
/// of a phased kernel (a one-dimensional block of the same size), its thread id split in two.
fn tile_threads(f: &mut Frame) -> (Value, Value) {
    if f.virtual_blocks.is_some() {
        let tid = f.gpu_id("thread_id", 'x');
        let tile = f.b.index(TILE);
        return (f.b.remui(&tid, &tile), f.b.divui(&tid, &tile));
    }
    (f.gpu_id("thread_id", 'x'), f.gpu_id("thread_id", 'y'))
}

/// The shared-memory tiled GPU product of one batch entry: `a` (buffer, offset of the entry's
/// matrix) times each of `bs`, sharing the `a` tiles; `y_base` is the offset of the entry's output.
/// `b_transposed` says b is stored `[N, K]` (`linear`) rather than `[K, N]`. `store` gets the output
/// index and one sum per b.
fn tiled_gpu(
    f: &mut Frame,
    (m, n, k): (&Value, &Value, &Value),
    (a, a_base): (Operand, &Value),
    bs: &[(Operand, Value)],
    y_base: &Value,
    b_transposed: bool,
    store: Store,
) {
    let (tx, ty) = tile_threads(f);
    let (bx, by) = (f.gpu_id("block_id", 'x'), f.gpu_id("block_id", 'y'));
    let tile = f.b.index(TILE);
    let pitch = f.b.index(PITCH);
    let n0 = f.b.muli(&bx, &tile);
    let m0 = f.b.muli(&by, &tile);
    let col = f.b.addi(&n0, &tx);
    let (a_tile, a_ty) = f.workgroup("a_tile", "f32", (TILE * PITCH) as u64);
    let b_tiles: Vec<(Value, String)> = (0..bs.len())
        .map(|w| {
            let name = if w == 0 { "b_tile".to_string() } else { format!("b_tile{w}") };
            f.workgroup(&name, "f32", (TILE * PITCH) as u64)
        })
        .collect();
    let nw = bs.len();
    let per_thread = (TILE / ROWS) as usize;
    // Thread row `ty + ROWS * r` of the tile, for each of the thread's rows.
    let rows: Vec<Value> = (0..per_thread)
        .map(|r| {
            let off = f.b.index(ROWS * r as i64);
            f.b.addi(&ty, &off)
        })
        .collect();
    let zero = f.b.index(0);
    let one = f.b.index(1);
    let fzero = f.b.f32(0.0);
    // Accumulator `(r, w)` is number `r * nw + w`.
    let inits: Vec<(Value, &str)> = (0..per_thread * nw).map(|_| (fzero.clone(), "f32")).collect();
    let acc = for_carry(f, &zero, k, &tile, &inits, |f, k0, acc| {
        for row in &rows {
            // a[m0 + row, k0 + tx] -> a_tile[row][tx]
            let gm = f.b.addi(&m0, row);
            let gk = f.b.addi(k0, &tx);
            let v = guarded_load(f, &a, a_base, (&gm, m), (&gk, k), k);
            let at = f.b.muli(row, &pitch);
            let at = f.b.addi(&at, &tx);
            f.b.line(format_args!("memref.store {v}, {a_tile}[{at}] : {a_ty}"));
            for ((b, b_base), (b_tile, b_ty)) in bs.iter().zip(&b_tiles) {
                if b_transposed {
                    // w[n0 + row, k0 + tx] -> b_tile[tx][row]
                    let gn = f.b.addi(&n0, row);
                    let v = guarded_load(f, b, b_base, (&gn, n), (&gk, k), k);
                    let bt = f.b.muli(&tx, &pitch);
                    let bt = f.b.addi(&bt, row);
                    f.b.line(format_args!("memref.store {v}, {b_tile}[{bt}] : {b_ty}"));
                } else {
                    // b[k0 + row, n0 + tx] -> b_tile[row][tx]
                    let gk = f.b.addi(k0, row);
                    let v = guarded_load(f, b, b_base, (&gk, k), (&col, n), n);
                    f.b.line(format_args!("memref.store {v}, {b_tile}[{at}] : {b_ty}"));
                }
            }
        }
        f.b.line("gpu.barrier");
        let next = for_carry(f, &zero, &tile, &one, &inits_of(acc), |f, kk, acc| {
            let bi = f.b.muli(kk, &pitch);
            let bi = f.b.addi(&bi, &tx);
            let bv: Vec<Value> = b_tiles
                .iter()
                .map(|(b_tile, b_ty)| f.b.op("b", format_args!("memref.load {b_tile}[{bi}] : {b_ty}")))
                .collect();
            let mut next = Vec::with_capacity(acc.len());
            for (r, row) in rows.iter().enumerate() {
                let ai = f.b.muli(row, &pitch);
                let ai = f.b.addi(&ai, kk);
                let av = f.b.op("a", format_args!("memref.load {a_tile}[{ai}] : {a_ty}"));
                for (w, b) in bv.iter().enumerate() {
                    next.push(f.fma(&av, b, &acc[r * nw + w]));
                }
            }
            next
        });
        f.b.line("gpu.barrier");
        next
    });
    let col_ok = f.b.op("p", format_args!("arith.cmpi ult, {col}, {n} : index"));
    for (r, row) in rows.iter().enumerate() {
        let gm = f.b.addi(&m0, row);
        let row_ok = f.b.op("p", format_args!("arith.cmpi ult, {gm}, {m} : index"));
        let ok = f.b.op("p", format_args!("arith.andi {row_ok}, {col_ok} : i1"));
        if_then(f, &ok, |f| {
            let yi = f.b.muli(&gm, n);
            let yi = f.b.addi(&yi, &col);
            let yi = f.b.addi(y_base, &yi);
            store(f, &yi, &acc[r * nw..(r + 1) * nw]);
        });
    }
}

fn inits_of(values: &[Value]) -> Vec<(Value, &'static str)> {
    values.iter().map(|v| (v.clone(), "f32")).collect()
}

/// Element `(r, c)` of a row-major matrix with row stride `stride` at `base` in buffer `buf`, or 0
/// when `r >= rows` or `c >= cols`.
fn guarded_load(
    f: &mut Frame,
    op: &Operand,
    base: &Value,
    (r, rows): (&Value, &Value),
    (c, cols): (&Value, &Value),
    stride: &Value,
) -> Value {
    let r_ok = f.b.op("p", format_args!("arith.cmpi ult, {r}, {rows} : index"));
    let c_ok = f.b.op("p", format_args!("arith.cmpi ult, {c}, {cols} : index"));
    let ok = f.b.op("p", format_args!("arith.andi {r_ok}, {c_ok} : i1"));
    match op {
        Operand::Plain(buf) => {
            let idx = f.b.muli(r, stride);
            let idx = f.b.addi(&idx, c);
            let idx = f.b.addi(base, &idx);
            if_else(f, &ok, "f32", |f| f.load(*buf, &idx), |f| f.b.f32(0.0))
        }
        // FP8 operands are linear's (`base` 0, rows of `stride` = K elements).
        Operand::Fp8 { .. } => if_else(
            f,
            &ok,
            "f32",
            |f| {
                let row = OperandRow::new(f, op, r, stride);
                row.at(f, c)
            },
            |f| f.b.f32(0.0),
        ),
    }
}
