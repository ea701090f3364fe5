"""What every kernel dispatcher shares: is Triton usable here, and which backend runs a call."""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Literal

import torch

from ..errors import InvalidInputError

Backend = Literal["auto", "triton", "reference"]
BACKENDS = ("auto", "triton", "reference")


@functools.cache
def triton_available() -> bool:
    """True when the `triton` package imports (it does not say whether a GPU is present)."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton.language  # noqa: F401
    except (ImportError, OSError, RuntimeError):  # a broken install (missing libs, wrong CUDA) counts as none
        return False
    return True


def interpreting() -> bool:
    """True when Triton runs kernels with its CPU interpreter (TRITON_INTERPRET=1).

    Triton reads the variable when a kernel module is imported; our kernel modules are imported on
    the first Triton call, so set it before that call (tests set it before importing msa_core.kernels).
    """
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: str, *tensors: torch.Tensor) -> Literal["triton", "reference"]:
    """'auto' -> Triton for CUDA tensors when triton imports, else the PyTorch reference.

    'triton' is a request: it fails with a clear error where the kernel cannot run (no triton, or
    CPU tensors without the interpreter) instead of silently measuring the reference.
    """
    if backend not in BACKENDS:
        raise InvalidInputError(f"backend must be one of {BACKENDS}, got {backend!r}")
    on_cuda = all(t.is_cuda for t in tensors)
    if backend == "reference":
        return "reference"
    if backend == "auto":
        return "triton" if on_cuda and triton_available() else "reference"
    if not triton_available():
        raise InvalidInputError("backend='triton' needs the triton package; pip install triton, or use 'auto'")
    if not on_cuda and not interpreting():
        devices = sorted({str(t.device) for t in tensors})
        raise InvalidInputError(
            f"backend='triton' needs CUDA tensors (got {devices}); move them to a GPU, use 'auto', or set "
            "TRITON_INTERPRET=1 before the first kernel call to run Triton's CPU interpreter"
        )
    return "triton"


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (>= 1); Triton block shapes must be powers of two."""
    return 1 << max(0, int(n) - 1).bit_length()


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (132 on an H100 SXM; a guess on CPU)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132
