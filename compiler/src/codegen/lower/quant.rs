//! Block-scaled FP8: `quantize`, `dequantize`, and the E4M3 encoding every f8e4m3 load and store
//! goes through.
//!
//! Storage: an f8e4m3 element is its `torch.float8_e4m3fn` bit pattern, one byte (`i8`). Encoding
//! and decoding are integer arithmetic on the f32 bits, the same instructions on both targets, so the
//! CPU tests pin the GPU's behaviour too. The encoding is exactly `kiln_ir::interp::numerics::
//! f8e4m3_from_f32`: round to nearest, ties to even, subnormals down to 2^-9, every magnitude above
//! 448 (infinities included) saturating to ±448, NaN to `S.1111.111` with the input's sign. PTX's
//! `cvt.rn.satfinite.e4m3x2.f32` rounds the same way but drops the sign of NaN, so kiln does not use
//! it: the two would differ only on NaN, and one definition for both targets is worth more than the
//! instruction.
//!
//! `quantize` (DeepSeek's `act_quant`): work items are tiles (one per scale), each computed by one
//! CPU work item or one GPU thread: `amax = max |x|` over the tile (NaN propagates), `max(amax,
//! amax_floor)`, `scale = amax / 448` in f32, rounded up to a power of two with `pow2_scale` (exactly,
//! from the bits, as the interpreter does), then `q = e4m3(x / scale)`. Tiles cover the trailing
//! dimensions; edge tiles are smaller. On the CPU a tile whose rows are whole vectors of 16 (the
//! last block a multiple of 16: DeepSeek's 1 x 128 and 128 x 128) takes its amax and its codes 16
//! elements at a time ([`Frame::f8_encode_vec`], lane by lane the scalar encoding), the rest alone.
//! `dequantize`: `q * scale` in f32 rounded to the result dtype, one element per work item, or on
//! the CPU with a last block a multiple of 16 a row per work item, its tiles in vectors of 16.
//! On the CPU, 2-D operands in `R x 1` tiles (FP8 training's Wgrad operands: 128 tokens by one
//! channel) take 16 tiles side by side ([`quantize_columns`], [`dequantize_columns`]).
//!
//! Not done: one block per tile with a shared-memory amax on the GPU (a thread per tile is correct
//! and simple; weight tiles of 128x128 make it slow, but weights are quantised once, offline).

use kiln_ir::op::QuantSpec;
use kiln_ir::Dim;

use super::elementwise::each_element;
use super::{Frame, LaunchShape, LowerError};
use crate::codegen::mlir::{for_carry, for_loop, if_then, Value};

/// 16 E4M3 codes widened to the f16 bit patterns of their values (times 2^-8).
const F8_HALF_VEC: &str = "vector<16xi16>";

/// `2^-9`, the E4M3 subnormal quantum.
const F8_SUBNORMAL_QUANTUM: f64 = 1.0 / 512.0;

impl Frame<'_> {
    fn i32c(&mut self, v: i64) -> Value {
        self.b.constant(&v.to_string(), "i32")
    }

    fn bini(&mut self, op: &str, a: &Value, b: &Value) -> Value {
        self.b.op("b", format_args!("arith.{op} {a}, {b} : i32"))
    }

    /// The f32 value of an E4M3 byte (`f8e4m3_to_f32`).
    pub(super) fn f8_decode(&mut self, x: &Value) -> Value {
        let c = self.b.op("q", format_args!("arith.extui {x} : i8 to i32"));
        let (m7f, m80, m7) = (self.i32c(0x7F), self.i32c(0x80), self.i32c(7));
        let mag = self.bini("andi", &c, &m7f);
        let s = self.bini("andi", &c, &m80);
        let c24 = self.i32c(24);
        let sign = self.bini("shli", &s, &c24);
        // Normal codes: exponent e - 7 + 127 and mantissa m, i.e. (mag << 20) + (120 << 23).
        let c20 = self.i32c(20);
        let shifted = self.bini("shli", &mag, &c20);
        let bias = self.i32c(120 << 23);
        let normal = self.bini("addi", &shifted, &bias);
        // Subnormal codes: m * 2^-9, exact in f32, with the sign bit put back.
        let m = self.bini("andi", &mag, &m7);
        let mf = self.b.op("q", format_args!("arith.uitofp {m} : i32 to f32"));
        let quantum = self.b.f32(F8_SUBNORMAL_QUANTUM);
        let sub = self.binf("mulf", &mf, &quantum);
        let sub = self.b.op("q", format_args!("arith.bitcast {sub} : f32 to i32"));
        let c8 = self.i32c(8);
        let is_sub = self.b.op("p", format_args!("arith.cmpi ult, {mag}, {c8} : i32"));
        let bits = self.select(&is_sub, &sub, &normal, "i32");
        let is_nan = self.b.op("p", format_args!("arith.cmpi eq, {mag}, {m7f} : i32"));
        let qnan = self.i32c(0x7FC0_0000);
        let bits = self.select(&is_nan, &qnan, &bits, "i32");
        let bits = self.bini("ori", &bits, &sign);
        self.b.op("q", format_args!("arith.bitcast {bits} : i32 to f32"))
    }

    /// `f8_decode` on 16 bytes at once, times 2^-8: a `vector<16xi8>` of codes to a
    /// `vector<16xf32>` (the CPU's vector GEMM loads), through f16. E4M3's seven magnitude bits
    /// `eeeemmm` placed at bits 13..7 of an f16 make the f16 with the same mantissa and exponent
    /// field, normal or subnormal alike, which is the E4M3 value times 2^-8 (exponent bias 15
    /// against 7); the host's half-to-float conversion (F16C's `vcvtph2ps` on x86-64) widens it
    /// exactly, and the NaN codes (magnitude 0x7F) become f16 NaNs first. The callers multiply by
    /// the block scale times 2^8, which rounds once, as `f8_decode(q) * s` does: both powers of two
    /// are exact (for any scale below 2^120; DeepSeek's are at most `f32::MAX / 448`). The bits:
    /// the code sign-extended to 16 bits and shifted left by 7 puts `eeeemmm` at bits 13..7 and the
    /// sign at bits 15 and 14; clearing bit 14 leaves the f16. About a third of the vector
    /// instructions of the integer route.
    pub(super) fn f8_decode_vec_raw(&mut self, x: &Value) -> Value {
        let bits = self.f8_half_bits_vec(x);
        // A NaN code (magnitude 0x7F, found on the bytes) gets the f16 exponent of all ones over its
        // nonzero mantissa: an f16 quiet NaN with its sign, which the widening keeps (a quiet NaN,
        // as `f8_decode`'s, with another payload). Two byte operations and a masked `or`, where
        // the 16-bit test took four and a blend.
        let b7f = self.b.constant("dense<127>", "vector<16xi8>");
        let mag = self.b.op("b", format_args!("arith.andi {x}, {b7f} : vector<16xi8>"));
        let is_nan = self.b.op("p", format_args!("arith.cmpi eq, {mag}, {b7f} : vector<16xi8>"));
        let qnan = self.b.constant("dense<32256>", F8_HALF_VEC);
        let nan = self.b.op("b", format_args!("arith.ori {bits}, {qnan} : {F8_HALF_VEC}"));
        let bits = self
            .b
            .op("s", format_args!("arith.select {is_nan}, {nan}, {bits} : vector<16xi1>, {F8_HALF_VEC}"));
        self.f8_half_to_f32_vec(&bits)
    }

    /// [`Frame::f8_decode_vec_raw`] without its NaN test: a NaN code (magnitude 0x7F) comes out as
    /// the finite 1.875 (480 times 2^-8), so the caller must find those codes on the bytes and make
    /// the result NaN itself, as `fp8_block_sums` does once per 64 codes. Two vector instructions
    /// fewer per 16 codes than the tested decode; FP8 decode is bound by this arithmetic.
    pub(super) fn f8_decode_vec_finite(&mut self, x: &Value) -> Value {
        let bits = self.f8_half_bits_vec(x);
        self.f8_half_to_f32_vec(&bits)
    }

    /// 64 E4M3 codes (a `vector<64xi8>`) as their exact values in bf16, in order: two
    /// `vector<32xbf16>` (codes 0-31, 32-63). Every E4M3 value is a bf16 value (3 mantissa bits,
    /// exponents 2^-9 to 2^8, subnormals included, all normal in bf16), and a NaN code becomes a
    /// bf16 quiet NaN with its sign. The magnitude's 128 values are two tables of bytes, the high
    /// and the low byte of each bf16, looked up 64 codes at a time with AVX512_VBMI's `vpermi2b`
    /// (which reads the low 7 bits of each index byte); the sign is or-ed into the high bytes and
    /// the bytes interleaved into 16-bit lanes. Five vector instructions for 64 codes, where the
    /// f16 route takes about 16 to reach f32; for `vdpbf16ps` ([`Frame::bf16_dot`] in `matmul`).
    pub(super) fn f8_to_bf16_64(&mut self, codes: &Value) -> [Value; 2] {
        const V: &str = "vector<64xi8>";
        let bits = |m: u8| -> u16 {
            let v = kiln_ir::interp::numerics::f8e4m3_to_f32(m);
            if v.is_nan() {
                0x7FC0
            } else {
                (v.to_bits() >> 16) as u16
            }
        };
        // Table `t` half `h`: bytes of magnitudes h * 64 .. h * 64 + 64.
        let table = |f: &mut Self, high: bool, half: u8| {
            let bytes: Vec<String> = (0..64u8)
                .map(|i| {
                    let b = bits(half * 64 + i);
                    let byte = if high { (b >> 8) as u8 } else { b as u8 };
                    (byte as i8).to_string()
                })
                .collect();
            f.b.constant(&format!("dense<[{}]>", bytes.join(", ")), V)
        };
        let lookup = |f: &mut Self, high: bool| {
            let (lo, hi) = (table(f, high, 0), table(f, high, 1));
            f.b.op(
                "t",
                format_args!(
                    "llvm.call_intrinsic \"llvm.x86.avx512.vpermi2var.qi.512\"({lo}, {codes}, {hi}) : \
                     ({V}, {V}, {V}) -> {V}"
                ),
            )
        };
        let (high, low) = (lookup(self, true), lookup(self, false));
        let m80 = self.b.constant("dense<-128>", V);
        let sign = self.b.op("b", format_args!("arith.andi {codes}, {m80} : {V}"));
        let high = self.b.op("b", format_args!("arith.ori {high}, {sign} : {V}"));
        let both = self.b.op("b", format_args!("vector.interleave {low}, {high} : {V} -> vector<128xi8>"));
        let vals = self.b.op("b", format_args!("vector.bitcast {both} : vector<128xi8> to vector<64xbf16>"));
        [0, 32].map(|o| {
            self.b.op(
                "b",
                format_args!(
                    "vector.extract_strided_slice {vals} {{offsets = [{o}], sizes = [32], strides = [1]}} : \
                     vector<64xbf16> to vector<32xbf16>"
                ),
            )
        })
    }

    /// The f16 bit patterns of 16 E4M3 codes, times 2^-8, NaN codes aside (see
    /// [`Frame::f8_decode_vec_raw`]).
    fn f8_half_bits_vec(&mut self, x: &Value) -> Value {
        const VI: &str = F8_HALF_VEC;
        let code = self.b.op("q", format_args!("arith.extsi {x} : vector<16xi8> to {VI}"));
        // 0xBF80 as i16.
        let c7 = self.b.constant("dense<7>", VI);
        let keep = self.b.constant(&format!("dense<{}>", 0xBF80 - 0x1_0000), VI);
        let shifted = self.b.op("b", format_args!("arith.shli {code}, {c7} : {VI}"));
        self.b.op("b", format_args!("arith.andi {shifted}, {keep} : {VI}"))
    }

    fn f8_half_to_f32_vec(&mut self, bits: &Value) -> Value {
        let half = self.b.op("q", format_args!("arith.bitcast {bits} : {F8_HALF_VEC} to vector<16xf16>"));
        self.b.op("q", format_args!("arith.extf {half} : vector<16xf16> to vector<16xf32>"))
    }

    /// The E4M3 byte of an f32 value (`f8e4m3_from_f32`), see the module documentation.
    pub(super) fn f8_encode(&mut self, v: &Value) -> Value {
        let bits = self.b.op("q", format_args!("arith.bitcast {v} : f32 to i32"));
        let c24 = self.i32c(24);
        let hi = self.b.op("q", format_args!("arith.shrui {bits}, {c24} : i32"));
        let m80 = self.i32c(0x80);
        let sign = self.bini("andi", &hi, &m80);
        let abs_mask = self.i32c(0x7FFF_FFFF);
        let abs = self.bini("andi", &bits, &abs_mask);
        let absf = self.b.op("q", format_args!("arith.bitcast {abs} : i32 to f32"));
        // Normal results (|v| >= 2^-6): round the f32 mantissa to 3 bits, ties to even, on the bits;
        // a carry moves into the exponent as it should. Then rebias the exponent from 127 to 7.
        let (c20, c1) = (self.i32c(20), self.i32c(1));
        let lsb = self.bini("shrui", &abs, &c20);
        let lsb = self.bini("andi", &lsb, &c1);
        let half = self.i32c(0x7FFFF);
        let r = self.bini("addi", &abs, &half);
        let r = self.bini("addi", &r, &lsb);
        let r = self.bini("shrui", &r, &c20);
        let rebias = self.i32c(120 << 3);
        let normal = self.bini("subi", &r, &rebias);
        // Subnormal results: round(|v| * 2^9) to an integer, ties to even, by adding and removing
        // 2^23 (|v| * 2^9 < 8, so the sum's last bit has weight 1); 8 is the smallest normal, 0x08.
        let scale = self.b.f32(512.0);
        let t = self.binf("mulf", &absf, &scale);
        let magic = self.b.f32(8_388_608.0);
        let t = self.binf("addf", &t, &magic);
        let t = self.binf("subf", &t, &magic);
        let sub = self.b.op("q", format_args!("arith.fptoui {t} : f32 to i32"));
        let min_normal = self.i32c(0x3C80_0000);
        let is_normal = self.b.op("p", format_args!("arith.cmpi uge, {abs}, {min_normal} : i32"));
        let code = self.select(&is_normal, &normal, &sub, "i32");
        let max = self.b.f32(448.0);
        let over = self.b.op("p", format_args!("arith.cmpf ogt, {absf}, {max} : f32"));
        let c7e = self.i32c(0x7E);
        let code = self.select(&over, &c7e, &code, "i32");
        let inf = self.i32c(0x7F80_0000);
        let is_nan = self.b.op("p", format_args!("arith.cmpi ugt, {abs}, {inf} : i32"));
        let c7f = self.i32c(0x7F);
        let code = self.select(&is_nan, &c7f, &code, "i32");
        let code = self.bini("ori", &code, &sign);
        self.b.op("q", format_args!("arith.trunci {code} : i32 to i8"))
    }

    /// [`Frame::f8_encode`] on 16 values at once: a `vector<16xf32>` to its `vector<16xi8>` of
    /// codes, lane by lane the scalar's operations (so the same bytes).
    fn f8_encode_vec(&mut self, v: &Value) -> Value {
        const VI: &str = "vector<16xi32>";
        const VF: &str = "vector<16xf32>";
        const VB: &str = "vector<16xi1>";
        let ci = |f: &mut Self, c: i64| f.b.constant(&format!("dense<{c}>"), VI);
        let cf = |f: &mut Self, c: f64| f.b.constant(&format!("dense<{c:?}>"), VF);
        let bin = |f: &mut Self, op: &str, a: &Value, b: &Value, ty: &str| {
            f.b.op("b", format_args!("arith.{op} {a}, {b} : {ty}"))
        };
        let sel = |f: &mut Self, c: &Value, a: &Value, b: &Value| {
            f.b.op("s", format_args!("arith.select {c}, {a}, {b} : {VB}, {VI}"))
        };
        let bits = self.b.op("q", format_args!("arith.bitcast {v} : {VF} to {VI}"));
        let c24 = ci(self, 24);
        let hi = bin(self, "shrui", &bits, &c24, VI);
        let m80 = ci(self, 0x80);
        let sign = bin(self, "andi", &hi, &m80, VI);
        let abs_mask = ci(self, 0x7FFF_FFFF);
        let abs = bin(self, "andi", &bits, &abs_mask, VI);
        let absf = self.b.op("q", format_args!("arith.bitcast {abs} : {VI} to {VF}"));
        let (c20, c1) = (ci(self, 20), ci(self, 1));
        let lsb = bin(self, "shrui", &abs, &c20, VI);
        let lsb = bin(self, "andi", &lsb, &c1, VI);
        let half = ci(self, 0x7FFFF);
        let r = bin(self, "addi", &abs, &half, VI);
        let r = bin(self, "addi", &r, &lsb, VI);
        let r = bin(self, "shrui", &r, &c20, VI);
        let rebias = ci(self, 120 << 3);
        let normal = bin(self, "subi", &r, &rebias, VI);
        let scale = cf(self, 512.0);
        let t = bin(self, "mulf", &absf, &scale, VF);
        let magic = cf(self, 8_388_608.0);
        let t = bin(self, "addf", &t, &magic, VF);
        let t = bin(self, "subf", &t, &magic, VF);
        let sub = self.b.op("q", format_args!("arith.fptoui {t} : {VF} to {VI}"));
        let min_normal = ci(self, 0x3C80_0000);
        let is_normal = self.b.op("p", format_args!("arith.cmpi uge, {abs}, {min_normal} : {VI}"));
        let code = sel(self, &is_normal, &normal, &sub);
        let max = cf(self, 448.0);
        let over = self.b.op("p", format_args!("arith.cmpf ogt, {absf}, {max} : {VF}"));
        let c7e = ci(self, 0x7E);
        let code = sel(self, &over, &c7e, &code);
        let inf = ci(self, 0x7F80_0000);
        let is_nan = self.b.op("p", format_args!("arith.cmpi ugt, {abs}, {inf} : {VI}"));
        let c7f = ci(self, 0x7F);
        let code = sel(self, &is_nan, &c7f, &code);
        let code = bin(self, "ori", &code, &sign, VI);
        self.b.op("q", format_args!("arith.trunci {code} : {VI} to vector<16xi8>"))
    }

    /// The smallest power of two >= `s` for finite positive `s`, exactly (`pow2_ceil` of the
    /// interpreter); other values unchanged. Subnormals are scaled by 2^64 first so the exponent
    /// field is meaningful.
    /// 16 E4M3 codes (`vector<16xi8>`) decoded exactly ([`Frame::f8_decode_vec_raw`] times 2^8)
    /// and times `scales` (`vector<16xf32>`), one rounding, as each element alone: a NaN code
    /// gives `f8_decode`'s NaN with the code's sign.
    fn f8_times_scales_vec(&mut self, q: &Value, scales: &Value) -> Value {
        const VF: &str = "vector<16xf32>";
        let up = self.b.constant("dense<256.0>", VF);
        let v = self.f8_decode_vec_raw(q);
        let v = self.b.op("f", format_args!("arith.mulf {v}, {up} : {VF}"));
        let y = self.b.op("f", format_args!("arith.mulf {v}, {scales} : {VF}"));
        let b7f = self.b.constant("dense<127>", "vector<16xi8>");
        let mag = self.b.op("b", format_args!("arith.andi {q}, {b7f} : vector<16xi8>"));
        let is_nan = self.b.op("p", format_args!("arith.cmpi eq, {mag}, {b7f} : vector<16xi8>"));
        let wide = self.b.op("b", format_args!("arith.extsi {q} : vector<16xi8> to vector<16xi32>"));
        let sign = self.b.constant(&format!("dense<{}>", i32::MIN), "vector<16xi32>");
        let sign = self.b.op("b", format_args!("arith.andi {wide}, {sign} : vector<16xi32>"));
        let qnan = self.b.constant("dense<2143289344>", "vector<16xi32>");
        let nan = self.b.op("b", format_args!("arith.ori {sign}, {qnan} : vector<16xi32>"));
        let nan = self.b.op("f", format_args!("arith.bitcast {nan} : vector<16xi32> to {VF}"));
        self.b.op("s", format_args!("arith.select {is_nan}, {nan}, {y} : vector<16xi1>, {VF}"))
    }

    fn pow2_ceil(&mut self, s: &Value) -> Value {
        let bits = self.b.op("q", format_args!("arith.bitcast {s} : f32 to i32"));
        let min_normal = self.i32c(0x0080_0000);
        let is_sub = self.b.op("p", format_args!("arith.cmpi ult, {bits}, {min_normal} : i32"));
        let up = self.b.f32(2f64.powi(64));
        let scaled = self.binf("mulf", s, &up);
        let x = self.select(&is_sub, &scaled, s, "f32");
        let xb = self.b.op("q", format_args!("arith.bitcast {x} : f32 to i32"));
        let mant_mask = self.i32c(0x007F_FFFF);
        let mant = self.bini("andi", &xb, &mant_mask);
        let c23 = self.i32c(23);
        let c1 = self.i32c(1);
        let e = self.bini("shrui", &xb, &c23);
        let e = self.bini("addi", &e, &c1);
        let next = self.bini("shli", &e, &c23);
        let zero = self.i32c(0);
        let exact = self.b.op("p", format_args!("arith.cmpi eq, {mant}, {zero} : i32"));
        let pb = self.select(&exact, &xb, &next, "i32");
        let p = self.b.op("q", format_args!("arith.bitcast {pb} : i32 to f32"));
        let down = self.b.f32(2f64.powi(-64));
        let unscaled = self.binf("mulf", &p, &down);
        let p = self.select(&is_sub, &unscaled, &p, "f32");
        let fzero = self.b.f32(0.0);
        let finf = self.b.f32(f64::INFINITY);
        let pos = self.b.op("p", format_args!("arith.cmpf ogt, {s}, {fzero} : f32"));
        let fin = self.b.op("p", format_args!("arith.cmpf olt, {s}, {finf} : f32"));
        let ok = self.b.op("p", format_args!("arith.andi {pos}, {fin} : i1"));
        self.select(&ok, &p, s, "f32")
    }
}

/// The tiling of an operand: per dimension, its size, its stride, its tile size (1 for leading
/// dimensions), its number of tiles, and the scales' size along it (the number of tiles, or for a
/// dimension that is symbolic in the types the dimension itself, padded with zeros after the last
/// tile: `kiln_ir::infer::scale_shape`).
struct Tiles {
    dims: Vec<Value>,
    strides: Vec<Value>,
    block: Vec<Value>,
    counts: Vec<Value>,
    slots: Vec<Value>,
}

fn tiles_of(
    f: &mut Frame,
    op: &str,
    shape: &[Dim],
    block: &[u64],
    scales: &[Dim],
) -> Result<Tiles, LowerError> {
    if block.is_empty() || block.len() > shape.len() || scales.len() != shape.len() {
        return Err(f.unsupported(op, format!("block {block:?} does not fit the shape")));
    }
    let lead = shape.len() - block.len();
    let mut t = Tiles {
        dims: Vec::new(),
        strides: Vec::new(),
        block: Vec::new(),
        counts: Vec::new(),
        slots: Vec::new(),
    };
    for (k, &d) in shape.iter().enumerate() {
        let dv = f.dim(d);
        let stride = f.prod(&shape[k + 1..]);
        let b = if k < lead { 1 } else { block[k - lead] };
        let bv = f.b.index(b as i64);
        // ceil(d / b) = (d + b - 1) / b
        let bm1 = f.b.index(b as i64 - 1);
        let sum = f.b.addi(&dv, &bm1);
        let count = f.b.divui(&sum, &bv);
        t.dims.push(dv);
        t.strides.push(stride);
        t.block.push(bv);
        t.counts.push(count);
        let slots = f.dim(scales[k]);
        t.slots.push(slots);
    }
    Ok(t)
}

/// The tile coordinates of scale index `tile` (scales are row-major over the slots).
fn tile_coords(f: &mut Frame, tiles: &Tiles, tile: &Value) -> Vec<Value> {
    let mut rest = tile.clone();
    let mut coords = vec![rest.clone(); tiles.slots.len()];
    for k in (0..tiles.slots.len()).rev() {
        coords[k] = if k == 0 { rest.clone() } else { f.b.remui(&rest, &tiles.slots[k]) };
        if k > 0 {
            rest = f.b.divui(&rest, &tiles.slots[k]);
        }
    }
    coords
}

/// Folds `step(f, element index, acc)` over the elements of the tile at `coords` (dimension `k` and
/// inward; `base` is the offset of the dimensions before `k`).
fn fold_tile(
    f: &mut Frame,
    tiles: &Tiles,
    coords: &[Value],
    k: usize,
    base: &Value,
    acc: Value,
    step: &dyn Fn(&mut Frame, &Value, &Value) -> Value,
) -> Value {
    if k == tiles.dims.len() {
        return step(f, base, &acc);
    }
    let start = f.b.muli(&coords[k], &tiles.block[k]);
    let end = f.b.addi(&start, &tiles.block[k]);
    let end = f.b.minui(&end, &tiles.dims[k]);
    let one = f.b.index(1);
    for_carry(f, &start, &end, &one, &[(acc, "f32")], |f, i, acc| {
        let off = f.b.muli(i, &tiles.strides[k]);
        let idx = f.b.addi(base, &off);
        vec![fold_tile(f, tiles, coords, k + 1, &idx, acc[0].clone(), step)]
    })
    .remove(0)
}

/// Runs `body(f, element index)` for every element of the tile at `coords`.
fn each_in_tile(
    f: &mut Frame,
    tiles: &Tiles,
    coords: &[Value],
    k: usize,
    base: &Value,
    body: &dyn Fn(&mut Frame, &Value),
) {
    if k == tiles.dims.len() {
        return body(f, base);
    }
    let start = f.b.muli(&coords[k], &tiles.block[k]);
    let end = f.b.addi(&start, &tiles.block[k]);
    let end = f.b.minui(&end, &tiles.dims[k]);
    let one = f.b.index(1);
    for_loop(f, &start, &end, &one, |f, i| {
        let off = f.b.muli(i, &tiles.strides[k]);
        let idx = f.b.addi(base, &off);
        each_in_tile(f, tiles, coords, k + 1, &idx, body);
    });
}

pub(super) fn quantize(f: &mut Frame, spec: &QuantSpec) -> Result<LaunchShape, LowerError> {
    let shape = f.bufs[0].ty.shape.clone();
    let scales = f.result(1).ty.shape.clone();
    let tiles = tiles_of(f, "quantize", &shape, &spec.block, &scales)?;
    let n = f.result(1).ty.numel().ok_or_else(|| f.unsupported("quantize", "too many tiles"))?;
    let (q_buf, s_buf) = (f.kernel.args.len(), f.kernel.args.len() + 1);
    let codes = f.result(0).ty.dtype == kiln_ir::DType::F8E4M3;
    if let (Some(cols), true) = (column_tiles(f, &shape, &spec.block), codes) {
        let groups = cols.div_ceil(16);
        let work = scales[0]
            .checked_mul(Dim::known(groups))
            .ok_or_else(|| f.unsupported("quantize", "too many tiles"))?;
        return Ok(quantize_columns(f, spec, &tiles, cols, work, (q_buf, s_buf)));
    }
    Ok(each_element(f, n, |f, tile| {
        let coords = tile_coords(f, &tiles, tile);
        // A padding slot (a coordinate at or past its dimension's tile count) holds 0.
        let mut pad = f.b.constant("0", "i1");
        for (c, count) in coords.iter().zip(&tiles.counts) {
            let past = f.cmp("uge", c, count, "index");
            pad = f.b.op("p", format_args!("arith.ori {pad}, {past} : i1"));
        }
        if_then(f, &pad, |f| {
            let fzero = f.b.f32(0.0);
            f.store(s_buf, tile, &fzero);
        });
        let yes = f.b.constant("1", "i1");
        let keep = f.b.op("p", format_args!("arith.xori {pad}, {yes} : i1"));
        if_then(f, &keep, |f| quantize_tile(f, spec, &tiles, &coords, tile, (q_buf, s_buf)));
    }))
}

/// Quantises the tile at `coords`, whose scale is slot `tile`.
fn quantize_tile(
    f: &mut Frame,
    spec: &QuantSpec,
    tiles: &Tiles,
    coords: &[Value],
    tile: &Value,
    (q_buf, s_buf): (usize, usize),
) {
    // On the CPU, a tile whose rows are whole vectors of 16 (DeepSeek's 1 x 128 and 128 x 128)
    // takes its amax and its codes 16 elements at a time, the rest alone.
    let last = tiles.dims.len() - 1;
    let vector = f.target == super::Target::Cpu
        && f.kernel.args.len() == 1
        && f.result(0).ty.dtype == kiln_ir::DType::F8E4M3
        && matches!(f.bufs[0].ty.dtype, kiln_ir::DType::F32 | kiln_ir::DType::BF16 | kiln_ir::DType::F16)
        && spec.block.last().is_some_and(|b| b % 16 == 0);
    if vector {
        return quantize_tile_vec(f, spec, tiles, coords, tile, (q_buf, s_buf), last);
    }
    {
        let zero = f.b.index(0);
        let init = f.b.f32(0.0);
        let amax = fold_tile(f, tiles, coords, 0, &zero, init, &|f, i, acc| {
            let x = f.load(0, i);
            let a = f.unary(kiln_ir::UnaryOp::Abs, &x);
            // maximumf propagates NaN, as the interpreter's amax does.
            f.binf("maximumf", acc, &a)
        });
        let floor = f.b.f32(spec.amax_floor);
        let floored = f.binf("maximumf", &amax, &floor);
        let nan = f.b.op("p", format_args!("arith.cmpf uno, {amax}, {amax} : f32"));
        let amax = f.select(&nan, &amax, &floored, "f32");
        let max = f.b.f32(448.0);
        let scale = f.binf("divf", &amax, &max);
        let scale = if spec.pow2_scale { f.pow2_ceil(&scale) } else { scale };
        f.store(s_buf, tile, &scale);
        each_in_tile(f, tiles, coords, 0, &zero, &|f, i| {
            let x = f.load(0, i);
            let q = f.binf("divf", &x, &scale);
            f.store(q_buf, i, &q);
        });
    }
}

/// `dequantize` on the CPU with a work item per row (the last dimension), each of its tiles in
/// vectors of 16 and then alone: the codes decoded exactly ([`Frame::f8_decode_vec_raw`] times
/// 2^8), times the tile's scale, one rounding, as each element alone.
fn dequantize_rows(f: &mut Frame, tiles: &Tiles, rows: Dim, out: usize) -> LaunchShape {
    const VF: &str = "vector<16xf32>";
    let last = tiles.dims.len() - 1;
    let (lo, hi) = f.range.clone().expect("CPU frames have a work range");
    let (zero, one, sixteen) = (f.b.index(0), f.b.index(1), f.b.index(16));
    let (view, memref) = (f.bufs[0].view.clone(), f.bufs[0].memref.clone());
    for_loop(f, &lo, &hi, &one, |f, r| {
        // The row's scale slot of tile 0 (row-major over the slots), from its coordinates.
        let mut rest = r.clone();
        let mut slot = f.b.index(0);
        let mut stride = tiles.slots[last].clone();
        for k in (0..last).rev() {
            let c = if k == 0 { rest.clone() } else { f.b.remui(&rest, &tiles.dims[k]) };
            if k > 0 {
                rest = f.b.divui(&rest, &tiles.dims[k]);
            }
            let t = f.b.divui(&c, &tiles.block[k]);
            let term = f.b.muli(&t, &stride);
            slot = f.b.addi(&slot, &term);
            stride = f.b.muli(&stride, &tiles.slots[k]);
        }
        let base = f.b.muli(r, &tiles.dims[last]);
        for_loop(f, &zero, &tiles.counts[last], &one, |f, t| {
            let at = f.b.addi(&slot, t);
            let s = f.load(1, &at);
            let vs = f.b.op("s", format_args!("vector.broadcast {s} : f32 to {VF}"));
            let start = f.b.muli(t, &tiles.block[last]);
            let end = f.b.addi(&start, &tiles.block[last]);
            let end = f.b.minui(&end, &tiles.dims[last]);
            let count = f.b.subi(&end, &start);
            let whole = f.b.divui(&count, &sixteen);
            let whole = f.b.muli(&whole, &sixteen);
            let split = f.b.addi(&start, &whole);
            for_loop(f, &start, &split, &sixteen, |f, i| {
                let i = f.b.addi(&base, i);
                let q = f.b.op("q", format_args!("vector.load {view}[{i}] : {memref}, vector<16xi8>"));
                let y = f.f8_times_scales_vec(&q, &vs);
                f.store_vec(out, &i, &y);
            });
            for_loop(f, &split, &end, &one, |f, i| {
                let i = f.b.addi(&base, i);
                let q = f.load(0, &i);
                let y = f.binf("mulf", &q, &s);
                f.store(out, &i, &y);
            });
        });
    });
    LaunchShape::Cpu { work: rows }
}

/// [`quantize_tile`] with each row of the tile (along the last dimension, stride 1) in vectors
/// of 16 and then alone: the amax is the same maximum in any order, and each element's code the
/// scalar's.
fn quantize_tile_vec(
    f: &mut Frame,
    spec: &QuantSpec,
    tiles: &Tiles,
    coords: &[Value],
    tile: &Value,
    (q_buf, s_buf): (usize, usize),
    last: usize,
) {
    const VF: &str = "vector<16xf32>";
    let zero = f.b.index(0);
    let (one, sixteen) = (f.b.index(1), f.b.index(16));
    // The row's range, its end in whole vectors.
    let row = |f: &mut Frame, c: &Value| {
        let start = f.b.muli(c, &tiles.block[last]);
        let end = f.b.addi(&start, &tiles.block[last]);
        let end = f.b.minui(&end, &tiles.dims[last]);
        let count = f.b.subi(&end, &start);
        let whole = f.b.divui(&count, &sixteen);
        let whole = f.b.muli(&whole, &sixteen);
        let split = f.b.addi(&start, &whole);
        (start, split, end)
    };
    let init = f.b.f32(0.0);
    let amax = fold_rows(f, tiles, coords, 0, &zero, init, last, &|f, base, acc| {
        let (start, split, end) = row(f, &coords[last]);
        let vzero = f.b.constant("dense<0.0>", VF);
        let v = for_carry(f, &start, &split, &sixteen, &[(vzero, VF)], |f, i, vacc| {
            let at = f.b.addi(base, i);
            let x = f.load_vec(0, &at);
            let neg = f.b.op("f", format_args!("arith.negf {x} : {VF}"));
            let a = f.b.op("f", format_args!("arith.maximumf {x}, {neg} : {VF}"));
            vec![f.b.op("f", format_args!("arith.maximumf {}, {a} : {VF}", vacc[0]))]
        })
        .remove(0);
        let r = f.b.op("f", format_args!("vector.reduction <maximumf>, {v} : {VF} into f32"));
        let acc = f.binf("maximumf", acc, &r);
        for_carry(f, &split, &end, &one, &[(acc, "f32")], |f, i, acc| {
            let at = f.b.addi(base, i);
            let x = f.load(0, &at);
            let a = f.unary(kiln_ir::UnaryOp::Abs, &x);
            vec![f.binf("maximumf", &acc[0], &a)]
        })
        .remove(0)
    });
    let floor = f.b.f32(spec.amax_floor);
    let floored = f.binf("maximumf", &amax, &floor);
    let nan = f.b.op("p", format_args!("arith.cmpf uno, {amax}, {amax} : f32"));
    let amax = f.select(&nan, &amax, &floored, "f32");
    let max = f.b.f32(448.0);
    let scale = f.binf("divf", &amax, &max);
    let scale = if spec.pow2_scale { f.pow2_ceil(&scale) } else { scale };
    f.store(s_buf, tile, &scale);
    let vscale = f.b.op("s", format_args!("vector.broadcast {scale} : f32 to {VF}"));
    let (qview, qmemref) = (f.bufs[q_buf].view.clone(), f.bufs[q_buf].memref.clone());
    each_row(f, tiles, coords, 0, &zero, last, &|f, base| {
        let (start, split, end) = row(f, &coords[last]);
        for_loop(f, &start, &split, &sixteen, |f, i| {
            let at = f.b.addi(base, i);
            let x = f.load_vec(0, &at);
            let q = f.b.op("f", format_args!("arith.divf {x}, {vscale} : {VF}"));
            let codes = f.f8_encode_vec(&q);
            f.b.line(format_args!("vector.store {codes}, {qview}[{at}] : {qmemref}, vector<16xi8>"));
        });
        for_loop(f, &split, &end, &one, |f, i| {
            let at = f.b.addi(base, i);
            let x = f.load(0, &at);
            let q = f.binf("divf", &x, &scale);
            f.store(q_buf, &at, &q);
        });
    });
}

/// The CPU's column tiles: a 2-D operand in tiles of `R x 1` (FP8 training's Wgrad operands, 128
/// tokens by one channel) with a known number of columns, whose tiles side by side along a row are
/// contiguous. Returns the columns.
fn column_tiles(f: &Frame, shape: &[Dim], block: &[u64]) -> Option<u64> {
    let cpu = f.target == super::Target::Cpu;
    let first = &f.bufs[0].ty;
    let plain =
        |d: kiln_ir::DType| matches!(d, kiln_ir::DType::F32 | kiln_ir::DType::BF16 | kiln_ir::DType::F16);
    let operands = (first.dtype == kiln_ir::DType::F8E4M3
        || (plain(first.dtype) && f.kernel.args.len() == 1))
        && (first.dtype != kiln_ir::DType::F8E4M3 || f.kernel.args.len() == 2);
    (cpu && operands && shape.len() == 2 && block.len() == 2 && block[1] == 1 && block[0] >= 1)
        .then(|| shape[1].as_known())
        .flatten()
        .filter(|&c| c > 0)
}

/// `quantize` in `R x 1` tiles on the CPU ([`column_tiles`]): a work item per row of tiles and
/// group of 16 columns, the 16 tiles of a group side by side: their amaxes as one vector over the
/// tile's rows, their scales and codes 16 at a time (each lane the scalar's: the same maximum, the
/// same division, [`Frame::f8_encode_vec`]), a last group narrower than 16 tile by tile as
/// [`quantize_tile`] does it. Padding rows of scales (a symbolic row count) hold zeros. A work item
/// per tile had read each row's 16 values one at a time, and a padded slot cost a work item of its
/// own (127 of 128 along FP8 training's tokens).
fn quantize_columns(
    f: &mut Frame,
    spec: &QuantSpec,
    tiles: &Tiles,
    cols: u64,
    work: Dim,
    (q_buf, s_buf): (usize, usize),
) -> LaunchShape {
    const VF: &str = "vector<16xf32>";
    let groups = cols.div_ceil(16);
    let (lo, hi) = f.range.clone().expect("CPU frames have a work range");
    let (one, sixteen) = (f.b.index(1), f.b.index(16));
    let (gv, cv, full) = (f.b.index(groups as i64), f.b.index(cols as i64), f.b.index((cols / 16) as i64));
    let (qview, qmemref) = (f.bufs[q_buf].view.clone(), f.bufs[q_buf].memref.clone());
    for_loop(f, &lo, &hi, &one, |f, item| {
        let t = f.b.divui(item, &gv);
        let g = f.b.remui(item, &gv);
        let c0 = f.b.muli(&g, &sixteen);
        let trow = f.b.muli(&t, &cv);
        let slot0 = f.b.addi(&trow, &c0);
        let pad = f.cmp("uge", &t, &tiles.counts[0], "index");
        let end_c = f.b.addi(&c0, &sixteen);
        let end_c = f.b.minui(&end_c, &cv);
        if_then(f, &pad, |f| {
            let fzero = f.b.f32(0.0);
            for_loop(f, &c0, &end_c, &one, |f, c| {
                let at = f.b.addi(&trow, c);
                f.store(s_buf, &at, &fzero);
            });
        });
        let yes = f.b.constant("1", "i1");
        let keep = f.b.op("p", format_args!("arith.xori {pad}, {yes} : i1"));
        let whole = f.cmp("ult", &g, &full, "index");
        let vector = f.b.op("p", format_args!("arith.andi {keep}, {whole} : i1"));
        let r0 = f.b.muli(&t, &tiles.block[0]);
        let r1 = f.b.addi(&r0, &tiles.block[0]);
        let r1 = f.b.minui(&r1, &tiles.dims[0]);
        if_then(f, &vector, |f| {
            let vzero = f.b.constant("dense<0.0>", VF);
            let amax = for_carry(f, &r0, &r1, &one, &[(vzero, VF)], |f, r, acc| {
                let base = f.b.muli(r, &cv);
                let at = f.b.addi(&base, &c0);
                let x = f.load_vec(0, &at);
                let neg = f.b.op("f", format_args!("arith.negf {x} : {VF}"));
                let a = f.b.op("f", format_args!("arith.maximumf {x}, {neg} : {VF}"));
                vec![f.b.op("f", format_args!("arith.maximumf {}, {a} : {VF}", acc[0]))]
            })
            .remove(0);
            let floor = f.b.f32(spec.amax_floor);
            let floor = f.b.op("s", format_args!("vector.broadcast {floor} : f32 to {VF}"));
            let floored = f.b.op("f", format_args!("arith.maximumf {amax}, {floor} : {VF}"));
            let nan = f.b.op("p", format_args!("arith.cmpf uno, {amax}, {amax} : {VF}"));
            let amax =
                f.b.op("s", format_args!("arith.select {nan}, {amax}, {floored} : vector<16xi1>, {VF}"));
            let max = f.b.constant("dense<448.0>", VF);
            let mut scale = f.b.op("f", format_args!("arith.divf {amax}, {max} : {VF}"));
            if spec.pow2_scale {
                for lane in 0..16 {
                    let x = f.b.op("s", format_args!("vector.extract {scale}[{lane}] : f32 from {VF}"));
                    let p = f.pow2_ceil(&x);
                    scale = f.b.op("s", format_args!("vector.insert {p}, {scale} [{lane}] : f32 into {VF}"));
                }
            }
            f.store_vec(s_buf, &slot0, &scale);
            for_loop(f, &r0, &r1, &one, |f, r| {
                let base = f.b.muli(r, &cv);
                let at = f.b.addi(&base, &c0);
                let x = f.load_vec(0, &at);
                let q = f.b.op("f", format_args!("arith.divf {x}, {scale} : {VF}"));
                let codes = f.f8_encode_vec(&q);
                f.b.line(format_args!("vector.store {codes}, {qview}[{at}] : {qmemref}, vector<16xi8>"));
            });
        });
        let narrow = f.b.op("p", format_args!("arith.xori {whole}, {yes} : i1"));
        let narrow = f.b.op("p", format_args!("arith.andi {keep}, {narrow} : i1"));
        if_then(f, &narrow, |f| {
            for_loop(f, &c0, &end_c, &one, |f, c| {
                let slot = f.b.addi(&trow, c);
                quantize_tile(f, spec, tiles, &[t.clone(), c.clone()], &slot, (q_buf, s_buf));
            });
        });
    });
    LaunchShape::Cpu { work }
}

/// `dequantize` in `R x 1` tiles on the CPU ([`column_tiles`]): a work item per row, each group
/// of 16 columns decoded as [`dequantize_rows`] decodes and times its 16 scales (one row of the
/// scales, contiguous), a last group narrower than 16 element by element.
fn dequantize_columns(f: &mut Frame, tiles: &Tiles, cols: u64, rows: Dim, out: usize) -> LaunchShape {
    let (lo, hi) = f.range.clone().expect("CPU frames have a work range");
    let (zero, one, sixteen) = (f.b.index(0), f.b.index(1), f.b.index(16));
    let cv = f.b.index(cols as i64);
    let split = f.b.index((cols / 16 * 16) as i64);
    let (view, memref) = (f.bufs[0].view.clone(), f.bufs[0].memref.clone());
    for_loop(f, &lo, &hi, &one, |f, r| {
        let t = f.b.divui(r, &tiles.block[0]);
        let srow = f.b.muli(&t, &tiles.slots[1]);
        let base = f.b.muli(r, &cv);
        for_loop(f, &zero, &split, &sixteen, |f, c| {
            let i = f.b.addi(&base, c);
            let at = f.b.addi(&srow, c);
            let vs = f.load_vec(1, &at);
            let q = f.b.op("q", format_args!("vector.load {view}[{i}] : {memref}, vector<16xi8>"));
            let y = f.f8_times_scales_vec(&q, &vs);
            f.store_vec(out, &i, &y);
        });
        for_loop(f, &split, &cv, &one, |f, c| {
            let i = f.b.addi(&base, c);
            let at = f.b.addi(&srow, c);
            let q = f.load(0, &i);
            let s = f.load(1, &at);
            let y = f.binf("mulf", &q, &s);
            f.store(out, &i, &y);
        });
    });
    LaunchShape::Cpu { work: rows }
}

/// Runs `row(f, row base)` for every row of the tile at `coords` (see [`fold_rows`]).
fn each_row(
    f: &mut Frame,
    tiles: &Tiles,
    coords: &[Value],
    k: usize,
    base: &Value,
    last: usize,
    row: &dyn Fn(&mut Frame, &Value),
) {
    if k == last {
        return row(f, base);
    }
    let start = f.b.muli(&coords[k], &tiles.block[k]);
    let end = f.b.addi(&start, &tiles.block[k]);
    let end = f.b.minui(&end, &tiles.dims[k]);
    let one = f.b.index(1);
    for_loop(f, &start, &end, &one, |f, i| {
        let off = f.b.muli(i, &tiles.strides[k]);
        let idx = f.b.addi(base, &off);
        each_row(f, tiles, coords, k + 1, &idx, last, row);
    });
}

/// Folds `row(f, row base, acc)` over the rows of the tile at `coords`: its elements along every
/// dimension before `last` (dimension `k` and inward; `base` is the offset of the dimensions
/// before `k`, and a row's base is the offset of its element 0 of dimension `last`).
#[allow(clippy::too_many_arguments)]
fn fold_rows(
    f: &mut Frame,
    tiles: &Tiles,
    coords: &[Value],
    k: usize,
    base: &Value,
    acc: Value,
    last: usize,
    row: &dyn Fn(&mut Frame, &Value, &Value) -> Value,
) -> Value {
    if k == last {
        return row(f, base, &acc);
    }
    let start = f.b.muli(&coords[k], &tiles.block[k]);
    let end = f.b.addi(&start, &tiles.block[k]);
    let end = f.b.minui(&end, &tiles.dims[k]);
    let one = f.b.index(1);
    for_carry(f, &start, &end, &one, &[(acc, "f32")], |f, i, acc| {
        let off = f.b.muli(i, &tiles.strides[k]);
        let idx = f.b.addi(base, &off);
        vec![fold_rows(f, tiles, coords, k + 1, &idx, acc[0].clone(), last, row)]
    })
    .remove(0)
}

pub(super) fn dequantize(f: &mut Frame, block: &[u64]) -> Result<LaunchShape, LowerError> {
    let shape = f.bufs[0].ty.shape.clone();
    let scales = f.bufs[1].ty.shape.clone();
    let tiles = tiles_of(f, "dequantize", &shape, block, &scales)?;
    let n = f.result(0).ty.numel().ok_or_else(|| f.unsupported("dequantize", "too many elements"))?;
    let out = f.kernel.args.len();
    let last = shape.len() - 1;
    let rows = shape[..last].iter().try_fold(Dim::known(1), |a, &d| a.checked_mul(d));
    let vector = f.target == super::Target::Cpu
        && f.bufs[0].ty.dtype == kiln_ir::DType::F8E4M3
        && matches!(f.bufs[out].ty.dtype, kiln_ir::DType::F32 | kiln_ir::DType::BF16 | kiln_ir::DType::F16)
        && block.last().is_some_and(|b| b % 16 == 0);
    if let (true, Some(rows)) = (vector, rows) {
        return Ok(dequantize_rows(f, &tiles, rows, out));
    }
    let to = f.bufs[out].ty.dtype;
    if let (Some(cols), true) = (
        column_tiles(f, &shape, block),
        matches!(to, kiln_ir::DType::F32 | kiln_ir::DType::BF16 | kiln_ir::DType::F16),
    ) {
        return Ok(dequantize_columns(f, &tiles, cols, shape[0], out));
    }
    Ok(each_element(f, n, |f, i| {
        // The element's coordinates, then its tile's scale index (row-major over tile counts).
        let mut rest = i.clone();
        let mut slot = f.b.index(0);
        let mut stride = f.b.index(1);
        for k in (0..tiles.dims.len()).rev() {
            let c = if k == 0 { rest.clone() } else { f.b.remui(&rest, &tiles.dims[k]) };
            if k > 0 {
                rest = f.b.divui(&rest, &tiles.dims[k]);
            }
            let t = f.b.divui(&c, &tiles.block[k]);
            let term = f.b.muli(&t, &stride);
            slot = f.b.addi(&slot, &term);
            stride = f.b.muli(&stride, &tiles.slots[k]);
        }
        let q = f.load(0, i);
        let s = f.load(1, &slot);
        let y = f.binf("mulf", &q, &s);
        f.store(out, i, &y);
    }))
}
