//! The walker: symbolic sizes, input and parameter checks, fused kernels, communication, and the
//! per-value callback.

use std::collections::HashMap;

use super::*;
use crate::interp::run_with;
use crate::types::TensorType;
use crate::ValueId;

const SRC: &str = r#"graph @w {
  %0 = input {name = "x"} : f32[B, T, 2]
  %1 = input {name = "pos"} : i32[B, T]
  %2 = param {name = "w"} : f32[3, 2]
  %3 = linear %0, %2 : f32[B, T, 3]
  %4 = cast %1 {to = f32} : f32[B, T]
  output "y" = %3
  output "p" = %4
}
"#;

fn w() -> Tensor {
    f32s(&[3, 2], &[1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
}

#[test]
fn missing_unexpected_and_mistyped_params() {
    let x = || f32s(&[1, 2, 2], &[1.0, 2.0, 3.0, 4.0]);
    let pos = || i32s(&[1, 2], &[0, 1]);
    let err = run_kir(SRC, vec![("x", x()), ("pos", pos())], vec![]).unwrap_err();
    assert_eq!(err, InterpError::MissingParam { name: "w".into() });
    assert_eq!(err.to_string(), "parameter `w` is missing");
    let err = run_kir(SRC, vec![("x", x()), ("pos", pos())], vec![("w", w()), ("v", w())]).unwrap_err();
    assert_eq!(err.to_string(), "`v` is not a parameter of graph @w");
    let err =
        run_kir(SRC, vec![("x", x()), ("pos", pos())], vec![("w", f32s(&[2, 3], &[0.0; 6]))]).unwrap_err();
    assert_eq!(err.to_string(), "parameter `w` must be f32[3, 2], found f32[2, 3]");
    let bf = Tensor::from_f32(DType::BF16, [3, 2], vec![0.0; 6]).unwrap();
    assert!(matches!(
        run_kir(SRC, vec![("x", x()), ("pos", pos())], vec![("w", bf)]),
        Err(InterpError::ParamType { .. })
    ));
    let out = run_kir(SRC, vec![("x", x()), ("pos", pos())], vec![("w", w())]).unwrap();
    assert_eq!(vals(&out["y"]), [1.0, 2.0, 3.0, 3.0, 4.0, 7.0]);
    assert_eq!(vals(&out["p"]), [0.0, 1.0]);
}

#[test]
fn inputs_are_checked_and_bind_symbolic_sizes() {
    let err = run_kir(
        SRC,
        vec![("x", f32s(&[1, 2, 3], &[0.0; 6])), ("pos", i32s(&[1, 2], &[0, 1]))],
        vec![("w", w())],
    )
    .unwrap_err();
    assert_eq!(err.to_string(), "input `x` must be f32[B, T, 2], found f32[1, 2, 3]");
    let err = run_kir(
        SRC,
        vec![("x", f32s(&[1, 2, 2], &[0.0; 4])), ("pos", f32s(&[1, 2], &[0.0; 2]))],
        vec![("w", w())],
    )
    .unwrap_err();
    assert_eq!(err.to_string(), "input `pos` must be i32[B, T], found f32[1, 2]");
    // T = 2 from `x`, then `pos` says 3: the first binding wins and the conflict names both.
    let err = run_kir(
        SRC,
        vec![("x", f32s(&[1, 2, 2], &[0.0; 4])), ("pos", i32s(&[1, 3], &[0; 3]))],
        vec![("w", w())],
    )
    .unwrap_err();
    assert_eq!(
        err,
        InterpError::DimConflict {
            name: "pos".into(),
            axis: 1,
            dim: crate::Dim::T,
            sym: "T",
            bound: 2,
            found: 3,
            bound_by: "x".into()
        }
    );
    assert_eq!(err.to_string(), "input `pos` dimension 1 (T) is 3, but T = 2 from input `x`");
    let err = run_kir(SRC, vec![("x", f32s(&[1, 2, 2], &[0.0; 4]))], vec![("w", w())]).unwrap_err();
    assert_eq!(err.to_string(), "input `pos` is missing");
    let err = run_kir(
        SRC,
        vec![
            ("x", f32s(&[1, 2, 2], &[0.0; 4])),
            ("pos", i32s(&[1, 2], &[0; 2])),
            ("tokens", i32s(&[1], &[0])),
        ],
        vec![("w", w())],
    )
    .unwrap_err();
    assert_eq!(err.to_string(), "`tokens` is not an input of graph @w");
}

#[test]
fn products_of_symbols_are_solved_once_a_factor_is_known() {
    let src = r#"graph @p {
  %0 = input {name = "flat"} : f32[B*T, 2]
  %1 = input {name = "tokens"} : i32[B, T]
  %2 = reshape %0 {shape = [B, T, 2]} : f32[B, T, 2]
  output "y" = %2
}
"#;
    let y = eval1(src, vec![("flat", f32s(&[6, 2], &[0.0; 12])), ("tokens", i32s(&[2, 3], &[0; 6]))], "y");
    assert_eq!(y.shape(), [2, 3, 2]);
    let err =
        run_kir(src, vec![("flat", f32s(&[5, 2], &[0.0; 10])), ("tokens", i32s(&[2, 3], &[0; 6]))], vec![])
            .unwrap_err();
    assert_eq!(err.to_string(), "input `flat` dimension 0 (B*T) is 5, but B = 2 from input `tokens`");

    let src = r#"graph @p {
  %0 = input {name = "pairs"} : f32[2*T]
  output "y" = %0
}
"#;
    assert_eq!(eval1(src, vec![("pairs", f32s(&[4], &[0.0; 4]))], "y").shape(), [4]);
    let err = run_kir(src, vec![("pairs", f32s(&[5], &[0.0; 5]))], vec![]).unwrap_err();
    assert_eq!(err.to_string(), "input `pairs` must be f32[2*T], found f32[5]");
}

#[test]
fn fused_kernels_run_their_body() {
    let src = r#"graph @f {
  %0 = input {name = "x"} : f32[T, 2]
  %1 = input {name = "i"} : i32[T]
  %2 = fused %0 {name = "square"} : f32[T, 2] {
    %0 = input {name = "a"} : f32[T, 2]
    %1 = mul %0, %0 : f32[T, 2]
    output "y" = %1
  }
  %3 = fused %1 {name = "bad"} : f32[T, 4] {
    %0 = input {name = "ids"} : i32[T]
    %1 = constant {value = 1.0} : f32[]
    %2 = broadcast %1 {shape = [3, 4]} : f32[3, 4]
    %3 = embedding %2, %0 : f32[T, 4]
    output "e" = %3
  }
  output "sq" = %2
  output "e" = %3
}
"#;
    let err =
        run_kir(src, vec![("x", f32s(&[2, 2], &[1.0, 2.0, 3.0, 4.0])), ("i", i32s(&[2], &[0, 5]))], vec![])
            .unwrap_err();
    assert_eq!(err.to_string(), "%3 = fused kernel `bad`: %3 = embedding: token id 5 is out of range 0..3");
    let out =
        run_kir(src, vec![("x", f32s(&[2, 2], &[1.0, 2.0, 3.0, 4.0])), ("i", i32s(&[2], &[0, 2]))], vec![])
            .unwrap();
    assert_eq!(vals(&out["sq"]), [1.0, 4.0, 9.0, 16.0]);
    assert_eq!(vals(&out["e"]), [1.0; 8]);
}

#[test]
fn pipeline_communication_is_not_interpreted() {
    let src = r#"graph @c {
  %0 = input {name = "x"} : f32[2]
  send %0 {peer = 1, tag = 0}
  %1 = recv {peer = 1, tag = 1} : f32[2]
  output "y" = %1
}
"#;
    let err = run_kir(src, vec![("x", f32s(&[2], &[0.0; 2]))], vec![]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "send %0: pipeline communication with stage 1 needs the distributed runtime; the interpreter runs a single stage"
    );
}

#[test]
fn every_value_is_reported_once() {
    let g = crate::text::parse(SRC).unwrap();
    let inputs: HashMap<String, Tensor> =
        [("x".to_string(), f32s(&[1, 1, 2], &[1.0, 2.0])), ("pos".to_string(), i32s(&[1, 1], &[4]))].into();
    let params: HashMap<String, Tensor> = [("w".to_string(), w())].into();
    let mut seen: Vec<(ValueId, TensorType)> = Vec::new();
    let out = run_with(&g, &inputs, &params, &mut |v, t| seen.push((v, t.ty()))).unwrap();
    let ids: Vec<u32> = seen.iter().map(|(v, _)| v.as_u32()).collect();
    assert_eq!(ids, [0, 1, 2, 3, 4]);
    assert_eq!(seen[3].1.to_string(), "f32[1, 1, 3]");
    assert_eq!(vals(&out["y"]), [1.0, 2.0, 3.0]);
}
