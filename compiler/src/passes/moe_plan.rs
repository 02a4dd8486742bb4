//! Dispatch buffer sizes and all-to-all points of a `moe_dispatch`, for a given token count: the
//! numbers behind the plan `plan-moe-dispatch` writes into the IR, for `kiln compile --report` and
//! for whoever sizes the buffers.
//!
//! Model: `N` tokens are routed together, spread evenly over the `ep_size` expert-parallel ranks
//! (data-parallel attention before, expert parallelism inside the MoE, as DeepSeek-V3 deploys it).
//! Each token sends one row per chosen expert, `K` distinct experts per token, and rank `r` holds
//! experts `r*E/ep .. (r+1)*E/ep`.
//!
//! ```text
//! rows                      = N*K                       every slot is one row
//! worst rows per expert     = N                         a token picks an expert at most once
//! worst rows per rank       = min(N*K, E/ep * N)        all slots on one rank, capped per expert
//! expected rows per expert  = ceil(N*K/E)               uniform routing
//! padded                    = round_up(rows, tile)      grouped GEMMs run in tiles of `tile` rows
//! ```
//!
//! With `ep_size > 1` there are two all-to-all exchanges: **dispatch**, after `moe_dispatch` sorts the
//! rows and before the gate/up `grouped_linear`s (rows travel to the rank of their expert), and
//! **combine**, after the down `grouped_linear` and before `moe_combine` (rows travel back to their
//! token's rank). A rank receives at most the worst rows per rank in the first, and exactly
//! `ceil(N/ep)*K` rows (its own tokens' slots) in the second. Group-limited routing bounds how many
//! groups (nodes, reference §3.2) a token's rows reach by `topk_groups`.

use std::fmt;

use kiln_ir::op::{Dispatch, Op};
use kiln_ir::{DType, Graph};

/// Rows per tile of the grouped GEMM: the M extent of one Hopper `wgmma` (m64). A kernel parameter,
/// not a model constant, so callers may pass another.
pub const DEFAULT_TILE_ROWS: u64 = 64;

/// Why a plan could not be computed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("invalid dispatch: {0}")]
    Dispatch(String),
    #[error("the tile must have at least one row")]
    ZeroTile,
    #[error("{what} overflows 64 bits for {tokens} tokens")]
    Overflow { what: &'static str, tokens: u64 },
    #[error("{0}")]
    Graph(String),
}

/// One all-to-all exchange: what a rank receives, worst case and under uniform routing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllToAll {
    /// `dispatch` or `combine`.
    pub name: &'static str,
    /// The op before and the op after the exchange.
    pub after: &'static str,
    pub before: &'static str,
    pub worst_rows: u64,
    pub expected_rows: u64,
    pub worst_bytes: u64,
    pub expected_bytes: u64,
}

/// The dispatch buffers of one `moe_dispatch` for `tokens` tokens; see the module documentation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DispatchPlan {
    pub tokens: u64,
    pub num_experts: u64,
    pub top_k: u64,
    pub ep_size: u64,
    pub experts_per_rank: u64,
    pub num_groups: u64,
    pub topk_groups: u64,
    /// Width and element type of one row.
    pub hidden: u64,
    pub dtype: DType,
    pub tile_rows: u64,
    /// `N*K`.
    pub rows: u64,
    pub worst_rows_per_expert: u64,
    pub worst_rows_per_rank: u64,
    /// The worst rows of a rank when each expert's rows start on a tile boundary.
    pub worst_padded_rows_per_rank: u64,
    pub expected_rows_per_expert: u64,
    pub expected_padded_rows_per_expert: u64,
    pub expected_padded_rows_per_rank: u64,
    /// How many ranks and groups one token's rows can reach.
    pub max_ranks_per_token: u64,
    pub max_groups_per_token: u64,
    /// Empty when `ep_size == 1`.
    pub all_to_all: Vec<AllToAll>,
}

/// The plan of a dispatch with attributes `d` for `tokens` tokens whose rows are `hidden` elements
/// of `dtype`.
pub fn plan_dispatch(
    d: &Dispatch,
    tokens: u64,
    hidden: u64,
    dtype: DType,
    tile_rows: u64,
) -> Result<DispatchPlan, PlanError> {
    let (e, k, ep, g, tg) = (d.num_experts, d.top_k, d.ep_size, d.num_groups, d.topk_groups);
    if e == 0 || k == 0 || k > e {
        return Err(PlanError::Dispatch(format!("top_k = {k} must be between 1 and num_experts = {e}")));
    }
    if ep == 0 || e % ep != 0 {
        return Err(PlanError::Dispatch(format!("{e} experts cannot be placed evenly on {ep} ranks")));
    }
    if g == 0 || e % g != 0 || tg == 0 || tg > g {
        return Err(PlanError::Dispatch(format!("{tg} of {g} groups is not a group limit for {e} experts")));
    }
    if tile_rows == 0 {
        return Err(PlanError::ZeroTile);
    }
    let of = |what| PlanError::Overflow { what, tokens };
    let epr = e / ep;
    let rows = tokens.checked_mul(k).ok_or(of("the row count"))?;
    let worst_rows_per_rank = rows.min(epr.checked_mul(tokens).ok_or(of("the rows per rank"))?);
    let round_up = |n: u64| n.div_ceil(tile_rows).checked_mul(tile_rows).ok_or(of("the padded rows"));
    // Each expert's rows padded to whole tiles: at most tile - 1 extra rows per expert, in whole
    // tiles, and never more than every expert full.
    let padded_slack = worst_rows_per_rank
        .checked_add(epr.checked_mul(tile_rows - 1).ok_or(of("the padded rows"))?)
        .ok_or(of("the padded rows"))?;
    let worst_padded_rows_per_rank = (padded_slack / tile_rows * tile_rows)
        .min(round_up(tokens)?.checked_mul(epr).ok_or(of("the padded rows"))?);
    let expected_rows_per_expert = rows.div_ceil(e);
    let expected_padded_rows_per_expert = round_up(expected_rows_per_expert)?;
    let expected_padded_rows_per_rank =
        expected_padded_rows_per_expert.checked_mul(epr).ok_or(of("the padded rows"))?;
    // Group-limited routing: a token's experts lie in at most `tg` groups. When groups are made of
    // whole ranks that bounds the ranks too; when ranks hold whole groups, one rank per group.
    let group_ranks = match (g > 1, ep % g == 0, g % ep == 0) {
        (false, _, _) => ep,
        (true, true, _) => tg.saturating_mul(ep / g),
        (true, false, true) => tg,
        (true, false, false) => ep,
    };
    let max_ranks_per_token = k.min(ep).min(group_ranks);
    let max_groups_per_token = if g > 1 { tg.min(k) } else { 1 };
    let row_bytes = hidden.checked_mul(dtype.size_bytes()).ok_or(of("the row size"))?;
    let bytes = |rows: u64| rows.checked_mul(row_bytes).ok_or(of("the buffer size"));
    let mut all_to_all = Vec::new();
    if ep > 1 {
        let expected_in = expected_rows_per_expert.checked_mul(epr).ok_or(of("the rows per rank"))?.min(rows);
        all_to_all.push(AllToAll {
            name: "dispatch",
            after: "moe_dispatch",
            before: "grouped_linear (gate, up)",
            worst_rows: worst_rows_per_rank,
            expected_rows: expected_in,
            worst_bytes: bytes(worst_rows_per_rank)?,
            expected_bytes: bytes(expected_in)?,
        });
        let back = tokens.div_ceil(ep).checked_mul(k).ok_or(of("the rows per rank"))?;
        all_to_all.push(AllToAll {
            name: "combine",
            after: "grouped_linear (down)",
            before: "moe_combine",
            worst_rows: back,
            expected_rows: back,
            worst_bytes: bytes(back)?,
            expected_bytes: bytes(back)?,
        });
    }
    Ok(DispatchPlan {
        tokens,
        num_experts: e,
        top_k: k,
        ep_size: ep,
        experts_per_rank: epr,
        num_groups: g,
        topk_groups: tg,
        hidden,
        dtype,
        tile_rows,
        rows,
        worst_rows_per_expert: tokens,
        worst_rows_per_rank,
        worst_padded_rows_per_rank,
        expected_rows_per_expert,
        expected_padded_rows_per_expert,
        expected_padded_rows_per_rank,
        max_ranks_per_token,
        max_groups_per_token,
        all_to_all,
    })
}

/// The plan of every `moe_dispatch` in `g`, with the scope of its node, in graph order.
pub fn plan_graph(g: &Graph, tokens: u64, tile_rows: u64) -> Result<Vec<(String, DispatchPlan)>, PlanError> {
    let mut plans = Vec::new();
    for n in g.nodes() {
        let node = g.node(n);
        let Op::MoeDispatch(d) = &node.op else { continue };
        let x = g.ty(node.inputs[0]);
        let scope = node.scope.clone().unwrap_or_default();
        let hidden = x.shape.last().and_then(|d| d.as_known()).ok_or_else(|| {
            PlanError::Graph(format!("{scope}: the rows of {x} do not have a constant width"))
        })?;
        plans.push((scope, plan_dispatch(d, tokens, hidden, x.dtype, tile_rows)?));
    }
    Ok(plans)
}

impl fmt::Display for DispatchPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = self;
        write!(
            f,
            "moe_dispatch for {} tokens: {} experts, top-{}, ep {} ({} experts per rank)",
            p.tokens, p.num_experts, p.top_k, p.ep_size, p.experts_per_rank
        )?;
        if p.num_groups > 1 {
            write!(f, ", {} of {} groups per token", p.topk_groups, p.num_groups)?;
        }
        writeln!(f)?;
        writeln!(f, "  rows          {} (tokens x top_k) of {} x {}", p.rows, p.hidden, p.dtype.name())?;
        writeln!(
            f,
            "  per expert    worst {}, expected {} (padded to {}-row tiles: {})",
            p.worst_rows_per_expert,
            p.expected_rows_per_expert,
            p.tile_rows,
            p.expected_padded_rows_per_expert
        )?;
        writeln!(
            f,
            "  per rank      worst {} (padded {}), expected padded {}",
            p.worst_rows_per_rank, p.worst_padded_rows_per_rank, p.expected_padded_rows_per_rank
        )?;
        write!(
            f,
            "  reach         a token's rows go to at most {} ranks in {} group{}",
            p.max_ranks_per_token,
            p.max_groups_per_token,
            if p.max_groups_per_token == 1 { "" } else { "s" }
        )?;
        if p.all_to_all.is_empty() {
            return write!(f, "\n  all-to-all    none (ep_size = 1: every expert is local)");
        }
        for a in &p.all_to_all {
            write!(
                f,
                "\n  all-to-all    {} ({} -> {}): a rank receives worst {} rows ({} bytes), expected {} rows ({} bytes)",
                a.name, a.after, a.before, a.worst_rows, a.worst_bytes, a.expected_rows, a.expected_bytes
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// DeepSeek-V3 with the report's deployment: 256 experts, top-8, 8 groups of 32 with 4 kept,
    /// expert parallelism over 64 GPUs (reference §3.2), so 4 experts per rank.
    fn v3(ep_size: u64) -> Dispatch {
        Dispatch { num_experts: 256, top_k: 8, ep_size, num_groups: 8, topk_groups: 4 }
    }

    #[test]
    fn deepseek_v3_on_64_ranks_at_4096_tokens() {
        let p = plan_dispatch(&v3(64), 4096, 7168, DType::BF16, DEFAULT_TILE_ROWS).unwrap();
        assert_eq!(p.experts_per_rank, 4);
        assert_eq!(p.rows, 32768);
        assert_eq!(p.worst_rows_per_expert, 4096);
        // A token can put at most 4 of its 8 slots on one rank (4 experts there).
        assert_eq!(p.worst_rows_per_rank, 16384);
        assert_eq!(p.worst_padded_rows_per_rank, 16384);
        assert_eq!(p.expected_rows_per_expert, 128);
        assert_eq!(p.expected_padded_rows_per_expert, 128);
        assert_eq!(p.expected_padded_rows_per_rank, 512);
        assert_eq!((p.max_ranks_per_token, p.max_groups_per_token), (8, 4));
        let [dispatch, combine] = &p.all_to_all[..] else { panic!("{:?}", p.all_to_all) };
        assert_eq!((dispatch.name, dispatch.worst_rows, dispatch.expected_rows), ("dispatch", 16384, 512));
        // A bf16 row of 7168 is 14336 bytes: 224 MiB worst case, 7 MiB expected.
        assert_eq!((dispatch.worst_bytes, dispatch.expected_bytes), (16384 * 14336, 512 * 14336));
        assert_eq!(dispatch.worst_bytes, 224 << 20);
        // 64 tokens live on each rank; their 512 slots come back.
        assert_eq!((combine.name, combine.worst_rows, combine.expected_bytes), ("combine", 512, 7 << 20));
        // The whole report is snapshotted in `tests/it/passes_equiv.rs`.
        let text = p.to_string();
        assert!(text.contains("per rank      worst 16384 (padded 16384), expected padded 512"), "{text}");
        assert!(text.contains("at most 8 ranks in 4 groups"), "{text}");
    }

    #[test]
    fn one_rank_holds_every_expert() {
        let p = plan_dispatch(&v3(1), 4096, 7168, DType::BF16, DEFAULT_TILE_ROWS).unwrap();
        assert_eq!((p.experts_per_rank, p.worst_rows_per_rank), (256, 32768));
        assert_eq!(p.expected_padded_rows_per_rank, 256 * 128);
        assert!(p.all_to_all.is_empty());
        assert!(p.to_string().ends_with("none (ep_size = 1: every expert is local)"));
    }

    #[test]
    fn padding_rounds_each_expert_up_to_a_tile() {
        // 100 tokens x top-8 over 256 experts: 3.125 rows per expert, padded to one 64-row tile.
        let p = plan_dispatch(&v3(64), 100, 7168, DType::BF16, DEFAULT_TILE_ROWS).unwrap();
        assert_eq!((p.expected_rows_per_expert, p.expected_padded_rows_per_expert), (4, 64));
        // Worst: 400 rows on a rank; padded, at most 100 -> 128 per expert, 4 experts.
        assert_eq!((p.worst_rows_per_rank, p.worst_padded_rows_per_rank), (400, 512));
        // Ranks holding whole groups: a token reaches at most its 2 kept groups' ranks.
        let d = Dispatch { num_experts: 16, top_k: 4, ep_size: 2, num_groups: 4, topk_groups: 2 };
        let p = plan_dispatch(&d, 10, 64, DType::F32, 16).unwrap();
        assert_eq!((p.max_ranks_per_token, p.max_groups_per_token), (2, 2));
    }

    #[test]
    fn bad_plans_are_errors() {
        let d = Dispatch { ep_size: 3, ..v3(1) };
        assert!(matches!(plan_dispatch(&d, 1, 1, DType::BF16, 64), Err(PlanError::Dispatch(_))));
        assert_eq!(plan_dispatch(&v3(1), 1, 1, DType::BF16, 0), Err(PlanError::ZeroTile));
        let e = plan_dispatch(&v3(1), u64::MAX, 1, DType::BF16, 64).unwrap_err();
        assert_eq!(e.to_string(), format!("the row count overflows 64 bits for {} tokens", u64::MAX));
    }
}
