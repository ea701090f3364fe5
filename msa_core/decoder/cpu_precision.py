"""Which dtype the backbone computes in on a CPU, chosen by what the CPU can do.

bfloat16 matrix products run natively (at about twice the fp32 rate) on x86 CPUs with AVX-512 BF16
or AMX-BF16; elsewhere PyTorch emulates them and bf16 is slower than fp32. So the CPU default is
bfloat16 where the CPU has one of those instructions and float32 everywhere else. Numerics that
decide quality stay in float32 whatever the backbone's dtype: RMSNorm, chunk pooling and the router's
projections; routing scores and attention accumulate in float32 (benchmarks/cpu_default.py measures recall
against the fp32 path).

`MSA_CPU_DTYPE=float32|bfloat16` overrides the choice; `dtype=torch.float32` in
`MSAModel.from_pretrained` keeps the exact fp32 path. Used by checkpoints/loading.py (the load dtype)
and inference/encode.py (the dtype a bank records).
"""

from __future__ import annotations

import os
import platform
from functools import lru_cache
from pathlib import Path

import torch

from ..errors import InvalidInputError

ENV_VAR = "MSA_CPU_DTYPE"
_NAMES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
_NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags(cpuinfo: str) -> set[str]:
    """The feature flags of a /proc/cpuinfo text (its first `flags` line)."""
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True where the CPU multiplies bf16 matrices in hardware (x86 AVX-512 BF16 or AMX-BF16, Linux)."""
    if platform.system() != "Linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        flags = cpu_flags(Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace"))
    except OSError:
        return False
    return any(f in flags for f in _NATIVE_BF16_FLAGS)


def default_cpu_dtype() -> torch.dtype:
    """The backbone dtype on a CPU: $MSA_CPU_DTYPE if set, else bfloat16 with native bf16, else float32."""
    asked = os.environ.get(ENV_VAR, "").strip().lower()
    if asked:
        if asked not in _NAMES:
            raise InvalidInputError(f"{ENV_VAR}={asked!r} is not a CPU dtype; use float32 or bfloat16")
        return _NAMES[asked]
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    """'float32', 'bfloat16', 'float16' ... (torch.bfloat16 -> 'bfloat16')."""
    return str(dtype).removeprefix("torch.")
