//! `plan-moe-dispatch`: lowers each `moe_experts` block to an explicit dispatch plan.
//!
//! ```text
//! y = moe_experts(x[.., D], w[.., K], idx[.., K], gate_e, up_e, down_e for e < E)
//!   ->
//! xs, offsets, perm = moe_dispatch(x[N, D], idx[N, K])  {num_experts, top_k, ep_size, groups}
//! g = grouped_linear(xs, offsets, gate_0 .. gate_E-1)          [N*K, I]
//! u = grouped_linear(xs, offsets, up_0 .. up_E-1)              [N*K, I]
//! h = grouped_linear(silu(g) * u, offsets, down_0 .. down_E-1) [N*K, D]
//! y = moe_combine(h, perm, w[N, K])                            [N, D]
//! ```
//!
//! with `x`, `w` and `idx` reshaped from `[B, T, ..]` to `N = B*T` rows first and `y` reshaped back.
//! The dispatch carries the plan: the expert count, `top_k`, the expert-parallel size from the spec
//! (`moe.ep_size`), and the group limit of the router that chose `idx` (`num_groups`, `topk_groups`;
//! `1, 1` when `idx` does not come straight from a `moe_route`). [`super::moe_plan`] turns that plan
//! and a token count into buffer sizes and all-to-all points.
//!
//! Assumes a verified graph. Requires every expert weight to be a `param` (the plan places expert
//! weights on their rank; a computed weight has no home), or in a train-step program a trainable
//! state (an input of the weight's name) and the expert count to be a multiple of
//! `ep_size`; otherwise it fails with a precondition error and changes nothing. Guarantees that the
//! reference interpreter computes bit-identical outputs before and after: it defines `moe_experts`
//! and dispatch / grouped linear / combine to round identically (`kiln_ir::interp`, `moe.rs`).
//!
//! Gate and up stay two grouped GEMMs rather than one over `concat(gate_e, up_e)` then a split. A
//! concat of parameters would be a copy of every expert's weights on each forward (there is no
//! constant folding), the params would no longer be the checkpoint's tensors one to one, and
//! `insert-fp8-casts` would have to see through the concat to give each weight its 128x128 scales.
//! The two GEMMs read the same rows and offsets, so `fuse-kernels` can still merge them into one
//! kernel that reads `xs` once.
//!
//! Does not do: expert placement across devices, the all-to-all communication itself, capacity
//! limits or token dropping (DeepSeek-V3 drops no tokens, reference §3.1), or FP8 dispatch (the
//! report quantises before dispatch, §4.1; `insert-fp8-casts` quantises the dispatched rows).

use kiln_ir::op::{Dispatch, Op};
use kiln_ir::{Dim, Graph, NodeId, UnaryOp, ValueId};

use super::rewrite::{Rewriter, Trace};
use super::{Changed, Options, PassError};

const NAME: &str = "plan-moe-dispatch";

/// `moe_experts(x, w, idx, experts) -> moe_combine(down_g(silu(gate_g(xs)) * up_g(xs)), perm, w)`
/// where `xs, offsets, perm = moe_dispatch(x, idx)` and `*_g` is `grouped_linear` over `offsets`.
pub const EXPERTS_TO_GROUPED: &str = "experts-to-grouped";
/// `x[B, T, D] -> reshape(x)[B*T, D]` around the dispatch, and back after the combine: dispatch
/// and combine take one token per row. Fires when the tokens are not already one axis.
pub const FLATTEN_TOKENS: &str = "flatten-tokens";

/// The rules of this pass, in the order the trace lists them.
pub const RULES: &[&str] = &[EXPERTS_TO_GROUPED, FLATTEN_TOKENS];

pub fn run(graph: &mut Graph, opts: &Options) -> Result<Changed, PassError> {
    Ok(rewrite(graph, opts)?.changed())
}

/// Runs the pass and reports which rules fired.
pub fn rewrite(graph: &mut Graph, opts: &Options) -> Result<Trace, PassError> {
    let mut trace = Trace::new(RULES);
    let order = graph.nodes();
    if !order.iter().any(|&n| matches!(graph.node(n).op, Op::MoeExperts { .. })) {
        return Ok(trace);
    }
    // An expert-parallel copy (`crate::expert_parallel`) holds one rank's share of the experts,
    // placed on that rank.
    let ep_copy = graph.inputs().iter().any(|(n, _)| *n == crate::expert_parallel::EP_RANK);
    let ep_size = match ep_copy {
        true => 1,
        false => opts.spec.moe.as_ref().map_or(1, |m| m.ep_size),
    };
    let mut rw = Rewriter::new(NAME, graph);
    for n in order {
        match graph.node(n).op {
            Op::MoeExperts { num_experts } => {
                let trained =
                    matches!(opts.kind, kiln_ir::ProgramKind::TrainStep | kiln_ir::ProgramKind::Accumulate);
                lower(&mut rw, graph, n, num_experts, ep_size, trained, &mut trace)?
            }
            _ => rw.copy(n)?,
        }
    }
    let new = rw.finish()?;
    *graph = new;
    Ok(trace)
}

fn fail(message: String) -> PassError {
    PassError::Precondition { pass: NAME, message }
}

/// Emits the dispatch plan for the `moe_experts` node `n` of `g`.
fn lower(
    rw: &mut Rewriter,
    g: &Graph,
    n: NodeId,
    num_experts: u64,
    ep_size: u64,
    trained: bool,
    trace: &mut Trace,
) -> Result<(), PassError> {
    let node = g.node(n);
    let result = node.results[0];
    let scope = node.scope.as_deref();
    let (x, w, idx) = (node.inputs[0], node.inputs[1], node.inputs[2]);
    const ROLES: [&str; 3] = ["gate", "up", "down"];
    for (i, &v) in node.inputs[3..].iter().enumerate() {
        // In a train step the weights are trainable states (inputs of their names), placed like
        // parameters.
        let placed = match g.node(g.producer(v)).op {
            Op::Param { .. } => true,
            Op::Input { .. } => trained,
            _ => false,
        };
        if !placed {
            return Err(fail(format!(
                "{result} = moe_experts: the {} weight {v} of expert {} is not a `param`; expert weights are \
                 placed on their expert-parallel rank, so they must be parameters",
                ROLES[i % 3],
                i / 3
            )));
        }
    }
    if ep_size == 0 || num_experts % ep_size != 0 {
        return Err(fail(format!(
            "{result} = moe_experts: {num_experts} experts cannot be placed evenly on moe.ep_size = {ep_size} ranks"
        )));
    }
    let (num_groups, topk_groups) = match &g.node(g.producer(idx)).op {
        Op::MoeRoute(r) => (r.num_groups, r.topk_groups),
        _ => (1, 1),
    };
    let xt = g.ty(x);
    let top_k = g.ty(w).shape.last().and_then(|d| d.as_known()).ok_or_else(|| {
        fail(format!(
            "{result} = moe_experts: the number of experts per token in {} is not a constant",
            g.ty(w)
        ))
    })?;
    let d = *xt.shape.last().expect("moe_experts inputs have rank >= 1 (verified)");
    let tokens = xt.shape[..xt.rank() - 1]
        .iter()
        .try_fold(Dim::known(1), |acc, &dim| acc.checked_mul(dim))
        .ok_or_else(|| fail(format!("{result} = moe_experts: the token count of {xt} overflows")))?;

    let (mut xs, mut ws, mut is) = (rw.get(x)?, rw.get(w)?, rw.get(idx)?);
    let flatten = xt.rank() != 2;
    if flatten {
        trace.fire(FLATTEN_TOKENS);
        xs = rw.op1(Op::Reshape { shape: vec![tokens, d] }, &[xs], scope)?;
        ws = rw.op1(Op::Reshape { shape: vec![tokens, Dim::known(top_k)] }, &[ws], scope)?;
        is = rw.op1(Op::Reshape { shape: vec![tokens, Dim::known(top_k)] }, &[is], scope)?;
    }
    let plan = Dispatch { num_experts, top_k, ep_size, num_groups, topk_groups };
    let d = rw.op(Op::MoeDispatch(plan), &[xs, is], scope)?;
    let (rows, offsets, perm) = (d[0], d[1], d[2]);
    let experts: Vec<ValueId> = node.inputs[3..].iter().map(|&v| rw.get(v)).collect::<Result<_, _>>()?;
    let grouped = |rw: &mut Rewriter, input: ValueId, role: usize| -> Result<ValueId, PassError> {
        let mut operands = vec![input, offsets];
        operands.extend(experts.iter().skip(role).step_by(3));
        rw.op1(Op::GroupedLinear { num_experts }, &operands, scope)
    };
    let gate = grouped(rw, rows, 0)?;
    let gate = rw.op1(Op::Unary(UnaryOp::Silu), &[gate], scope)?;
    let up = grouped(rw, rows, 1)?;
    let h = rw.op1(Op::Binary(kiln_ir::BinaryOp::Mul), &[gate, up], scope)?;
    let down = grouped(rw, h, 2)?;
    let mut y = rw.op1(Op::MoeCombine { top_k }, &[down, perm, ws], scope)?;
    if flatten {
        y = rw.op1(Op::Reshape { shape: xt.shape.clone() }, &[y], scope)?;
    }
    trace.fire(EXPERTS_TO_GROUPED);
    rw.bind(result, y);
    Ok(())
}
