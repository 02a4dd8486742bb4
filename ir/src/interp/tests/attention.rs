//! `attention`: causal masking with cached keys, shared key/value heads.

use super::*;

/// Attention written as the textbook loop, in f64: query `t` of head `h` sees keys `0..=t + s - t`
/// when causal, and reads key/value head `h / (H / Hk)`.
#[allow(clippy::too_many_arguments)]
fn reference(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dims: [usize; 6], // b, t, s, h, hk, d (dk = dv = d)
    scale: f64,
    causal: bool,
) -> Vec<f32> {
    let [b, t, s, h, hk, d] = dims;
    let mut out = vec![0.0f32; b * t * h * d];
    for bi in 0..b {
        for ti in 0..t {
            for hi in 0..h {
                let kh = hi * hk / h;
                let q_at = |i: usize| q[((bi * t + ti) * h + hi) * d + i] as f64;
                let mut w = Vec::new();
                for si in 0..s {
                    if causal && si > ti + (s - t) {
                        w.push(0.0);
                        continue;
                    }
                    let dot: f64 =
                        (0..d).map(|i| q_at(i) * k[((bi * s + si) * hk + kh) * d + i] as f64).sum();
                    w.push((dot * scale).exp());
                }
                let z: f64 = w.iter().sum();
                for i in 0..d {
                    let o: f64 =
                        (0..s).map(|si| w[si] / z * v[((bi * s + si) * hk + kh) * d + i] as f64).sum();
                    out[((bi * t + ti) * h + hi) * d + i] = o as f32;
                }
            }
        }
    }
    out
}

fn src(causal: bool) -> String {
    format!(
        r#"graph @a {{
  %0 = input {{name = "q"}} : f32[B, T, 4, 3]
  %1 = input {{name = "k"}} : f32[B, S, 2, 3]
  %2 = input {{name = "v"}} : f32[B, S, 2, 3]
  %3 = attention %0, %1, %2 {{scale = 0.5, causal = {causal}}} : f32[B, T, 4, 3]
  output "o" = %3
}}
"#
    )
}

#[test]
fn causal_attention_with_cached_keys_matches_the_loop() {
    // T = 2 new tokens after S - T = 3 cached ones: query 0 sees keys 0..=3, query 1 all five.
    let (b, t, s, h, hk, d) = (2, 2, 5, 4, 2, 3);
    let mut rng = Rng(11);
    let (qv, kv, vv) =
        (rng.vec(b * t * h * d, 2.0), rng.vec(b * s * hk * d, 2.0), rng.vec(b * s * hk * d, 1.0));
    for causal in [true, false] {
        let out = eval1(
            &src(causal),
            vec![
                ("q", f32s(&[b as u64, t as u64, h as u64, d as u64], &qv)),
                ("k", f32s(&[b as u64, s as u64, hk as u64, d as u64], &kv)),
                ("v", f32s(&[b as u64, s as u64, hk as u64, d as u64], &vv)),
            ],
            "o",
        );
        assert_close(&vals(&out), &reference(&qv, &kv, &vv, [b, t, s, h, hk, d], 0.5, causal), 1e-6);
    }
}

#[test]
fn masked_keys_do_not_matter() {
    // Changing the last key and value must not change query 0 (it sees keys 0..=3 of 5).
    let mut rng = Rng(12);
    let (qv, mut kv, mut vv) = (rng.vec(24, 1.0), rng.vec(30, 1.0), rng.vec(30, 1.0));
    let run = |kv: &[f32], vv: &[f32]| {
        vals(&eval1(
            &src(true),
            vec![
                ("q", f32s(&[1, 2, 4, 3], &qv)),
                ("k", f32s(&[1, 5, 2, 3], kv)),
                ("v", f32s(&[1, 5, 2, 3], vv)),
            ],
            "o",
        ))
    };
    let before = run(&kv, &vv);
    for i in 24..30 {
        kv[i] += 1.0;
        vv[i] -= 3.0;
    }
    let after = run(&kv, &vv);
    assert_eq!(before[..12], after[..12]);
    assert_ne!(before[12..], after[12..]);
}

#[test]
fn causal_attention_needs_enough_keys() {
    let err = run_kir(
        &src(true),
        vec![
            ("q", f32s(&[1, 2, 4, 3], &[0.0; 24])),
            ("k", f32s(&[1, 1, 2, 3], &[0.0; 6])),
            ("v", f32s(&[1, 1, 2, 3], &[0.0; 6])),
        ],
        vec![],
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "%3 = attention: causal attention needs at least as many keys as queries, found 1 keys for 2 queries"
    );
}
