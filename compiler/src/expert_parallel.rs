//! Expert parallelism for inference: the copy of a program whose routed experts are split over
//! `ep` ranks (`kiln compile --pp 1 --ep E`; `kiln run --ep E` under `mpirun -n E`).
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
//! y_r   = moe_experts(x, w * mask, i32(clamp(local, 0, E_l - 1)), the rank's E_l experts)
//! y     = all_reduce(f32(y_r)) over `ep`            the sum of every rank's part, on every rank
//! ```
//!
//! so a slot routed to another rank's expert adds nothing here (its weight is 0) and its share
//! comes from that rank. The masked slots still run through the clamped expert, whose weights are
//! read anyway: a decode step reads the weights of the rank's selected experts once each, as the
//! whole model's decode reads them once, and computes at most `ep` times the rows it needs.
//! Tokens are not moved between ranks (every rank has them all): this is the decode-time form of
//! expert parallelism, for a model whose experts do not fit one process, not the all-to-all
//! dispatch of training.
//!
//! The sum over the ranks adds each token's partial sums in another order than one process does
//! (`a + b` of the ranks' parts against the slots in order), so logits agree to rounding, not bit
//! for bit.

use kiln_ir::op::{BinaryOp, Op};
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
    const MARK: &str = ".experts.";
    let Some(at) = name.find(MARK).map(|i| i + MARK.len()) else { return name.to_string() };
    let digits = name[at..].bytes().take_while(u8::is_ascii_digit).count();
    match name[at..at + digits].parse::<u64>() {
        Ok(e) if digits > 0 => format!("{}{}{}", &name[..at], e + rank * per_rank, &name[at + digits..]),
        _ => name.to_string(),
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
        if ep == 0 || num_experts % ep != 0 {
            return Err(SplitError::Shape(format!(
                "--ep {ep} must divide the {num_experts} routed experts of {}",
                node.scope.as_deref().unwrap_or("a MoE layer")
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
        per_rank = Some(local);
        let scope = node.scope.as_deref();
        let mut b = Builder { g: &mut g, scope };
        let (x, w, idx) = (node.inputs[0], node.inputs[1], node.inputs[2]);
        let experts = &node.inputs[3..];
        if experts.len() as u64 != 3 * num_experts {
            return Err(SplitError::Graph(format!("moe_experts has {} expert operands", experts.len())));
        }
        let index_dtype = b.g.ty(idx).dtype;
        let idx_f = b.node(Op::Cast { to: DType::F32 }, &[idx])?;
        let count = b.c(local as f64)?;
        let first = b.bin(BinaryOp::Mul, rank, count)?;
        let slot = b.bin(BinaryOp::Sub, idx_f, first)?;
        let (zero, one) = (b.c(0.0)?, b.c(1.0)?);
        let clamp01 = |b: &mut Builder, v: ValueId| -> Result<ValueId, SplitError> {
            let lo = b.bin(BinaryOp::Max, v, zero)?;
            b.bin(BinaryOp::Min, lo, one)
        };
        let above = b.bin(BinaryOp::Add, slot, one)?;
        let above = clamp01(&mut b, above)?;
        let below = b.bin(BinaryOp::Sub, count, slot)?;
        let below = clamp01(&mut b, below)?;
        let mut mask = b.bin(BinaryOp::Mul, above, below)?;
        let w_dtype = b.g.ty(w).dtype;
        if w_dtype != DType::F32 {
            mask = b.node(Op::Cast { to: w_dtype }, &[mask])?;
        }
        let w_local = b.bin(BinaryOp::Mul, w, mask)?;
        let last = b.c((local - 1) as f64)?;
        let clamped = b.bin(BinaryOp::Max, slot, zero)?;
        let clamped = b.bin(BinaryOp::Min, clamped, last)?;
        let idx_local = b.node(Op::Cast { to: index_dtype }, &[clamped])?;
        let mut inputs = vec![x, w_local, idx_local];
        // Rank 0's experts, which rank `r` binds to its own (`rank_param`).
        inputs.extend_from_slice(&experts[..(3 * local) as usize]);
        let y = node.results[0];
        let y_ty = b.g.ty(y).clone();
        let part = b.typed(Op::MoeExperts { num_experts: local }, &inputs, y_ty.clone())?;
        let part = match y_ty.dtype {
            DType::F32 => part,
            _ => b.node(Op::Cast { to: DType::F32 }, &[part])?,
        };
        let mut sum = b.node(Op::AllReduce { group: EP_GROUP.into() }, &[part])?;
        if y_ty.dtype != DType::F32 {
            sum = b.node(Op::Cast { to: y_ty.dtype }, &[sum])?;
        }
        g.replace_all_uses(y, sum).map_err(|e| SplitError::Graph(e.to_string()))?;
        g.remove_node(n).map_err(|e| SplitError::Graph(e.to_string()))?;
        // The other ranks' experts: their parameters are no longer read.
        for &v in experts {
            let p = g.producer(v);
            if matches!(g.node(p).op, Op::Param { .. }) && g.users(v).is_empty() {
                g.remove_node(p).map_err(|e| SplitError::Graph(e.to_string()))?;
            }
        }
    }
    kiln_ir::verify::verify(&g).map_err(|e| SplitError::Graph(e.to_string()))?;
    Ok(per_rank.map(|p| (g, p)))
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
