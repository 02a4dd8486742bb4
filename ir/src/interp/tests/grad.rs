//! The gradient ops (`attention_grad` has its own file): values computed by hand, central
//! differences of the forward op each one is the gradient of, and the adjoint identity
//! `<f(x), y> = <x, f^T(y)>` for the linear ones.

use super::*;
use crate::op::{Op, RopeConfig, Yarn};

fn i64s(shape: &[u64], v: &[i64]) -> Tensor {
    Tensor::from_i64(DType::I64, shape, v.to_vec()).unwrap()
}

fn graph(src: &str) -> Graph {
    parse(src).unwrap_or_else(|e| panic!("{e}\n{src}"))
}

/// `sum a * b` in f64.
fn inner(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
}

fn u(shape: &[usize]) -> Vec<u64> {
    shape.iter().map(|&d| d as u64).collect()
}

#[test]
fn embedding_grad_adds_rows_by_id() {
    let src = r#"graph @g {
  %0 = input {name = "ids"} : i32[3]
  %1 = input {name = "dy"} : f32[3, 2]
  %2 = embedding_grad %0, %1 {rows = 4} : f32[4, 2]
  output "dtable" = %2
}
"#;
    // Ids 2, 0, 2: row 2 gets the first and last rows of dy, row 0 the middle one, rows 1 and 3 none.
    let dy = f32s(&[3, 2], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    let out = run_printed(src, vec![("ids", i32s(&[3], &[2, 0, 2])), ("dy", dy.clone())]);
    assert_eq!(vals(&out["dtable"]), [3.0, 4.0, 0.0, 0.0, 6.0, 8.0, 0.0, 0.0]);
    let err = run_kir(src, vec![("ids", i32s(&[3], &[2, 4, 0])), ("dy", dy)], vec![]).unwrap_err();
    assert_eq!(err.to_string(), "%2 = embedding_grad: token id 4 is out of range 0..4");
}

#[test]
fn embedding_grad_of_bf16_rows_is_f32() {
    // bf16 gradients summed in f64 and rounded once to f32: 1 + 2^-8 is not a bf16, but is an f32.
    let src = r#"graph @g {
  %0 = input {name = "ids"} : i64[2, 1]
  %1 = input {name = "dy"} : bf16[2, 1, 1]
  %2 = embedding_grad %0, %1 {rows = 1} : f32[1, 1]
  output "dtable" = %2
}
"#;
    let dy = Tensor::from_f32(DType::BF16, [2, 1, 1], vec![1.0, 2f32.powi(-8)]).unwrap();
    let out = run_printed(src, vec![("ids", i64s(&[2, 1], &[0, 0])), ("dy", dy)]);
    assert_eq!(vals(&out["dtable"]), [1.0 + 2f32.powi(-8)]);
}

#[test]
fn embedding_grad_is_the_gradient_of_embedding() {
    let (v, n, d) = (5usize, 7usize, 3usize);
    let mut rng = Rng(21);
    let ids: Vec<i64> = (0..n).map(|_| rng.below(v as u64) as i64).collect();
    let (table, dy) = (rng.vec(v * d, 1.0), rng.vec(n * d, 1.0));
    let forward = graph(&format!(
        r#"graph @f {{
  %0 = input {{name = "table"}} : f32[{v}, {d}]
  %1 = input {{name = "ids"}} : i32[{n}]
  %2 = embedding %0, %1 : f32[{n}, {d}]
  output "y" = %2
}}
"#
    ));
    let inputs = [("table", f32s(&u(&[v, d]), &table)), ("ids", i32s(&u(&[n]), &ids))];
    let fd = central_differences(&forward, &inputs, "y", &dy, "table", 1e-2);
    let src = format!(
        r#"graph @g {{
  %0 = input {{name = "ids"}} : i32[{n}]
  %1 = input {{name = "dy"}} : f32[{n}, {d}]
  %2 = embedding_grad %0, %1 {{rows = {v}}} : f32[{v}, {d}]
  output "g" = %2
}}
"#
    );
    let g = eval1(&src, vec![("ids", i32s(&u(&[n]), &ids)), ("dy", f32s(&u(&[n, d]), &dy))], "g");
    let err = relative_error(&vals(&g), &fd);
    eprintln!("embedding_grad vs central differences of embedding: {err:.2e}");
    assert!(err < 1e-5, "{err}");
}

/// `cross_entropy_grad` of `logits : {logits}`, `targets : {targets}`, `dloss : {loss}`.
fn ce_grad_src(logits: &str, targets: &str, loss: &str, attrs: &str) -> String {
    format!(
        r#"graph @g {{
  %0 = input {{name = "logits"}} : {logits}
  %1 = input {{name = "targets"}} : {targets}
  %2 = input {{name = "dloss"}} : {loss}
  %3 = cross_entropy_grad %0, %1, %2{attrs} : f32[{shape}]
  output "dlogits" = %3
}}
"#,
        shape = logits.split_once('[').unwrap().1.trim_end_matches(']')
    )
}

#[test]
fn cross_entropy_grad_is_softmax_less_onehot_times_dloss() {
    let src = ce_grad_src("f32[3, 3]", "i64[3]", "f32[3]", " {ignore_index = -100}");
    // softmax([1, 2, 3]) = [0.09003057, 0.24472847, 0.66524096].
    #[rustfmt::skip]
    let x = f32s(&[3, 3], &[
        1.0, 2.0, 3.0,          // target 2, dloss 1
        1001.0, 1002.0, 1003.0, // target 0, dloss 2: only differences matter
        f32::NAN, 0.0, 0.0,     // ignored: zeros whatever the row holds
    ]);
    let out = run_printed(
        &src,
        vec![("logits", x), ("targets", i64s(&[3], &[2, 0, -100])), ("dloss", f32s(&[3], &[1.0, 2.0, 5.0]))],
    );
    let p = [0.090_030_57, 0.244_728_47, 0.665_240_96];
    #[rustfmt::skip]
    let want = [
        p[0], p[1], p[2] - 1.0,
        2.0 * (p[0] - 1.0), 2.0 * p[1], 2.0 * p[2],
        0.0, 0.0, 0.0,
    ];
    assert_close(&vals(&out["dlogits"]), &want, 1e-7);
}

#[test]
fn cross_entropy_grad_is_the_gradient_of_cross_entropy() {
    let (rows, v) = (6usize, 5usize);
    let mut rng = Rng(31);
    let logits = rng.vec(rows * v, 3.0);
    let mut targets: Vec<i64> = (0..rows).map(|_| rng.below(v as u64) as i64).collect();
    targets[4] = -1;
    let dloss: Vec<f32> = rng.vec(rows, 1.0);
    let forward = graph(&format!(
        r#"graph @f {{
  %0 = input {{name = "logits"}} : f32[2, 3, {v}]
  %1 = input {{name = "targets"}} : i32[2, 3]
  %2 = cross_entropy %0, %1 {{ignore_index = -1}} : f32[2, 3]
  output "loss" = %2
}}
"#
    ));
    let inputs = [("logits", f32s(&[2, 3, v as u64], &logits)), ("targets", i32s(&[2, 3], &targets))];
    let fd = central_differences(&forward, &inputs, "loss", &dloss, "logits", 1e-2);
    let src = ce_grad_src(&format!("f32[2, 3, {v}]"), "i32[2, 3]", "f32[2, 3]", " {ignore_index = -1}");
    let g = eval1(
        &src,
        vec![
            ("logits", f32s(&[2, 3, v as u64], &logits)),
            ("targets", i32s(&[2, 3], &targets)),
            ("dloss", f32s(&[2, 3], &dloss)),
        ],
        "dlogits",
    );
    let g = vals(&g);
    assert!(g[4 * v..5 * v].iter().all(|&x| x == 0.0), "the ignored row has no gradient");
    let err = relative_error(&g, &fd);
    eprintln!("cross_entropy_grad vs central differences of cross_entropy: {err:.2e}");
    assert!(err < 1e-3, "{err}");
}

#[test]
fn cross_entropy_grad_checks_targets() {
    let src = ce_grad_src("f32[2, 3]", "i32[2]", "f32[2]", "");
    let err = run_kir(
        &src,
        vec![
            ("logits", f32s(&[2, 3], &[0.0; 6])),
            ("targets", i32s(&[2], &[0, 3])),
            ("dloss", f32s(&[2], &[1.0, 1.0])),
        ],
        vec![],
    )
    .unwrap_err();
    assert_eq!(err.to_string(), "%3 = cross_entropy_grad: target 3 (row 1) is out of range 0..3");
}

/// `rope` (and with `inverse`, its adjoint) over `x[2, 3, 2, 8]`.
fn rope_src(cfg: &RopeConfig) -> String {
    let attrs: Vec<String> = Op::Rope(*cfg).attrs().iter().map(|(k, v)| format!("{k} = {v}")).collect();
    format!(
        r#"graph @r {{
  %0 = input {{name = "x"}} : f32[2, 3, 2, 8]
  %1 = input {{name = "pos"}} : i32[2, 3]
  %2 = rope %0, %1 {{{}}} : f32[2, 3, 2, 8]
  output "y" = %2
}}
"#,
        attrs.join(", ")
    )
}

#[test]
fn inverse_rope_rotates_back() {
    // D = 2 rotates one pair by the position itself (inv_freq = 1): [1, 0] at position 1 goes to
    // [cos 1, sin 1], and the inverse takes it to [cos 1, -sin 1].
    let src = r#"graph @r {
  %0 = input {name = "x"} : f32[1, 1, 2]
  %1 = input {name = "pos"} : i32[1, 1]
  %2 = rope %0, %1 {theta = 10000.0, interleaved = false} : f32[1, 1, 2]
  %3 = rope %0, %1 {theta = 10000.0, interleaved = false, inverse = true} : f32[1, 1, 2]
  output "y" = %2
  output "back" = %3
}
"#;
    let out = run_printed(src, vec![("x", f32s(&[1, 1, 2], &[1.0, 0.0])), ("pos", i32s(&[1, 1], &[1]))]);
    let (c, s) = ((1f64).cos() as f32, (1f64).sin() as f32);
    assert_eq!(vals(&out["y"]), [c, s]);
    assert_eq!(vals(&out["back"]), [c, -s]);
}

#[test]
fn inverse_rope_is_the_adjoint_of_rope() {
    let yarn = Yarn { factor: 40.0, original_max_position: 4096, beta_fast: 32.0, beta_slow: 1.0 };
    let mut rng = Rng(41);
    let mut worst = 0.0f64;
    for interleaved in [false, true] {
        for yarn in [None, Some(yarn)] {
            let cfg = RopeConfig { theta: 10000.0, interleaved, yarn, inverse: false };
            let (x, dy) = (rng.vec(96, 1.0), rng.vec(96, 1.0));
            let pos: Vec<i64> = (0..6).map(|_| rng.below(200_000) as i64).collect();
            let run = |cfg: &RopeConfig, x: &[f32]| {
                vals(&eval1(
                    &rope_src(cfg),
                    vec![("x", f32s(&[2, 3, 2, 8], x)), ("pos", i32s(&[2, 3], &pos))],
                    "y",
                ))
            };
            let inverse = RopeConfig { inverse: true, ..cfg };
            let (forward, adjoint) = (inner(&run(&cfg, &x), &dy), inner(&x, &run(&inverse, &dy)));
            let err = (forward - adjoint).abs() / forward.abs().max(1.0);
            worst = worst.max(err);
            assert!(err < 1e-6, "interleaved {interleaved}, yarn {}: {forward} vs {adjoint}", yarn.is_some());
            // And it undoes the rotation, to rounding.
            assert_close(&run(&inverse, &run(&cfg, &x)), &x, 1e-6);
        }
    }
    eprintln!("rope adjoint: <rope(x), dy> vs <x, rope(dy, inverse)>, worst relative difference {worst:.2e}");
}

#[test]
fn take_along_picks_along_an_axis() {
    let src = r#"graph @t {
  %0 = input {name = "data"} : f32[2, 3]
  %1 = input {name = "idx"} : i32[2, 2]
  %2 = take_along %0, %1 {axis = 1} : f32[2, 2]
  %3 = input {name = "rows"} : i64[1, 3]
  %4 = take_along %0, %3 {axis = 0} : f32[1, 3]
  output "cols" = %2
  output "rows" = %4
}
"#;
    let data = f32s(&[2, 3], &[10.0, 11.0, 12.0, 20.0, 21.0, 22.0]);
    let inputs = |idx: &[i64]| {
        vec![("data", data.clone()), ("idx", i32s(&[2, 2], idx)), ("rows", i64s(&[1, 3], &[1, 0, 1]))]
    };
    let out = run_printed(src, inputs(&[2, 0, 1, 1]));
    assert_eq!(vals(&out["cols"]), [12.0, 10.0, 21.0, 21.0]);
    assert_eq!(vals(&out["rows"]), [20.0, 11.0, 22.0]);
    let err = run_kir(src, inputs(&[2, 0, 3, 1]), vec![]).unwrap_err();
    assert_eq!(err.to_string(), "%2 = take_along: index 3 is out of range 0..3");
}

#[test]
fn scatter_add_along_adds_at_the_indices() {
    let src = r#"graph @s {
  %0 = input {name = "idx"} : i32[2, 2]
  %1 = input {name = "src"} : bf16[2, 2]
  %2 = scatter_add_along %0, %1 {axis = 1, size = 3} : f32[2, 3]
  output "y" = %2
}
"#;
    let src_t = Tensor::from_f32(DType::BF16, [2, 2], vec![1.0, 2.0, 3.0, 4.0]).unwrap();
    let out = run_printed(src, vec![("idx", i32s(&[2, 2], &[2, 0, 1, 1])), ("src", src_t.clone())]);
    // Row 1 has index 1 twice: 3 + 4.
    assert_eq!(vals(&out["y"]), [2.0, 0.0, 1.0, 0.0, 7.0, 0.0]);
    let err = run_kir(src, vec![("idx", i32s(&[2, 2], &[2, 0, -1, 1])), ("src", src_t)], vec![]).unwrap_err();
    assert_eq!(err.to_string(), "%2 = scatter_add_along: index -1 is out of range 0..3");
}

#[test]
fn scatter_add_along_is_the_adjoint_of_take_along() {
    // data [2, 5, 3]; indices with repeats along each axis in turn.
    let data_shape = [2usize, 5, 3];
    let mut rng = Rng(51);
    let mut worst = 0.0f64;
    for axis in 0..3 {
        let mut idx_shape = data_shape;
        idx_shape[axis] = 4;
        let n: usize = idx_shape.iter().product();
        let idx: Vec<i64> = (0..n).map(|_| rng.below(data_shape[axis] as u64) as i64).collect();
        let (x, y) = (rng.vec(30, 1.0), rng.vec(n, 1.0));
        let dt = |s: &[usize]| s.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ");
        let (ds, is) = (dt(&data_shape), dt(&idx_shape));
        let size = data_shape[axis];
        let src = format!(
            r#"graph @a {{
  %0 = input {{name = "x"}} : f32[{ds}]
  %1 = input {{name = "idx"}} : i32[{is}]
  %2 = input {{name = "y"}} : f32[{is}]
  %3 = take_along %0, %1 {{axis = {axis}}} : f32[{is}]
  %4 = scatter_add_along %1, %2 {{axis = {axis}, size = {size}}} : f32[{ds}]
  output "taken" = %3
  output "scattered" = %4
}}
"#
        );
        let out = run_printed(
            &src,
            vec![
                ("x", f32s(&u(&data_shape), &x)),
                ("idx", i32s(&u(&idx_shape), &idx)),
                ("y", f32s(&u(&idx_shape), &y)),
            ],
        );
        let (forward, adjoint) = (inner(&vals(&out["taken"]), &y), inner(&x, &vals(&out["scattered"])));
        let err = (forward - adjoint).abs() / forward.abs().max(1.0);
        assert!(err < 1e-6, "axis {axis}: {forward} vs {adjoint}");
        worst = worst.max(err);
    }
    eprintln!("take_along adjoint: <take_along(x), y> vs <x, scatter_add_along(y)>, worst {worst:.2e}");
}

/// `grouped_linear_wgrad` over `x[M, K]`, `dy[M, N]` and three experts.
fn wgrad_src(m: usize, k: usize, n: usize) -> String {
    format!(
        r#"graph @w {{
  %0 = input {{name = "x"}} : f32[{m}, {k}]
  %1 = input {{name = "offsets"}} : i32[4]
  %2 = input {{name = "dy"}} : f32[{m}, {n}]
  %3, %4, %5 = grouped_linear_wgrad %0, %1, %2 {{num_experts = 3}} : f32[{n}, {k}], f32[{n}, {k}], f32[{n}, {k}]
  output "dw0" = %3
  output "dw1" = %4
  output "dw2" = %5
}}
"#
    )
}

#[test]
fn grouped_linear_wgrad_by_hand() {
    // Rows 0..2 are expert 0's, expert 1 has none, row 2 is expert 2's.
    let x = f32s(&[3, 2], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    let dy = f32s(&[3, 1], &[1.0, 10.0, 100.0]);
    let src = wgrad_src(3, 2, 1);
    let out =
        run_printed(&src, vec![("x", x.clone()), ("offsets", i32s(&[4], &[0, 2, 2, 3])), ("dy", dy.clone())]);
    assert_eq!(vals(&out["dw0"]), [31.0, 42.0]);
    assert_eq!(vals(&out["dw1"]), [0.0, 0.0]);
    assert_eq!(vals(&out["dw2"]), [500.0, 600.0]);
    let err = run_kir(&src, vec![("x", x), ("offsets", i32s(&[4], &[0, 2, 1, 3])), ("dy", dy)], vec![])
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "%3 = grouped_linear_wgrad: offsets [0, 2, 1, 3] must start at 0, never decrease and end at most at the 3 rows"
    );
}

#[test]
fn grouped_linear_wgrad_is_the_gradient_of_grouped_linear() {
    let (m, k, n) = (7usize, 4usize, 3usize);
    // Expert 0 has rows 0..3, expert 1 none, expert 2 rows 3..7.
    let offsets = i32s(&[4], &[0, 3, 3, 7]);
    let mut rng = Rng(61);
    let (x, dy) = (f32s(&u(&[m, k]), &rng.vec(m * k, 1.0)), rng.vec(m * n, 1.0));
    let forward = graph(&format!(
        r#"graph @f {{
  %0 = input {{name = "x"}} : f32[{m}, {k}]
  %1 = input {{name = "offsets"}} : i32[4]
  %2 = input {{name = "w0"}} : f32[{n}, {k}]
  %3 = input {{name = "w1"}} : f32[{n}, {k}]
  %4 = input {{name = "w2"}} : f32[{n}, {k}]
  %5 = grouped_linear %0, %1, %2, %3, %4 {{num_experts = 3}} : f32[{m}, {n}]
  output "y" = %5
}}
"#
    ));
    let mut inputs = vec![("x", x.clone()), ("offsets", offsets.clone())];
    for name in ["w0", "w1", "w2"] {
        inputs.push((name, f32s(&u(&[n, k]), &rng.vec(n * k, 1.0))));
    }
    let grads = vec![("x", x), ("offsets", offsets), ("dy", f32s(&u(&[m, n]), &dy))];
    let out = run_kir(&wgrad_src(m, k, n), grads, vec![]).unwrap();
    let mut worst = 0.0f64;
    for (i, name) in ["w0", "w1", "w2"].into_iter().enumerate() {
        let fd = central_differences(&forward, &inputs, "y", &dy, name, 1e-2);
        let got = vals(&out[&format!("dw{i}")]);
        if i == 1 {
            // Expert 1 has no rows: its weights change nothing.
            assert!(got.iter().all(|&v| v == 0.0) && fd.iter().all(|&v| v == 0.0), "{got:?} {fd:?}");
            continue;
        }
        worst = worst.max(relative_error(&got, &fd));
    }
    eprintln!("grouped_linear_wgrad vs central differences of grouped_linear: {worst:.2e}");
    assert!(worst < 1e-5, "{worst}");
}

const COMBINE_GRAD: &str = r#"graph @c {
  %0 = input {name = "dy"} : f32[2, 1]
  %1 = input {name = "y"} : f32[4, 1]
  %2 = input {name = "perm"} : i32[4]
  %3 = input {name = "w"} : f32[2, 2]
  %4, %5 = moe_combine_grad %0, %1, %2, %3 {top_k = 2} : f32[4, 1], f32[2, 2]
  output "dy_sorted" = %4
  output "dw" = %5
}
"#;

#[test]
fn moe_combine_grad_by_hand() {
    // perm = [1, 2, 0, 3]: slot 0 (token 0, k 0) is row 2, slot 1 row 0, slot 2 row 1, slot 3 row 3.
    let inputs = |perm: &[i64]| {
        vec![
            ("dy", f32s(&[2, 1], &[10.0, 100.0])),
            ("y", f32s(&[4, 1], &[1.0, 2.0, 3.0, 4.0])),
            ("perm", i32s(&[4], perm)),
            ("w", f32s(&[2, 2], &[0.5, 2.0, 3.0, 0.25])),
        ]
    };
    let out = run_printed(COMBINE_GRAD, inputs(&[1, 2, 0, 3]));
    // Row 0 is dy[0] * w[0, 1], row 1 dy[1] * w[1, 0], row 2 dy[0] * w[0, 0], row 3 dy[1] * w[1, 1].
    assert_eq!(vals(&out["dy_sorted"]), [20.0, 300.0, 5.0, 25.0]);
    // dw[t, k] = y[row of the slot] * dy[t]: [3 * 10, 1 * 10, 2 * 100, 4 * 100].
    assert_eq!(vals(&out["dw"]), [30.0, 10.0, 200.0, 400.0]);
    let err = run_kir(COMBINE_GRAD, inputs(&[1, 2, 1, 3]), vec![]).unwrap_err();
    assert_eq!(err.to_string(), "%4 = moe_combine_grad: slot 1 appears twice in the permutation");
}

#[test]
fn moe_combine_grad_is_the_gradient_of_moe_combine() {
    let (n, k, d) = (4usize, 3usize, 5usize);
    let mut rng = Rng(71);
    // A permutation of the N*K slots.
    let mut perm: Vec<i64> = (0..(n * k) as i64).collect();
    for i in (1..perm.len()).rev() {
        perm.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let (y, w, dy) = (rng.vec(n * k * d, 1.0), rng.vec(n * k, 1.0), rng.vec(n * d, 1.0));
    let rows = n * k;
    let forward = graph(&format!(
        r#"graph @f {{
  %0 = input {{name = "y"}} : f32[{rows}, {d}]
  %1 = input {{name = "perm"}} : i32[{rows}]
  %2 = input {{name = "w"}} : f32[{n}, {k}]
  %3 = moe_combine %0, %1, %2 {{top_k = {k}}} : f32[{n}, {d}]
  output "out" = %3
}}
"#
    ));
    let inputs =
        [("y", f32s(&u(&[rows, d]), &y)), ("perm", i32s(&u(&[rows]), &perm)), ("w", f32s(&u(&[n, k]), &w))];
    let src = format!(
        r#"graph @g {{
  %0 = input {{name = "dy"}} : f32[{n}, {d}]
  %1 = input {{name = "y"}} : f32[{rows}, {d}]
  %2 = input {{name = "perm"}} : i32[{rows}]
  %3 = input {{name = "w"}} : f32[{n}, {k}]
  %4, %5 = moe_combine_grad %0, %1, %2, %3 {{top_k = {k}}} : f32[{rows}, {d}], f32[{n}, {k}]
  output "dy_sorted" = %4
  output "dw" = %5
}}
"#
    );
    let mut feeds = inputs.to_vec();
    feeds.push(("dy", f32s(&u(&[n, d]), &dy)));
    let out = run_printed(&src, feeds);
    let err_y = relative_error(
        &vals(&out["dy_sorted"]),
        &central_differences(&forward, &inputs, "out", &dy, "y", 1e-2),
    );
    let err_w =
        relative_error(&vals(&out["dw"]), &central_differences(&forward, &inputs, "out", &dy, "w", 1e-2));
    eprintln!(
        "moe_combine_grad vs central differences of moe_combine: dy_sorted {err_y:.2e}, dweights {err_w:.2e}"
    );
    assert!(err_y < 1e-5 && err_w < 1e-5, "{err_y} {err_w}");
}
