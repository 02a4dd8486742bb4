#!/usr/bin/env bash
# Renders a `kiln report` page in a real headless browser, Debian's Chromium, to a PNG, so that a
# person (or a reviewer) can look at what the page shows. Not part of `make test`: it installs
# Chromium (quietly, and only when it is missing) and takes a few seconds.
#
#   scripts/check-report.sh [RUN_DIR|REPORT.html] [OUT.png]
#
# Without a RUN_DIR it trains models/tiny.toml for 12 steps with a poisoned batch at step 10 and
# `--on-anomaly rollback` (so the page has an alert to mark) into target/check-report/run, and
# writes its report. The screenshot goes to OUT.png (default: target/check-report/report.png).
# Chromium runs without network, sync or component updates, on a throwaway profile.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
work="$root/target/check-report"
mkdir -p "$work"
input=${1:-}
png=${2:-$work/report.png}

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"
    elif command -v sudo >/dev/null; then sudo "$@"
    else echo "check-report: need root (or sudo) to run: $*" >&2; exit 1
    fi
}

if ! command -v chromium >/dev/null; then
    echo "check-report: installing Debian's chromium" >&2
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi

kiln="$root/target/debug/kiln"
if [ ! -x "$kiln" ]; then
    (cd "$root" && cargo build -q)
fi

if [ -z "$input" ]; then
    python3 - "$work/data.safetensors" <<'EOF'
import json, struct, sys
# 40 rows of a 4-token cycle: learnt within a few steps, so a poisoned batch stands out.
rows = [[10 + (r + k) % 4 for k in range(17)] for r in range(40)]
data = b"".join(struct.pack("<q", t) for row in rows for t in row)
head = json.dumps({"tokens": {"dtype": "I64", "shape": [len(rows), 17], "data_offsets": [0, len(data)]}}).encode()
head += b" " * ((8 - len(head) % 8) % 8)
open(sys.argv[1], "wb").write(struct.pack("<Q", len(head)) + head + data)
EOF
    rm -rf "$work/run"
    (cd "$root" && "$kiln" train models/tiny.toml --random-weights 1 --data "$work/data.safetensors" \
        --steps 12 --batch 2 --lr 1e-2 --bias-update-speed 0.01 --save-every 4 --spike-window 5 --spike-warmup 4 \
        --on-anomaly rollback --inject-fault poison-batch@10 --out "$work/run" >/dev/null)
    input="$work/run"
fi
if [ -d "$input" ]; then
    "$kiln" report "$input"
    page="$input/report.html"
else
    page=$input
fi
page=$(cd "$(dirname "$page")" && pwd)/$(basename "$page")

profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
chromium --headless --no-sandbox --disable-gpu --disable-background-networking \
    --disable-component-update --disable-sync --no-first-run --user-data-dir="$profile" \
    --screenshot="$png" --window-size=1400,2400 "file://$page" 2>/dev/null
echo "check-report: $page rendered to $png"
