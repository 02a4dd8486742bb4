#!/usr/bin/env python3
"""PyTorch eager's train step on a Hugging Face folder, the baseline of `kiln bench train`.

`kiln bench train` writes the model it trains (config.json and model.safetensors, the same random
weights) and its token batch (`tokens.safetensors`, tensor `tokens` [B, T + 1]) into a temporary
folder and runs this script with the venv of tools/goldens (torch, transformers):

    python tools/bench/train_torch.py --model DIR --tokens FILE --steps N --threads T

It loads the folder with transformers (`AutoModelForCausalLM`, f32, the default attention and
experts implementations: what a user of transformers gets), sets `torch.set_num_threads(T)`, and
runs one warm-up step and N timed steps of what kiln's train step does: the mean next-token
cross-entropy of inputs `tokens[:, :-1]` against targets `tokens[:, 1:]` (B x T of each, as kiln
feeds them), backward, `clip_grad_norm_(1.0)`, `torch.optim.AdamW(lr 1e-3, betas
0.9 / 0.95, eps 1e-8, weight decay 0.1)` over every parameter, `zero_grad(set_to_none=False)` so
the gradients stay allocated as kiln's do. The peak resident memory is measured from after the
load (Linux's `/proc/self/clear_refs` resets `VmHWM`), the way kiln measures its own. It prints one
JSON object: the losses, the seconds of each timed step, the peak, and the versions.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import time
from pathlib import Path


def vm(field: str) -> int | None:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--tokens", type=Path, required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--threads", type=int, required=True)
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    tokens = load_file(args.tokens)["tokens"].to(torch.long)
    inputs, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    try:
        Path("/proc/self/clear_refs").write_text("5")
        reset = True
    except OSError:
        reset = False

    losses, seconds = [], []
    for step in range(args.steps + 1):
        t0 = time.perf_counter()
        logits = model(input_ids=inputs).logits
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=False)
        dt = time.perf_counter() - t0
        losses.append(loss.item())
        if step > 0:
            seconds.append(dt)
    print(
        json.dumps(
            {
                "losses": losses,
                "step_seconds": seconds,
                "peak_rss_kib": vm("VmHWM") if reset else None,
                "params": sum(p.numel() for p in params),
                "versions": {p: importlib.metadata.version(p) for p in ["torch", "transformers"]},
                "attn_implementation": model.config._attn_implementation,
            }
        )
    )


if __name__ == "__main__":
    main()
