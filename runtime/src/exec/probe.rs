//! Per-expert load: how many routed rows each expert of each MoE layer received, accumulated over the
//! runs of an [`super::Executor`].
//!
//! The manifest lists every program's MoE dispatch launches ([`kiln_ir::artifact::MoeDispatch`]):
//! the launch, its `offsets: i32[E+1]` result (the start of each expert's rows in the sorted copy of
//! the tokens, so expert `e` received `offsets[e+1] - offsets[e]` rows), and the layer. The executor
//! reads `offsets` right after the launch (the arena plan reuses the slot once the grouped GEMMs
//! have read it), which costs `E+1` integers per layer and needs no change to the kernels. Layers
//! are matched by label across programs, so a prefill and the decode steps after it add up.
//!
//! What is counted is what the kernels did: every row of every run. The padding rows of a batch of
//! prompts of different lengths are routed like real tokens, so they are counted. With a KV cache
//! the prefill routes each prompt token once and each decode step one token per sequence; without
//! one, each generation step routes the whole sequence so far, so a prompt token is counted once per
//! forward pass.

use kiln_ir::artifact::{BufferId, Program};

/// The load of one MoE layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerLoad {
    /// The Hugging Face module of the dispatch (`model.layers.3.mlp`).
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

/// One dispatch launch of a loaded program.
pub(super) struct Probe {
    /// The launch's index among the program's bound launches.
    pub launch: usize,
    pub offsets: BufferId,
    pub layer: String,
    pub experts: u64,
    pub top_k: u64,
}

/// The dispatches of `p` among its bound launches `steps` (step indices), in order.
pub(super) fn probes(p: &Program, steps: &[usize]) -> Vec<Probe> {
    let mut out: Vec<Probe> = p
        .moe_dispatches
        .iter()
        .filter_map(|d| {
            let launch = steps.iter().position(|&s| s == d.step)?;
            Some(Probe {
                launch,
                offsets: d.offsets,
                layer: d.layer.clone(),
                experts: d.experts,
                top_k: d.top_k,
            })
        })
        .collect();
    out.sort_by_key(|p| p.launch);
    out
}

/// Adds the rows of one run of probe `p`, from its `offsets` (`E+1` values, non-decreasing), to the
/// layer of the same label in `load` (appended the first time).
pub(super) fn add(load: &mut Vec<LayerLoad>, p: &Probe, offsets: &[i64]) {
    let i = match load.iter().position(|l| l.label == p.layer) {
        Some(i) => i,
        None => {
            load.push(LayerLoad {
                label: p.layer.clone(),
                top_k: p.top_k,
                counts: vec![0; p.experts as usize],
            });
            load.len() - 1
        }
    };
    for (c, w) in load[i].counts.iter_mut().zip(offsets.windows(2)) {
        *c += w[1].saturating_sub(w[0]).max(0) as u64;
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
    fn offsets_accumulate_as_differences_by_layer() {
        let p = Probe { launch: 0, offsets: BufferId(0), layer: "l".into(), experts: 3, top_k: 1 };
        let mut load = Vec::new();
        add(&mut load, &p, &[0, 2, 2, 5]);
        add(&mut load, &p, &[0, 1, 3, 3]);
        assert_eq!(load.len(), 1, "one layer, however many runs and programs");
        assert_eq!(load[0].counts, vec![3, 2, 3]);
    }
}
