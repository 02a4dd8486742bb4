#!/usr/bin/env python3
"""Golden next-token losses from Hugging Face transformers for `kiln perplexity`.

Writes `tests/goldens/perplexity/` (see README.md next to this file):

- `tokens.safetensors`: a fixed token set, tensor `tokens` (I64, [3, 33]): 3 rows of T + 1 = 33 ids in
  0..512 from a seeded numpy generator, the safetensors format `kiln_runtime::data` reads.
- `tokens_u16.bin`: a flat little-endian u16 stream of 100 ids (the same generator), the `.bin` format.
- `golden.safetensors`: per-token losses (f32) `token_loss` [3, 32] for the rows and
  `stream_token_loss` [6, 16] for the stream cut with seq_len 16 (rows of 17 tokens starting every 16
  tokens, as llm.c and nanoGPT cut it; the 3 tokens that fill no row are dropped).
- `golden.json`: the spec, seeds, shapes, mean losses, perplexities, token counts, the stream's
  cutting, the package versions, and notes on what the numbers mean.

The model is models/tiny.toml with `--random-weights 3`, exported by `kiln export-hf` (the binary is
given with `--kiln`) and loaded with `AutoModelForCausalLM.from_pretrained`: exactly the weights
`kiln perplexity --random-weights 3` uses. The mean loss is transformers' OWN loss,
`model(input_ids=rows, labels=rows).loss` (transformers shifts the labels itself), so a consumer is
checked against transformers' definition of the loss, not against a re-implementation of it.

The script is deterministic (fixed seeds, one CPU thread, eager attention and eager experts, f32) and
is run by hand, never by `cargo test`. It refuses to write anything if a self-check fails: the
checkpoint loads with no missing key and no unexpected key outside the MTP layer, and bit for bit;
the per-token losses (F.cross_entropy on the shifted logits) average to transformers' loss within
1e-6 relative and agree with a float64 log-softmax; the stream's rows are checked against the cutting
rule; and the written token files are read back.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import math
import platform
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
from transformers import AutoModelForCausalLM

REPO = Path(__file__).resolve().parents[2]

SPEC = "models/tiny.toml"
WEIGHTS_SEED = 3
# The numpy generator's seed for the token set and the stream.
TOKEN_SEED = 2027
N_ROWS = 3
WIDTH = 33  # T + 1
STREAM_TOKENS = 100
SEQ_LEN = 16

# The packages whose versions decide the numbers; recorded in golden.json.
PACKAGES = ["torch", "transformers", "safetensors", "numpy", "huggingface_hub"]


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


def load(folder: Path, mtp_layer: int):
    """The exported model, checked to hold exactly the file's weights."""
    model, info = AutoModelForCausalLM.from_pretrained(
        folder,
        attn_implementation="eager",
        experts_implementation="eager",
        dtype=torch.float32,
        output_loading_info=True,
    )
    model.eval()
    check(not info["missing_keys"], f"no weight is missing (randomly initialised): {info['missing_keys']}")
    check(not info["mismatched_keys"] and not info["error_msgs"], f"clean load: {info}")
    # The MTP module (layer num_hidden_layers) is not part of DeepseekV3ForCausalLM's forward pass.
    stray = [k for k in info["unexpected_keys"] if not k.startswith(f"model.layers.{mtp_layer}.")]
    check(not stray, f"every unexpected key is the MTP layer's: {stray}")

    state = model.state_dict()
    compared = 0
    with safe_open(folder / "model.safetensors", "pt") as f:
        names = set(f.keys())
        for name, t in state.items():
            if name in names:
                check(bits_equal(t, f.get_tensor(name)), f"{name} loads bit for bit")
                compared += 1
            elif name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
                # transformers fuses the per-expert tensors: gate_up_proj [E, 2I, H] = cat(gate, up) on
                # dim 1, down_proj [E, H, I].
                prefix = name.rsplit(".", 1)[0]
                n = t.shape[0]
                if name.endswith("gate_up_proj"):
                    want = torch.stack(
                        [
                            torch.cat([f.get_tensor(f"{prefix}.{e}.{p}_proj.weight") for p in ("gate", "up")], 0)
                            for e in range(n)
                        ]
                    )
                else:
                    want = torch.stack([f.get_tensor(f"{prefix}.{e}.down_proj.weight") for e in range(n)])
                check(bits_equal(t, want), f"{name} equals the stacked per-expert tensors bit for bit")
                compared += 1
            else:
                # Rope frequencies are computed from the config, not stored.
                check(name.endswith(("rotary_emb.inv_freq", "rotary_emb.original_inv_freq")), f"{name} is stored")
    return model, compared


def cut_stream(stream: np.ndarray, seq_len: int) -> tuple[np.ndarray, int]:
    """Rows of seq_len + 1 tokens starting every seq_len tokens; returns the rows and the dropped count."""
    n = len(stream)
    rows = (n - 1) // seq_len
    out = np.stack([stream[k * seq_len : k * seq_len + seq_len + 1] for k in range(rows)])
    return out, n - (rows * seq_len + 1)


def losses(model, rows: torch.Tensor, what: str) -> dict:
    """transformers' loss on `rows`, with per-token and per-row losses, self-checked."""
    with torch.no_grad():
        out = model(input_ids=rows, labels=rows)
    loss = out.loss
    logits = out.logits[:, :-1, :]
    targets = rows[:, 1:]
    n, t = targets.shape
    token = F.cross_entropy(logits.reshape(n * t, -1), targets.reshape(n * t), reduction="none").reshape(n, t)
    rel = abs(token.double().mean().item() - loss.item()) / abs(loss.item())
    check(rel <= 1e-6, f"{what}: the per-token losses average to transformers' loss (relative difference {rel})")
    ref = -torch.log_softmax(logits.double(), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    f64_diff = (ref - token.double()).abs().max().item()
    check(f64_diff <= 1e-5, f"{what}: per-token losses agree with a float64 log-softmax ({f64_diff})")
    check(bool(torch.isfinite(token).all()), f"{what}: every loss is finite")
    mean = loss.item()
    return {
        "token_loss": token.float().contiguous(),
        "meta": {
            "rows": n,
            "width": t + 1,
            "T": t,
            "targets": n * t,
            "mean_loss": mean,
            "perplexity": math.exp(mean),
            "row_mean_loss": token.double().mean(1).tolist(),
            "per_token_mean_vs_loss_relative_diff": rel,
            "per_token_vs_float64_max_abs_diff": f64_diff,
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kiln", type=Path, required=True, help="the kiln binary whose export-hf writes the model")
    ap.add_argument(
        "--out",
        type=Path,
        default=REPO / "tests" / "goldens" / "perplexity",
        help="output folder (default: %(default)s)",
    )
    args = ap.parse_args()

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    transformers.logging.set_verbosity_error()
    print(f"versions {versions()}")

    rng = np.random.default_rng(TOKEN_SEED)
    rows_np = rng.integers(0, 512, size=(N_ROWS, WIDTH), dtype=np.int64)
    stream_np = rng.integers(0, 512, size=STREAM_TOKENS, dtype=np.int64).astype("<u2")
    stream_rows_np, dropped = cut_stream(stream_np.astype(np.int64), SEQ_LEN)
    # The cutting rule: every token after the first is a target once, in order.
    check(stream_rows_np.shape == ((STREAM_TOKENS - 1) // SEQ_LEN, SEQ_LEN + 1), "stream rows' shape")
    used = stream_rows_np.shape[0] * SEQ_LEN + 1
    check(np.array_equal(stream_rows_np[:, 1:].reshape(-1), stream_np[1:used]), "stream targets cover it once")
    check(dropped == STREAM_TOKENS - used and dropped < SEQ_LEN, "dropped count")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        hf = tmp / "hf"
        kiln_version = export(args.kiln.resolve(), hf)
        config = json.loads((hf / "config.json").read_text())
        check(config["vocab_size"] == 512, "the spec's vocabulary is 512")
        model, compared = load(hf, config["num_hidden_layers"])

        rows = losses(model, torch.from_numpy(rows_np), "rows")
        stream = losses(model, torch.from_numpy(stream_rows_np), "stream")

        out = tmp / "out"
        out.mkdir()
        # One metadata key only: several would be written in hash order, so bytes would vary by run.
        save_file({"tokens": torch.from_numpy(rows_np)}, out / "tokens.safetensors", metadata={"format": "pt"})
        (out / "tokens_u16.bin").write_bytes(stream_np.tobytes())
        save_file(
            {"token_loss": rows["token_loss"], "stream_token_loss": stream["token_loss"]},
            out / "golden.safetensors",
            metadata={"format": "pt"},
        )
        # Read the token files back as a consumer would.
        with safe_open(out / "tokens.safetensors", "pt") as f:
            check(f.get_tensor("tokens").dtype == torch.int64, "tokens are I64")
            check(np.array_equal(f.get_tensor("tokens").numpy(), rows_np), "tokens.safetensors reads back")
        back = np.frombuffer((out / "tokens_u16.bin").read_bytes(), dtype="<u2")
        check(np.array_equal(back, stream_np) and back.size == STREAM_TOKENS, "tokens_u16.bin reads back")

        meta = {
            "generated_by": "tools/goldens/make_perplexity.py",
            "versions": versions(),
            "torch_threads": torch.get_num_threads(),
            "attn_implementation": "eager",
            "experts_implementation": "eager",
            "dtype": "float32",
            "model": {
                "spec": SPEC,
                "random_weights": WEIGHTS_SEED,
                "exported_by": f"{kiln_version}: kiln export-hf {SPEC} --random-weights {WEIGHTS_SEED}",
                "loaded_by": "AutoModelForCausalLM.from_pretrained (DeepseekV3ForCausalLM)",
                "model_safetensors_sha256": sha256(hf / "model.safetensors"),
                "config_json_sha256": sha256(hf / "config.json"),
                "weights_compared_bit_for_bit": compared,
                "vocab_size": config["vocab_size"],
                "note": "the MTP layer (model.layers.4.*) is in the export but not in DeepseekV3ForCausalLM: "
                "these are the main model's next-token losses; if kiln's random weights change, the sha256 "
                "above changes and this golden must be remade",
            },
            "token_seed": TOKEN_SEED,
            "token_rng": "numpy.random.default_rng(token_seed): first integers(0, 512, (3, 33)) for the rows, "
            "then integers(0, 512, 100) for the stream",
            "rows": {
                "file": "tokens.safetensors",
                "tensor": "tokens",
                "dtype": "I64",
                "shape": [N_ROWS, WIDTH],
                **rows["meta"],
                "losses": "token_loss in golden.safetensors, [3, 32] f32",
            },
            "stream": {
                "file": "tokens_u16.bin",
                "dtype": "u16",
                "byte_order": "little endian",
                "tokens": STREAM_TOKENS,
                "seq_len": SEQ_LEN,
                "cutting": "rows of seq_len + 1 tokens starting every seq_len tokens (consecutive rows share "
                "one token; every token after the first is a target once); tokens that fill no row are dropped",
                "tokens_used": used,
                "dropped": dropped,
                **stream["meta"],
                "losses": f"stream_token_loss in golden.safetensors, {list(stream['token_loss'].shape)} f32",
            },
            "notes": [
                "mean_loss is transformers' OWN loss: model(input_ids=rows, labels=rows).loss. transformers "
                "shifts the labels itself, so it is the mean next-token cross-entropy (natural log) over all "
                "N * T targets: inputs rows[:, :-1], targets rows[:, 1:].",
                "perplexity = exp(mean_loss).",
                "token_loss[i, j] = F.cross_entropy(logits[i, j], rows[i, j + 1]), the loss of predicting token "
                "j + 1 of row i from tokens 0..j; row_mean_loss is its mean over j.",
                "Each row is one sequence starting at position 0, with no attention mask (every row is full).",
                "The random weights predict almost uniformly, so mean losses sit near ln(512) = 6.238 and a "
                "wrong model can come close on the mean alone: compare token_loss token by token (it spreads "
                "over about 5.9..6.7), not only the mean.",
            ],
        }
        write_json(out / "golden.json", meta)

        if args.out.exists():
            shutil.rmtree(args.out)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(out, args.out)

    sizes = {p.name: p.stat().st_size for p in sorted(args.out.iterdir())}
    print(f"perplexity: {sizes}")
    for what, r in (("rows", rows), ("stream", stream)):
        m = r["meta"]
        print(
            f"  {what}: {m['rows']} x T={m['T']} ({m['targets']} targets), mean loss {m['mean_loss']!r}, "
            f"perplexity {m['perplexity']!r}"
        )
    print(f"  stream dropped {dropped}")


if __name__ == "__main__":
    sys.exit(main())
