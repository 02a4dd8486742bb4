//! `cache-activations`: DeepSeek-V3's low-precision storage of the activations the backward pass
//! reads (the report's §3.3.3, "Low-Precision Storage and Communication"; reference §4.1), on an
//! FP8 train step (`train_step`, `accumulate` of a spec with `[quantization]`), after
//! `insert-fp8-casts` has put every FP8 linear's GEMMs on quantised operands.
//!
//! A value the forward pass makes and the backward pass reads lives from one to the other in its
//! own dtype. For two kinds of value the report keeps an FP8 copy instead, made in the forward pass;
//! the backward pass reads that copy dequantised and the high-precision value dies with its last
//! forward reader:
//!
//! - [`ATTN_OUT`], §3.3.3 (1), "Linear after attention operator": the input of `o_proj` (the
//!   attention output), which its weight gradient reads. The forward's 1 x 128 tiles (the Fprop's
//!   operand) are the copy, with the report's own scale rule: every scale rounded up to an integral
//!   power of two, in the forward tiles and in the 128 x 1 tiles the weight gradient quantises the
//!   copy into, so that the change of tiles moves exponents rather than rounding mantissas again.
//!   The report stores these in E5M6; kiln has one FP8 element format, E4M3, and uses it here.
//! - [`SWIGLU`], §3.3.3 (2), "SwiGLU operator in MoE": `h = silu(g) * u` read by an FP8
//!   down-projection. Its inputs `g` and `u` are cached in FP8 (1 x 128 tiles, the spec's scale rule,
//!   the report's "fine-grained quantization"), and the backward pass recomputes `silu(g)` and `h`
//!   from their dequantised copies: the SwiGLU's gradient and the down-projection's weight gradient
//!   read those instead of the forward's four values. The report names the MoE's SwiGLU; kiln applies
//!   the rule to every SwiGLU that feeds an FP8 down-projection whose values the backward pass reads:
//!   the dense layers' MLPs and the shared experts. The routed experts have none: autodiff's
//!   `moe_experts` rule recomputes their whole FFN from the dispatched rows in the backward pass
//!   (`autodiff/rules/moe.rs`), so nothing of their SwiGLU is kept for it to cache.
//!
//! Unlike `rematerialize` this changes the step's numbers: the backward pass computes with
//! FP8-rounded activations, as DeepSeek-V3's does. The forward's `o_proj` Fprop changes too (its
//! tiles' scales are powers of two). `kiln train --no-fp8-cache` (and `kiln compile --disable-pass
//! cache-activations`) turns it off. Without `[quantization]`, on another program, or without a
//! `loss` output it does nothing.
//!
//! Where the copies run: the quantisations are emitted beside the value they copy, in the forward
//! pass; the dequantisations (and the recomputed SwiGLU) just before their first backward reader,
//! so [`kiln_ir::Graph::nodes`] runs them there.

use std::collections::{HashMap, HashSet};

use kiln_ir::module::ProgramKind;
use kiln_ir::op::QuantSpec;
use kiln_ir::{BinaryOp, DType, Graph, NodeId, Op, UnaryOp, ValueId};

use super::insert_fp8_casts::AMAX_FLOOR;
use super::rematerialize::forward_pass;
use super::rewrite::{Rewriter, Trace};
use super::{Changed, Options, PassError};

const NAME: &str = "cache-activations";

/// `o_proj`'s input kept for the backward pass as its FP8 Fprop operand, power-of-two scales.
pub const ATTN_OUT: &str = "cache-attn-out-f8";
/// A SwiGLU's inputs kept in FP8, its output recomputed in the backward pass.
pub const SWIGLU: &str = "cache-swiglu-in-f8";

pub const RULES: &[&str] = &[ATTN_OUT, SWIGLU];

pub fn run(graph: &mut Graph, opts: &Options) -> Result<Changed, PassError> {
    Ok(rewrite(graph, opts)?.changed())
}

/// The node of `v`'s producer, if it is `op`-like by `pred`.
fn made_by(g: &Graph, v: ValueId, pred: impl Fn(&Op) -> bool) -> Option<NodeId> {
    let n = g.producer(v);
    pred(&g.node(n).op).then_some(n)
}

/// Whether `v` is the dequantised FP8 copy of the trainable weight of an `o_proj`.
fn o_proj_weight(g: &Graph, v: ValueId) -> bool {
    let Some(d) = made_by(g, v, |op| matches!(op, Op::Dequantize { .. })) else { return false };
    let Some(q) = made_by(g, g.node(d).inputs[0], |op| matches!(op, Op::Quantize { .. })) else {
        return false;
    };
    matches!(&g.node(g.producer(g.node(q).inputs[0])).op, Op::Input { name }
        if name.ends_with("self_attn.o_proj.weight"))
}

/// How a backward copy of a forward value is made.
enum Copy {
    /// Dequantised from the FP8 copy made in the forward pass: by the old graph's quantisation
    /// `Some(node)` (the `o_proj` Fprop's), or (`None`) by one this pass emits.
    Cached(Option<NodeId>),
    /// The same op again, on the backward copies of its operands.
    Recomputed,
}

/// Runs the pass and reports which rules fired.
pub fn rewrite(graph: &mut Graph, opts: &Options) -> Result<Trace, PassError> {
    let mut trace = Trace::new(RULES);
    let Some(q) = opts.spec.quantization.as_ref() else { return Ok(trace) };
    if !matches!(opts.kind, ProgramKind::TrainStep | ProgramKind::Accumulate) {
        return Ok(trace);
    }
    let Some(forward) = forward_pass(graph) else { return Ok(trace) };
    let g = &*graph;
    let backward_reads = |v: ValueId| g.users(v).into_iter().any(|u| !forward.contains(&u));
    let order = g.nodes();

    // What the backward pass reads instead: old value -> how its copy is made.
    let mut copies: HashMap<ValueId, Copy> = HashMap::new();
    // Quantisations whose scales become powers of two.
    let mut pow2: HashSet<NodeId> = HashSet::new();
    // Forward nodes after which FP8 copies are emitted: node -> the values copied.
    let mut emit_after: HashMap<NodeId, Vec<ValueId>> = HashMap::new();
    for &n in &order {
        if !forward.contains(&n) {
            continue;
        }
        let node = g.node(n);
        match &node.op {
            // o_proj's Fprop: promoted_gemm(dequantize(quantize(x)), its FP8 weight).
            Op::PromotedGemm { .. } if o_proj_weight(g, node.inputs[1]) => {
                let Some(d) = made_by(g, node.inputs[0], |op| matches!(op, Op::Dequantize { .. })) else {
                    continue;
                };
                let Some(qx) = made_by(g, g.node(d).inputs[0], |op| matches!(op, Op::Quantize { .. })) else {
                    continue;
                };
                let x = g.node(qx).inputs[0];
                if !backward_reads(x) || copies.contains_key(&x) {
                    continue;
                }
                copies.insert(x, Copy::Cached(Some(qx)));
                pow2.insert(qx);
                // The weight gradient's quantisations of x, through its reshapes and transposes.
                let mut stack: Vec<NodeId> =
                    g.users(x).into_iter().filter(|u| !forward.contains(u)).collect();
                let mut seen = HashSet::new();
                while let Some(u) = stack.pop() {
                    if !seen.insert(u) {
                        continue;
                    }
                    match g.node(u).op {
                        Op::Quantize { .. } => {
                            pow2.insert(u);
                        }
                        Op::Reshape { .. } | Op::Transpose { .. } => {
                            stack.extend(g.node(u).results.iter().flat_map(|&r| g.users(r)))
                        }
                        _ => {}
                    }
                }
                trace.fire(ATTN_OUT);
            }
            // h = silu(g) * u, quantised for an FP8 GEMM.
            Op::Binary(BinaryOp::Mul) => {
                let (s, u) = (node.inputs[0], node.inputs[1]);
                let Some(silu) = made_by(g, s, |op| matches!(op, Op::Unary(UnaryOp::Silu))) else {
                    continue;
                };
                let (gate, h) = (g.node(silu).inputs[0], node.results[0]);
                let fp8_operand = g
                    .users(h)
                    .into_iter()
                    .any(|r| forward.contains(&r) && matches!(g.node(r).op, Op::Quantize { .. }));
                let values = [gate, s, u, h];
                if !fp8_operand
                    || !forward.contains(&silu)
                    || gate == u
                    || !values.iter().any(|&v| backward_reads(v))
                    || values.iter().any(|v| copies.contains_key(v))
                {
                    continue;
                }
                copies.insert(gate, Copy::Cached(None));
                copies.insert(u, Copy::Cached(None));
                copies.insert(s, Copy::Recomputed);
                copies.insert(h, Copy::Recomputed);
                // Each copy right after the value it copies, not after the SwiGLU: where the order
                // runs a shared expert's forward late, beside its backward (expert parallelism
                // leaves it outside the all-to-all), the backward reads `gate` before the mul.
                for v in [gate, u] {
                    emit_after.entry(g.producer(v)).or_default().push(v);
                }
                trace.fire(SWIGLU);
            }
            _ => {}
        }
    }
    if copies.is_empty() {
        return Ok(trace);
    }

    let b1 = q.weight_block[1];
    let mut rw = Rewriter::new(NAME, g);
    // The new FP8 copies (codes, scales, tiles) of the cached old values.
    let mut fp8: HashMap<ValueId, (ValueId, ValueId, Vec<u64>)> = HashMap::new();
    // The backward copies made so far: old value -> new value.
    let mut made: HashMap<ValueId, ValueId> = HashMap::new();
    for &n in &order {
        let node = g.node(n);
        let backward = !forward.contains(&n);
        let mut inputs = Vec::with_capacity(node.inputs.len());
        for &v in &node.inputs {
            inputs.push(if backward && copies.contains_key(&v) {
                backward_copy(&mut rw, g, v, &copies, &fp8, &mut made)?
            } else {
                rw.get(v)?
            });
        }
        match &node.op {
            Op::Quantize { to, spec } if pow2.contains(&n) => {
                let op = Op::Quantize { to: *to, spec: QuantSpec { pow2_scale: true, ..spec.clone() } };
                let r = rw.op(op, &inputs, node.scope.as_deref())?;
                for (&old, &new) in node.results.iter().zip(&r) {
                    rw.bind(old, new);
                }
                let x = node.inputs[0];
                if matches!(copies.get(&x), Some(Copy::Cached(Some(e))) if *e == n) {
                    fp8.insert(x, (r[0], r[1], spec.block.clone()));
                }
            }
            _ => rw.copy_reading(n, &inputs)?,
        }
        for &v in emit_after.get(&n).into_iter().flatten() {
            let rank = g.ty(v).rank();
            let mut block = vec![1; rank.saturating_sub(1)];
            block.push(b1);
            let spec = QuantSpec { block: block.clone(), amax_floor: AMAX_FLOOR, pow2_scale: q.pow2_scale };
            let scope = g.node(g.producer(v)).scope.clone();
            let r = rw.op(Op::Quantize { to: DType::F8E4M3, spec }, &[rw.get(v)?], scope.as_deref())?;
            fp8.insert(v, (r[0], r[1], block));
        }
    }
    *graph = rw.finish()?;
    Ok(trace)
}

/// The backward copy of old value `v` (see [`Copy`]), made once.
fn backward_copy(
    rw: &mut Rewriter,
    g: &Graph,
    v: ValueId,
    copies: &HashMap<ValueId, Copy>,
    fp8: &HashMap<ValueId, (ValueId, ValueId, Vec<u64>)>,
    made: &mut HashMap<ValueId, ValueId>,
) -> Result<ValueId, PassError> {
    if let Some(&c) = made.get(&v) {
        return Ok(c);
    }
    let producer = g.node(g.producer(v));
    let scope = producer.scope.as_deref();
    let c = match &copies[&v] {
        Copy::Cached(_) => {
            let (codes, scales, block) = fp8.get(&v).ok_or_else(|| PassError::Precondition {
                pass: NAME,
                message: format!("{v} is read by the backward pass before its FP8 copy is made"),
            })?;
            let d =
                rw.op1(Op::Dequantize { to: DType::F32, block: block.clone() }, &[*codes, *scales], scope)?;
            match g.ty(v).dtype {
                DType::F32 => d,
                to => rw.op1(Op::Cast { to }, &[d], scope)?,
            }
        }
        Copy::Recomputed => {
            let mut inputs = Vec::with_capacity(producer.inputs.len());
            for &i in &producer.inputs {
                inputs.push(if copies.contains_key(&i) {
                    backward_copy(rw, g, i, copies, fp8, made)?
                } else {
                    rw.get(i)?
                });
            }
            rw.op1(producer.op.clone(), &inputs, scope)?
        }
    };
    made.insert(v, c);
    Ok(c)
}
