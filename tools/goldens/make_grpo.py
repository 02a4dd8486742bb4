#!/usr/bin/env python3
"""Golden values of GRPO's equations, for `kiln grpo`'s objective (src/grpo/objective.rs).

Writes `tests/goldens/grpo/golden.json`: one batch of 8 completions in 2 groups of 4, with ragged
lengths, their rewards, and per token the log-probabilities under the current policy (`logp`), the
policy that sampled (`old`) and the reference model (`ref`); and what PyTorch computes from them:

- the group-relative advantages, `(r - mean) / (std + 1e-4)` with `torch.std` (unbiased), as TRL's
  GRPOTrainer normalises them;
- the k3 KL estimate per token, `exp(ref - logp) - (ref - logp) - 1`, and its mean (per completion
  over its tokens, then over completions);
- the loss of DeepSeekMath eq. 3, `1/G sum_i 1/|o_i| sum_t -(min(rho A, clip(rho, 1-eps, 1+eps) A)
  - beta KL_t)` with `rho = exp(logp - old)`, beta 0.04 and eps 0.2;
- its gradient with respect to every `logp`, by autograd.

`old` differs from `logp` so that the ratio is off 1 and the clip acts on some tokens (the script
checks that it does, on both signs of the advantage, and that no ratio sits within 1e-3 of a clip
edge, where the derivative is not defined). Everything is float64. Run by hand from the repository
root with a Python that has torch:

    python3 tools/goldens/make_grpo.py
"""

import json
from pathlib import Path

import torch

BETA, EPS, GROUP = 0.04, 0.2, 4


def main() -> None:
    g = torch.Generator().manual_seed(7)
    lengths = [3, 5, 2, 4, 6, 1, 3, 2]
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.1, 0.1, 0.0, 1.0, 1.0], dtype=torch.float64)
    logp = [-torch.rand(n, generator=g, dtype=torch.float64) * 3 for n in lengths]
    old = [lp + (torch.rand(n, generator=g, dtype=torch.float64) - 0.5) * 0.8 for lp, n in zip(logp, lengths)]
    ref = [lp + (torch.rand(n, generator=g, dtype=torch.float64) - 0.5) * 0.6 for lp, n in zip(logp, lengths)]

    grouped = rewards.view(-1, GROUP)
    mean = grouped.mean(dim=1).repeat_interleave(GROUP)
    std = grouped.std(dim=1).repeat_interleave(GROUP)
    adv = (rewards - mean) / (std + 1e-4)

    leaves = [lp.clone().requires_grad_(True) for lp in logp]
    seq_losses, seq_kls = [], []
    clipped = {1: 0, -1: 0}
    for i, lp in enumerate(leaves):
        rho = torch.exp(lp - old[i])
        assert bool(((rho - (1 + EPS)).abs() > 1e-3).all() and ((rho - (1 - EPS)).abs() > 1e-3).all())
        a = adv[i]
        unclipped = rho * a
        bounded = torch.clamp(rho, 1 - EPS, 1 + EPS) * a
        d = ref[i] - lp
        kl = torch.exp(d) - d - 1
        per_token = -(torch.min(unclipped, bounded) - BETA * kl)
        seq_losses.append(per_token.mean())
        seq_kls.append(kl.mean())
        sign = 1 if float(a) >= 0 else -1
        clipped[sign] += int((bounded < unclipped).sum())
    assert clipped[1] > 0 and clipped[-1] > 0, clipped
    loss = torch.stack(seq_losses).mean()
    loss.backward()
    golden = {
        "group": GROUP,
        "beta": BETA,
        "clip": EPS,
        "rewards": rewards.tolist(),
        "logp": [x.tolist() for x in logp],
        "old": [x.tolist() for x in old],
        "ref": [x.tolist() for x in ref],
        "advantages": adv.tolist(),
        "kl": float(torch.stack(seq_kls).mean().detach()),
        "clipped": (clipped[1] + clipped[-1]) / sum(lengths),
        "loss": float(loss.detach()),
        "grad": [x.grad.tolist() for x in leaves],
        "torch": torch.__version__,
    }
    out = Path("tests/goldens/grpo/golden.json")
    out.write_text(json.dumps(golden, indent=1) + "\n")
    print(f"wrote {out}: loss {golden['loss']:.6f}, kl {golden['kl']:.6f}, clipped tokens {clipped}")


if __name__ == "__main__":
    main()
