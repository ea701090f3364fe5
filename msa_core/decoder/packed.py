"""Fused projection weights for inference: prepacked for bf16 on a CPU (issue 27), concatenated on a GPU
(issue 23).

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

On a GPU a decode step reads every weight once per token, and a product of a small matrix (k_proj, v_proj:
2560 x 1024 at MSA-4B shapes) cannot reach the memory bandwidth. There q|k|v and gate|up are each one plain
concatenated weight (two products instead of five; o and down stay the modules), for blocks of up to
`GPU_MAX_ROWS` tokens: decode steps, questions and prompts; encoding's large blocks keep the modules. On an
H200 at MSA-4B shapes the 36 layers' q, k, v products of one token took 1.38 ms apart and 0.37 ms fused
(captured, bf16), and a captured decode step 7.52 -> 6.39 ms. Half-precision weights,
gradients off, plain `nn.Linear`s, as on the CPU. A GPU pack costs the memory of the weights it fuses (about
60% of a backbone), so packs are made only while a quarter of the device's memory stays free
(`MSA_GPU_PACK=0`: never). CUDA graphs and torch.compile replay a pack's memory without running the check
above, so the engine calls `refresh` before each question (`engine_for`): a stale pack is refilled in place,
where the graphs read it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import InvalidInputError

ENV_VAR = "MSA_CPU_PACK"
GPU_ENV_VAR = "MSA_GPU_PACK"
GPU_KEEP_FREE = 0.25  # GPU packs are made only while this share of the device's memory stays free
GPU_FUSED = ("qkv", "gate_up")  # on a GPU only the products of several modules are packed
GPU_MAX_ROWS = 1024  # ... and used for blocks of at most this many tokens (decode steps, questions, prompts)
MAX_PACK_BYTES = 2 << 30  # backbones up to 2 GiB of weights (the default 135M model: 0.27 GB in bf16)
PACK_BATCH_HINT = 16  # oneDNN's layout hint: question-sized blocks (any row count works)


def _available() -> bool:
    mkldnn = getattr(torch.ops, "mkldnn", None)
    return (torch.backends.mkldnn.is_available() and mkldnn is not None
            and hasattr(mkldnn, "_reorder_linear_weight") and hasattr(mkldnn, "_linear_pointwise"))


def _asked(var: str) -> bool | None:
    asked = os.environ.get(var, "").strip().lower()
    if asked and asked not in ("0", "1", "true", "false", "on", "off"):
        raise InvalidInputError(f"{var}={asked!r}: use 1 (pack) or 0 (never pack)")
    return asked in ("1", "true", "on") if asked else None


def packing_wanted(weight_bytes: int) -> bool:
    """$MSA_CPU_PACK if set (1 or 0), else whether a backbone of `weight_bytes` is small enough to pack."""
    asked = _asked(ENV_VAR)
    if asked is not None:
        return asked and _available()
    return weight_bytes <= MAX_PACK_BYTES and _available()


def gpu_packing_wanted() -> bool:
    """$MSA_GPU_PACK if set (1 or 0), else on (subject to free device memory, `Packs.refresh`)."""
    asked = _asked(GPU_ENV_VAR)
    return True if asked is None else asked


class PackedLinear:
    """Several `nn.Linear`s of one input as one product (oneDNN-packed on a CPU, a plain concatenated weight
    on a GPU); `__call__` returns their outputs."""

    def __init__(self, linears: Sequence[nn.Linear]) -> None:
        weight = torch.cat([m.weight.detach() for m in linears])
        self.sizes = [m.out_features for m in linears]
        self.on_cpu = weight.device.type == "cpu"
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_BATCH_HINT) if self.on_cpu else weight
        biases = [m.bias for m in linears]
        self.bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])
        self.source = _source_key(linears)
        self.modules = tuple(linears)  # (held, so a module made later cannot pass for one of these)

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.on_cpu:
            y = torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        else:
            y = F.linear(x, self.weight, self.bias)
        return list(y.split(self.sizes, dim=-1)) if len(self.sizes) > 1 else [y]

    def serves(self, linears: Sequence[nn.Module]) -> bool:
        """Made from these very modules, whose weights have not changed since."""
        return all(a is b for a, b in zip(self.modules, linears)) and self.source == _source_key(linears)  # type: ignore[arg-type]

    @torch.no_grad()
    def refill(self) -> None:
        """Copy the modules' current weights into this GPU pack's own memory (which captured graphs read)."""
        at = 0
        for m in self.modules:
            n = m.out_features
            self.weight[at:at + n].copy_(m.weight.detach())
            if self.bias is not None:
                self.bias[at:at + n].copy_(m.bias.detach())
            at += n
        self.source = _source_key(self.modules)


def _source_key(linears: Sequence[nn.Linear]) -> tuple:
    return tuple((t.data_ptr(), t._version) for m in linears for t in (m.weight, m.bias) if t is not None)


def weights_state(module: nn.Module) -> tuple:
    """Every parameter's (storage, version) under `module`, for caches keyed on the weights: an in-place
    update bumps a version, a cast, a move or a replaced submodule gives other storage. Walks `_modules`
    and `_parameters` directly: nn.Module.parameters() builds a name for every module and parameter, which
    cost ~1 ms per question for the default model's 30 layers on a CPU."""
    out: list[int] = []
    stack = [module]
    while stack:
        m = stack.pop()
        for t in m._parameters.values():
            if t is not None:
                out += (t.data_ptr(), t._version)
        stack.extend(c for c in m._modules.values() if c is not None)
    return tuple(out)


def _packable(linears: Sequence[nn.Module], device: str) -> bool:
    if not all(type(m) is nn.Linear for m in linears):  # LoRA wrappers and other subclasses: not packed
        return False
    w = linears[0].weight
    dtypes = (torch.bfloat16,) if device == "cpu" else (torch.bfloat16, torch.float16)
    return (all(m.weight.dtype == w.dtype and m.weight.device == w.device for m in linears)
            and w.dtype in dtypes and w.device.type == device
            and all((m.bias is None) == (linears[0].bias is None) for m in linears) and w.dim() == 2)


class Packs:
    """A backbone's packs by (module, name, device type). On a CPU they are made on first use, `enabled`
    decided once per backbone (its size); on a GPU by `refresh`, while `gpu` holds."""

    def __init__(self, enabled: bool, gpu: bool | None = None) -> None:
        self.enabled = enabled
        self.gpu = gpu_packing_wanted() if gpu is None else gpu
        self._store: dict[tuple[int, str, str], PackedLinear] = {}
        self._refreshed: tuple | None = None  # weights_state at the last refresh that left every pack current

    def apply(self, owner: nn.Module, name: str, linears: Sequence[nn.Module], x: torch.Tensor) -> list[torch.Tensor]:
        """The outputs of `linears` on x: one packed product when x is a bf16 CPU tensor outside autograd, or
        a GPU tensor outside autograd whose pack `refresh` made; else each module called as usual."""
        if torch.is_grad_enabled():
            return [m(x) for m in linears]
        if x.device.type == "cpu":
            if self.enabled and x.dtype == torch.bfloat16:
                key = (id(owner), name, "cpu")
                pack = self._store.get(key)
                if pack is not None and pack.serves(linears):
                    return pack(x)  # the same modules holding the same weights as when packed
                if _packable(linears, "cpu"):
                    pack = self._store[key] = PackedLinear(linears)  # type: ignore[arg-type]
                    return pack(x)
        elif self.gpu and name in GPU_FUSED and x.numel() <= GPU_MAX_ROWS * x.shape[-1]:
            pack = self._store.get((id(owner), name, "cuda"))
            if (pack is not None and pack.weight.device == x.device and pack.weight.dtype == x.dtype
                    and all(a is b for a, b in zip(pack.modules, linears))):
                if not torch.compiler.is_compiling() and not pack.serves(linears):
                    pack.refill()  # (traced by torch.compile: `refresh` checked before the question)
                return pack(x)
        return [m(x) for m in linears]

    def refresh(self, backbone: nn.Module) -> None:
        """Make or refill the GPU packs of every layer of `backbone` (on a CUDA device, in half precision),
        so that graphs and compiled steps, which do not check, read current weights. Called before each
        question; a no-op elsewhere."""
        if not self.gpu or backbone.device.type != "cuda":
            return
        state = weights_state(backbone)
        if state == self._refreshed:
            return  # the same weights as at the last refresh: every pack serves
        wanted = []
        for layer in backbone.layers:
            for owner, name, linears in ((layer.self_attn, "qkv", (layer.self_attn.q_proj, layer.self_attn.k_proj,
                                                                   layer.self_attn.v_proj)),
                                         (layer.mlp, "gate_up", (layer.mlp.gate_proj, layer.mlp.up_proj))):
                key = (id(owner), name, "cuda")
                pack = self._store.get(key)
                if pack is not None and all(a is b for a, b in zip(pack.modules, linears)):
                    if pack.weight.device != linears[0].weight.device or pack.weight.dtype != linears[0].weight.dtype:
                        wanted.append((key, linears))  # moved or cast since
                    elif not pack.serves(linears):
                        pack.refill()
                elif _packable(linears, "cuda"):
                    wanted.append((key, linears))
        if not wanted:
            self._refreshed = state
            return
        need = sum(m.weight.numel() * m.weight.element_size() for _, linears in wanted for m in linears)
        free, total = torch.cuda.mem_get_info(backbone.device)
        if free - need < GPU_KEEP_FREE * total:
            self.gpu = False  # the weights are better spent on caches and banks; the modules are used
            return
        with torch.no_grad():
            for key, linears in wanted:
                self._store[key] = PackedLinear(linears)
        self._refreshed = state

    def __len__(self) -> int:
        return len(self._store)

    # A copied or pickled backbone starts with no packs (oneDNN's packed tensors are neither).
    def __deepcopy__(self, memo: dict) -> Packs:
        return Packs(self.enabled, self.gpu)

    def __getstate__(self) -> dict:
        return {"enabled": self.enabled, "gpu": self.gpu, "_store": {}}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update({"gpu": gpu_packing_wanted(), **state})
