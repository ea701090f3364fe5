"""Fused, prepacked projection weights for bf16 inference on a CPU (issue 27).

A short question's forward is a few tokens through 30 layers, so its time goes into reading weights and
calling kernels: seven `nn.Linear` calls per layer, each handing oneDNN a plain row-major weight that it
re-lays out for its kernel on every call. Here each layer's projections are concatenated (q|k|v and
gate|up: four products instead of seven) and reordered once into oneDNN's own layout
(`torch.ops.mkldnn._reorder_linear_weight`, what torch.compile's CPU freezing uses), then called through
`_linear_pointwise`. On the 2-core AVX-512 BF16 machine this took `retrieve` on HotpotQA-100 from about
57-70 ms to 44-46 ms p50 (benchmarks/cpu_default.py measures it against the fp32 path).

Used only where the arithmetic is the same kind as the plain path's: a CPU tensor in bfloat16, gradients
off, plain `nn.Linear` projections (a LoRA wrapper during training falls back to the modules). The fp32
path (`dtype=torch.float32`) never packs, so it stays exact. A pack is keyed by its source weights'
storage and version counters, so an in-place update (training, `load_state_dict`, LoRA folding) or a
`.to()` repacks on the next call. Packs double the projection weights' memory, so they are made only for
backbones whose weights are at most `MAX_PACK_BYTES` unless `MSA_CPU_PACK=1` (`0` turns packing off).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import nn

from ..errors import InvalidInputError

ENV_VAR = "MSA_CPU_PACK"
MAX_PACK_BYTES = 2 << 30  # backbones up to 2 GiB of weights (the default 135M model: 0.27 GB in bf16)
PACK_BATCH_HINT = 16  # oneDNN's layout hint: question-sized blocks (any row count works)


def _available() -> bool:
    mkldnn = getattr(torch.ops, "mkldnn", None)
    return (torch.backends.mkldnn.is_available() and mkldnn is not None
            and hasattr(mkldnn, "_reorder_linear_weight") and hasattr(mkldnn, "_linear_pointwise"))


def packing_wanted(weight_bytes: int) -> bool:
    """$MSA_CPU_PACK if set (1 or 0), else whether a backbone of `weight_bytes` is small enough to pack."""
    asked = os.environ.get(ENV_VAR, "").strip().lower()
    if asked and asked not in ("0", "1", "true", "false", "on", "off"):
        raise InvalidInputError(f"{ENV_VAR}={asked!r}: use 1 (pack) or 0 (never pack)")
    if asked:
        return asked in ("1", "true", "on") and _available()
    return weight_bytes <= MAX_PACK_BYTES and _available()


class PackedLinear:
    """Several `nn.Linear`s of one input, as one oneDNN-packed product; `__call__` returns their outputs."""

    def __init__(self, linears: Sequence[nn.Linear]) -> None:
        weight = torch.cat([m.weight.detach() for m in linears])
        self.sizes = [m.out_features for m in linears]
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_BATCH_HINT)
        biases = [m.bias for m in linears]
        self.bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])
        self.source = _source_key(linears)
        self.modules = tuple(linears)  # (held, so a module made later cannot pass for one of these)

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        y = torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return list(y.split(self.sizes, dim=-1)) if len(self.sizes) > 1 else [y]


def _source_key(linears: Sequence[nn.Linear]) -> tuple:
    return tuple((t.data_ptr(), t._version) for m in linears for t in (m.weight, m.bias) if t is not None)


def _packable(linears: Sequence[nn.Module]) -> bool:
    if not all(type(m) is nn.Linear for m in linears):  # LoRA wrappers and other subclasses: not packed
        return False
    w = linears[0].weight
    return (all(m.weight.dtype == torch.bfloat16 and m.weight.device.type == "cpu" for m in linears)
            and all((m.bias is None) == (linears[0].bias is None) for m in linears) and w.dim() == 2)


class Packs:
    """A backbone's packs by name, made on first use; `enabled` is decided once per backbone (its size)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._store: dict[tuple[int, str], PackedLinear] = {}

    def apply(self, owner: nn.Module, name: str, linears: Sequence[nn.Module], x: torch.Tensor) -> list[torch.Tensor]:
        """The outputs of `linears` on x: one packed product when x is a bf16 CPU tensor outside autograd,
        else each module called as usual."""
        if self.enabled and x.dtype == torch.bfloat16 and x.device.type == "cpu" and not torch.is_grad_enabled():
            key = (id(owner), name)
            pack = self._store.get(key)
            if (pack is not None and all(a is b for a, b in zip(pack.modules, linears))
                    and pack.source == _source_key(linears)):  # type: ignore[arg-type]
                return pack(x)  # the same modules holding the same weights as when packed
            if _packable(linears):
                pack = self._store[key] = PackedLinear(linears)  # type: ignore[arg-type]
                return pack(x)
        return [m(x) for m in linears]

    def __len__(self) -> int:
        return len(self._store)

    # A copied or pickled backbone starts with no packs (oneDNN's packed tensors are neither).
    def __deepcopy__(self, memo: dict) -> Packs:
        return Packs(self.enabled)

    def __getstate__(self) -> dict:
        return {"enabled": self.enabled, "_store": {}}
