//! `attention_grad`: a case by hand, and central differences of `attention` over every masking
//! `attention` has (none, causal with cached keys, positions) with one shared and with per-head
//! key/value heads.

use super::*;

/// `attention` (output `o`) or `attention_grad` (outputs `dq`, `dk`, `dv`) over
/// `q[B, T, H, Dk]`, `k`/`v[B, S, Hk, D*]`, with positions when `with_positions`.
fn src(grad: bool, dims: [usize; 7], scale: f64, causal: bool, with_positions: bool) -> String {
    let [b, t, s, h, hk, dk, dv] = dims;
    let (q, k, v) = (
        format!("f32[{b}, {t}, {h}, {dk}]"),
        format!("f32[{b}, {s}, {hk}, {dk}]"),
        format!("f32[{b}, {s}, {hk}, {dv}]"),
    );
    let o = format!("f32[{b}, {t}, {h}, {dv}]");
    let mut text = format!(
        r#"graph @a {{
  %0 = input {{name = "q"}} : {q}
  %1 = input {{name = "k"}} : {k}
  %2 = input {{name = "v"}} : {v}
"#
    );
    let mut operands = "%0, %1, %2".to_string();
    if with_positions {
        text += &format!("  %3 = input {{name = \"positions\"}} : i32[{b}, {t}]\n");
        operands += ", %3";
    }
    let attrs = format!("{{scale = {scale:?}, causal = {causal}}}");
    if grad {
        text += &format!(
            r#"  %4 = input {{name = "do"}} : {o}
  %5, %6, %7 = attention_grad {operands}, %4 {attrs} : {q}, {k}, {v}
  output "dq" = %5
  output "dk" = %6
  output "dv" = %7
}}
"#
        );
    } else {
        text += &format!("  %5 = attention {operands} {attrs} : {o}\n  output \"o\" = %5\n}}\n");
    }
    text
}

fn shape(dims: &[usize]) -> Vec<u64> {
    dims.iter().map(|&d| d as u64).collect()
}

#[test]
fn one_query_two_keys_by_hand() {
    // scale 1, q = [1], k = [0, ln 3]: P = [1/4, 3/4]. v = [2, 6], do = [1]:
    // dv = P do = [0.25, 0.75]; dP = do v = [2, 6], sum P dP = 5, dS = P (dP - 5) = [-0.75, 0.75];
    // dq = dS . k = 0.75 ln 3; dk = dS q = [-0.75, 0.75].
    let dims = [1, 1, 2, 1, 1, 1, 1];
    let inputs = |positions: Option<i64>| {
        let mut v = vec![
            ("q", f32s(&[1, 1, 1, 1], &[1.0])),
            ("k", f32s(&[1, 2, 1, 1], &[0.0, 3f32.ln()])),
            ("v", f32s(&[1, 2, 1, 1], &[2.0, 6.0])),
            ("do", f32s(&[1, 1, 1, 1], &[1.0])),
        ];
        v.extend(positions.map(|p| ("positions", i32s(&[1, 1], &[p]))));
        v
    };
    let out = run_printed(&src(true, dims, 1.0, false, false), inputs(None));
    assert_close(&vals(&out["dv"]), &[0.25, 0.75], 1e-7);
    assert_close(&vals(&out["dq"]), &[0.75 * 3f32.ln()], 1e-7);
    assert_close(&vals(&out["dk"]), &[-0.75, 0.75], 1e-7);
    // Causal over one new token after one cached one: it sees both keys, as above.
    let out = run_printed(&src(true, dims, 1.0, true, false), inputs(None));
    assert_close(&vals(&out["dk"]), &[-0.75, 0.75], 1e-7);
    // At position 0 the query sees key 0 alone: P = [1], so only v gets a gradient.
    let out = run_printed(&src(true, dims, 1.0, true, true), inputs(Some(0)));
    assert_eq!(
        (vals(&out["dq"]), vals(&out["dk"]), vals(&out["dv"])),
        (vec![0.0], vec![0.0, 0.0], vec![1.0, 0.0])
    );
}

/// Every gradient of `<attention(q, k, v), do>` against central differences; the largest relative
/// error of the three.
fn check(dims: [usize; 7], causal: bool, positions: Option<&[i64]>, seed: u64) -> f64 {
    let [b, t, s, h, hk, dk, dv] = dims;
    let scale = 1.0 / (dk as f64).sqrt();
    let mut rng = Rng(seed);
    let mut inputs = vec![
        ("q", f32s(&shape(&[b, t, h, dk]), &rng.vec(b * t * h * dk, 1.5))),
        ("k", f32s(&shape(&[b, s, hk, dk]), &rng.vec(b * s * hk * dk, 1.5))),
        ("v", f32s(&shape(&[b, s, hk, dv]), &rng.vec(b * s * hk * dv, 1.0))),
    ];
    if let Some(p) = positions {
        inputs.push(("positions", i32s(&shape(&[b, t]), p)));
    }
    let d_out = rng.vec(b * t * h * dv, 1.0);
    let forward = parse(&src(false, dims, scale, causal, positions.is_some())).unwrap();
    let mut feeds = inputs.clone();
    feeds.push(("do", f32s(&shape(&[b, t, h, dv]), &d_out)));
    let out = run_printed(&src(true, dims, scale, causal, positions.is_some()), feeds);
    let mut worst = 0.0f64;
    for (input, grad) in [("q", "dq"), ("k", "dk"), ("v", "dv")] {
        let fd = central_differences(&forward, &inputs, "o", &d_out, input, 1e-2);
        let err = relative_error(&vals(&out[grad]), &fd);
        assert!(err < 1e-3, "{grad}: {err} for {dims:?}, causal {causal}, positions {positions:?}");
        worst = worst.max(err);
    }
    worst
}

#[test]
fn attention_grad_is_the_gradient_of_attention() {
    // B = 2, T = 2, S = 3 (one cached key before the new ones), H = 4, Dk = 3, Dv = 2.
    let mut worst = 0.0f64;
    for hk in [1, 4] {
        let dims = [2, 2, 3, 4, hk, 3, 2];
        for causal in [false, true] {
            worst = worst.max(check(dims, causal, None, 80 + hk as u64));
        }
        // Each sequence its own length: positions 0 and 2, then 1 and 1.
        worst = worst.max(check(dims, true, Some(&[0, 2, 1, 1]), 90 + hk as u64));
    }
    // Two heads sharing each key/value head.
    worst = worst.max(check([1, 3, 3, 4, 2, 2, 3], true, None, 99));
    eprintln!("attention_grad vs central differences of attention: {worst:.2e}");
}

#[test]
fn a_query_that_sees_nothing_has_no_gradient() {
    // Position -1 (an empty sequence) sees no key: its output is 0 whatever q, k and v are.
    let dims = [1, 2, 2, 1, 1, 2, 2];
    let mut rng = Rng(5);
    let out = run_printed(
        &src(true, dims, 0.5, true, true),
        vec![
            ("q", f32s(&[1, 2, 1, 2], &rng.vec(4, 1.0))),
            ("k", f32s(&[1, 2, 1, 2], &rng.vec(4, 1.0))),
            ("v", f32s(&[1, 2, 1, 2], &rng.vec(4, 1.0))),
            ("positions", i32s(&[1, 2], &[-1, -1])),
            ("do", f32s(&[1, 2, 1, 2], &rng.vec(4, 1.0))),
        ],
    );
    for g in ["dq", "dk", "dv"] {
        assert!(vals(&out[g]).iter().all(|&x| x == 0.0), "{g}");
    }
}

#[test]
fn causal_attention_grad_needs_enough_keys() {
    let err = run_kir(
        &src(true, [1, 2, 1, 1, 1, 1, 1], 1.0, true, false),
        vec![
            ("q", f32s(&[1, 2, 1, 1], &[0.0; 2])),
            ("k", f32s(&[1, 1, 1, 1], &[0.0])),
            ("v", f32s(&[1, 1, 1, 1], &[0.0])),
            ("do", f32s(&[1, 2, 1, 1], &[0.0; 2])),
        ],
        vec![],
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "%5 = attention_grad: causal attention needs at least as many keys as queries, found 1 keys for 2 queries"
    );
}
