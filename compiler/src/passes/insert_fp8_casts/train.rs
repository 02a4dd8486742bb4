//! `insert-fp8-casts` on a train step (`train_step`, `accumulate`): DeepSeek-V3's FP8 training
//! recipe (reference §4.1; the report's §3.3, figure 6). Autodiff has already written each
//! linear's three GEMMs (`autodiff/rules/linalg.rs`, `moe.rs`):
//!
//! ```text
//! Fprop  y  = linear(x, w)                                 grouped_linear(x, off, w_e ..)
//! Dgrad  dx = linear(dy, transpose(w))                     grouped_linear(dy, off, transpose(w_e) ..)
//! Wgrad  dw = linear(transpose(dy'), transpose(x'))         grouped_linear_wgrad(x, off, dy)
//! ```
//!
//! (`x'`, `dy'` the operands flattened to rows). For every eligible linear (a trainable weight of
//! a module DeepSeek stores in FP8, [`super::FP8_LINEARS`]) each becomes a `promoted_gemm` of
//! quantise-dequantised operands, FP32 accumulation promoted every `b` elements of K:
//!
//! - [`WEIGHT_ONLINE`]: `w` quantised in `b0 x b1` blocks with the scale computed from the block's
//!   current max (online, no delayed scaling), from the high-precision weight the optimizer
//!   updates, once per step, for Fprop.
//! - [`WEIGHT_RECOMPUTED`]: the same blocks quantised again for Dgrad (a 128x128 block of `w` is
//!   one of `w^T`), in the backward pass: the same values, so the forward's copy dies with the
//!   forward pass instead of living through it (DeepSeek-V3 recomputes what is cheap, §3.2; a
//!   layer's FP8 weights are recomputed from the weight the optimizer has not yet updated).
//! - [`FPROP`]: x in `1 x b1` tiles (per token and 128 channels).
//! - [`DGRAD`]: dy in `1 x b0` tiles, times the transposed FP8 weight, K blocks of `b0`.
//! - [`WGRAD`]: dy and x both in `128 x 1` tiles along the tokens, the contraction axis (as the
//!   transposed operands' `1 x 128` rows; `128` is `b1`). For the routed experts the tiles run
//!   over the rows sorted by expert, aligned at row 0, so a tile at an expert's edge is shared
//!   with its neighbour: the scale is then the max over both experts' rows, and the GEMM's K
//!   blocks follow the same boundaries.
//!
//! What stays high precision (§3.3.1): the embedding, the output head, the MoE gate, norms,
//! attention, and anything that is not one of these GEMMs (the optimizer reads the unquantised
//! weight). The weight's dtype and the state are unchanged: FP8 values live for one step.
//!
//! The activation-caching rules of §3.3.3 (the attention output cached in FP8, SwiGLU recomputed
//! from FP8 inputs) are the next pass's, `cache-activations`: they change what the backward pass
//! reads, not the GEMMs.

use std::collections::{HashMap, HashSet};

use kiln_ir::op::{GemmForm, Op, QuantSpec};
use kiln_ir::spec::QuantSection;
use kiln_ir::{DType, Graph, NodeId, ValueId};

use super::super::rewrite::{Rewriter, Trace};
use super::super::PassError;
use super::{fp8_name, AMAX_FLOOR, GEMM_IN_F32, NAME, SHARE_QUANTIZE};

/// `w -> dequantize_f32(quantize(w))` in `b0 x b1` blocks, each step from the trained weight.
pub const WEIGHT_ONLINE: &str = "weight-f8-blocks-online";
/// The weight's FP8 blocks computed again for its Dgrad, in the backward pass.
pub const WEIGHT_RECOMPUTED: &str = "weight-f8-blocks-recomputed";
/// `linear(x, w) -> promoted_gemm(fp8(x), fp8(w))`, x in `1 x b1` tiles.
pub const FPROP: &str = "fp8-fprop";
/// `linear(dy, w^T) -> promoted_gemm(fp8(dy), fp8(w)^T)`, dy in `1 x b0` tiles.
pub const DGRAD: &str = "fp8-dgrad";
/// `linear(dy'^T, x'^T) -> promoted_gemm(fp8(dy'^T), fp8(x'^T))` (and the experts'
/// `grouped_linear_wgrad`), both in `128 x 1` tiles along the tokens.
pub const WGRAD: &str = "fp8-wgrad";

/// The rules of the train-step rewrite, in trace order.
pub const RULES: &[&str] =
    &[WEIGHT_ONLINE, WEIGHT_RECOMPUTED, FPROP, DGRAD, WGRAD, SHARE_QUANTIZE, GEMM_IN_F32];

/// Whether `a` and `b` are the same computation: the same value, or results at the same position
/// of the same op on the same computations (a copy `rematerialize` made for the backward pass is
/// the same computation as its forward value). `depth` bounds the walk.
fn same(g: &Graph, a: ValueId, b: ValueId, depth: usize) -> bool {
    if a == b {
        return true;
    }
    let (na, nb) = (g.node(g.producer(a)), g.node(g.producer(b)));
    depth > 0
        && na.op == nb.op
        && na.inputs.len() == nb.inputs.len()
        && !matches!(na.op, Op::Input { .. } | Op::Param { .. })
        && na.results.iter().position(|&r| r == a) == nb.results.iter().position(|&r| r == b)
        && na.inputs.iter().zip(&nb.inputs).all(|(&x, &y)| same(g, x, y, depth - 1))
}

/// Whether `v`, or a value it is a reshape (or chain of reshapes) of, is in `set` (as the same
/// computation, see [`same`]).
fn reshaped_from(g: &Graph, mut v: ValueId, set: &HashSet<ValueId>) -> bool {
    loop {
        if set.contains(&v) || set.iter().any(|&x| same(g, v, x, 8)) {
            return true;
        }
        let n = g.producer(v);
        match g.node(n).op {
            Op::Reshape { .. } => v = g.node(n).inputs[0],
            _ => return false,
        }
    }
}

/// The operand of a `transpose {perm = [1, 0]}` that makes `v`, if one does.
fn transposed(g: &Graph, v: ValueId) -> Option<ValueId> {
    let node = g.node(g.producer(v));
    matches!(&node.op, Op::Transpose { perm } if perm == &[1, 0]).then(|| node.inputs[0])
}

/// What the rewrite does to one GEMM node.
enum Gemm {
    Fprop,
    Dgrad,
    Wgrad,
}

/// Classifies the GEMMs of a train step: the trainable FP8 weights (inputs named as DeepSeek's FP8
/// linears, read as a GEMM's weight), and each GEMM of theirs by form.
fn classify(g: &Graph, order: &[NodeId], q: &QuantSection) -> HashMap<NodeId, Gemm> {
    let fp8_input = |v: ValueId| {
        let ty = g.ty(v);
        matches!(&g.node(g.producer(v)).op, Op::Input { name } if fp8_name(name, q))
            && ty.rank() == 2
            && ty.dtype.is_float()
            && ty.dtype != DType::F8E4M3
    };
    let weights_of = |node: &kiln_ir::Node| -> Option<Vec<ValueId>> {
        match node.op {
            Op::Linear => Some(vec![node.inputs[1]]),
            Op::GroupedLinear { .. } => Some(node.inputs[2..].to_vec()),
            _ => None,
        }
    };
    let mut weights = HashSet::new();
    let mut gemms = HashMap::new();
    // Per FP8 linear (its weights), the inputs of its Fprops and the output gradients of its Dgrads.
    let mut fprop_x: HashMap<Vec<ValueId>, HashSet<ValueId>> = HashMap::new();
    let mut dgrad_dy: HashMap<Vec<ValueId>, HashSet<ValueId>> = HashMap::new();
    for &n in order {
        let node = g.node(n);
        let Some(ws) = weights_of(node) else { continue };
        if ws.iter().all(|&w| fp8_input(w)) {
            weights.extend(ws.iter().copied());
            fprop_x.entry(ws).or_default().insert(node.inputs[0]);
            gemms.insert(n, Gemm::Fprop);
        } else if let Some(ws) = ws.iter().map(|&w| transposed(g, w).filter(|&w| fp8_input(w))).collect() {
            dgrad_dy.entry(ws).or_default().insert(node.inputs[0]);
            gemms.insert(n, Gemm::Dgrad);
        }
    }
    // A Wgrad reads the x of one of its linear's Fprops and the dy of one of its Dgrads.
    let of_one_linear = |x: ValueId, dy: ValueId| {
        fprop_x.iter().any(|(ws, xs)| {
            reshaped_from(g, x, xs) && dgrad_dy.get(ws).is_some_and(|dys| reshaped_from(g, dy, dys))
        })
    };
    for &n in order {
        let node = g.node(n);
        let wgrad = match node.op {
            // dw = linear(transpose(dy'), transpose(x')).
            Op::Linear => match (transposed(g, node.inputs[0]), transposed(g, node.inputs[1])) {
                (Some(dy), Some(x)) => of_one_linear(x, dy),
                _ => false,
            },
            Op::GroupedLinearWgrad { .. } => of_one_linear(node.inputs[0], node.inputs[2]),
            _ => false,
        };
        if wgrad && !gemms.contains_key(&n) {
            gemms.insert(n, Gemm::Wgrad);
        }
    }
    // A Dgrad whose weight is not also an Fprop's weight is some other transpose: leave it.
    gemms.retain(|&n, kind| match kind {
        Gemm::Dgrad => {
            let node = g.node(n);
            let ws = match node.op {
                Op::Linear => &node.inputs[1..2],
                _ => &node.inputs[2..],
            };
            ws.iter().all(|&w| transposed(g, w).is_some_and(|w| weights.contains(&w)))
        }
        _ => true,
    });
    gemms
}

/// The quantise-dequantised copies made so far, by (value, tiles): GEMMs that read one value in
/// the same tiles share one copy.
struct Quantizer {
    shared: HashMap<(ValueId, Vec<u64>), ValueId>,
    pow2_scale: bool,
    weight_block: Vec<u64>,
}

impl Quantizer {
    fn fp8(
        &mut self,
        rw: &mut Rewriter,
        trace: &mut Trace,
        v: ValueId,
        block: Vec<u64>,
        scope: Option<&str>,
    ) -> Result<ValueId, PassError> {
        if let Some(&d) = self.shared.get(&(v, block.clone())) {
            trace.fire(SHARE_QUANTIZE);
            return Ok(d);
        }
        let d = self.round_trip(rw, v, block.clone(), scope)?;
        self.shared.insert((v, block), d);
        Ok(d)
    }

    /// `dequantize_f32(quantize(v))` in `block`s, a fresh copy.
    fn round_trip(
        &self,
        rw: &mut Rewriter,
        v: ValueId,
        block: Vec<u64>,
        scope: Option<&str>,
    ) -> Result<ValueId, PassError> {
        let spec = QuantSpec { block: block.clone(), amax_floor: AMAX_FLOOR, pow2_scale: self.pow2_scale };
        let qs = rw.op(Op::Quantize { to: DType::F8E4M3, spec }, &[v], scope)?;
        rw.op1(Op::Dequantize { to: DType::F32, block }, &qs, scope)
    }

    /// The FP8 copy of trainable weight `w` (a value of the old graph), in weight blocks.
    fn weight(
        &mut self,
        rw: &mut Rewriter,
        trace: &mut Trace,
        w: ValueId,
        scope: Option<&str>,
    ) -> Result<ValueId, PassError> {
        let nw = rw.get(w)?;
        let key = (nw, self.weight_block.clone());
        if let Some(&d) = self.shared.get(&key) {
            return Ok(d);
        }
        trace.fire(WEIGHT_ONLINE);
        self.fp8(rw, trace, nw, key.1, scope)
    }

    /// A fresh FP8 copy of trainable weight `w` for the backward pass, shared with nothing.
    fn weight_again(
        &mut self,
        rw: &mut Rewriter,
        trace: &mut Trace,
        w: ValueId,
        scope: Option<&str>,
    ) -> Result<ValueId, PassError> {
        let nw = rw.get(w)?;
        trace.fire(WEIGHT_RECOMPUTED);
        self.round_trip(rw, nw, self.weight_block.clone(), scope)
    }
}

/// Rewrites a train step's eligible GEMMs (see the module documentation).
pub(super) fn rewrite(graph: &mut Graph, q: &QuantSection) -> Result<Trace, PassError> {
    let mut trace = Trace::new(RULES);
    let order = graph.nodes();
    let gemms = classify(graph, &order, q);
    if gemms.is_empty() {
        return Ok(trace);
    }
    let [b0, b1] = q.weight_block;
    let again = recomputable(graph);
    let mut rw = Rewriter::new(NAME, graph);
    let mut qz = Quantizer { shared: HashMap::new(), pow2_scale: q.pow2_scale, weight_block: vec![b0, b1] };
    for n in order {
        let node = graph.node(n);
        let scope = node.scope.as_deref();
        let Some(kind) = gemms.get(&n) else {
            rw.copy(n)?;
            continue;
        };
        let (form, k_block, operands) = match (kind, &node.op) {
            (Gemm::Fprop, _) => {
                let x = rw.get(node.inputs[0])?;
                let tiles = row_tiles(&rw, x, b1);
                let mut ops = vec![qz.fp8(&mut rw, &mut trace, x, tiles, scope)?];
                let (form, ws) = match node.op {
                    Op::GroupedLinear { num_experts } => {
                        ops.push(rw.get(node.inputs[1])?);
                        (GemmForm::Grouped { num_experts }, &node.inputs[2..])
                    }
                    _ => (GemmForm::Linear, &node.inputs[1..2]),
                };
                for &w in ws {
                    ops.push(qz.weight(&mut rw, &mut trace, w, scope)?);
                }
                trace.fire(FPROP);
                (form, b1, ops)
            }
            (Gemm::Dgrad, _) => {
                let dy = rw.get(node.inputs[0])?;
                let tiles = row_tiles(&rw, dy, b0);
                let mut ops = vec![qz.fp8(&mut rw, &mut trace, dy, tiles, scope)?];
                let (form, ws) = match node.op {
                    Op::GroupedLinear { num_experts } => {
                        ops.push(rw.get(node.inputs[1])?);
                        (GemmForm::Grouped { num_experts }, &node.inputs[2..])
                    }
                    _ => (GemmForm::Linear, &node.inputs[1..2]),
                };
                for &wt in ws {
                    let w = transposed(graph, wt).expect("classified as a transposed weight");
                    let d = match &graph.node(graph.producer(w)).op {
                        Op::Input { name } if again(name) => {
                            qz.weight_again(&mut rw, &mut trace, w, scope)?
                        }
                        _ => qz.weight(&mut rw, &mut trace, w, scope)?,
                    };
                    ops.push(rw.op1(Op::Transpose { perm: vec![1, 0] }, &[d], scope)?);
                }
                trace.fire(DGRAD);
                (form, b0, ops)
            }
            (Gemm::Wgrad, Op::GroupedLinearWgrad { num_experts }) => {
                // x[M, K] and dy[M, N], tiles of b1 rows by one column.
                let (x, off, dy) =
                    (rw.get(node.inputs[0])?, rw.get(node.inputs[1])?, rw.get(node.inputs[2])?);
                let qx = qz.fp8(&mut rw, &mut trace, x, vec![b1, 1], scope)?;
                let qdy = qz.fp8(&mut rw, &mut trace, dy, vec![b1, 1], scope)?;
                trace.fire(WGRAD);
                (GemmForm::GroupedWgrad { num_experts: *num_experts }, b1, vec![qx, off, qdy])
            }
            (Gemm::Wgrad, _) => {
                // dyT[N, M] and xT[K, M]: rows of the transposed operands, tiles of b1 tokens.
                let mut ops = Vec::with_capacity(2);
                for &v in &node.inputs {
                    let v = rw.get(v)?;
                    ops.push(qz.fp8(&mut rw, &mut trace, v, vec![1, b1], scope)?);
                }
                trace.fire(WGRAD);
                (GemmForm::Linear, b1, ops)
            }
        };
        let ys = rw.op(Op::PromotedGemm { form, k_block }, &operands, scope)?;
        for (&old, y) in node.results.iter().zip(ys) {
            let dtype = graph.ty(old).dtype;
            let y = if dtype == DType::F32 {
                y
            } else {
                trace.fire(GEMM_IN_F32);
                rw.op1(Op::Cast { to: dtype }, &[y], scope)?
            };
            rw.bind(old, y);
        }
    }
    *graph = rw.finish()?;
    Ok(trace)
}

/// Whether the backward pass may read trained weight `name` again: the step does not update it
/// in place (an `accumulate` program), or its update waits for the global gradient norm (gradient
/// clipping), which waits for every data gradient. Without clipping an update may run as soon as
/// its own gradient is done, before a Dgrad reads the old weight; the Dgrad then reads the
/// forward's copy.
fn recomputable(g: &Graph) -> impl Fn(&str) -> bool {
    let outputs: HashMap<String, ValueId> = g.outputs().iter().map(|(n, v)| (n.clone(), *v)).collect();
    let mut waits: HashSet<ValueId> = HashSet::new();
    if let Some(&norm) = outputs.get(crate::train::GRAD_NORM) {
        let mut stack = vec![norm];
        while let Some(v) = stack.pop() {
            if waits.insert(v) {
                for u in g.users(v) {
                    stack.extend(g.node(u).results.iter().copied());
                }
            }
        }
    }
    move |name: &str| outputs.get(name).is_none_or(|v| waits.contains(v))
}

/// An activation's tiles: 1 x `len` along its last axis (a rank-1 operand is one row).
fn row_tiles(rw: &Rewriter, v: ValueId, len: u64) -> Vec<u64> {
    let rank = rw.ty(v).rank();
    let mut b = vec![1; rank.saturating_sub(1)];
    b.push(len);
    b
}
