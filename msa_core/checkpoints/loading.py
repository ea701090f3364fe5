"""What loading a model produces, before the facade wraps it: `ModelParts` (backbone, tokenizer, router,
settings, eos ids, the base-weights generator), the router a checkpoint is given (`make_router`: native,
random or a router file with its optional backbone delta) and the eos ids it declares (`eos_ids`).
Shared by the plain loader (`MSAModel.from_pretrained`) and the MSA format (msa_format.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from ..config import TRAINED_ENCODE, TRAINED_SCORING, EncodeConfig, MSAConfig, RoutingConfig
from ..decoder.backbone import Backbone, load_backbone
from ..decoder.cpu_precision import default_cpu_dtype
from ..errors import ModelLoadError
from ..routing.calibration import load_sidecar
from ..routing.projectors import RouterProjectors


@dataclass
class ModelParts:
    """Everything an MSAModel is made of (`MSAModel.from_parts` builds one)."""

    backbone: Backbone
    tokenizer: Any
    router: Any  # RouterProjectors, or an MSA checkpoint's AttentionRouter
    config: MSAConfig
    name: str = ""
    eos_ids: Sequence[int] = ()
    generator: Backbone | None = None  # base weights for hybrid answers when the router carries a delta
    hf_config: Any = None
    msa_config: dict[str, Any] | None = None
    router_source: str | None = None


class LoadedModel(Protocol):
    """What saving a model in the MSA format reads of it (an MSAModel has all of it)."""

    backbone: Backbone
    router: Any
    config: MSAConfig
    layers: list[int]
    eos_ids: list[int]
    hf_config: Any
    msa_config: dict[str, Any] | None
    generator: Backbone


def make_router(backbone: Backbone, cfg: MSAConfig,
                 router: str | Path | None) -> tuple[RouterProjectors, MSAConfig, Backbone | None]:
    """Router projectors, the config with the routing layers they cover, and, when the router file carries a
    backbone delta (merged into `backbone` here), a backbone with the base weights for hybrid answers."""
    a = backbone.args
    if router is None or router == "native" or router == "random":
        layers = cfg.resolve_routing_layers(a.num_layers)
        if router == "random":
            return RouterProjectors.random(layers, a.hidden_size, a.num_heads, a.kv_heads, a.head_dim), cfg, None
        weights = {i: backbone.attention_weights(i) for i in layers}
        native = RouterProjectors.native({i: (q.float(), k.float()) for i, (q, k) in weights.items()},
                                         a.num_heads, a.kv_heads, a.head_dim)
        return native, cfg, None
    loaded = RouterProjectors.load(router, expected_backbone_fingerprint=backbone.fingerprint())
    layout = (loaded.hidden, loaded.num_heads, loaded.kv_heads, loaded.head_dim)
    if layout != (a.hidden_size, a.num_heads, a.kv_heads, a.head_dim):
        # The bank stores K̄_R in the attention's [kv_heads, head_dim] layout (as the MSA format does).
        raise ModelLoadError(f"router {router} projects hidden {loaded.hidden} onto {loaded.num_heads} query and "
                             f"{loaded.kv_heads} key heads of {loaded.head_dim}; this backbone's attention has "
                             f"hidden {a.hidden_size}, {a.num_heads} and {a.kv_heads} heads of {a.head_dim}, "
                             "and memory banks store routing keys in that layout")
    generator = None
    if loaded.backbone_delta:  # the router was trained with the backbone's upper layers: they change too
        from ..decoder.lora import base_view, delta_layers, merge

        # The delta is trained for routing, not for answering (it costs the instruction-tuned model its
        # answers: README, Training routers), so hybrid answers keep the base weights of the layers it changes.
        generator = base_view(backbone, delta_layers(loaded.backbone_delta))
        merge(backbone, loaded.backbone_delta, loaded.delta_scale)
    cfg = _trained_settings(cfg, loaded.extra.get("routing"), loaded.extra.get("encode"))
    if cfg.routing.relevance_calibration is None:  # a calibration shipped beside the router file, if any
        fitted = load_sidecar(router, loaded.fingerprint())
        if fitted is not None:
            cfg = cfg.model_copy(update={"routing": cfg.routing.model_copy(update={"relevance_calibration": fitted})})
    if cfg.routing.layers is None:  # a trained router decides which layers route
        cfg = cfg.model_copy(update={"routing": cfg.routing.model_copy(update={"layers": loaded.layers})})
    elif loaded.layers != cfg.resolve_routing_layers(a.num_layers):
        raise ModelLoadError(f"router {router} covers layers {loaded.layers}, the config asks for "
                             f"{cfg.routing.layers}; leave routing.layers unset to use the router's")
    return loaded, cfg, generator


def _trained_settings(cfg: MSAConfig, scoring: Any, encode: Any) -> MSAConfig:
    """The scoring (TRAINED_SCORING) and key pooling (TRAINED_ENCODE) a router file records it was trained with,
    where the config names none. Older router files record less; what they lack was trained with the defaults."""
    update: dict[str, Any] = {}
    for section, names, recorded, cls in (("routing", TRAINED_SCORING, scoring, RoutingConfig),
                                          ("encode", TRAINED_ENCODE, encode, EncodeConfig)):
        current = getattr(cfg, section)
        if not isinstance(recorded, dict):
            continue
        changes = {k: recorded[k] for k in names if k in recorded and k not in current.model_fields_set}
        if changes:
            update[section] = cls.model_validate({**current.model_dump(exclude_unset=True), **changes})
    return cfg.model_copy(update=update) if update else cfg


def declared_eos_ids(tokenizer: Any, hf_cfg: Any, path: Path) -> list[int]:
    ids = set()
    for src in (tokenizer.eos_token_id, getattr(hf_cfg, "eos_token_id", None)):
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, (list, tuple)):
            ids.update(int(x) for x in src)
    try:
        from transformers import GenerationConfig

        gc = GenerationConfig.from_pretrained(str(path))
        e = gc.eos_token_id
        ids.update([e] if isinstance(e, int) else list(e or []))
    except (OSError, ValueError):
        pass  # no generation_config.json: the tokenizer's eos is enough
    return sorted(ids)


def load_parts(path: Path, *, router: str | Path | None = None, config: MSAConfig | dict | None = None,
               profile: str | None = None, device: str | torch.device | None = None,
               dtype: torch.dtype | None = None, name: str = "") -> ModelParts:
    """The parts of a plain Llama/Qwen2/Qwen3 checkpoint folder (`name` "default": the embedded model, with its
    trained router unless `router` says otherwise). dtype None: bfloat16 on a GPU; on a CPU bfloat16 where it
    multiplies bf16 natively (AVX-512 BF16 / AMX), else float32 (decoder/cpu_precision.py)."""
    from transformers import AutoTokenizer

    from .defaults import default_router_path

    cfg = config if isinstance(config, MSAConfig) else MSAConfig.model_validate(config or {})
    if profile is not None:
        cfg = cfg.model_copy(update={"profile": profile})
    if router is None and name == "default":
        router = default_router_path()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_cpu = device.type == "cpu"
    dtype = dtype or (default_cpu_dtype() if on_cpu else torch.bfloat16)
    # On a CPU the weights load (and a router's backbone delta merges) in fp32 and the backbone is cast
    # afterwards; the router stays fp32 there, so routing scores keep fp32 accuracy (decoder/cpu_precision.py).
    backbone, hf_cfg = load_backbone(path, dtype=torch.float32 if on_cpu else dtype, device=device)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    projectors, cfg, generator = make_router(backbone, cfg, router)
    projectors = projectors.to(device=device, dtype=torch.float32 if on_cpu else dtype)
    if on_cpu and dtype != torch.float32:
        backbone.to(dtype)
        if generator is not None:
            generator.to(dtype)
    return ModelParts(backbone, tokenizer, projectors, cfg, name=name,
                      eos_ids=declared_eos_ids(tokenizer, hf_cfg, path), generator=generator, hf_config=hf_cfg,
                      router_source=str(router) if router is not None else "native")
