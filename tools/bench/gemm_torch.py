#!/usr/bin/env python3
"""PyTorch's CPU GEMM (oneDNN behind `torch.nn.functional.linear`), the baseline of `kiln bench gemm`.

`kiln bench gemm` writes each size's operands as raw little-endian f32 files into a temporary
folder, `x-DTYPE-N.f32` (M x K, M = N unless `--rows`, K = N unless `--k`) and `w-DTYPE-N.f32` (N x K),
row-major
(for bf16 the values are already bf16 values, so the conversion below is exact), and runs this
script with the venv of tools/goldens:

    python tools/bench/gemm_torch.py --dir DIR --sizes 256,1024 --dtypes f32,bf16 --threads 2 --reps 5

For each dtype and size it computes `y = x @ w^T` with `F.linear` in that dtype (f32 accumulation
inside oneDNN's kernels; a bf16 result), once to warm up and then `--reps` times, and keeps the
best time. It writes each result, widened to f32, to `y-DTYPE-N.f32` for kiln to check against its
own reference, and prints one JSON object: the seconds per dtype and size, the torch version,
its thread count, and whether oneDNN (mkldnn) is built in and the CPU has bf16 dot products.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--sizes", required=True, help="comma-separated N")
    ap.add_argument("--dtypes", default="f32", help="comma-separated: f32, bf16")
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--k", type=int, help="columns of x and w (default: N)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    results = []
    with torch.inference_mode():
        for name in a.dtypes.split(","):
            dtype = DTYPES[name]
            for n in (int(s) for s in a.sizes.split(",")):
                load = lambda what: torch.from_numpy(  # noqa: E731
                    np.fromfile(a.dir / f"{what}-{name}-{n}.f32", dtype="<f4").reshape(-1, a.k or n)
                ).to(dtype)
                x, w = load("x"), load("w")
                y = F.linear(x, w)
                best = float("inf")
                for _ in range(max(a.reps, 1)):
                    t = time.perf_counter()
                    y = F.linear(x, w)
                    best = min(best, time.perf_counter() - t)
                y.float().numpy().astype("<f4").tofile(a.dir / f"y-{name}-{n}.f32")
                results.append({"dtype": name, "n": n, "seconds": best})
    print(json.dumps({
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "bf16_dot": bool(getattr(torch.backends.mkldnn, "is_bf16_supported", lambda: False)()),
        "results": results,
    }))


if __name__ == "__main__":
    main()
