//! `linear`, `matmul` and `grouped_linear`.

use super::*;

#[test]
fn linear_is_x_times_w_transposed() {
    let src = r#"graph @l {
  %0 = input {name = "x"} : f32[B, 2]
  %1 = param {name = "w"} : f32[3, 2]
  %2 = linear %0, %1 : f32[B, 3]
  output "y" = %2
}
"#;
    let x = f32s(&[2, 2], &[1.0, 2.0, -1.0, 0.5]);
    let w = f32s(&[3, 2], &[1.0, 0.0, 0.0, 1.0, 3.0, -2.0]);
    let out = run_kir(src, vec![("x", x)], vec![("w", w)]).unwrap();
    // Row 0: [1, 2] . rows of w = [1, 2, 3 - 4]; row 1: [-1, 0.5, -3 - 1].
    assert_eq!(vals(&out["y"]), [1.0, 2.0, -1.0, -1.0, 0.5, -4.0]);
}

#[test]
fn linear_accumulates_wide_and_rounds_once() {
    let src = r#"graph @l {
  %0 = input {name = "x"} : bf16[1, 3]
  %1 = param {name = "w"} : bf16[1, 3]
  %2 = linear %0, %1 : bf16[1, 1]
  output "y" = %2
}
"#;
    // 256 + 1 - 256 would be 0 with bf16 accumulation (257 is not a bf16) and 1 in f32 or wider.
    let x = Tensor::from_f32(DType::BF16, [1, 3], vec![256.0, 1.0, -256.0]).unwrap();
    let w = Tensor::from_f32(DType::BF16, [1, 3], vec![1.0, 1.0, 1.0]).unwrap();
    let out = run_kir(src, vec![("x", x)], vec![("w", w)]).unwrap();
    assert_eq!(vals(&out["y"]), [1.0]);
}

#[test]
fn matmul_broadcasts_batches() {
    let src = r#"graph @m {
  %0 = input {name = "a"} : f32[2, 1, 2, 3]
  %1 = input {name = "b"} : f32[2, 3, 2]
  %2 = matmul %0, %1 : f32[2, 2, 2, 2]
  output "c" = %2
}
"#;
    let mut rng = Rng(7);
    let (av, bv) = (rng.vec(12, 1.0), rng.vec(12, 1.0));
    let out = eval1(src, vec![("a", f32s(&[2, 1, 2, 3], &av)), ("b", f32s(&[2, 3, 2], &bv))], "c");
    // c[i, j] = a[i, 0] @ b[j]: a's batch of 1 stretches over b's 2.
    let mut want = Vec::new();
    for i in 0..2 {
        for j in 0..2 {
            for m in 0..2 {
                for n in 0..2 {
                    let s: f32 = (0..3).map(|k| av[i * 6 + m * 3 + k] * bv[j * 6 + k * 2 + n]).sum();
                    want.push(s);
                }
            }
        }
    }
    assert_close(&vals(&out), &want, 1e-6);
}

#[test]
fn grouped_linear_uses_each_experts_weight_for_its_rows() {
    let src = r#"graph @g {
  %0 = input {name = "x"} : f32[4, 2]
  %1 = input {name = "offsets"} : i32[3]
  %2 = param {name = "w0"} : f32[1, 2]
  %3 = param {name = "w1"} : f32[1, 2]
  %4 = grouped_linear %0, %1, %2, %3 {num_experts = 2} : f32[4, 1]
  output "y" = %4
}
"#;
    let x = f32s(&[4, 2], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]);
    let params = || vec![("w0", f32s(&[1, 2], &[1.0, 0.0])), ("w1", f32s(&[1, 2], &[0.0, 1.0]))];
    let out = run_kir(src, vec![("x", x.clone()), ("offsets", i32s(&[3], &[0, 1, 4]))], params()).unwrap();
    // Row 0 takes column 0 (expert 0), rows 1..4 column 1 (expert 1).
    assert_eq!(vals(&out["y"]), [1.0, 4.0, 6.0, 8.0]);
    let err = run_kir(src, vec![("x", x), ("offsets", i32s(&[3], &[0, 3, 2]))], params()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "%4 = grouped_linear: offsets [0, 3, 2] must start at 0, never decrease and end at most at the 4 rows"
    );
}
