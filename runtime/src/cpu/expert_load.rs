//! Per-expert load: how many routed rows each expert of each MoE layer received, accumulated over
//! the runs of a [`super::CpuModel`].
//!
//! `plan-moe-dispatch` lowers every MoE layer to a `moe_dispatch` kernel whose second result is
//! `offsets: i32[E+1]`, the start of each expert's rows in the sorted copy of the tokens; expert
//! `e` received `offsets[e+1] - offsets[e]` rows. Reading that buffer right after its launch (the
//! arena plan reuses the slot once the grouped GEMMs have read it) costs `E+1` integers per layer
//! and needs no change to the kernels. A launch is recognised by its kernel's
//! name (`k_moe_dispatch_{hash}`, as the manifest format documents kernel names) and its arguments
//! (two inputs, then results whose second is a rank-1 `i32` buffer of known length); a launch that
//! does not fit is not reported rather than misread. Each launch is one layer, labelled by the
//! Hugging Face module it comes from (`model.layers.3.mlp`), or by its `offsets` value when the
//! manifest records no scope.
//!
//! What is counted is what the kernels did: every row of every run. The padding rows of a batch
//! of prompts of different lengths are routed like real tokens, so they are counted. With a KV
//! cache the prefill routes each prompt token once and each decode step one token per sequence (the
//! decode program's counts are added to the prefill's); without one, each generation step routes
//! the whole sequence so far, so a prompt token is counted once per forward pass.

use kiln_ir::artifact::{ArgRole, BufferId, Manifest, Step};
use kiln_ir::DType;

/// The load of one MoE layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerLoad {
    /// The Hugging Face module of the dispatch (`model.layers.3.mlp`), or `moe_dispatch %141` (its
    /// `offsets` value in `graph.kir`) when the manifest has no scope for it.
    pub label: String,
    /// Experts each token is routed to.
    pub top_k: u64,
    /// Rows routed to each expert, over every run since the load or the last reset.
    pub counts: Vec<u64>,
}

impl LayerLoad {
    /// Rows routed in all: tokens times `top_k`.
    pub fn routed(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Tokens routed (each to `top_k` experts).
    pub fn tokens(&self) -> u64 {
        self.routed() / self.top_k.max(1)
    }

    /// Rows per expert on average.
    pub fn mean(&self) -> f64 {
        self.routed() as f64 / self.counts.len().max(1) as f64
    }

    /// The busiest expert's rows over the mean: 1 is a perfect balance; `None` when nothing was
    /// routed.
    pub fn imbalance(&self) -> Option<f64> {
        let max = *self.counts.iter().max()?;
        (self.routed() > 0).then(|| max as f64 / self.mean())
    }

    /// The `n` busiest experts as `(expert, rows)`, busiest first (ties by expert number).
    pub fn busiest(&self, n: usize) -> Vec<(usize, u64)> {
        let mut v: Vec<(usize, u64)> = self.counts.iter().copied().enumerate().collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        v.truncate(n);
        v
    }
}

/// One dispatch launch, whose `offsets` are read right after it runs (its arena slot is reused
/// later in the same run).
pub(super) struct Probe {
    /// The launch's index among the program's launches.
    pub launch: usize,
    pub offsets: BufferId,
    pub load: LayerLoad,
}

/// The `moe_dispatch` launches of `m`, in program order; `folded` are the steps that ran once at
/// load and are not among the launches of a run.
pub(super) fn probes(m: &Manifest, folded: &[usize]) -> Vec<Probe> {
    let mut out = Vec::new();
    let launches = m.program.iter().enumerate().filter_map(|(i, s)| match s {
        Step::Launch { kernel, buffers, scope } if !folded.contains(&i) => Some((kernel, buffers, scope)),
        _ => None,
    });
    for (launch, (kernel, buffers, scope)) in launches.enumerate() {
        let k = m.kernel(*kernel);
        if !k.name.starts_with("k_moe_dispatch_") || k.args.len() < 4 || buffers.len() < k.args.len() {
            continue;
        }
        if k.args[..2].iter().any(|a| a.role != ArgRole::Input) || k.args[3].role != ArgRole::Output {
            continue;
        }
        let Some(top_k) = k.args[1].shape.last().and_then(|d| d.as_known()) else { continue };
        let b = m.buffer(buffers[3]);
        let experts = match b.shape.as_slice() {
            [d] if b.dtype == DType::I32 => d.as_known().filter(|&n| n >= 2).map(|n| n - 1),
            _ => None,
        };
        let Some(experts) = experts else { continue };
        let label = scope.clone().unwrap_or_else(|| format!("moe_dispatch {}", b.value));
        out.push(Probe {
            launch,
            offsets: b.id,
            load: LayerLoad { label, top_k, counts: vec![0; experts as usize] },
        });
    }
    out
}

impl Probe {
    /// Adds the rows of one run, from its `offsets` (`E+1` values, non-decreasing).
    pub fn add(&mut self, offsets: &[i64]) {
        for (c, w) in self.load.counts.iter_mut().zip(offsets.windows(2)) {
            *c += w[1].saturating_sub(w[0]).max(0) as u64;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statistics_of_a_layer() {
        let l = LayerLoad { label: "l".into(), top_k: 2, counts: vec![1, 5, 0, 2] };
        assert_eq!((l.routed(), l.tokens()), (8, 4));
        assert_eq!(l.mean(), 2.0);
        assert_eq!(l.imbalance(), Some(2.5));
        assert_eq!(l.busiest(2), vec![(1, 5), (3, 2)]);
        let empty = LayerLoad { counts: vec![0; 4], ..l };
        assert_eq!(empty.imbalance(), None);
    }

    #[test]
    fn offsets_accumulate_as_differences() {
        let mut p = Probe {
            launch: 0,
            offsets: BufferId(0),
            load: LayerLoad { label: "l".into(), top_k: 1, counts: vec![0; 3] },
        };
        p.add(&[0, 2, 2, 5]);
        p.add(&[0, 1, 3, 3]);
        assert_eq!(p.load.counts, vec![3, 2, 3]);
    }
}
