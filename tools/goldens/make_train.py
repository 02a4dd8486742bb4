#!/usr/bin/env python3
"""Golden training run from PyTorch and Hugging Face transformers for kiln's training parity test.

Writes `tests/goldens/train/` (see README.md next to this file):

- `tokens.safetensors`: the one fixed batch, tensor `tokens` (I64, [4, 33]): 4 rows of T + 1 = 33 ids
  in 0..512 from a seeded numpy generator; inputs are `tokens[:, :-1]`, targets `tokens[:, 1:]`.
- `grads0.safetensors`: the gradient of the step-0 loss with respect to every trainable parameter,
  before clipping, f32, under the Hugging Face checkpoint names (one tensor per routed expert, as in
  the exported `model.safetensors`).
- `final.safetensors`: every trainable parameter after the 30th optimizer step, f32, same names.
- `golden.json`: the spec, seeds, hyperparameters, the parameter list (and which tensors are buffers,
  not trained), per step the loss, the global gradient norm, the clip coefficient and the learning
  rate, routing margins, the sha256 of the exported model, the package versions, and notes on the
  exact semantics of the loss, the clipping and AdamW as torch implements them.

The model is models/tiny.toml with `--random-weights 3`, exported by `kiln export-hf` (the binary is
given with `--kiln`) and loaded with `AutoModelForCausalLM.from_pretrained` (DeepseekV3ForCausalLM):
exactly the weights kiln builds with `--random-weights 3`, so the initial weights are not written
here (the export's sha256 pins them). It is trained in `model.train()` mode for 30 steps on
the same batch with transformers' OWN loss, `model(input_ids=tokens, labels=tokens).loss` (the mean
next-token cross-entropy over the 4 * 32 targets; transformers shifts the labels itself),
`torch.nn.utils.clip_grad_norm_(params, 1.0)` and
`torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)` over every
parameter with requires_grad, so a consumer is checked against PyTorch's definitions, not against a
re-implementation of them.

The script is deterministic (fixed seeds, one CPU thread, deterministic algorithms, eager attention
and eager experts, f32) and is run by hand, never by `cargo test`. It refuses to write anything if a
self-check fails: the checkpoint loads with no missing key and no unexpected key outside the MTP
layer, and bit for bit; the routers' `e_score_correction_bias` is not all zero, and both it and the
group limit change some routing choices; there is no dropout
(train and eval mode give bit-identical losses and gradients); transformers' loss equals
F.cross_entropy on the shifted logits, and the step-0 gradients equal those of the unpadded [4, 32]
formulation; every parameter gets a gradient; the routers' choices are recomputed independently at
every step; a second training run from a fresh load reproduces every loss, norm and final weight bit
for bit; the loss decreases; a float64 numpy re-implementation of the clipping and of AdamW, written
from the formula in `golden.json`'s notes, reproduces torch's weights after step 1 from the written
`grads0.safetensors` and the exported initial weights to 1e-6 and within 2 ulp (which pins the order
of weight decay and update), and torch's weights after every one of the 30 steps from torch's own
gradients to 1e-6; the written files are read back.

Two measurements go into golden.json for choosing a consumer's tolerance: the same training in float64
(how far rounding alone moves the losses and weights, and whether any routing choice flips), and five
wrong conventions (no clipping, clipping without the clamp, no weight decay on the norms, Adam with L2,
the summed loss), each trained for 30 steps; each must move the final weights by more than 100 times the
float64 run's difference, or nothing is written.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from safetensors import safe_open
from safetensors.torch import save_file
from torch.optim.optimizer import _default_to_fused_or_foreach
from transformers import AutoModelForCausalLM

REPO = Path(__file__).resolve().parents[2]

SPEC = "models/tiny.toml"
WEIGHTS_SEED = 3
# The numpy generator's seed for the batch.
TOKEN_SEED = 2028
N_ROWS = 4
WIDTH = 33  # T + 1
VOCAB = 512

STEPS = 30
LR = 1e-3
BETAS = (0.9, 0.95)
EPS = 1e-8
WEIGHT_DECAY = 0.1
MAX_NORM = 1.0
# torch.nn.utils.clip_grad_norm_'s guard in clip_coef = max_norm / (total_norm + 1e-6).
CLIP_GUARD = 1e-6

# Tolerances of the float64 re-implementation of AdamW against torch's f32 weights: absolute, and, for
# step 1 from the written files, in units in the last place of the f32 result (plus a floor for
# weights near 0). torch rounds twice, after the decay and after the update (at most half an ulp each,
# the first possibly in the binade above), so an exact formula is within 1.5 ulp; 2 ulp is tight
# enough to pin the order of weight decay and update, which moves a weight by lr * wd * update = 1e-7.
ADAMW_TOL = 1e-6
ADAMW_ULPS = 2
ADAMW_FLOOR = 1e-9

# The packages whose versions decide the numbers; recorded in golden.json.
PACKAGES = ["torch", "transformers", "safetensors", "numpy", "huggingface_hub"]

FUSED = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$")


def versions() -> dict:
    out = {p: importlib.metadata.version(p) for p in PACKAGES}
    out["python"] = platform.python_version()
    return out


def check(cond: bool, what: str) -> None:
    """A self-check; any failure aborts the run before anything is written to the repository."""
    if not cond:
        raise SystemExit(f"self-check failed: {what}")


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, allow_nan=False) + "\n")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def export(kiln: Path, folder: Path) -> str:
    """Exports the spec's random weights as a Hugging Face folder; returns `kiln --version`."""
    version = subprocess.run([kiln, "--version"], check=True, capture_output=True, text=True).stdout.strip()
    subprocess.run(
        [kiln, "export-hf", REPO / SPEC, "--random-weights", str(WEIGHTS_SEED), "-o", folder],
        check=True,
        capture_output=True,
        text=True,
    )
    return version


def hub_tensors(name: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
    """A transformers parameter under the checkpoint's names: the fused experts split per expert.

    transformers 5 holds the routed experts fused, `experts.gate_up_proj` [E, 2I, H] (gate rows first,
    then up) and `experts.down_proj` [E, H, I]; the checkpoint has `experts.{e}.{gate,up,down}_proj.weight`.
    """
    m = FUSED.match(name)
    if not m:
        return {name: t.detach().contiguous()}
    prefix, kind = m.groups()
    out = {}
    for e in range(t.shape[0]):
        if kind == "gate_up_proj":
            gate, up = t[e].detach().chunk(2, dim=0)
            out[f"{prefix}.{e}.gate_proj.weight"] = gate.contiguous()
            out[f"{prefix}.{e}.up_proj.weight"] = up.contiguous()
        else:
            out[f"{prefix}.{e}.down_proj.weight"] = t[e].detach().contiguous()
    return out


def hub_dict(pairs) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, t in pairs:
        out.update(hub_tensors(name, t))
    return out


def load(folder: Path, mtp_layer: int):
    """The exported model, checked to hold exactly the file's weights; returns it and the tensors compared."""
    model, info = AutoModelForCausalLM.from_pretrained(
        folder,
        attn_implementation="eager",
        experts_implementation="eager",
        dtype=torch.float32,
        output_loading_info=True,
    )
    check(type(model).__name__ == "DeepseekV3ForCausalLM", f"the export loads as DeepseekV3ForCausalLM ({type(model)})")
    check(not info["missing_keys"], f"no weight is missing (randomly initialised): {info['missing_keys']}")
    check(not info["mismatched_keys"] and not info["error_msgs"], f"clean load: {info}")
    # The MTP module (layer num_hidden_layers) is not part of DeepseekV3ForCausalLM's forward pass.
    stray = [k for k in info["unexpected_keys"] if not k.startswith(f"model.layers.{mtp_layer}.")]
    check(not stray, f"every unexpected key is the MTP layer's: {stray}")
    check(bool(info["unexpected_keys"]), "the export holds an MTP layer that transformers leaves unused")

    compared = 0
    with safe_open(folder / "model.safetensors", "pt") as f:
        names = set(f.keys())
        for name, t in model.state_dict().items():
            if name.endswith(("rotary_emb.inv_freq", "rotary_emb.original_inv_freq")):
                continue  # computed from the config, not stored
            for hub, want in hub_tensors(name, t).items():
                check(hub in names, f"{hub} is stored")
                check(bits_equal(want, f.get_tensor(hub)), f"{hub} loads bit for bit")
                compared += 1
    return model, compared


def routers(model) -> list:
    return [(n, m) for n, m in model.named_modules() if type(m).__name__ == "DeepseekV3TopkRouter"]


class RouterProbe:
    """Captures every router's input and choices, recomputes the choices independently and measures the
    margins at the selection boundary (how far the routing is from flipping)."""

    def __init__(self, model, rows: int, width: int):
        self.rows, self.width = rows, width
        self.seen: dict[str, tuple] = {}
        self.handles = []
        for name, m in routers(model):
            self.handles.append(m.register_forward_hook(self._hook(name)))

    def _hook(self, name):
        def hook(module, args, output):
            self.seen[name] = (module, args[0].detach().clone(), output[2].detach().clone())

        return hook

    def choices(self) -> dict[str, torch.Tensor]:
        """Each router's chosen experts (sorted) at the positions with a target, [4 * 32, k]."""
        out = {}
        for name, (m, _, indices) in self.seen.items():
            out[name] = indices.reshape(self.rows, self.width, -1)[:, : self.width - 1].reshape(-1, m.top_k).sort(-1)[0]
        return out

    def margins(self) -> dict:
        out = {}
        with torch.no_grad():
            for name, (m, x, indices) in self.seen.items():
                x = x.reshape(-1, m.hidden_dim).float()
                scores = F.linear(x, m.weight.float()).sigmoid()
                choice = scores + m.e_score_correction_bias
                e_per_g = m.num_experts // m.num_group
                grouped = choice.view(-1, m.num_group, e_per_g)
                group_scores = grouped.topk(2, dim=-1)[0].sum(-1)
                gsorted = group_scores.sort(-1, descending=True)[0]
                top_groups = group_scores.topk(m.topk_group, dim=-1)[1]
                allowed = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, top_groups, True)
                allowed = allowed.unsqueeze(-1).expand(-1, -1, e_per_g).reshape(-1, m.num_experts)
                masked = choice.masked_fill(~allowed, float("-inf"))
                esorted = masked.sort(-1, descending=True)[0]
                mine = masked.topk(m.top_k, dim=-1)[1].sort(-1)[0]
                check(torch.equal(mine, indices.sort(-1)[0]), f"{name}: the router's choices are recomputed")
                # What the correction bias and the group limit each decide: the choices without either.
                unbiased_groups = scores.view(-1, m.num_group, e_per_g).topk(2, dim=-1)[0].sum(-1)
                unbiased = unbiased_groups.topk(m.topk_group, dim=-1)[1]
                unbiased = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, unbiased, True)
                unbiased = unbiased.unsqueeze(-1).expand(-1, -1, e_per_g).reshape(-1, m.num_experts)
                no_bias = scores.masked_fill(~unbiased, float("-inf")).topk(m.top_k, dim=-1)[1].sort(-1)[0]
                no_group = choice.topk(m.top_k, dim=-1)[1].sort(-1)[0]
                # Only the positions whose outputs reach a loss term (the last column has no target).
                keep = torch.zeros(self.rows, self.width, dtype=torch.bool)
                keep[:, : self.width - 1] = True
                keep = keep.reshape(-1)
                ggap = (gsorted[:, m.topk_group - 1] - gsorted[:, m.topk_group])[keep]
                egap = (esorted[:, m.top_k - 1] - esorted[:, m.top_k])[keep]
                out[name.removesuffix(".gate")] = {
                    "bias_changes": int((no_bias != mine).any(-1)[keep].sum()),
                    "group_limit_changes": int((no_group != mine).any(-1)[keep].sum()),
                    "group_gap_min": ggap.min().item(),
                    "expert_gap_min": egap.min().item(),
                    "experts_used": int(torch.unique(indices.reshape(self.rows, self.width, -1)[:, :-1]).numel()),
                }
        return out

    def remove(self):
        for h in self.handles:
            h.remove()


def clip_np(grads: dict[str, np.ndarray]) -> tuple[float, float]:
    """torch's clip_grad_norm_ in float64: the global 2-norm and the clamped coefficient."""
    total = float(np.sqrt(sum(float(np.sum(g * g)) for g in grads.values())))
    return total, min(MAX_NORM / (total + CLIP_GUARD), 1.0)


def f32(x: float) -> float:
    """A Python-double scalar as an f32 tensor op uses it."""
    return float(np.float32(x))


def adamw_np(p, g, m, v, t: int):
    """One AdamW step in float64, following the AdamW note written to golden.json (torch's
    _single_tensor_adam with decoupled weight decay), scalars rounded to f32 as torch's f32 ops round
    them; g is the clipped gradient; returns the new p, m, v."""
    b1, b2 = BETAS
    p = p * f32(1 - LR * WEIGHT_DECAY)
    m = m + f32(1 - b1) * (g - m)
    v = v * f32(b2) + f32(1 - b2) * g * g
    bc1 = 1 - b1**t
    bc2 = 1 - b2**t
    step_size = LR / bc1
    denom = np.sqrt(v) / f32(bc2**0.5) + f32(EPS)
    p = p + f32(-step_size) * m / denom
    return p, m, v


# Conventions a consumer could get wrong; each is trained for the same 30 steps to show that the golden
# tells it apart (see `conventions`).
VARIANTS = {
    "no_clipping": "no gradient clipping",
    "clip_always_to_max_norm": "gradients always scaled by max_norm / (total_norm + 1e-6), also when that is above 1",
    "no_weight_decay_on_1d": "weight decay only on matrices (the nanoGPT grouping), not on the RMSNorm gains",
    "adam_l2": "torch.optim.Adam with weight_decay 0.1: L2 added to the gradient instead of decoupled decay",
    "loss_sum": "the summed loss instead of the mean: every step is then clipped to norm 1, which here gives "
    "clip_always_to_max_norm's trajectory up to rounding",
}


# Relative sizes and torch seeds of the perturbations of the initial weights (see `sensitivity`).
PERTURBATIONS = [(1e-6, 0), (1e-6, 1), (1e-6, 2), (1e-5, 0), (1e-5, 1), (1e-5, 2)]


def train(
    folder: Path,
    config: dict,
    tokens: torch.Tensor,
    probe: bool,
    dtype=torch.float32,
    variant: str | None = None,
    perturb: tuple[float, int] | None = None,
) -> dict:
    """Loads the export and trains it; with `probe`, also runs every per-step self-check. The other
    arguments are measurements, never the golden: with float64 the loaded model is converted; `perturb`
    = (rel, seed) multiplies every initial weight by 1 + rel * N(0, 1); a `variant` trains with one of
    VARIANTS' wrong conventions."""
    model, compared = load(folder, config["num_hidden_layers"])
    model.to(dtype)
    if perturb is not None:
        check(not probe, "a perturbed run is not the golden")
        gen = torch.Generator().manual_seed(perturb[1])
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1 + perturb[0] * torch.randn(p.shape, generator=gen))
    buffers0 = {n: b.clone() for n, b in model.named_buffers()}
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    model.train()

    if variant is not None:
        check(variant in VARIANTS and not probe, f"variant {variant}")
        if variant == "adam_l2":
            opt = torch.optim.Adam(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)
        elif variant == "no_weight_decay_on_1d":
            groups = [
                {"params": [p for p in params if p.dim() >= 2], "weight_decay": WEIGHT_DECAY},
                {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
            ]
            opt = torch.optim.AdamW(groups, lr=LR, betas=BETAS, eps=EPS)
        else:
            opt = torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)
        return train_variant(model, named, params, opt, tokens, variant)
    opt = torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)
    group = opt.param_groups[0]
    # Which implementation step() will run: neither foreach nor fused is asked for, so torch picks by
    # device; on the CPU that is the single-tensor loop, _single_tensor_adam, whose formula is documented.
    fused, foreach = _default_to_fused_or_foreach(params, False, use_fused=False)
    check(
        group["foreach"] is None and group["fused"] is None and not fused and not foreach,
        "AdamW runs _single_tensor_adam",
    )
    check(group["decoupled_weight_decay"] and not group["amsgrad"] and not group["maximize"], "plain AdamW")
    check(not group["capturable"] and not group["differentiable"], "AdamW's non-capturable path")

    rec = {"model": model, "named": named, "compared": compared, "steps": [], "buffers0": buffers0}
    rp = RouterProbe(model, N_ROWS, WIDTH)
    rec["choices"] = []
    m64 = v64 = None
    worst_all_steps = 0.0
    for step in range(STEPS):
        opt.zero_grad(set_to_none=True)
        out = model(input_ids=tokens, labels=tokens)
        loss = out.loss
        if probe and step == 0:
            logits = out.logits[:, :-1, :]
            targets = tokens[:, 1:]
            ce = F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))
            rel = abs(ce.item() - loss.item()) / loss.item()
            check(rel <= 1e-6, f"transformers' loss is the shifted cross entropy ({ce.item()}, {loss.item()})")
            rec["loss_vs_cross_entropy_relative_diff"] = rel
        loss.backward()
        missing = [n for n, p in named if p.grad is None]
        check(not missing, f"every parameter gets a gradient: {missing}")
        rstep = {"step": step, "loss": loss.item()}
        rec["choices"].append(rp.choices())
        if probe:
            raw = {n: p.grad.detach().clone() for n, p in named}
            rstep["routing"] = rp.margins()
            if step == 0:
                rec["grads0"] = raw
        norm = torch.nn.utils.clip_grad_norm_(params, MAX_NORM)
        rstep["grad_norm"] = norm.item()
        rstep["clip_coef"] = torch.clamp(MAX_NORM / (norm + CLIP_GUARD), max=1.0).item()
        rstep["lr"] = group["lr"]
        if probe:
            before = {n: p.detach().clone() for n, p in named}
            clipped = {n: p.grad.detach().clone() for n, p in named}
            g64 = {n: raw[n].double().numpy() for n, _ in named}
            total, coef = clip_np(g64)
            check(
                abs(total - rstep["grad_norm"]) <= 1e-5 * total,
                f"step {step}: the grad norm in float64 ({total} vs {rstep['grad_norm']})",
            )
            for n, _ in named:
                d = (clipped[n].double() - raw[n].double() * coef).abs().max().item()
                check(d <= 1e-6 * max(1.0, raw[n].abs().max().item()), f"step {step}: {n} is clipped by {coef} ({d})")
        opt.step()
        if probe:
            # Every step of torch's AdamW against the float64 formula, from torch's own clipped gradients and
            # weights before the step; the moments are carried in float64.
            if m64 is None:
                m64 = {n: np.zeros(p.shape) for n, p in named}
                v64 = {n: np.zeros(p.shape) for n, p in named}
            worst = 0.0
            for n, p in named:
                p0, g = before[n].double().numpy(), clipped[n].double().numpy()
                new, m64[n], v64[n] = adamw_np(p0, g, m64[n], v64[n], step + 1)
                worst = max(worst, float(np.abs(new - p.detach().double().numpy()).max()))
            check(worst <= ADAMW_TOL, f"step {step}: float64 AdamW reproduces torch's weights ({worst})")
            worst_all_steps = max(worst_all_steps, worst)
            rstep["adamw_float64_max_abs_diff"] = worst
            if step == 0:
                rec["params1"] = {n: p.detach().clone() for n, p in named}
                check(all(int(opt.state[p]["step"].item()) == 1 for p in params), "the step counter is 1")
        rec["steps"].append(rstep)
    rp.remove()
    if probe:
        rec["adamw_all_steps_max_abs_diff"] = worst_all_steps
    for n, b in model.named_buffers():
        check(bits_equal(b, buffers0[n].to(b.dtype)), f"buffer {n} is unchanged by training")
    rec["final"] = {n: p.detach().clone() for n, p in named}
    return rec


def train_variant(model, named, params, opt, tokens: torch.Tensor, variant: str) -> dict:
    """The training loop with one wrong convention; returns the losses and final weights."""
    losses = []
    for _ in range(STEPS):
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=tokens, labels=tokens).loss
        losses.append(loss.item())
        if variant == "loss_sum":
            loss = loss * tokens[:, 1:].numel()
        loss.backward()
        if variant == "clip_always_to_max_norm":
            with torch.no_grad():
                norm = torch.nn.utils.get_total_norm([p.grad for p in params])
                for p in params:
                    p.grad.mul_(MAX_NORM / (norm + CLIP_GUARD))
        elif variant != "no_clipping":
            torch.nn.utils.clip_grad_norm_(params, MAX_NORM)
        opt.step()
    return {"losses": losses, "final": {n: p.detach().clone() for n, p in named}}


def conventions(folder: Path, config: dict, tokens: torch.Tensor, golden: dict, tolerance: float) -> dict:
    """How far each wrong convention moves the trajectory; each must move it well beyond rounding."""
    out = {}
    golden_losses = [s["loss"] for s in golden["steps"]]
    for variant, what in VARIANTS.items():
        r = train(folder, config, tokens, probe=False, variant=variant)
        loss_diff = max(abs(a - b) for a, b in zip(golden_losses, r["losses"]))
        final = golden["final"]
        weight_diff = max((final[n] - r["final"][n]).abs().max().item() for n in final)
        relative = max(((final[n] - r["final"][n]).norm() / final[n].norm()).item() for n in final)
        check(
            weight_diff > 100 * tolerance,
            f"{variant} moves the final weights by more than 100x the float64 run's difference ({weight_diff})",
        )
        out[variant] = {
            "what": what,
            "loss_max_abs_diff": loss_diff,
            "final_weight_max_abs_diff": weight_diff,
            "final_tensor_max_relative_diff": relative,
        }
    return out


def compare(golden: dict, run: dict) -> dict:
    """How far another run's trajectory is from the golden's."""
    loss_diff = [abs(a["loss"] - b["loss"]) for a, b in zip(golden["steps"], run["steps"])]
    norm_diff = [abs(a["grad_norm"] - b["grad_norm"]) for a, b in zip(golden["steps"], run["steps"])]
    flips = [sum(int((a[n] != b[n]).any(-1).sum()) for n in a) for a, b in zip(golden["choices"], run["choices"])]
    final = golden["final"]
    return {
        "loss_abs_diff_max": max(loss_diff),
        "loss_abs_diff_step29": loss_diff[-1],
        "grad_norm_abs_diff_max": max(norm_diff),
        "final_weight_max_abs_diff": max((final[n].double() - run["final"][n]).abs().max().item() for n in final),
        "final_tensor_max_relative_diff": max(
            ((final[n].double() - run["final"][n]).norm() / final[n].double().norm()).item() for n in final
        ),
        "routing_differences": sum(flips),
        "first_routing_difference_step": next((i for i, f in enumerate(flips) if f), None),
        "loss_abs_diff_per_step": loss_diff,
    }


def sensitivity(folder: Path, config: dict, tokens: torch.Tensor, golden: dict) -> dict:
    """How far rounding-sized changes move the trajectory: the same training in float64, and in f32 from
    initial weights perturbed by a relative 1e-6 and 1e-5.

    Not a self-check: it tells a consumer which tolerance a correct f32 implementation, rounding
    differently from torch, can be held to. transformers computes the router's logits and the loss
    (ForCausalLMLoss calls logits.float()) in f32 even in the float64 run.
    """
    f64 = compare(golden, train(folder, config, tokens, probe=False, dtype=torch.float64))
    perturbed = {}
    for rel, seed in PERTURBATIONS:
        r = compare(golden, train(folder, config, tokens, probe=False, perturb=(rel, seed)))
        r.pop("loss_abs_diff_per_step")
        perturbed[f"rel {rel:g} seed {seed}"] = r
    return {
        "float64": f64,
        "perturbed": perturbed,
        "note": "float64: the same 30 steps with the model and optimizer in float64 (transformers still "
        "computes the router logits and the loss in f32). perturbed: f32 from the initial weights times "
        "1 + rel * N(0, 1) (torch.Generator seeded). "
        "Per run: the largest |loss difference| over the steps and at step 29, the largest |grad_norm| "
        "difference, the largest final weight difference, the largest per-tensor ||difference|| / ||weight||, "
        "and how many (step, position, MoE layer) triples chose a different expert set than the golden (out "
        "of 30 * 128 * 3). Once a routing choice differs the runs part: the differences then reach the size "
        "of the wrong conventions' in the final weights, but not in the losses.",
    }


def alternative_checks(folder: Path, config: dict, tokens: torch.Tensor, grads0: dict, loss0: float) -> dict:
    """The step-0 loss and gradients in eval mode (no dropout anywhere) and in the unpadded [4, 32] form."""
    model, _ = load(folder, config["num_hidden_layers"])
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    out = {}

    model.eval()
    loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    check(loss.item() == loss0, f"eval mode gives the train-mode loss bit for bit ({loss.item()} vs {loss0})")
    check(all(bits_equal(p.grad, grads0[n]) for n, p in named), "eval mode gives the train-mode gradients bit for bit")
    out["train_vs_eval_mode"] = "bit-identical loss and gradients at step 0 (attention_dropout 0, no nn.Dropout)"

    model.zero_grad(set_to_none=True)
    model.train()
    logits = model(input_ids=tokens[:, :-1]).logits
    loss32 = F.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
    loss32.backward()
    ldiff = abs(loss32.item() - loss0)
    check(ldiff <= 1e-6 * loss0, f"the [4, 32] loss equals transformers' ({ldiff})")
    worst = 0.0
    for n, p in named:
        scale = grads0[n].abs().max().item()
        d = (p.grad - grads0[n]).abs().max().item()
        check(d <= 1e-5 * max(scale, 1e-6), f"{n}: the [4, 32] gradient equals transformers' ({d} vs max {scale})")
        worst = max(worst, d)
    out["unpadded_loss_abs_diff"] = ldiff
    out["unpadded_grad_max_abs_diff"] = worst
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kiln", type=Path, required=True, help="the kiln binary whose export-hf writes the model")
    ap.add_argument(
        "--out",
        type=Path,
        default=REPO / "tests" / "goldens" / "train",
        help="output folder (default: %(default)s)",
    )
    args = ap.parse_args()

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    transformers.logging.set_verbosity_error()
    print(f"versions {versions()}")

    tokens_np = np.random.default_rng(TOKEN_SEED).integers(0, VOCAB, size=(N_ROWS, WIDTH), dtype=np.int64)
    tokens = torch.from_numpy(tokens_np)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        hf = tmp / "hf"
        kiln_version = export(args.kiln.resolve(), hf)
        config = json.loads((hf / "config.json").read_text())
        check(config["vocab_size"] == VOCAB, "the spec's vocabulary is 512")
        check(config["attention_dropout"] == 0.0, "attention_dropout is 0")
        mtp_layer = config["num_hidden_layers"]

        # The correction bias must be live, or the test could not tell a consumer that ignores it.
        bias = {}
        with safe_open(hf / "model.safetensors", "pt") as f:
            for k in sorted(f.keys()):
                if k.endswith("e_score_correction_bias"):
                    b = f.get_tensor(k)
                    check(bool((b != 0).any()), f"{k} is not all zero")
                    bias[k] = {"std": b.std().item(), "min": b.min().item(), "max": b.max().item()}
            mtp_names = sorted(k for k in f.keys() if k.startswith(f"model.layers.{mtp_layer}."))
        check(len([k for k in bias if not k.startswith(f"model.layers.{mtp_layer}.")]) == 3, "three MoE routers")

        first = train(hf, config, tokens, probe=True)
        second = train(hf, config, tokens, probe=False)
        model, named = first["model"], first["named"]

        # Deterministic: a fresh load trains to the same numbers, bit for bit.
        for a, b in zip(first["steps"], second["steps"]):
            for key in ("loss", "grad_norm", "clip_coef", "lr"):
                check(a[key] == b[key], f"step {a['step']}: {key} is reproduced ({a[key]} vs {b[key]})")
        check(all(bits_equal(first["final"][n], second["final"][n]) for n, _ in named), "final weights are reproduced")

        losses = [s["loss"] for s in first["steps"]]
        r0 = first["steps"][0]["routing"].values()
        check(sum(r["bias_changes"] for r in r0) > 0, "the correction bias changes some choices at step 0")
        check(sum(r["group_limit_changes"] for r in r0) > 0, "the group limit changes some choices at step 0")
        norms = [s["grad_norm"] for s in first["steps"]]
        check(losses[-1] < losses[0] - 0.1, f"the loss decreases ({losses[0]} -> {losses[-1]})")
        check(min(losses[5:]) < losses[0] and losses[1] < losses[0], "the loss decreases from the first step")

        # Buffers: in the model, not in model.parameters(), never updated.
        param_names = {n for n, _ in model.named_parameters()}
        buffers = [n for n, _ in model.named_buffers()]
        check(not any("e_score_correction_bias" in n for n in param_names), "the correction bias is not a parameter")
        check(
            sum("e_score_correction_bias" in n for n in buffers) == 3,
            "the correction bias is a buffer in each MoE layer",
        )
        check(all(p.requires_grad for p in model.parameters()), "every parameter is trainable")

        alt = alternative_checks(hf, config, tokens, first["grads0"], losses[0])
        sens = sensitivity(hf, config, tokens, first)
        f64 = sens["float64"]
        check(f64["loss_abs_diff_max"] < 1e-4, f"the float64 run stays near the golden ({f64['loss_abs_diff_max']})")
        conv = conventions(hf, config, tokens, first, f64["final_weight_max_abs_diff"])
        # The losses tell every wrong convention from a run whose routing flipped somewhere.
        flipped = max(r["loss_abs_diff_max"] for r in sens["perturbed"].values())
        wrong = min(c["loss_max_abs_diff"] for c in conv.values())
        check(wrong > 2 * flipped, f"the losses separate the wrong conventions ({wrong}) from rounding ({flipped})")

        grads0 = hub_dict(first["grads0"].items())
        final = hub_dict(first["final"].items())
        params1 = hub_dict(first["params1"].items())
        check(set(grads0) == set(final), "grads0 and final name the same tensors")
        zero_grad_experts = sorted(n for n, g in grads0.items() if ".experts." in n and not bool(g.any()))

        out = tmp / "out"
        out.mkdir()
        # One metadata key only: several would be written in hash order, so bytes would vary by run.
        save_file({"tokens": tokens}, out / "tokens.safetensors", metadata={"format": "pt"})
        save_file(grads0, out / "grads0.safetensors", metadata={"format": "pt"})
        save_file(final, out / "final.safetensors", metadata={"format": "pt"})

        # Read the files back as a consumer would, and replay step 1 in float64 from them and the export.
        with safe_open(out / "tokens.safetensors", "pt") as f:
            check(f.get_tensor("tokens").dtype == torch.int64, "tokens are I64")
            check(np.array_equal(f.get_tensor("tokens").numpy(), tokens_np), "tokens.safetensors reads back")
        with safe_open(out / "final.safetensors", "pt") as f:
            check(all(bits_equal(f.get_tensor(n), t) for n, t in final.items()), "final.safetensors reads back")
        with safe_open(out / "grads0.safetensors", "pt") as f, safe_open(hf / "model.safetensors", "pt") as w:
            g = {n: f.get_tensor(n).double().numpy() for n in f.keys()}
            check(set(g) == set(grads0) and all(f.get_tensor(n).dtype == torch.float32 for n in f.keys()), "grads0 f32")
            total, coef = clip_np(g)
            check(abs(total - norms[0]) <= 1e-5 * total, f"the step-0 norm from grads0 ({total}, {norms[0]})")
            step1_worst = 0.0
            step1_ulps = 0.0
            moved = 0.0
            for n in g:
                p0 = w.get_tensor(n).double().numpy()
                p1, _, _ = adamw_np(p0, g[n] * coef, np.zeros_like(p0), np.zeros_like(p0), 1)
                got = params1[n].numpy()
                err = np.abs(p1 - got.astype(np.float64))
                step1_worst = max(step1_worst, float(err.max()))
                ulp = np.spacing(np.abs(got)).astype(np.float64)
                check(
                    bool((err <= ADAMW_ULPS * ulp + ADAMW_FLOOR).all()),
                    f"{n}: float64 AdamW is within {ADAMW_ULPS} ulp of torch's step 1",
                )
                step1_ulps = max(step1_ulps, float((err / np.maximum(ulp, ADAMW_FLOOR)).max()))
                moved = max(moved, float(np.abs(p0 - params1[n].double().numpy()).max()))
            check(step1_worst <= ADAMW_TOL, f"float64 AdamW from the saved files reproduces step 1 ({step1_worst})")
        # The update at step 1 is about lr per weight: the check above could not pass with the weights unchanged.
        check(moved > 100 * ADAMW_TOL, f"step 1 moves the weights ({moved})")

        routing_min = {
            "group_gap_min": min(r["group_gap_min"] for s in first["steps"] for r in s["routing"].values()),
            "expert_gap_min": min(r["expert_gap_min"] for s in first["steps"] for r in s["routing"].values()),
        }

        meta = {
            "generated_by": "tools/goldens/make_train.py",
            "versions": versions(),
            "torch_threads": torch.get_num_threads(),
            "deterministic_algorithms": True,
            "attn_implementation": "eager",
            "experts_implementation": "eager",
            "dtype": "float32",
            "device": "cpu",
            "model": {
                "spec": SPEC,
                "random_weights": WEIGHTS_SEED,
                "exported_by": f"{kiln_version}: kiln export-hf {SPEC} --random-weights {WEIGHTS_SEED}",
                "loaded_by": "AutoModelForCausalLM.from_pretrained (DeepseekV3ForCausalLM), then model.train()",
                "model_safetensors_sha256": sha256(hf / "model.safetensors"),
                "config_json_sha256": sha256(hf / "config.json"),
                "weights_compared_bit_for_bit": first["compared"],
                "weights_compared_note": "198 parameter tensors under checkpoint names and the 3 correction biases",
                "initial_weights": "the export itself (model.safetensors above); not copied here",
                "mtp": {
                    "in_export": f"model.layers.{mtp_layer}.* ({len(mtp_names)} tensors)",
                    "note": "the export holds the spec's MTP module as layer 4; DeepseekV3ForCausalLM has no MTP "
                    "in its forward pass and does not load it (the only unexpected keys), so it is neither in "
                    "the loss nor among the trained parameters. A consumer must train the main model only: no "
                    "MTP loss term, and the MTP tensors not handed to the optimizer (AdamW's weight decay "
                    "would move them even with zero gradient).",
                },
                "e_score_correction_bias": {
                    "kind": "buffer",
                    "detail": "transformers 5.24's DeepseekV3TopkRouter holds it as nn.Buffer, not nn.Parameter: "
                    "not in model.parameters(), no gradient, not seen by the optimizer, and unchanged by "
                    "training (checked bit for bit after 30 steps). It only shifts the selection scores; the "
                    "gate weights use the unbiased sigmoid scores. DeepSeek-V3's own bias update (aux-loss-free "
                    "balancing) is not implemented by transformers and is not part of this golden.",
                    "values": bias,
                    "values_note": "per router in the export; layer 4 is the MTP module's, unused here",
                },
            },
            "token_seed": TOKEN_SEED,
            "token_rng": "numpy.random.default_rng(token_seed).integers(0, 512, (4, 33), dtype=int64)",
            "batch": {
                "file": "tokens.safetensors",
                "tensor": "tokens",
                "dtype": "I64",
                "shape": [N_ROWS, WIDTH],
                "inputs": "tokens[:, :-1] ([4, 32])",
                "targets": "tokens[:, 1:] ([4, 32]); 128 targets per step, the same batch every step",
            },
            "loss": {
                "definition": "transformers' own model(input_ids=tokens, labels=tokens).loss on the [4, 33] "
                "rows: ForCausalLMLoss pads the labels with -100 on the right and shifts them, so the last "
                "position has no target; the loss is F.cross_entropy(logits[:, :-1], tokens[:, 1:]) with "
                "reduction mean over all 128 targets (natural log). Checked against F.cross_entropy on the "
                "shifted logits at step 0 (within 1e-6 relative; checks.loss_vs_cross_entropy_relative_diff).",
                "unpadded_equivalent": "running the model on tokens[:, :-1] only and taking the same cross "
                "entropy gives the same loss and step-0 gradients up to rounding (attention is causal, the "
                "routing has no capacity limit, so the 33rd position changes no other position)",
                "unpadded_loss_abs_diff": alt["unpadded_loss_abs_diff"],
                "unpadded_grad_max_abs_diff": alt["unpadded_grad_max_abs_diff"],
                "no_auxiliary_loss": "transformers' DeepseekV3 adds no router auxiliary loss (aux_loss_alpha "
                "and seq_aux in the config are unused)",
            },
            "optimizer": {
                "class": "torch.optim.AdamW",
                "lr": LR,
                "betas": list(BETAS),
                "eps": EPS,
                "weight_decay": WEIGHT_DECAY,
                "amsgrad": False,
                "maximize": False,
                "implementation": "_single_tensor_adam (torch/optim/adam.py): foreach and fused unset, and "
                "torch picks neither for CPU tensors; capturable False, differentiable False",
                "schedule": "constant lr, no warmup, one parameter group holding every parameter",
                "weight_decay_applies_to": "every parameter, including the RMSNorm gains, the embedding, "
                "lm_head and the router weights (one group, no exclusions)",
            },
            "clipping": {
                "call": f"torch.nn.utils.clip_grad_norm_(params, {MAX_NORM}) after backward, before "
                "optimizer.step(), every step",
                "max_norm": MAX_NORM,
                "norm_type": 2.0,
            },
            "steps": STEPS,
            "losses": losses,
            "grad_norms": norms,
            "per_step": [
                {k: s[k] for k in ("step", "loss", "grad_norm", "clip_coef", "lr", "adamw_float64_max_abs_diff")}
                for s in first["steps"]
            ],
            "parameters": {
                "count": len(named),
                "elements": sum(p.numel() for _, p in named),
                "order": "model.named_parameters() order, which is the optimizer's order and the order of the "
                "per-tensor norms clip_grad_norm_ combines",
                "list": [{"name": n, "shape": list(p.shape), "numel": p.numel()} for n, p in named],
                "checkpoint_tensors": len(final),
                "fused_experts": "transformers' experts.gate_up_proj [16, 64, 64] and experts.down_proj "
                "[16, 64, 32] are written per expert under the checkpoint names: "
                "experts.{e}.gate_proj.weight = gate_up_proj[e, :32], experts.{e}.up_proj.weight = "
                "gate_up_proj[e, 32:], experts.{e}.down_proj.weight = down_proj[e]",
            },
            "buffers": {
                "list": buffers,
                "note": "not trained; the rotary frequencies are computed from the config and are not in the "
                "export, the correction biases are the export's",
            },
            "routing": {
                "per_step": [{"step": s["step"], **s["routing"]} for s in first["steps"]],
                "min_over_steps": routing_min,
                "note": "bias_changes / group_limit_changes: how many of the 128 positions with a target would "
                "choose another expert set with the correction bias zeroed / without the group limit (so a "
                "consumer that drops either is caught). Margins at the selection boundary over the same "
                "positions, in f32 as "
                "transformers computes them: group_gap = 2nd minus 3rd largest group score (sum of the "
                "group's top-2 biased scores), expert_gap = 4th minus 5th largest biased score among the "
                "allowed groups. A consumer whose scores differ by more than these gaps may route a token "
                "differently and leave the golden's trajectory.",
                "experts_with_zero_step0_gradient": zero_grad_experts,
            },
            "checks": {
                "deterministic": "a second run from a fresh load reproduced every loss, grad norm and final weight "
                "bit for bit",
                "loss_decreases": f"{losses[0]} -> {losses[-1]}",
                "adamw_float64_step1_from_files_max_abs_diff": step1_worst,
                "adamw_float64_step1_from_files_max_ulps": step1_ulps,
                "adamw_step1_ulp_check": f"every weight within {ADAMW_ULPS} ulp of torch's f32 result (plus "
                f"{ADAMW_FLOOR} for weights near 0): tight enough to tell decay-then-update from update-then-decay "
                "(which differ by lr * wd * update, about 1e-7)",
                "adamw_float64_all_steps_max_abs_diff": first["adamw_all_steps_max_abs_diff"],
                "train_vs_eval_mode": alt["train_vs_eval_mode"],
                "loss_vs_cross_entropy_relative_diff": first["loss_vs_cross_entropy_relative_diff"],
            },
            "sensitivity": sens,
            "conventions": {
                **conv,
                "note": "each wrong convention trained for the same 30 steps: the largest loss difference over "
                "the steps and the largest final weight difference against the golden; each must exceed 100 "
                "times the float64 run's final weight difference (sensitivity.float64), and the smallest loss "
                "difference must exceed twice the largest of the perturbed runs (sensitivity.perturbed)",
            },
            "files": {
                "tokens.safetensors": "tokens I64 [4, 33]",
                "grads0.safetensors": "d loss / d parameter at step 0 (initial weights), BEFORE clipping, f32, "
                "checkpoint names; the clipped gradient is this times per_step[0].clip_coef",
                "final.safetensors": f"every trainable parameter after {STEPS} optimizer steps, f32, checkpoint "
                "names (buffers and the MTP layer are not included: they do not change)",
            },
            "notes": [
                "One step: zero the gradients; loss = model(input_ids=tokens, labels=tokens).loss (recorded as "
                "losses[step], before the update); loss.backward(); total_norm = clip_grad_norm_(params, 1.0) "
                "(recorded as grad_norms[step], before clipping); optimizer.step(). Steps are numbered 0..29; "
                "AdamW's counter t is step + 1.",
                "Clipping (torch.nn.utils.clip_grad_norm_, torch 2.15): norms_i = ||g_i||_2 per parameter tensor "
                "(torch._foreach_norm, f32); total_norm = ||(norms_0, ..., norms_59)||_2 (vector_norm of the "
                "stacked norms, f32), i.e. the 2-norm of all gradients as one vector; clip_coef = max_norm / "
                "(total_norm + 1e-6) computed in f32; clip_coef_clamped = min(clip_coef, 1.0); every gradient "
                "is multiplied in place by clip_coef_clamped, also when it is 1.0 (which is exact). The value "
                "returned, and recorded, is total_norm before clipping.",
                "AdamW (torch 2.15 torch/optim/adam.py _single_tensor_adam with decoupled_weight_decay=True), per "
                "parameter tensor p with clipped gradient g and state m = v = 0 (f32, p's shape), t = 0 (an f32 "
                "scalar tensor), in this order: (1) t = t + 1; (2) p = p * (1 - lr * weight_decay) "
                "[param.mul_(1 - lr*wd): 1 - 1e-4 computed in double, the multiply in f32]; (3) m = m + (1 - "
                "beta1) * (g - m) [exp_avg.lerp_(g, 1 - beta1); weight 0.1 < 0.5, so this lerp branch]; (4) "
                "v = v * beta2 + (1 - beta2) * g * g [exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - "
                "beta2)]; (5) bias_correction1 = 1 - beta1**t, bias_correction2 = 1 - beta2**t (Python "
                "doubles, t read with .item()); (6) step_size = lr / bias_correction1 (double); (7) denom = "
                "sqrt(v) / sqrt(bias_correction2) + eps [(exp_avg_sq.sqrt() / bias_correction2**0.5).add_(eps)"
                ": eps is added to the bias-corrected root, not inside the root]; (8) p = p + (-step_size) * "
                "m / denom [param.addcdiv_(exp_avg, denom, value=-step_size), evaluated per element as p + "
                "(value * m) / denom in f32]. Python-double scalars are rounded to f32 when an f32 tensor op "
                "uses them. In closed form: p_t = p_{t-1} * (1 - lr*wd) - lr / (1 - beta1^t) * m_t / "
                "(sqrt(v_t) / sqrt(1 - beta2^t) + eps).",
                "Weight decay is decoupled (AdamW, not Adam's L2): it scales the weights before the Adam update, "
                "never enters m or v, and is applied to every parameter, norms and biases included (this model "
                "has no bias parameters; its RMSNorm gains decay towards 0, not 1). It is applied even to a "
                "tensor whose gradient is zero, so routed experts that no token chose still change.",
                "At t = 1 (m = v = 0) the update is -lr * 0.1 g / (|g| + eps), about -lr * sign(g): the "
                "weights after the first step depend almost only on the gradients' signs (and not on the "
                "clipping), so a consumer's gradients are best checked against grads0 directly, and its "
                "clipping by the later steps.",
                "Every routed expert tensor gets a gradient tensor (transformers fuses the experts), zero for "
                "experts no target position chose; AdamW treats them as any other parameter.",
                "The router's e_score_correction_bias is a buffer: it is constant during training. The gate "
                "weight gets its gradient through the selected experts' weights (sigmoid scores gathered at the "
                "chosen indices, normalised by their sum + 1e-20, times routed_scaling_factor 2.5); the "
                "selection itself (top-k, group mask) has no gradient.",
                "The routing is recomputed from the current weights at every step; routing.per_step gives the "
                "margins that bound how closely a consumer's forward pass must agree to keep the same choices.",
                "Tolerances (measured in `sensitivity` and `conventions`): while a consumer's routing agrees "
                "with the golden's, its losses stay within about 2e-6 and its final weights within about 1.5e-4 "
                "(AdamW's near-sign updates amplify rounding in weights whose gradient is near zero). The "
                "routing margins get as small as 1e-6, so a consumer that rounds differently may flip a choice; "
                "then the final weights move as much as a wrong convention moves them (up to 1.4e-2, 4.5% of a "
                "tensor's norm), while the losses move at most 1.4e-3 against at least 7.3e-3 for a wrong "
                "convention. grads0 and the step-0 loss, on the initial weights, are the checks no flip can loosen.",
                "If kiln's random weights or export-hf change, model_safetensors_sha256 no longer matches a "
                "fresh export and the golden must be remade.",
            ],
        }
        write_json(out / "golden.json", meta)

        if args.out.exists():
            shutil.rmtree(args.out)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(out, args.out)

    sizes = {p.name: p.stat().st_size for p in sorted(args.out.iterdir())}
    print(f"train: {sizes} ({sum(sizes.values())} bytes)")
    print(f"  parameters {len(named)} tensors, {sum(p.numel() for _, p in named)} elements; buffers {buffers}")
    for s in first["steps"]:
        print(f"  step {s['step']:2d}: loss {s['loss']!r} grad_norm {s['grad_norm']!r} clip {s['clip_coef']!r}")
    worst_all = first["adamw_all_steps_max_abs_diff"]
    print(f"  AdamW float64: step 1 from files {step1_worst:.3g} ({step1_ulps:.3g} ulp), all steps {worst_all:.3g}")
    print(f"  unpadded: loss {alt['unpadded_loss_abs_diff']:.3g}, grads {alt['unpadded_grad_max_abs_diff']:.3g}")
    print(
        f"  float64 run: loss diff max {f64['loss_abs_diff_max']:.3g}, "
        f"final weights {f64['final_weight_max_abs_diff']:.3g}, routing differences {f64['routing_differences']}"
    )
    for k, r in sens["perturbed"].items():
        print(
            f"  {k}: loss diff max {r['loss_abs_diff_max']:.3g}, final weights {r['final_weight_max_abs_diff']:.3g} "
            f"(relative {r['final_tensor_max_relative_diff']:.3g}), routing differences {r['routing_differences']}"
        )
    for v, c in conv.items():
        print(
            f"  {v}: loss diff {c['loss_max_abs_diff']:.3g}, final weights {c['final_weight_max_abs_diff']:.3g} "
            f"(relative {c['final_tensor_max_relative_diff']:.3g})"
        )
    print(f"  routing margins (min over steps): {routing_min}")
    print(f"  expert tensors with a zero step-0 gradient: {len(zero_grad_experts)}")


if __name__ == "__main__":
    sys.exit(main())
