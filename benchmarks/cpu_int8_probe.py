"""Int8 weight-only products against the oneDNN-packed bf16 ones at question sizes, on a CPU (issue 27).

One layer of the default model (SmolLM2-135M: q|k|v 960x576, o 576x576, gate|up 3072x576, down 576x1536) at
M = 16 and 32 tokens: plain bf16 `F.linear`, `torch._weight_int8pack_mm` (per-channel int8 weights, bf16
activations) and `torch.ops.mkldnn._linear_pointwise` on a prepacked bf16 weight (what decoder/packed.py runs).
Prints microseconds per product and the relative error against float32. On the 2-core AMD EPYC (session 15)
int8 was 1.1-2.3x slower than the packed bf16 products: they are bound by arithmetic there, not weight reads.

    .venv/bin/python benchmarks/cpu_int8_probe.py
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

SHAPES = ((576 + 2 * 192, 576), (576, 576), (2 * 1536, 576), (576, 1536))  # (out, in) per fused product


def bench(fn, n: int = 200) -> float:
    for _ in range(10):
        fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n * 1e6


def main() -> None:
    torch.manual_seed(0)
    for m in (16, 32):
        totals = {"linear": 0.0, "int8": 0.0, "packed": 0.0}
        for n, k in SHAPES:
            w = torch.randn(n, k) * 0.02
            x = torch.randn(m, k).to(torch.bfloat16)
            wb = w.to(torch.bfloat16)
            scales = w.abs().amax(1) / 127
            wq = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
            sb = scales.to(torch.bfloat16)
            packed = torch.ops.mkldnn._reorder_linear_weight(wb, 16)
            runs = {"linear": lambda: F.linear(x, wb), "int8": lambda: torch._weight_int8pack_mm(x, wq, sb),
                    "packed": lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")}
            ref = x.float() @ w.T
            line = []
            for name, fn in runs.items():
                us = bench(fn)
                totals[name] += us
                err = float((fn().float() - ref).abs().max() / ref.abs().max())
                line.append(f"{name} {us:.1f} us (err {err:.4f})")
            print(f"M={m} {n}x{k}: " + ", ".join(line))
        print(f"M={m} one layer: " + ", ".join(f"{k} {v:.0f} us" for k, v in totals.items()))


if __name__ == "__main__":
    main()
