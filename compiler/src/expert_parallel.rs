//! Expert parallelism: the copy of a program whose routed experts are split over `ep` ranks. For
//! inference, [`split`] (`kiln compile --pp 1 --ep E`; `kiln run --ep E` under `mpirun -n E`),
//! described here; for training, [`split_tokens`] (`kiln train --ep E`), where each rank has its
//! own rows and the tokens are exchanged, described there.
//!
//! One copy serves every rank. It reads the rank from the state [`EP_RANK`] (which the runtime
//! sets) and holds the parameters of rank 0's experts, `0 .. E/ep` of every MoE layer; rank `r`
//! binds those names to its own experts, `r·E/ep ..` (the runtime renames them at load). Nothing
//! else differs: every rank runs attention, the router and the shared experts on all the tokens
//! (they are replicated), and each `moe_experts` becomes
//!
//! ```text
//! first = f32(ep.rank) * E_l                        the rank's first expert (E_l = E/ep)
//! local = f32(idx) - first                          the slot's expert, counted from it
//! mask  = clamp(local + 1, 0, 1) * clamp(E_l - local, 0, 1)    1 for the rank's experts, else 0
//! id    = mask ? clamp(local, 0, E_l - 1) : E_l     E_l: no expert here
//! y_r   = moe_experts(x, w * mask, i32(id), the rank's E_l experts)
//! y     = all_reduce(f32(y_r)) over `ep`            the sum of every rank's part, on every rank
//! ```
//!
//! so a slot routed to another rank's expert adds nothing here (`moe_experts` skips index `E_l`,
//! and its weight is 0 besides) and its share comes from that rank: each rank computes its own
//! slots alone, and reads the weights of its selected experts once each.
//! Tokens are not moved between ranks (every rank has them all): this is the decode-time form of
//! expert parallelism, for a model whose experts do not fit one process, not the all-to-all
//! dispatch of training.
//!
//! The sum over the ranks adds each token's partial sums in another order than one process does
//! (`a + b` of the ranks' parts against the slots in order), so logits agree to rounding, not bit
//! for bit.

use kiln_ir::op::{BinaryOp, Op, ReduceOp};
use kiln_ir::{DType, Graph, NodeId, TensorType, ValueId};

/// The communication group of the expert-parallel ranks, which [`Op::AllReduce`] sums over.
pub const EP_GROUP: &str = "ep";

/// The state that holds this process's expert-parallel rank (f32 scalar; 0 unless set).
pub const EP_RANK: &str = "ep.rank";

/// The suffix of a program's expert-parallel copy (`prefill.ep`).
pub const SUFFIX: &str = ".ep";

/// The name of the expert-parallel copy of program `name`.
pub fn ep_program(name: &str) -> String {
    format!("{name}{SUFFIX}")
}

/// Parameter `name` of the expert-parallel programs as rank `rank` of ranks holding `per_rank`
/// experts each binds it: a routed expert's (`….experts.{e}.…`) is expert `e + rank·per_rank`'s,
/// any other parameter itself.
pub fn rank_param(name: &str, rank: u64, per_rank: u64) -> String {
    match expert_index(name) {
        Some(e) => with_expert_index(name, e + rank * per_rank),
        None => name.to_string(),
    }
}

use kiln_ir::module::expert_mark;

/// The routed expert a tensor name belongs to (`….experts.{e}.…`, a parameter or one of its
/// optimizer states), if any.
pub fn expert_index(name: &str) -> Option<u64> {
    expert_mark(name).map(|(_, e)| e)
}

/// `name` with its routed expert's id replaced by `e` (itself when it has none).
pub fn with_expert_index(name: &str, e: u64) -> String {
    match expert_mark(name) {
        Some((r, _)) => format!("{}{e}{}", &name[..r.start], &name[r.end..]),
        None => name.to_string(),
    }
}

/// Why a program could not be split.
#[derive(Debug, thiserror::Error)]
pub enum SplitError {
    #[error("{0}")]
    Shape(String),
    #[error("internal error while splitting the experts: {0}")]
    Graph(String),
}

/// The copy of `graph` with each `moe_experts`'s routed experts split over `ep` ranks, and the
/// experts per rank (see the module documentation); `None` for a graph without `moe_experts`.
pub fn split(graph: &Graph, ep: u64) -> Result<Option<(Graph, u64)>, SplitError> {
    each_moe(graph, ep, |b, rank, node, local| {
        let (x, w, idx) = (node.inputs[0], node.inputs[1], node.inputs[2]);
        let index_dtype = b.g.ty(idx).dtype;
        let (w_local, idx_local) = local_slots(b, rank, w, idx, local, index_dtype)?;
        let mut inputs = vec![x, w_local, idx_local];
        // Rank 0's experts, which rank `r` binds to its own (`rank_param`).
        inputs.extend_from_slice(&node.inputs[3..3 + (3 * local) as usize]);
        let y_ty = b.g.ty(node.results[0]).clone();
        let part = b.typed(Op::MoeExperts { num_experts: local }, &inputs, y_ty.clone())?;
        let part = match y_ty.dtype {
            DType::F32 => part,
            _ => b.node(Op::Cast { to: DType::F32 }, &[part])?,
        };
        let sum = b.node(Op::AllReduce { group: EP_GROUP.into() }, &[part])?;
        match y_ty.dtype {
            DType::F32 => Ok(sum),
            d => b.node(Op::Cast { to: d }, &[sum]),
        }
    })
}

/// `graph` with each `moe_experts` replaced by what `rewrite` makes of it (given the builder in
/// the node's scope, the rank input [`EP_RANK`], the node and the experts per rank), the other
/// ranks' expert parameters removed; and the experts per rank. `None` without `moe_experts`.
fn each_moe(
    graph: &Graph,
    ep: u64,
    mut rewrite: impl FnMut(&mut Builder, ValueId, &kiln_ir::Node, u64) -> Result<ValueId, SplitError>,
) -> Result<Option<(Graph, u64)>, SplitError> {
    let mut g = graph.clone();
    let moe: Vec<NodeId> =
        g.nodes().into_iter().filter(|&n| matches!(g.node(n).op, Op::MoeExperts { .. })).collect();
    if moe.is_empty() {
        return Ok(None);
    }
    let scalar = TensorType::scalar(DType::F32);
    let (_, rank) = (g.add_node(Op::Input { name: EP_RANK.into() }, &[], vec![scalar], None))
        .map_err(|e| SplitError::Graph(e.to_string()))?;
    let rank = rank[0];
    let mut per_rank = None;
    for n in moe {
        let node = g.node(n).clone();
        let Op::MoeExperts { num_experts } = node.op else { continue };
        let local = check_share(num_experts, ep, node.scope.as_deref(), &mut per_rank)?;
        let experts = &node.inputs[3..];
        if experts.len() as u64 != 3 * num_experts {
            return Err(SplitError::Graph(format!("moe_experts has {} expert operands", experts.len())));
        }
        let mut b = Builder { g: &mut g, scope: node.scope.as_deref() };
        let y = rewrite(&mut b, rank, &node, local)?;
        g.replace_all_uses(node.results[0], y).map_err(|e| SplitError::Graph(e.to_string()))?;
        g.remove_node(n).map_err(|e| SplitError::Graph(e.to_string()))?;
        // The other ranks' experts: their parameters are no longer read.
        remove_unread(&mut g, experts)?;
    }
    kiln_ir::verify::verify(&g).map_err(|e| SplitError::Graph(e.to_string()))?;
    Ok(per_rank.map(|p| (g, p)))
}

/// The communication group of the processes that hold the same routed experts (one per
/// data-parallel replica of an expert-parallel training run), which sums those experts' gradients.
pub const EXPERT_DP_GROUP: &str = kiln_ir::module::EDP_GROUP;

/// Whether trained parameter `name` is a routed expert's (`….experts.{e}.…`), which an
/// expert-parallel rank holds alone (the shared experts are everyone's).
pub fn is_routed_expert(name: &str) -> bool {
    expert_index(name).is_some()
}

/// The train-step form of [`split`]: the forward graph of a training step whose routed experts
/// are split over `ep` ranks that each train on their own rows, as DeepSeek-V3 combines expert
/// parallelism with data parallelism (the report's §3.2.2: attention is data-parallel, the
/// experts expert-parallel). Returns the graph and the experts per rank; `None` without
/// `moe_experts`. Differentiate it with [`crate::autodiff::differentiate`], whose rule for
/// `all_to_all` is `all_to_all` the other way.
///
/// Each rank runs the embedding, attention, the router and the shared experts on its own tokens.
/// At each `moe_experts` the ranks exchange the tokens with DeepSeek's all-to-all: a token goes
/// only to the ranks that hold one of its experts (the dispatch), and each of those ranks sends
/// back its experts' weighted sum for it (the combine):
///
/// ```text
/// keep[q]  = max_k (idx[.., k] is one of rank q's experts)      [ep, N..]: where each token goes
/// came     = all_to_all(keep)                                  [ep, N..]: which tokens of rank q came here
/// X, W, I  = all_to_all(broadcast(x ‖ w ‖ f32(idx) + 1), keep)  [ep, N.., D + 2k]: the dispatch
/// P        = moe_experts(X, W * mask, I - 1 - first or E_l, the rank's experts)   as in `split`
/// y        = sum_q all_to_all(P, came)[q]                        the combine, in rank order
/// ```
///
/// Shapes are static, so a rank's arrays hold a row for every token of every rank (`ep` times its
/// own), but only the flagged rows travel (the runtime's `MPI_Alltoallv` sends those alone) and a
/// row that did not come is zeros: its ids travel plus one, so it reads as ids -1, no expert of
/// any rank's, and its routing weights are zero. The expert GEMMs (through `plan-moe-dispatch`'s
/// dispatch, which sorts the slots of no expert after the rest) compute the slots routed to the
/// rank alone; the activations still take `ep` times a rank's rows. A token
/// reaches at most `min(top_k, ep)` ranks, fewer under the router's group limit when a rank holds
/// whole groups (DeepSeek's node limit: the report's M = 4 nodes of 8 groups). The result equals
/// the one-process layer to rounding (the ranks' parts are added in rank order, not slot by
/// slot). Each rank's gradients of the replicated weights are those of its own rows (summed over
/// the data-parallel group with the loss), and its experts' gradients those of every rank's rows
/// routed to them.
pub fn split_tokens(graph: &Graph, ep: u64) -> Result<Option<(Graph, u64)>, SplitError> {
    each_moe(graph, ep, |b, rank, node, local| {
        let (x, w, idx) = (node.inputs[0], node.inputs[1], node.inputs[2]);
        let experts = &node.inputs[3..];
        let a2a = || Op::AllToAll { group: EP_GROUP.into(), size: ep };
        let as_f32 = |b: &mut Builder, v: ValueId| match b.g.ty(v).dtype {
            DType::F32 => Ok(v),
            _ => b.node(Op::Cast { to: DType::F32 }, &[v]),
        };
        let (x_ty, w_ty, idx_ty) = (b.g.ty(x).clone(), b.g.ty(w).clone(), b.g.ty(idx).clone());
        let rows = &x_ty.shape[..x_ty.rank() - 1];
        let k = w_ty.shape[w_ty.rank() - 1];
        let d = x_ty.shape[x_ty.rank() - 1];
        let stacked = |last: Option<kiln_ir::Dim>| -> Vec<kiln_ir::Dim> {
            let mut s = vec![kiln_ir::Dim::known(ep)];
            s.extend(rows.iter().copied());
            s.extend(last);
            s
        };
        // keep[q]: 1 where one of the token's experts is rank q's.
        let idx_f = as_f32(b, idx)?;
        let (zero, one) = (b.c(0.0)?, b.c(1.0)?);
        let count = b.c(local as f64)?;
        let mut flags = Vec::with_capacity(ep as usize);
        for q in 0..ep {
            let first = b.c((q * local) as f64)?;
            let slot = b.bin(BinaryOp::Sub, idx_f, first)?;
            let above = b.bin(BinaryOp::Add, slot, one)?;
            let below = b.bin(BinaryOp::Sub, count, slot)?;
            let mut ins = [above, below];
            for v in &mut ins {
                let lo = b.bin(BinaryOp::Max, *v, zero)?;
                *v = b.bin(BinaryOp::Min, lo, one)?;
            }
            let hit = b.bin(BinaryOp::Mul, ins[0], ins[1])?;
            let last = b.g.ty(hit).rank() - 1;
            let any = b.node(Op::Reduce { op: ReduceOp::Max, axes: vec![last], keep_dims: false }, &[hit])?;
            let mut shape = vec![kiln_ir::Dim::known(1)];
            shape.extend(rows.iter().copied());
            flags.push(b.node(Op::Reshape { shape }, &[any])?);
        }
        let keep = b.node(Op::Concat { axis: 0 }, &flags)?;
        let came = b.node(a2a(), &[keep])?;
        // The dispatch: the token, its routing weights and its expert ids plus one in one row
        // (a row that does not come reads as zeros: ids -1, no expert's).
        let idx_1 = b.bin(BinaryOp::Add, idx_f, one)?;
        let parts = [as_f32(b, x)?, as_f32(b, w)?, idx_1];
        let row = b.node(Op::Concat { axis: x_ty.rank() - 1 }, &parts)?;
        let width = b.g.ty(row).shape[x_ty.rank() - 1];
        let all = b.node(Op::Broadcast { shape: stacked(Some(width)) }, &[row])?;
        let got = b.node(a2a(), &[all, keep])?;
        let (Some(d_n), Some(k_n)) = (d.as_known(), k.as_known()) else {
            return Err(SplitError::Shape("the experts' hidden size and top-k must be known".into()));
        };
        let split_op = Op::Split { axis: x_ty.rank(), sizes: vec![d_n, k_n, k_n] };
        let tys = [b.g.ty(got)];
        let types = kiln_ir::infer::infer(&split_op, &tys).map_err(|e| SplitError::Graph(e.to_string()))?;
        let (_, xwi) =
            (b.g.add_node(split_op, &[got], types, b.scope)).map_err(|e| SplitError::Graph(e.to_string()))?;
        let back = |b: &mut Builder, v: ValueId, to: DType| match to {
            DType::F32 => Ok(v),
            _ => b.node(Op::Cast { to }, &[v]),
        };
        let xs = back(b, xwi[0], x_ty.dtype)?;
        let ws = back(b, xwi[1], w_ty.dtype)?;
        // Back to integers (which also keeps the ids out of the gradient).
        let is = b.bin(BinaryOp::Sub, xwi[2], one)?;
        let is = back(b, is, idx_ty.dtype)?;
        let (w_local, idx_local) = local_slots(b, rank, ws, is, local, idx_ty.dtype)?;
        let mut inputs = vec![xs, w_local, idx_local];
        inputs.extend_from_slice(&experts[..(3 * local) as usize]);
        let y_ty = b.g.ty(node.results[0]).clone();
        let part_ty = TensorType { dtype: y_ty.dtype, shape: stacked(None).into_iter().chain([d]).collect() };
        let part = b.typed(Op::MoeExperts { num_experts: local }, &inputs, part_ty)?;
        // The combine: each rank's part of this rank's tokens, added in rank order.
        let part = as_f32(b, part)?;
        let parts = b.node(a2a(), &[part, came])?;
        let y = b.node(Op::Reduce { op: ReduceOp::Sum, axes: vec![0], keep_dims: false }, &[parts])?;
        back(b, y, y_ty.dtype)
    })
}

/// The experts per rank of a layer of `num_experts` split over `ep` ranks, which must be the
/// same in every layer (`per_rank`, set by the first).
fn check_share(
    num_experts: u64,
    ep: u64,
    scope: Option<&str>,
    per_rank: &mut Option<u64>,
) -> Result<u64, SplitError> {
    if ep == 0 || num_experts % ep != 0 {
        return Err(SplitError::Shape(format!(
            "--ep {ep} must divide the {num_experts} routed experts of {}",
            scope.unwrap_or("a MoE layer")
        )));
    }
    let local = num_experts / ep;
    if per_rank.is_some_and(|p| p != local) {
        return Err(SplitError::Shape(format!(
            "the MoE layers have different numbers of routed experts ({} against {num_experts}): \
             one rank's share cannot be named alike in every layer",
            per_rank.unwrap_or(0) * ep
        )));
    }
    *per_rank = Some(local);
    Ok(local)
}

/// The routing weights and expert ids (`index_dtype`, from ids of any dtype) of the rank's own
/// experts: a slot routed to another rank's expert gets weight 0 and the id `local`, which
/// `moe_experts` (and the dispatch it is planned into) reads as no expert, so it is not computed
/// (see [`split`]).
fn local_slots(
    b: &mut Builder,
    rank: ValueId,
    w: ValueId,
    idx: ValueId,
    local: u64,
    index_dtype: DType,
) -> Result<(ValueId, ValueId), SplitError> {
    let idx_f = match b.g.ty(idx).dtype {
        DType::F32 => idx,
        _ => b.node(Op::Cast { to: DType::F32 }, &[idx])?,
    };
    let count = b.c(local as f64)?;
    let first = b.bin(BinaryOp::Mul, rank, count)?;
    let slot = b.bin(BinaryOp::Sub, idx_f, first)?;
    let (zero, one) = (b.c(0.0)?, b.c(1.0)?);
    let clamp01 = |b: &mut Builder, v: ValueId| -> Result<ValueId, SplitError> {
        let lo = b.bin(BinaryOp::Max, v, zero)?;
        b.bin(BinaryOp::Min, lo, one)
    };
    let above = b.bin(BinaryOp::Add, slot, one)?;
    let above = clamp01(b, above)?;
    let below = b.bin(BinaryOp::Sub, count, slot)?;
    let below = clamp01(b, below)?;
    let mask = b.bin(BinaryOp::Mul, above, below)?;
    let w_dtype = b.g.ty(w).dtype;
    let w_mask = match w_dtype {
        DType::F32 => mask,
        _ => b.node(Op::Cast { to: w_dtype }, &[mask])?,
    };
    let w_local = b.bin(BinaryOp::Mul, w, w_mask)?;
    // The slot's local expert, or `local` (no expert here) for another rank's:
    // `clamped + (local - clamped) * (1 - mask)`, exact in f32 for these small integers.
    let last = b.c((local - 1) as f64)?;
    let clamped = b.bin(BinaryOp::Max, slot, zero)?;
    let clamped = b.bin(BinaryOp::Min, clamped, last)?;
    let elsewhere = b.bin(BinaryOp::Sub, one, mask)?;
    let gap = b.bin(BinaryOp::Sub, count, clamped)?;
    let gap = b.bin(BinaryOp::Mul, gap, elsewhere)?;
    let id = b.bin(BinaryOp::Add, clamped, gap)?;
    let idx_local = b.node(Op::Cast { to: index_dtype }, &[id])?;
    Ok((w_local, idx_local))
}

/// Removes the parameters among `experts` that nothing reads any more (the other ranks').
fn remove_unread(g: &mut Graph, experts: &[ValueId]) -> Result<(), SplitError> {
    for &v in experts {
        let p = g.producer(v);
        if matches!(g.node(p).op, Op::Param { .. }) && g.users(v).is_empty() {
            g.remove_node(p).map_err(|e| SplitError::Graph(e.to_string()))?;
        }
    }
    Ok(())
}

struct Builder<'a> {
    g: &'a mut Graph,
    scope: Option<&'a str>,
}

impl Builder<'_> {
    fn typed(&mut self, op: Op, inputs: &[ValueId], ty: TensorType) -> Result<ValueId, SplitError> {
        let (_, r) = (self.g.add_node(op, inputs, vec![ty], self.scope))
            .map_err(|e| SplitError::Graph(e.to_string()))?;
        Ok(r[0])
    }

    fn node(&mut self, op: Op, inputs: &[ValueId]) -> Result<ValueId, SplitError> {
        let tys: Vec<&TensorType> = inputs.iter().map(|&v| self.g.ty(v)).collect();
        let mut types = kiln_ir::infer::infer(&op, &tys).map_err(|e| SplitError::Graph(e.to_string()))?;
        self.typed(op, inputs, types.remove(0))
    }

    fn bin(&mut self, op: BinaryOp, a: ValueId, b: ValueId) -> Result<ValueId, SplitError> {
        self.node(Op::Binary(op), &[a, b])
    }

    fn c(&mut self, v: f64) -> Result<ValueId, SplitError> {
        self.typed(Op::Constant { value: v }, &[], TensorType::scalar(DType::F32))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_copy_holds_a_rank_of_experts_and_sums_the_parts() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/tiny.toml");
        let tiny = crate::spec::load(std::path::Path::new(path)).unwrap();
        let whole = crate::build::build_graph(&tiny).unwrap();
        let experts = |g: &Graph| -> Vec<String> {
            let names = g.params().into_iter().map(|(n, _)| n.to_string());
            names.filter(|n| n.contains(".experts.")).collect()
        };
        let count =
            |g: &Graph, f: &dyn Fn(&Op) -> bool| g.nodes().into_iter().filter(|&n| f(&g.node(n).op)).count();
        let layers = count(&whole, &|op| matches!(op, Op::MoeExperts { .. }));
        assert!(layers > 0);
        let (g, per_rank) = split(&whole, 2).unwrap().unwrap();
        // Half of every layer's 16 experts: 8, named as rank 0's (ids 0 .. 8).
        assert_eq!(per_rank, 8);
        assert_eq!(count(&g, &|op| matches!(op, Op::MoeExperts { num_experts: 8 })), layers);
        assert_eq!(count(&g, &|op| matches!(op, Op::AllReduce { group } if group == EP_GROUP)), layers);
        let kept = experts(&g);
        assert_eq!(kept.len() * 2, experts(&whole).len());
        for name in &kept {
            let id: u64 = name.split(".experts.").nth(1).unwrap().split('.').next().unwrap().parse().unwrap();
            assert!(id < 8, "{name}");
            // Rank 1 binds expert id + 8 under the same name otherwise.
            let theirs = rank_param(name, 1, 8);
            assert_eq!(theirs.replace(&format!(".experts.{}.", id + 8), &format!(".experts.{id}.")), *name);
        }
        assert!(g.inputs().iter().any(|(n, _)| *n == EP_RANK));
        assert_eq!(rank_param("model.layers.1.mlp.gate.weight", 3, 8), "model.layers.1.mlp.gate.weight");
        // A graph without routed experts has nothing to split; an expert count the ranks do not
        // divide is refused, naming both.
        let mut dense = tiny.clone();
        (dense.moe, dense.mtp) = (None, None);
        let g = crate::build::build_graph(&dense).unwrap();
        assert!(split(&g, 2).unwrap().is_none());
        let e = split(&whole, 3).unwrap_err().to_string();
        assert!(e.contains("--ep 3 must divide the 16 routed experts"), "{e}");
    }
}
