//! Feed-forward blocks: the dense SwiGLU MLP and the mixture of experts (reference §3.1).
//!
//! ```text
//! mlp(x) = down(silu(gate(x)) * up(x))
//! moe(x) = moe_experts(x, moe_route(linear(f32(x), f32(W_g)), bias), experts...) + mlp_shared(x)
//! ```
//!
//! The router runs in f32 as Hugging Face's `DeepseekV3TopkRouter` does (`F.linear` on
//! `hidden_states.type(torch.float32)` and `self.weight.type(torch.float32)`); DeepSeek's `model.py`
//! computes the logits in bf16 instead (reference D4).

use kiln_ir::op::{GroupScore, Op, Router};
use kiln_ir::spec::TopkMethod;
use kiln_ir::{BinaryOp, DType, UnaryOp, ValueId};

use super::{mul, BuildError, Builder};

/// The SwiGLU MLP with intermediate size `inter`; params `{scope}.{gate,up,down}_proj.weight`.
pub(super) fn mlp(b: &mut Builder, scope: &str, x: ValueId, inter: u64) -> Result<ValueId, BuildError> {
    let d = b.spec.model.hidden_size;
    let gate = b.linear(scope, "gate_proj.weight", x, inter, d)?;
    let gate = b.op(scope, Op::Unary(UnaryOp::Silu), &[gate])?;
    let up = b.linear(scope, "up_proj.weight", x, inter, d)?;
    let h = b.op(scope, Op::Binary(BinaryOp::Mul), &[gate, up])?;
    b.linear(scope, "down_proj.weight", h, d, inter)
}

/// The MoE block of one layer in `scope` (`model.layers.{i}.mlp`): router, routed experts and the
/// shared experts, summed.
pub(super) fn moe(b: &mut Builder, scope: &str, x: ValueId) -> Result<ValueId, BuildError> {
    let Some(m) = b.spec.moe.as_ref() else {
        return Err(BuildError::Spec(format!("{scope}: a MoE layer needs the [moe] section")));
    };
    let d = b.spec.model.hidden_size;
    let dtype = b.spec.model.dtype;
    let e = m.n_routed_experts;

    // Router. The weight's cast comes right after the param so that every param is read by the
    // next op after it.
    let gate = b.param(scope, "gate.weight", &[e, d])?;
    let logits = if dtype == DType::F32 {
        b.op(scope, Op::Linear, &[x, gate])?
    } else {
        let gate = b.op(scope, Op::Cast { to: DType::F32 }, &[gate])?;
        let x32 = b.op(scope, Op::Cast { to: DType::F32 }, &[x])?;
        b.op(scope, Op::Linear, &[x32, gate])?
    };
    let grouped = m.topk_method != TopkMethod::Greedy;
    let router = Router {
        num_experts: e,
        top_k: m.num_experts_per_tok,
        scoring: m.scoring_func,
        // Plain greedy top-k ignores groups (Hugging Face DeepSeek-V2, `topk_method = "greedy"`).
        num_groups: if grouped { m.n_group } else { 1 },
        topk_groups: if grouped { m.topk_group } else { 1 },
        group_score: if m.topk_method == TopkMethod::NoauxTc { GroupScore::Top2Sum } else { GroupScore::Max },
        normalize: m.norm_topk_prob,
        scaling: m.routed_scaling_factor,
    };
    let (route, bias) = if m.topk_method == TopkMethod::NoauxTc {
        // The correction bias only steers selection; it is stored in f32 (reference §3.1). In
        // training it is state that the balancing rule moves.
        let name = format!("{scope}.gate.e_score_correction_bias");
        let bias = if b.routing.is_some() {
            b.input(&name, kiln_ir::TensorType::known(DType::F32, &[e]))?
        } else {
            b.param_of(scope, "gate.e_score_correction_bias", DType::F32, &[e])?
        };
        (b.node(scope, Op::MoeRoute(router.clone()), &[logits, bias])?, Some((name, bias)))
    } else {
        (b.node(scope, Op::MoeRoute(router.clone()), &[logits])?, None)
    };
    if let Some(r) = b.routing.as_mut() {
        r.push(super::Routing {
            scope: scope.to_string(),
            logits,
            indices: route[1],
            bias,
            experts: e,
            top_k: router.top_k,
        });
    }

    let inter = m.moe_intermediate_size;
    let mut operands = Vec::with_capacity(3 + 3 * e as usize);
    operands.extend([x, route[0], route[1]]);
    for i in 0..e {
        operands.push(b.param(scope, &format!("experts.{i}.gate_proj.weight"), &[inter, d])?);
        operands.push(b.param(scope, &format!("experts.{i}.up_proj.weight"), &[inter, d])?);
        operands.push(b.param(scope, &format!("experts.{i}.down_proj.weight"), &[d, inter])?);
    }
    let routed = b.op(scope, Op::MoeExperts { num_experts: e }, &operands)?;

    if m.n_shared_experts == 0 {
        return Ok(routed);
    }
    let shared_scope = format!("{scope}.shared_experts");
    let shared = mlp(b, &shared_scope, x, mul(m.n_shared_experts, inter)?)?;
    b.op(scope, Op::Binary(BinaryOp::Add), &[routed, shared])
}
