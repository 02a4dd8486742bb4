//! `insert-fp8-casts`: DeepSeek-V3's FP8 inference numerics, from the spec's `[quantization]`.
//!
//! For every eligible GEMM (a `linear`, or the `grouped_linear` of routed experts that
//! `plan-moe-dispatch` made) it rewrites, with `b = weight_block` from the spec:
//!
//! ```text
//! w:  param dt[O, I]        ->  dequantize_f32(param f8e4m3[O, I], param f32[ceil(O/b0), ceil(I/b1)])
//! x:  x dt[.., I]           ->  dequantize_f32(quantize(x) per 1 x b1 tile)
//! y:  gemm_dt(x, w)         ->  cast_dt(gemm_f32(x, w))
//! ```
//!
//! The weight keeps its checkpoint name and becomes `f8e4m3`; its block scale is a new param
//! `{name}_scale_inv` (the dequantisation multiplier, one f32 per `b0 x b1` block, edge blocks
//! smaller), exactly DeepSeek's FP8 checkpoint format (reference §4.2, README_WEIGHTS), so real
//! checkpoints bind directly. Activations are quantised online as DeepSeek's `act_quant`:
//! `s = max(amax, 1e-4) / 448` per tile (rounded up to a power of two with `pow2_scale`),
//! `q = e4m3(x / s)`.
//!
//! Eligible: the linears DeepSeek stores in FP8, recognised by their weight's module name
//! ([`FP8_LINEARS`]): `q_a_proj`, `q_b_proj` / `q_proj`, `kv_a_proj_with_mqa`, `kv_b_proj`,
//! `o_proj`, dense, shared- and routed-expert `gate_proj` / `up_proj` / `down_proj`, and MTP's
//! `eh_proj`. Everything else stays in high precision (reference §4.1): the embedding, `lm_head`,
//! the MoE router (`mlp.gate`), norms and the attention core. The spec's `modules_to_not_convert`
//! (Hugging Face's key) may add `lm_head` and take linears out ([`fp8_name`]). A weight is rewritten only when every
//! use of it is as the weight of a GEMM whose weights are all rewritten (a `grouped_linear` needs one
//! dtype for all its experts); anything else is left as it was.
//!
//! The GEMM itself, FP8 x FP8 with FP32 accumulation and the scales applied per 128-wide K block
//! (`fp8_gemm`, the report's N_C = 128 promotion), is a codegen concern: the IR states the numerics
//! as quantize -> dequantize -> GEMM, which the interpreter computes in f32 (each `q * s` rounded
//! once to f32, dot products accumulated in f64), and `fuse-kernels` matches the pattern.
//!
//! Assumes a verified graph in which `moe_experts` has been lowered (it runs after
//! `plan-moe-dispatch`; a `moe_experts` node is a precondition error, since its expert GEMMs are
//! not visible to quantise). Without `[quantization]` in the spec it does nothing. Running it twice
//! changes nothing the second time: rewritten weights are no longer read by a GEMM directly.
//!
//! Does not do: FP8 dispatch (quantising before the all-to-all, reference §4.1), FP8 attention or KV
//! cache, or any change to which dtype the model's activations have between GEMMs.

use std::collections::{HashMap, HashSet};

use kiln_ir::module::ProgramKind;
use kiln_ir::op::{Op, QuantSpec};
use kiln_ir::spec::QuantSection;
use kiln_ir::{DType, Dim, Graph, NodeId, TensorType, ValueId};

use super::rewrite::{Rewriter, Trace};
use super::{Changed, Options, PassError};

pub mod train;

const NAME: &str = "insert-fp8-casts";

/// The modules whose weights DeepSeek-V3's checkpoint stores in FP8 with a `weight_scale_inv`
/// (Hugging Face names; a weight is `{scope}.{module}.weight`).
pub const FP8_LINEARS: &[&str] = &[
    "q_a_proj",
    "q_b_proj",
    "q_proj",
    "kv_a_proj_with_mqa",
    "kv_b_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "eh_proj",
];

/// The floor on a tile's absolute maximum before the scale is taken: `act_quant`'s
/// `tl.maximum(amax, 1e-4)` (reference §4.2), so an all-zero tile gets a finite scale. A kernel
/// constant of DeepSeek's inference code, not a field of the checkpoint config.
pub const AMAX_FLOOR: f64 = 1e-4;

/// `param w: dt[O, I] -> dequantize_f32(param w: f8e4m3[O, I], param w_scale_inv: f32[ceil(O/b0),
/// ceil(I/b1)])`, i.e. `w[i, j] = w8[i, j] * scale_inv[i / b0, j / b1]`.
pub const WEIGHT_BLOCKS: &str = "weight-f8-blocks";
/// `gemm(x, W) -> gemm(dequantize_f32(quantize(x)), W)` with, per 1 x b1 tile,
/// `s = max(amax, 1e-4) / 448` and `x ~ e4m3(x / s) * s`.
pub const QUANTIZE_ACTIVATION: &str = "quantize-activation";
/// `quantize(x) .. quantize(x) -> quantize(x)`: the same operand in the same tiles has the same
/// `q` and `s`, so GEMMs reading one activation share one quantize / dequantize pair (`q_a_proj`
/// and `kv_a_proj_with_mqa` read the same normed `x`; gate and up read the same rows).
pub const SHARE_QUANTIZE: &str = "share-activation-quantize";
/// `gemm_dt(x, w) -> cast_dt(gemm_f32(x, w))` for `dt != f32`: the GEMM accumulates in f32 and
/// rounds once to the activation dtype, as `fp8_gemm` writes its bf16 output.
pub const GEMM_IN_F32: &str = "gemm-in-f32";

/// The rules of this pass, in the order the trace lists them.
pub const RULES: &[&str] = &[WEIGHT_BLOCKS, QUANTIZE_ACTIVATION, SHARE_QUANTIZE, GEMM_IN_F32];

pub fn run(graph: &mut Graph, opts: &Options) -> Result<Changed, PassError> {
    Ok(rewrite(graph, opts)?.changed())
}

fn fail(message: String) -> PassError {
    PassError::Precondition { pass: NAME, message }
}

/// Runs the pass and reports which rules fired.
pub fn rewrite(graph: &mut Graph, opts: &Options) -> Result<Trace, PassError> {
    let mut trace = Trace::new(RULES);
    let Some(q) = &opts.spec.quantization else {
        return Ok(trace);
    };
    if q.format != DType::F8E4M3 {
        return Err(fail(format!(
            "quantization.format `{}` is not supported: FP8 tensors are `f8e4m3`",
            q.format
        )));
    }
    let order = graph.nodes();
    if let Some(&n) = order.iter().find(|&&n| matches!(graph.node(n).op, Op::MoeExperts { .. })) {
        return Err(fail(format!(
            "{} = moe_experts: insert-fp8-casts quantises each expert GEMM, so it runs after plan-moe-dispatch",
            graph.node(n).results[0]
        )));
    }
    if matches!(opts.kind, ProgramKind::TrainStep | ProgramKind::Accumulate) {
        return train::rewrite(graph, q);
    }
    let (gemms, weights) = eligible(graph, &order, q);
    if gemms.is_empty() {
        return Ok(trace);
    }
    let mut rw = Rewriter::new(NAME, graph);
    let mut quantized: HashMap<ValueId, ValueId> = HashMap::new();
    // Weights also read whole (by a reshape), dequantised to their own dtype for those readers.
    let mut whole: HashMap<ValueId, ValueId> = HashMap::new();
    for n in order {
        let node = graph.node(n);
        let scope = node.scope.as_deref();
        match &node.op {
            Op::Param { name } if weights.contains(&node.results[0]) => {
                let ty = graph.ty(node.results[0]);
                let w8 = rw.param(name.clone(), ty.with_dtype(DType::F8E4M3), scope)?;
                let scale = TensorType::new(DType::F32, scale_shape(ty, q.weight_block));
                let s = rw.param(format!("{name}_scale_inv"), scale, scope)?;
                let block = q.weight_block.to_vec();
                let w = rw.op1(Op::Dequantize { to: DType::F32, block: block.clone() }, &[w8, s], scope)?;
                rw.bind(node.results[0], w);
                if graph
                    .users(node.results[0])
                    .into_iter()
                    .any(|u| matches!(graph.node(u).op, Op::Reshape { .. }))
                {
                    let as_before = rw.op1(Op::Dequantize { to: ty.dtype, block }, &[w8, s], scope)?;
                    whole.insert(node.results[0], as_before);
                }
                trace.fire(WEIGHT_BLOCKS);
            }
            Op::Reshape { .. } if whole.contains_key(&node.inputs[0]) => {
                let r = rw.op1(node.op.clone(), &[whole[&node.inputs[0]]], scope)?;
                rw.bind(node.results[0], r);
            }
            Op::Linear | Op::GroupedLinear { .. } if gemms.contains(&n) => {
                let x = rw.get(node.inputs[0])?;
                let xq = match quantized.get(&x) {
                    Some(&v) => {
                        trace.fire(SHARE_QUANTIZE);
                        v
                    }
                    None => {
                        let v = quantize_activation(&mut rw, x, q, scope)?;
                        trace.fire(QUANTIZE_ACTIVATION);
                        quantized.insert(x, v);
                        v
                    }
                };
                let mut operands = vec![xq];
                for &v in &node.inputs[1..] {
                    operands.push(rw.get(v)?);
                }
                let mut y = rw.op1(node.op.clone(), &operands, scope)?;
                let dtype = graph.ty(node.results[0]).dtype;
                if dtype != DType::F32 {
                    y = rw.op1(Op::Cast { to: dtype }, &[y], scope)?;
                    trace.fire(GEMM_IN_F32);
                }
                rw.bind(node.results[0], y);
            }
            _ => rw.copy(n)?,
        }
    }
    let new = rw.finish()?;
    *graph = new;
    Ok(trace)
}

/// `dequantize_f32(quantize(x))` in 1 x `b1` tiles (per row and 128 channels for DeepSeek-V3).
fn quantize_activation(
    rw: &mut Rewriter,
    x: ValueId,
    q: &QuantSection,
    scope: Option<&str>,
) -> Result<ValueId, PassError> {
    // A tile is one row by b1 channels; a rank-1 operand is one row.
    let block = if rw.ty(x).rank() >= 2 { vec![1, q.weight_block[1]] } else { vec![q.weight_block[1]] };
    let spec = QuantSpec { block: block.clone(), amax_floor: AMAX_FLOOR, pow2_scale: q.pow2_scale };
    let qs = rw.op(Op::Quantize { to: DType::F8E4M3, spec }, &[x], scope)?;
    rw.op1(Op::Dequantize { to: DType::F32, block }, &qs, scope)
}

/// `[ceil(O/b0), ceil(I/b1)]` for a weight `[O, I]` (constant, as every param's shape is).
fn scale_shape(w: &TensorType, block: [u64; 2]) -> Vec<Dim> {
    w.shape
        .iter()
        .zip(block)
        .map(|(d, b)| Dim::known(d.as_known().expect("param shapes are constant (verified)").div_ceil(b)))
        .collect()
}

/// Whether `name` is the weight of a linear `q` stores in FP8: a module DeepSeek stores in FP8
/// ([`FP8_LINEARS`]), and the output head when the spec's `modules_to_not_convert` says so
/// ([`QuantSection::quantises`]).
pub fn fp8_name(name: &str, q: &QuantSection) -> bool {
    q.quantises(name, FP8_LINEARS)
}

/// The weight operands of a GEMM node: `linear`'s second, `grouped_linear`'s third onwards.
fn weight_operands(op: &Op, inputs: &[ValueId]) -> Option<std::ops::Range<usize>> {
    match op {
        Op::Linear => Some(1..2),
        Op::GroupedLinear { .. } => Some(2..inputs.len()),
        _ => None,
    }
}

/// The GEMMs to rewrite and the weights to store in FP8: the largest sets in which every GEMM's
/// weights are all rewritten weights and every use of a rewritten weight is as the weight of a
/// rewritten GEMM. Found by shrinking the candidates until both conditions hold.
fn eligible(g: &Graph, order: &[NodeId], q: &QuantSection) -> (HashSet<NodeId>, HashSet<ValueId>) {
    let is_float = |t: &TensorType| t.dtype.is_float() && t.dtype != DType::F8E4M3;
    let mut weights: HashSet<ValueId> = order
        .iter()
        .filter_map(|&n| {
            let node = g.node(n);
            match &node.op {
                Op::Param { name } if fp8_name(name, q) => {
                    let v = node.results[0];
                    (g.ty(v).rank() == 2 && is_float(g.ty(v))).then_some(v)
                }
                _ => None,
            }
        })
        .collect();
    let gemm_nodes: Vec<NodeId> = order
        .iter()
        .copied()
        .filter(|&n| {
            let node = g.node(n);
            weight_operands(&node.op, &node.inputs).is_some() && is_float(g.ty(node.inputs[0]))
        })
        .collect();
    loop {
        let gemms: HashSet<NodeId> = gemm_nodes
            .iter()
            .copied()
            .filter(|&n| {
                let node = g.node(n);
                let ws = weight_operands(&node.op, &node.inputs).expect("filtered to GEMMs");
                node.inputs[ws].iter().all(|v| weights.contains(v))
            })
            .collect();
        let kept: HashSet<ValueId> = weights
            .iter()
            .copied()
            .filter(|&w| {
                // A weight that is also a graph output keeps its type: outputs are the interface.
                !g.is_output(w)
                    && g.users(w).into_iter().all(|u| {
                        let node = g.node(u);
                        // A reshape reads the weight as a whole (fuse-mla-latent's absorbed
                        // attention splits kv_b_proj per head): it gets the dequantised weight.
                        matches!(node.op, Op::Reshape { .. })
                            || gemms.contains(&u)
                                && node.inputs.iter().enumerate().all(|(i, &v)| {
                                    v != w
                                        || weight_operands(&node.op, &node.inputs)
                                            .is_some_and(|r| r.contains(&i))
                                })
                    })
            })
            .collect();
        if kept.len() == weights.len() {
            return (gemms, weights);
        }
        weights = kept;
    }
}
