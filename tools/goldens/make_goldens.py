#!/usr/bin/env python3
"""Golden data from Hugging Face transformers for kiln's reference interpreter.

Writes one folder per case under `tests/goldens/` (see README.md next to this file):

- `v3_tiny_yarn`, `v3_tiny_rope`, `v2_lite_tiny`: a tiny randomly initialised DeepSeek model in f32,
  saved as a Hugging Face checkpoint (`config.json`, `model.safetensors` with the hub's tensor names,
  one tensor per routed expert), plus `golden.safetensors` (logits, hidden states, router choices,
  rope frequencies) and `golden.json` (versions, inputs, the greedy continuation, a description of
  every tensor, the softmax scale and rope amplitude transformers used, and notes on its semantics).
- `v3_tiny_mtp`: like `v3_tiny_yarn` (other weights) with one multi-token-prediction module saved
  under DeepSeek-V3's checkpoint names (`model.layers.3.*`), plus its logits (`mtp_logits`) computed by
  transformers' generic `MtpModel` (what `generate(use_mtp=True)` drafts with).
- `fp8_dequant`: FP8 (E4M3) weights in DeepSeek's checkpoint format with their block scales, the
  dequantised f32 reference, and a float -> E4M3 conversion table taken from torch.

The script is deterministic (fixed seeds, one CPU thread, eager attention and eager experts) and is
run by hand, never by `cargo test`. It refuses to write anything if a self-check fails: the router
choices are recomputed independently, the saved checkpoint is reloaded with `from_pretrained` and
its logits recomputed, the per-expert tensors are compared with transformers' fused ones, and the
greedy continuation is recomputed without a KV cache. For the MTP case, the MTP weights are reloaded
through transformers' own MTP loader, the MTP logits recomputed in float64, and generate(use_mtp=True)
must reproduce the greedy continuation.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import platform
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM
from transformers.modeling_layers import MtpModel

REPO = Path(__file__).resolve().parents[2]

# The token ids every model case runs on: batch 2, 9 tokens, fixed by hand (vocab 256). Row 0 is also
# the prompt of the greedy continuation.
INPUT_IDS = [
    [0, 17, 42, 255, 3, 128, 77, 9, 200],
    [0, 99, 5, 5, 61, 190, 33, 250, 14],
]
NEW_TOKENS = 8
# The token MTP module 1 embeds at the last position, where the next token is not in the input.
MTP_FILL_TOKEN = 0

# The packages whose versions decide the numbers; recorded in every golden.json.
PACKAGES = ["torch", "transformers", "safetensors", "numpy", "huggingface_hub"]

# Sizes shared by the three model cases (the brief's "small" DeepSeek).
COMMON = {
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "moe_intermediate_size": 32,
    "num_hidden_layers": 3,
    "first_k_dense_replace": 1,
    "moe_layer_freq": 1,  # not read by transformers (every layer >= first_k_dense_replace is MoE); kiln reads it
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "kv_lora_rank": 32,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8,
    "v_head_dim": 16,
    "n_routed_experts": 16,
    "num_experts_per_tok": 4,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    # Larger than transformers' 0.02 so that activations, router scores and logits are O(1) and the
    # routing is not degenerate in a 64-wide model.
    "initializer_range": 0.1,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "attention_bias": False,
    "hidden_act": "silu",
}


def yarn(mscale: float, mscale_all_dim: float) -> dict:
    return {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 64,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "mscale": mscale,
        "mscale_all_dim": mscale_all_dim,
    }


def v3_config(rope_scaling: dict | None, mtp_layers: int = 0) -> DeepseekV3Config:
    extra = {} if rope_scaling is None else {"rope_scaling": rope_scaling}
    return DeepseekV3Config(
        **COMMON,
        **extra,
        q_lora_rank=32,
        n_group=4,
        topk_group=2,
        n_shared_experts=1,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        # transformers' DeepseekV3 hard-codes sigmoid scoring and the noaux_tc rule; these two keys are
        # kept in config.json because the released config has them and kiln reads them.
        scoring_func="sigmoid",
        topk_method="noaux_tc",
        rope_interleave=True,
        num_nextn_predict_layers=mtp_layers,
    )


def v2_config() -> DeepseekV2Config:
    return DeepseekV2Config(
        **COMMON,
        rope_scaling=yarn(0.707, 0.707),
        q_lora_rank=None,
        n_group=1,
        topk_group=1,
        n_shared_experts=2,
        routed_scaling_factor=1.0,
        norm_topk_prob=False,
        # DeepseekV2 hard-codes softmax scoring; the key is kept for kiln, as in the released config.
        scoring_func="softmax",
        topk_method="greedy",
    )


# ---------------------------------------------------------------------------------------------------
# Helpers


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


def describe(tensors: dict[str, torch.Tensor], descriptions: dict[str, str]) -> dict:
    """The per-tensor table of golden.json: dtype (safetensors spelling), shape, description."""
    st = {
        torch.float32: "F32",
        torch.int64: "I64",
        torch.uint8: "U8",
        torch.bfloat16: "BF16",
        torch.float8_e4m3fn: "F8_E4M3",
    }
    return {
        name: {"dtype": st[t.dtype], "shape": list(t.shape), "description": descriptions[name]}
        for name, t in tensors.items()
    }


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, allow_nan=False) + "\n")


def file_sizes(folder: Path) -> dict:
    return {p.name: p.stat().st_size for p in sorted(folder.iterdir())}


# ---------------------------------------------------------------------------------------------------
# Model cases


def build_model(cls, config, seed: int):
    """The model with transformers' own initialisation under `seed`, then two changes so that kiln's
    tests see every weight: RMSNorm gains drawn around 1 (transformers initialises them to exactly 1,
    which would hide a missing multiply) and, for noaux_tc, a random `e_score_correction_bias` (zero
    at init, which would hide how the bias steers selection)."""
    torch.manual_seed(seed)
    model = cls(config)
    model.set_attn_implementation("eager")
    model.set_experts_implementation("eager")
    model.eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # every RMSNorm, layernorm or not
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=gen))
    return model


def moe_layers(model) -> list[int]:
    return [i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "gate")]


def run_with_hooks(model, input_ids: torch.Tensor):
    """Forward pass with `output_hidden_states=True`, plus hooks that capture every decoder layer's
    output (before the final norm) and every router's input and outputs."""
    layer_out: dict[int, torch.Tensor] = {}
    router: dict[int, dict[str, torch.Tensor]] = {}
    handles = []
    for i, layer in enumerate(model.model.layers):
        handles.append(layer.register_forward_hook(lambda m, a, o, i=i: layer_out.__setitem__(i, o.detach().clone())))
        if hasattr(layer.mlp, "gate"):

            def gate_hook(m, args, out, i=i):
                logits, weights, indices = out
                router[i] = {
                    "input": args[0].detach().reshape(-1, args[0].shape[-1]).clone(),
                    "logits": logits.detach().clone(),
                    "weights": weights.detach().clone(),
                    "indices": indices.detach().clone(),
                }

            handles.append(layer.mlp.gate.register_forward_hook(gate_hook))
    try:
        with torch.no_grad():
            out = model(input_ids=input_ids, output_hidden_states=True, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return out, layer_out, router


def route_v3(logits, bias, n_group, topk_group, top_k, group_limit=True):
    """noaux_tc selection written out independently of transformers: sigmoid scores, plus the
    correction bias for selection only, groups scored by the sum of their two best biased scores,
    experts outside the kept groups excluded. Returns the selected sets, one frozenset per token."""
    s = torch.sigmoid(logits)
    sb = s + bias if bias is not None else s
    n, e = sb.shape
    if group_limit:
        g = sb.view(n, n_group, e // n_group)
        gscore = g.topk(2, dim=-1).values.sum(-1)
        keep = gscore.topk(topk_group, dim=-1).indices
        mask = torch.zeros(n, n_group, dtype=torch.bool)
        mask.scatter_(1, keep, True)
        mask = mask.unsqueeze(-1).expand(n, n_group, e // n_group).reshape(n, e)
        sb = sb.masked_fill(~mask, float("-inf"))
    idx = sb.topk(top_k, dim=-1).indices
    return [frozenset(r.tolist()) for r in idx]


def selection_margins(logits, bias, n_group, topk_group, top_k) -> tuple[float, float]:
    """How close the noaux_tc choice is to a tie, over all tokens: the smallest gap between the k-th and
    (k+1)-th biased score among the kept groups, and between the last kept and first dropped group score.
    A kiln implementation whose scores differ from these by less than the gaps chooses the same."""
    sb = torch.sigmoid(logits) + bias
    n, e = sb.shape
    g = sb.view(n, n_group, e // n_group)
    gscore = g.topk(2, dim=-1).values.sum(-1).sort(dim=-1, descending=True).values
    group_margin = (gscore[:, topk_group - 1] - gscore[:, topk_group]).min().item()
    keep = g.topk(2, dim=-1).values.sum(-1).topk(topk_group, dim=-1).indices
    mask = torch.zeros(n, n_group, dtype=torch.bool).scatter_(1, keep, True)
    masked = sb.masked_fill(~mask.unsqueeze(-1).expand(n, n_group, e // n_group).reshape(n, e), float("-inf"))
    top = masked.topk(top_k + 1, dim=-1).values
    return (top[:, top_k - 1] - top[:, top_k]).min().item(), group_margin


def route_greedy_softmax(logits, top_k):
    s = torch.softmax(logits, dim=-1)
    return [frozenset(r.tolist()) for r in s.topk(top_k, dim=-1).indices]


def check_router(kind: str, cfg, model, router: dict) -> dict:
    """Recomputes every router's choice and weights from its captured input and the weights, and
    counts how many tokens the group limit and the correction bias change (V3)."""
    stats = {}
    for i, r in router.items():
        gate = model.model.layers[i].mlp.gate
        logits = torch.nn.functional.linear(r["input"].float(), gate.weight.float())
        check(torch.allclose(logits, r["logits"], rtol=0, atol=1e-6), f"layer {i} router logits")
        hf_sets = [frozenset(t.tolist()) for t in r["indices"]]
        tokens = len(hf_sets)
        if kind == "v3":
            bias = gate.e_score_correction_bias
            ours = route_v3(logits, bias, cfg.n_group, cfg.topk_group, cfg.num_experts_per_tok)
            check(ours == hf_sets, f"layer {i}: independent noaux_tc selection differs from transformers")
            plain = route_v3(logits, bias, cfg.n_group, cfg.topk_group, cfg.num_experts_per_tok, group_limit=False)
            unbiased = route_v3(logits, None, cfg.n_group, cfg.topk_group, cfg.num_experts_per_tok)
            s = torch.sigmoid(logits).gather(1, r["indices"])
            w = s / (s.sum(-1, keepdim=True) + 1e-20) * cfg.routed_scaling_factor
            check(torch.allclose(w, r["weights"], rtol=0, atol=1e-6), f"layer {i} routing weights")
            sel, grp = selection_margins(logits, bias, cfg.n_group, cfg.topk_group, cfg.num_experts_per_tok)
            stats[str(i)] = {
                "tokens": tokens,
                "group_limit_changed": sum(a != b for a, b in zip(hf_sets, plain)),
                "bias_changed": sum(a != b for a, b in zip(hf_sets, unbiased)),
                "min_selection_margin": sel,
                "min_group_margin": grp,
            }
        else:
            ours = route_greedy_softmax(logits, cfg.num_experts_per_tok)
            check(ours == hf_sets, f"layer {i}: independent greedy selection differs from transformers")
            w = torch.softmax(logits, dim=-1).gather(1, r["indices"]) * cfg.routed_scaling_factor
            check(torch.allclose(w, r["weights"], rtol=0, atol=1e-6), f"layer {i} routing weights")
            top = torch.softmax(logits, dim=-1).topk(cfg.num_experts_per_tok + 1, dim=-1).values
            stats[str(i)] = {"tokens": tokens, "min_selection_margin": (top[:, -2] - top[:, -1]).min().item()}
    return stats


def check_saved_experts(folder: Path, model, layers: list[int], n_experts: int, inter: int) -> int:
    """The saved per-expert tensors must be exactly the slices of transformers' fused parameters:
    `gate_up_proj[e] = cat(gate_proj, up_proj)` along the output dim, `down_proj[e] = down_proj`."""
    n = 0
    with safe_open(folder / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        check(not any("gate_up_proj" in k for k in keys), "fused expert tensors in the saved checkpoint")
        for i in layers:
            ex = model.model.layers[i].mlp.experts
            for e in range(n_experts):
                p = f"model.layers.{i}.mlp.experts.{e}."
                check(bits_equal(f.get_tensor(p + "gate_proj.weight"), ex.gate_up_proj[e, :inter].detach()), p)
                check(bits_equal(f.get_tensor(p + "up_proj.weight"), ex.gate_up_proj[e, inter:].detach()), p)
                check(bits_equal(f.get_tensor(p + "down_proj.weight"), ex.down_proj[e].detach()), p)
                n += 3
        for k in keys:
            check(f.get_tensor(k).dtype == torch.float32, f"{k} is not f32")
    return n


def reference_forward(
    w: dict[str, torch.Tensor],
    cfg,
    ids: torch.Tensor,
    kind: str,
    mtp_ids: torch.Tensor | None = None,
    mtp_offset: int = 0,
) -> dict[str, torch.Tensor]:
    """The whole model re-implemented from the semantics written in golden.json's notes, in float64,
    from the saved checkpoint alone (no transformers module is called): DeepSeek's interleaved rope
    (pairs (x[2j], x[2j+1]), output interleaved), the YaRN frequencies and softmax scale from their
    formulas, independent routing. Its logits must match transformers' to f32 accuracy.

    With `mtp_ids` it also runs MTP module 1 (layer `num_hidden_layers`) on the final-normed hidden
    state, embedding `mtp_ids`, its rope at positions `mtp_offset + i` (transformers rotates with the
    embedded tokens' positions, offset 1; kiln and vLLM with the hidden state's, offset 0). Returns
    `logits` and, with `mtp_ids`, `mtp_logits`."""
    d = {k: v.double() for k, v in w.items()}
    eps = cfg.rms_norm_eps
    n_b, n_t = ids.shape
    heads, dn, dr, dv = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    rp = cfg.rope_parameters
    base = rp["rope_theta"]
    j = torch.arange(dr // 2, dtype=torch.float64)
    inv = base ** (-2 * j / dr)
    scale = (dn + dr) ** -0.5
    amp = 1.0
    if rp.get("rope_type", "default") == "yarn":
        f, orig = rp["factor"], rp["original_max_position_embeddings"]

        def corr(rot):
            return dr * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(base))

        low, high = max(math.floor(corr(rp["beta_fast"])), 0), min(math.ceil(corr(rp["beta_slow"])), dr - 1)
        ramp = ((j - low) / (high - low if high != low else 0.001)).clamp(0, 1)
        inv = inv * (1 - ramp) + inv / f * ramp

        def ms(m):
            return 0.1 * m * math.log(f) + 1.0 if f > 1 else 1.0

        if rp.get("mscale_all_dim"):
            scale *= ms(rp["mscale_all_dim"]) ** 2
        amp = ms(rp["mscale"]) / ms(rp["mscale_all_dim"]) if rp.get("mscale") and rp.get("mscale_all_dim") else ms(1)

    def rotary(offset: int):  # cos and sin at positions offset .. offset + T - 1, [T, dr/2]
        ang = (torch.arange(n_t, dtype=torch.float64) + offset)[:, None] * inv[None, :]
        return torch.cos(ang) * amp, torch.sin(ang) * amp

    def rope(x, cs):  # [..., T, dr], pairs interleaved in and out
        cos, sin = cs
        a, b = x[..., 0::2], x[..., 1::2]
        return torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).flatten(-2)

    def rms(x, wname):
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * d[wname]

    def lin(x, wname):
        return x @ d[wname].T

    def mlp(x, p):
        return lin(
            torch.nn.functional.silu(lin(x, p + "gate_proj.weight")) * lin(x, p + "up_proj.weight"),
            p + "down_proj.weight",
        )

    causal = torch.full((n_t, n_t), float("-inf"), dtype=torch.float64).triu(1)

    def layer(h, i: int, moe: bool, cs):
        p = f"model.layers.{i}."
        x = rms(h, p + "input_layernorm.weight")
        a = p + "self_attn."
        if cfg.q_lora_rank is None:
            q = lin(x, a + "q_proj.weight")
        else:
            q = lin(rms(lin(x, a + "q_a_proj.weight"), a + "q_a_layernorm.weight"), a + "q_b_proj.weight")
        q = q.view(n_b, n_t, heads, dn + dr).transpose(1, 2)  # [B, H, T, dn + dr]
        q_nope, q_pe = q[..., :dn], rope(q[..., dn:], cs)
        kv = lin(x, a + "kv_a_proj_with_mqa.weight")
        c, k_pe = rms(kv[..., :-dr], a + "kv_a_layernorm.weight"), rope(kv[..., -dr:], cs)  # [B, T, dr]
        kvb = lin(c, a + "kv_b_proj.weight").view(n_b, n_t, heads, dn + dv).transpose(1, 2)
        k_nope, v = kvb[..., :dn], kvb[..., dn:]
        scores = (q_nope @ k_nope.transpose(-1, -2) + q_pe @ k_pe[:, None].transpose(-1, -2)) * scale + causal
        o = torch.softmax(scores, dim=-1) @ v  # [B, H, T, dv]
        h = h + lin(o.transpose(1, 2).reshape(n_b, n_t, heads * dv), a + "o_proj.weight")
        x = rms(h, p + "post_attention_layernorm.weight")
        m = p + "mlp."
        if not moe:
            return h + mlp(x, m)
        xt = x.reshape(-1, x.shape[-1])
        logits = lin(xt, m + "gate.weight")
        if kind == "v3":
            sets = route_v3(
                logits, d[m + "gate.e_score_correction_bias"], cfg.n_group, cfg.topk_group, cfg.num_experts_per_tok
            )
            scores_all = torch.sigmoid(logits)
        else:
            sets = route_greedy_softmax(logits, cfg.num_experts_per_tok)
            scores_all = torch.softmax(logits, dim=-1)
        y = torch.zeros_like(xt)
        for t, chosen in enumerate(sets):
            idx = sorted(chosen)
            wts = scores_all[t, idx]
            if kind == "v3" and cfg.norm_topk_prob:
                wts = wts / (wts.sum() + 1e-20)
            wts = wts * cfg.routed_scaling_factor
            for e, we in zip(idx, wts):
                y[t] += we * mlp(xt[t], f"{m}experts.{e}.")
        return h + y.view_as(x) + mlp(x, m + "shared_experts.")

    h = d["model.embed_tokens.weight"][ids]
    for i in range(cfg.num_hidden_layers):
        h = layer(h, i, i >= cfg.first_k_dense_replace, rotary(0))
    h = rms(h, "model.norm.weight")
    out = {"logits": lin(h, "lm_head.weight")}
    if mtp_ids is None:
        return out

    # MTP module 1: embedding first in the concatenation, the final-normed hidden state second, a decoder
    # layer that is always MoE (transformers' get_mtp_config sets first_k_dense_replace = 0), then
    # shared_head.norm and the SHARED head. The embedding is not zeroed at any position.
    n = cfg.num_hidden_layers
    p = f"model.layers.{n}."
    e = d["model.embed_tokens.weight"][mtp_ids]
    x = torch.cat([rms(e, p + "enorm.weight"), rms(h, p + "hnorm.weight")], dim=-1)
    hm = layer(lin(x, p + "eh_proj.weight"), n, True, rotary(mtp_offset))
    out["mtp_logits"] = lin(rms(hm, p + "shared_head.norm.weight"), "lm_head.weight")
    return out


# ---------------------------------------------------------------------------------------------------
# Multi-token prediction


def build_mtp(model, seed: int):
    """transformers' generic MTP module (`MtpModel` in modeling_layers.py, what generate(use_mtp=True)
    drafts with) for `model`, with random weights. Its embedding, head and rotary embedding ARE the main
    model's modules. MtpModel's own post_init only initialises generic modules (it leaves the fused
    experts uninitialised and the router at zero), so every MTP tensor is drawn here from `seed` the way
    `build_model` leaves the main layers: N(0, initializer_range) for every matrix (experts and router
    included), 1 + 0.1 N(0, 1) for every RMSNorm gain, 0.1 N(0, 1) for the correction bias."""
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    mtp = MtpModel(model, model.config.num_nextn_predict_layers)
    after = model.state_dict()
    check(before.keys() == after.keys(), "building MtpModel leaves the main model's state dict keys alone")
    check(all(bits_equal(before[k], after[k]) for k in before), "building MtpModel leaves the main weights alone")
    check(mtp.embed_tokens is model.model.embed_tokens, "MtpModel shares the main embedding")
    check(mtp.shared_head is model.lm_head, "MtpModel shares the main lm_head")
    check(mtp.use_post_norm and not mtp.use_shared_post_norm, "one post norm (shared_head.norm) per MTP layer")
    check(not getattr(mtp.config, "mtp_hidden_states_first", False), "MtpLayer concatenates the embedding first")
    mtp.set_attn_implementation("eager")
    mtp.set_experts_implementation("eager")
    mtp.eval()
    gen = torch.Generator().manual_seed(seed)
    std = model.config.initializer_range
    with torch.no_grad():
        for name, p in mtp.layers.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(std * torch.randn(p.shape, generator=gen))
        for name, b in mtp.layers.named_buffers():
            check(name.endswith("e_score_correction_bias"), f"unexpected MTP buffer {name}")
            b.copy_(0.1 * torch.randn(b.shape, generator=gen))
    return mtp


def mtp_checkpoint(mtp, model) -> dict[str, torch.Tensor]:
    """The MTP module under DeepSeek-V3's checkpoint names (README_WEIGHTS): MTP layer k is
    `model.layers.{num_hidden_layers + k}`, holding `enorm`, `hnorm`, `eh_proj`, the decoder layer's own
    tensors (`self_attn.*`, `mlp.*` with one tensor per routed expert, the two block norms),
    `shared_head.norm`, and copies of the shared `embed_tokens.weight` and `shared_head.head.weight`.
    transformers' loader maps these back (MtpModel.get_weight_conversions); `model_case` checks it."""
    out: dict[str, torch.Tensor] = {}
    n = model.config.num_hidden_layers
    inter = model.config.moe_intermediate_size
    for k, layer in enumerate(mtp.layers):
        p = f"model.layers.{n + k}."
        for name, t in [*layer.named_parameters(), *layer.named_buffers()]:
            t = t.detach()
            if name == "mtp_block.mlp.experts.gate_up_proj":  # [E, 2 * inter, hidden] = cat(gate, up)
                for e in range(t.shape[0]):
                    out[f"{p}mlp.experts.{e}.gate_proj.weight"] = t[e, :inter].clone()
                    out[f"{p}mlp.experts.{e}.up_proj.weight"] = t[e, inter:].clone()
            elif name == "mtp_block.mlp.experts.down_proj":  # [E, hidden, inter]
                for e in range(t.shape[0]):
                    out[f"{p}mlp.experts.{e}.down_proj.weight"] = t[e].clone()
            elif name.startswith("mtp_block."):
                out[p + name.removeprefix("mtp_block.")] = t.clone()
            elif name == "post_norm.weight":
                out[p + "shared_head.norm.weight"] = t.clone()
            elif name in ("enorm.weight", "hnorm.weight", "eh_proj.weight"):
                out[p + name] = t.clone()
            else:
                check(False, f"MTP tensor {name} has no checkpoint name")
        out[p + "embed_tokens.weight"] = model.model.embed_tokens.weight.detach().clone()
        out[p + "shared_head.head.weight"] = model.lm_head.weight.detach().clone()
    return out


def mtp_logits(mtp, hidden: torch.Tensor, mtp_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """MTP module 1's logits at every position, with transformers' own per-layer step: `forward_layer`
    (embed, cat([enorm(emb), hnorm(hidden)]), eh_proj, the decoder layer under a causal mask, post_norm =
    shared_head.norm) then `_project_to_logits` (the shared lm_head). `MtpModel.forward` runs exactly these
    two calls but keeps only the last position's logits; `model_case` checks that position against it."""
    with torch.no_grad():
        h = mtp.forward_layer(0, hidden, position_ids, None, input_ids=mtp_ids)
        return mtp._project_to_logits(h).detach()


def mtp_tokens(input_ids: torch.Tensor) -> torch.Tensor:
    """The tokens MTP module 1 embeds: row b, position i holds input_ids[b, i + 1], and the last position,
    whose next token is not in the input, holds MTP_FILL_TOKEN. This is kiln's `mtp_tokens` input."""
    fill = torch.full((input_ids.shape[0], 1), MTP_FILL_TOKEN, dtype=input_ids.dtype)
    return torch.cat([input_ids[:, 1:], fill], dim=1)


def mtp_router_stats(cfg, gate, captured: dict) -> dict:
    """The MTP layer's noaux_tc choices recomputed independently, and how close they are to a tie."""
    with torch.no_grad():
        logits = torch.nn.functional.linear(captured["input"].float(), gate.weight.float())
    bias = gate.e_score_correction_bias
    hf_sets = [frozenset(t.tolist()) for t in captured["indices"]]
    args = (cfg.n_group, cfg.topk_group, cfg.num_experts_per_tok)
    check(route_v3(logits, bias, *args) == hf_sets, "MTP layer: independent noaux_tc selection differs")
    plain = route_v3(logits, bias, *args, group_limit=False)
    unbiased = route_v3(logits, None, *args)
    sel, grp = selection_margins(logits, bias, *args)
    return {
        "tokens": len(hf_sets),
        "group_limit_changed": sum(a != b for a, b in zip(hf_sets, plain)),
        "bias_changed": sum(a != b for a, b in zip(hf_sets, unbiased)),
        "min_selection_margin": sel,
        "min_group_margin": grp,
    }


def run_mtp(model, input_ids: torch.Tensor, hidden: torch.Tensor, raw_hidden: torch.Tensor, seed: int) -> dict:
    """Builds the MTP module, computes its golden logits as generate(use_mtp=True) would, and measures
    how far each convention kiln could get wrong moves them (so that a 1e-4 test catches it)."""
    check(model.config.num_nextn_predict_layers == 1, "one MTP module")
    mtp = build_mtp(model, seed)
    ids = mtp_tokens(input_ids)
    n_b, n_t = input_ids.shape
    # MTPCandidateGenerator slices position_ids like input_ids: row i embeds token i + 1 at ITS position.
    positions = torch.arange(1, n_t + 1, dtype=torch.int64)[None].expand(n_b, -1)
    # generate(use_mtp=True) runs the main model with output_hidden_states=-1 and hands the MTP module
    # model_outputs.hidden_states[-1]: the final-normed state, which `hidden` was checked to be.
    with torch.no_grad():
        last = model(input_ids=input_ids, output_hidden_states=-1, use_cache=False).hidden_states[-1]
    check(bits_equal(last, hidden), "output_hidden_states=-1 hands MTP the final-normed hidden state")
    captured = {}

    def gate_hook(m, args, out):
        captured.update(input=args[0].detach().reshape(-1, args[0].shape[-1]).clone(), indices=out[2].detach().clone())

    gate = mtp.layers[0].mtp_block.mlp.gate
    handle = gate.register_forward_hook(gate_hook)
    try:
        logits = mtp_logits(mtp, hidden, ids, positions)
    finally:
        handle.remove()
    router = mtp_router_stats(model.config, gate, captured)

    with torch.no_grad():
        drafted, last_logits, _ = mtp(
            input_ids=ids, last_hidden_states=hidden, attention_mask=None, position_ids=positions, mtp_cache=None
        )
    # forward projects only the last position ([B, 1, d] through lm_head), which may round differently.
    forward_diff = (last_logits[:, 0] - logits[:, -1]).abs().max().item()
    check(forward_diff <= 1e-6, f"MtpModel.forward's last-position logits differ by {forward_diff}")
    check(torch.equal(drafted[:, 0], logits[:, -1].argmax(-1)), "MtpModel.forward drafts the argmax")

    def diff(other: torch.Tensor) -> float:
        return (other - logits).abs().max().item()

    layer = mtp.layers[0]
    with torch.no_grad():
        emb = mtp.embed_tokens(ids)
        zeroed = emb.clone()
        zeroed[:, 0] = 0.0
        h_zero = mtp.forward_layer(0, hidden, positions, None, inputs_embeds=zeroed)
        mtp.config.mtp_hidden_states_first = True  # MtpLayer reads its (shared) config at call time
        try:
            swapped = mtp_logits(mtp, hidden, ids, positions)
        finally:
            del mtp.config.mtp_hidden_states_first
        check(layer.config is mtp.config, "MtpLayer shares MtpModel's config")
        sensitivity = {
            "positions_of_the_hidden_state_i_instead_of_i_plus_1": diff(mtp_logits(mtp, hidden, ids, positions - 1)),
            "hidden_state_before_the_final_norm": diff(mtp_logits(mtp, raw_hidden, ids, positions)),
            "hidden_state_first_in_the_concatenation": diff(swapped),
            "embedding_zeroed_at_position_0_as_vllm": diff(mtp._project_to_logits(h_zero)),
            "main_logits_instead": diff(model.lm_head(hidden)),
        }
    check(sensitivity["positions_of_the_hidden_state_i_instead_of_i_plus_1"] <= 1e-5, "rope is relative")
    for what, d in sensitivity.items():
        if not what.startswith("positions"):
            check(d > 1e-2, f"the MTP golden does not tell {what} apart ({d})")
    return {
        "module": mtp,
        "ids": ids,
        "positions": positions,
        "logits": logits,
        "drafted_last": drafted[:, 0].tolist(),
        "forward_diff": forward_diff,
        "router": router,
        "sensitivity": sensitivity,
    }


def check_mtp_reload(reloaded, run: dict, input_ids: torch.Tensor, greedy: torch.Tensor) -> dict:
    """The saved checkpoint through transformers' own MTP loader, and generate(use_mtp=True).

    transformers' DeepseekV3 names only `model\\.layers\\.61.*` (the released model's MTP layer) in
    `_keys_to_ignore_on_load_unexpected`, which MtpModel.from_pretrained reuses to find the MTP weights,
    so for this 3-layer model the pattern is pointed at layer 3 on the reloaded instance."""
    n = reloaded.config.num_hidden_layers
    reloaded._keys_to_ignore_on_load_unexpected = [rf"model\.layers\.{n}\..*"]
    loaded = MtpModel.from_pretrained(reloaded)
    loaded.set_attn_implementation("eager")
    loaded.set_experts_implementation("eager")
    loaded.eval()
    sd0, sd1 = run["module"].state_dict(), loaded.state_dict()
    check(sd0.keys() == sd1.keys(), "MtpModel.from_pretrained has the same MTP keys")
    check(all(bits_equal(sd0[k], sd1[k]) for k in sd0), "MtpModel.from_pretrained loads bit-identical weights")
    with torch.no_grad():
        hidden = reloaded(input_ids=input_ids, output_hidden_states=-1, use_cache=False).hidden_states[-1]
    logits = mtp_logits(loaded, hidden, run["ids"], run["positions"])
    reload_diff = (logits - run["logits"]).abs().max().item()
    check(reload_diff <= 1e-6, f"reloaded MTP logits differ by {reload_diff}")

    # Speculative decoding with MTP drafts must reproduce plain greedy decoding exactly.
    prompt = input_ids[0:1]
    reloaded.generation_config.eos_token_id = None
    with torch.no_grad():
        spec = reloaded.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=reloaded.config.bos_token_id,
            use_mtp=True,
        )
    check(torch.equal(spec, greedy), "generate(use_mtp=True) reproduces the greedy continuation")
    return {
        "how": "MtpModel.from_pretrained(main model reloaded from this folder), which maps the checkpoint names "
        "back (model.layers.3. -> layers.0.mtp_block., shared_head.norm -> post_norm, per-expert tensors fused); "
        "its _keys_to_ignore_on_load_unexpected pattern is pointed at layer 3 because transformers' DeepseekV3 "
        "hard-codes model\\.layers\\.61.*",
        "weights_bit_identical": True,
        "mtp_logits_bit_identical": bits_equal(logits, run["logits"]),
        "mtp_logits_max_abs_diff": reload_diff,
        "generate_use_mtp": "generate(input_ids[0:1], max_new_tokens=8, do_sample=False, use_mtp=True) on the "
        "reloaded model equals the continuation (MTP drafts, the main model verifies)",
    }


def mtp_meta(run: dict, seed: int, reload: dict, ref_diff: float, ref0_diff: float, offset_f64: float) -> dict:
    """golden.json's `mtp` section: how the MTP logits were computed and which conventions they pin."""
    return {
        "depth": 1,
        "layer": 3,
        "module": "transformers.modeling_layers.MtpModel(main_model, 1), the generic MTP module that "
        "generate(use_mtp=True) drafts with (MTPCandidateGenerator); its embed_tokens, shared_head (= lm_head) "
        "and rotary_emb are the main model's modules",
        "call": "h = MtpModel.forward_layer(0, hidden_states.3, position_ids, None, input_ids=mtp_tokens); "
        "mtp_logits = MtpModel._project_to_logits(h). MtpModel.forward makes these two calls and keeps only the "
        "last position (for drafting); its last-position logits are checked against mtp_logits[:, -1] (it "
        "projects a [B, 1, d] slice, so the matmul may round differently)",
        "forward_last_position_max_abs_diff": run["forward_diff"],
        "drafted_at_last_position": run["drafted_last"],
        "router_stats": run["router"],
        "seed": seed,
        "weights": "MtpModel's post_init leaves the fused experts uninitialised and the router at zero, so every MTP "
        "tensor is drawn by the script from torch.Generator().manual_seed(seed) in MtpModel.layers' parameter "
        "order: N(0, 0.1) (initializer_range) for every matrix, 1 + 0.1 N(0, 1) for every RMSNorm gain "
        "(enorm, hnorm, input_layernorm, post_attention_layernorm, q_a_layernorm, kv_a_layernorm, "
        "shared_head.norm), 0.1 N(0, 1) for e_score_correction_bias",
        "fill_token": MTP_FILL_TOKEN,
        "mtp_tokens": f"mtp_tokens[b, i] = input_ids[b, i + 1]; the last position holds {MTP_FILL_TOKEN}, a fixed "
        "filler (its real next token is not in the input, so only its row's logits depend on that choice)",
        "hidden_state": "hidden_states.3: the main model's FINAL-NORMED output (model.norm), which is what "
        "generate(use_mtp=True) passes (output_hidden_states=-1, model_outputs.hidden_states[-1], checked "
        "bit-identical); layer_output.2 (before the norm) is NOT the MTP input",
        "concat_order": "embedding first: eh_proj(cat([enorm(embed(mtp_tokens)), hnorm(hidden)], -1)) "
        "(MtpLayer.forward; config.mtp_hidden_states_first is unset for DeepseekV3), as vLLM's deepseek_mtp.py",
        "position_0_embedding": "NOT zeroed: MtpModel.forward_layer embeds every token (vLLM's deepseek_mtp.py "
        "zeroes inputs_embeds where positions == 0; transformers has no such mask)",
        "decoder_layer": "DeepseekV3DecoderLayer built from config.get_mtp_config(), which sets "
        "first_k_dense_replace = 0: the MTP layer is always MoE (noaux_tc router with its own correction bias, "
        "shared expert); eager attention under a plain causal mask over the 9 positions",
        "head": "post_norm (checkpoint name shared_head.norm) then the SHARED lm_head; the checkpoint's copies "
        "model.layers.3.embed_tokens.weight and model.layers.3.shared_head.head.weight equal the shared tensors "
        "bit for bit and are not read by transformers (MtpModel ignores them on load)",
        "position_ids": "1..9 in every row: MTPCandidateGenerator slices position_ids like input_ids, so row i uses "
        "the position of the token it embeds (i + 1). kiln (like vLLM) feeds the hidden state's position i. Rope "
        "is relative, so both give the same attention up to rounding (see sensitivity)",
        "chained_modules": "not exercised (depth 1). For depth > 1, MtpModel feeds module k + 1 the output of "
        "module k AFTER its post_norm (shared_head.norm), and shifts input_ids/position_ids by one per module",
        "sensitivity": {
            "what": "max abs change of mtp_logits if the MTP module is computed with each alternative convention; "
            "every entry but the first is far above a 1e-4 test tolerance",
            **run["sensitivity"],
        },
        "reload_check": reload,
        "independent_check": {
            "how": "reference_forward in float64 from model.safetensors (MTP layer by checkpoint names, shared "
            "embedding and head), no transformers module called",
            "mtp_logits_max_abs_diff_vs_f32_golden": ref_diff,
            "mtp_logits_max_abs_diff_vs_f32_golden_at_positions_0_to_8": ref0_diff,
            "float64_change_from_positions_1_to_9_to_0_to_8": offset_f64,
        },
    }


def greedy_without_cache(model, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    ids = prompt
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=ids, use_cache=False).logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def model_case(
    out_root: Path,
    name: str,
    kind: str,
    cls,
    config,
    seed: int,
    summary: str,
    notes: list[str],
    mtp_seed: int | None = None,
) -> dict:
    """One model case. With `mtp_seed`, the config has one MTP module: its weights are drawn from
    `mtp_seed`, saved under the checkpoint names and its golden logits computed by transformers' MtpModel."""
    model = build_model(cls, config, seed)
    cfg = model.config
    input_ids = torch.tensor(INPUT_IDS, dtype=torch.int64)
    n_layers = cfg.num_hidden_layers

    out, layer_out, router = run_with_hooks(model, input_ids)
    logits = out.logits.detach()
    hs = [h.detach() for h in out.hidden_states]
    check(len(hs) == n_layers + 1, "hidden_states has num_hidden_layers + 1 entries")
    check(bits_equal(hs[0], model.model.embed_tokens(input_ids).detach()), "hidden_states[0] is the embedding")
    for i in range(n_layers - 1):
        check(bits_equal(hs[i + 1], layer_out[i]), f"hidden_states[{i + 1}] is layer {i}'s output")
    with torch.no_grad():
        normed = model.model.norm(layer_out[n_layers - 1])
        check(bits_equal(hs[n_layers], normed), "hidden_states[-1] is the final-normed last layer output")
        check(bits_equal(logits, model.lm_head(normed)), "logits = lm_head(hidden_states[-1])")

    route_stats = check_router(kind, cfg, model, router)

    # Softmax scale and rope amplitude, read from the modules.
    scales = {m.self_attn.scaling for m in model.model.layers}
    check(len(scales) == 1, "one softmax scale for every layer")
    softmax_scale = scales.pop()
    rotary = model.model.rotary_emb
    inv_freq = rotary.inv_freq.detach().clone()

    # Greedy continuation: generate() (KV cache), then the same without a cache.
    # Stopping at eos is switched off (generation_config.eos_token_id = None) so that the continuation is
    # pure greedy argmax for all 8 steps: with eos = 1 a random model may well pick token 1.
    prompt = input_ids[0:1]
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        gen = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=cfg.bos_token_id,
        )
    nocache = greedy_without_cache(model, prompt, NEW_TOKENS)
    check(gen.shape == (1, prompt.shape[1] + NEW_TOKENS), "generate() produced every new token")
    check(torch.equal(gen, nocache), "generate() agrees with a greedy loop that recomputes without a cache")
    with torch.no_grad():
        steps = model(input_ids=gen[:, :-1], use_cache=False).logits[0, prompt.shape[1] - 1 :]
    top2 = steps.topk(2, dim=-1).values
    greedy_margin = (top2[:, 0] - top2[:, 1]).min().item()

    mtp = None if mtp_seed is None else run_mtp(model, input_ids, hs[n_layers], layer_out[n_layers - 1], mtp_seed)

    folder = out_root / name
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp) / name
        model.save_pretrained(tmp)
        layers = moe_layers(model)
        n_expert_tensors = check_saved_experts(tmp, model, layers, cfg.n_routed_experts, cfg.moe_intermediate_size)
        if mtp is not None:
            # save_pretrained writes the main model only; the MTP layer joins it under its checkpoint names.
            extra = mtp_checkpoint(mtp["module"], model)
            with safe_open(tmp / "model.safetensors", "pt") as f:
                check(f.metadata() == {"format": "pt"}, "save_pretrained's safetensors metadata")
                main_tensors = {k: f.get_tensor(k) for k in f.keys()}
            check(not (extra.keys() & main_tensors.keys()), "MTP tensor names are new")
            save_file({**main_tensors, **extra}, tmp / "model.safetensors", metadata={"format": "pt"})

        # Reload from the folder and recompute.
        re = cls.from_pretrained(tmp, attn_implementation="eager", experts_implementation="eager")
        re.eval()
        sd0, sd1 = model.state_dict(), re.state_dict()
        check(sd0.keys() == sd1.keys(), "reloaded state dict has the same keys")
        check(all(bits_equal(sd0[k], sd1[k]) for k in sd0), "reloaded weights are bit-identical")
        with torch.no_grad():
            logits2 = re(input_ids=input_ids, use_cache=False).logits
        reload_diff = (logits2 - logits).abs().max().item()
        reload_bits = bits_equal(logits2, logits)
        check(reload_diff <= 1e-6, f"reloaded logits differ by {reload_diff}")
        mtp_reload = None if mtp is None else check_mtp_reload(re, mtp, input_ids, gen)
        with safe_open(tmp / "model.safetensors", "pt") as f:
            weight_names = sorted(f.keys())
            saved = {k: f.get_tensor(k) for k in weight_names}
        ref = reference_forward(saved, cfg, input_ids, kind, None if mtp is None else mtp["ids"], mtp_offset=1)
        ref_diff = (ref["logits"] - logits.double()).abs().max().item()
        check(ref_diff <= 1e-4, f"independent float64 re-implementation differs by {ref_diff}")
        if mtp is not None:
            mtp_ref_diff = (ref["mtp_logits"] - mtp["logits"].double()).abs().max().item()
            check(mtp_ref_diff <= 1e-4, f"independent float64 MTP differs by {mtp_ref_diff}")
            # kiln rotates the MTP block with positions 0..8 (the hidden state's), transformers with 1..9.
            ref0 = reference_forward(saved, cfg, input_ids, kind, mtp["ids"], mtp_offset=0)["mtp_logits"]
            mtp_ref0_diff = (ref0 - mtp["logits"].double()).abs().max().item()
            check(mtp_ref0_diff <= 1e-4, f"independent float64 MTP at positions 0..8 differs by {mtp_ref0_diff}")
            mtp_offset_f64 = (ref0 - ref["mtp_logits"]).abs().max().item()
            n = cfg.num_hidden_layers
            copies = [(f"model.layers.{n}.embed_tokens.weight", "model.embed_tokens.weight")]
            copies.append((f"model.layers.{n}.shared_head.head.weight", "lm_head.weight"))
            check(all(bits_equal(saved[a], saved[b]) for a, b in copies), "the MTP copies equal the shared tensors")

        tensors: dict[str, torch.Tensor] = {}
        desc: dict[str, str] = {}
        tensors["input_ids"] = input_ids
        desc["input_ids"] = "the token ids of the forward pass, [batch 2, 9 tokens]; positions are 0..8"
        tensors["logits"] = logits.contiguous()
        desc["logits"] = "lm_head(final_norm(last layer output)), [2, 9, vocab]"
        for i, h in enumerate(hs):
            tensors[f"hidden_states.{i}"] = h.contiguous()
            if i == 0:
                desc[f"hidden_states.{i}"] = "HF hidden_states[0]: the embedding output (input of layer 0)"
            elif i < n_layers:
                desc[f"hidden_states.{i}"] = f"HF hidden_states[{i}]: output of decoder layer {i - 1} (residual stream)"
            else:
                desc[f"hidden_states.{i}"] = (
                    f"HF hidden_states[{i}]: output of the last decoder layer AFTER the final norm (model.norm); "
                    "transformers replaces the last entry by last_hidden_state"
                )
        for i in range(n_layers):
            tensors[f"layer_output.{i}"] = layer_out[i].contiguous()
            desc[f"layer_output.{i}"] = (
                f"output of decoder layer {i} captured by a forward hook, never normed (layer_output.{n_layers - 1} "
                "is the final norm's input)"
            )
        for i, r in router.items():
            p = f"router.{i}."
            order = r["indices"].argsort(dim=-1)
            tensors[p + "input"] = r["input"].contiguous()
            desc[p + "input"] = f"layer {i}: the router's input, post_attention_layernorm output, [2*9 tokens, hidden]"
            tensors[p + "logits"] = r["logits"].contiguous()
            desc[p + "logits"] = f"layer {i}: router logits linear(f32 input, f32 gate.weight), [18, n_routed_experts]"
            tensors[p + "indices"] = r["indices"].contiguous()
            desc[p + "indices"] = (
                f"layer {i}: chosen experts in transformers' order (torch.topk sorted=False: not guaranteed to be "
                "by score), [18, top_k] int64; token t = batch * 9 + position"
            )
            tensors[p + "weights"] = r["weights"].contiguous()
            desc[p + "weights"] = f"layer {i}: routing weights matching {p}indices, [18, top_k]"
            tensors[p + "indices_sorted"] = r["indices"].gather(1, order).contiguous()
            desc[p + "indices_sorted"] = f"layer {i}: {p}indices sorted ascending per token"
            tensors[p + "weights_sorted"] = r["weights"].gather(1, order).contiguous()
            desc[p + "weights_sorted"] = f"layer {i}: {p}weights permuted like {p}indices_sorted"
        tensors["rope.inv_freq"] = inv_freq.contiguous()
        desc["rope.inv_freq"] = (
            "model.model.rotary_emb.inv_freq: the per-pair angular frequencies (YaRN-corrected when rope_scaling "
            "is yarn), computed in f32, [qk_rope_head_dim / 2]; angle = position * inv_freq in f32"
        )
        tensors["continuation"] = gen.contiguous()
        desc["continuation"] = "generate(input_ids[0:1], max_new_tokens=8, do_sample=False): prompt + 8 new tokens"
        if mtp is not None:
            tensors["mtp_tokens"] = mtp["ids"].contiguous()
            desc["mtp_tokens"] = (
                f"the tokens MTP module 1 embeds, [2, 9] int64: mtp_tokens[b, i] = input_ids[b, i + 1], and "
                f"{MTP_FILL_TOKEN} at the last position (its next token is not in the input); kiln's mtp_tokens input"
            )
            tensors["mtp_logits"] = mtp["logits"].contiguous()
            desc["mtp_logits"] = (
                "MTP module 1 (layer 3) logits, [2, 9, vocab]: lm_head(shared_head.norm(block(eh_proj(cat([enorm("
                "embed(mtp_tokens)), hnorm(hidden_states.3)], -1))))), by transformers' MtpModel.forward_layer + "
                "_project_to_logits, rope at positions 1..9; row i predicts token i + 2"
            )

        folder_tmp = Path(tmp)
        # One metadata key only: safetensors writes the metadata map in hash order, so several keys
        # would make the file's bytes differ from run to run.
        save_file(tensors, folder_tmp / "golden.safetensors", metadata={"format": "pt"})

        group_note = None
        if kind == "v3":
            changed = sum(s["group_limit_changed"] for s in route_stats.values())
            check(changed > 0, "the group limit changes at least one token's choice")
            bias_changed = sum(s["bias_changed"] for s in route_stats.values())
            check(bias_changed > 0, "the correction bias changes at least one token's choice")
            group_note = (
                f"the group limit changes the chosen set of {changed} of {18 * len(route_stats)} (token, layer) "
                f"routings versus plain top-k of the biased scores; the bias changes {bias_changed} versus "
                "group-limited top-k of the unbiased scores"
            )

        meta = {
            "case": name,
            "summary": summary,
            "generated_by": "tools/goldens/make_goldens.py",
            "versions": versions(),
            "seed": seed,
            "torch_threads": torch.get_num_threads(),
            "attn_implementation": "eager",
            "experts_implementation": "eager",
            "model_class": cls.__name__,
            "input_ids": INPUT_IDS,
            "positions": list(range(len(INPUT_IDS[0]))),
            "continuation": {
                "call": "generate(input_ids[0:1], attention_mask=ones, max_new_tokens=8, do_sample=False)",
                "prompt": INPUT_IDS[0],
                "new_token_ids": gen[0, prompt.shape[1] :].tolist(),
                "full_sequence": gen[0].tolist(),
                "equals_greedy_without_cache": True,
                "eos_stopping": "disabled (generation_config.eos_token_id = None): 8 argmax steps, eos or not",
                "min_top1_top2_logit_margin": greedy_margin,
            },
            "softmax_scale": softmax_scale,
            "softmax_scale_source": "model.model.layers[i].self_attn.scaling (the same for every layer)",
            "qk_head_dim_inv_sqrt": (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5,
            "rope": {
                "rope_parameters": dict(cfg.rope_parameters),
                "attention_scaling": float(rotary.attention_scaling),
                "attention_scaling_source": "model.model.rotary_emb.attention_scaling: cos and sin are multiplied by it",
                "inv_freq": inv_freq.tolist(),
                "interleaved": kind == "v2" or bool(getattr(cfg, "rope_interleave", False)),
            },
            "hidden_states": (
                f"hidden_states.0..{n_layers} are HF's output_hidden_states=True tuple: [0] the embedding, [i] the "
                f"output of layer i-1 for i < {n_layers}, and [{n_layers}] the FINAL-NORMED output of the last layer "
                f"(not the raw layer output, which is layer_output.{n_layers - 1})"
            ),
            "router_stats": route_stats,
            "weights": {
                "file": "model.safetensors",
                "dtype": "F32 (every tensor, including gate.weight and e_score_correction_bias)",
                "tensors": len(weight_names),
                "names": "canonical Hugging Face hub names; routed experts one tensor each: "
                "model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight"
                + (
                    ""
                    if mtp is None
                    else f"; the MTP module as DeepSeek-V3's checkpoint stores it, layer {n_layers}: "
                    f"model.layers.{n_layers}.{{enorm,hnorm,eh_proj}}.weight, the decoder layer's self_attn.*, mlp.* "
                    "(MoE, per-expert tensors), input_layernorm and post_attention_layernorm, "
                    f"shared_head.norm.weight, and the copies model.layers.{n_layers}.embed_tokens.weight (= "
                    f"model.embed_tokens.weight) and model.layers.{n_layers}.shared_head.head.weight (= lm_head.weight)"
                ),
                "expert_storage": (
                    "transformers holds experts fused in memory (experts.gate_up_proj [E, 2*moe_inter, hidden] = "
                    "cat(gate, up) on dim 1; experts.down_proj [E, hidden, moe_inter]); save_pretrained converts "
                    f"them back to per-expert hub tensors, checked here bit for bit ({n_expert_tensors} tensors)"
                ),
                "norm_weights": "RMSNorm gains are 1 + 0.1 * N(0, 1), not transformers' all-ones init",
                "init": f"transformers' own init under torch.manual_seed({seed}), initializer_range {cfg.initializer_range}",
            },
            "reload_check": {
                "how": "from_pretrained(this folder) and the same forward pass",
                "weights_bit_identical": True,
                "logits_bit_identical": reload_bits,
                "logits_max_abs_diff": reload_diff,
            },
            "independent_check": {
                "how": "tools/goldens/make_goldens.py reference_forward: the model re-implemented in float64 from "
                "model.safetensors and the semantics in these notes (interleaved rope in and out, YaRN and softmax "
                "scale from their formulas, independent routing), without calling transformers",
                "logits_max_abs_diff_vs_f32_golden": ref_diff,
            },
            **(
                {}
                if mtp is None
                else {"mtp": mtp_meta(mtp, mtp_seed, mtp_reload, mtp_ref_diff, mtp_ref0_diff, mtp_offset_f64)}
            ),
            "notes": notes + ([group_note] if group_note else []),
            "tensors": describe(tensors, desc),
        }
        write_json(folder_tmp / "golden.json", meta)
        # generation_config.json only repeats bos/eos; config.json is what kiln imports.
        (folder_tmp / "generation_config.json").unlink(missing_ok=True)

        if folder.exists():
            shutil.rmtree(folder)
        shutil.copytree(folder_tmp, folder)
    print(f"{name}: {file_sizes(folder)}")
    print(f"  softmax_scale {softmax_scale!r}, attention_scaling {rotary.attention_scaling!r}")
    print(f"  continuation {meta['continuation']['new_token_ids']}, reload bit-identical {reload_bits}")
    print(f"  router {route_stats}")
    return meta


# ---------------------------------------------------------------------------------------------------
# FP8


def e4m3_positive_values() -> torch.Tensor:
    codes = torch.arange(0, 0x7F, dtype=torch.uint8)  # 0x00..0x7E: +0, subnormals, normals up to 448
    return codes.view(torch.float8_e4m3fn).float()


def e4m3_inputs() -> tuple[torch.Tensor, list[dict]]:
    """The f32 inputs of the conversion table, grouped into labelled ranges."""
    pos = e4m3_positive_values().double()
    mids = ((pos[:-1] + pos[1:]) / 2).float()
    check(torch.equal(mids.double(), (pos[:-1] + pos[1:]) / 2), "midpoints are exact in f32")
    inf = torch.tensor(float("inf"))
    groups: list[tuple[str, torch.Tensor]] = []
    allcodes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()
    finite = allcodes[~torch.isnan(allcodes)]
    groups.append(("every finite code's exact value (codes 0x00..0xFE except 0x7F; includes +0 and -0)", finite))
    groups.append(("midpoints between adjacent positive codes (ties)", mids))
    groups.append(("midpoints between adjacent negative codes (ties)", -mids))
    groups.append(("one f32 ulp above each positive midpoint", torch.nextafter(mids, inf)))
    groups.append(("one f32 ulp below each positive midpoint", torch.nextafter(mids, -inf)))
    groups.append(("one f32 ulp above each negative midpoint (towards zero)", torch.nextafter(-mids, inf)))
    groups.append(("one f32 ulp below each negative midpoint (away from zero)", torch.nextafter(-mids, -inf)))
    tiny = torch.tensor(
        [2.0**-10, 2.0**-11, 2.0**-12, 3 * 2.0**-11, 1e-45, 1.17549435e-38, 1e-30, 2.0**-9 * 0.75, 2.0**-6 * 0.99]
    ).float()
    groups.append(("below or around the smallest subnormal 2^-9", torch.cat([tiny, -tiny])))
    big = torch.tensor(
        [
            448.0,
            449.0,
            464.0,
            float(np.nextafter(np.float32(464.0), np.float32(0))),
            float(np.nextafter(np.float32(464.0), np.float32(1e9))),
            470.0,
            479.0,
            float(np.nextafter(np.float32(480.0), np.float32(0))),
            480.0,
            481.0,
            500.0,
            512.0,
            1e4,
            65504.0,
            3.4028234663852886e38,
        ]
    ).float()
    groups.append(("at and beyond the largest finite value 448", torch.cat([big, -big])))
    specials = torch.tensor([-0.0, float("inf"), float("-inf"), float("nan"), -float("nan")]).float()
    groups.append(("specials: -0.0, inf, -inf, nan, -nan", specials))
    inputs = torch.cat([g for _, g in groups]).contiguous()
    table, start = [], 0
    for label, g in groups:
        table.append({"label": label, "start": start, "count": int(g.numel())})
        start += int(g.numel())
    return inputs, table


def quantize_blockwise(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's weight format: per 128x128 block, scale = amax / 448 and q = e4m3(w / scale); the
    stored `weight_scale_inv` is that scale (the multiplier that dequantises)."""
    r, c = w.shape
    br, bc = math.ceil(r / block), math.ceil(c / block)
    s = torch.empty(br, bc, dtype=torch.float32)
    q = torch.empty(r, c, dtype=torch.float8_e4m3fn)
    for i in range(br):
        for j in range(bc):
            blk = w[i * block : (i + 1) * block, j * block : (j + 1) * block]
            scale = blk.abs().max() / 448.0
            s[i, j] = scale
            q[i * block : (i + 1) * block, j * block : (j + 1) * block] = (blk / scale).to(torch.float8_e4m3fn)
    return q, s


def dequantize_blockwise(q: torch.Tensor, s: torch.Tensor, block: int = 128) -> torch.Tensor:
    """`x.float() * s` with each scale broadcast over its 128x128 block (edges cropped)."""
    r, c = q.shape
    full = s.repeat_interleave(block, 0).repeat_interleave(block, 1)[:r, :c]
    return q.float() * full


def fp8_case(out_root: Path, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    shapes = {
        "model.layers.0.mlp.down_proj": (256, 384),
        "model.layers.0.self_attn.kv_b_proj": (130, 200),
    }
    weights: dict[str, torch.Tensor] = {}
    golden: dict[str, torch.Tensor] = {}
    wdesc: dict[str, str] = {}
    gdesc: dict[str, str] = {}
    for name, (r, c) in shapes.items():
        # A different magnitude per block, so that a wrong block index shows in the result.
        br, bc = math.ceil(r / 128), math.ceil(c / 128)
        mag = torch.exp(torch.randn(br, bc, generator=gen) * 2.0)
        w = torch.randn(r, c, generator=gen) * mag.repeat_interleave(128, 0).repeat_interleave(128, 1)[:r, :c]
        q, s = quantize_blockwise(w)
        deq = dequantize_blockwise(q, s)
        # The same thing through a per-block loop, as DeepSeek's weight_dequant kernel computes it.
        loop = torch.empty_like(deq)
        for i in range(r):
            for j0 in range(0, c, 128):
                loop[i, j0 : j0 + 128] = q[i, j0 : j0 + 128].float() * s[i // 128, j0 // 128]
        check(bits_equal(loop, deq), f"{name}: blockwise dequantisation")
        weights[f"{name}.weight"] = q.contiguous()
        weights[f"{name}.weight_scale_inv"] = s.contiguous()
        wdesc[f"{name}.weight"] = f"FP8 E4M3 (torch.float8_e4m3fn) weight, [{r}, {c}] (out, in)"
        wdesc[f"{name}.weight_scale_inv"] = (
            f"f32 dequantisation multiplier per 128x128 block, [{br}, {bc}] = [ceil({r}/128), ceil({c}/128)], "
            "row-major: block (i, j) covers rows 128i.. and columns 128j.."
        )
        golden[f"{name}.weight"] = deq.contiguous()
        gdesc[f"{name}.weight"] = (
            f"f32 dequantised reference: weight.float() * weight_scale_inv[i // 128, j // 128], [{r}, {c}]; "
            "one correctly rounded f32 multiply per element, so an f32 implementation matches it bit for bit"
        )

    inputs, groups = e4m3_inputs()
    codes = inputs.to(torch.float8_e4m3fn).view(torch.uint8)
    all_codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    code_values = all_codes.view(torch.float8_e4m3fn).float()
    table = {
        "inputs": inputs,
        "codes": codes.contiguous(),
        "all_codes": all_codes.contiguous(),
        "all_code_values": code_values.contiguous(),
    }
    tdesc = {
        "inputs": "f32 inputs of the conversion (see golden.json e4m3_table.groups for what each range is)",
        "codes": "torch's inputs.to(torch.float8_e4m3fn).view(torch.uint8), the E4M3FN bit pattern per input",
        "all_codes": "every bit pattern 0..255",
        "all_code_values": "torch's decoding of every code to f32 (0x7F and 0xFF are NaN; there is no infinity)",
    }
    # The conversion must reproduce every finite code from its own value exactly.
    n_finite = groups[0]["count"]
    finite_codes = codes[:n_finite]
    check(bits_equal(finite_codes.view(torch.float8_e4m3fn).float(), inputs[:n_finite]), "exact values round-trip")

    def code_of(v: float) -> str:
        return f"0x{int(torch.tensor([v]).float().to(torch.float8_e4m3fn).view(torch.uint8)):02X}"

    observed = {
        str(v): code_of(v)
        for v in [448.0, 449.0, 464.0, 470.0, 479.0, 480.0, 1e4, float("inf"), -float("inf"), float("nan"), -0.0]
    }
    observed["-nan"] = code_of(-float("nan"))
    observed["2^-10 (tie between 0 and the smallest subnormal)"] = code_of(2.0**-10)
    observed["3 * 2^-10 (tie between codes 0x01 and 0x02)"] = code_of(3 * 2.0**-10)

    folder = out_root / "fp8_dequant"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    save_file(golden, folder / "golden.safetensors", metadata={"format": "pt"})
    save_file(table, folder / "e4m3_table.safetensors", metadata={"format": "pt"})
    meta = {
        "case": "fp8_dequant",
        "summary": "FP8 E4M3 weights in DeepSeek's checkpoint format, their dequantised f32 reference, and torch's "
        "f32 -> E4M3FN conversion table",
        "generated_by": "tools/goldens/make_goldens.py",
        "versions": versions(),
        "seed": seed,
        "block_size": 128,
        "quantisation": "per 128x128 block: weight_scale_inv = amax(|w|) / 448 (f32), weight = (w / weight_scale_inv)"
        ".to(torch.float8_e4m3fn) on the CPU; blocks at the edges are partial (130 = 128 + 2, 200 = 128 + 72)",
        "dequantisation": "golden[name] = model[name].float() * model[name + '_scale_inv'] broadcast per block",
        "e4m3_table": {
            "file": "e4m3_table.safetensors",
            "conversion": "torch CPU Tensor.to(torch.float8_e4m3fn) (c10 fp8e4m3fn_from_fp32_value)",
            "groups": groups,
            "observed": observed,
            "rules": [
                "round to nearest, ties to even (on the 3-bit mantissa; subnormals likewise, step 2^-9)",
                "finite values whose rounding would exceed 448, and +-inf, SATURATE to +-448 (0x7E / 0xFE)",
                "NaN maps to 0x7F, with the input's sign bit: -nan gives 0xFF",
                "-0.0 maps to 0x80",
                (
                    "older torch releases mapped every |x| >= 480 (and inf) to NaN 0x7F instead: this table is "
                    "specific to the torch version recorded here"
                ),
            ],
        },
        "files": {
            "model.safetensors": describe(weights, wdesc),
            "golden.safetensors": describe(golden, gdesc),
            "e4m3_table.safetensors": describe(table, tdesc),
        },
    }
    write_json(folder / "golden.json", meta)
    print(f"fp8_dequant: {file_sizes(folder)}")
    print(f"  observed {observed}")
    return meta


# ---------------------------------------------------------------------------------------------------

V3_NOTES = [
    (
        "Router (DeepseekV3TopkRouter): logits = F.linear(x.float(), gate.weight.float()) in f32; scores = sigmoid; "
        "selection uses scores + e_score_correction_bias; group score = sum of the top-2 biased scores of each group; "
        "the top topk_group groups are kept (torch.topk, sorted=False); experts of the other groups are masked to "
        "-inf (masked_fill(..., float('-inf')), NOT 0.0 as in older transformers and the remote code); top_k by "
        "torch.topk(sorted=False); weights = unbiased sigmoid scores gathered at the chosen experts, divided by "
        "(sum + 1e-20) when norm_topk_prob, then times routed_scaling_factor; everything in f32."
    ),
    "MoE output = sum_k w_k * expert_k(x) + shared_experts(x); experts are SwiGLU down(silu(gate(x)) * up(x)).",
    (
        "RMSNorm: x.float() * rsqrt(mean(x^2) + eps), cast back, times weight (eps = rms_norm_eps = 1e-6; the q_a and "
        "kv_a layernorms use transformers' default eps 1e-6 too, not read from the config)."
    ),
    (
        "Rope with rope_interleave=true (apply_rotary_pos_emb_interleave): pairs (x[2j], x[2j+1]) rotate by angle "
        "position * inv_freq[j]: y_re = x[2j] cos - x[2j+1] sin, y_im = x[2j+1] cos + x[2j] sin; the OUTPUT is "
        "de-interleaved, cat([all y_re], [all y_im]) on the last dim, for both q and k, so attention scores equal the "
        "interleaved-in/interleaved-out form, but a cached rotated key's element order differs from DeepSeek's. cos "
        "and sin are multiplied by attention_scaling before use."
    ),
    (
        "Softmax scale = qk_head_dim^-0.5 * mscale(factor, mscale_all_dim)^2 with mscale(f, m) = 0.1 m ln f + 1 when "
        "rope_type is not default and mscale_all_dim is non-zero (yarn_apply_mscale), whatever the sequence length."
    ),
    (
        "YaRN (modeling_rope_utils._compute_yarn_parameters): used whenever rope_type is yarn, whatever the "
        "sequence length; inv_freq in f32; truncate=true (floor/ceil of the correction range); attention_scaling = "
        "mscale(f, mscale) / mscale(f, mscale_all_dim) when both are non-zero, else mscale(f, 1)."
    ),
    "Attention: eager, causal, softmax in f32; no attention_mask was passed, so only the causal mask applies.",
    (
        "MTP: num_nextn_predict_layers = 0 here. transformers 5.24 does have a generic MTP module (MtpModel in "
        "modeling_layers.py) used only for speculative decoding via generate(use_mtp=True); it reads "
        "hidden_states[-1], i.e. the main model's FINAL-NORMED hidden state, computes eh_proj(cat[enorm(embed), "
        "hnorm(h)]) -> decoder block -> shared_head.norm -> lm_head. It is not exercised by these goldens."
    ),
]

# v3_tiny_mtp: the V3 notes with the MTP note replaced by what the case pins.
V3_MTP_NOTES = [n for n in V3_NOTES if not n.startswith("MTP:")] + [
    (
        "MTP (num_nextn_predict_layers = 1, layer 3), by transformers' generic MtpModel: mtp_logits = "
        "lm_head(shared_head.norm(DecoderLayer_3(eh_proj(cat([enorm(embed(mtp_tokens)), hnorm(h)], -1))))) with h "
        "= the main model's FINAL-NORMED hidden state (hidden_states.3), the embedding FIRST in the concatenation, "
        "no zeroing of the embedding at position 0, the MTP layer always MoE, the shared embedding and lm_head, "
        "rope at positions 1..9 (relative, so 0..8 agrees to rounding). See the mtp section."
    ),
]

V2_NOTES = [
    (
        "Router (DeepseekV2TopkRouter): logits = F.linear(x.float(), gate.weight.float()) in f32; scores = "
        "softmax(logits, f32) over all experts; topk_method greedy: torch.topk(scores, top_k, sorted=False); the "
        "weights are the softmax scores themselves times routed_scaling_factor (1.0); NO renormalisation (the V2 "
        "router never reads norm_topk_prob); no correction bias (no e_score_correction_bias tensor). For "
        "group_limited_greedy (not used here) V2 scores groups by their max and masks the other groups to 0.0, not "
        "-inf."
    ),
    (
        "Rope (DeepseekV2 apply_rotary_emb): complex multiplication. q_pe/k_pe are viewed as complex pairs "
        "(x[2j], x[2j+1]) (view_as_complex), multiplied by freqs_cis = polar(1, position * inv_freq[j]) * "
        "attention_scaling, and viewed back as real, so the layout is interleaved in AND out (unlike V3's "
        "rope_interleave path, which outputs the rotated pairs de-interleaved). Computed in f32. The config has no "
        "rope_interleave key; V2 is always interleaved."
    ),
    (
        "Softmax scale: same rule as V3 (yarn_apply_mscale): qk_head_dim^-0.5 * (0.1 * 0.707 * ln 4 + 1)^2 here. "
        "attention_scaling = mscale(4, 0.707) / mscale(4, 0.707) = 1.0."
    ),
    "q_lora_rank is null: q = q_proj(x) (no q_a/q_b, no q_a_layernorm).",
    "RMSNorm, MLP, MoE sum, eager causal attention and hidden-state reporting are as in DeepseekV3.",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "tests" / "goldens", help="output folder (default: %(default)s)")
    args = ap.parse_args()

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    transformers.logging.set_verbosity_error()
    check(hasattr(transformers, "DeepseekV2ForCausalLM"), "transformers has DeepseekV2ForCausalLM")
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"versions {versions()}")

    model_case(
        args.out,
        "v3_tiny_yarn",
        "v3",
        DeepseekV3ForCausalLM,
        v3_config(yarn(1.0, 1.0)),
        seed=1001,
        summary="tiny DeepSeek-V3 (q LoRA, noaux_tc group-limited sigmoid routing with a random correction bias, "
        "1 shared expert, 1 dense layer, YaRN factor 4 with mscale = mscale_all_dim = 1), f32",
        notes=V3_NOTES,
    )
    model_case(
        args.out,
        "v3_tiny_rope",
        "v3",
        DeepseekV3ForCausalLM,
        v3_config(None),
        seed=1002,
        summary="v3_tiny_yarn without rope_scaling (plain rope, theta 10000)",
        notes=V3_NOTES,
    )
    model_case(
        args.out,
        "v2_lite_tiny",
        "v2",
        DeepseekV2ForCausalLM,
        v2_config(),
        seed=1003,
        summary="tiny DeepSeek-V2-Lite (no q LoRA, greedy softmax routing without renormalisation, 2 shared "
        "experts, 1 dense layer, YaRN factor 4 with mscale = mscale_all_dim = 0.707), f32",
        notes=V2_NOTES,
    )
    fp8_case(args.out, seed=1004)
    model_case(
        args.out,
        "v3_tiny_mtp",
        "v3",
        DeepseekV3ForCausalLM,
        v3_config(yarn(1.0, 1.0), mtp_layers=1),
        seed=1005,
        summary="v3_tiny_yarn's architecture (other weights) with one multi-token-prediction module (layer 3, "
        "MoE) stored under DeepSeek-V3's checkpoint names, and its logits from transformers' MtpModel",
        notes=V3_MTP_NOTES,
        mtp_seed=1006,
    )
    total = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"total {total} bytes under {args.out}")


if __name__ == "__main__":
    sys.exit(main())
