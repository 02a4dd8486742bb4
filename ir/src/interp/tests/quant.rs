//! Block-scaled quantisation and dequantisation.

use super::*;
use crate::interp::numerics::round_f8e4m3;
use crate::interp::ops::quant::pow2_ceil as quant_pow2_ceil;

fn src(block: &str, pow2: bool) -> String {
    format!(
        r#"graph @q {{
  %0 = input {{name = "x"}} : f32[2, 5]
  %1, %2 = quantize %0 {{to = f8e4m3, block = {block}, amax_floor = 0.0001, pow2_scale = {pow2}}} : f8e4m3[2, 5], f32[{scales}]
  %3 = dequantize %1, %2 {{to = f32, block = {block}}} : f32[2, 5]
  output "q" = %1
  output "s" = %2
  output "d" = %3
}}
"#,
        scales = if block == "[1, 4]" { "2, 2" } else { "1, 1" }
    )
}

#[test]
fn per_row_tiles_with_a_short_edge_tile() {
    // Tiles of 1x4: row 0 -> [0..4) and [4..5), row 1 likewise.
    let x = [1.0, -2.0, 0.5, 3.5, 7.0, 0.0, 0.0, 0.0, 0.0, 1e-6];
    let out = run_kir(&src("[1, 4]", false), vec![("x", f32s(&[2, 5], &x))], vec![]).unwrap();
    // amax = 3.5, 7, 0 -> floor 1e-4, 1e-6 -> floor 1e-4.
    let floor = 0.0001f32;
    let scales = [3.5 / 448.0, 7.0 / 448.0, floor / 448.0, floor / 448.0];
    assert_eq!(vals(&out["s"]), scales);
    let q = vals(&out["q"]);
    let want: Vec<f32> = x
        .iter()
        .enumerate()
        .map(|(i, &v)| round_f8e4m3(v / scales[(i / 5) * 2 + usize::from(i % 5 == 4)]))
        .collect();
    assert_eq!(q, want);
    // The tile maximum maps to 448 exactly; 1e-6 / (1e-4 / 448) = 4.48 -> 4.5 in E4M3.
    assert_eq!(q[3], 448.0);
    assert_eq!(q[4], 448.0);
    assert_eq!(q[9], 4.5);
    let d = vals(&out["d"]);
    let back: Vec<f32> =
        q.iter().enumerate().map(|(i, &v)| v * scales[(i / 5) * 2 + usize::from(i % 5 == 4)]).collect();
    assert_eq!(d, back);
    assert_close(&d[..5], &x[..5], 0.07);
}

#[test]
fn power_of_two_scales_round_up() {
    let x = [1.0, -2.0, 0.5, 3.5, 7.0, 0.0, 0.0, 0.0, 0.0, 448.0];
    let out = run_kir(&src("[2, 5]", true), vec![("x", f32s(&[2, 5], &x))], vec![]).unwrap();
    // amax 448 -> scale 1 exactly, already a power of two.
    assert_eq!(vals(&out["s"]), [1.0]);
    let out = run_kir(&src("[2, 5]", true), vec![("x", f32s(&[2, 5], &x.map(|v| v / 448.0 * 7.0)))], vec![])
        .unwrap();
    // amax 7 -> 7/448 = 2^-6 = 0.015625 exactly.
    assert_eq!(vals(&out["s"]), [0.015625]);
    let out = run_kir(&src("[2, 5]", true), vec![("x", f32s(&[2, 5], &x.map(|v| v / 448.0 * 8.0)))], vec![])
        .unwrap();
    // amax 8 -> 8/448 = 0.017857 -> 2^-5.
    assert_eq!(vals(&out["s"]), [0.03125]);
    assert_eq!(quant_pow2_ceil(1.0), 1.0);
    assert_eq!(quant_pow2_ceil(1.0000001), 2.0);
    assert_eq!(quant_pow2_ceil(0.75), 1.0);
    assert_eq!(quant_pow2_ceil(3e-39), f32::from_bits(0x0040_0000), "2^-127: subnormal scales too");
    assert_eq!(quant_pow2_ceil(0.0), 0.0);
}
