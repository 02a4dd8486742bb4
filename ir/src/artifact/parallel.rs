//! The parallel plan of an artifact ([`ParallelPlan`], the manifest's optional `parallel` field):
//! how a pipeline- and expert-parallel run would cut the model into stages, which pipeline rank
//! holds which stages, what each rank executes (the schedule's instruction lists), and how each MoE
//! layer's experts are spread over the expert-parallel ranks with the sizes of its all-to-all
//! exchanges. `kiln compile --pp P [--ep E]` writes it (`kiln_compiler::schedule::plan`).
//!
//! Vocabulary. The model is a sequence of *pieces*: the embedding, the decoder layers `0..L`, and
//! the head (the final norm, the output head and the MTP modules, which share the head and sit with
//! it, as DeepSeek-V3 places them). A *stage* is a contiguous run of pieces; the stages in order
//! hold every piece once. A micro-batch flows through the stages in order along a lane of the
//! schedule ([`crate::schedule`]); the slot at position `i` of a lane is where stage `i` lives.
//! Expert-parallel ranks are another axis: the ranks of one stage's expert-parallel group
//! (DeepSeek-V3 trains with 16 pipeline stages, each over 64 expert-parallel GPUs).
//!
//! Costs are per token, for the sequence length the plan was made for: `forward_flops` is the
//! forward pass's floating-point operations (a multiply-add is two), `weight_flops` the part of them
//! in products with a weight (a backward pass repeats those once for the input gradient and once
//! for the weight gradient, and the products between activations, attention's, twice for the input
//! gradients). `params` counts weights (FP8 block scales aside).
//!
//! Absent from a manifest, nothing changes: an artifact without a plan loads and runs exactly as
//! before. Present, [`super::Manifest::validate`] checks it whole (`check.rs` lists what), the
//! instruction lists with the schedule verifier. The programs of the artifact do not change with a
//! plan: they hold the whole model and every expert, and running the plan across processes is not
//! built yet.

use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::schedule::Schedule;
use crate::types::DType;

/// The parallel plan; see the module documentation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParallelPlan {
    /// Pipeline ranks.
    pub pp: u32,
    /// Expert-parallel ranks of a stage.
    pub ep: u32,
    /// The schedule's name (`dualpipe`), as [`Schedule::name`].
    pub schedule: String,
    pub micro_batches: u32,
    /// The sequence length the attention costs are for (`kiln compile --max-context`).
    pub seq_len: u64,
    /// Tokens a micro-batch routes through each MoE layer together: the compiled programs' largest
    /// `B·T` (`--max-batch` times `--max-context`); the dispatch sizes are for this many.
    pub tokens: u64,
    /// The stages in pipeline order.
    pub stages: Vec<StageEntry>,
    /// Per pipeline rank, in rank order.
    pub ranks: Vec<RankEntry>,
    /// The simulated step (the schedule run with the stages' costs) in forward FLOPs per token:
    /// when the last rank finishes.
    pub makespan: f64,
    /// The largest idle time of a rank during the step, in the same unit.
    pub bubble: f64,
    /// What each rank executes, in order.
    pub lists: Schedule,
    /// The expert placement and the dispatch plan of every MoE layer; absent for a model without
    /// MoE.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub experts: Option<ExpertPlan>,
}

/// One stage: the pieces it holds and their cost.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageEntry {
    /// The stage's position along the pipeline.
    pub stage: u32,
    /// Whether it holds the embedding (the first stage does).
    pub embedding: bool,
    /// The decoder layers it holds (possibly none).
    pub layers: Range<u64>,
    /// Whether it holds the final norm, the output head and the MTP modules (the last stage does).
    pub head: bool,
    /// Forward FLOPs per token.
    pub forward_flops: u64,
    /// The part of `forward_flops` in products with weights.
    pub weight_flops: u64,
    /// Weights (elements).
    pub params: u64,
}

/// One pipeline rank: the stages it holds and how it fared in the simulated step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RankEntry {
    pub rank: u32,
    /// The stages it holds, by chunk: its chunk `c` in the lists is stage `stages[c]`.
    pub stages: Vec<u32>,
    /// Weights of its stages together.
    pub params: u64,
    /// Time it computes during the simulated step.
    pub busy: f64,
    /// Time it idles (the makespan less `busy`).
    pub bubble: f64,
    /// Most micro-batches of a stage whose activations it holds at once.
    pub peak_activations: u32,
}

/// Where the routed experts live and what each MoE layer's exchanges carry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpertPlan {
    /// Routed experts per MoE layer.
    pub experts: u64,
    /// Experts each token is routed to.
    pub top_k: u64,
    pub experts_per_rank: u64,
    /// Per expert-parallel rank, the experts it holds (the same in every MoE layer).
    pub ranks: Vec<Range<u64>>,
    /// Expert groups and how many of them a token's experts may come from (the node limit of
    /// group-limited routing; 1 and 1 without it).
    pub groups: u64,
    pub topk_groups: u64,
    /// Expert-parallel ranks per group, when groups are made of whole ranks (a group is a node:
    /// DeepSeek-V3's 8 groups over 64 GPUs are 8 nodes of 8).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ranks_per_group: Option<u64>,
    /// Every MoE layer, the main model's then the MTP modules', in order.
    pub layers: Vec<MoeLayerEntry>,
}

/// One MoE layer of the plan.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoeLayerEntry {
    /// The decoder layer (`L + k - 1` for MTP module `k`, as the checkpoint numbers it).
    pub layer: u64,
    /// The Hugging Face module (`model.layers.3.mlp`).
    pub module: String,
    /// The stage that holds it.
    pub stage: u32,
    pub dispatch: DispatchEntry,
}

/// The dispatch of one MoE layer for [`ParallelPlan::tokens`] tokens (what
/// `kiln_compiler::passes::moe_plan::DispatchPlan` computes; its module documentation has the
/// formulas).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DispatchEntry {
    pub tokens: u64,
    /// Width and element type of one row (a token's hidden state sent to one expert).
    pub hidden: u64,
    pub dtype: DType,
    /// Rows per tile of the grouped GEMM; padded counts are in whole tiles per expert.
    pub tile_rows: u64,
    /// `tokens · top_k`.
    pub rows: u64,
    pub worst_rows_per_expert: u64,
    pub worst_rows_per_rank: u64,
    pub worst_padded_rows_per_rank: u64,
    pub expected_rows_per_expert: u64,
    pub expected_padded_rows_per_rank: u64,
    /// How many ranks and groups one token's rows can reach.
    pub max_ranks_per_token: u64,
    pub max_groups_per_token: u64,
    /// The exchanges, `dispatch` then `combine`; none with one expert-parallel rank.
    pub all_to_all: Vec<AllToAllEntry>,
}

/// One all-to-all exchange: what a rank receives, in the worst case and under uniform routing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AllToAllEntry {
    /// `dispatch` or `combine`.
    pub name: String,
    pub worst_rows: u64,
    pub expected_rows: u64,
    pub worst_bytes: u64,
    pub expected_bytes: u64,
}
