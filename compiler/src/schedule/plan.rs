//! The parallel plan `kiln compile --pp` puts into an artifact ([`kiln_ir::artifact::ParallelPlan`]):
//! the partition ([`super::partition`]), the schedule generated for it and checked by the verifier,
//! the schedule simulated with the stages' costs, and the expert-parallel placement with each MoE
//! layer's dispatch plan ([`crate::passes::moe_plan`]). A pure function of the spec and the request:
//! no graph is built, so planning DeepSeek-V3 takes milliseconds where compiling it takes seconds.
//!
//! Defaults: `ep` is the spec's `moe.ep_size`; the micro-batches are `2·pp` for every schedule, the
//! fewest DualPipe and DualPipeV take (reference §6.1: `num_chunks >= 2·num_ranks`), so that the
//! schedules compare at one size.
//!
//! The simulation charges a stage's forward FLOPs per token for F, twice them for the full backward
//! B and its weight-product FLOPs for W ([`super::cost`] says why), and nothing for a transfer: its
//! times are in forward FLOPs per token, and what they tell is the shape of the step (the bubble
//! against the makespan), not its length.
//!
//! Does not: build or change the programs (they still hold the whole model on one process), plan
//! memory per rank, or run anything across processes.

use kiln_ir::artifact::{
    AllToAllEntry, DispatchEntry, ExpertPlan, MoeLayerEntry, ParallelPlan, RankEntry, StageEntry,
};
use kiln_ir::op::Dispatch;
use kiln_ir::schedule::Rank;
use kiln_ir::spec::{MoeSection, TopkMethod};
use kiln_ir::ModelSpec;

use super::cost::Piece;
use super::partition::{partition, PartitionError};
use super::simulate::{simulate_stages, StageCost};
use super::{generate, verify, Kind, ScheduleError};
use crate::passes::moe_plan::{self, plan_dispatch, DEFAULT_TILE_ROWS};

/// What to plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub kind: Kind,
    /// Pipeline ranks.
    pub pp: u32,
    /// Expert-parallel ranks; the spec's `moe.ep_size` when absent.
    pub ep: Option<u64>,
    /// `2·pp` when absent.
    pub micro_batches: Option<u32>,
    /// The sequence length attention is costed at.
    pub seq_len: u64,
    /// Tokens a micro-batch routes through a MoE layer together.
    pub tokens: u64,
}

/// Why a plan cannot be made; all but [`PlanError::Internal`] are the request's fault.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error(transparent)]
    Partition(#[from] PartitionError),
    #[error(transparent)]
    Schedule(#[from] ScheduleError),
    #[error(
        "a plan needs a sequence length and a token count of at least 1 (seq_len {seq_len}, tokens {tokens})"
    )]
    Sizes { seq_len: u64, tokens: u64 },
    #[error("--ep {ep}: `{model}` has no MoE layers, so there are no experts to spread; leave --ep out")]
    NoExperts { ep: u64, model: String },
    #[error("--ep {ep}: {experts} routed experts cannot be spread evenly over {ep} ranks; --ep must divide them: {divisors}")]
    Ep { ep: u64, experts: u64, divisors: String },
    #[error("the dispatch plan: {0}")]
    Dispatch(#[from] moe_plan::PlanError),
    #[error("internal error: {0} (a kiln bug; please report it)")]
    Internal(String),
}

/// The default number of micro-batches on `pp` ranks: `2·pp` (see the module documentation).
pub fn default_micro_batches(pp: u32) -> u32 {
    pp.saturating_mul(2)
}

/// The plan of `spec` for `req`; see the module documentation.
pub fn plan(spec: &ModelSpec, req: &Request) -> Result<ParallelPlan, PlanError> {
    if req.seq_len == 0 || req.tokens == 0 {
        return Err(PlanError::Sizes { seq_len: req.seq_len, tokens: req.tokens });
    }
    // The partition first: it refuses a pipeline longer than the model before a schedule of that
    // length is made.
    let part = partition(spec, req.kind, req.pp, req.seq_len)?;
    let (ep, experts_of) = expert_placement(spec, req)?;
    let micro_batches = req.micro_batches.unwrap_or_else(|| default_micro_batches(req.pp));
    let lists = generate(req.kind, req.pp, micro_batches)?;
    verify(&lists).map_err(|e| PlanError::Internal(format!("kiln generated an invalid schedule: {e}")))?;
    // The partition's placement is the lanes'.
    for (r, held) in part.placement.iter().enumerate() {
        let on_lanes: Vec<u32> = (lists.chunks(Rank(r as u32)).iter())
            .filter_map(|c| {
                lists.lanes.iter().find_map(|lane| {
                    lane.iter().position(|s| s.rank.0 as usize == r && s.chunk == *c).map(|i| i as u32)
                })
            })
            .collect();
        if *held != on_lanes {
            return Err(PlanError::Internal(format!(
                "rank {r} holds stages {held:?} by the partition but {on_lanes:?} by the schedule's lanes"
            )));
        }
    }

    let last = part.stages.len() - 1;
    let stages: Vec<StageEntry> = (part.stages.iter().enumerate())
        .map(|(i, s)| StageEntry {
            stage: i as u32,
            embedding: s.holds(&part.pieces, Piece::Embedding),
            layers: s.layers(&part.pieces),
            head: s.holds(&part.pieces, Piece::Head),
            forward_flops: s.cost.forward,
            weight_flops: s.cost.weight,
            params: s.cost.params,
        })
        .collect();
    let costs: Vec<StageCost> = (part.stages.iter())
        .map(|s| StageCost {
            forward: s.cost.forward as f64,
            backward: 2.0 * s.cost.forward as f64,
            weight: s.cost.weight as f64,
        })
        .collect();
    let sim = simulate_stages(&lists, &costs, 0.0)
        .map_err(|e| PlanError::Internal(format!("simulating the schedule kiln generated: {e}")))?;
    let mut ranks = Vec::with_capacity(part.placement.len());
    for (r, held) in part.placement.iter().enumerate() {
        let params = held.iter().try_fold(0u64, |acc, &s| acc.checked_add(stages[s as usize].params));
        let params =
            params.ok_or_else(|| PlanError::Internal(format!("the weights of rank {r} overflow 64 bits")))?;
        let report = &sim.ranks[r];
        ranks.push(RankEntry {
            rank: r as u32,
            stages: held.clone(),
            params,
            busy: report.busy,
            bubble: report.bubble,
            peak_activations: report.peak_activations,
        });
    }
    let experts = match (&spec.moe, experts_of) {
        (Some(m), Some(dispatch)) => Some(expert_plan(spec, m, ep, dispatch, &stages, last as u32)),
        _ => None,
    };
    Ok(ParallelPlan {
        pp: req.pp,
        ep: ep as u32,
        schedule: lists.name.clone(),
        micro_batches,
        seq_len: req.seq_len,
        tokens: req.tokens,
        stages,
        ranks,
        makespan: sim.makespan,
        bubble: sim.ranks.iter().map(|r| r.bubble).fold(0.0, f64::max),
        lists,
        experts,
    })
}

/// The expert-parallel size and the dispatch of a MoE layer for the request; no dispatch for a
/// model without MoE.
fn expert_placement(spec: &ModelSpec, req: &Request) -> Result<(u64, Option<DispatchEntry>), PlanError> {
    let Some(m) = &spec.moe else {
        return match req.ep {
            None | Some(1) => Ok((1, None)),
            Some(ep) => Err(PlanError::NoExperts { ep, model: spec.model.name.clone() }),
        };
    };
    let ep = req.ep.unwrap_or(m.ep_size);
    let experts = m.n_routed_experts;
    if ep == 0 || experts % ep != 0 || u32::try_from(ep).is_err() {
        let divisors: Vec<String> =
            (1..=experts).filter(|d| experts % d == 0).map(|d| d.to_string()).collect();
        return Err(PlanError::Ep { ep, experts, divisors: divisors.join(", ") });
    }
    let (num_groups, topk_groups) = router_groups(m);
    let d =
        Dispatch { num_experts: experts, top_k: m.num_experts_per_tok, ep_size: ep, num_groups, topk_groups };
    let p = plan_dispatch(&d, req.tokens, spec.model.hidden_size, spec.model.dtype, DEFAULT_TILE_ROWS)?;
    let entry = DispatchEntry {
        tokens: p.tokens,
        hidden: p.hidden,
        dtype: p.dtype,
        tile_rows: p.tile_rows,
        rows: p.rows,
        worst_rows_per_expert: p.worst_rows_per_expert,
        worst_rows_per_rank: p.worst_rows_per_rank,
        worst_padded_rows_per_rank: p.worst_padded_rows_per_rank,
        expected_rows_per_expert: p.expected_rows_per_expert,
        expected_padded_rows_per_rank: p.expected_padded_rows_per_rank,
        max_ranks_per_token: p.max_ranks_per_token,
        max_groups_per_token: p.max_groups_per_token,
        all_to_all: (p.all_to_all.iter())
            .map(|a| AllToAllEntry {
                name: a.name.to_string(),
                worst_rows: a.worst_rows,
                expected_rows: a.expected_rows,
                worst_bytes: a.worst_bytes,
                expected_bytes: a.expected_bytes,
            })
            .collect(),
    };
    Ok((ep, Some(entry)))
}

/// The groups and the groups kept per token as the router uses them (`build::ffn`): plain greedy
/// top-k has none (one group, kept).
fn router_groups(m: &MoeSection) -> (u64, u64) {
    if m.topk_method == TopkMethod::Greedy {
        (1, 1)
    } else {
        (m.n_group, m.topk_group)
    }
}

/// Rank `r` of `ep` holds experts `r·E/ep .. (r+1)·E/ep` in every MoE layer (as `moe_plan`
/// assumes); the layers are the main model's and the MTP modules' MoE layers, each on the stage
/// that holds it (an MTP module's on the last, with the head).
fn expert_plan(
    spec: &ModelSpec,
    m: &MoeSection,
    ep: u64,
    dispatch: DispatchEntry,
    stages: &[StageEntry],
    last: u32,
) -> ExpertPlan {
    let per_rank = m.n_routed_experts / ep;
    let end = spec.model.num_hidden_layers + spec.mtp.as_ref().map_or(0, |m| m.num_layers);
    let layers = (0..end)
        .filter(|&l| spec.is_moe_layer(l))
        .map(|l| MoeLayerEntry {
            layer: l,
            module: format!("model.layers.{l}.mlp"),
            stage: stages.iter().find(|s| s.layers.contains(&l)).map_or(last, |s| s.stage),
            dispatch: dispatch.clone(),
        })
        .collect();
    let (groups, topk_groups) = router_groups(m);
    ExpertPlan {
        experts: m.n_routed_experts,
        top_k: m.num_experts_per_tok,
        experts_per_rank: per_rank,
        ranks: (0..ep).map(|r| r * per_rank..(r + 1) * per_rank).collect(),
        groups,
        topk_groups,
        ranks_per_group: (groups > 0 && ep % groups == 0).then(|| ep / groups),
        layers,
    }
}
