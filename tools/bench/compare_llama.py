#!/usr/bin/env python3
"""kiln against llama.cpp on the CPU: one model, the same weights, the same threads, one run.

What it does, in order (see tools/bench/README.md for how to get llama.cpp):

1. `kiln export-hf SPEC --random-weights SEED` writes a Hugging Face folder in f32, and this script
   adds a byte-level tokenizer (tests/fixtures/tokenizer: ids 0 and 1 are the spec's BOS and EOS),
   since llama.cpp's converter needs one. Benchmarks feed token ids, so its merges do not matter.
2. llama.cpp's `convert_hf_to_gguf.py` turns that folder into one GGUF per llama.cpp format
   (f32, bf16, q8_0). Its pre-tokenizer check knows published tokenizers by hash, and ours is not
   one of them, so the script tells it "gpt-2" (a byte-level pre-tokenizer), which changes nothing
   the benchmark reads.
3. `llama-bench -t THREADS -p P1,P2 -n N -d 0,P1 -r ROUNDS -o json` measures prefill at each prompt
   length and decode at depth 0 and after the first prompt.
4. kiln compiles the spec for the CPU in each kiln format (f32; bf16, the spec with
   `dtype = "bf16"`, loading the same f32 checkpoint converted at load; fp8, the bf16 spec with
   DeepSeek-V3's `[quantization]` block, on the same checkpoint quantised here the way DeepSeek's
   FP8 checkpoints are: E4M3 codes and one scale per 128x128 block) and runs
   `kiln run --json --prompt-ids ... --max-new-tokens N --ignore-eos` ROUNDS times per prompt
   length. kiln's decode figure is the tokens after the first over their time, after the prompt:
   the same work as llama-bench's decode at depth P1.

The table gives each engine and format with its median and range over rounds, and the ratio of
kiln to llama.cpp at the same bytes per weight (f32:f32, bf16:bf16, fp8:q8_0). It is a measurement
to read; the script exits non-zero only when a step fails.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PAIRS = {"f32": "f32", "bf16": "bf16", "fp8": "q8_0"}
FP8_BLOCK = """
[quantization]             # DeepSeek-V3's quantization_config
method = "fp8"
format = "f8e4m3"
weight_block = [128, 128]
activation_scheme = "dynamic"
pow2_scale = false
"""
# With --fp8-head fp8 (the default): the output head in FP8 too, as q8_0 stores it in 8 bits.
FP8_HEAD = "modules_to_not_convert = []\n"


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        sys.exit(f"failed ({r.returncode}): {' '.join(map(str, cmd))}\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
    return r


def spec_variant(spec: Path, fmt: str, out: Path, fp8_head: bool) -> Path:
    """The spec in kiln format `fmt`: f32 as it is, bf16 with its dtype changed, fp8 also quantised
    (the output head too with `fp8_head`)."""
    if fmt == "f32":
        return spec
    lines = []
    for line in spec.read_text().splitlines():
        if line.split("#")[0].strip().startswith("dtype"):
            line = 'dtype = "bf16"'
        lines.append(line)
    text = "\n".join(lines) + "\n"
    if fmt == "fp8":
        if "[quantization]" in text:
            sys.exit(f"{spec} already has a [quantization] block: give the unquantised spec")
        text += FP8_BLOCK + (FP8_HEAD if fp8_head else "")
    path = out / f"{spec.stem}_{fmt}.toml"
    path.write_text(text)
    return path


def quantise_fp8(python: str, src: Path, dst: Path, fp8_head: bool) -> None:
    """DeepSeek-V3's FP8 checkpoint form of an f32 one: every `*_proj*.weight` matrix (and with
    `fp8_head` the output head's) as E4M3 codes with one f32 `weight_scale_inv` per 128x128 block
    (the last ones partial) (amax / 448, as DeepSeek's own checkpoints), the rest (embedding, router,
    norms) as it is. Written by torch, read by kiln's loader."""
    code = r"""
import json, sys, torch
from safetensors.torch import load_file, save_file
src, dst, head = sys.argv[1], sys.argv[2], sys.argv[3] == "fp8"
out = {}
for name, t in load_file(src + "/model.safetensors").items():
    quantised = "_proj" in name or (head and name == "lm_head.weight")
    if quantised and name.endswith(".weight") and t.dim() == 2:
        n, k = t.shape
        bn, bk = -(-n // 128), -(-k // 128)
        p = torch.zeros(bn * 128, bk * 128)
        p[:n, :k] = t.float()
        b = p.reshape(bn, 128, bk, 128)
        scale = (b.abs().amax(dim=(1, 3)) / 448.0).clamp(min=1e-12)
        out[name] = (b / scale[:, None, :, None]).reshape(bn * 128, bk * 128)[:n, :k].to(torch.float8_e4m3fn)
        out[name + "_scale_inv"] = scale.contiguous()
    else:
        out[name] = t.to(torch.bfloat16) if t.is_floating_point() else t
save_file(out, dst + "/model.safetensors")
config = json.load(open(src + "/config.json"))
config["torch_dtype"] = "bfloat16"
config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                 "weight_block_size": [128, 128]}
if head:
    config["quantization_config"]["modules_to_not_convert"] = []
json.dump(config, open(dst + "/config.json", "w"), indent=2)
"""
    dst.mkdir(parents=True, exist_ok=True)
    run([python, "-c", code, str(src), str(dst), "fp8" if fp8_head else "bf16"])


def gguf(llama: Path, python: str, hf: Path, outtype: str, out: Path) -> Path:
    path = out / f"model-{outtype}.gguf"
    driver = (
        "import sys; sys.path.insert(0, sys.argv[1]); "
        "import conversion.base as b; "
        "b.TextModel.get_vocab_base_pre = lambda self, tokenizer: 'gpt-2'; "
        "import convert_hf_to_gguf as c; "
        "sys.argv = ['convert_hf_to_gguf.py'] + sys.argv[2:]; c.main()"
    )
    run([python, "-c", driver, str(llama), str(hf), "--outtype", outtype, "--outfile", str(path)])
    return path


def llama_bench(llama: Path, model: Path, a) -> dict:
    """{("prefill", P) | ("decode", depth): [tok/s per round]} from llama-bench's JSON."""
    bench = llama / "build" / "bin" / "llama-bench"
    prompts = ",".join(map(str, a.prompts))
    r = run([str(bench), "-m", str(model), "-t", str(a.threads), "-p", prompts, "-n", str(a.new_tokens),
             "-d", f"0,{a.prompts[0]}", "-r", str(a.rounds), "-o", "json", *shlex.split(a.llama_flags)])
    out = {}
    for row in json.loads(r.stdout):
        if row["n_gen"] == 0:
            if row["n_depth"] == 0:
                out[("prefill", row["n_prompt"])] = row["samples_ts"]
        else:
            out[("decode", row["n_depth"])] = row["samples_ts"]
    return out


def kiln_bench(kiln: str, artifact: Path, weights: Path, a) -> dict:
    out: dict = {}
    for p in a.prompts:
        ids = ",".join(str((i * 7919 + 3) % a.vocab) for i in range(p))
        for _ in range(a.rounds):
            r = run([kiln, "run", str(artifact), "--weights", str(weights), "--prompt-ids", ids,
                     "--max-new-tokens", str(a.new_tokens), "--ignore-eos", "--threads", str(a.threads),
                     "--json"])
            doc = json.loads(r.stdout)
            speed = doc["stats"]
            out.setdefault(("prefill", p), []).append(speed["prefill_tokens_per_s"])
            if p == a.prompts[0]:
                out.setdefault(("decode", p), []).append(speed["decode_tokens_per_s"])
    return out


def cell(samples: list[float] | None) -> str:
    if not samples:
        return "-"
    med = statistics.median(samples)
    return f"{med:.1f} ({min(samples):.1f}-{max(samples):.1f})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("spec", nargs="?", default=str(ROOT / "models" / "bench.toml"))
    p.add_argument("--llama-cpp", required=True, type=Path,
                   help="a llama.cpp source tree with build/bin/llama-bench (tools/bench/README.md)")
    p.add_argument("--python", default=sys.executable,
                   help="a Python with torch, transformers and numpy, for convert_hf_to_gguf.py")
    p.add_argument("--kiln", default=str(ROOT / "target" / "release" / "kiln"))
    p.add_argument("--formats", default="f32,bf16,fp8", help="kiln formats, each against its llama.cpp pair")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompts", default="32,128")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--fp8-head", choices=["fp8", "bf16"], default="fp8",
                   help="kiln fp8's output head: in FP8 (`modules_to_not_convert = []`), as q8_0 stores it "
                        "in 8 bits, or in bf16 as DeepSeek-V3's release keeps it")
    p.add_argument("--llama-flags", default="",
                   help="more llama-bench arguments, for every format: `--repack 0` where llama.cpp's "
                        "repacked (AMX) q8_0 weights abort it (tools/bench/README.md)")
    p.add_argument("--keep", type=Path,
                   help="keep the checkpoints, GGUFs and artifacts here, and reuse the checkpoints and GGUFs")
    a = p.parse_args()
    a.prompts = [int(x) for x in a.prompts.split(",")]
    formats = a.formats.split(",")
    for f in formats:
        if f not in PAIRS:
            sys.exit(f"--formats: unknown format {f!r}; kiln's formats are {', '.join(PAIRS)}")
    spec = Path(a.spec).resolve()
    llama = a.llama_cpp.resolve()
    if not (llama / "build" / "bin" / "llama-bench").exists():
        sys.exit(f"{llama}/build/bin/llama-bench is missing: build llama.cpp as tools/bench/README.md says")
    if not Path(a.kiln).exists():
        sys.exit(f"{a.kiln} is missing: cargo build --release")

    work = a.keep or Path(tempfile.mkdtemp(prefix="kiln-llama-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        config = None
        results: dict = {}
        hf = work / "hf"
        if not (hf / "model.safetensors").exists():
            run([a.kiln, "export-hf", str(spec), "--random-weights", str(a.seed), "-o", str(hf)])
        config = json.loads((hf / "config.json").read_text())
        a.vocab = config["vocab_size"]
        tok = ROOT / "tests" / "fixtures" / "tokenizer" / "tokenizer.json"
        shutil.copy(tok, hf / "tokenizer.json")
        (hf / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>", "eos_token": "<eos>"}))

        for fmt in formats:
            outtype = PAIRS[fmt]
            model = work / f"model-{outtype}.gguf"
            if not model.exists():
                print(f"converting to GGUF {outtype} ...", file=sys.stderr)
                model = gguf(llama, a.python, hf, outtype, work)
            print(f"llama-bench {outtype} ...", file=sys.stderr)
            results[("llama.cpp", outtype)] = llama_bench(llama, model, a)

            head = a.fp8_head == "fp8"
            variant = spec_variant(spec, fmt, work, head)
            weights = hf
            if fmt == "fp8":
                weights = work / ("hf-fp8" if head else "hf-fp8-bf16-head")
                if not (weights / "model.safetensors").exists():
                    quantise_fp8(a.python, hf, weights, head)
            # Compiled every run (seconds), so a kept folder never measures an older kiln's kernels.
            artifact = work / f"{spec.stem}-{fmt}.kiln"
            shutil.rmtree(artifact, ignore_errors=True)
            run([a.kiln, "compile", str(variant), "--target", "cpu", "-o", str(artifact)])
            print(f"kiln {fmt} ...", file=sys.stderr)
            results[("kiln", fmt)] = kiln_bench(a.kiln, artifact, weights, a)

        p0 = a.prompts[0]
        cols = [("prefill", q) for q in a.prompts] + [("decode", p0)]
        heads = [f"prefill {q} tok/s" for q in a.prompts] + [f"decode @{p0} tok/s"]
        print(f"{config.get('model_type')} from {spec.name}, {a.threads} threads, batch 1, "
              f"{a.new_tokens} new tokens, median (range) of {a.rounds} rounds")
        print()
        print("| engine | format | " + " | ".join(heads) + " |")
        print("|---|---|" + "---:|" * len(heads))
        for fmt in formats:
            for engine, f in (("llama.cpp", PAIRS[fmt]), ("kiln", fmt)):
                r = results[(engine, f)]
                print(f"| {engine} | {f} | " + " | ".join(cell(r.get(c)) for c in cols) + " |")
        print()
        print("| kiln / llama.cpp | " + " | ".join(heads) + " |")
        print("|---|" + "---:|" * len(heads))
        for fmt in formats:
            k, l = results[("kiln", fmt)], results[("llama.cpp", PAIRS[fmt])]
            ratios = []
            for c in cols:
                if k.get(c) and l.get(c):
                    ratios.append(f"{statistics.median(k[c]) / statistics.median(l[c]):.2f}x")
                else:
                    ratios.append("-")
            print(f"| {fmt} : {PAIRS[fmt]} | " + " | ".join(ratios) + " |")
        print(f"\n(llama.cpp decode at depth 0: " + ", ".join(
            f"{PAIRS[f]} {cell(results[('llama.cpp', PAIRS[f])].get(('decode', 0)))}" for f in formats) + ")")
    finally:
        if a.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
