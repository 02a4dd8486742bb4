#!/usr/bin/env bash
# A small task learned end to end on the CPU: models/tiny.toml (random weights) is pre-trained with
# `kiln train` on the hundred one-digit sums as text (`6+3=9`), fine-tuned with `kiln sft` on eight
# of them as chats (tests/fixtures/chat/arith.jsonl) until it answers some, then `kiln grpo` raises
# its exact-answer reward on the same prompts. Prints the exact-answer reward at the SFT level
# (GRPO's first steps sample the SFT model) and after GRPO, as means over 5 steps.
#
#   scripts/arith-rl.sh [OUT_DIR]      (default target/arith-rl; about a minute on 2 cores, release build)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-target/arith-rl}
kiln=${KILN:-target/release/kiln}
[ -x "$kiln" ] || cargo build --release --quiet --bin kiln
rm -rf "$out" && mkdir -p "$out"
"$kiln" export-hf models/tiny.toml --random-weights 3 -o "$out/tiny-chat" >/dev/null
cp tests/fixtures/tokenizer/tokenizer.json tests/fixtures/chat/tiny/tokenizer_config.json "$out/tiny-chat/"
python3 - "$out/sums.jsonl" <<'PY'
import json, sys
with open(sys.argv[1], "w") as f:
    for a in range(10):
        for b in range(10):
            f.write(json.dumps({"text": f"{a}+{b}={a + b}"}) + "\n")
PY
"$kiln" train "$out/tiny-chat" --data "$out/sums.jsonl" --seq-len 32 --batch 8 --steps 150 --lr 0.003 \
    --shuffle 0 --weight-decay 0 --out "$out/pre" | tail -n 2
"$kiln" sft "$out/pre/step-150" --data tests/fixtures/chat/arith.jsonl --batch 8 --epochs 25 --lr 0.003 \
    --schedule constant --weight-decay 0 --out "$out/sft" | tail -n 2
"$kiln" grpo "$out/sft/step-25" --prompts tests/fixtures/chat/arith-prompts.jsonl --out "$out/grpo" \
    --steps 40 --prompts-per-step 8 --group 8 --max-new-tokens 3 --lr 0.002 --kl 0.01 --weight-decay 0 \
    --seed 0 | grep -E '^(grpo|step +(1|40) |saved|report)'
python3 - "$out/grpo/metrics.jsonl" <<'PY'
import json, sys
r = [json.loads(l)["rewards"]["exact"] for l in open(sys.argv[1])]
first, last = sum(r[:5]) / 5, sum(r[-5:]) / 5
print(f"exact-answer reward: {first:.3f} over steps 1-5 (the SFT model), {last:.3f} over steps 36-40 "
      f"(+{last - first:.3f} in 40 GRPO steps of 64 completions)")
PY
