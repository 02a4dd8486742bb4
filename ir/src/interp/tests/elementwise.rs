//! Unary and binary ops, casts, constants and `broadcast`.

use super::*;

#[test]
fn unary_functions() {
    let ops = [
        ("neg", [-0.5, -2.0, 3.0]),
        ("abs", [0.5, 2.0, 3.0]),
        ("exp", [0.5f32.exp(), 2.0f32.exp(), (-3.0f32).exp()]),
        ("tanh", [0.5f32.tanh(), 2.0f32.tanh(), (-3.0f32).tanh()]),
        ("sigmoid", [0.62245935, 0.8807971, 0.047425874]),
        // silu(x) = x * sigmoid(x)
        ("silu", [0.31122968, 1.7615942, -0.14227763]),
    ];
    for (op, want) in ops {
        let src = format!(
            "graph @u {{\n  %0 = input {{name = \"x\"}} : f32[3]\n  %1 = {op} %0 : f32[3]\n  output \"y\" = %1\n}}\n"
        );
        let y = eval1(&src, vec![("x", f32s(&[3], &[0.5, 2.0, -3.0]))], "y");
        assert_close(&vals(&y), &want, 1e-6);
    }
    for (op, want) in [
        ("log", [-std::f32::consts::LN_2, 2.0 * std::f32::consts::LN_2]),
        ("sqrt", [0.70710677, 2.0]),
        ("rsqrt", [std::f32::consts::SQRT_2, 0.5]),
        ("recip", [2.0, 0.25]),
    ] {
        let src = format!(
            "graph @u {{\n  %0 = input {{name = \"x\"}} : f32[2]\n  %1 = {op} %0 : f32[2]\n  output \"y\" = %1\n}}\n"
        );
        let y = eval1(&src, vec![("x", f32s(&[2], &[0.5, 4.0]))], "y");
        assert_close(&vals(&y), &want, 1e-6);
    }
}

#[test]
fn unary_results_are_rounded_to_bf16() {
    let src = r#"graph @u {
  %0 = input {name = "x"} : bf16[1]
  %1 = exp %0 : bf16[1]
  output "y" = %1
}
"#;
    let x = Tensor::from_f32(DType::BF16, [1], vec![1.0]).unwrap();
    // e = 2.71828..., the bf16 neighbours are 2.703125 and 2.71875.
    assert_eq!(vals(&eval1(src, vec![("x", x)], "y")), [2.71875]);
}

const BINARY: &str = r#"graph @b {
  %0 = input {name = "a"} : f32[2, 3]
  %1 = input {name = "b"} : f32[3]
  %2 = input {name = "c"} : f32[2, 1]
  %3 = add %0, %1 : f32[2, 3]
  %4 = sub %0, %2 : f32[2, 3]
  %5 = mul %1, %2 : f32[2, 3]
  %6 = div %0, %1 : f32[2, 3]
  %7 = max %0, %2 : f32[2, 3]
  %8 = min %0, %2 : f32[2, 3]
  output "add" = %3
  output "sub" = %4
  output "mul" = %5
  output "div" = %6
  output "max" = %7
  output "min" = %8
}
"#;

#[test]
fn binary_ops_broadcast() {
    let a = f32s(&[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    let b = f32s(&[3], &[10.0, 20.0, 40.0]);
    let c = f32s(&[2, 1], &[2.5, f32::NAN]);
    let out = run_kir(BINARY, vec![("a", a), ("b", b), ("c", c)], vec![]).unwrap();
    assert_eq!(vals(&out["add"]), [11.0, 22.0, 43.0, 14.0, 25.0, 46.0]);
    let sub = vals(&out["sub"]);
    assert_eq!(sub[..3], [-1.5, -0.5, 0.5]);
    assert!(sub[3..].iter().all(|v| v.is_nan()));
    let mul = vals(&out["mul"]);
    assert_eq!(mul[..3], [25.0, 50.0, 100.0]);
    assert_eq!(vals(&out["div"]), [0.1, 0.1, 0.075, 0.4, 0.25, 0.15]);
    let max = vals(&out["max"]);
    assert_eq!(max[..3], [2.5, 2.5, 3.0]);
    assert!(max[3..].iter().all(|v| v.is_nan()), "max propagates NaN");
    assert_eq!(vals(&out["min"])[..3], [1.0, 2.0, 2.5]);
}

#[test]
fn integer_and_boolean_arithmetic() {
    let src = r#"graph @i {
  %0 = input {name = "a"} : i32[4]
  %1 = input {name = "b"} : i32[4]
  %2 = add %0, %1 : i32[4]
  %3 = div %0, %1 : i32[4]
  %4 = mul %0, %1 : i32[4]
  output "add" = %2
  output "div" = %3
  output "mul" = %4
}
"#;
    let a = i32s(&[4], &[7, -7, i32::MAX as i64, 9]);
    let b = i32s(&[4], &[2, 2, 1, -4]);
    let out = run_kir(src, vec![("a", a.clone()), ("b", b)], vec![]).unwrap();
    assert_eq!(out["add"].as_i64().unwrap(), [9, -5, i32::MIN as i64, 5], "i32 addition wraps");
    assert_eq!(out["div"].as_i64().unwrap(), [3, -3, i32::MAX as i64, -2], "division truncates toward zero");
    assert_eq!(out["mul"].as_i64().unwrap(), [14, -14, i32::MAX as i64, -36]);
    let zero = i32s(&[4], &[1, 1, 0, 1]);
    let err = run_kir(src, vec![("a", a), ("b", zero)], vec![]).unwrap_err();
    assert_eq!(err.to_string(), "%3 = div: integer division by zero");

    let src = r#"graph @bool {
  %0 = input {name = "a"} : bool[2]
  %1 = input {name = "b"} : bool[2]
  %2 = max %0, %1 : bool[2]
  %3 = min %0, %1 : bool[2]
  %4 = add %0, %1 : bool[2]
  output "or" = %2
  output "and" = %3
  output "bad" = %4
}
"#;
    let a = Tensor::from_bool([2], vec![true, false]).unwrap();
    let b = Tensor::from_bool([2], vec![true, true]).unwrap();
    let err = run_kir(src, vec![("a", a), ("b", b)], vec![]).unwrap_err();
    assert_eq!(err.to_string(), "%4 = add: `add` is not defined on booleans");
}

#[test]
fn casts_round_truncate_and_wrap() {
    let src = r#"graph @c {
  %0 = input {name = "x"} : f32[6]
  %1 = cast %0 {to = bf16} : bf16[6]
  %2 = cast %0 {to = f8e4m3} : f8e4m3[6]
  %3 = cast %2 {to = f32} : f32[6]
  %4 = cast %0 {to = bool} : bool[6]
  output "bf16" = %1
  output "f8" = %3
  output "bool" = %4
}
"#;
    let x = f32s(&[6], &[1.0 + 2f32.powi(-9), 300.0, 460.0, 500.0, -0.0, 0.3]);
    let out = run_kir(src, vec![("x", x)], vec![]).unwrap();
    assert_eq!(vals(&out["bf16"]), [1.0, 300.0, 460.0, 500.0, -0.0, 0.30078125]);
    let f8 = vals(&out["f8"]);
    // 300 -> 288 (spacing 32 between 256 and 512), 460 -> 448, 500 -> 448 (torch 2.15 saturates).
    assert_eq!(f8[..4], [1.0, 288.0, 448.0, 448.0]);
    assert_eq!(f8[4].to_bits(), (-0.0f32).to_bits());
    assert_eq!(f8[5], 0.3125);
    assert_eq!(out["bool"].as_bool().unwrap(), [true, true, true, true, false, true]);

    let src = r#"graph @c {
  %0 = input {name = "x"} : f32[4]
  %1 = cast %0 {to = i32} : i32[4]
  %2 = cast %1 {to = f16} : f16[4]
  output "i" = %1
  output "h" = %2
}
"#;
    let out = run_kir(src, vec![("x", f32s(&[4], &[2.7, -2.7, 0.5, 70000.0]))], vec![]).unwrap();
    assert_eq!(out["i"].as_i64().unwrap(), [2, -2, 0, 70000]);
    assert_eq!(vals(&out["h"]), [2.0, -2.0, 0.0, f32::INFINITY], "70000 overflows f16");
    let err = run_kir(src, vec![("x", f32s(&[4], &[f32::NAN, 0.0, 0.0, 0.0]))], vec![]).unwrap_err();
    assert_eq!(err.to_string(), "%1 = cast: NaN cannot be converted to i32");

    let src = r#"graph @c {
  %0 = input {name = "x"} : i64[2]
  %1 = cast %0 {to = i32} : i32[2]
  output "y" = %1
}
"#;
    let x = Tensor::from_i64(DType::I64, [2], vec![(1 << 32) + 5, -1]).unwrap();
    assert_eq!(eval1(src, vec![("x", x)], "y").as_i64().unwrap(), [5, -1], "i64 -> i32 wraps");
}

#[test]
fn constants_and_broadcast() {
    let src = r#"graph @k {
  %0 = input {name = "x"} : bf16[2, 1]
  %1 = constant {value = 0.1} : bf16[]
  %2 = mul %0, %1 : bf16[2, 1]
  %3 = broadcast %2 {shape = [3, 2, 2]} : bf16[3, 2, 2]
  output "y" = %3
}
"#;
    let x = Tensor::from_f32(DType::BF16, [2, 1], vec![1.0, 2.0]).unwrap();
    let y = eval1(src, vec![("x", x)], "y");
    // 0.1 in bf16 is 0.10009765625; times 2 is exact.
    let (a, b) = (205.0 / 2048.0, 205.0 / 1024.0);
    assert_eq!(y.shape(), [3, 2, 2]);
    assert_eq!(vals(&y), [a, a, b, b, a, a, b, b, a, a, b, b]);
}
