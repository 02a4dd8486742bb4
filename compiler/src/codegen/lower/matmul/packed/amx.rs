//! The packed bf16 path's micro-kernel on a CPU with AMX (Intel's Advanced Matrix Extensions,
//! Sapphire Rapids and later): `tdpbf16ps` multiplies a tile of 16 rows by 32 bf16 values by a
//! tile of 16 column pairs, 8192 multiply-adds in one instruction, into a 16 x 16 tile of f32
//! sums. On this 2-core Xeon one core runs about 2.9 TFLOP/s of it, against about 0.1 for
//! AVX-512's `vdpbf16ps` (`kiln bench gemm`).
//!
//! - **Operands.** The first tile (`A`) is 16 rows of the input, 32 columns of `K`, loaded straight
//!   from `x` with its row stride. The second (`B`) must hold each output column's `K` values in
//!   pairs, one row of the tile per pair: exactly the packed panel of [`super`], whose chunk keeps
//!   each pair of `K` columns as the 64 weight rows' pairs side by side. So a `B` tile of 16
//!   columns is 16 rows of 64 bytes, 256 bytes apart, in the panel the AVX-512 kernel would read.
//! - **Blocks.** The eight tile registers hold two row tiles of `A`, two column tiles of `B` and
//!   the four 16 x 16 sums they make: a block of 32 rows by 32 columns per step of 32 `K` columns,
//!   two blocks per 64-column panel and weight.
//! - **Tiles' shapes.** A tile configuration (`ldtilecfg`) fixes each tile's rows. Whole blocks take
//!   16-row tiles; the last block of a range, when shorter, loads a configuration with its own
//!   rows (one row tile when it has 16 rows or fewer).
//! - **Sums.** A block's sums leave the tiles for f32 scratch (`tilestored`), from where the store
//!   hook reads them as the AVX-512 kernel's stores do; between chunks of `K` they wait in the
//!   pass's partial sums and are loaded back into the tiles.
//!
//! - **FP8** ([`super::Elem::Fp8`], DeepSeek-V3's E4M3 input in 1 x 128 tiles and weights in
//!   128 x 128 blocks). E4M3 values are bf16 values, and their products are exact in f32: the
//!   weights' codes are decoded as they are packed, and a block of 32 input rows is decoded once
//!   per chunk of `K` into the thread scratch, where the row tiles load it from. Each scale block
//!   of `K` is summed in the tiles alone; the sums go to scratch, and each row's are multiplied by
//!   the product of the input row's and the weight's scales and added into f32 accumulators, as
//!   the dot-product blocks do ([`Kernel::fp8_half`]).
//!
//! Each output sums the same products in the same order along `K` whatever the block or the split
//! over threads, so a result does not depend on either. `tdpbf16ps`, like `vdpbf16ps`, reads
//! subnormal bf16 inputs as zero and flushes subnormal sums.
//!
//! Linux gives a process the AMX tile state only on request (`arch_prctl(ARCH_REQ_XCOMP_PERM)`):
//! the compiler asks before it chooses this path ([`crate::codegen::cpu::host_features`]) and the
//! library asks again when it is loaded (`cpu::AMX_INIT`).

use super::{Kernel, Pass, NB};
use crate::codegen::lower::Frame;
use crate::codegen::mlir::{for_loop, if_then_else, Value};

/// Rows of an `A` tile (and of a sum tile); a block is two of them.
const TILE_ROWS: i64 = 16;
/// Rows of a block.
const BLOCK_ROWS: i64 = 2 * TILE_ROWS;
/// Columns of a sum tile.
const TILE_COLS: i64 = 16;
/// Bytes of a tile row: 32 bf16 values of `A`, 16 pairs of `B`, 16 f32 sums.
const ROW_BYTES: i64 = 64;
/// Rows per pass over the chunks of `K` when `K` takes several: whole blocks, and their partial
/// sums (`CHUNK_ROWS x 64` f32 per weight and panel) within the thread scratch's last 256 KiB.
pub(super) const CHUNK_ROWS: i64 = 4 * BLOCK_ROWS;
/// The packed panels of a group, all weights together, that one block of rows sweeps: at most
/// half of a core's L2 (2 MiB on Sapphire Rapids), so that they stay there beside the block's
/// rows of `x`.
const GROUP_BYTES: u64 = 1 << 20;
/// The most panels in a group.
const MAX_PANELS: u64 = 4;

/// Panels per group for `nw` weights and `K = kn`: as many as keep the group's packed panels
/// within [`GROUP_BYTES`], from 1 to [`MAX_PANELS`]. A block of rows of `x` is read from memory
/// once per group rather than once per panel: on a GEMM of 2048 x 2048 x 2048 the rows of `x` pass
/// through L2 once per 256 columns instead of once per 64.
pub(super) fn panels(nw: usize, kn: u64) -> usize {
    let panel_bytes = nw as u64 * NB as u64 * kn * 2;
    (GROUP_BYTES / panel_bytes).clamp(1, MAX_PANELS) as usize
}

/// Tile registers: the sums of row tile `a` by column tile `t` in `2a + t`, the row tiles of `x` in
/// 4 and 5, the column tiles of the packed panel in 6 and 7.
const fn sum_tile(a: usize, t: usize) -> i64 {
    (2 * a + t) as i64
}
const A_TILE: [i64; 2] = [4, 5];
const B_TILE: [i64; 2] = [6, 7];

impl Kernel<'_, '_> {
    /// Rows `lo .. hi` in blocks of 32, then the rest in one block of its own shape.
    pub(super) fn amx_blocks(&self, f: &mut Frame, (lo, hi): (&Value, &Value), pass: &Pass) {
        let (cfg, cfg_ty) = f.scratch("i8", 64);
        let sums = f.scratch("f32", (self.nw as i64 * BLOCK_ROWS * NB) as u64);
        let sums = (&sums.0, &sums.1);
        let (one_tile, two_tiles) = (f.b.index(TILE_ROWS), f.b.index(BLOCK_ROWS));
        if self.fp8.is_some() {
            // FP8 reads its row tiles from the decoded rows' scratch, which holds 32 rows
            // whatever the block's: a last block of 16 rows or fewer takes the second row tile
            // too, one row of it (read, never stored), so that the code is made once.
            let one = f.b.index(1);
            configure(f, (&cfg, &cfg_ty), &one_tile, Some(&one_tile));
            for_loop(f, lo, hi, &two_tiles, |f, m0| {
                let end = f.b.addi(m0, &two_tiles);
                let end = f.b.minui(&end, hi);
                let rows = f.b.subi(&end, m0);
                let short = f.b.op("c", format_args!("arith.cmpi ult, {rows}, {two_tiles} : index"));
                if_then_else(
                    f,
                    &short,
                    |f| {
                        let first = f.b.minui(&rows, &one_tile);
                        let second = f.b.subi(&rows, &first);
                        let second = f.b.op("g", format_args!("arith.maxsi {second}, {one} : index"));
                        configure(f, (&cfg, &cfg_ty), &first, Some(&second));
                    },
                    |_| {},
                );
                self.amx_block(f, m0, &rows, true, pass, sums);
            });
            f.b.line(format_args!("llvm.call_intrinsic \"llvm.x86.tilerelease\"() : () -> ()"));
            return;
        }
        // Blocks of more than 16 rows take two row tiles: whole ones, then a last one of 17 to 31
        // rows (configured for it); a last block of 16 rows or fewer takes one.
        let span = f.b.subi(hi, lo);
        let over = f.b.subi(&span, &one_tile);
        let zero = f.b.index(0);
        let over = f.b.op("g", format_args!("arith.maxsi {over}, {zero} : index"));
        let round = f.b.index(BLOCK_ROWS - 1);
        let two_tile_blocks = f.b.addi(&over, &round);
        let two_tile_blocks = f.b.divui(&two_tile_blocks, &two_tiles);
        let two_tile_end = f.b.muli(&two_tile_blocks, &two_tiles);
        let two_tile_end = f.b.addi(lo, &two_tile_end);
        let two_tile_end = f.b.minui(&two_tile_end, hi);
        configure(f, (&cfg, &cfg_ty), &one_tile, Some(&one_tile));
        for_loop(f, lo, &two_tile_end, &two_tiles, |f, m0| {
            let end = f.b.addi(m0, &two_tiles);
            let end = f.b.minui(&end, hi);
            let rows = f.b.subi(&end, m0);
            let short = f.b.op("c", format_args!("arith.cmpi ult, {rows}, {two_tiles} : index"));
            if_then_else(
                f,
                &short,
                |f| {
                    let second = f.b.subi(&rows, &one_tile);
                    configure(f, (&cfg, &cfg_ty), &one_tile, Some(&second));
                },
                |_| {},
            );
            self.amx_block(f, m0, &rows, true, pass, sums);
        });
        let rest = f.b.subi(hi, &two_tile_end);
        let any = f.b.op("c", format_args!("arith.cmpi ugt, {rest}, {zero} : index"));
        if_then_else(
            f,
            &any,
            |f| {
                configure(f, (&cfg, &cfg_ty), &rest, None);
                self.amx_block(f, &two_tile_end, &rest, false, pass, sums);
            },
            |_| {},
        );
        f.b.line(format_args!("llvm.call_intrinsic \"llvm.x86.tilerelease\"() : () -> ()"));
    }

    /// The `rows` rows from `m0` (at most 32; more than 16 when `two` row tiles are configured),
    /// every panel of the group, weight and 32-column half of a panel, over the pass's columns of
    /// `K`. The sums wait in `sums` (f32, weight `w`'s row `i`, column `c` of the panel at
    /// `(w * 32 + i) * 64 + c`) until each panel's are stored.
    fn amx_block(
        &self,
        f: &mut Frame,
        m0: &Value,
        rows: &Value,
        two: bool,
        pass: &Pass,
        (sums, sums_ty): (&Value, &String),
    ) {
        let row_tiles = if two { 2 } else { 1 };
        let (xv, xm) = (f.bufs[self.x].view.clone(), f.bufs[self.x].memref.clone());
        // FP8: the block's rows decoded to bf16 for the pass's columns, `kc` apart (the row tiles'
        // source in place of `x`).
        let decoded = self.fp8.as_ref().map(|_| self.decode_rows(f, m0, rows, pass));
        let x = match &decoded {
            Some((view, memref)) => pointer(f, view, memref),
            None => pointer(f, &xv, &xm),
        };
        let packed = pointer(f, &self.scratch.view, &self.scratch.memref);
        let sums_at = pointer(f, sums, sums_ty);
        let two_bytes = f.b.index(2);
        let x_row = match &decoded {
            Some(_) => f.b.index(self.scratch.kc as i64),
            None => self.k.clone(),
        };
        let x_stride = f.b.muli(&x_row, &two_bytes);
        let b_stride = f.b.index(NB * 4);
        let sums_stride = f.b.index(NB * 4);
        let step = f.b.index(2 * TILE_COLS);
        let tile_rows = f.b.index(TILE_ROWS);
        let slots = self.nw as i64 * self.group;
        // The partial sums' rows for this block, `slots * 64` f32 apart.
        let partial = pass.partial.as_ref().map(|part| {
            let at = pointer(f, &part.view, &part.memref);
            let i = f.b.subi(m0, &part.rc);
            let stride = f.b.index(slots * NB * 4);
            let first_row = f.b.muli(&i, &stride);
            (at, first_row, stride, part)
        });
        let tiles: Vec<(usize, usize)> = (0..row_tiles).flat_map(|a| (0..2).map(move |t| (a, t))).collect();
        let (zero, one, two_v) = (f.b.index(0), f.b.index(1), f.b.index(2));
        let nw = f.b.index(self.nw as i64);
        let group = f.b.index(self.group);
        for_loop(f, &zero, self.panels, &one, |f, g| {
            // Weight `w`, half `h` of the panel: one loop, so that the tiles' code is made once.
            let halves = f.b.muli(&nw, &two_v);
            for_loop(f, &zero, &halves, &one, |f, wh| {
                let w = f.b.divui(wh, &two_v);
                let h = f.b.op("i", format_args!("arith.remui {wh}, {two_v} : index"));
                let slot = f.b.muli(&w, &group);
                let slot = f.b.addi(&slot, g);
                // Column `32 h` of the panel, in f32 bytes and in bf16 lanes of a packed slot.
                let (half_bytes, half_lanes) = (f.b.index(32 * 4), f.b.index(2 * 32));
                let (slot_size, w_size) = (f.b.index(NB * 4), f.b.index(BLOCK_ROWS * NB * 4));
                let col_bytes = f.b.muli(&h, &half_bytes);
                let col_lanes = f.b.muli(&h, &half_lanes);
                let slot_bytes = f.b.muli(&slot, &slot_size);
                let w_rows = f.b.muli(&w, &w_size);
                // Where sum tile (a, t) goes: in the block's scratch, and among the partial sums.
                let sum_offset = |f: &mut Frame, a: usize, t: usize| {
                    let off = f.b.index((a as i64 * TILE_ROWS * NB + TILE_COLS * t as i64) * 4);
                    let off = f.b.addi(&off, &w_rows);
                    let off = f.b.addi(&off, &col_bytes);
                    f.b.addi(&sums_at, &off)
                };
                let partial_offset = |f: &mut Frame, a: usize, t: usize| {
                    let (at, first_row, stride, _) = partial.as_ref().expect("a pass with partial sums");
                    let rows_before = f.b.muli(&tile_rows, stride);
                    let rows_before = if a == 0 { f.b.index(0) } else { rows_before };
                    let col = f.b.index(TILE_COLS * t as i64 * 4);
                    let col = f.b.addi(&slot_bytes, &col);
                    let col = f.b.addi(&col, &col_bytes);
                    let off = f.b.addi(first_row, &rows_before);
                    let off = f.b.addi(&off, &col);
                    f.b.addi(at, &off)
                };
                if self.fp8.is_some() {
                    let half = Half {
                        w: &w,
                        h: &h,
                        slot: &slot,
                        g,
                        m0,
                        rows,
                        x: &x,
                        x_row: &x_row,
                        packed: &packed,
                    };
                    return self.fp8_half(f, &half, &tiles, pass, (sums, sums_ty));
                }
                let zero_all = |f: &mut Frame| {
                    for &(a, t) in &tiles {
                        let tile = tile_id(f, sum_tile(a, t));
                        f.b.line(format_args!(
                            "llvm.call_intrinsic \"llvm.x86.tilezero\"({tile}) : (i8) -> ()"
                        ));
                    }
                };
                match &partial {
                    None => zero_all(f),
                    Some((_, _, stride, part)) => if_then_else(f, &part.first, zero_all, |f| {
                        for &(a, t) in &tiles {
                            let at = partial_offset(f, a, t);
                            tile_load(f, sum_tile(a, t), &at, stride);
                        }
                    }),
                }
                for_loop(f, &pass.ks, &pass.ke, &step, |f, kk| {
                    for (a, &tile) in A_TILE[..row_tiles].iter().enumerate() {
                        let row = f.b.index(a as i64 * TILE_ROWS);
                        let row = f.b.addi(m0, &row);
                        let at = f.b.muli(&row, &x_row);
                        let at = f.b.addi(&at, kk);
                        let at = f.b.muli(&at, &two_bytes);
                        let at = f.b.addi(&x, &at);
                        tile_load(f, tile, &at, &x_stride);
                    }
                    let rel = f.b.subi(kk, &pass.ks);
                    for (t, &tile) in B_TILE.iter().enumerate() {
                        let at = self.scratch.at(f, &slot, &rel, 2 * TILE_COLS * t as i64);
                        let at = f.b.addi(&at, &col_lanes);
                        let at = f.b.muli(&at, &two_bytes);
                        let at = f.b.addi(&packed, &at);
                        tile_load(f, tile, &at, &b_stride);
                    }
                    for &(a, t) in &tiles {
                        let (c, ta, tb) =
                            (tile_id(f, sum_tile(a, t)), tile_id(f, A_TILE[a]), tile_id(f, B_TILE[t]));
                        f.b.line(format_args!(
                            "llvm.call_intrinsic \"llvm.x86.tdpbf16ps\"({c}, {ta}, {tb}) : (i8, i8, i8) -> ()"
                        ));
                    }
                });
                let to_sums = |f: &mut Frame| {
                    for &(a, t) in &tiles {
                        let at = sum_offset(f, a, t);
                        tile_store(f, sum_tile(a, t), &at, &sums_stride);
                    }
                };
                match &partial {
                    None => to_sums(f),
                    Some((_, _, stride, part)) => if_then_else(f, &part.last, to_sums, |f| {
                        for &(a, t) in &tiles {
                            let at = partial_offset(f, a, t);
                            tile_store(f, sum_tile(a, t), &at, stride);
                        }
                    }),
                }
            });
            let cols = self.panel_cols(f, g);
            match &pass.partial {
                None => self.amx_store(f, m0, rows, (sums, sums_ty), (&cols.0, &cols.1)),
                Some(part) => if_then_else(
                    f,
                    &part.last,
                    |f| self.amx_store(f, m0, rows, (sums, sums_ty), (&cols.0, &cols.1)),
                    |_| {},
                ),
            }
        });
    }

    /// FP8: rows `m0 .. m0 + rows` of the input's codes, columns `ks .. ke` of the pass, decoded to
    /// their exact bf16 values (64 codes at a time by table, NaN codes to NaN) into the thread
    /// scratch from [`super::FP8_X_OFFSET`]: row `i`'s column `ks + c` at element `i * kc + c`.
    fn decode_rows(&self, f: &mut Frame, m0: &Value, rows: &Value, pass: &Pass) -> (Value, String) {
        let kc = self.scratch.kc;
        let (out, out_ty) = f.thread_scratch(super::FP8_X_OFFSET, "bf16", BLOCK_ROWS as u64 * kc);
        let (cv, cm) = (f.bufs[self.x].view.clone(), f.bufs[self.x].memref.clone());
        let (zero, one, step, kc_v) = (f.b.index(0), f.b.index(1), f.b.index(64), f.b.index(kc as i64));
        let pairs = super::BF16_PAIRS;
        for_loop(f, &zero, rows, &one, |f, i| {
            let m = f.b.addi(m0, i);
            let src = f.b.muli(&m, self.k);
            let dst = f.b.muli(i, &kc_v);
            for_loop(f, &pass.ks, &pass.ke, &step, |f, kk| {
                let at = f.b.addi(&src, kk);
                let q = f.b.op("xq", format_args!("vector.load {cv}[{at}] : {cm}, vector<64xi8>"));
                let [lo, hi] = f.f8_to_bf16_64(&q);
                let rel = f.b.subi(kk, &pass.ks);
                let at = f.b.addi(&dst, &rel);
                let c32 = f.b.index(32);
                let at_hi = f.b.addi(&at, &c32);
                f.b.line(format_args!("vector.store {lo}, {out}[{at}] : {out_ty}, {pairs}"));
                f.b.line(format_args!("vector.store {hi}, {out}[{at_hi}] : {out_ty}, {pairs}"));
            });
        });
        (out, out_ty)
    }

    /// FP8: one weight's 32-column half of a panel for the block's rows over the pass's columns
    /// of `K`. Per scale block of `K`: the tiles sum the block's products of the decoded codes
    /// (exact in f32, as every FP8 GEMM's), go to scratch, and each row's sums are multiplied by
    /// the input row's and the weight's scales for the block and added into f32 accumulators, as
    /// the dot-product blocks do. The accumulators are the block's sums in `sums` (one chunk of
    /// `K`) or the pass's partial sums (several), copied to `sums` after the last chunk.
    fn fp8_half(
        &self,
        f: &mut Frame,
        half: &Half,
        tiles: &[(usize, usize)],
        pass: &Pass,
        (sums, sums_ty): (&Value, &String),
    ) {
        let scales = self.fp8.as_ref().expect("an FP8 kernel");
        let vec = super::VEC;
        let (zero, one) = (f.b.index(0), f.b.index(1));
        let (tmp, tmp_ty) = f.scratch("f32", (BLOCK_ROWS * BLOCK_ROWS) as u64);
        let tmp_at = pointer(f, &tmp, &tmp_ty);
        let nb = f.b.index(NB);
        let c32 = f.b.index(32);
        let hc = f.b.muli(half.h, &c32);
        // Where accumulator row `i`'s 32 columns start, in `sums` or among the partial sums.
        let acc_at = |f: &mut Frame, i: &Value| -> (Value, String, Value) {
            match &pass.partial {
                None => {
                    let br = f.b.index(BLOCK_ROWS);
                    let r = f.b.muli(half.w, &br);
                    let r = f.b.addi(&r, i);
                    let at = f.b.muli(&r, &nb);
                    (sums.clone(), sums_ty.clone(), f.b.addi(&at, &hc))
                }
                Some(part) => {
                    let r = f.b.subi(half.m0, &part.rc);
                    let r = f.b.addi(&r, i);
                    let slots = f.b.index(self.nw as i64 * self.group * NB);
                    let at = f.b.muli(&r, &slots);
                    let s = f.b.muli(half.slot, &nb);
                    let at = f.b.addi(&at, &s);
                    (part.view.clone(), part.memref.clone(), f.b.addi(&at, &hc))
                }
            }
        };
        let zero_v = f.b.constant("dense<0.0>", vec);
        let clear = |f: &mut Frame| {
            for_loop(f, &zero, half.rows, &one, |f, i| {
                let (v, ty, at) = acc_at(f, i);
                let c16 = f.b.index(16);
                let at16 = f.b.addi(&at, &c16);
                f.b.line(format_args!("vector.store {zero_v}, {v}[{at}] : {ty}, {vec}"));
                f.b.line(format_args!("vector.store {zero_v}, {v}[{at16}] : {ty}, {vec}"));
            });
        };
        match &pass.partial {
            None => clear(f),
            Some(part) => if_then_else(f, &part.first, clear, |_| {}),
        }
        let two_bytes = f.b.index(2);
        let x_stride = f.b.muli(half.x_row, &two_bytes);
        let b_stride = f.b.index(NB * 4);
        let tmp_stride = f.b.index(BLOCK_ROWS * 4);
        let step = f.b.index(2 * TILE_COLS);
        let cols = f.b.index(scales.cols);
        let blocks_k = f.b.divui(self.k, &cols);
        // The weight's scale row: the block of weight rows holding the half's columns.
        let col = f.b.muli(half.g, &nb);
        let col = f.b.addi(self.p, &col);
        let col = f.b.addi(&col, &hc);
        let w_rows = f.b.index(scales.rows);
        let w_block = f.b.divui(&col, &w_rows);
        let w_row = f.b.muli(&w_block, &blocks_k);
        let c64 = f.b.index(2 * 32);
        let col_lanes = f.b.muli(half.h, &c64);
        for_loop(f, &pass.ks, &pass.ke, &cols, |f, b0| {
            for &(a, t) in tiles {
                let tile = tile_id(f, sum_tile(a, t));
                f.b.line(format_args!("llvm.call_intrinsic \"llvm.x86.tilezero\"({tile}) : (i8) -> ()"));
            }
            let b_end = f.b.addi(b0, &cols);
            for_loop(f, b0, &b_end, &step, |f, kk| {
                let rel = f.b.subi(kk, &pass.ks);
                for (a, &tile) in A_TILE.iter().enumerate().take(tiles.len() / 2) {
                    let row = f.b.index(a as i64 * TILE_ROWS);
                    let at = f.b.muli(&row, half.x_row);
                    let at = f.b.addi(&at, &rel);
                    let at = f.b.muli(&at, &two_bytes);
                    let at = f.b.addi(half.x, &at);
                    tile_load(f, tile, &at, &x_stride);
                }
                for (t, &tile) in B_TILE.iter().enumerate() {
                    let at = self.scratch.at(f, half.slot, &rel, 2 * TILE_COLS * t as i64);
                    let at = f.b.addi(&at, &col_lanes);
                    let at = f.b.muli(&at, &two_bytes);
                    let at = f.b.addi(half.packed, &at);
                    tile_load(f, tile, &at, &b_stride);
                }
                for &(a, t) in tiles {
                    let (c, ta, tb) =
                        (tile_id(f, sum_tile(a, t)), tile_id(f, A_TILE[a]), tile_id(f, B_TILE[t]));
                    f.b.line(format_args!(
                        "llvm.call_intrinsic \"llvm.x86.tdpbf16ps\"({c}, {ta}, {tb}) : (i8, i8, i8) -> ()"
                    ));
                }
            });
            // Row `i`'s 32 sums of the block at `tmp[i * 32 ..]`.
            for &(a, t) in tiles {
                let off = f.b.index((a as i64 * TILE_ROWS * BLOCK_ROWS + t as i64 * TILE_COLS) * 4);
                let at = f.b.addi(&tmp_at, &off);
                tile_store(f, sum_tile(a, t), &at, &tmp_stride);
            }
            let kb = f.b.divui(b0, &cols);
            let w_at = f.b.addi(&w_row, &kb);
            // The weight's scale: one buffer per weight, this half's weight `w` chosen at run time.
            let mut w_scale = f.load(scales.w[0], &w_at);
            for (j, &b) in scales.w.iter().enumerate().skip(1) {
                let s = f.load(b, &w_at);
                let jv = f.b.index(j as i64);
                let is = f.b.op("c", format_args!("arith.cmpi eq, {}, {jv} : index", half.w));
                w_scale = f.select(&is, &s, &w_scale, "f32");
            }
            for_loop(f, &zero, half.rows, &one, |f, i| {
                let m = f.b.addi(half.m0, i);
                let x_at = f.b.muli(&m, &blocks_k);
                let x_at = f.b.addi(&x_at, &kb);
                let x_scale = f.load(scales.x, &x_at);
                let s = f.binf("mulf", &x_scale, &w_scale);
                let sv = f.b.op("sv", format_args!("vector.broadcast {s} : f32 to {vec}"));
                let (v, ty, at) = acc_at(f, i);
                let row = f.b.muli(i, &c32);
                for c in [0, 16] {
                    let off = f.b.index(c);
                    let a_at = f.b.addi(&at, &off);
                    let t_at = f.b.addi(&row, &off);
                    let sum = f.b.op("fs", format_args!("vector.load {tmp}[{t_at}] : {tmp_ty}, {vec}"));
                    let acc = f.b.op("fa", format_args!("vector.load {v}[{a_at}] : {ty}, {vec}"));
                    let next = f.b.op("fa", format_args!("vector.fma {sum}, {sv}, {acc} : {vec}"));
                    f.b.line(format_args!("vector.store {next}, {v}[{a_at}] : {ty}, {vec}"));
                }
            });
        });
        // Several chunks of `K`: after the last, the partial sums become the block's sums.
        if let Some(part) = &pass.partial {
            if_then_else(
                f,
                &part.last,
                |f| {
                    for_loop(f, &zero, half.rows, &one, |f, i| {
                        let (v, ty, at) = acc_at(f, i);
                        let br = f.b.index(BLOCK_ROWS);
                        let r = f.b.muli(half.w, &br);
                        let r = f.b.addi(&r, i);
                        let to = f.b.muli(&r, &nb);
                        let to = f.b.addi(&to, &hc);
                        for c in [0, 16] {
                            let off = f.b.index(c);
                            let a_at = f.b.addi(&at, &off);
                            let s_at = f.b.addi(&to, &off);
                            let y = f.b.op("fa", format_args!("vector.load {v}[{a_at}] : {ty}, {vec}"));
                            f.b.line(format_args!("vector.store {y}, {sums}[{s_at}] : {sums_ty}, {vec}"));
                        }
                    });
                },
                |_| {},
            );
        }
    }

    /// Stores the block's sums for the panel's columns `p .. p_end` from scratch: whole vectors
    /// into the output buffer for a plain `linear` whose panel is full, else element by element
    /// through the store hook.
    fn amx_store(
        &self,
        f: &mut Frame,
        m0: &Value,
        rows: &Value,
        (sums, sums_ty): (&Value, &String),
        (p, p_end): (&Value, &Value),
    ) {
        let width = f.b.subi(p_end, p);
        let nb = f.b.index(NB);
        let full = f.b.op("c", format_args!("arith.cmpi eq, {width}, {nb} : index"));
        let (zero, one) = (f.b.index(0), f.b.index(1));
        let lanes = |f: &mut Frame| {
            for_loop(f, &zero, rows, &one, |f, i| {
                let m = f.b.addi(m0, i);
                let row = f.b.muli(i, &nb);
                self.store_row(f, &m, (p, &width), |f, c, w| {
                    let off = f.b.index(w as i64 * BLOCK_ROWS * NB);
                    let at = f.b.addi(&row, c);
                    let at = f.b.addi(&at, &off);
                    f.b.op("y", format_args!("memref.load {sums}[{at}] : {sums_ty}"))
                });
            });
        };
        match self.direct {
            Some(out) => if_then_else(
                f,
                &full,
                |f| {
                    for_loop(f, &zero, rows, &one, |f, i| {
                        let m = f.b.addi(m0, i);
                        let base = f.b.muli(&m, self.n);
                        let base = f.b.addi(&base, p);
                        let row = f.b.muli(i, &nb);
                        for v in 0..NB / TILE_COLS {
                            let off = f.b.index(v * TILE_COLS);
                            let at = f.b.addi(&row, &off);
                            let vec = super::VEC;
                            let y = f.b.op("y", format_args!("vector.load {sums}[{at}] : {sums_ty}, {vec}"));
                            let idx = f.b.addi(&base, &off);
                            f.store_vec(out, &idx, &y);
                        }
                    });
                },
                lanes,
            ),
            None => lanes(f),
        }
    }
}

/// One weight's 32-column half of a panel in a block of rows ([`Kernel::fp8_half`]): weight `w`,
/// half `h`, its packed slot, the panel `g` of the group, the block's first row and row count,
/// the decoded rows' address and row length, and the packed panels' address.
struct Half<'v> {
    w: &'v Value,
    h: &'v Value,
    slot: &'v Value,
    g: &'v Value,
    m0: &'v Value,
    rows: &'v Value,
    x: &'v Value,
    x_row: &'v Value,
    packed: &'v Value,
}

/// Loads the tile configuration: the sum tiles and row tiles of `x` `first` rows (and `second`
/// for the second row tile, which is otherwise left unused), the packed panel's tiles 16 rows
/// (pairs of `K`); every tile 64 bytes wide.
fn configure(f: &mut Frame, cfg: (&Value, &String), first: &Value, second: Option<&Value>) {
    let (width, rows16) = (f.b.index(ROW_BYTES), f.b.index(TILE_ROWS));
    let mut tiles = vec![
        (sum_tile(0, 0), width.clone(), first.clone()),
        (sum_tile(0, 1), width.clone(), first.clone()),
        (A_TILE[0], width.clone(), first.clone()),
        (B_TILE[0], width.clone(), rows16.clone()),
        (B_TILE[1], width.clone(), rows16),
    ];
    if let Some(second) = second {
        for tile in [sum_tile(1, 0), sum_tile(1, 1), A_TILE[1]] {
            tiles.push((tile, width.clone(), second.clone()));
        }
    }
    load_config(f, cfg, &tiles);
}

/// `ldtilecfg` of palette 1 with `(tile, bytes per row, rows)` for each tile used (each at most
/// 64 and 16); the others are left unconfigured.
fn load_config(f: &mut Frame, (cfg, cfg_ty): (&Value, &String), tiles: &[(i64, Value, Value)]) {
    let byte = |f: &mut Frame, at: i64, v: &Value| {
        let at = f.b.index(at);
        f.b.line(format_args!("memref.store {v}, {cfg}[{at}] : {cfg_ty}"));
    };
    let zero = f.b.op("c", format_args!("arith.constant 0 : i8"));
    for at in 0..64 {
        byte(f, at, &zero);
    }
    let one = f.b.op("c", format_args!("arith.constant 1 : i8"));
    byte(f, 0, &one);
    for (tile, width, rows) in tiles {
        let width = f.b.op("r", format_args!("arith.index_cast {width} : index to i8"));
        let rows = f.b.op("r", format_args!("arith.index_cast {rows} : index to i8"));
        byte(f, 16 + 2 * tile, &width);
        byte(f, 48 + tile, &rows);
    }
    let at = pointer(f, cfg, cfg_ty);
    let p = as_ptr(f, &at);
    f.b.line(format_args!("llvm.call_intrinsic \"llvm.x86.ldtilecfg\"({p}) : (!llvm.ptr) -> ()"));
}

/// A buffer's first byte as an `index` address.
fn pointer(f: &mut Frame, view: &Value, memref: &str) -> Value {
    f.b.op("ptr", format_args!("memref.extract_aligned_pointer_as_index {view} : {memref} -> index"))
}

fn as_ptr(f: &mut Frame, at: &Value) -> Value {
    let i = f.b.op("ptr", format_args!("arith.index_cast {at} : index to i64"));
    f.b.op("ptr", format_args!("llvm.inttoptr {i} : i64 to !llvm.ptr"))
}

fn tile_id(f: &mut Frame, tile: i64) -> Value {
    f.b.op("tile", format_args!("arith.constant {tile} : i8"))
}

/// `tileloadd`: tile `tile`'s rows from `at`, `stride` bytes apart.
fn tile_load(f: &mut Frame, tile: i64, at: &Value, stride: &Value) {
    let (t, p) = (tile_id(f, tile), as_ptr(f, at));
    let s = f.b.op("s", format_args!("arith.index_cast {stride} : index to i64"));
    f.b.line(format_args!(
        "llvm.call_intrinsic \"llvm.x86.tileloadd64\"({t}, {p}, {s}) : (i8, !llvm.ptr, i64) -> ()"
    ));
}

/// `tilestored`: tile `tile`'s rows to `at`, `stride` bytes apart.
fn tile_store(f: &mut Frame, tile: i64, at: &Value, stride: &Value) {
    let (t, p) = (tile_id(f, tile), as_ptr(f, at));
    let s = f.b.op("s", format_args!("arith.index_cast {stride} : index to i64"));
    f.b.line(format_args!(
        "llvm.call_intrinsic \"llvm.x86.tilestored64\"({t}, {p}, {s}) : (i8, !llvm.ptr, i64) -> ()"
    ));
}

/// The rows `from .. to` of one expert of a CPU `grouped_linear` on AMX's tiles, where the input
/// and the expert's weights (`weights`, one view of each weight, `[N, K]` row-major) are bf16 (or
/// FP8 in scale blocks, `fp8`: the input's rows decoded as they are packed, each block of 32
/// weight rows decoded to bf16 into the thread scratch's second MiB before its tiles load it),
/// `N` is a multiple of 32 and `K = kn` of 32. Roles swap against [`Kernel::amx_blocks`]: an
/// expert's weights serve a few rows (about `rows x top_k / experts` in a prefill), so packing them
/// would cost more than their products; the weights are the row tiles instead, loaded straight
/// from their rows, and the input's rows are packed (in blocks of 32, two column tiles of 16 rows'
/// pairs, into the thread scratch). Each block of 32 weight rows sums into four tiles of
/// 16 weight rows by 16 input rows, stored to scratch and read back, transposed, by the store
/// hook. Each output sums its products in order along `K`, as [`Kernel::amx_blocks`] does.
/// FP8: DeepSeek-V3's routed experts in E4M3, each scale block of `K` summed in the tiles and
/// then scaled into f32 accumulators, as [`Kernel::fp8_half`] does for a `linear`.
#[allow(clippy::too_many_arguments)]
pub(in crate::codegen::lower::matmul) fn grouped_rows(
    f: &mut Frame,
    x: usize,
    weights: &[(Value, String)],
    (n, k, kn): (&Value, &Value, u64),
    (from, to): (&Value, &Value),
    store: super::Store,
    fp8: Option<&GroupedFp8>,
) {
    let nw = weights.len();
    let (cfg, cfg_ty) = f.scratch("i8", 64);
    let (sums, sums_ty) = f.scratch("f32", (nw as i64 * BLOCK_ROWS * BLOCK_ROWS) as u64);
    let (xt, xt_ty) = f.thread_scratch(0, "bf16", BLOCK_ROWS as u64 * kn);
    let (xv, xm) = (f.bufs[x].view.clone(), f.bufs[x].memref.clone());
    let xt_at = pointer(f, &xt, &xt_ty);
    let sums_at = pointer(f, &sums, &sums_ty);
    let w_at: Vec<Value> = weights.iter().map(|(v, m)| pointer(f, v, m)).collect();
    let (zero, one, two_bytes) = (f.b.index(0), f.b.index(1), f.b.index(2));
    let (tile_rows, block_rows) = (f.b.index(TILE_ROWS), f.b.index(BLOCK_ROWS));
    let w_stride = f.b.muli(k, &two_bytes);
    let (row_bytes, sums_stride) = (f.b.index(ROW_BYTES), f.b.index(BLOCK_ROWS * 4));
    let step = f.b.index(2 * TILE_COLS);
    // FP8: the expert's block of 32 weight rows decoded (`K` apart) in the scratch's second MiB;
    // each row tile's sums of a scale block; the input rows' scales of the block of rows, per
    // scale block of `K` (`[K / cols, 32]`).
    let dec16 = f.scratch("bf16", 16 * 64);
    let fp8 = fp8.map(|g| {
        let blocks = kn as i64 / g.cols;
        let decoded = f.thread_scratch(super::PACK_BYTES / 2, "bf16", BLOCK_ROWS as u64 * kn);
        let tmp = f.scratch("f32", (BLOCK_ROWS * BLOCK_ROWS) as u64);
        let x_scales = f.scratch("f32", (blocks * BLOCK_ROWS) as u64);
        (g, blocks, decoded, tmp, x_scales)
    });
    for_loop(f, from, to, &block_rows, |f, m0| {
        let end = f.b.addi(m0, &block_rows);
        let end = f.b.minui(&end, to);
        let rows = f.b.subi(&end, m0);
        if let Some((g, blocks, _, _, (xs, xs_ty))) = &fp8 {
            // The block's input scales, `[K / cols, 32]` (rows past its end repeat its last).
            let last = f.b.subi(&end, &one);
            let blocks_v = f.b.index(*blocks);
            for_loop(f, &zero, &block_rows, &one, |f, j| {
                let r = f.b.addi(m0, j);
                let r = f.b.minui(&r, &last);
                let src = f.b.muli(&r, &blocks_v);
                for_loop(f, &zero, &blocks_v, &one, |f, kb| {
                    let at = f.b.addi(&src, kb);
                    let v = f.load(g.x_scales, &at);
                    let to = f.b.muli(kb, &block_rows);
                    let to = f.b.addi(&to, j);
                    f.b.line(format_args!("memref.store {v}, {xs}[{to}] : {xs_ty}"));
                });
            });
        }
        // The block's rows of x as two column tiles' pairs: tile `q`'s row `kp` (a pair of K
        // columns) at element `(q * K / 2 + kp) * 32`, input row `16 q + j`'s pair in lanes `2j`,
        // `2j + 1`. Rows past the block's end repeat its last row (their sums are not stored).
        let last = f.b.subi(&end, &one);
        for q in 0..2i64 {
            let starts: Vec<Value> = (0..TILE_ROWS)
                .map(|j| {
                    let r = f.b.index(q * TILE_ROWS + j);
                    let r = f.b.addi(m0, &r);
                    let r = f.b.minui(&r, &last);
                    f.b.muli(&r, k)
                })
                .collect();
            let kk_step = f.b.index(2 * TILE_COLS);
            let kn_v = f.b.index(kn as i64);
            let lanes = super::LANES_I32;
            let pairs = super::BF16_PAIRS;
            if fp8.is_some() {
                // 64 codes of each row a step, decoded: two tiles' rows of pairs.
                let c64 = f.b.index(64);
                let row0 = f.b.index(q * TILE_ROWS);
                let row0 = f.b.addi(m0, &row0);
                for_loop(f, &zero, &kn_v, &c64, |f, kk| {
                    let dec = (&dec16.0, dec16.1.as_str());
                    let halves = super::decode16(f, (&xv, &xm), (&row0, &last, k, kk), dec);
                    let kp = f.b.divui(kk, &two_bytes);
                    for (h, rows_v) in halves.into_iter().enumerate() {
                        for (t, v) in super::transpose16(f, rows_v).iter().enumerate() {
                            let row = f.b.index(q * kn as i64 / 2 + 16 * h as i64 + t as i64);
                            let row = f.b.addi(&row, &kp);
                            let lanes_per_row = f.b.index(2 * TILE_COLS);
                            let at = f.b.muli(&row, &lanes_per_row);
                            let v = f.b.op("pv", format_args!("vector.bitcast {v} : {lanes} to {pairs}"));
                            f.b.line(format_args!("vector.store {v}, {xt}[{at}] : {xt_ty}, {pairs}"));
                        }
                    }
                });
                continue;
            }
            for_loop(f, &zero, &kn_v, &kk_step, |f, kk| {
                let rows_v: Vec<Value> = starts
                    .iter()
                    .map(|s| {
                        let at = f.b.addi(s, kk);
                        let v = f.b.op("px", format_args!("vector.load {xv}[{at}] : {xm}, {pairs}"));
                        f.b.op("px", format_args!("vector.bitcast {v} : {pairs} to {lanes}"))
                    })
                    .collect();
                let kp = f.b.divui(kk, &two_bytes);
                for (t, v) in super::transpose16(f, rows_v).iter().enumerate() {
                    let row = f.b.index(q * kn as i64 / 2 + t as i64);
                    let row = f.b.addi(&row, &kp);
                    let lanes_per_row = f.b.index(2 * TILE_COLS);
                    let at = f.b.muli(&row, &lanes_per_row);
                    let v = f.b.op("pv", format_args!("vector.bitcast {v} : {lanes} to {pairs}"));
                    f.b.line(format_args!("vector.store {v}, {xt}[{at}] : {xt_ty}, {pairs}"));
                }
            });
        }
        let two = f.b.op("c", format_args!("arith.cmpi ugt, {rows}, {tile_rows} : index"));
        let block = |f: &mut Frame, cols: usize| {
            let tiles: Vec<(usize, usize)> = (0..2).flat_map(|a| (0..cols).map(move |q| (a, q))).collect();
            for_loop(f, &zero, n, &block_rows, |f, n0| {
                for (w, wp) in w_at.iter().enumerate() {
                    let zero_tiles = |f: &mut Frame| {
                        for &(a, q) in &tiles {
                            let tile = tile_id(f, sum_tile(a, q));
                            f.b.line(format_args!(
                                "llvm.call_intrinsic \"llvm.x86.tilezero\"({tile}) : (i8) -> ()"
                            ));
                        }
                    };
                    // The row tiles' source: the weight's rows in place, or (FP8) decoded.
                    let (a_base, a_row, a_first, a_stride) = match &fp8 {
                        None => (wp.clone(), k.clone(), n0.clone(), w_stride.clone()),
                        Some((_, _, (dv, dt), _, _)) => {
                            let (cv, cm) = &weights[w];
                            let kn_v = f.b.index(kn as i64);
                            let c64 = f.b.index(64);
                            for_loop(f, &zero, &block_rows, &one, |f, i| {
                                let r = f.b.addi(n0, i);
                                let src = f.b.muli(&r, k);
                                let dst = f.b.muli(i, &kn_v);
                                for_loop(f, &zero, &kn_v, &c64, |f, kk| {
                                    let at = f.b.addi(&src, kk);
                                    let q = f.b.op(
                                        "wq",
                                        format_args!("vector.load {cv}[{at}] : {cm}, vector<64xi8>"),
                                    );
                                    let [lo, hi] = f.f8_to_bf16_64(&q);
                                    let at = f.b.addi(&dst, kk);
                                    let c32 = f.b.index(32);
                                    let at_hi = f.b.addi(&at, &c32);
                                    let pairs = super::BF16_PAIRS;
                                    f.b.line(format_args!("vector.store {lo}, {dv}[{at}] : {dt}, {pairs}"));
                                    f.b.line(format_args!(
                                        "vector.store {hi}, {dv}[{at_hi}] : {dt}, {pairs}"
                                    ));
                                });
                            });
                            let stride = f.b.index(kn as i64 * 2);
                            (pointer(f, dv, dt), f.b.index(kn as i64), zero.clone(), stride)
                        }
                    };
                    let k_steps = |f: &mut Frame, lo: &Value, hi: &Value| {
                        for_loop(f, lo, hi, &step, |f, kk| {
                            for (a, &tile) in A_TILE.iter().enumerate() {
                                let r = f.b.index(a as i64 * TILE_ROWS);
                                let r = f.b.addi(&a_first, &r);
                                let at = f.b.muli(&r, &a_row);
                                let at = f.b.addi(&at, kk);
                                let at = f.b.muli(&at, &two_bytes);
                                let at = f.b.addi(&a_base, &at);
                                tile_load(f, tile, &at, &a_stride);
                            }
                            let kp = f.b.divui(kk, &two_bytes);
                            for (q, &tile) in B_TILE[..cols].iter().enumerate() {
                                let row = f.b.index(q as i64 * kn as i64 / 2);
                                let row = f.b.addi(&row, &kp);
                                let at = f.b.muli(&row, &row_bytes);
                                let at = f.b.addi(&xt_at, &at);
                                tile_load(f, tile, &at, &row_bytes);
                            }
                            for &(a, q) in &tiles {
                                let (c, ta, tb) = (
                                    tile_id(f, sum_tile(a, q)),
                                    tile_id(f, A_TILE[a]),
                                    tile_id(f, B_TILE[q]),
                                );
                                f.b.line(format_args!(
                                "llvm.call_intrinsic \"llvm.x86.tdpbf16ps\"({c}, {ta}, {tb}) : (i8, i8, i8) -> ()"
                            ));
                            }
                        });
                    };
                    // Weight `w`'s weight row `nn` of the block, input row `j`: `sums` element
                    // `(w * 32 + nn) * 32 + j` (for FP8, its accumulators).
                    let store_tiles = |f: &mut Frame, base: &Value, w: i64| {
                        for &(a, q) in &tiles {
                            let off = ((w * BLOCK_ROWS + a as i64 * TILE_ROWS) * BLOCK_ROWS
                                + q as i64 * TILE_ROWS)
                                * 4;
                            let off = f.b.index(off);
                            let at = f.b.addi(base, &off);
                            tile_store(f, sum_tile(a, q), &at, &sums_stride);
                        }
                    };
                    let Some((g, blocks, _, (tmp, tmp_ty), (xs, xs_ty))) = &fp8 else {
                        zero_tiles(f);
                        k_steps(f, &zero, k);
                        store_tiles(f, &sums_at, w as i64);
                        continue;
                    };
                    let vec = super::VEC;
                    let zero_v = f.b.constant("dense<0.0>", vec);
                    let acc0 = f.b.index(w as i64 * BLOCK_ROWS * BLOCK_ROWS);
                    for_loop(f, &zero, &block_rows, &one, |f, nn| {
                        let at = f.b.muli(nn, &block_rows);
                        let at = f.b.addi(&at, &acc0);
                        let c16 = f.b.index(16);
                        let at16 = f.b.addi(&at, &c16);
                        f.b.line(format_args!("vector.store {zero_v}, {sums}[{at}] : {sums_ty}, {vec}"));
                        f.b.line(format_args!("vector.store {zero_v}, {sums}[{at16}] : {sums_ty}, {vec}"));
                    });
                    let (cols, blocks_v) = (f.b.index(g.cols), f.b.index(*blocks));
                    let w_rows = f.b.index(g.rows);
                    let w_block = f.b.divui(n0, &w_rows);
                    let w_row = f.b.muli(&w_block, &blocks_v);
                    let tmp_at = pointer(f, tmp, tmp_ty);
                    let kn_v = f.b.index(kn as i64);
                    for_loop(f, &zero, &kn_v, &cols, |f, b0| {
                        zero_tiles(f);
                        let b_end = f.b.addi(b0, &cols);
                        k_steps(f, b0, &b_end);
                        store_tiles(f, &tmp_at, 0);
                        let kb = f.b.divui(b0, &cols);
                        let w_at = f.b.addi(&w_row, &kb);
                        let (sv, sm) = &g.w_scales[w];
                        let w_scale = f.load_view(sv, sm, kiln_ir::DType::F32, &w_at);
                        let w_scale = f.b.op("sv", format_args!("vector.broadcast {w_scale} : f32 to {vec}"));
                        let xs_at = f.b.muli(&kb, &block_rows);
                        // Input row `j`'s scale times the weight's, in lanes `j` of two vectors.
                        let scale: Vec<Value> = [0, 16]
                            .iter()
                            .map(|&j0| {
                                let off = f.b.index(j0);
                                let at = f.b.addi(&xs_at, &off);
                                let x = f.b.op("xs", format_args!("vector.load {xs}[{at}] : {xs_ty}, {vec}"));
                                f.b.op("sv", format_args!("arith.mulf {x}, {w_scale} : {vec}"))
                            })
                            .collect();
                        for_loop(f, &zero, &block_rows, &one, |f, nn| {
                            let row = f.b.muli(nn, &block_rows);
                            let acc = f.b.addi(&row, &acc0);
                            for (h, s) in scale.iter().enumerate() {
                                let off = f.b.index(16 * h as i64);
                                let t_at = f.b.addi(&row, &off);
                                let a_at = f.b.addi(&acc, &off);
                                let sum =
                                    f.b.op("fs", format_args!("vector.load {tmp}[{t_at}] : {tmp_ty}, {vec}"));
                                let a = f
                                    .b
                                    .op("fa", format_args!("vector.load {sums}[{a_at}] : {sums_ty}, {vec}"));
                                let next = f.b.op("fa", format_args!("vector.fma {sum}, {s}, {a} : {vec}"));
                                f.b.line(format_args!(
                                    "vector.store {next}, {sums}[{a_at}] : {sums_ty}, {vec}"
                                ));
                            }
                        });
                    });
                }
                for_loop(f, &zero, &rows, &one, |f, j| {
                    let m = f.b.addi(m0, j);
                    let base = f.b.muli(&m, n);
                    let base = f.b.addi(&base, n0);
                    for_loop(f, &zero, &block_rows, &one, |f, nn| {
                        let ys: Vec<Value> = (0..nw)
                            .map(|w| {
                                let row = f.b.index(w as i64 * BLOCK_ROWS);
                                let row = f.b.addi(&row, nn);
                                let at = f.b.muli(&row, &block_rows);
                                let at = f.b.addi(&at, j);
                                f.b.op("y", format_args!("memref.load {sums}[{at}] : {sums_ty}"))
                            })
                            .collect();
                        let idx = f.b.addi(&base, nn);
                        store(f, &idx, &ys);
                    });
                });
            });
        };
        // Weight row tiles: 16 rows of 64 bytes; input tiles: 16 rows (pairs of K) of one 32-bit
        // lane per input row; sum tiles: 16 weight rows of one f32 per input row.
        let four = f.b.index(4);
        let first_cols = f.b.minui(&rows, &tile_rows);
        let first_cols = f.b.muli(&first_cols, &four);
        if fp8.is_some() {
            // FP8: two column tiles whatever the rows (the packed rows past the block's end repeat
            // its last row; their sums are not stored), so that the code is made once.
            let second = f.b.subi(&rows, &tile_rows);
            let second = f.b.op("g", format_args!("arith.maxsi {second}, {one} : index"));
            let second = f.b.minui(&second, &tile_rows);
            let second = f.b.muli(&second, &four);
            configure_grouped(f, (&cfg, &cfg_ty), &first_cols, Some(&second));
            block(f, 2);
        } else {
            if_then_else(
                f,
                &two,
                |f| {
                    let second = f.b.subi(&rows, &tile_rows);
                    let second = f.b.muli(&second, &four);
                    configure_grouped(f, (&cfg, &cfg_ty), &first_cols, Some(&second));
                    block(f, 2);
                },
                |f| {
                    configure_grouped(f, (&cfg, &cfg_ty), &first_cols, None);
                    block(f, 1);
                },
            );
        }
    });
    f.b.line(format_args!("llvm.call_intrinsic \"llvm.x86.tilerelease\"() : () -> ()"));
}

/// The scales of an FP8 `grouped_linear` on AMX ([`grouped_rows`]): the input's scale buffer
/// (`[M, K / cols]`), each of the expert's weights' scale views (`[N / rows, K / cols]`), and the
/// blocks' shape.
pub(in crate::codegen::lower::matmul) struct GroupedFp8 {
    pub x_scales: usize,
    pub w_scales: Vec<(Value, String)>,
    pub cols: i64,
    pub rows: i64,
}

/// The tile configuration of [`grouped_rows`]: the weight row tiles 16 rows of 64 bytes; input
/// column tile `q` and the sum tiles `(a, q)` `first` (`q = 0`) or `second` bytes wide, the input
/// tiles 16 rows (pairs of `K`), the sum tiles 16 (weight rows).
fn configure_grouped(f: &mut Frame, cfg: (&Value, &String), first: &Value, second: Option<&Value>) {
    let width = f.b.index(ROW_BYTES);
    let rows = f.b.index(TILE_ROWS);
    let mut tiles = vec![(A_TILE[0], width.clone(), rows.clone()), (A_TILE[1], width, rows.clone())];
    for (q, cols) in std::iter::once(first).chain(second).enumerate() {
        tiles.push((B_TILE[q], cols.clone(), rows.clone()));
        tiles.push((sum_tile(0, q), cols.clone(), rows.clone()));
        tiles.push((sum_tile(1, q), cols.clone(), rows.clone()));
    }
    load_config(f, cfg, &tiles);
}
