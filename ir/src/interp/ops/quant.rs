//! Block-scaled FP8 quantisation, as DeepSeek's `act_quant` / `weight_dequant` (\[R\] `kernel.py`,
//! reference §4.2).
//!
//! The trailing `block.len()` dimensions are cut into tiles of `block` (edge tiles are smaller). Per
//! tile, in f32: `amax = max(max |x|, amax_floor)`, `scale = amax / 448`, and with `pow2_scale`
//! (`scale_fmt = "ue8m0"`) the scale is rounded up to a power of two, `2^ceil(log2(scale))`, computed
//! exactly from the bits rather than with a floating-point log. Then `q = f8e4m3(x / scale)`.
//! `dequantize` is `q * scale` of the element's tile, in f32, rounded to the target dtype. NaN in a
//! tile makes its amax, scale and every quantised value NaN.
//!
//! The scales' shape comes from shape inference: per blocked dimension `ceil(d / b)` tiles, or, for a
//! dimension that was symbolic there, `d` slots of which the first `ceil(d / b)` hold the tiles'
//! scales and the rest 0 (see `kiln_ir::infer::scale_shape`). Scales are row-major over that shape.

use crate::op::QuantSpec;
use crate::types::{DType, TensorType};

use super::{dims, floats, OpResult};
use crate::interp::numerics::F8E4M3_MAX;
use crate::interp::tensor::{strides, Tensor};

/// For each element of a tensor of dims `xd`, the flat index of its tile's scale in scales of dims
/// `sd`, tiles being `block` over the trailing dimensions (leading dimensions have one tile per
/// index).
fn tile_index(xd: &[usize], block: &[u64], sd: &[usize]) -> Vec<usize> {
    let lead = xd.len() - block.len();
    let ss = strides(sd);
    let n: usize = xd.iter().product();
    let mut idx = vec![0usize; xd.len()];
    let mut res = Vec::with_capacity(n);
    for _ in 0..n {
        let slot = idx
            .iter()
            .enumerate()
            .map(|(i, &x)| if i < lead { x * ss[i] } else { x / block[i - lead] as usize * ss[i] })
            .sum();
        res.push(slot);
        for d in (0..xd.len()).rev() {
            idx[d] += 1;
            if idx[d] < xd[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    res
}

/// The smallest power of two that is at least `s` (`2^ceil(log2(s))`), exactly; 0, NaN and
/// infinity are returned as they are.
pub(crate) fn pow2_ceil(s: f32) -> f32 {
    if !s.is_finite() || s <= 0.0 {
        return s;
    }
    let v = s as f64;
    let bits = v.to_bits();
    let mantissa = bits & ((1u64 << 52) - 1);
    let exp_only = f64::from_bits(bits & !((1u64 << 52) - 1));
    (if mantissa == 0 { exp_only } else { exp_only * 2.0 }) as f32
}

pub(super) fn quantize(x: &Tensor, spec: &QuantSpec, outs: &[TensorType]) -> OpResult {
    let xs = floats(x, "the operand")?;
    let sd: Vec<usize> = dims(&outs[1]).into_iter().map(|d| d as usize).collect();
    let tiles = tile_index(&x.dims(), &spec.block, &sd);
    let n_scales = sd.iter().product::<usize>();
    let mut amax = vec![0.0f32; n_scales];
    let mut used = vec![false; n_scales];
    for (&v, &t) in xs.iter().zip(&tiles) {
        let a = v.abs();
        amax[t] = if a.is_nan() || amax[t].is_nan() { f32::NAN } else { amax[t].max(a) };
        used[t] = true;
    }
    let floor = spec.amax_floor as f32;
    let scales: Vec<f32> = amax
        .iter()
        .zip(&used)
        .map(|(&a, &used)| {
            if !used {
                // A padding slot after the last tile of a dimension.
                return 0.0;
            }
            let a = if a.is_nan() { a } else { a.max(floor) };
            let s = a / F8E4M3_MAX;
            if spec.pow2_scale {
                pow2_ceil(s)
            } else {
                s
            }
        })
        .collect();
    let q: Vec<f32> = xs.iter().zip(&tiles).map(|(&v, &t)| v / scales[t]).collect();
    Ok(vec![
        Tensor::float(outs[0].dtype, x.shape().to_vec(), q),
        Tensor::float(DType::F32, dims(&outs[1]), scales),
    ])
}

pub(super) fn dequantize(q: &Tensor, scales: &Tensor, block: &[u64], to: DType) -> OpResult {
    let (qs, ss) = (floats(q, "the quantised operand")?, floats(scales, "the scales")?);
    let tiles = tile_index(&q.dims(), block, &scales.dims());
    let data = qs.iter().zip(&tiles).map(|(&v, &t)| v * ss[t]).collect();
    Ok(vec![Tensor::float(to, q.shape().to_vec(), data)])
}
