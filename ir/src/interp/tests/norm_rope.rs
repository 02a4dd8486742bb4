//! `rms_norm`, `rope` and the YaRN frequencies.

use super::*;
use crate::interp::ops::norm_rope::inv_freq;
use crate::op::Yarn;

#[test]
fn rms_norm_in_f32() {
    let src = r#"graph @n {
  %0 = input {name = "x"} : f32[2, 2]
  %1 = param {name = "w"} : f32[2]
  %2 = rms_norm %0, %1 {eps = 1e-6} : f32[2, 2]
  output "y" = %2
}
"#;
    let out =
        run_kir(src, vec![("x", f32s(&[2, 2], &[3.0, 4.0, 0.0, 0.0]))], vec![("w", f32s(&[2], &[1.0, 2.0]))])
            .unwrap();
    // mean(x^2) = 12.5 for the first row; the zero row stays zero thanks to eps.
    let inv = 1.0 / (12.5f64 + 1e-6).sqrt();
    assert_close(&vals(&out["y"]), &[(3.0 * inv) as f32, (8.0 * inv) as f32, 0.0, 0.0], 1e-7);
}

#[test]
fn rms_norm_rounds_before_the_weight_as_hugging_face() {
    let src = r#"graph @n {
  %0 = input {name = "x"} : bf16[1, 2]
  %1 = param {name = "w"} : bf16[2]
  %2 = rms_norm %0, %1 {eps = 1e-6} : bf16[1, 2]
  output "y" = %2
}
"#;
    let x = Tensor::from_f32(DType::BF16, [1, 2], vec![3.0, 4.0]).unwrap();
    let w = Tensor::from_f32(DType::BF16, [2], vec![1.5, 3.0]).unwrap();
    let y = vals(&run_kir(src, vec![("x", x)], vec![("w", w)]).unwrap()["y"]);
    // normed = [0.848528, 1.131371] -> bf16 [0.84765625, 1.1328125]; times w = [1.27148, 3.3984375]
    // -> bf16 [1.2734375, 3.40625] (3.3984375 is a tie that goes to the even 3.40625). Rounding
    // only once would give 3.390625 for the second element.
    assert_eq!(y, [1.2734375, 3.40625]);
}

/// The rotation of one pair by `angle`, in f64 from f32 cos and sin, as the op does it.
fn rotate(x0: f32, x1: f32, angle: f32) -> (f32, f32) {
    let (c, s) = ((angle as f64).cos() as f32 as f64, (angle as f64).sin() as f32 as f64);
    ((x0 as f64 * c - x1 as f64 * s) as f32, (x0 as f64 * s + x1 as f64 * c) as f32)
}

/// A rope over `x[B, T, heads, 4]` with the given attributes.
fn rope_src(attrs: &str, heads: usize) -> String {
    format!(
        r#"graph @r {{
  %0 = input {{name = "x"}} : f32[B, T, {heads}, 4]
  %1 = input {{name = "pos"}} : i32[B, T]
  %2 = rope %0, %1 {{{attrs}}} : f32[B, T, {heads}, 4]
  output "y" = %2
}}
"#
    )
}

const INTERLEAVED: &str = "theta = 10000.0, interleaved = true";
const HALVES: &str = "theta = 10000.0, interleaved = false";

#[test]
fn rope_rotates_interleaved_pairs_or_halves() {
    let mut rng = Rng(3);
    let xv = rng.vec(16, 1.0);
    let x = f32s(&[1, 2, 2, 4], &xv);
    let pos = i32s(&[1, 2], &[0, 7]);
    // Frequencies for D = 4: 1 and 10000^(-1/2) = 0.01.
    let freqs = [1.0f32, 0.01];
    let y = vals(&eval1(&rope_src(INTERLEAVED, 2), vec![("x", x.clone()), ("pos", pos.clone())], "y"));
    assert_eq!(y[..8], xv[..8], "position 0 is the identity");
    let mut want = xv.clone();
    for lane in 2..4 {
        for (j, f) in freqs.iter().enumerate() {
            let (a, b) = (lane * 4 + 2 * j, lane * 4 + 2 * j + 1);
            (want[a], want[b]) = rotate(xv[a], xv[b], 7.0 * f);
        }
    }
    assert_eq!(y, want);

    let y = vals(&eval1(&rope_src(HALVES, 2), vec![("x", x), ("pos", pos)], "y"));
    let mut want = xv.clone();
    for lane in 2..4 {
        for (j, f) in freqs.iter().enumerate() {
            let (a, b) = (lane * 4 + j, lane * 4 + j + 2);
            (want[a], want[b]) = rotate(xv[a], xv[b], 7.0 * f);
        }
    }
    assert_eq!(y, want);
}

#[test]
fn interleaved_rope_is_rotate_half_on_deinterleaved_lanes() {
    // Hugging Face's `apply_rotary_pos_emb_interleave` returns [rotated evens, rotated odds]: the
    // interleaved result under the permutation (0, 2, 1, 3), which is what `rotate_half` gives on the
    // permuted input. Scores, being dot products over both, are the same in either layout.
    let mut rng = Rng(5);
    let xv = rng.vec(16, 2.0);
    let perm = [0, 2, 1, 3];
    let xp: Vec<f32> = xv.chunks(4).flat_map(|c| perm.map(|p| c[p])).collect();
    let pos = i32s(&[2, 1], &[3, 11]);
    let inter = vals(&eval1(
        &rope_src(INTERLEAVED, 2),
        vec![("x", f32s(&[2, 1, 2, 4], &xv)), ("pos", pos.clone())],
        "y",
    ));
    let half = vals(&eval1(&rope_src(HALVES, 2), vec![("x", f32s(&[2, 1, 2, 4], &xp)), ("pos", pos)], "y"));
    let inter_perm: Vec<f32> = inter.chunks(4).flat_map(|c| perm.map(|p| c[p])).collect();
    assert_eq!(inter_perm, half);
}

#[test]
fn yarn_frequencies_match_the_reference_vector() {
    // Reference §2.4: dim 64, theta 1e4, factor 40, original 4096, beta 32 / 1 (float64 values).
    let want = [
        1.0,
        7.498942093e-01,
        5.623413252e-01,
        4.216965034e-01,
        3.162277660e-01,
        2.371373706e-01,
        1.778279410e-01,
        1.333521432e-01,
        1.0e-01,
        7.498942093e-02,
        5.623413252e-02,
        3.900692657e-02,
        2.687936011e-02,
        1.837814622e-02,
        1.244795587e-02,
        8.334508951e-03,
        5.5e-03,
        3.561997494e-03,
        2.249365301e-03,
        1.370513636e-03,
        7.905694150e-04,
        4.149903985e-04,
        1.778279410e-04,
        3.333803580e-05,
        2.5e-05,
        1.874735523e-05,
        1.405853313e-05,
        1.054241259e-05,
        7.905694150e-06,
        5.928434264e-06,
        4.445698525e-06,
        3.333803580e-06,
    ];
    let yarn = Yarn { factor: 40.0, original_max_position: 4096, beta_fast: 32.0, beta_slow: 1.0 };
    let got = inv_freq(64, 1e4, Some(&yarn));
    assert_eq!(got.len(), 32);
    for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
        assert!(((g - w) / w).abs() < 1e-6, "f'_{i}: got {g:e}, want {w:e}");
    }
    // Without YaRN the frequencies are theta^(-2i/dim).
    let plain = inv_freq(64, 1e4, None);
    assert!((plain[8] - 0.1).abs() < 1e-15 && (plain[31] - 1e4f64.powf(-62.0 / 64.0)).abs() < 1e-18);
}

#[test]
fn rope_uses_the_yarn_frequencies() {
    // D = 4, theta = 10, original length 64: corr(32) = -0.995 and corr(1) = 2.016, so low = 0 and
    // high = 3, ramp = [0, 1/3] and f' = [1, f1 * (2/3) + f1 / 4 * (1/3)] with f1 = 10^(-1/2).
    let attrs = "theta = 10.0, interleaved = true, yarn_factor = 4.0, yarn_original_max_position = 64, \
                 yarn_beta_fast = 32.0, yarn_beta_slow = 1.0";
    let x = f32s(&[1, 1, 1, 4], &[1.0, 0.0, 1.0, 0.0]);
    let y = vals(&eval1(&rope_src(attrs, 1), vec![("x", x), ("pos", i32s(&[1, 1], &[50]))], "y"));
    let f1 = 10f64.powf(-0.5);
    let f1 = (f1 * (2.0 / 3.0) + f1 / 4.0 / 3.0) as f32;
    let (a, b) = rotate(1.0, 0.0, 50.0);
    let (c, d) = rotate(1.0, 0.0, 50.0 * f1);
    assert_close(&y, &[a, b, c, d], 1e-6);
}
