//! Integration tests: the reference interpreter on whole models. The tiny model (`models/tiny.toml`)
//! is built with the graph builder and run with deterministic random parameters: the forward is
//! finite and deterministic, batching does not mix sequences, attention is causal, per-layer values
//! can be observed, and bad inputs and parameters are typed errors.

use std::collections::HashMap;
use std::path::Path;
use std::sync::OnceLock;
use std::time::Instant;

use crate::util::random_params;
use kiln_compiler::build::build_graph;
use kiln_compiler::spec::load;
use kiln_ir::interp::{run, run_with, InterpError, Outputs, Tensor};
use kiln_ir::{DType, Graph, Op, ValueId};

fn tiny() -> &'static Graph {
    static G: OnceLock<Graph> = OnceLock::new();
    G.get_or_init(|| {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny.toml");
        build_graph(&load(&path).unwrap_or_else(|e| panic!("{e}"))).unwrap()
    })
}

fn params(g: &Graph) -> HashMap<String, Tensor> {
    random_params(g, 0)
}

fn params_once() -> &'static HashMap<String, Tensor> {
    static P: OnceLock<HashMap<String, Tensor>> = OnceLock::new();
    P.get_or_init(|| params(tiny()))
}

/// Inputs for `tokens[b][t]`: positions `0..T` and MTP tokens shifted left by one (the last one
/// padded with token 0), as the builder documents.
fn inputs(tokens: &[Vec<i64>]) -> HashMap<String, Tensor> {
    let (b, t) = (tokens.len(), tokens[0].len());
    let shape = [b as u64, t as u64];
    let flat: Vec<i64> = tokens.concat();
    let pos: Vec<i64> = (0..b).flat_map(|_| 0..t as i64).collect();
    let mtp: Vec<i64> = tokens.iter().flat_map(|row| row[1..].iter().copied().chain([0])).collect();
    [
        ("tokens".to_string(), Tensor::from_i64(DType::I32, shape, flat).unwrap()),
        ("positions".to_string(), Tensor::from_i64(DType::I32, shape, pos).unwrap()),
        ("mtp_tokens".to_string(), Tensor::from_i64(DType::I32, shape, mtp).unwrap()),
    ]
    .into()
}

fn forward(tokens: &[Vec<i64>]) -> Outputs {
    run(tiny(), &inputs(tokens), params_once()).unwrap_or_else(|e| panic!("{e}"))
}

fn f32s(t: &Tensor) -> &[f32] {
    t.as_f32().unwrap()
}

const PROMPT: [i64; 5] = [0, 17, 305, 42, 511];

#[test]
fn tiny_forward_is_finite_and_deterministic() {
    let start = Instant::now();
    let out = forward(&[PROMPT.to_vec()]);
    eprintln!("tiny forward of {} tokens: {:?}", PROMPT.len(), start.elapsed());
    let logits = &out["logits"];
    assert_eq!(logits.shape(), [1, 5, 512]);
    assert_eq!(logits.dtype(), DType::F32);
    assert!(f32s(logits).iter().all(|v| v.is_finite()));
    assert!(f32s(&out["mtp_logits"]).iter().all(|v| v.is_finite()));
    // Logits vary across the vocabulary and across positions: the model is not degenerate.
    let row = |t: usize| &f32s(logits)[t * 512..(t + 1) * 512];
    let spread = row(0).iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v))
        - row(0).iter().fold(f32::INFINITY, |m, &v| m.min(v));
    assert!(spread > 0.1, "logit spread {spread}");
    assert_ne!(row(0), row(1));
    assert_eq!(forward(&[PROMPT.to_vec()]), out, "a second run is bit-identical");
}

#[test]
fn a_batch_of_two_equals_two_single_runs() {
    let other = vec![3, 3, 100, 7, 1];
    let both = forward(&[PROMPT.to_vec(), other.clone()]);
    let (a, b) = (forward(&[PROMPT.to_vec()]), forward(&[other]));
    for name in ["logits", "mtp_logits"] {
        let joined: Vec<f32> = [f32s(&a[name]), f32s(&b[name])].concat();
        assert_eq!(f32s(&both[name]), joined.as_slice(), "{name}");
    }
}

#[test]
fn later_tokens_do_not_change_earlier_logits() {
    let mut changed = PROMPT.to_vec();
    changed[3] = 9;
    changed[4] = 10;
    let (a, b) = (forward(&[PROMPT.to_vec()]), forward(&[changed]));
    // Positions 0 and 1 see neither change (the MTP input of position 2 is token 3, which changed).
    for name in ["logits", "mtp_logits"] {
        assert_eq!(f32s(&a[name])[..2 * 512], f32s(&b[name])[..2 * 512], "{name}");
    }
    assert_eq!(f32s(&a["logits"])[2 * 512..3 * 512], f32s(&b["logits"])[2 * 512..3 * 512]);
    assert_ne!(f32s(&a["logits"])[3 * 512..], f32s(&b["logits"])[3 * 512..]);
}

#[test]
fn per_layer_hidden_states_can_be_observed() {
    let g = tiny();
    // The residual stream after each block is the last `add` in the scope `model.layers.{i}`.
    let mut block_out: HashMap<String, ValueId> = HashMap::new();
    for n in g.nodes() {
        let node = g.node(n);
        if let (Op::Binary(kiln_ir::BinaryOp::Add), Some(scope)) = (&node.op, &node.scope) {
            if scope.starts_with("model.layers.") && scope.matches('.').count() == 2 {
                block_out.insert(scope.clone(), node.results[0]);
            }
        }
    }
    assert_eq!(block_out.len(), 5, "four decoder layers and one MTP layer");
    let mut seen: HashMap<ValueId, Tensor> = HashMap::new();
    let mut count = 0;
    run_with(g, &inputs(&[PROMPT.to_vec()]), params_once(), &mut |v, t| {
        count += 1;
        if block_out.values().any(|&b| b == v) {
            seen.insert(v, t.clone());
        }
    })
    .unwrap();
    let values: usize = g.nodes().iter().map(|&n| g.node(n).results.len()).sum();
    assert_eq!(count, values, "every value is reported once");
    let h: Vec<&Tensor> = (0..5).map(|i| &seen[&block_out[&format!("model.layers.{i}")]]).collect();
    for t in &h {
        assert_eq!(t.shape(), [1, 5, 64]);
        assert!(f32s(t).iter().all(|v| v.is_finite()));
    }
    assert_ne!(h[0], h[1]);
}

#[test]
fn bad_inputs_and_params_are_typed_errors() {
    let g = tiny();
    let mut params = params_once().clone();
    let removed = "model.layers.2.mlp.experts.5.up_proj.weight";
    params.remove(removed);
    let err = run(g, &inputs(&[PROMPT.to_vec()]), &params).unwrap_err();
    assert_eq!(err, InterpError::MissingParam { name: removed.into() });

    let mut bad = inputs(&[PROMPT.to_vec()]);
    bad.insert("positions".into(), Tensor::from_i64(DType::I32, [1, 4], vec![0, 1, 2, 3]).unwrap());
    let err = run(g, &bad, params_once()).unwrap_err();
    assert_eq!(err.to_string(), "input `positions` dimension 1 (T) is 4, but T = 5 from input `tokens`");

    let mut bad = inputs(&[PROMPT.to_vec()]);
    bad.insert("tokens".into(), Tensor::from_i64(DType::I32, [1, 5], vec![0, 1, 512, 3, 4]).unwrap());
    let err = run(g, &bad, params_once()).unwrap_err();
    assert_eq!(err.to_string(), "%4 = embedding: token id 512 is out of range 0..512");
}
