//! GRPO's equations (DeepSeekMath §4.1.2, eq. 3; the objective DeepSeek-V3 §5.2.2 uses): group-relative
//! advantages, the per-token KL estimate against the reference model, the clipped objective, and
//! its gradient with respect to each token's log-probability, which the train step turns into
//! per-target loss weights.
//!
//! For `S` sampled completions (`G` per prompt), completion `i` with tokens `o_i`, advantage `A_i`
//! and, per token, the log-probabilities `logp` (current policy), `old` (the policy that sampled)
//! and `ref` (the frozen reference model), the loss minimised is
//!
//! ```text
//! L = 1/S Σ_i 1/|o_i| Σ_t -( min(ρ A_i, clip(ρ, 1-ε, 1+ε) A_i) - β KL_t )
//! ρ = exp(logp - old),   KL_t = exp(ref - logp) - (ref - logp) - 1   (the k3 estimator, ≥ 0)
//! ```
//!
//! Its derivative by `logp` at token `t` of completion `i` is `g_t / (S |o_i|)` with
//! `g_t = -ρ A_i [when the unclipped term is the minimum] + β (1 - exp(ref - logp))`. The unclipped
//! term is the minimum when `A ≥ 0` and `ρ ≤ 1+ε`, or `A < 0` and `ρ ≥ 1-ε`; otherwise the
//! clipped one is, and it is constant in `logp`. Since a target's cross-entropy is `-logp`, the
//! gradient of `L` is that of `Σ_t w_t ce_t / (N T)` with `w_t = -N T ∂L/∂logp_t`: the train step
//! with token weights (`mean(ce * w)` over its `N` rows of `T` targets) takes that step.
//!
//! Advantages follow TRL's `GRPOTrainer`, the common reading of "normalised by the group's
//! standard deviation": `A_i = (r_i - mean) / (std + 1e-4)`, with the unbiased (`n - 1`) standard
//! deviation, as `torch.std` computes it. A group whose rewards are all equal gets advantages 0.

/// The added term of the advantages' denominator.
pub const STD_EPS: f64 = 1e-4;

/// Each completion's advantage: its reward against its group's (`group` consecutive rewards).
pub fn advantages(rewards: &[f64], group: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(rewards.len());
    for g in rewards.chunks(group.max(1)) {
        let n = g.len() as f64;
        let mean = g.iter().sum::<f64>() / n;
        let var =
            if g.len() > 1 { g.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / (n - 1.0) } else { 0.0 };
        let std = var.sqrt();
        out.extend(g.iter().map(|r| (r - mean) / (std + STD_EPS)));
    }
    out
}

/// The settings of the objective.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Objective {
    /// β, the KL penalty's weight (DeepSeekMath: 0.04).
    pub beta: f64,
    /// ε, the policy ratio's clip (0.2).
    pub clip: f64,
}

/// One completion's tokens: their log-probabilities under the current, sampling and reference
/// models, and the completion's advantage.
pub struct Completion<'a> {
    pub logp: &'a [f64],
    pub old: &'a [f64],
    pub reference: &'a [f64],
    pub advantage: f64,
}

/// What [`Objective::evaluate`] computed over a batch of completions.
#[derive(Clone, Debug, PartialEq)]
pub struct Evaluation {
    /// `L`.
    pub loss: f64,
    /// The mean of `KL_t` over each completion's tokens, averaged over completions.
    pub kl: f64,
    /// The fraction of tokens whose ratio was clipped (the clipped term was the minimum and
    /// differed from the unclipped one).
    pub clipped: f64,
    /// `∂L/∂logp_t`, per completion and token.
    pub grad: Vec<Vec<f64>>,
}

impl Objective {
    /// `L`, the KL term and `∂L/∂logp` over `completions` (each with at least one token).
    pub fn evaluate(&self, completions: &[Completion]) -> Evaluation {
        let s = completions.len().max(1) as f64;
        let (mut loss, mut kl, mut clipped, mut tokens) = (0.0, 0.0, 0usize, 0usize);
        let mut grad = Vec::with_capacity(completions.len());
        for c in completions {
            let n = c.logp.len().max(1) as f64;
            let (mut seq_loss, mut seq_kl) = (0.0, 0.0);
            let mut g = Vec::with_capacity(c.logp.len());
            for t in 0..c.logp.len() {
                let (lp, old, rf) = (c.logp[t], c.old[t], c.reference[t]);
                let rho = (lp - old).exp();
                let a = c.advantage;
                let unclipped = rho * a;
                let bounded = rho.clamp(1.0 - self.clip, 1.0 + self.clip) * a;
                let surrogate = unclipped.min(bounded);
                let d = rf - lp;
                let kl_t = d.exp() - d - 1.0;
                seq_loss += -(surrogate - self.beta * kl_t);
                seq_kl += kl_t;
                let active = if a >= 0.0 { rho <= 1.0 + self.clip } else { rho >= 1.0 - self.clip };
                clipped += usize::from(!active && bounded != unclipped);
                tokens += 1;
                let g_t = -(if active { unclipped } else { 0.0 }) + self.beta * (1.0 - d.exp());
                g.push(g_t / (s * n));
            }
            loss += seq_loss / n;
            kl += seq_kl / n;
            grad.push(g);
        }
        Evaluation { loss: loss / s, kl: kl / s, clipped: clipped as f64 / tokens.max(1) as f64, grad }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advantages_are_relative_to_the_group() {
        let a = advantages(&[1.0, 0.0, 0.0, 1.0, 0.5, 0.5], 2);
        // Group 1: mean 0.5, unbiased std 0.7071.
        let s = 0.5f64.sqrt();
        assert!((a[0] - 0.5 / (s + STD_EPS)).abs() < 1e-12 && (a[1] + 0.5 / (s + STD_EPS)).abs() < 1e-12);
        assert_eq!(a[4..], [0.0, 0.0], "equal rewards teach nothing");
    }

    /// Advantages, KL, loss, clipped fraction and gradient against PyTorch on one batch
    /// (`tests/goldens/grpo`, from `tools/goldens/make_grpo.py`: float64, autograd).
    #[test]
    fn the_equations_match_pytorch() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/goldens/grpo/golden.json");
        let g: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let list = |k: &str| -> Vec<f64> { serde_json::from_value(g[k].clone()).unwrap() };
        let ragged = |k: &str| -> Vec<Vec<f64>> { serde_json::from_value(g[k].clone()).unwrap() };
        let close = |a: f64, b: f64, what: &str| {
            assert!((a - b).abs() <= 1e-12 * b.abs().max(1.0), "{what}: {a} vs {b}")
        };
        let adv = advantages(&list("rewards"), g["group"].as_u64().unwrap() as usize);
        for (i, (a, b)) in adv.iter().zip(list("advantages")).enumerate() {
            close(*a, b, &format!("advantage {i}"));
        }
        let (logp, old, reference) = (ragged("logp"), ragged("old"), ragged("ref"));
        let comps: Vec<Completion> = (0..logp.len())
            .map(|i| Completion { logp: &logp[i], old: &old[i], reference: &reference[i], advantage: adv[i] })
            .collect();
        let obj = Objective { beta: g["beta"].as_f64().unwrap(), clip: g["clip"].as_f64().unwrap() };
        let e = obj.evaluate(&comps);
        close(e.loss, g["loss"].as_f64().unwrap(), "loss");
        close(e.kl, g["kl"].as_f64().unwrap(), "kl");
        close(e.clipped, g["clipped"].as_f64().unwrap(), "clipped fraction");
        for (i, (got, want)) in e.grad.iter().zip(ragged("grad")).enumerate() {
            for (t, (a, b)) in got.iter().zip(&want).enumerate() {
                close(*a, *b, &format!("d loss / d logp of completion {i}, token {t}"));
            }
        }
    }

    /// The gradient against central differences of the loss, on and off the clip.
    #[test]
    fn the_gradient_is_the_derivative_of_the_loss() {
        let obj = Objective { beta: 0.04, clip: 0.2 };
        let logp = [-1.0, -2.5, -0.3];
        let old = [-1.1, -2.0, -0.9];
        let reference = [-0.7, -2.6, -0.2];
        for advantage in [1.3, -0.8] {
            let eval = |lp: &[f64]| {
                obj.evaluate(&[Completion { logp: lp, old: &old, reference: &reference, advantage }])
            };
            let e = eval(&logp);
            for t in 0..3 {
                let h = 1e-6;
                let (mut up, mut down) = (logp, logp);
                up[t] += h;
                down[t] -= h;
                let numeric = (eval(&up).loss - eval(&down).loss) / (2.0 * h);
                assert!(
                    (numeric - e.grad[0][t]).abs() < 1e-6,
                    "A {advantage}, t {t}: {numeric} vs {}",
                    e.grad[0][t]
                );
            }
        }
    }
}
