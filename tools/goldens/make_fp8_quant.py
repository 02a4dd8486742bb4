#!/usr/bin/env python3
"""Golden FP8 block quantisation with ragged edges, for kiln's `quantize` (ir/src/interp/ops/quant.rs).

Writes `tests/goldens/fp8_quant/golden.json`: inputs whose quantised dimensions are not multiples of
the block, quantised by PyTorch with DeepSeek-V3's rules (reference section 4): per tile of `block`
over the trailing dimensions (edge tiles shorter), `amax = max(max |x|, 1e-4)`, `scale = amax / 448`
(with `pow2`, rounded up to a power of two: `scale_fmt = "ue8m0"`), `q = (x / scale)` converted with
`Tensor.to(torch.float8_e4m3fn)` on the CPU. Each case records the input (f32), the scales (f32) and
the codes (the E4M3 bytes), all computed in float32 as kiln computes them.

The cases: activations `[3, 200]` in 1 x 128 tiles (a 72-wide edge tile per row), with and without
power-of-two scales; a weight `[130, 140]` in 128 x 128 blocks (edges of 2 rows and 12 columns); and
`[2, 5]` in 1 x 4 tiles with a row of zeros and tiny values (the amax floor). Run by hand from the
repository root with a Python that has torch:

    python3 tools/goldens/make_fp8_quant.py
"""

import json
import math
from pathlib import Path

import torch

FLOOR = 1e-4
E4M3_MAX = 448.0


def pow2_ceil(s: torch.Tensor) -> torch.Tensor:
    """2^ceil(log2 s), exactly, from frexp (s = m 2^e with m in [0.5, 1))."""
    m, e = torch.frexp(s.double())
    out = torch.where(m == 0.5, s.double(), torch.ldexp(torch.ones_like(m), e))
    return out.float()


def quantize(x: torch.Tensor, block: list[int], pow2: bool) -> tuple[torch.Tensor, torch.Tensor]:
    lead = x.dim() - len(block)
    tiles = [math.ceil(d / b) for d, b in zip(x.shape[lead:], block)]
    scales = torch.empty(list(x.shape[:lead]) + tiles, dtype=torch.float32)
    q = torch.empty_like(x, dtype=torch.float8_e4m3fn)
    for idx in torch.cartesian_prod(*[torch.arange(t) for t in tiles]).reshape(-1, len(tiles)).tolist():
        sl = tuple([slice(None)] * lead + [slice(i * b, (i + 1) * b) for i, b in zip(idx, block)])
        tile = x[sl]
        amax = tile.abs().reshape(*tile.shape[:lead], -1).amax(dim=-1) if lead else tile.abs().amax()
        amax = torch.clamp_min(amax, FLOOR)
        s = amax / E4M3_MAX
        if pow2:
            s = pow2_ceil(s)
        sidx = tuple([slice(None)] * lead + idx)
        scales[sidx] = s
        sb = s.reshape(list(s.shape) + [1] * len(block)) if lead else s
        q[sl] = (tile / sb).to(torch.float8_e4m3fn)
    return q, scales


def main() -> None:
    g = torch.Generator().manual_seed(11)
    act = torch.randn(3, 200, generator=g) * torch.tensor([[0.01], [1.0], [300.0]])
    weight = torch.randn(130, 140, generator=g) * 0.05
    small = torch.tensor([[1.0, -2.0, 0.5, 3.5, 7.0], [0.0, 0.0, 0.0, 0.0, 1e-6]])
    cases = []
    for name, x, block, pow2 in [
        ("activations_1x128", act, [1, 128], False),
        ("activations_1x128_pow2", act, [1, 128], True),
        ("weight_128x128", weight, [128, 128], False),
        ("floor_1x4", small, [1, 4], False),
    ]:
        q, s = quantize(x.float(), block, pow2)
        cases.append({
            "name": name,
            "block": block,
            "pow2": pow2,
            "shape": list(x.shape),
            "x": x.float().flatten().tolist(),
            "scales_shape": list(s.shape),
            "scales": s.flatten().tolist(),
            "codes": q.view(torch.uint8).flatten().tolist(),
        })
    out = Path("tests/goldens/fp8_quant/golden.json")
    out.write_text(json.dumps({"torch": torch.__version__, "amax_floor": FLOOR, "cases": cases}) + "\n")
    print(f"wrote {out}: {len(cases)} cases")


if __name__ == "__main__":
    main()
