"""Low-rank adapters (LoRA) for the backbone's projections: how a router file carries a backbone delta.

Training the upper layers with the routing loss lifts latent routing far beyond what a router on a frozen
backbone reaches (benchmarks/unfrozen_router.py). Full layers are tens of MB; rank-r adapters of every
projection are a few MB and ship inside the router file. At load they are merged into the weights
(W += scale·B·A), so the engine, kernels and bank format see an ordinary backbone whose fingerprint
differs from the base one: banks built with and without the delta are never mixed.

    adapters = attach(backbone, layers=range(12, 30), rank=16)   # training: wrap, train a/b
    tensors = adapter_tensors(backbone)                          # {"model.layers.12.mlp.up_proj.lora_a": ...}
    fold(backbone)                                               # deltas merged into the weights, unwrapped
    merge(other_backbone, tensors, scale)                        # loading: the same delta, merged
    combine(first, s1, second, s2)                               # two deltas as one set (ranks stacked)
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

from ..errors import ModelLoadError

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
NAME_RE = re.compile(r"^model\.layers\.(\d+)\.(" + "|".join(re.escape(p) for p in PROJECTIONS) + r")\.lora_([ab])$")


class LoRALinear(nn.Module):
    """base(x) + scale·B·A·x. B starts at zero, so a fresh adapter leaves the model unchanged."""

    def __init__(self, base: nn.Linear, rank: int, scale: float, seed: int = 0) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base, self.scale = base, float(scale)
        gen = torch.Generator().manual_seed(seed)
        a = torch.randn(rank, base.in_features, generator=gen) / base.in_features ** 0.5
        self.a = nn.Parameter(a.to(device=base.weight.device, dtype=torch.float32))
        self.b = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))

    def delta(self) -> Tensor:
        """scale·B·A, [out, in], float32."""
        return (self.b @ self.a) * self.scale

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + (x @ self.a.T.to(x.dtype) @ self.b.T.to(x.dtype)) * self.scale


def _modules(backbone: nn.Module, layer: int) -> list[tuple[nn.Module, str, str]]:
    """(parent module, attribute, projection path) of each adapted projection of one layer."""
    out = []
    for path in PROJECTIONS:
        parent_name, attr = path.split(".")
        out.append((getattr(backbone.layers[layer], parent_name), attr, path))
    return out


def attach(backbone: nn.Module, layers: Iterable[int], rank: int, scale: float = 2.0) -> list[nn.Parameter]:
    """Wrap every projection of `layers` in a LoRALinear (base weights frozen); returns the adapters' parameters."""
    params: list[nn.Parameter] = []
    for layer in layers:
        for parent, attr, _ in _modules(backbone, layer):
            base = getattr(parent, attr)
            if isinstance(base, LoRALinear):
                raise ValueError(f"layer {layer} already has adapters")
            base.weight.requires_grad_(False)
            lora = LoRALinear(base, rank, scale, seed=layer * 31 + len(params))
            setattr(parent, attr, lora)
            params += [lora.a, lora.b]
    return params


def _attached(backbone: nn.Module):
    for layer in range(len(backbone.layers)):
        for parent, attr, path in _modules(backbone, layer):
            module = getattr(parent, attr)
            if isinstance(module, LoRALinear):
                yield layer, parent, attr, path, module


def adapter_tensors(backbone: nn.Module) -> dict[str, Tensor]:
    """The attached adapters under their file names (detached float32 copies)."""
    out: dict[str, Tensor] = {}
    for layer, _, _, path, m in _attached(backbone):
        out[f"model.layers.{layer}.{path}.lora_a"] = m.a.detach().float().clone()
        out[f"model.layers.{layer}.{path}.lora_b"] = m.b.detach().float().clone()
    return out


@torch.no_grad()
def fold(backbone: nn.Module) -> None:
    """Merge every attached adapter into its base weight and put the plain nn.Linear back."""
    for _, parent, attr, _, m in list(_attached(backbone)):
        _add(m.base.weight, m.delta())
        setattr(parent, attr, m.base)


def remove(backbone: nn.Module) -> None:
    """Put the plain nn.Linear back everywhere, dropping the adapters (the weights stay as they were)."""
    for _, parent, attr, _, m in list(_attached(backbone)):
        setattr(parent, attr, m.base)


@torch.no_grad()
def merge(backbone: nn.Module, tensors: Mapping[str, Tensor], scale: float) -> None:
    """Add scale·B·A of every adapter in `tensors` to the backbone's weights (in float32)."""
    pairs: dict[tuple[int, str], dict[str, Tensor]] = {}
    for name, t in tensors.items():
        m = NAME_RE.match(name)
        if not m:
            raise ModelLoadError(f"{name!r} is not a backbone adapter name")
        pairs.setdefault((int(m.group(1)), m.group(2)), {})[m.group(3)] = t
    for (layer, path), ab in sorted(pairs.items()):
        if set(ab) != {"a", "b"}:
            raise ModelLoadError(f"adapter of layer {layer} {path} lacks its lora_a or lora_b tensor")
        if layer >= len(backbone.layers):
            raise ModelLoadError(f"adapter for layer {layer}, but the backbone has {len(backbone.layers)} layers")
        parent_name, attr = path.split(".")
        linear = getattr(getattr(backbone.layers[layer], parent_name), attr)
        a, b, w = ab["a"].float(), ab["b"].float(), linear.weight
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0] or (b.shape[0], a.shape[1]) != tuple(w.shape):
            raise ModelLoadError(f"adapter of layer {layer} {path} has shapes {tuple(a.shape)} and {tuple(b.shape)}, "
                                 f"which do not fit the weight {tuple(w.shape)}")
        _add(w, (b.to(w.device) @ a.to(w.device)) * scale)


def combine(first: Mapping[str, Tensor], first_scale: float, second: Mapping[str, Tensor],
            second_scale: float) -> dict[str, Tensor]:
    """One set of adapters, at second_scale, whose delta is first's plus second's: where both adapt a
    projection, the ranks are stacked ([B1·s1/s2, B2] @ [A1; A2] = B1·A1·s1/s2 + B2·A2), so nothing is lost.
    Training from a tuned router uses it: the file must carry the starting delta and the new one."""
    out = {n: t.float().clone() for n, t in second.items()}
    ratio = first_scale / second_scale
    for name, t in first.items():
        t = t.float() * (ratio if name.endswith("lora_b") else 1.0)
        if name not in out:
            out[name] = t.clone()
        else:
            out[name] = torch.cat([t.to(out[name].device), out[name]], dim=0 if name.endswith("lora_a") else 1)
    return out


def delta_layers(tensors: Mapping[str, Tensor]) -> list[int]:
    """The layers a set of adapter tensors changes."""
    return sorted({int(m.group(1)) for m in map(NAME_RE.match, tensors) if m})


def base_view(backbone: nn.Module, layers: Iterable[int]) -> nn.Module:
    """A backbone that shares every module with `backbone` except private copies of `layers`. Taken before a
    delta is merged into those layers, it keeps their base weights at the cost of those layers alone."""
    view = copy.copy(backbone)
    view._modules = dict(backbone._modules)  # its own module table: replacing `layers` leaves backbone alone
    keep = set(layers)
    view.layers = nn.ModuleList(copy.deepcopy(layer) if i in keep else layer
                                for i, layer in enumerate(backbone.layers))
    return view


def _add(weight: Tensor, delta: Tensor) -> None:
    """weight += delta, computed in float32 whatever the weight's dtype."""
    weight.copy_((weight.float() + delta).to(weight.dtype))
