//! The partition pass: cuts a model into the stages of a pipeline schedule and says which rank holds
//! which stages. A pure function of the spec (no graph: the stages are ranges of the model's pieces,
//! named as the checkpoint names them), with no I/O.
//!
//! The pieces, in order: the embedding, the decoder layers `0..L`, and the head (the final norm, the
//! output head and the MTP modules, which DeepSeek-V3 keeps with the head so that they share it,
//! reference §6.2). A stage is a contiguous, non-empty run of pieces; the first stage holds the
//! embedding and the first layers, the last the last layers and the head, as DeepSeek-V3 places
//! them. The number of stages is the schedule's ([`stage_count`]): `pp` for 1F1B, ZB1P and
//! DualPipe, `2·pp` for DualPipeV.
//!
//! The cut minimises the most expensive stage, in forward FLOPs per token ([`super::cost`]): the
//! pipeline's step runs at the pace of its slowest stage. It is exact ([`linear_partition`]): the
//! smallest achievable maximum by a binary search over sums with a greedy check, then, among the
//! cuts that reach it, the one with the smallest sum of squares of the stage costs (the most even
//! spread of the rest) by dynamic programming; ties go to the cut whose boundaries come first.
//!
//! Placement ([`placement`]), the same as the schedule's lanes ([`kiln_ir::schedule`]): 1F1B and
//! ZB1P put stage `i` on rank `i`; DualPipe puts stages `i` and `pp-1-i` on rank `i` (both
//! directions cut the model the same way, so each stage lives on two ranks: twice the weights,
//! reference §6.1–6.2); DualPipeV stages `i` and `2·pp-1-i`.
//!
//! Guarantees: every piece in exactly one stage, in order; no empty stage. Refuses (with what would
//! be right) zero ranks and more stages than pieces. Does not: balance memory (weights or
//! activations), move work between the two stages of a rank, or cut inside a layer.

use std::ops::Range;

use kiln_ir::ModelSpec;

use super::cost::{self, Cost, Overflow, Piece};
use super::Kind;

/// Why a model cannot be cut as asked.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PartitionError {
    #[error("--pp {pp}: a pipeline needs at least 1 rank")]
    NoRanks { pp: u32 },
    #[error(
        "--pp {pp}: {schedule} cuts the model into {stages} stages, but `{model}` has only {pieces} pieces \
         to cut (the embedding, {layers} decoder layers and the head); try --pp {most} or fewer"
    )]
    TooManyStages {
        pp: u32,
        schedule: &'static str,
        stages: u64,
        model: String,
        pieces: usize,
        layers: u64,
        most: u64,
    },
    #[error(transparent)]
    Overflow(#[from] Overflow),
}

/// One stage of a partition: its pieces (indices into [`Partition::pieces`]) and their summed cost.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stage {
    pub pieces: Range<usize>,
    pub cost: Cost,
}

impl Stage {
    /// The decoder layers among `pieces` (the stage's pieces of the partition's list).
    pub fn layers(&self, pieces: &[(Piece, Cost)]) -> Range<u64> {
        let layers: Vec<u64> = pieces[self.pieces.clone()]
            .iter()
            .filter_map(|(p, _)| match p {
                Piece::Layer(i) => Some(*i),
                _ => None,
            })
            .collect();
        match (layers.first(), layers.last()) {
            (Some(&a), Some(&b)) => a..b + 1,
            // No layer: an empty range where the next layer would be.
            _ => {
                let before =
                    pieces[..self.pieces.start].iter().filter(|(p, _)| matches!(p, Piece::Layer(_))).count()
                        as u64;
                before..before
            }
        }
    }

    /// Whether the stage holds `piece`.
    pub fn holds(&self, pieces: &[(Piece, Cost)], piece: Piece) -> bool {
        pieces[self.pieces.clone()].iter().any(|(p, _)| *p == piece)
    }
}

/// A model cut into stages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Partition {
    /// Every piece of the model with its cost, in order.
    pub pieces: Vec<(Piece, Cost)>,
    /// The stages in pipeline order.
    pub stages: Vec<Stage>,
    /// Per rank, the stages it holds by chunk (chunk `c` holds stage `placement[r][c]`).
    pub placement: Vec<Vec<u32>>,
}

/// The number of stages schedule `kind` runs on `pp` ranks.
pub fn stage_count(kind: Kind, pp: u32) -> u64 {
    match kind {
        Kind::OneFOneB | Kind::Zb1p | Kind::DualPipe => u64::from(pp),
        Kind::DualPipeV => 2 * u64::from(pp),
    }
}

/// Per rank, the stages schedule `kind` puts on it, by chunk (see the module documentation).
pub fn placement(kind: Kind, pp: u32) -> Vec<Vec<u32>> {
    (0..pp)
        .map(|r| match kind {
            Kind::OneFOneB | Kind::Zb1p => vec![r],
            Kind::DualPipe => vec![r, pp - 1 - r],
            Kind::DualPipeV => vec![r, 2 * pp - 1 - r],
        })
        .collect()
}

/// Cuts `spec` into the stages of schedule `kind` on `pp` ranks, balancing the forward FLOPs per
/// token of sequences of `seq_len` tokens.
pub fn partition(spec: &ModelSpec, kind: Kind, pp: u32, seq_len: u64) -> Result<Partition, PartitionError> {
    if pp == 0 {
        return Err(PartitionError::NoRanks { pp });
    }
    let pieces = cost::pieces(spec, seq_len)?;
    let stages = stage_count(kind, pp);
    if stages > pieces.len() as u64 {
        let per_rank = stages / u64::from(pp);
        let most = pieces.len() as u64 / per_rank;
        // DualPipe pairs rank i with rank pp-1-i: suggest an even pipeline.
        let most = if kind == Kind::DualPipe { most - most % 2 } else { most };
        return Err(PartitionError::TooManyStages {
            pp,
            schedule: kind.name(),
            stages,
            model: spec.model.name.clone(),
            pieces: pieces.len(),
            layers: spec.model.num_hidden_layers,
            most,
        });
    }
    let forward: Vec<u64> = pieces.iter().map(|(_, c)| c.forward).collect();
    let ranges = linear_partition(&forward, stages as usize);
    let stages = ranges
        .into_iter()
        .map(|r| {
            let cost = pieces[r.clone()].iter().try_fold(Cost::default(), |acc, (_, c)| acc.checked_add(*c));
            let cost = cost.ok_or_else(|| Overflow { what: "a stage".into(), seq_len })?;
            Ok(Stage { pieces: r, cost })
        })
        .collect::<Result<Vec<_>, PartitionError>>()?;
    Ok(Partition { pieces, stages, placement: placement(kind, pp) })
}

/// Cuts `costs` into `parts` contiguous, non-empty ranges whose largest sum is as small as it can
/// be; among those, one with the smallest sum of squared sums, the earliest boundaries on a tie.
/// `parts` must be between 1 and `costs.len()` (the caller checks; outside that it returns no
/// range).
pub fn linear_partition(costs: &[u64], parts: usize) -> Vec<Range<usize>> {
    let n = costs.len();
    if parts == 0 || parts > n {
        return Vec::new();
    }
    // Sums of 64-bit costs over at most usize::MAX pieces fit in 128 bits.
    let mut prefix = vec![0u128; n + 1];
    for (i, &c) in costs.iter().enumerate() {
        prefix[i + 1] = prefix[i] + u128::from(c);
    }
    let sum = |a: usize, b: usize| prefix[b] - prefix[a];

    // 1. The smallest largest sum: the smallest limit under which a greedy left-to-right fill needs
    //    at most `parts` ranges (splitting a range further never raises the largest sum, so at most
    //    `parts` ranges means exactly `parts` are possible too).
    let fits = |limit: u128| {
        let (mut used, mut current) = (1usize, 0u128);
        for &c in costs {
            let c = u128::from(c);
            if current + c > limit {
                used += 1;
                current = c;
            } else {
                current += c;
            }
        }
        used <= parts
    };
    let (mut lo, mut hi) = (costs.iter().copied().max().map_or(0, u128::from), prefix[n]);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if fits(mid) {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    let limit = lo;

    // 2. Among the cuts with every range at most `limit`, the smallest sum of squares:
    //    best[j][i] = min over s of best[j-1][s] + sum(s, i)^2, for ranges s..i within the limit.
    //    Squares saturate (only past any real model), which can only blur a tie of step 2.
    let first_fit: Vec<usize> = {
        // first_fit[i]: the smallest s with sum(s, i) <= limit (non-decreasing in i).
        let mut v = vec![0; n + 1];
        let mut s = 0;
        for (i, slot) in v.iter_mut().enumerate() {
            while sum(s, i) > limit {
                s += 1;
            }
            *slot = s;
        }
        v
    };
    const NONE: u128 = u128::MAX;
    let mut best = vec![vec![NONE; n + 1]; parts + 1];
    let mut from = vec![vec![0usize; n + 1]; parts + 1];
    best[0][0] = 0;
    for j in 1..=parts {
        // The first j pieces at least, and room for the other parts' one piece each.
        for i in j..=n - (parts - j) {
            for s in first_fit[i].max(j - 1)..i {
                if best[j - 1][s] == NONE {
                    continue;
                }
                let part = sum(s, i);
                let total = best[j - 1][s].saturating_add(part.saturating_mul(part));
                if total < best[j][i] {
                    best[j][i] = total;
                    from[j][i] = s;
                }
            }
        }
    }
    let mut ranges = Vec::with_capacity(parts);
    let mut end = n;
    for j in (1..=parts).rev() {
        let start = from[j][end];
        ranges.push(start..end);
        end = start;
    }
    ranges.reverse();
    ranges
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every cut of `n` pieces into `parts` ranges, as its range ends.
    fn all_cuts(n: usize, parts: usize) -> Vec<Vec<Range<usize>>> {
        fn go(
            start: usize,
            n: usize,
            parts: usize,
            acc: &mut Vec<Range<usize>>,
            out: &mut Vec<Vec<Range<usize>>>,
        ) {
            if parts == 1 {
                acc.push(start..n);
                out.push(acc.clone());
                acc.pop();
                return;
            }
            for end in start + 1..=n - (parts - 1) {
                acc.push(start..end);
                go(end, n, parts - 1, acc, out);
                acc.pop();
            }
        }
        let mut out = Vec::new();
        go(0, n, parts, &mut Vec::new(), &mut out);
        out
    }

    fn score(costs: &[u64], cut: &[Range<usize>]) -> (u128, u128) {
        let sums: Vec<u128> =
            cut.iter().map(|r| costs[r.clone()].iter().map(|&c| u128::from(c)).sum()).collect();
        (sums.iter().copied().max().unwrap(), sums.iter().map(|s| s * s).sum())
    }

    /// A small deterministic generator (xorshift64*), so that the cases are the same on every run.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
    }

    #[test]
    fn the_cut_is_optimal_against_brute_force() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut cases = 0;
        for _ in 0..400 {
            let n = 1 + (rng.next() % 10) as usize;
            // Small ranges make ties common; large ones make them rare; zeros model the embedding.
            let span = [3, 10, 1000, 1 << 40][(rng.next() % 4) as usize];
            let costs: Vec<u64> = (0..n).map(|_| rng.next() % span).collect();
            for parts in 1..=n {
                let cut = linear_partition(&costs, parts);
                // Contiguous, non-empty, covering every piece in order.
                assert_eq!(cut.len(), parts, "{costs:?} into {parts}");
                assert_eq!(cut[0].start, 0);
                assert_eq!(cut[parts - 1].end, n);
                assert!(cut.windows(2).all(|w| w[0].end == w[1].start), "{cut:?}");
                assert!(cut.iter().all(|r| !r.is_empty()), "{cut:?}");
                let (max, squares) = score(&costs, &cut);
                let all = all_cuts(n, parts);
                let best_max = all.iter().map(|c| score(&costs, c).0).min().unwrap();
                let best_squares = all
                    .iter()
                    .map(|c| score(&costs, c))
                    .filter(|s| s.0 == best_max)
                    .map(|s| s.1)
                    .min()
                    .unwrap();
                assert_eq!(max, best_max, "{costs:?} into {parts}: {cut:?}");
                assert_eq!(squares, best_squares, "{costs:?} into {parts}: {cut:?}");
                cases += 1;
            }
        }
        assert!(cases > 1500, "{cases}");
    }

    #[test]
    fn a_known_cut() {
        // 1..=9 into 3 (sum 45): the last range holds 9, and [9] alone leaves 36 for two ranges,
        // so the best largest sum is [8, 9] = 17, and the only cut of 1..=7 into two ranges of at
        // most 17 is [1..=5] = 15, [6, 7] = 13.
        assert_eq!(linear_partition(&[1, 2, 3, 4, 5, 6, 7, 8, 9], 3), vec![0..5, 5..7, 7..9]);
        // A zero-cost first piece (the embedding) goes with the next, not alone.
        assert_eq!(linear_partition(&[0, 5, 5], 2), vec![0..2, 2..3]);
        assert_eq!(linear_partition(&[4, 4], 3), Vec::<Range<usize>>::new());
        assert_eq!(linear_partition(&[4, 4], 0), Vec::<Range<usize>>::new());
    }

    #[test]
    fn placements() {
        assert_eq!(placement(Kind::OneFOneB, 3), vec![vec![0], vec![1], vec![2]]);
        assert_eq!(placement(Kind::Zb1p, 2), vec![vec![0], vec![1]]);
        // DualPipe: rank i holds stage i and stage pp-1-i; every stage on two ranks.
        assert_eq!(placement(Kind::DualPipe, 4), vec![vec![0, 3], vec![1, 2], vec![2, 1], vec![3, 0]]);
        // DualPipeV: rank i holds stage i and stage 2pp-1-i; every stage on one rank.
        assert_eq!(placement(Kind::DualPipeV, 3), vec![vec![0, 5], vec![1, 4], vec![2, 3]]);
        for kind in Kind::ALL {
            for pp in [1u32, 2, 4, 16] {
                if kind == Kind::DualPipe && pp % 2 == 1 {
                    continue;
                }
                let mut held = vec![0; stage_count(kind, pp) as usize];
                for s in placement(kind, pp).into_iter().flatten() {
                    held[s as usize] += 1;
                }
                let copies = if kind == Kind::DualPipe { 2 } else { 1 };
                assert!(held.iter().all(|&h| h == copies), "{kind:?} pp {pp}: {held:?}");
            }
        }
    }

    #[test]
    fn a_pipeline_longer_than_the_model_is_refused_with_one_that_fits() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/tiny.toml");
        let tiny = crate::spec::load(std::path::Path::new(path)).unwrap();
        // 6 pieces: the embedding, 4 layers, the head.
        let e = partition(&tiny, Kind::OneFOneB, 7, 64).unwrap_err();
        assert!(e.to_string().ends_with("try --pp 6 or fewer"), "{e}");
        // DualPipeV needs two stages a rank; DualPipe an even number of ranks.
        let e = partition(&tiny, Kind::DualPipeV, 4, 64).unwrap_err();
        assert!(e.to_string().ends_with("try --pp 3 or fewer"), "{e}");
        let mut five_pieces = tiny.clone();
        five_pieces.model.num_hidden_layers = 3;
        let e = partition(&five_pieces, Kind::DualPipe, 6, 64).unwrap_err();
        assert!(e.to_string().ends_with("try --pp 4 or fewer"), "{e}");
        assert_eq!(partition(&tiny, Kind::Zb1p, 0, 64).unwrap_err(), PartitionError::NoRanks { pp: 0 });
        assert_eq!(partition(&tiny, Kind::OneFOneB, 6, 64).unwrap().stages.len(), 6);
    }
}
