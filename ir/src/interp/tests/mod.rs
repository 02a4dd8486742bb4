//! Unit tests of the interpreter, one file per op family plus the walker. Graphs are written as
//! `.kir` text; expected values are computed by hand (in the comments) or by a plain loop written
//! independently of the op under test.

mod attention;
mod attention_grad;
mod elementwise;
mod grad;
mod linalg;
mod loss;
mod moe;
mod norm_rope;
mod quant;
mod reduce;
mod shape;
mod walker;

use std::collections::HashMap;

use crate::graph::Graph;
use crate::text::{parse, print};
use crate::types::DType;

use super::{run, InterpError, Outputs, Tensor};

/// Parses `src` and runs it with the given inputs and params.
fn run_kir(
    src: &str,
    inputs: Vec<(&str, Tensor)>,
    params: Vec<(&str, Tensor)>,
) -> Result<Outputs, InterpError> {
    let g = parse(src).unwrap_or_else(|e| panic!("{e}\n{src}"));
    crate::verify::verify(&g).unwrap_or_else(|e| panic!("{e}"));
    let inputs: HashMap<String, Tensor> = inputs.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    let params: HashMap<String, Tensor> = params.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    run(&g, &inputs, &params)
}

/// Runs a graph that must succeed and returns output `name`.
fn eval1(src: &str, inputs: Vec<(&str, Tensor)>, name: &str) -> Tensor {
    let mut out = run_kir(src, inputs, vec![]).unwrap_or_else(|e| panic!("{e}"));
    out.remove(name).unwrap_or_else(|| panic!("no output {name}"))
}

/// Parses `src`, checks that it prints back as exactly `src`, and runs it (it must succeed).
fn run_printed(src: &str, inputs: Vec<(&str, Tensor)>) -> Outputs {
    let g = parse(src).unwrap_or_else(|e| panic!("{e}\n{src}"));
    assert_eq!(print(&g), src, "the graph does not print back as written");
    run_kir(src, inputs, vec![]).unwrap_or_else(|e| panic!("{e}"))
}

/// The gradient of `L = <output out of g, cot>` (a sum in f64) with respect to input `wrt`, by
/// central differences of the interpreter's forward: `(L(x + eps e_i) - L(x - eps e_i)) / step`,
/// where `step` is the difference of the two f32 inputs actually taken.
fn central_differences(
    g: &Graph,
    inputs: &[(&str, Tensor)],
    out: &str,
    cot: &[f32],
    wrt: &str,
    eps: f32,
) -> Vec<f64> {
    let loss = |inputs: &HashMap<String, Tensor>| -> f64 {
        let y = run(g, inputs, &HashMap::new()).unwrap_or_else(|e| panic!("{e}"));
        y[out].as_f32().expect("a float output").iter().zip(cot).map(|(&a, &b)| a as f64 * b as f64).sum()
    };
    let mut feeds: HashMap<String, Tensor> = inputs.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
    let x = feeds[wrt].clone();
    let xs = vals(&x);
    let mut grad = Vec::with_capacity(xs.len());
    for i in 0..xs.len() {
        let mut at = |v: f32| {
            let mut moved = xs.clone();
            moved[i] = v;
            feeds.insert(wrt.to_string(), Tensor::from_f32(x.dtype(), x.shape(), moved).unwrap());
            loss(&feeds)
        };
        let (up, down) = (xs[i] + eps, xs[i] - eps);
        grad.push((at(up) - at(down)) / (up as f64 - down as f64));
    }
    grad
}

/// The largest difference between `got` and `want`, relative to the largest `|want|`.
fn relative_error(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0.0f64, |m, w| m.max(w.abs()));
    assert!(scale > 0.0, "a zero gradient checks nothing");
    got.iter().zip(want).fold(0.0f64, |m, (&g, &w)| m.max((g as f64 - w).abs())) / scale
}

fn f32s(shape: &[u64], v: &[f32]) -> Tensor {
    Tensor::from_f32(DType::F32, shape, v.to_vec()).unwrap()
}

fn i32s(shape: &[u64], v: &[i64]) -> Tensor {
    Tensor::from_i64(DType::I32, shape, v.to_vec()).unwrap()
}

fn vals(t: &Tensor) -> Vec<f32> {
    t.as_f32().expect("a float tensor").to_vec()
}

/// Asserts `got` and `want` agree to `tol`, relative to max(1, |want|).
#[track_caller]
fn assert_close(got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "lengths differ: {got:?} vs {want:?}");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol * w.abs().max(1.0), "element {i}: got {g}, want {w}\n{got:?}\n{want:?}");
    }
}

/// A small deterministic generator (SplitMix64) for random test data.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-scale, scale).
    fn uniform(&mut self, scale: f32) -> f32 {
        let u = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        (2.0 * u - 1.0) * scale
    }

    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform(scale)).collect()
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}
