#!/usr/bin/env python3
"""Golden gradients of DeepSeek-V3's two auxiliary training losses, for kiln's train-step tests.

Writes `tests/goldens/train_aux/` (see README.md next to this file): a small DeepSeek-V3 with one MTP
module, one fixed batch, and the loss and the gradient of every parameter of

    total = CE + lambda / D * sum_k L_MTP^k + L_Bal        (lambda = 0.3, D = 1, alpha = 0.01)

split into its three terms, each with its own gradients, so that a consumer can check each term on
its own (the balance term's gradients are small beside the others' and could hide inside a tolerance
on the total).

transformers 5.24 has neither loss: `DeepseekV3ForCausalLM` computes only the next-token loss (its
`aux_loss_alpha` and `seq_aux` are unused) and `MtpModel`, its generic MTP module, only drafts tokens
for speculative decoding (its `labels` branch adds to `None`). So:

- the main trunk is transformers' `DeepseekV3ForCausalLM` (eager attention and experts, f32); its
  next-token cross-entropy is `F.cross_entropy` over every target, and the routers' logits are taken
  from forward hooks on every `DeepseekV3TopkRouter`;
- the MTP module is transformers' `MtpModel` built on that model (its embedding and head are the main
  model's), run with its own per-layer step `forward_layer` and `_project_to_logits` on the main
  model's final-normed hidden state, as `generate(use_mtp=True)` does; its decoder block is
  transformers' `DeepseekV3DecoderLayer` (always MoE) and its router is hooked like the others;
- the MTP loss (report eq. 24-25) and the complementary sequence-wise balance loss (eq. 17-20) are
  written here, from the equations (see `mtp_loss` and `balance_loss`).

The script is deterministic (fixed seeds, one CPU thread, deterministic algorithms) and is run by
hand, never by `cargo test`. It needs no kiln binary. It refuses to write anything if a self-check
fails; see README.md for the list.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
from transformers.modeling_layers import MtpModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_goldens as mg  # the model, MTP and router helpers
from make_train import hub_tensors  # fused experts -> checkpoint names

REPO = Path(__file__).resolve().parents[2]

# A self-check: a failure aborts the run before anything is written.
check = mg.check

# Weights: the main model from MAIN_SEED (transformers' init, then make_goldens' norm gains and
# correction bias), the MTP module from MTP_SEED; the batch from numpy's default_rng(TOKEN_SEED).
MAIN_SEED = 2031
MTP_SEED = 2032
TOKEN_SEED = 2033
ROWS = 2
WIDTH = 17  # T + 1: inputs row[:16], targets row[1:]
VOCAB = 128

MTP_LAMBDA = 0.3
DEPTH = 1
BALANCE_ALPHA = 0.01

# A consumer whose router scores differ from these by less than the smallest gap at a selection
# boundary chooses the same experts; the batch and seeds are kept only if every gap is above this
# floor (kiln's interpreter agrees with torch's router logits to about 1e-7).
MARGIN_FLOOR = 1e-5
# Each wrong convention must move its own term's gradients by more than this fraction of the term's
# largest gradient (kiln's test holds a term to 2e-3 of it, five times less).
CONVENTION_FLOOR = 1e-2


def config() -> DeepseekV3Config:
    """v3_tiny_mtp's architecture (make_goldens.py) at half its width, with two main layers: every
    feature of DeepSeek-V3's (q LoRA, latent KV with a decoupled rope part, YaRN, a dense first
    layer, group-limited sigmoid routing with a correction bias, a shared expert, one MTP module)."""
    return DeepseekV3Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        first_k_dense_replace=1,
        moe_layer_freq=1,  # not read by transformers; kiln reads it
        num_attention_heads=2,
        num_key_value_heads=2,
        q_lora_rank=16,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=8,
        n_routed_experts=16,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        n_shared_experts=1,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        scoring_func="sigmoid",  # hard-coded in transformers; kept for kiln
        topk_method="noaux_tc",  # likewise
        rope_interleave=True,
        rope_scaling=mg.yarn(1.0, 1.0),
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        initializer_range=0.1,  # as make_goldens: O(1) activations, routing not degenerate
        bos_token_id=0,
        eos_token_id=1,
        attention_bias=False,
        hidden_act="silu",
        num_nextn_predict_layers=DEPTH,
    )


def build(dtype=torch.float32):
    """The main model and its MTP module, in training mode, with every weight drawn from the seeds."""
    model = mg.build_model(DeepseekV3ForCausalLM, config(), MAIN_SEED)
    mtp = mg.build_mtp(model, MTP_SEED)
    model.train()
    mtp.train()
    if dtype != torch.float32:
        model.to(dtype)
        mtp.layers.to(dtype)
    return model, mtp


def named_parameters(model, mtp) -> list[tuple[str, torch.nn.Parameter]]:
    """Every trained parameter once, under transformers' names for the main model and the checkpoint's
    layer names for the MTP module (`model.layers.{L + k - 1}.*`; `post_norm` is `shared_head.norm`).
    The embedding and head the MTP module shares are the main model's parameters."""
    named = list(model.named_parameters())
    seen = {id(p) for _, p in named}
    check(id(mtp.embed_tokens.weight) in seen and id(mtp.shared_head.weight) in seen, "MTP shares embed and head")
    n = model.config.num_hidden_layers
    for name, p in mtp.layers.named_parameters():
        k, rest = name.split(".", 1)
        if rest.startswith("mtp_block."):
            rest = rest.removeprefix("mtp_block.")
        elif rest == "post_norm.weight":
            rest = "shared_head.norm.weight"
        check(id(p) not in seen, f"MTP parameter {name} is its own")
        named.append((f"model.layers.{n + int(k)}.{rest}", p))
    return named


def routers(model, mtp) -> list[tuple[str, torch.nn.Module]]:
    """Every router, by the scope kiln gives its MoE layer (the MTP module's is layer L)."""
    out = [
        (f"model.layers.{i}.mlp", layer.mlp.gate)
        for i, layer in enumerate(model.model.layers)
        if hasattr(layer.mlp, "gate")
    ]
    n = model.config.num_hidden_layers
    out += [(f"model.layers.{n + k}.mlp", layer.mtp_block.mlp.gate) for k, layer in enumerate(mtp.layers)]
    return out


def balance_loss(logits: torch.Tensor, selected: torch.Tensor, top_k: int, variant: str | None) -> torch.Tensor:
    """The complementary sequence-wise balance loss of one MoE layer (report eq. 17-20), averaged over
    the sequences of the batch:

        L_Bal = alpha sum_i f_i P_i,   f_i = N_r / (K_r T) sum_t 1(s_{i,t} in Topk({s_{j,t} | 1 <= j <= N_r}, K_r)),
        s'_{i,t} = s_{i,t} / sum_j s_{j,t},   P_i = 1/T sum_t s'_{i,t}

    with s = sigmoid(router logits). f_i counts the top K_r of the raw affinities over ALL routed
    experts, as eq. 18 writes it: no correction bias and no group limit (those decide the routing,
    eq. 16, not f_i); it is a count, so it has no gradient. `logits` [B, T, E]; `selected` [B, T, K]
    is what the router chose, used only by the wrong convention `f_from_selection`."""
    b, t, e = logits.shape
    s = logits.sigmoid()
    p = (s / s.sum(-1, keepdim=True)).mean(1)  # [B, E]
    if variant == "p_from_unnormalised_scores":
        p = s.mean(1)
    top = selected if variant == "f_from_selection" else s.topk(top_k, dim=-1).indices
    hot = torch.zeros(b, t, e, dtype=s.dtype).scatter_(-1, top, 1.0)
    f = hot.sum(1) * (e / (top_k * t))  # [B, E]
    if variant == "batch_level_instead_of_per_sequence":
        f, p = f.mean(0, keepdim=True), p.mean(0, keepdim=True)
    return BALANCE_ALPHA * (f * p).sum(-1).mean()


def mtp_loss(logits: torch.Tensor, rows: torch.Tensor, variant: str | None) -> torch.Tensor:
    """L_MTP^1 (report eq. 24) over the batch: position i (0-based) of module 1 embeds token i + 1 and
    predicts token i + 2, which exists for i < T - 1; the sum of its cross-entropies is divided by T
    per sequence (eq. 24's 1/T, although only T - 1 terms are summed) and averaged over sequences."""
    b, t, v = logits.shape
    valid = t - DEPTH
    ce = F.cross_entropy(logits[:, :valid].reshape(-1, v), rows[:, DEPTH + 1 :].reshape(-1), reduction="sum")
    return ce / (b * valid) if variant == "mtp_mean_over_its_targets" else ce / (b * t)


def losses(model, mtp, rows: torch.Tensor, variant: str | None = None) -> dict:
    """Every loss term on `rows` [B, T + 1] with the autograd graph kept, plus what the self-checks
    read: the logits, the routers' logits and choices, the final norm's input and output."""
    b, w = rows.shape
    t = w - 1
    inputs, targets = rows[:, :t], rows[:, 1:]
    positions = torch.arange(t)[None].expand(b, -1)
    seen: dict[str, dict] = {}
    handles = []
    for scope, gate in routers(model, mtp):

        def hook(m, args, out, scope=scope):
            seen[scope] = {"input": args[0], "logits": out[0], "indices": out[2]}

        handles.append(gate.register_forward_hook(hook))
    norm: dict[str, torch.Tensor] = {}
    handles.append(model.model.norm.register_forward_hook(lambda m, a, o: norm.update(raw=a[0], normed=o)))
    try:
        logits = model(input_ids=inputs, position_ids=positions, use_cache=False).logits
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        # generate(use_mtp=True) hands MtpModel the final-normed hidden state (make_goldens checks it);
        # kiln rotates the MTP block at the hidden state's positions 0..T-1 (transformers at 1..T;
        # rope is relative, the two agree to rounding).
        hidden = norm["raw"] if variant == "mtp_hidden_before_final_norm" else norm["normed"]
        mtp_ids = rows[:, 1 : t + 1]
        h = mtp.forward_layer(0, hidden, positions, None, input_ids=mtp_ids)
        mtp_logits = mtp._project_to_logits(h)
    finally:
        for h_ in handles:
            h_.remove()
    l_mtp = mtp_loss(mtp_logits, rows, variant)
    mtp_term = MTP_LAMBDA / DEPTH * l_mtp
    k = model.config.num_experts_per_tok
    per_router = {}
    for scope, r in seen.items():
        if variant == "balance_without_the_mtp_router" and scope.startswith(
            f"model.layers.{model.config.num_hidden_layers}."
        ):
            continue
        e = r["logits"].shape[-1]
        per_router[scope] = balance_loss(r["logits"].view(b, t, e), r["indices"].view(b, t, k), k, variant)
    bal = sum(per_router.values())
    if variant == "balance_mean_over_layers":
        bal = bal / len(per_router)
    return {
        "ce": ce,
        "mtp": mtp_term,
        "balance": bal,
        "total": ce + mtp_term + bal,
        "mtp_loss": l_mtp,
        "balance_per_router": per_router,
        "logits": logits,
        "mtp_logits": mtp_logits,
        "mtp_ids": mtp_ids,
        "positions": positions,
        "hidden": norm["normed"],
        "routers": seen,
    }


TERMS = ("ce", "mtp", "balance")


def gradients(out: dict, named) -> dict[str, dict[str, torch.Tensor]]:
    """d term / d parameter for each term and for the total, under the checkpoint's names (one tensor
    per routed expert); an unused parameter's gradient is zero."""
    params = [p for _, p in named]
    result = {}
    for term in (*TERMS, "total"):
        gs = torch.autograd.grad(out[term], params, retain_graph=True, allow_unused=True)
        pairs = [(n, torch.zeros_like(p) if g is None else g) for (n, p), g in zip(named, gs)]
        result[term] = checkpoint_names(pairs)
    return result


def checkpoint_names(pairs) -> dict[str, torch.Tensor]:
    """Tensors under transformers' names as the checkpoint names them (the fused experts split)."""
    out: dict[str, torch.Tensor] = {}
    for name, t in pairs:
        for k, v in hub_tensors(name, t).items():
            check(k not in out, f"{k} once")
            out[k] = v
    return out


def f64_losses(out: dict, rows: torch.Tensor, top_k: int) -> dict[str, float]:
    """The three terms recomputed in float64 from the captured logits, written out loop by loop from
    the equations (no code shared with `balance_loss` / `mtp_loss`)."""
    b, w = rows.shape
    t = w - 1
    r = rows.tolist()

    def mean_ce(logits, target_at, count):
        lp = torch.log_softmax(logits.detach().double(), dim=-1)
        total = 0.0
        for bi in range(b):
            for i in range(t):
                tgt = target_at(bi, i)
                if tgt is not None:
                    total -= lp[bi, i, tgt].item()
        return total / count

    ce = mean_ce(out["logits"], lambda bi, i: r[bi][i + 1], b * t)
    l1 = mean_ce(out["mtp_logits"], lambda bi, i: r[bi][i + 2] if i + 2 <= t else None, b * t)
    bal = 0.0
    for rt in out["routers"].values():
        s = torch.sigmoid(rt["logits"].detach().double()).view(b, t, -1).tolist()
        e = len(s[0][0])
        per_seq = []
        for bi in range(b):
            f = [0.0] * e
            p = [0.0] * e
            for i in range(t):
                row = s[bi][i]
                for j in sorted(range(e), key=lambda j: -row[j])[:top_k]:
                    f[j] += e / (top_k * t)
                total = sum(row)
                for j in range(e):
                    p[j] += row[j] / total / t
            per_seq.append(BALANCE_ALPHA * sum(fj * pj for fj, pj in zip(f, p)))
        bal += sum(per_seq) / b
    return {"ce": ce, "mtp": MTP_LAMBDA / DEPTH * l1, "balance": bal}


def router_stats(model, mtp, out: dict) -> dict:
    """Per router: the choices recomputed independently, how many tokens the bias and the group limit
    change, how many tokens' eq.-18 top-K differs from the choice, and the margins at every boundary."""
    cfg = model.config
    k = cfg.num_experts_per_tok
    gates = dict(routers(model, mtp))
    stats = {}
    for scope, r in out["routers"].items():
        gate = gates[scope]
        x = r["input"].detach().reshape(-1, cfg.hidden_size)
        logits = F.linear(x.float(), gate.weight.detach().float())
        check(torch.equal(logits, r["logits"].detach()), f"{scope}: router logits recomputed")
        bias = gate.e_score_correction_bias
        chosen = [frozenset(v.tolist()) for v in r["indices"]]
        check(mg.route_v3(logits, bias, cfg.n_group, cfg.topk_group, k) == chosen, f"{scope}: choices recomputed")
        plain = mg.route_v3(logits, bias, cfg.n_group, cfg.topk_group, k, group_limit=False)
        unbiased = mg.route_v3(logits, None, cfg.n_group, cfg.topk_group, k)
        s = torch.sigmoid(logits)
        eq18 = [frozenset(v.tolist()) for v in s.topk(k, dim=-1).indices]
        top = s.topk(k + 1, dim=-1).values
        sel, grp = mg.selection_margins(logits, bias, cfg.n_group, cfg.topk_group, k)
        stats[scope] = {
            "tokens": len(chosen),
            "bias_changes": sum(a != c for a, c in zip(unbiased, chosen)),
            "group_limit_changes": sum(a != c for a, c in zip(plain, chosen)),
            "eq18_topk_differs_from_choice": sum(a != c for a, c in zip(eq18, chosen)),
            "selection_margin_min": sel,
            "group_margin_min": grp,
            "eq18_topk_margin_min": (top[:, k - 1] - top[:, k]).min().item(),
        }
    return stats


def max_abs(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    check(a.keys() == b.keys(), "the same tensors")
    return max((a[n].double() - b[n].double()).abs().max().item() for n in a)


def largest(a: dict[str, torch.Tensor]) -> float:
    return max(t.abs().max().item() for t in a.values())


# Conventions a consumer could get wrong; each changes one term (see `conventions`).
VARIANTS = {
    "f_from_selection": (
        "balance",
        (
            "f_i counts the experts the router chose (biased, group-limited) instead of eq. 18's top-K of the "
            "raw affinities over all experts"
        ),
    ),
    "p_from_unnormalised_scores": (
        "balance",
        "P_i averages the raw sigmoid scores instead of s' = s / sum_j s_j (the HF remote code's seq_aux)",
    ),
    "batch_level_instead_of_per_sequence": ("balance", "f and P over the whole batch instead of per sequence"),
    "balance_mean_over_layers": ("balance", "the layers' balance losses averaged instead of summed"),
    "balance_without_the_mtp_router": ("balance", "no balance loss on the MTP module's router"),
    "mtp_mean_over_its_targets": ("mtp", "L_MTP divided by the T - 1 targets instead of eq. 24's T"),
    "mtp_hidden_before_final_norm": ("mtp", "the MTP module reads the last layer's output before the final norm"),
}


def conventions(rows: torch.Tensor, golden: dict) -> dict:
    """How far each wrong convention moves its term's loss and gradients; each must move the gradients
    by more than CONVENTION_FLOOR of the term's largest gradient."""
    out = {}
    for variant, (term, what) in VARIANTS.items():
        model, mtp = build()
        r = losses(model, mtp, rows, variant)
        g = gradients(r, named_parameters(model, mtp))[term]
        d = max_abs(g, golden["grads"][term])
        rel = d / largest(golden["grads"][term])
        check(rel > CONVENTION_FLOOR, f"{variant} moves the {term} gradients by {rel} of their largest")
        out[variant] = {
            "term": term,
            "what": what,
            "loss_abs_diff": abs(r[term].item() - golden["losses"][term]),
            "grad_max_abs_diff": d,
            "grad_diff_over_largest_grad": rel,
        }
    return out


def run(rows: torch.Tensor) -> dict:
    """One fresh build, the losses and every gradient."""
    model, mtp = build()
    out = losses(model, mtp, rows)
    named = named_parameters(model, mtp)
    grads = gradients(out, named)
    return {
        "model": model,
        "mtp": mtp,
        "out": out,
        "named": named,
        "grads": grads,
        "losses": {k: out[k].item() for k in (*TERMS, "total", "mtp_loss")},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--out",
        type=Path,
        default=REPO / "tests" / "goldens" / "train_aux",
        help="output folder (default: %(default)s)",
    )
    args = ap.parse_args()

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    transformers.logging.set_verbosity_error()
    print(f"versions {mg.versions()}")

    rows_np = np.random.default_rng(TOKEN_SEED).integers(0, VOCAB, size=(ROWS, WIDTH), dtype=np.int64)
    rows = torch.from_numpy(rows_np)
    b, t = ROWS, WIDTH - 1

    first = run(rows)
    model, mtp, out, grads, loss = first["model"], first["mtp"], first["out"], first["grads"], first["losses"]
    cfg = model.config
    check(cfg.attention_dropout == 0.0, "no attention dropout")
    check(cfg.first_k_dense_replace == 1 and mtp.config.first_k_dense_replace == 0, "dense layer 0; MTP block MoE")

    # Deterministic: a fresh build gives the same numbers bit for bit.
    second = run(rows)
    check(first["losses"] == second["losses"], "the losses are reproduced")
    for term in grads:
        check(all(mg.bits_equal(grads[term][n], second["grads"][term][n]) for n in grads[term]), f"{term} reproduced")

    # The total's gradient is the sum of the terms' (autograd on the sum vs on each term).
    summed = {n: grads["ce"][n] + grads["mtp"][n] + grads["balance"][n] for n in grads["total"]}
    sum_diff = max_abs(summed, grads["total"])
    check(
        sum_diff <= 1e-6 * largest(grads["total"]),
        f"total gradient = sum of the terms' ({sum_diff} vs {largest(grads['total'])})",
    )

    # Independent float64 recomputation of the three terms from the captured logits.
    f64 = f64_losses(out, rows, cfg.num_experts_per_tok)
    f64_diff = {k: abs(f64[k] - loss[k]) / abs(f64[k]) for k in TERMS}
    check(all(d <= 1e-6 for d in f64_diff.values()), f"float64 loop recomputation of the terms: {f64_diff}")

    # transformers' own next-token loss on the [B, T + 1] rows equals the cross-entropy term.
    with torch.no_grad():
        own = model(input_ids=rows, labels=rows, use_cache=False).loss.item()
    check(abs(own - loss["ce"]) <= 1e-6 * loss["ce"], f"transformers' own loss {own} vs {loss['ce']}")

    # MtpModel.forward (what generate(use_mtp=True) calls) gives the last position's MTP logits.
    with torch.no_grad():
        _, last, _ = mtp(
            input_ids=out["mtp_ids"],
            last_hidden_states=out["hidden"],
            attention_mask=None,
            position_ids=out["positions"],
            mtp_cache=None,
        )
    fwd_diff = (last[:, 0] - out["mtp_logits"][:, -1]).abs().max().item()
    check(fwd_diff <= 1e-6, f"MtpModel.forward's last-position logits differ by {fwd_diff}")

    # Routing: recomputed, live bias and group limit, eq. 18's top-K apart from the choice, margins.
    stats = router_stats(model, mtp, out)
    check(len(stats) == 2, "two routers: main layer 1 and the MTP layer")
    for scope, s in stats.items():
        check(s["bias_changes"] > 0 and s["group_limit_changes"] > 0, f"{scope}: bias and group limit matter")
        check(s["eq18_topk_differs_from_choice"] > 0, f"{scope}: eq. 18's top-K is not the choice")
        for key in ("selection_margin_min", "group_margin_min", "eq18_topk_margin_min"):
            check(s[key] > MARGIN_FLOOR, f"{scope}: {key} {s[key]} above {MARGIN_FLOOR}")

    # Every term reaches the parameters it should.
    n = cfg.num_hidden_layers

    def nonzero(term: str, name: str) -> bool:
        return bool(grads[term][name].any())

    check(not any(nonzero("ce", k) for k in grads["ce"] if k.startswith(f"model.layers.{n}.")), "CE skips MTP")
    for name in (
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.layers.0.self_attn.q_a_proj.weight",
        f"model.layers.{n}.eh_proj.weight",
        f"model.layers.{n}.enorm.weight",
        f"model.layers.{n}.hnorm.weight",
        "model.norm.weight",
    ):
        check(nonzero("mtp", name), f"the MTP term reaches {name}")
    for name in (
        "model.layers.1.mlp.gate.weight",
        f"model.layers.{n}.mlp.gate.weight",
        "model.embed_tokens.weight",
        "model.layers.0.mlp.up_proj.weight",
        f"model.layers.{n}.eh_proj.weight",
    ):
        check(nonzero("balance", name), f"the balance term reaches {name}")
    for name in ("lm_head.weight", f"model.layers.{n}.shared_head.norm.weight"):
        check(not nonzero("balance", name), f"the balance term does not reach {name}")

    # Float64 (transformers still computes the routers' logits, its RMSNorm statistics and softmaxes of
    # attention in f32): how far rounding alone moves each term.
    m64, mtp64 = build(torch.float64)
    o64 = losses(m64, mtp64, rows)
    g64 = gradients(o64, named_parameters(m64, mtp64))
    rounding = {
        term: {
            "loss_abs_diff": abs(o64[term].item() - loss[term]),
            "grad_max_abs_diff": max_abs(g64[term], grads[term]),
            "grad_diff_over_largest_grad": max_abs(g64[term], grads[term]) / largest(grads[term]),
        }
        for term in (*TERMS, "total")
    }
    conv = conventions(rows, first)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "train_aux"
        model.save_pretrained(folder)
        extra = mg.mtp_checkpoint(mtp, model)
        with safe_open(folder / "model.safetensors", "pt") as f:
            main_tensors = {k: f.get_tensor(k) for k in f.keys()}
        check(not (extra.keys() & main_tensors.keys()), "MTP tensor names are new")
        weights = {**main_tensors, **extra}
        save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
        copies = {f"model.layers.{n}.embed_tokens.weight", f"model.layers.{n}.shared_head.head.weight"}
        trained = {k for k in weights if k not in copies and not k.endswith("e_score_correction_bias")}
        check(trained == set(grads["total"]), "a gradient for every trained tensor of the checkpoint")
        for k in trained:
            check(weights[k].shape == grads["total"][k].shape, f"{k}: gradient shape")

        # Reload through transformers (the main model) and its MTP loader: the same numbers.
        re = DeepseekV3ForCausalLM.from_pretrained(folder, attn_implementation="eager", experts_implementation="eager")
        re._keys_to_ignore_on_load_unexpected = [rf"model\.layers\.{n}\..*"]
        re_mtp = MtpModel.from_pretrained(re)
        re_mtp.set_attn_implementation("eager")
        re_mtp.set_experts_implementation("eager")
        re.train()
        re_mtp.train()
        ro = losses(re, re_mtp, rows)
        rg = gradients(ro, named_parameters(re, re_mtp))
        check(all(ro[k].item() == loss[k] for k in (*TERMS, "total")), "the reloaded checkpoint gives the losses")
        for term in rg:
            check(all(mg.bits_equal(rg[term][k], grads[term][k]) for k in rg[term]), f"reloaded {term} gradients")

        save_file({"tokens": rows}, folder / "tokens.safetensors", metadata={"format": "pt"})
        files = {
            "total": "grads.safetensors",
            "ce": "grads_ce.safetensors",
            "mtp": "grads_mtp.safetensors",
            "balance": "grads_balance.safetensors",
        }
        for term, file in files.items():
            save_file({k: v.contiguous() for k, v in grads[term].items()}, folder / file, metadata={"format": "pt"})
            with safe_open(folder / file, "pt") as f:
                check(all(mg.bits_equal(f.get_tensor(k), grads[term][k]) for k in f.keys()), f"{file} reads back")

        largest_grad = {term: largest(grads[term]) for term in grads}
        meta = {
            "generated_by": "tools/goldens/make_train_aux.py",
            "versions": mg.versions(),
            "torch_threads": torch.get_num_threads(),
            "deterministic_algorithms": True,
            "dtype": "float32",
            "device": "cpu",
            "model": {
                "config": "config.json (transformers' save_pretrained; scoring_func, topk_method, moe_layer_freq kept "
                "for kiln)",
                "weights": "model.safetensors: the main model under the hub's names (one tensor per routed expert) and "
                f"the MTP module as layer {n} under DeepSeek-V3's checkpoint names, with the copies "
                f"model.layers.{n}.embed_tokens.weight and model.layers.{n}.shared_head.head.weight",
                "main_seed": MAIN_SEED,
                "mtp_seed": MTP_SEED,
                "init": "transformers' init with initializer_range 0.1, RMSNorm gains 1 + 0.1 N(0, 1), correction "
                "biases 0.1 N(0, 1) (make_goldens.build_model); the MTP module: N(0, 0.1) matrices, the same gains "
                "and bias (make_goldens.build_mtp)",
                "parameters": len(grads["total"]),
                "elements": sum(v.numel() for v in grads["total"].values()),
            },
            "batch": {
                "file": "tokens.safetensors",
                "tensor": "tokens",
                "shape": [ROWS, WIDTH],
                "token_seed": TOKEN_SEED,
                "token_rng": f"numpy.random.default_rng({TOKEN_SEED}).integers(0, {VOCAB}, ({ROWS}, {WIDTH}), "
                "dtype=int64)",
                "inputs": f"tokens[:, :{t}] at positions 0..{t - 1}",
                "targets": "tokens[:, 1:]",
                "mtp_tokens": f"module 1, position i: tokens[:, i + 1] (tokens[:, 1:{t + 1}])",
                "mtp_targets": f"module 1, position i: tokens[:, i + 2], for i < {t - 1} (mask 0 at position {t - 1})",
            },
            "hyperparameters": {"mtp_lambda": MTP_LAMBDA, "mtp_depth": DEPTH, "balance_alpha": BALANCE_ALPHA},
            "losses": {
                "total": loss["total"],
                "ce": loss["ce"],
                "mtp": loss["mtp"],
                "mtp_loss_1": loss["mtp_loss"],
                "balance": loss["balance"],
                "balance_per_router": {k: v.item() for k, v in out["balance_per_router"].items()},
                "float64_loop_recomputation_relative_diff": f64_diff,
            },
            "definitions": {
                "total": "ce + mtp + balance",
                "ce": f"F.cross_entropy(logits.reshape(-1, {VOCAB}), tokens[:, 1:].reshape(-1)): the mean over all "
                f"{b * t} targets (= transformers' own model(input_ids=tokens, labels=tokens).loss)",
                "mtp": f"lambda / D * L_MTP^1 with lambda = {MTP_LAMBDA}, D = {DEPTH} (report eq. 25); L_MTP^1 = "
                f"sum over the {b * (t - 1)} positions with a target of -log softmax(mtp_logits)[target], divided "
                f"by B * T = {b * t} (eq. 24: 1/T per sequence although only T - 1 terms are summed, averaged over "
                "sequences)",
                "mtp_module": "h' = eh_proj(cat([enorm(embed(mtp_tokens)), hnorm(final-normed main hidden state)])), "
                "h = DeepseekV3DecoderLayer (MoE) at positions 0..T-1, mtp_logits = lm_head(shared_head.norm(h)); "
                "transformers' MtpModel.forward_layer and _project_to_logits",
                "balance": f"sum over the MoE routers (main layer 1 and the MTP layer {n}) of alpha * the mean over "
                "the sequences of sum_i f_i P_i, alpha = "
                f"{BALANCE_ALPHA}, with per sequence f_i = N_r / (K_r T) * #{{t : i in top-K_r of s_t over all N_r "
                "experts}} (eq. 18: the raw sigmoid affinities, no correction bias, no group limit; no gradient), "
                "P_i = 1/T sum_t s_{i,t} / sum_j s_{j,t} (eq. 19-20), s = sigmoid(router logits)",
                "balance_combination": "the report gives L_Bal per sequence and says nothing of layers or batches; "
                "the sum over layers and the mean over sequences are those of Megatron-LM's seq_aux_loss and the HF "
                "remote code (each layer's loss added to the total), and of kiln's build_train",
            },
            "files": {
                "grads.safetensors": "d total / d parameter, f32, the checkpoint's names (no router bias: a buffer; no "
                "MTP copies of the embedding and head)",
                "grads_ce.safetensors": "d ce / d parameter (zero for the MTP layer's own tensors)",
                "grads_mtp.safetensors": "d mtp / d parameter",
                "grads_balance.safetensors": "d balance / d parameter (zero for lm_head, shared_head.norm and the "
                "MTP experts)",
                "tokens.safetensors": f"the batch, I64 [{ROWS}, {WIDTH}]",
            },
            "largest_gradient": largest_grad,
            "routing": {
                "per_router": stats,
                "note": "bias_changes / group_limit_changes: tokens whose expert set differs without the correction "
                "bias / without the group limit; eq18_topk_differs_from_choice: tokens whose top-K of the raw scores "
                "over all experts (balance f_i) is not the routed set; margins: the smallest gap at each selection "
                f"boundary (biased choice, group choice, eq. 18 top-K), each above {MARGIN_FLOOR}",
            },
            "rounding": {
                "float64": rounding,
                "note": "the same losses and gradients with the model in float64 (transformers keeps the router "
                "logits and RMSNorm statistics in f32): how far rounding alone moves each term",
            },
            "conventions": {
                **conv,
                "note": "each wrong convention computed on the same batch: how far it moves its term's loss and "
                f"gradients; each moves the gradients by more than {CONVENTION_FLOOR} of the term's largest gradient",
            },
            "checks": {
                "deterministic": "a second build reproduces every loss and gradient bit for bit",
                "total_is_sum_of_terms_max_abs_diff": sum_diff,
                "transformers_own_loss_abs_diff": abs(own - loss["ce"]),
                "mtp_forward_last_position_max_abs_diff": fwd_diff,
                "reload": "DeepseekV3ForCausalLM.from_pretrained and MtpModel.from_pretrained (its layer pattern "
                f"pointed at layer {n}) reproduce every loss and gradient bit for bit",
            },
        }
        mg.write_json(folder / "golden.json", meta)
        # generation_config.json only repeats bos/eos; config.json is what kiln imports.
        (folder / "generation_config.json").unlink(missing_ok=True)
        if args.out.exists():
            shutil.rmtree(args.out)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(folder, args.out)

    print(f"train_aux: {mg.file_sizes(args.out)}")
    print(f"  losses {loss}")
    print(f"  largest gradient per term {largest_grad}")
    print(f"  float64 loop recomputation {f64_diff}; total = sum of terms to {sum_diff:.3g}")
    for scope, s in stats.items():
        print(f"  {scope}: {s}")
    for term, r in rounding.items():
        print(f"  float64 {term}: {r}")
    for v, c in conv.items():
        print(f"  {v}: {c}")


if __name__ == "__main__":
    sys.exit(main())
