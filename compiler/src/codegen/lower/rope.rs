//! Rotary position embedding: `rope` on `x[B, T, ..., D]` at `positions[B, T]`, interleaved pairs
//! `(x[2j], x[2j+1])` or halves `(x[j], x[j + D/2])`.
//!
//! Work items are pairs (one CPU work item or one GPU thread, 256 per block, per pair): pair `j` of
//! the vector `v` (`v` runs over `B * T * heads`) is rotated by `angle = f32(position) * inv_freq[j]`,
//! an f32 product as in the interpreter. The frequencies, YaRN included, are computed at compile
//! time by the interpreter's own function ([`kiln_ir::interp::rope_inv_freq`], f64 rounded to f32)
//! and embedded as a constant vector indexed by `j`.
//!
//! Sine and cosine are computed by the same arithmetic on both targets (libm is not available on the
//! GPU and NVVM's `sin.approx` loses all accuracy for large angles): the angle is reduced by
//! `k = round(angle * 2/pi)` with a three-part Cody-Waite `pi/2` applied with fused multiply-adds,
//! then evaluated with Cephes' `sinf`/`cosf` polynomials on `[-pi/4, pi/4]` and the quadrant of `k`.
//! The absolute error is below 1e-7 for `|angle| < 2^17` (DeepSeek-V3's largest angle is its 163840
//! positions times `inv_freq[0] = 1`); beyond 2^17 the reduction loses accuracy, and beyond 2^22 it
//! is meaningless (so is an f32 angle there: its ulp exceeds 1). The interpreter's cos/sin are f64
//! functions of the same f32 angle rounded to f32, so the two agree to about 1.5 f32 ulp.
//!
//! The rotation `x0 * cos - x1 * sin`, `x0 * sin + x1 * cos` is one multiply and one fused
//! multiply-add per output, in f32 (the interpreter: f64, rounded once), then rounded to the dtype.
//!
//! `inverse` (the gradient of `rope`, the transposed rotation) is the same kernel with the sine
//! negated after it is computed, as in the interpreter: the same angle, cosine and sine as the
//! forward kernel, so the two rotations are exactly each other's transpose.

use kiln_ir::op::RopeConfig;
use kiln_ir::DType;

use super::elementwise::each_element;
use super::{Frame, LaunchShape, LowerError};
use crate::codegen::mlir::{f32_literal, Value};

/// `pi/2 = C1 + C2 + C3` to about 72 bits: each part is the f32 nearest to what the previous ones
/// leave (computed from 80 digits of pi).
const PIO2_1: f64 = 1.570_796_370_506_286_6;
const PIO2_2: f64 = -4.371_138_828_673_793e-8;
const PIO2_3: f64 = -1.715_124_510_005_881_9e-15;
/// Cephes `sinf` coefficients of `x + x^3 (S1 + S2 x^2 + S3 x^4)`.
const SIN: [f64; 3] = [-1.666_665_461_1e-1, 8.332_160_873_6e-3, -1.951_529_589_1e-4];
/// Cephes `cosf` coefficients of `1 - x^2/2 + x^4 (C1 + C2 x^2 + C3 x^4)`.
const COS: [f64; 3] = [4.166_664_568_298_827e-2, -1.388_731_625_493_765e-3, 2.443_315_711_809_948e-5];

impl Frame<'_> {
    /// `(sin x, cos x)` of an f32 value; see the module documentation.
    fn sincos(&mut self, x: &Value) -> (Value, Value) {
        let two_over_pi = self.b.f32(std::f64::consts::FRAC_2_PI);
        let t = self.binf("mulf", x, &two_over_pi);
        let k =
            self.b.op("k", format_args!("llvm.call_intrinsic \"llvm.roundeven.f32\"({t}) : (f32) -> f32"));
        let neg_k = self.b.op("k", format_args!("arith.negf {k} : f32"));
        let mut r = x.clone();
        for part in [PIO2_1, PIO2_2, PIO2_3] {
            let c = self.b.f32(part);
            r = self.fma(&neg_k, &c, &r);
        }
        let z = self.binf("mulf", &r, &r);
        // sin(r) = r + r z (S1 + z (S2 + z S3))
        let s3 = self.b.f32(SIN[2]);
        let s2 = self.b.f32(SIN[1]);
        let s1 = self.b.f32(SIN[0]);
        let p = self.fma(&z, &s3, &s2);
        let p = self.fma(&z, &p, &s1);
        let rz = self.binf("mulf", &r, &z);
        let sin = self.fma(&rz, &p, &r);
        // cos(r) = 1 - z/2 + z^2 (C1 + z (C2 + z C3))
        let c3 = self.b.f32(COS[2]);
        let c2 = self.b.f32(COS[1]);
        let c1 = self.b.f32(COS[0]);
        let q = self.fma(&z, &c3, &c2);
        let q = self.fma(&z, &q, &c1);
        let half = self.b.f32(-0.5);
        let one = self.b.f32(1.0);
        let head = self.fma(&z, &half, &one);
        let zz = self.binf("mulf", &z, &z);
        let cos = self.fma(&zz, &q, &head);
        // Quadrant n = k mod 4: sin x = (sin r, cos r, -sin r, -cos r)[n], cos x = (cos r, -sin r,
        // -cos r, sin r)[n].
        let n = self
            .b
            .op("k", format_args!("llvm.call_intrinsic \"llvm.fptosi.sat.i32.f32\"({k}) : (f32) -> i32"));
        let (one_i, two_i) = (self.b.constant("1", "i32"), self.b.constant("2", "i32"));
        let zero_i = self.b.constant("0", "i32");
        let odd = self.b.op("k", format_args!("arith.andi {n}, {one_i} : i32"));
        let swap = self.cmp("ne", &odd, &zero_i, "i32");
        let sin_r = self.select(&swap, &cos, &sin, "f32");
        let cos_r = self.select(&swap, &sin, &cos, "f32");
        let hi = self.b.op("k", format_args!("arith.andi {n}, {two_i} : i32"));
        let sin_neg = self.cmp("ne", &hi, &zero_i, "i32");
        let n1 = self.b.op("k", format_args!("arith.addi {n}, {one_i} : i32"));
        let hi1 = self.b.op("k", format_args!("arith.andi {n1}, {two_i} : i32"));
        let cos_neg = self.cmp("ne", &hi1, &zero_i, "i32");
        let ns = self.b.op("f", format_args!("arith.negf {sin_r} : f32"));
        let nc = self.b.op("f", format_args!("arith.negf {cos_r} : f32"));
        let sin = self.select(&sin_neg, &ns, &sin_r, "f32");
        let cos = self.select(&cos_neg, &nc, &cos_r, "f32");
        (sin, cos)
    }
}

pub(super) fn rope(f: &mut Frame, cfg: &RopeConfig) -> Result<LaunchShape, LowerError> {
    let shape = f.bufs[0].ty.shape.clone();
    let pos_type = f.bufs[1].ty.dtype;
    let d = shape[shape.len() - 1]
        .as_known()
        .filter(|d| d % 2 == 0 && *d > 0)
        .ok_or_else(|| f.unsupported("rope", "the rotated dimension must be even and constant"))?;
    let half = d / 2;
    let pairs = f.bufs[0]
        .ty
        .numel()
        .and_then(|n| n.checked_div(kiln_ir::Dim::known(2)))
        .ok_or_else(|| f.unsupported("rope", "the pair count does not fit a dimension"))?;
    let freqs = kiln_ir::interp::rope_inv_freq(d as usize, cfg.theta, cfg.yarn.as_ref());
    let table = freqs.iter().map(|&x| f32_literal(x)).collect::<Vec<_>>().join(", ");
    let vec_ty = format!("vector<{half}xf32>");
    let table = f.b.constant(&format!("dense<[{table}]>"), &vec_ty);
    // Vectors of one (batch, token): every axis between T and D.
    let per_token = f.prod(&shape[2..shape.len() - 1]);
    let (half_v, d_v) = (f.b.index(half as i64), f.b.index(d as i64));
    let (interleaved, inverse) = (cfg.interleaved, cfg.inverse);
    Ok(each_element(f, pairs, |f, p| {
        let j = f.b.remui(p, &half_v);
        let v = f.b.divui(p, &half_v);
        let bt = f.b.divui(&v, &per_token);
        let base = f.b.muli(&v, &d_v);
        let (a, b) = if interleaved {
            let two = f.b.index(2);
            let a = f.b.muli(&j, &two);
            let one = f.b.index(1);
            (a.clone(), f.b.addi(&a, &one))
        } else {
            (j.clone(), f.b.addi(&j, &half_v))
        };
        let ia = f.b.addi(&base, &a);
        let ib = f.b.addi(&base, &b);
        let pos = f.load(1, &bt);
        let int = if pos_type == DType::I64 { "i64" } else { "i32" };
        let pos = f.b.op("x", format_args!("arith.sitofp {pos} : {int} to f32"));
        let freq = f.b.op("x", format_args!("vector.extract {table}[{j}] : f32 from {vec_ty}"));
        let angle = f.binf("mulf", &pos, &freq);
        let (sin, cos) = f.sincos(&angle);
        let sin = if inverse { f.b.op("f", format_args!("arith.negf {sin} : f32")) } else { sin };
        let x0 = f.load(0, &ia);
        let x1 = f.load(0, &ib);
        let x1s = f.binf("mulf", &x1, &sin);
        let neg = f.b.op("f", format_args!("arith.negf {x1s} : f32"));
        let y0 = f.fma(&x0, &cos, &neg);
        let x1c = f.binf("mulf", &x1, &cos);
        let y1 = f.fma(&x0, &sin, &x1c);
        f.store(2, &ia, &y0);
        f.store(2, &ib, &y1);
    }))
}
