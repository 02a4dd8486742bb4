//! Reductions, softmax and top-k.

use super::*;
use crate::interp::numerics::round_bf16;

#[test]
fn reductions_over_axes() {
    let src = r#"graph @r {
  %0 = input {name = "x"} : f32[2, 3]
  %1 = reduce_sum %0 {axes = [1], keep_dims = false} : f32[2]
  %2 = reduce_mean %0 {axes = [0], keep_dims = true} : f32[1, 3]
  %3 = reduce_max %0 {axes = [0, 1], keep_dims = false} : f32[]
  %4 = reduce_min %0 {axes = [1], keep_dims = true} : f32[2, 1]
  output "sum" = %1
  output "mean" = %2
  output "max" = %3
  output "min" = %4
}
"#;
    let x = f32s(&[2, 3], &[1.0, -2.0, 3.0, 4.0, 5.0, -6.0]);
    let out = run_kir(src, vec![("x", x)], vec![]).unwrap();
    assert_eq!(vals(&out["sum"]), [2.0, 3.0]);
    assert_eq!(vals(&out["mean"]), [2.5, 1.5, -1.5]);
    assert_eq!(out["mean"].shape(), [1, 3]);
    assert_eq!(vals(&out["max"]), [5.0]);
    assert_eq!(out["max"].shape(), [0u64; 0]);
    assert_eq!(vals(&out["min"]), [-2.0, -6.0]);
}

#[test]
fn integer_sums_and_empty_reductions() {
    let src = r#"graph @r {
  %0 = input {name = "x"} : i32[2, 2]
  %1 = reduce_sum %0 {axes = [0], keep_dims = false} : i32[2]
  output "sum" = %1
}
"#;
    let out = eval1(src, vec![("x", i32s(&[2, 2], &[1, i32::MAX as i64, 2, 1]))], "sum");
    assert_eq!(out.as_i64().unwrap(), [3, i32::MIN as i64], "i32 sums wrap");

    let src = r#"graph @r {
  %0 = input {name = "x"} : f32[2, 0]
  %1 = reduce_sum %0 {axes = [1], keep_dims = false} : f32[2]
  %2 = reduce_max %0 {axes = [1], keep_dims = false} : f32[2]
  output "sum" = %1
  output "max" = %2
}
"#;
    let err = run_kir(src, vec![("x", f32s(&[2, 0], &[]))], vec![]).unwrap_err();
    assert_eq!(err.to_string(), "%2 = reduce_max: `reduce_max` over an empty axis has no value");
}

#[test]
fn softmax_along_an_inner_axis() {
    let src = r#"graph @s {
  %0 = input {name = "x"} : bf16[3, 2]
  %1 = softmax %0 {axis = 0} : bf16[3, 2]
  output "y" = %1
}
"#;
    // Column 0 is [0, ln 2, ln 5] (rounded to bf16), column 1 is [1000, 1000, -inf].
    let x = Tensor::from_f32(
        DType::BF16,
        [3, 2],
        vec![0.0, 1000.0, 2f32.ln(), 1000.0, 5f32.ln(), f32::NEG_INFINITY],
    )
    .unwrap();
    let xv = vals(&x);
    let y = vals(&eval1(src, vec![("x", x)], "y"));
    let e: Vec<f64> = [xv[0], xv[2], xv[4]].iter().map(|&v| (v as f64).exp()).collect();
    let sum: f64 = e.iter().sum();
    for (i, &ei) in e.iter().enumerate() {
        assert_eq!(y[2 * i], round_bf16((ei / sum) as f32), "column 0, row {i}");
    }
    // Max-subtraction keeps large logits finite.
    assert_eq!([y[1], y[3], y[5]], [0.5, 0.5, 0.0]);
}

#[test]
fn topk_orders_largest_first_with_ties_to_the_lower_index() {
    let src = r#"graph @t {
  %0 = input {name = "x"} : f32[2, 5]
  %1, %2 = topk %0 {k = 3} : f32[2, 3], i32[2, 3]
  output "v" = %1
  output "i" = %2
}
"#;
    let x = f32s(&[2, 5], &[1.0, 3.0, 2.0, 3.0, -1.0, 0.0, f32::NAN, 5.0, -0.0, 5.0]);
    let out = run_kir(src, vec![("x", x)], vec![]).unwrap();
    assert_eq!(out["i"].as_i64().unwrap(), [1, 3, 2, 1, 2, 4], "NaN is largest; ties keep index order");
    let v = vals(&out["v"]);
    assert_eq!(v[..3], [3.0, 3.0, 2.0]);
    assert!(v[3].is_nan());
    assert_eq!(v[4..], [5.0, 5.0]);
}
