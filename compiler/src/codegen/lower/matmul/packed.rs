//! The packed path of the CPU `linear`: where the input and every weight are bf16 (on a host with
//! AVX512_BF16; without it widened to f32, [`Elem::Bf16Wide`]) or all f32, or all FP8 in scale
//! blocks on a host with AMX ([`Elem::Fp8`]) or without AVX-512 (decoded to f32,
//! [`Elem::Fp8Wide`]), and the GEMM has enough rows ([`Elem::min_rows`]: 64 in bf16, 128 in f32,
//! 24 in any of them without AVX-512, 8 on AMX), each thread packs the column
//! panels it works on into the micro-kernel's layout, then runs an outer-product micro-kernel over
//! them.
//!
//! The dot-product blocks of [`super::Gemv::block`] read both operands along `K` and finish every
//! output with a horizontal sum; on a square GEMM they reached about 60% of oneDNN in bf16. Here,
//! as in GotoBLAS and oneDNN, the output tile stays in registers and is never reduced across lanes:
//!
//! - **Packing.** Columns `ks .. ke` of panel `p .. p + 64` of each weight are copied to stack
//!   scratch laid out for the loads of the micro-kernel: per `K` column (f32) or pair of columns
//!   (bf16, `vdpbf16ps`'s pairs), the 64 weight rows' values side by side in four vectors. Each
//!   16 x 16 tile of 32-bit lanes is transposed in registers by four stages of two-source shuffles
//!   ([`transpose16`]). Rows past the panel's end (a last panel narrower than 64) are packed as
//!   copies of its last row; their outputs are never stored.
//! - **Micro-kernel.** `mr` rows of `x` by the panel's 64 columns, for each weight: per step of `K`,
//!   one broadcast of each row's input (a bf16 pair as one 32-bit lane), then for each packed
//!   weight vector `mr` `vdpbf16ps` or `vector.fma` into `mr * 4` accumulators (lane `l` of
//!   accumulator `(i, w, v)` is output column `16 v + l` of row `i` for weight `w`): 6 rows with
//!   one weight, 3 with a gate/up pair, 24 accumulators either way. Without AVX-512 (AVX2's 16
//!   registers of 8 lanes) a register block holds one 16-column vector of the panel instead of
//!   four, 6 accumulators (12 registers): 6 or 3 rows sweep the packed panel once per vector.
//! - **Chunks of `K`.** The packed chunk is at most [`PACK_BYTES`] of stack. A longer `K` is taken
//!   in chunks, rows in passes of [`CHUNK_ROWS`]: between chunks a pass's partial sums wait in f32
//!   scratch, exactly (each output's sum runs through `K` in one order whatever the chunks).
//! - **Stores.** A plain `linear` into a buffer stores whole vectors where the panel is full; a
//!   fused epilogue reads each output element's sums back from a tile in scratch.
//!
//! Packing costs about half a cycle per 32-bit lane, once per panel and thread, so the path is
//! taken where the GEMM has at least [`Elem::min_rows`] rows (long prefills, training); shorter
//! prompts and a decode step's GEMV keep the dot-product blocks. The choice is made on the GEMM's rows, not on a thread's share
//! of them: the two paths sum in different orders, and a result must not depend on how the work is
//! split over threads.
//!
//! Each output sums the same exact products (f32 ones, or bf16 ones two at a time) as the
//! dot-product blocks, in order along `K`: reassociated against the interpreter as every CPU GEMM
//! is.

mod amx;

use super::{Operand, Store, BF16_PAIRS, NB, VEC, VL};
use crate::codegen::lower::{Frame, Target};
use crate::codegen::mlir::{for_carry, for_loop, if_then_else, Value};
use kiln_ir::DType;

/// The most scratch the packed panels of one chunk of `K` take, all weights together: the first
/// 2 MiB of the thread scratch ([`Frame::thread_scratch`]); the partial sums between chunks take
/// the rest (256 KiB).
const PACK_BYTES: u64 = 2 << 20;
/// Rows per pass over the chunks of `K` when `K` takes more than one: their partial sums wait in
/// f32 scratch between chunks (`CHUNK_ROWS x 64` per weight), and each chunk is packed once per
/// pass.
const CHUNK_ROWS: i64 = 240;
/// The fewest rows of a bf16 GEMM for the packed path when its micro-kernel is AMX's: where it
/// passed the dot-product blocks in `kiln bench gemm --rows M` at N = K = 1024 and 4096 (2
/// threads, 2026-12-06, Xeon with AMX): 4 rows 127/92 GFLOP/s against 130/138, 6 level, 8
/// 258/198 against 194/173, 16 465/325 against 174/173.
const AMX_MIN_ROWS: i64 = 8;
/// Accumulators per micro-kernel (of AVX-512's 32 vector registers; the rest hold the packed
/// weights and the broadcast input).
const ACCS: usize = 24;
/// Accumulators per micro-kernel without AVX-512: each 16-lane vector is two of AVX2's 16
/// registers, so 6 of them take 12, beside a packed weight vector (2) and a broadcast input (1).
/// Written for AVX-512's 24, LLVM spilled most of them: f32 GEMMs at N = K = 2048 ran at 64
/// GFLOP/s on a 2-core AVX2 EPYC where the matrixmultiply crate reached 127.
const ACCS_AVX2: usize = 6;
/// Vectors of 16 columns per panel.
const NV: usize = (NB / VL) as usize;
const _: () = assert!(NB == 64 && NV == 4, "the packed layout is written for 64-column panels");
const _: () = assert!(CHUNK_ROWS % 6 == 0 && CHUNK_ROWS % 3 == 0, "chunks hold whole row blocks");
/// 16 lanes of 32 bits, as the transposes move them.
const LANES_I32: &str = "vector<16xi32>";

/// The element type of a packed GEMM: both operands bf16 (pairs of `K` columns per 32-bit lane,
/// summed by `vdpbf16ps`), or both f32 (one column per lane, `vector.fma`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Elem {
    Bf16,
    F32,
    /// FP8 E4M3 input and weights in scale blocks (DeepSeek-V3's 1 x 128 and 128 x 128), on a host
    /// with AMX only: codes decoded to their exact bf16 values as they are packed, each scale
    /// block's products summed in the tiles, then times the block's scales in f32
    /// ([`amx`]'s FP8 blocks).
    Fp8,
    /// Both operands bf16 on a host without AVX512_BF16: the weights are widened to f32 as they are
    /// packed and a register block's input rows once per sweep (into the scratch after the packed
    /// panels, [`WIDE_X_OFFSET`]), then the f32 micro-kernel runs. A product of two
    /// bf16 values is exact in f32, so this sums the same products as the widening dot-product
    /// blocks, in `K`'s order.
    Bf16Wide,
    /// FP8 E4M3 input and weights in scale blocks on a host without AVX-512 (and so without AMX):
    /// each weight code is decoded and times its block's scale as it is packed, and a register
    /// block's input rows likewise once per sweep, into f32 (each value rounded once, exactly the
    /// interpreter's `dequantize` to f32); then the f32 micro-kernel runs, so the sums are the
    /// interpreter's `linear` of the dequantised operands, in `K`'s order. The dot-product blocks
    /// decode every weight code once per register block of input rows instead, at about 55
    /// GFLOP/s on a 2-core AVX2 EPYC whatever the rows.
    Fp8Wide,
}

impl Elem {
    /// Whether the micro-kernel is AMX's tiles ([`amx`]): bf16 on a host that has them.
    pub(super) fn amx(self) -> bool {
        matches!(self, Elem::Bf16 | Elem::Fp8) && crate::codegen::cpu::host_features().amx
    }

    /// Rows per pass over the chunks of `K` when `K` takes several.
    fn chunk_rows(self) -> i64 {
        if self.amx() {
            amx::CHUNK_ROWS
        } else {
            CHUNK_ROWS
        }
    }

    /// `K` columns per 32-bit lane.
    fn per(self) -> i64 {
        match self {
            Elem::Bf16 | Elem::Fp8 => 2,
            Elem::F32 | Elem::Bf16Wide | Elem::Fp8Wide => 1,
        }
    }

    /// Bytes of a packed value (FP8 codes are packed decoded, as bf16 or f32).
    fn bytes(self) -> u64 {
        match self {
            Elem::Bf16 | Elem::Fp8 => 2,
            Elem::F32 | Elem::Bf16Wide | Elem::Fp8Wide => 4,
        }
    }

    /// The packed panels' element type.
    fn name(self) -> &'static str {
        match self {
            Elem::Bf16 | Elem::Fp8 => "bf16",
            Elem::F32 | Elem::Bf16Wide | Elem::Fp8Wide => "f32",
        }
    }

    /// 16 lanes of the packed element: `vector<32xbf16>` or `vector<16xf32>`.
    fn vec(self) -> &'static str {
        match self {
            Elem::Bf16 | Elem::Fp8 => BF16_PAIRS,
            Elem::F32 | Elem::Bf16Wide | Elem::Fp8Wide => VEC,
        }
    }

    /// Whether the micro-kernel's input rows are widened or decoded to f32 in scratch first
    /// ([`WIDE_X_OFFSET`]).
    fn wide(self) -> bool {
        matches!(self, Elem::Bf16Wide | Elem::Fp8Wide)
    }

    /// `K` columns per transposed tile: 16 lanes.
    fn tile(self) -> u64 {
        (VL * self.per()) as u64
    }

    /// The fewest rows of a GEMM for packing to pay, measured with `kiln bench gemm --rows M` at
    /// N = K = 1024 against `KILN_NO_PACKED_GEMM=1` (2 threads, 2026-12-05): bf16 was level at 48-64
    /// rows (about 500 GFLOP/s either way) and ahead from 80 (590-605 against 535-558); f32 was
    /// level at 128-256 and ahead from 384 (461 against 327). A prefill of 128 tokens ran the f32
    /// model's projections (K down to 256, where the dot products' horizontal sums weigh more)
    /// faster packed, hence 128 for f32.
    fn min_rows(self) -> i64 {
        match self {
            Elem::Bf16 | Elem::Fp8 if self.amx() => AMX_MIN_ROWS,
            Elem::Bf16 | Elem::Fp8 => 64,
            // Without AVX-512 the dot-product blocks stay near 65 GFLOP/s and the packed path
            // (AVX2's register blocks) passes them from 24 rows: at N = K = 1024 and 4096 (2
            // threads, AVX2 EPYC, 2026-12-07), 16 rows 80/58 against 67/63 GFLOP/s, 24 rows
            // 127/92 against 68/65, 48 rows 151/116 against 67/66. Widened bf16 the same day at
            // 1024: 24 rows 116 against 65, 512 rows 122-157 against 65-73.
            Elem::F32 | Elem::Bf16Wide | Elem::Fp8Wide if !crate::codegen::cpu::host_features().avx512 => 24,
            Elem::F32 | Elem::Bf16Wide | Elem::Fp8Wide => 128,
        }
    }
}

/// The packed path's element type for a `linear` of input `x`, `weights` and `K = kn`, where it
/// applies: one element type for all, a plain buffer each (bf16 on a host with bf16 dot products,
/// or f32), `K` known and a multiple of a tile (32 bf16 or 16 f32 columns), and one or two weights.
pub(super) fn applies(f: &Frame, x: &Operand, weights: &[Operand], kn: Option<u64>) -> Option<Elem> {
    if let Operand::Fp8 { .. } = x {
        if fp8_applies(f, x, weights, kn) {
            return Some(Elem::Fp8);
        }
        return fp8_wide_applies(f, x, weights, kn).then_some(Elem::Fp8Wide);
    }
    let elem = |op: &Operand| match *op {
        Operand::Plain(b) => match f.bufs[b].ty.dtype {
            DType::BF16 if f.has_bf16_dot() => Some(Elem::Bf16),
            DType::BF16 => Some(Elem::Bf16Wide),
            DType::F32 => Some(Elem::F32),
            _ => None,
        },
        Operand::Fp8 { .. } => None,
    };
    let e = elem(x)?;
    let kn = kn?;
    let fits = f.target == Target::Cpu
        && crate::codegen::cpu::host_features().packed_gemm
        && weights.iter().all(|w| elem(w) == Some(e))
        && (1..=2).contains(&weights.len())
        && kn > 0
        && kn % e.tile() == 0;
    fits.then_some(e)
}

/// Where an FP8 `linear` takes AMX's tiles ([`Elem::Fp8`]): a host with AMX, AVX512_BF16 and
/// byte permutes (the codes are decoded 64 at a time by table, [`Frame::f8_to_bf16_64`]); an FP8
/// input in 1 x `cols` tiles and one or two FP8 weights in `rows x cols` blocks, `cols` a multiple
/// of 64 and `rows` of 32 (so a 32-column half of a panel has one weight scale per block of `K`),
/// and a known `K` that is a whole number of blocks.
fn fp8_applies(f: &Frame, x: &Operand, weights: &[Operand], kn: Option<u64>) -> bool {
    let features = crate::codegen::cpu::host_features();
    let Operand::Fp8 { rows: 1, cols, .. } = *x else { return false };
    let same = weights
        .iter()
        .all(|w| matches!(*w, Operand::Fp8 { rows, cols: c, .. } if c == cols && rows > 0 && rows % 32 == 0));
    f.target == Target::Cpu
        && features.packed_gemm
        && features.bf16_dot
        && features.byte_permute
        && Elem::Fp8.amx()
        && same
        && (1..=2).contains(&weights.len())
        && cols > 0
        && cols % 64 == 0
        && cols <= 1024
        && kn.is_some_and(|k| k > 0 && k % cols == 0)
}

/// Where an FP8 `linear` takes the f32 micro-kernel on decoded values ([`Elem::Fp8Wide`]): a host
/// without AVX-512 (with it, the dot-product blocks decode by table into `vdpbf16ps` where the host
/// has those, and were faster: `kiln bench gemm --dtype fp8 --rows 128|512` at 1024 and 2048 made
/// 215-223 GFLOP/s against this path's 196-209 on a 2-core Zen 4, 2026-12-07); an FP8 input in 1 x `cols` tiles and one or two
/// FP8 weights in blocks of the same `rows x cols` (`cols` a multiple of 16, as every FP8 operand
/// of a CPU GEMM has: a vector of 16 codes has one scale), and a known `K` that is a multiple of 16
/// (ragged scale blocks at the edges are fine).
fn fp8_wide_applies(f: &Frame, x: &Operand, weights: &[Operand], kn: Option<u64>) -> bool {
    let features = crate::codegen::cpu::host_features();
    let Operand::Fp8 { rows: 1, cols, .. } = *x else { return false };
    let Some(Operand::Fp8 { rows, .. }) = weights.first() else { return false };
    let same = weights
        .iter()
        .all(|w| matches!(*w, Operand::Fp8 { rows: r, cols: c, .. } if c == cols && r == *rows));
    f.target == Target::Cpu
        && features.packed_gemm
        && !features.avx512
        && same
        && *rows > 0
        && (1..=2).contains(&weights.len())
        && cols > 0
        && cols % VL as u64 == 0
        && kn.is_some_and(|k| k > 0 && k % VL as u64 == 0)
}

pub(super) use amx::{grouped_rows, GroupedFp8};

/// Where a CPU `grouped_linear` takes AMX's tiles ([`grouped_rows`]): on a host with them, the
/// input and every expert's weights plain bf16 buffers, one or two weights, `N` a multiple of 32
/// and `K` of 32 (the input's rows packed for a block fit the thread scratch). The input's buffer
/// and `K`.
pub(super) fn grouped_applies(
    f: &Frame,
    x: &Operand,
    weights: &[Vec<Operand>],
    n: kiln_ir::Dim,
    kn: Option<u64>,
) -> Option<(usize, u64)> {
    if let Operand::Fp8 { codes, .. } = *x {
        // FP8 (the same conditions as a `linear`'s, `fp8_applies`), N a multiple of 32, and the
        // block of input rows and of an expert's weight rows, both decoded, within the scratch.
        let kn = kn.filter(|&k| 2 * 32 * k * 2 <= PACK_BYTES)?;
        let first: Vec<Operand> = weights.iter().map(|ws| ws[0].clone()).collect();
        let fits = fp8_applies(f, x, &first, Some(kn))
            && weights.iter().flatten().all(|w| matches!(*w, Operand::Fp8 { .. }))
            && n.as_known().is_some_and(|n| n > 0 && n % 32 == 0);
        return fits.then_some((codes, kn));
    }
    let bf16 = |op: &Operand| matches!(*op, Operand::Plain(b) if f.bufs[b].ty.dtype == DType::BF16);
    let kn = kn.filter(|&k| k > 0 && k % 32 == 0 && 32 * k * 2 <= PACK_BYTES)?;
    let fits = f.target == Target::Cpu
        && Elem::Bf16.amx()
        && f.has_bf16_dot()
        && bf16(x)
        && (1..=2).contains(&weights.len())
        && weights.iter().flatten().all(bf16)
        && n.as_known().is_some_and(|n| n > 0 && n % 32 == 0);
    fits.then(|| (buffer(x), kn))
}

/// The buffer behind an operand: a plain one's, or an FP8 one's codes.
fn buffer(op: &Operand) -> usize {
    match *op {
        Operand::Plain(b) => b,
        Operand::Fp8 { codes, .. } => codes,
    }
}

/// The scale blocks of an FP8 GEMM on the packed path ([`Elem::Fp8`]): the input's scales
/// (`[M, K / cols]`), each weight's (`[N / rows, K / cols]`), and the blocks' shape.
pub(super) struct Fp8Scales {
    pub x: usize,
    pub w: Vec<usize>,
    pub cols: i64,
    pub rows: i64,
}

impl Fp8Scales {
    fn of(x: &Operand, weights: &[Operand]) -> Option<Fp8Scales> {
        let Operand::Fp8 { scales: xs, cols, .. } = *x else { return None };
        let mut w = Vec::new();
        let mut rows = 0;
        for op in weights {
            let Operand::Fp8 { scales, rows: r, .. } = *op else { return None };
            w.push(scales);
            rows = r as i64;
        }
        Some(Fp8Scales { x: xs, w, cols: cols as i64, rows })
    }
}

/// Where [`Elem::Bf16Wide`]'s block of input rows, widened to f32, waits in the thread scratch: the
/// last quarter of the packed panels' room (a block of at most 6 rows, of a chunk of `K` of at most
/// 6144 columns: 144 KiB of 512).
const WIDE_X_OFFSET: u64 = PACK_BYTES / 4 * 3;

/// Where an FP8 GEMM's block of input rows, decoded to bf16, waits in the thread scratch: the last
/// quarter of the packed panels' room, which FP8's panels leave free.
const FP8_X_OFFSET: u64 = PACK_BYTES / 4 * 3;
/// The most columns of `K` in one chunk of an FP8 GEMM: its block of 32 decoded input rows fills
/// the room from [`FP8_X_OFFSET`].
const FP8_MAX_KC: u64 = (PACK_BYTES - FP8_X_OFFSET) / (32 * 2);

/// The rows `r_lo .. r_hi` of the columns `p .. p_end` of `y_w = x @ w^T` for each weight: one
/// panel of at most 64 columns, or on AMX up to [`amx::panels`] of them; `K = kn` columns of `x`
/// (`k` its value); each output's sums go to `store`, or for a plain `linear` (`direct`, the output
/// buffer) straight to the buffer.
#[allow(clippy::too_many_arguments)]
pub(super) fn panel(
    f: &mut Frame,
    elem: Elem,
    (x, weights): (&Operand, &[Operand]),
    (n, k, kn): (&Value, &Value, u64),
    (p, p_end): (&Value, &Value),
    (r_lo, r_hi): (&Value, &Value),
    store: Store,
    direct: Option<usize>,
) {
    let nw = weights.len();
    let wbufs: Vec<usize> = weights.iter().map(buffer).collect();
    let amx = elem.amx();
    let group = if amx { amx::panels(nw, kn) } else { 1 };
    // The chunk of K: as many tiles as fit the scratch (for FP8, in its first three quarters, in
    // whole scale blocks, and at most as many as the decoded input rows' room holds).
    let per_tile = (nw * group) as u64 * NB as u64 * elem.tile() * elem.bytes();
    let fp8 = match elem {
        Elem::Fp8 | Elem::Fp8Wide => Fp8Scales::of(x, weights),
        _ => None,
    };
    let kc = match &fp8 {
        // Fp8Wide: as Bf16Wide.
        Some(_) if elem.wide() => (WIDE_X_OFFSET / per_tile).max(1) * elem.tile(),
        Some(s) => {
            let fit = (FP8_X_OFFSET / per_tile).max(1) * elem.tile();
            let cols = s.cols as u64;
            (fit.min(FP8_MAX_KC) / cols).max(1) * cols
        }
        // Bf16Wide: the packed panels in the first three quarters, the widened rows after them.
        None if elem == Elem::Bf16Wide => (WIDE_X_OFFSET / per_tile).max(1) * elem.tile(),
        None => (PACK_BYTES / per_tile).max(1) * elem.tile(),
    }
    .min(kn);
    let chunks = kn.div_ceil(kc);
    let slots = (nw * group) as u64;
    let (view, memref) = f.thread_scratch(0, elem.name(), slots * NB as u64 * kc);
    let scratch = Scratch { view, memref, kc };
    // A register block holds all four vectors of a panel's row on AVX-512, one (16 columns) on
    // AVX2, which then sweeps the panel's packed columns once per vector.
    let (nv, accs) = match crate::codegen::cpu::host_features().avx512 {
        true => (NV, ACCS),
        false => (1, ACCS_AVX2),
    };
    let mr = (accs / (nv * nw)).max(1);
    let wide_x = elem.wide().then(|| f.thread_scratch(WIDE_X_OFFSET, "f32", mr as u64 * kc));
    let nb = f.b.index(NB);
    let cols = f.b.subi(p_end, p);
    let panels = f.b.index(NB - 1);
    let panels = f.b.addi(&cols, &panels);
    let panels = f.b.divui(&panels, &nb);
    let kernel = Kernel {
        elem,
        fp8,
        x: buffer(x),
        nw,
        mr,
        nv,
        n,
        k,
        scratch: &scratch,
        p,
        p_end,
        group: group as i64,
        panels: &panels,
        wide_x,
        store,
        direct,
    };
    let zero = f.b.index(0);
    let kn_v = f.b.index(kn as i64);
    let pack_all = |f: &mut Frame, (ks, ke): (&Value, &Value)| {
        for (w, &b) in wbufs.iter().enumerate() {
            let (view, memref) = (f.bufs[b].view.clone(), f.bufs[b].memref.clone());
            let scales = kernel.fp8.as_ref().map(|s| s.w[w]);
            let w = f.b.index(w as i64);
            kernel.pack_group(f, (&view, &memref), &w, scales, (ks, ke));
        }
    };
    if chunks == 1 {
        pack_all(f, (&zero, &kn_v));
        kernel.blocks(f, (r_lo, r_hi), &Pass { ks: zero.clone(), ke: kn_v, partial: None });
        return;
    }
    let partial_len = elem.chunk_rows() as u64 * NB as u64 * slots;
    let (cs_view, cs_memref) = f.thread_scratch(PACK_BYTES, "f32", partial_len);
    let (rows_step, one, kc_v) = (f.b.index(elem.chunk_rows()), f.b.index(1), f.b.index(kc as i64));
    let chunks_v = f.b.index(chunks as i64);
    let last_chunk = f.b.index(chunks as i64 - 1);
    for_loop(f, r_lo, r_hi, &rows_step, |f, rc| {
        let rc_end = f.b.addi(rc, &rows_step);
        let rc_end = f.b.minui(&rc_end, r_hi);
        for_loop(f, &zero, &chunks_v, &one, |f, c| {
            let ks = f.b.muli(c, &kc_v);
            let ke = f.b.addi(&ks, &kc_v);
            let ke = f.b.minui(&ke, &kn_v);
            pack_all(f, (&ks, &ke));
            let first = f.b.op("c", format_args!("arith.cmpi eq, {c}, {zero} : index"));
            let last = f.b.op("c", format_args!("arith.cmpi eq, {c}, {last_chunk} : index"));
            let partial =
                Partial { view: cs_view.clone(), memref: cs_memref.clone(), rc: rc.clone(), first, last };
            kernel.blocks(f, (rc, &rc_end), &Pass { ks, ke, partial: Some(partial) });
        });
    });
}

/// The work items `[lo, hi)` of a `linear` of `M = m` rows (item `i` is row `i mod M` of panel
/// `i / M`) on the AMX path: a first panel the range holds only some rows of, the whole panels
/// after it in groups of [`amx::panels`], and a last panel it holds some rows of, each by
/// [`panel`]. A block of rows then sweeps a group's packed panels, read from memory once per group.
#[allow(clippy::too_many_arguments)]
pub(super) fn groups(
    f: &mut Frame,
    elem: Elem,
    ops: (&Operand, &[Operand]),
    (m, n, k, kn): (&Value, &Value, &Value, u64),
    (lo, hi): (&Value, &Value),
    store: Store,
    direct: Option<usize>,
) {
    let group = f.b.index(amx::panels(ops.1.len(), kn) as i64);
    let (zero, one, nb) = (f.b.index(0), f.b.index(1), f.b.index(NB));
    let sel = |f: &mut Frame, c: &Value, a: &Value, b: &Value| {
        f.b.op("g", format_args!("arith.select {c}, {a}, {b} : index"))
    };
    let first = f.b.divui(lo, m);
    let at = f.b.muli(&first, m);
    let r0 = f.b.subi(lo, &at);
    let end = f.b.divui(hi, m);
    let at = f.b.muli(&end, m);
    let r1 = f.b.subi(hi, &at);
    // The segments, each one call of `panel` (one copy of its code): a range within one panel is
    // one segment; otherwise a first panel holding rows `r0 ..` where `r0 > 0`, the groups of
    // whole panels `start .. end`, and a last panel holding rows `.. r1` where `r1 > 0`.
    let within = f.b.op("c", format_args!("arith.cmpi eq, {first}, {end} : index"));
    let head = f.b.op("c", format_args!("arith.cmpi ne, {r0}, {zero} : index"));
    let tail = f.b.op("c", format_args!("arith.cmpi ne, {r1}, {zero} : index"));
    let next = f.b.addi(&first, &one);
    let start = sel(f, &head, &next, &first);
    let whole = f.b.subi(&end, &start);
    let whole = f.b.op("g", format_args!("arith.maxsi {whole}, {zero} : index"));
    let g1 = f.b.subi(&group, &one);
    let groups = f.b.addi(&whole, &g1);
    let groups = f.b.divui(&groups, &group);
    let head_n = f.b.op("g", format_args!("arith.index_castui {head} : i1 to index"));
    let tail_n = f.b.op("g", format_args!("arith.index_castui {tail} : i1 to index"));
    let count = f.b.addi(&head_n, &groups);
    let count = f.b.addi(&count, &tail_n);
    let count = sel(f, &within, &one, &count);
    for_loop(f, &zero, &count, &one, |f, s| {
        // Segment `s` of a range over several panels.
        let is_head = f.b.op("c", format_args!("arith.cmpi eq, {s}, {zero} : index"));
        let is_head = f.b.op("c", format_args!("arith.andi {is_head}, {head} : i1"));
        let last_s = f.b.subi(&count, &one);
        let is_tail = f.b.op("c", format_args!("arith.cmpi eq, {s}, {last_s} : index"));
        let is_tail = f.b.op("c", format_args!("arith.andi {is_tail}, {tail} : i1"));
        let gi = f.b.subi(s, &head_n);
        let a = f.b.muli(&gi, &group);
        let a = f.b.addi(&start, &a);
        let b = f.b.addi(&a, &group);
        let b = f.b.minui(&b, &end);
        let end1 = f.b.addi(&end, &one);
        let (a, b) = (sel(f, &is_tail, &end, &a), sel(f, &is_tail, &end1, &b));
        let (a, b) = (sel(f, &is_head, &first, &a), sel(f, &is_head, &next, &b));
        let r_lo = sel(f, &is_head, &r0, &zero);
        let r_hi = sel(f, &is_tail, &r1, m);
        // A range within one panel: its rows `r0 .. r1`.
        let (a, b) = (sel(f, &within, &first, &a), sel(f, &within, &next, &b));
        let (r_lo, r_hi) = (sel(f, &within, &r0, &r_lo), sel(f, &within, &r1, &r_hi));
        let p = f.b.muli(&a, &nb);
        let p_end = f.b.muli(&b, &nb);
        let p_end = f.b.minui(&p_end, n);
        panel(f, elem, ops, (n, k, kn), (&p, &p_end), (&r_lo, &r_hi), store, direct);
    });
}

/// The packed panels of one chunk of `K` (`kc` columns), one slot per weight and panel (slot
/// `w * group + g` for weight `w`'s panel `g` of the group; `w` where panels are taken one at a
/// time): the slot's lane of column `c` (of 64) for the `K` columns `kk .. kk + per` of the chunk
/// (`kk` relative to its start) is at element `slot * 64 * kc + kk * 64 + per * c`.
struct Scratch {
    view: Value,
    memref: String,
    kc: u64,
}

impl Scratch {
    /// Where slot `slot`'s lanes for the chunk's column `kk` start, plus `offset` elements.
    fn at(&self, f: &mut Frame, slot: &Value, kk: &Value, offset: i64) -> Value {
        let per_k = f.b.index(NB);
        let at = f.b.muli(kk, &per_k);
        let per_slot = f.b.index(NB * self.kc as i64);
        let base = f.b.muli(slot, &per_slot);
        let off = f.b.index(offset);
        let base = f.b.addi(&base, &off);
        f.b.addi(&at, &base)
    }
}

/// One pass of the micro-kernel over the `K` columns `ks .. ke`.
struct Pass {
    ks: Value,
    ke: Value,
    /// When `K` takes several chunks: where the rows' partial sums wait between them.
    partial: Option<Partial>,
}

/// The partial sums of a chunk of rows starting at `rc`: row `rc + i`'s accumulator `(w, v)` at
/// `(i * weights + w) * 64 + 16 v` of `view`; `first` and `last` say whether this is the first
/// and the last chunk of `K`.
struct Partial {
    view: Value,
    memref: String,
    rc: Value,
    first: Value,
    last: Value,
}

impl Partial {
    /// Where row `m`'s partial sum `j` (`w * 4 + v`, for weight `w`'s vector `v`) waits.
    fn at(&self, f: &mut Frame, m: &Value, nw: usize, j: &Value) -> Value {
        let i = f.b.subi(m, &self.rc);
        let row = f.b.index(nw as i64 * NB);
        let at = f.b.muli(&i, &row);
        let vl = f.b.index(VL);
        let off = f.b.muli(j, &vl);
        f.b.addi(&at, &off)
    }
}

/// FP8: 64 codes from column `kk` of the 16 rows `row0 ..` (rows past `last` read `last`; `k`
/// codes a row) decoded to bf16, one decode in a loop over the rows through `dec` (16 x 64 bf16
/// of scratch), then each 32-column half as the 16 rows' lanes of 32 bits, for [`transpose16`].
/// Sixteen decodes written out took LLVM a second more on DeepSeek-V3.
pub(super) fn decode16(
    f: &mut Frame,
    (view, memref): (&Value, &str),
    (row0, last, k, kk): (&Value, &Value, &Value, &Value),
    (dec, dec_ty): (&Value, &str),
) -> [Vec<Value>; 2] {
    let (zero, one, rows, c64, c32) =
        (f.b.index(0), f.b.index(1), f.b.index(16), f.b.index(64), f.b.index(32));
    for_loop(f, &zero, &rows, &one, |f, r| {
        let row = f.b.addi(row0, r);
        let row = f.b.minui(&row, last);
        let at = f.b.muli(&row, k);
        let at = f.b.addi(&at, kk);
        let q = f.b.op("pw", format_args!("vector.load {view}[{at}] : {memref}, vector<64xi8>"));
        let [lo, hi] = f.f8_to_bf16_64(&q);
        let to = f.b.muli(r, &c64);
        let to_hi = f.b.addi(&to, &c32);
        f.b.line(format_args!("vector.store {lo}, {dec}[{to}] : {dec_ty}, {BF16_PAIRS}"));
        f.b.line(format_args!("vector.store {hi}, {dec}[{to_hi}] : {dec_ty}, {BF16_PAIRS}"));
    });
    [0, 1].map(|h| {
        (0..16)
            .map(|r| {
                let at = f.b.index(64 * r + 32 * h);
                let v = f.b.op("pw", format_args!("vector.load {dec}[{at}] : {dec_ty}, {BF16_PAIRS}"));
                f.b.op("pw", format_args!("vector.bitcast {v} : {BF16_PAIRS} to {LANES_I32}"))
            })
            .collect()
    })
}

/// 16 bf16 values as the bits of the f32 values they are (each shifted into the high half of a
/// 32-bit lane): a zero extension and a shift, where `arith.extf` took LLVM's scalar path and
/// packing a bf16 panel cost as much as the micro-kernel over 24 rows.
fn widen_bf16(f: &mut Frame, h: &Value) -> Value {
    let bits = f.b.op("wb", format_args!("vector.bitcast {h} : vector<16xbf16> to vector<16xi16>"));
    let wide = f.b.op("wb", format_args!("arith.extui {bits} : vector<16xi16> to {LANES_I32}"));
    let sixteen = f.b.constant("dense<16>", LANES_I32);
    f.b.op("wb", format_args!("arith.shli {wide}, {sixteen} : {LANES_I32}"))
}

/// The transpose of 16 rows of 16 lanes: lane `c` of output `r` is lane `r` of input `c`. Four
/// stages, each exchanging one bit of the row index with the same bit of the lane index by
/// two-source shuffles of row pairs (one `vpermt2d` each on AVX-512).
fn transpose16(f: &mut Frame, mut rows: Vec<Value>) -> Vec<Value> {
    debug_assert_eq!(rows.len(), VL as usize);
    for b in 0..4 {
        let bit = 1usize << b;
        // Lane `c` of the new low row: `c` of the low row where bit `b` of `c` is clear, else lane
        // `c ^ bit` of the high row; of the new high row: lane `c | bit` of the low row where the
        // bit is clear, else lane `c` of the high row.
        let lo_mask: Vec<String> =
            (0..16).map(|c| if c & bit == 0 { c } else { 16 + (c ^ bit) }).map(|i| i.to_string()).collect();
        let hi_mask: Vec<String> =
            (0..16).map(|c| if c & bit == 0 { c | bit } else { 16 + c }).map(|i| i.to_string()).collect();
        let (lo_mask, hi_mask) = (lo_mask.join(", "), hi_mask.join(", "));
        let mut next = rows.clone();
        for r in (0..16).filter(|r| r & bit == 0) {
            let (a, h) = (&rows[r], &rows[r | bit]);
            next[r] =
                f.b.op("t", format_args!("vector.shuffle {a}, {h} [{lo_mask}] : {LANES_I32}, {LANES_I32}"));
            next[r | bit] =
                f.b.op("t", format_args!("vector.shuffle {a}, {h} [{hi_mask}] : {LANES_I32}, {LANES_I32}"));
        }
        rows = next;
    }
    rows
}

/// The micro-kernel over one packed panel.
struct Kernel<'a, 's> {
    elem: Elem,
    /// For [`Elem::Fp8`]: the scales (`x` and the weights' buffers are then their codes).
    fp8: Option<Fp8Scales>,
    /// The input's buffer, `[M, K]`.
    x: usize,
    nw: usize,
    /// Rows per register block.
    mr: usize,
    /// Vectors of 16 columns per register block (of the panel's [`NV`]): all of them, or one at a
    /// time ([`ACCS_AVX2`]).
    nv: usize,
    n: &'a Value,
    k: &'a Value,
    scratch: &'a Scratch,
    p: &'a Value,
    p_end: &'a Value,
    /// Panels per group: the scratch's slots per weight.
    group: i64,
    /// The panels in `p .. p_end` (at most `group`).
    panels: &'a Value,
    /// For [`Elem::Bf16Wide`]: where a register block's rows of `x`, widened, wait (after the
    /// packed panels, [`WIDE_X_OFFSET`]).
    wide_x: Option<(Value, String)>,
    store: Store<'s>,
    direct: Option<usize>,
}

impl Kernel<'_, '_> {
    /// Packs columns `ks .. ke` of each panel of `p .. p_end` of weight `w` (its view and memref
    /// type).
    /// `scales` is an FP8 weight's scales buffer.
    fn pack_group(
        &self,
        f: &mut Frame,
        wv: (&Value, &str),
        w: &Value,
        scales: Option<usize>,
        (ks, ke): (&Value, &Value),
    ) {
        if self.group == 1 {
            return self.pack(f, wv, w, scales, (self.p, self.p_end), (ks, ke));
        }
        let (zero, one) = (f.b.index(0), f.b.index(1));
        for_loop(f, &zero, self.panels, &one, |f, g| {
            let (p, p_end) = self.panel_cols(f, g);
            let group = f.b.index(self.group);
            let first = f.b.muli(w, &group);
            let slot = f.b.addi(&first, g);
            self.pack(f, wv, &slot, scales, (&p, &p_end), (ks, ke));
        });
    }

    /// The columns of panel `g` of the group.
    fn panel_cols(&self, f: &mut Frame, g: &Value) -> (Value, Value) {
        let nb = f.b.index(NB);
        let off = f.b.muli(g, &nb);
        let p = f.b.addi(self.p, &off);
        let end = f.b.addi(&p, &nb);
        let p_end = f.b.minui(&end, self.p_end);
        (p, p_end)
    }

    /// Packs columns `ks .. ke` of panel `p .. p_end` (at most 64 columns) of weight buffer `wbuf`
    /// (`[N, K]`) into slot `slot`: per 16 weight rows and tile of `K`, 16 loads of 16 lanes, a
    /// transpose, and 16 stores. Rows past the panel's end read its last row. For FP8, `scales` is
    /// the weight's scales buffer.
    fn pack(
        &self,
        f: &mut Frame,
        (view, memref): (&Value, &str),
        slot: &Value,
        scales: Option<usize>,
        (p, p_end): (&Value, &Value),
        (ks, ke): (&Value, &Value),
    ) {
        let (e, sc) = (self.elem, self.scratch);
        let (view, memref) = (view.clone(), memref.to_string());
        let one = f.b.index(1);
        let last = f.b.subi(p_end, &one);
        let step = f.b.index(e.tile() as i64);
        let (zero, nb, vl, per) = (f.b.index(0), f.b.index(NB), f.b.index(VL), f.b.index(e.per()));
        for_loop(f, &zero, &nb, &vl, |f, c0| {
            let first = f.b.addi(p, c0);
            let (rows, starts): (Vec<Value>, Vec<Value>) = (0..VL)
                .map(|r| {
                    let off = f.b.index(r);
                    let row = f.b.addi(&first, &off);
                    let row = f.b.minui(&row, &last);
                    let start = f.b.muli(&row, self.k);
                    (row, start)
                })
                .unzip();
            // Fp8Wide: each row's first scale of its block row, `(row / rows) * ceil(K / cols)`.
            let scale_rows: Vec<Value> = match (&self.fp8, e) {
                (Some(s), Elem::Fp8Wide) => {
                    let (br, kb) = (f.b.index(s.rows), self.scale_blocks(f, s.cols));
                    rows.iter()
                        .map(|row| {
                            let block = f.b.divui(row, &br);
                            f.b.muli(&block, &kb)
                        })
                        .collect()
                }
                _ => Vec::new(),
            };
            let lane = f.b.muli(c0, &per);
            if e == Elem::Fp8 {
                // 64 codes a row a step, decoded to two tiles' bf16 values, each transposed.
                let step = f.b.index(64);
                let dec = f.scratch("bf16", 16 * 64);
                return for_loop(f, ks, ke, &step, |f, kk| {
                    let halves = decode16(f, (&view, &memref), (&first, &last, self.k, kk), (&dec.0, &dec.1));
                    let rel = f.b.subi(kk, ks);
                    for (h, rows) in halves.into_iter().enumerate() {
                        for (t, v) in transpose16(f, rows).iter().enumerate() {
                            let pt = f.b.index(32 * h as i64 + 2 * t as i64);
                            let kt = f.b.addi(&rel, &pt);
                            let at = sc.at(f, slot, &kt, 0);
                            let at = f.b.addi(&at, &lane);
                            let v = f
                                .b
                                .op("pv", format_args!("vector.bitcast {v} : {LANES_I32} to {BF16_PAIRS}"));
                            let (sv, sm) = (&sc.view, &sc.memref);
                            f.b.line(format_args!("vector.store {v}, {sv}[{at}] : {sm}, {BF16_PAIRS}"));
                        }
                    }
                });
            }
            for_loop(f, ks, ke, &step, |f, kk| {
                let vty = e.vec();
                let rows: Vec<Value> = (starts.iter().enumerate())
                    .map(|(r, s)| {
                        let at = f.b.addi(s, kk);
                        let v = match e {
                            // 16 codes decoded and times their block's scale, in f32.
                            Elem::Fp8Wide => {
                                let (sbuf, s) = (scales.expect("FP8 weights have scales"), self.fp8_cols(f));
                                let block = f.b.divui(kk, &s);
                                let at_s = f.b.addi(&scale_rows[r], &block);
                                self.decode_scaled(f, (&view, &memref), &at, sbuf, &at_s)
                            }
                            // 16 bf16 values widened to the f32 lanes they are packed as.
                            Elem::Bf16Wide => {
                                let h = f.b.op(
                                    "pw",
                                    format_args!("vector.load {view}[{at}] : {memref}, vector<16xbf16>"),
                                );
                                let lanes = widen_bf16(f, &h);
                                f.b.op("pw", format_args!("vector.bitcast {lanes} : {LANES_I32} to {VEC}"))
                            }
                            _ => f.b.op("pw", format_args!("vector.load {view}[{at}] : {memref}, {vty}")),
                        };
                        f.b.op("pw", format_args!("vector.bitcast {v} : {vty} to {LANES_I32}"))
                    })
                    .collect();
                let rel = f.b.subi(kk, ks);
                for (t, v) in transpose16(f, rows).iter().enumerate() {
                    // Lane row `t`: the chunk's columns `rel + per * t ..`.
                    let pt = f.b.index(e.per() * t as i64);
                    let kt = f.b.addi(&rel, &pt);
                    let at = sc.at(f, slot, &kt, 0);
                    let at = f.b.addi(&at, &lane);
                    let v = f.b.op("pv", format_args!("vector.bitcast {v} : {LANES_I32} to {vty}"));
                    let (sv, sm) = (&sc.view, &sc.memref);
                    f.b.line(format_args!("vector.store {v}, {sv}[{at}] : {sm}, {vty}"));
                }
            });
        });
    }

    /// Rows `lo .. hi` of the panel over the pass's columns of `K`, by AMX's tiles or AVX-512's
    /// registers.
    fn blocks(&self, f: &mut Frame, rows: (&Value, &Value), pass: &Pass) {
        if self.elem.amx() {
            self.amx_blocks(f, rows, pass)
        } else {
            self.row_blocks(f, rows, pass)
        }
    }

    /// Rows `lo .. hi` in register blocks of `mr` rows, then one at a time; each block over the
    /// panel's vectors of columns `nv` at a time.
    fn row_blocks(&self, f: &mut Frame, (lo, hi): (&Value, &Value), pass: &Pass) {
        let one = f.b.index(1);
        let mr = f.b.index(self.mr as i64);
        let span = f.b.subi(hi, lo);
        let blocks = f.b.divui(&span, &mr);
        let full = f.b.muli(&blocks, &mr);
        let full = f.b.addi(lo, &full);
        let each = |f: &mut Frame, m0: &Value, mr: usize| {
            if self.nv == NV {
                let zero = f.b.index(0);
                return self.rows(f, m0, mr, &zero, pass);
            }
            let (zero, nv, all) = (f.b.index(0), f.b.index(self.nv as i64), f.b.index(NV as i64));
            for_loop(f, &zero, &all, &nv, |f, v0| self.rows(f, m0, mr, v0, pass));
        };
        for_loop(f, lo, &full, &mr, |f, m0| each(f, m0, self.mr));
        for_loop(f, &full, hi, &one, |f, m0| each(f, m0, 1));
    }

    /// Rows `m0 .. m0 + mr` over the pass's columns of `K`, for the panel's vectors `v0 .. v0 +
    /// nv` (16 columns each; `v0` is 0 where `nv` is all four): accumulator `(i * nw + w) * nv + u`
    /// holds columns `16 (v0 + u) .. 16 (v0 + u) + 16` of row `i` for weight `w`.
    fn rows(&self, f: &mut Frame, m0: &Value, mr: usize, v0: &Value, pass: &Pass) {
        let (e, nw, sc, nv) = (self.elem, self.nw, self.scratch, self.nv);
        let (xv, xm) = (f.bufs[self.x].view.clone(), f.bufs[self.x].memref.clone());
        let ms: Vec<Value> = (0..mr)
            .map(|i| {
                let iv = f.b.index(i as i64);
                f.b.addi(m0, &iv)
            })
            .collect();
        let starts: Vec<Value> = ms.iter().map(|m| f.b.muli(m, self.k)).collect();
        let zero_v = f.b.constant("dense<0.0>", VEC);
        // Accumulator `a`'s place among a row's partial sums, `w * 4 + v`.
        let slot = |f: &mut Frame, a: usize| -> Value {
            let (w, u) = ((a % (nw * nv)) / nv, a % nv);
            let j = f.b.index((w * NV + u) as i64);
            f.b.addi(&j, v0)
        };
        let inits: Vec<(Value, &str)> = match &pass.partial {
            None => (0..mr * nw * nv).map(|_| (zero_v.clone(), VEC)).collect(),
            Some(part) => (0..mr * nw * nv)
                .map(|a| {
                    let j = slot(f, a);
                    let at = part.at(f, &ms[a / (nw * nv)], nw, &j);
                    let (pv, pm) = (&part.view, &part.memref);
                    let v = f.b.op("ps", format_args!("vector.load {pv}[{at}] : {pm}, {VEC}"));
                    let first = &part.first;
                    (f.b.op("ps", format_args!("arith.select {first}, {zero_v}, {v} : {VEC}")), VEC)
                })
                .collect(),
        };
        // Bf16Wide's rows of `x` over the pass's columns, widened to f32 once for the whole sweep
        // (Fp8Wide's decoded and times their scales): row `i`'s column `ks + c` at `i * kc + c` of
        // the scratch after the packed panels.
        let wide = e.wide().then(|| {
            let (xw, xw_ty) = (self.wide_x.as_ref()).expect("wide elements have room for their rows");
            let (kc, vl) = (f.b.index(sc.kc as i64), f.b.index(VL));
            for (i, s) in starts.iter().enumerate() {
                let row = f.b.index(i as i64);
                let row = f.b.muli(&row, &kc);
                // Fp8Wide: the row's first scale, `m * ceil(K / cols)` of the input's scales.
                let scale_row = match &self.fp8 {
                    Some(sc) if e == Elem::Fp8Wide => {
                        let kb = self.scale_blocks(f, sc.cols);
                        Some((sc.x, f.b.muli(&ms[i], &kb)))
                    }
                    _ => None,
                };
                for_loop(f, &pass.ks, &pass.ke, &vl, |f, kk| {
                    let at = f.b.addi(s, kk);
                    let v = match &scale_row {
                        Some((sbuf, srow)) => {
                            let cols = self.fp8_cols(f);
                            let block = f.b.divui(kk, &cols);
                            let at_s = f.b.addi(srow, &block);
                            self.decode_scaled(f, (&xv, &xm), &at, *sbuf, &at_s)
                        }
                        None => {
                            let h =
                                f.b.op("xh", format_args!("vector.load {xv}[{at}] : {xm}, vector<16xbf16>"));
                            let v = widen_bf16(f, &h);
                            f.b.op("xh", format_args!("vector.bitcast {v} : {LANES_I32} to {VEC}"))
                        }
                    };
                    let rel = f.b.subi(kk, &pass.ks);
                    let to = f.b.addi(&row, &rel);
                    f.b.line(format_args!("vector.store {v}, {xw}[{to}] : {xw_ty}, {VEC}"));
                });
            }
            let rows: Vec<Value> = (0..starts.len())
                .map(|i| {
                    let row = f.b.index(i as i64);
                    f.b.muli(&row, &kc)
                })
                .collect();
            (xw.clone(), xw_ty.clone(), rows)
        });
        let step = f.b.index(e.per());
        let accs = for_carry(f, &pass.ks, &pass.ke, &step, &inits, |f, kk, acc| {
            let rel = f.b.subi(kk, &pass.ks);
            let vty = e.vec();
            // The rows' inputs first, then one packed weight vector at a time: `mr` broadcasts and
            // one weight vector live beside the accumulators (24 + 6 + 1 of 32 registers).
            let xs: Vec<Value> = (starts.iter().enumerate())
                .map(|(i, s)| {
                    let at = f.b.addi(s, kk);
                    match e {
                        Elem::Bf16 => {
                            let pair =
                                f.b.op("xp", format_args!("vector.load {xv}[{at}] : {xm}, vector<2xbf16>"));
                            let pair = f.b.op(
                                "xp",
                                format_args!("vector.bitcast {pair} : vector<2xbf16> to vector<1xi32>"),
                            );
                            let pair = f
                                .b
                                .op("xp", format_args!("vector.extract {pair}[0] : i32 from vector<1xi32>"));
                            let a =
                                f.b.op("xb", format_args!("vector.broadcast {pair} : i32 to {LANES_I32}"));
                            f.b.op("xb", format_args!("vector.bitcast {a} : {LANES_I32} to {BF16_PAIRS}"))
                        }
                        Elem::F32 => {
                            let x = f.b.op("xs", format_args!("memref.load {xv}[{at}] : {xm}"));
                            f.b.op("xb", format_args!("vector.broadcast {x} : f32 to {VEC}"))
                        }
                        Elem::Bf16Wide | Elem::Fp8Wide => {
                            let (xw, xw_ty, rows) = wide.as_ref().expect("widened above");
                            let at = f.b.addi(&rows[i], &rel);
                            let x = f.b.op("xs", format_args!("memref.load {xw}[{at}] : {xw_ty}"));
                            f.b.op("xb", format_args!("vector.broadcast {x} : f32 to {VEC}"))
                        }
                        Elem::Fp8 => unreachable!("FP8 GEMMs take the packed path on AMX only"),
                    }
                })
                .collect();
            let mut next = acc.to_vec();
            let lanes = f.b.index(e.per() * VL);
            let first = f.b.muli(v0, &lanes);
            for w in 0..nw {
                for u in 0..nv {
                    let slot = f.b.index(w as i64);
                    let at = sc.at(f, &slot, &rel, e.per() * VL * u as i64);
                    let at = f.b.addi(&at, &first);
                    let (sv, sm) = (&sc.view, &sc.memref);
                    let wv = f.b.op("bw", format_args!("vector.load {sv}[{at}] : {sm}, {vty}"));
                    for (i, a) in xs.iter().enumerate() {
                        let j = (i * nw + w) * nv + u;
                        let a_ij = &acc[j];
                        next[j] = match e {
                            Elem::Bf16 => f.bf16_dot(a_ij, a, &wv),
                            Elem::F32 | Elem::Bf16Wide | Elem::Fp8Wide => {
                                f.b.op("acc", format_args!("vector.fma {a}, {wv}, {a_ij} : {VEC}"))
                            }
                            Elem::Fp8 => unreachable!("FP8 GEMMs take the packed path on AMX only"),
                        };
                    }
                }
            }
            next
        });
        match &pass.partial {
            None => self.store_rows(f, m0, mr, v0, &accs),
            Some(part) => if_then_else(
                f,
                &part.last,
                |f| self.store_rows(f, m0, mr, v0, &accs),
                |f| {
                    for (a, v) in accs.iter().enumerate() {
                        let j = slot(f, a);
                        let at = part.at(f, &ms[a / (nw * nv)], nw, &j);
                        let (pv, pm) = (&part.view, &part.memref);
                        f.b.line(format_args!("vector.store {v}, {pv}[{at}] : {pm}, {VEC}"));
                    }
                },
            ),
        }
    }
    /// Stores the accumulators of rows `m0 .. m0 + mr` (the panel's vectors `v0 .. v0 + nv`):
    /// whole vectors into the output buffer for a plain `linear` whose panel is full, else element
    /// by element through the store hook, for the panel's columns alone.
    fn store_rows(&self, f: &mut Frame, m0: &Value, mr: usize, v0: &Value, accs: &[Value]) {
        let (nw, nv) = (self.nw, self.nv);
        let panel = f.b.subi(self.p_end, self.p);
        let nb = f.b.index(NB);
        let full = f.b.op("c", format_args!("arith.cmpi eq, {panel}, {nb} : index"));
        // The columns these vectors hold: from `p + 16 v0`, as many of `16 nv` as the panel has.
        let vl = f.b.index(VL);
        let skip = f.b.muli(v0, &vl);
        let p = f.b.addi(self.p, &skip);
        let width = f.b.subi(&panel, &skip);
        let zero = f.b.index(0);
        let width = f.b.op("w", format_args!("arith.maxsi {width}, {zero} : index"));
        let most = f.b.index(VL * nv as i64);
        let width = f.b.minui(&width, &most);
        // Element by element: the accumulators go to a tile in scratch, and each row's columns
        // within the panel are read back from it one at a time, every weight's sum together.
        let (tile, tile_ty) = f.scratch("f32", (ACCS.max(NV * nw) * VL as usize) as u64);
        let lanes = |f: &mut Frame| {
            for (a, v) in accs.iter().enumerate() {
                let at = f.b.index(a as i64 * VL);
                f.b.line(format_args!("vector.store {v}, {tile}[{at}] : {tile_ty}, {VEC}"));
            }
            for i in 0..mr {
                let iv = f.b.index(i as i64);
                let m = f.b.addi(m0, &iv);
                self.store_row(f, &m, (&p, &width), |f, c, w| {
                    let off = f.b.index(((i * nw + w) * nv) as i64 * VL);
                    let at = f.b.addi(&off, c);
                    f.b.op("y", format_args!("memref.load {tile}[{at}] : {tile_ty}"))
                });
            }
        };
        match self.direct {
            Some(out) => if_then_else(
                f,
                &full,
                |f| {
                    for i in 0..mr {
                        let iv = f.b.index(i as i64);
                        let m = f.b.addi(m0, &iv);
                        let base = f.b.muli(&m, self.n);
                        for u in 0..nv {
                            let off = f.b.index(VL * u as i64);
                            let c0 = f.b.addi(&p, &off);
                            let idx = f.b.addi(&base, &c0);
                            f.store_vec(out, &idx, &accs[i * nw * nv + u]);
                        }
                    }
                },
                lanes,
            ),
            None => lanes(f),
        }
    }
}

impl Kernel<'_, '_> {
    /// The columns per FP8 scale block, as an index.
    fn fp8_cols(&self, f: &mut Frame) -> Value {
        let cols = self.fp8.as_ref().expect("an FP8 GEMM has scales").cols;
        f.b.index(cols)
    }

    /// `ceil(K / cols)`: the scale blocks along a row of `K`.
    fn scale_blocks(&self, f: &mut Frame, cols: i64) -> Value {
        let (c, c1) = (f.b.index(cols), f.b.index(cols - 1));
        let k = f.b.addi(self.k, &c1);
        f.b.divui(&k, &c)
    }

    /// The 16 E4M3 codes at `at` of `view` (an `i8` buffer's) decoded, times the scale at `at_s`
    /// of `scales`, as `vector<16xf32>`: each value is the code's times the scale, rounded once,
    /// as the interpreter's `dequantize` gives it ([`Frame::f8_decode_vec_raw`]'s 2^-8 folded into
    /// the scale exactly), NaN codes NaN.
    fn decode_scaled(
        &self,
        f: &mut Frame,
        (view, memref): (&Value, &str),
        at: &Value,
        scales: usize,
        at_s: &Value,
    ) -> Value {
        let q = f.b.op("pq", format_args!("vector.load {view}[{at}] : {memref}, vector<16xi8>"));
        let q = f.f8_decode_vec_raw(&q);
        let s = f.load(scales, at_s);
        let sv = f.scale_vec_256(&s);
        f.b.op("pq", format_args!("arith.mulf {q}, {sv} : {VEC}"))
    }
}

impl Kernel<'_, '_> {
    /// Row `m`'s outputs in columns `p .. p + width`, one at a time through the store hook, every
    /// weight's sum together: `read(f, c, w)` is weight `w`'s sum for column `p + c`.
    fn store_row(
        &self,
        f: &mut Frame,
        m: &Value,
        (p, width): (&Value, &Value),
        read: impl Fn(&mut Frame, &Value, usize) -> Value,
    ) {
        let (zero, one) = (f.b.index(0), f.b.index(1));
        let base = f.b.muli(m, self.n);
        let base = f.b.addi(&base, p);
        for_loop(f, &zero, width, &one, |f, c| {
            let ys: Vec<Value> = (0..self.nw).map(|w| read(f, c, w)).collect();
            let idx = f.b.addi(&base, c);
            (self.store)(f, &idx, &ys);
        });
    }
}

/// For the grouped GEMM: whether an expert's `rows` rows take AMX's tiles ([`grouped_rows`]),
/// which first pack (for FP8, decode) the expert's weights. Measured on models/bench.toml's
/// prefills of 16, 32 and 128 tokens (2 threads, this Xeon, 2026-12-06, 3 rounds), against the
/// dot-product blocks: bf16 packing paid from 2 rows an expert (at 4 or 8 a 32-token prefill
/// fell from 660-715 to 550-640 tok/s), FP8, whose packing decodes, from 4 (at 1 row, as when
/// the GEMM's rows chose, 550-565 against 615-658 tok/s; at 16, 563-606).
pub(super) fn enough_expert_rows(f: &mut Frame, elem: Elem, rows: &Value) -> Value {
    let min = f.b.index(match elem {
        Elem::Fp8 => 4,
        Elem::Bf16 | Elem::F32 | Elem::Bf16Wide | Elem::Fp8Wide => 2,
    });
    f.b.op("c", format_args!("arith.cmpi uge, {rows}, {min} : index"))
}

/// For [`panel`]'s callers: whether a GEMM of `rows` rows of `elem` takes the packed path.
pub(super) fn enough_rows(f: &mut Frame, elem: Elem, rows: &Value) -> Value {
    let min = f.b.index(elem.min_rows());
    f.b.op("c", format_args!("arith.cmpi uge, {rows}, {min} : index"))
}
