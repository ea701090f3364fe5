"""Where a bank's tensors live: the tier names, device arguments, and staging the chosen rows of a
host-memory tensor to a GPU through pinned memory (see bank.py's docstring on storage tiers)."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import InvalidInputError
from .records import KV_TIERS


def check_kv(kv: Any) -> None:
    if not isinstance(kv, str) or kv not in KV_TIERS:
        raise InvalidInputError(f"kv must be one of {list(KV_TIERS)}, got {kv!r}")


def device_arg(value: Any, what: str) -> torch.device:
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError) as exc:
        raise InvalidInputError(f"{what} {value!r} is not a device: {exc}") from exc
    if device.type == "cuda" and not (torch.cuda.is_available()
                                      and (device.index or 0) < torch.cuda.device_count()):
        raise InvalidInputError(f"{what} {value!r} names a CUDA device this machine does not have; use 'cpu'")
    return device


def stage_to(src: torch.Tensor, idx: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Rows `idx` of the host tensor `src`, copied to `device` asynchronously through a pinned buffer.

    A fresh buffer per call is safe without any event of ours: PyTorch's caching host allocator records
    the copy's stream and does not hand the block out again until the copy has finished; and it caches
    the block, so the allocation is cheap.
    """
    stage = torch.empty((idx.numel(), *src.shape[1:]), dtype=src.dtype, pin_memory=True)
    torch.index_select(src, 0, idx, out=stage)
    return stage.to(device, non_blocking=True)
