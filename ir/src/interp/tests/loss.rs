//! `cross_entropy`, against values computed by hand.

use super::*;

/// `logits : {logits}`, `targets : {targets}` and their loss `: {loss}`, with the op's attributes.
fn graph(logits: &str, targets: &str, loss: &str, attrs: &str) -> String {
    format!(
        r#"graph @ce {{
  %0 = input {{name = "logits"}} : {logits}
  %1 = input {{name = "targets"}} : {targets}
  %2 = cross_entropy %0, %1{attrs} : {loss}
  output "loss" = %2
}}
"#
    )
}

fn i64s(shape: &[u64], v: &[i64]) -> Tensor {
    Tensor::from_i64(DType::I64, shape, v.to_vec()).unwrap()
}

fn loss(src: &str, logits: Tensor, targets: Tensor) -> Tensor {
    eval1(src, vec![("logits", logits), ("targets", targets)], "loss")
}

#[test]
fn one_row_is_logsumexp_less_the_target_logit() {
    let src = graph("f32[3]", "i32[]", "f32[]", "");
    // log(e^1 + e^2 + e^3) - 3 = 0.40760596444..., and 2 more for target 0.
    let y = loss(&src, f32s(&[3], &[1.0, 2.0, 3.0]), i32s(&[], &[2]));
    assert_eq!(y.dtype(), DType::F32);
    assert_eq!(y.shape(), [0u64; 0]);
    assert_eq!(vals(&y), [0.407_605_97]);
    let y = loss(&src, f32s(&[3], &[1.0, 2.0, 3.0]), i32s(&[], &[0]));
    assert_eq!(vals(&y), [2.407_606]);
}

#[test]
fn large_logits_do_not_overflow() {
    // exp(1000) overflows f32 and f64; with the maximum subtracted the rows are [1, 2, 3] shifted.
    let src = graph("f32[2, 3]", "i32[2]", "f32[2]", "");
    let x = f32s(&[2, 3], &[1000.0, 1001.0, 1002.0, -1002.0, -1001.0, -1000.0]);
    let y = vals(&loss(&src, x, i32s(&[2], &[2, 0])));
    assert_eq!(y, [0.407_605_97, 2.407_606]);
}

#[test]
fn a_batch_of_rows_with_i64_targets() {
    let src = graph("f32[2, 2, 4]", "i64[2, 2]", "f32[2, 2]", "");
    #[rustfmt::skip]
    let x = f32s(&[2, 2, 4], &[
        0.0, 0.0, 0.0, 0.0,      // equal logits: ln 4 for any target
        0.5, -1.5, 2.0, 0.25,    // log(e^0.5 + e^-1.5 + e^2 + e^0.25) - 0.25 = 2.10564545...
        7.0, 7.0, 7.0, 7.0,      // ln 4 again: only differences matter
        -3.0, 0.0, -3.0, -3.0,   // log(3 e^-3 + 1) - (-3) = 3.13888844...
    ]);
    let y = loss(&src, x, i64s(&[2, 2], &[1, 3, 0, 2]));
    assert_eq!(y.shape(), [2, 2]);
    let ln4 = 4f32.ln();
    let last = ((3.0 * (-3f64).exp() + 1.0).ln() + 3.0) as f32;
    assert_close(&vals(&y), &[ln4, 2.105_645_5, ln4, last], 1e-6);
}

#[test]
fn bf16_logits_give_an_f32_loss_of_the_rounded_logits() {
    // 1.001 rounds to 1.0 in bf16; the loss is that of [1, 2, 3], in f32 (bf16 would give 0.408203).
    let src = graph("bf16[1, 3]", "i32[1]", "f32[1]", "");
    let x = Tensor::from_f32(DType::BF16, [1, 3], vec![1.001, 2.0, 3.0]).unwrap();
    assert_eq!(vals(&x), [1.0, 2.0, 3.0]);
    assert_eq!(vals(&loss(&src, x, i32s(&[1], &[2]))), [0.407_605_97]);
}

#[test]
fn nan_and_infinite_rows_give_nan() {
    let src = graph("f32[3, 2]", "i32[3]", "f32[3]", "");
    let x = f32s(&[3, 2], &[f32::NAN, 1.0, f32::INFINITY, 0.0, f32::NEG_INFINITY, 0.0]);
    let y = vals(&loss(&src, x, i32s(&[3], &[1, 1, 0])));
    assert!(y[0].is_nan() && y[1].is_nan(), "{y:?}");
    // A target whose logit is -inf next to a finite one has an infinite loss, as in torch.
    assert_eq!(y[2], f32::INFINITY);
}

#[test]
fn ignored_targets_give_zero() {
    let src = graph("f32[3, 3]", "i64[3]", "f32[3]", " {ignore_index = -100}");
    let x = f32s(&[3, 3], &[1.0, 2.0, 3.0, f32::NAN, 0.0, 0.0, 1.0, 2.0, 3.0]);
    let y = vals(&loss(&src, x, i64s(&[3], &[-100, -100, 2])));
    assert_eq!(y, [0.0, 0.0, 0.407_605_97]);
}

#[test]
fn targets_out_of_range_are_errors() {
    let src = graph("f32[2, 3]", "i32[2]", "f32[2]", "");
    let x = || f32s(&[2, 3], &[1.0, 2.0, 3.0, 1.0, 2.0, 3.0]);
    let run = |src: &str, t: Tensor| {
        run_kir(src, vec![("logits", x()), ("targets", t)], vec![]).unwrap_err().to_string()
    };
    assert_eq!(run(&src, i32s(&[2], &[0, 3])), "%2 = cross_entropy: target 3 (row 1) is out of range 0..3");
    assert_eq!(run(&src, i32s(&[2], &[-1, 0])), "%2 = cross_entropy: target -1 (row 0) is out of range 0..3");
    // With an ignore_index, only that value is exempt.
    let src = graph("f32[2, 3]", "i32[2]", "f32[2]", " {ignore_index = -100}");
    assert_eq!(
        run(&src, i32s(&[2], &[-100, -1])),
        "%2 = cross_entropy: target -1 (row 1) is out of range 0..3"
    );
}
