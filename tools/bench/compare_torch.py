#!/usr/bin/env python3
"""kiln against PyTorch eager (Hugging Face transformers) on the same model and weights.

Given a kiln model spec, a seed, a prompt length and a number of new tokens, this:

1. writes a Hugging Face checkpoint folder with `kiln export-hf SPEC --random-weights SEED` (into a
   temporary directory);
2. compiles the spec with `kiln compile SPEC --target cpu` and runs `kiln bench run ARTIFACT
   --weights DIR`, whose table gives the compiled artifact's and the reference interpreter's prefill
   and decode tokens/s (the artifact, compiled with its KV cache, prefills the prompt once and then
   decodes one token per step over the cache; the interpreter recomputes the whole sequence at each
   step);
3. runs `kiln run ARTIFACT --weights DIR` once more for the generated token ids;
4. loads the same folder with transformers (`AutoModelForCausalLM`, the config's dtype, eager
   attention, `torch.set_num_threads(THREADS)`) and times greedy generation, batch 1: one forward
   pass over the prompt (prefill, which gives the first token), then one token at a time with
   transformers' KV cache (`past_key_values`);
5. checks that kiln's and PyTorch's first generated tokens agree and prints the throughputs side by
   side with the ratio kiln / PyTorch.

The prompt is the one `kiln bench run` uses: id i is (i * 7919 + 3) mod vocab. Both sides get one
warm-up pass first. Speeds are defined as in kiln: prefill tok/s = prompt tokens / time to first
token; decode tok/s = (new tokens - 1) / time of the remaining steps.

Run with the venv of tools/goldens (torch 2.15, transformers 5.24), from the repository root, after
`cargo build --release`:

    ~/.cache/kiln-venv/bin/python tools/bench/compare_torch.py models/bench.toml --prompt-len 32 --new-tokens 8
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def sh(args: list[str]) -> str:
    """Runs a command, echoing it; returns its standard output or exits with its error."""
    print("$ " + " ".join(args), file=sys.stderr, flush=True)
    r = subprocess.run(args, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"{args[0]} failed ({r.returncode}):\n{r.stdout}{r.stderr}")
    return r.stdout


def parse_bench(text: str) -> dict:
    """The rows of `kiln bench run`'s table: {'kiln artifact': (prefill, decode, ttft_ms), ...}."""
    rows = {}
    for label in ("kiln artifact", "interpreter"):
        m = re.search(rf"^{label}\s+([\d.]+)\s+([\d.]+|-)\s+([\d.]+)\s*$", text, re.M)
        if not m:
            sys.exit(f"cannot find the `{label}` row in kiln bench run's output:\n{text}")
        decode = None if m.group(2) == "-" else float(m.group(2))
        rows[label] = (float(m.group(1)), decode, float(m.group(3)))
    same = re.search(r"^tokens: (.*)$", text, re.M)
    rows["tokens"] = same.group(1) if same else "?"
    return rows


def parse_run_tokens(text: str) -> list[int]:
    """The new tokens of `kiln run --json`'s document."""
    try:
        return [int(t) for t in json.loads(text)["tokens"]]
    except (ValueError, KeyError, TypeError) as e:
        sys.exit(f"cannot read the generated tokens of kiln run --json ({e}):\n{text}")


def torch_generate(folder: Path, prompt: list[int], new_tokens: int, threads: int) -> dict:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    # The MTP tensors of a spec with [mtp] are listed as unexpected keys (transformers' causal LM has
    # no MTP module); kiln's binder uses them, transformers rightly ignores them.
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(threads)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
        json.loads((folder / "config.json").read_text()).get("dtype", "float32")
    ]
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="eager")
    model.eval()
    load_s = time.perf_counter() - t
    experts = getattr(model.config, "_experts_implementation", None)

    def run() -> tuple[list[int], float, float]:
        ids = torch.tensor([prompt], dtype=torch.long)
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = model(input_ids=ids, use_cache=True)
            tok = int(out.logits[0, -1].argmax())
            t1 = time.perf_counter()
            tokens, past = [tok], out.past_key_values
            for _ in range(new_tokens - 1):
                out = model(input_ids=torch.tensor([[tok]]), past_key_values=past, use_cache=True)
                tok = int(out.logits[0, -1].argmax())
                tokens.append(tok)
                past = out.past_key_values
            t2 = time.perf_counter()
        return tokens, t1 - t0, t2 - t1

    run_warm = run()  # warm-up: allocator, lazy initialisation, page faults
    tokens, prefill_s, decode_s = run()
    assert tokens == run_warm[0], "PyTorch is not deterministic across two runs"
    return {
        "tokens": tokens,
        "prefill": len(prompt) / prefill_s,
        "decode": (new_tokens - 1) / decode_s if new_tokens > 1 else None,
        "ttft_ms": prefill_s * 1e3,
        "load_s": load_s,
        "experts": experts,
        "versions": f"torch {torch.__version__}, transformers {__import__('transformers').__version__}",
    }


def fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("spec", type=Path, help="kiln model spec (models/*.toml)")
    ap.add_argument("--seed", type=int, default=1, help="seed of the random weights (default 1)")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2, help="threads for kiln and torch (default 2)")
    ap.add_argument("--check-tokens", type=int, default=4, help="how many first tokens must agree")
    ap.add_argument("--kiln", type=Path, default=REPO / "target/release/kiln")
    ap.add_argument("--keep", type=Path, help="keep the checkpoint and artifact in this folder")
    a = ap.parse_args()
    if a.prompt_len < 1 or a.new_tokens < 1:
        sys.exit("--prompt-len and --new-tokens must be at least 1")
    kiln = str(a.kiln)

    with tempfile.TemporaryDirectory(prefix="kiln-compare-") as tmp:
        work = a.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        ckpt, art = work / "hf", work / "artifact.kiln"
        sh([kiln, "export-hf", str(a.spec), "--random-weights", str(a.seed), "-o", str(ckpt)])
        vocab = json.loads((ckpt / "config.json").read_text())["vocab_size"]
        ctx = max(64, a.prompt_len + a.new_tokens)
        sh([kiln, "compile", str(a.spec), "--target", "cpu", "--max-context", str(ctx), "-o", str(art)])
        bench_text = sh([kiln, "bench", "run", str(art), "--weights", str(ckpt), "--prompt-len",
                         str(a.prompt_len), "--new-tokens", str(a.new_tokens), "--threads", str(a.threads)])
        bench = parse_bench(bench_text)
        prompt = [(i * 7919 + 3) % vocab for i in range(a.prompt_len)]
        n_check = min(a.check_tokens, a.new_tokens)
        run_text = sh([kiln, "run", str(art), "--weights", str(ckpt), "--prompt-ids", ",".join(map(str, prompt)),
                       "--max-new-tokens", str(n_check), "--ignore-eos", "--threads", str(a.threads), "--json"])
        kiln_tokens = parse_run_tokens(run_text)
        print(f"$ torch: {ckpt} (eager attention, {a.threads} threads)", file=sys.stderr, flush=True)
        pt = torch_generate(ckpt, prompt, a.new_tokens, a.threads)

    name = a.spec.stem
    print(f"compare {name}: seed {a.seed}, {a.prompt_len} prompt tokens, {a.new_tokens} new tokens, greedy, "
          f"batch 1, {a.threads} threads; {pt['versions']}, experts implementation {pt['experts']}")
    print("kiln's artifact decodes over its KV cache and PyTorch over transformers' KV cache; "
          "kiln's interpreter recomputes the whole sequence at each step")
    print(f"{'engine':<22} {'prefill tok/s':>14} {'decode tok/s':>14} {'first token ms':>16}")
    for label in ("kiln artifact", "interpreter"):
        p, d, t = bench[label]
        print(f"{'kiln ' + label if label == 'interpreter' else label:<22} {p:>14.1f} {fmt(d):>14} {t:>16.2f}")
    print(f"{'pytorch eager':<22} {pt['prefill']:>14.1f} {fmt(pt['decode']):>14} {pt['ttft_ms']:>16.2f}")
    kp, kd, _ = bench["kiln artifact"]
    dr = "-" if kd is None or pt["decode"] is None else f"{kd / pt['decode']:.2f}x"
    print(f"{'ratio kiln / pytorch':<22} {kp / pt['prefill']:>13.2f}x {dr:>14}")
    print(f"kiln artifact vs interpreter tokens: {bench['tokens']}")
    agree = kiln_tokens[:n_check] == pt["tokens"][:n_check]
    print(f"first {n_check} tokens: kiln {kiln_tokens[:n_check]}, pytorch {pt['tokens'][:n_check]}: "
          f"{'agree' if agree else 'DIFFER'}")
    if not agree:
        sys.exit(1)


if __name__ == "__main__":
    main()
