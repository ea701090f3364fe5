"""The released MSA checkpoint format (spec §1): read it, map it to our settings, write it.

An MSA checkpoint is a Hugging Face folder whose config.json says `model_type: "msa"`: a Qwen3
config plus an object `msa_config`, and (with `decouple_router`) router projectors under
`model.layers.{i}.self_attn.router_{q,k}_proj.0.weight` in the routing layers only.

    cfg = read_msa_config(raw["msa_config"])          # reference defaults for missing keys
    settings = engine_config(cfg, num_layers=36)      # our MSAConfig (layers, P, k, reductions, ...)
    parts = load_msa_parts(path)                      # what MSAModel.from_pretrained builds on
    save_msa(model, "out/")                           # any of our models, same names, exact round trip

Our own settings that `msa_config` cannot express (layer aggregation, batch sizes, storage dtype,
profile) travel in a top-level key `msa_engine` that the reference code ignores. When present it is
the complete truth about our settings; `msa_config` is then written for the reference code's benefit.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..config import MSAConfig, Normalization
from ..decoder.backbone import Backbone, load_backbone
from ..decoder.rope import apply_rotary
from ..errors import InvalidInputError, ModelLoadError
from ..routing.projectors import ROUTER_NAME_RE, RouterProjectors
from .loading import ModelParts, declared_eos_ids, make_router

MODEL_TYPE = "msa"
ARCHITECTURES = ["MSAForCausalLM"]
ENGINE_KEY = "msa_engine"
ENGINE_FORMAT_VERSION = 1
BASE_KEY = "base_model_type"  # ours: the backbone family when it is not Qwen3
# Ours: the LoRA delta a trained router carried (msa_core/lora.py). The weights in the folder already include
# it, so any MSA loader runs the routing-trained model; we read it back to keep the router's fingerprint and
# the base weights that hybrid answers use. Not a model*.safetensors file, so other loaders ignore it.
DELTA_FILE = "msa_router_delta.safetensors"

# Spec §1.1, "resave default" column, plus the engine's own doc_top_k (never written by resave).
MSA_CONFIG_DEFAULTS: dict[str, Any] = {
    "router_layer_idx": "all",
    "decouple_router": False,
    "top_k_docs": 2,
    "pooling_kernel_size": 2,
    "head_reduce_method": "max",
    "query_reduce_method": "max",
    "chunk_reduce_method": "max",
    "aux_loss_method": "INFONCE",
    "aux_loss": False,
    "infonce_loss_temp": 0.1,
    "lmloss_weigth": 1.0,  # sic: the reference's spelling
    "auxloss_weight": 0.1,
    "recloss_weight": 0.0,
    "ansloss_weight": 1.0,
    "rewrite_position": False,
    "decouple_pooling_mode": "mean",
    "doc_top_k": 16,
}
AUX_LOSS_METHODS = ("INFONCE", "INFONCE_FOCAL", "INFONCE_DECOUPLE", "INFONCE_DECOUPLE_FOCAL", "BCE")
_CHOICES = {
    "head_reduce_method": ("mean", "max"),
    "query_reduce_method": ("max", "mean", "last"),
    "chunk_reduce_method": ("max", "mean"),
    "aux_loss_method": AUX_LOSS_METHODS,
}


# --------------------------------------------------------------------------------------------
# msa_config
# --------------------------------------------------------------------------------------------


def is_msa_checkpoint(path: str | os.PathLike[str]) -> bool:
    """True when `path/config.json` declares model_type "msa"."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("model_type") == MODEL_TYPE
    except (OSError, ValueError, AttributeError):
        return False


def _as_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "false", "0", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    raise ModelLoadError(f"msa_config[{key!r}] must be true or false, got {value!r}")


def _as_int(key: str, value: Any, low: int = 1) -> int:
    try:
        out = int(value)
    except (TypeError, ValueError):
        out = None
    if out is None or isinstance(value, bool) or out != float(value) or out < low:
        raise ModelLoadError(f"msa_config[{key!r}] must be an integer >= {low}, got {value!r}")
    return out


def read_msa_config(raw: Mapping[str, Any] | None) -> dict[str, Any]:
    """msa_config with the reference defaults for missing (or null) keys, checked.

    Unknown keys are kept as they are, so a checkpoint saved again keeps them.
    """
    if raw is not None and not isinstance(raw, Mapping):
        raise ModelLoadError(f"msa_config must be a JSON object, got {type(raw).__name__}")
    out = dict(MSA_CONFIG_DEFAULTS)
    out.update({k: v for k, v in (raw or {}).items() if v is not None})
    out["decouple_router"] = _as_bool("decouple_router", out["decouple_router"])
    out["aux_loss"] = _as_bool("aux_loss", out["aux_loss"])
    out["rewrite_position"] = _as_bool("rewrite_position", out["rewrite_position"])
    for key in ("pooling_kernel_size", "doc_top_k", "top_k_docs"):
        out[key] = _as_int(key, out[key])
    for key, allowed in _CHOICES.items():
        if out[key] not in allowed:
            raise ModelLoadError(f"msa_config[{key!r}] is {out[key]!r}; expected one of {', '.join(allowed)}")
    layer_spec = out["router_layer_idx"]
    if not (isinstance(layer_spec, (str, int, list, tuple)) and not isinstance(layer_spec, bool)):
        raise ModelLoadError(f"msa_config['router_layer_idx'] must be 'all' or a comma list, got {layer_spec!r}")
    return out


def parse_router_layers(spec: Any, num_layers: int) -> list[int]:
    """`"all"`, a comma string `"18,19,..."` (the reference's form), an int or a list -> sorted layers."""
    if isinstance(spec, str) and spec.strip().lower() == "all":
        return list(range(num_layers))
    try:
        if isinstance(spec, str):
            layers = [int(x) for x in spec.replace(" ", "").split(",") if x != ""]
        elif isinstance(spec, int) and not isinstance(spec, bool):
            layers = [spec]
        else:
            layers = [int(x) for x in spec]
    except (TypeError, ValueError):
        raise ModelLoadError(f"router_layer_idx {spec!r} is not 'all' or a comma list of layer indices") from None
    if not layers:
        raise ModelLoadError("router_layer_idx names no layer; use 'all' or a comma list such as '18,19'")
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise ModelLoadError(f"router_layer_idx names layers {bad} outside the backbone's 0..{num_layers - 1}")
    return sorted(set(layers))


def format_router_layers(layers: Sequence[int], num_layers: int, previous: Any = None) -> str:
    """The reference's string form; keeps "all" when it was "all" and still is."""
    layers = sorted(layers)
    if isinstance(previous, str) and previous.strip().lower() == "all" and layers == list(range(num_layers)):
        return previous
    return ",".join(str(i) for i in layers)


def normalization_for(aux_loss_method: str, decouple_router: bool) -> Normalization:
    """What the reference inference computes (spec §2.3 and §9): the exact string "INFONCE" means
    cosine (times 1/sqrt(D) without decouple_router); anything else is q·k/sqrt(D), unnormalised."""
    if aux_loss_method == "INFONCE":
        return "cosine" if decouple_router else "scaled_cosine"
    return "scaled_dot"


def _aux_loss_method_for(normalization: str, decouple_router: bool, previous: str | None) -> str:
    if previous is not None and normalization_for(previous, decouple_router) == normalization:
        return previous
    if normalization == "scaled_dot":
        return "INFONCE_DECOUPLE"
    if normalization == ("cosine" if decouple_router else "scaled_cosine"):
        return "INFONCE"
    # Not expressible in msa_config (e.g. cosine without projectors): msa_engine holds the truth.
    return previous or "INFONCE"


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}.get(dtype, "float32")


def engine_config(msa_cfg: Mapping[str, Any], num_layers: int, *, max_doc_tokens: int = 2048,
                  storage_dtype: str = "bfloat16") -> MSAConfig:
    """Our settings for an MSA checkpoint: the reference profile with its layers, P, k and reductions.

    max_doc_tokens: the reference never splits a document; pass the model's context length.
    storage_dtype: the reference stores pooled tensors in the model dtype.
    """
    decouple = bool(msa_cfg["decouple_router"])
    return MSAConfig(
        routing={
            "layers": parse_router_layers(msa_cfg["router_layer_idx"], num_layers),
            "top_k": int(msa_cfg["doc_top_k"]),
            "head_reduce": msa_cfg["head_reduce_method"],
            "query_reduce": msa_cfg["query_reduce_method"],
            "chunk_reduce": msa_cfg["chunk_reduce_method"],
            "normalization": normalization_for(msa_cfg["aux_loss_method"], decouple),
        },
        encode={"chunk_size": int(msa_cfg["pooling_kernel_size"]), "max_doc_tokens": max(1, int(max_doc_tokens)),
                "storage_dtype": storage_dtype},
        profile="reference",
    )


def msa_config_for(config: MSAConfig, layers: Sequence[int], num_layers: int, decouple_router: bool,
                   previous: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """msa_config describing our settings, keeping every other key of `previous` (training weights ...)."""
    out = read_msa_config(previous)
    r = config.routing
    if r.query_reduce not in _CHOICES["query_reduce_method"]:
        raise InvalidInputError(f"the MSA format knows query_reduce {_CHOICES['query_reduce_method']}, not "
                                f"{r.query_reduce!r} (msa's own routing v2): save the router file instead")
    out.update({
        "router_layer_idx": format_router_layers(layers, num_layers, (previous or {}).get("router_layer_idx")),
        "decouple_router": bool(decouple_router),
        "pooling_kernel_size": config.encode.chunk_size,
        "doc_top_k": r.top_k,
        "head_reduce_method": r.head_reduce,
        "query_reduce_method": r.query_reduce,
        "chunk_reduce_method": r.chunk_reduce,
        "aux_loss_method": _aux_loss_method_for(r.normalization, decouple_router,
                                                (previous or {}).get("aux_loss_method")),
    })
    if not previous or "top_k_docs" not in previous:
        out["top_k_docs"] = r.top_k  # the training k; ours trains with the inference k
    return out


def merge_config(base: MSAConfig, override: MSAConfig | Mapping[str, Any] | None) -> MSAConfig:
    """`base` with what `override` sets (an MSAConfig's explicitly set fields, or a nested dict)."""
    if override is None:
        return base
    if isinstance(override, MSAConfig):
        over = override.model_dump(exclude_unset=True)
    elif isinstance(override, Mapping):
        over = dict(override)
    else:
        raise InvalidInputError(f"config must be an MSAConfig or a dict, got {type(override).__name__}")
    return MSAConfig.model_validate(_deep_merge(base.model_dump(), over))


def _deep_merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


# --------------------------------------------------------------------------------------------
# Routing without projectors (decouple_router false)
# --------------------------------------------------------------------------------------------


class AttentionRouter:
    """Routing with the attention's own projections (decouple_router false, spec §2.2-2.3).

    The routing query of a token is the layer's q after q_norm and RoPE (so it needs positions);
    the routing key of a chunk is the pooled post-RoPE key K̄ (the encoder stores K̄ as K̄_R).
    No weights of its own: the backbone's are used, and the fingerprint covers only the layout.
    """

    needs_positions = True
    keys_from_attention = True
    init_mode = "attention"

    def __init__(self, backbone: Backbone, layers: Sequence[int]) -> None:
        a = backbone.args
        if not layers:
            raise InvalidInputError("AttentionRouter needs at least one routing layer, got none")
        bad = [i for i in layers if not 0 <= int(i) < a.num_layers]
        if bad:
            raise InvalidInputError(f"routing layers {bad} do not exist in a backbone of {a.num_layers} layers")
        self._backbone = backbone  # a plain reference: not a submodule, so .to() never copies weights
        self._layers = sorted(set(int(i) for i in layers))
        self.num_heads, self.kv_heads, self.head_dim = a.num_heads, a.kv_heads, a.head_dim
        self.hidden = a.hidden_size
        self.backbone_fingerprint: str | None = None
        self.extra: dict[str, Any] = {}

    @property
    def layers(self) -> list[int]:
        return list(self._layers)

    def to(self, *args: Any, **kwargs: Any) -> "AttentionRouter":
        return self  # the weights are the backbone's

    def project_queries(self, layer: int, x: Tensor, positions: Tensor) -> Tensor:
        """x [B, T, hidden] at RoPE positions [B, T] -> rotated queries [B, T, H, D]."""
        if layer not in self._layers:
            raise InvalidInputError(f"layer {layer} is not a routing layer; routing layers are {self._layers}")
        attn = self._backbone.layers[layer].self_attn
        b, t, _ = x.shape
        q = attn.q_proj(x).view(b, t, self.num_heads, self.head_dim)
        if attn.qk_norm:
            q = attn.q_norm(q)
        cos, sin = self._backbone.rotary(positions, q.dtype)
        return apply_rotary(q.transpose(1, 2), cos, sin).transpose(1, 2)

    def project_keys(self, layer: int, x: Tensor) -> Tensor:
        raise InvalidInputError("an attention router's keys are the pooled attention keys K̄, not a projection")

    def state_dict_msa(self) -> dict[str, Tensor]:
        return {}

    def fingerprint(self) -> str:
        h = hashlib.sha256(f"msa-attention-router/1:{self.num_heads},{self.kv_heads},{self.head_dim}:"
                           f"{self._layers}".encode())
        return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def read_router_tensors(path: Path) -> dict[str, Tensor]:
    """Only the router projector tensors of a checkpoint folder (safetensors opened lazily)."""
    from safetensors import safe_open


    out: dict[str, Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt", device="cpu") as handle:
            for name in handle.keys():
                if ROUTER_NAME_RE.match(name):
                    out[name] = handle.get_tensor(name)
    return out


def _raw_config(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read {path / 'config.json'}: {e}") from e
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{path / 'config.json'} is not a JSON object")
    return raw


def load_msa_parts(path: str | os.PathLike[str], *, router: str | Path | None = None,
                   config: MSAConfig | Mapping[str, Any] | None = None, profile: str | None = None,
                   device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                   name: str = "") -> ModelParts:
    """The model parts of a local MSA-format folder (MSAModel.from_pretrained builds the model from them).

    Settings: `msa_engine` when the folder has it (saved by us), else derived from msa_config with the
    reference defaults; `config` overrides what it sets. Profile: `profile`, else the config's, else
    "reference". Router: the checkpoint's projectors (decouple_router true) or the attention's own
    projections (false); `router` ("native", "random" or a router file) replaces them.
    """
    from transformers import AutoTokenizer

    path = Path(path)
    raw = _raw_config(path)
    msa_cfg = read_msa_config(raw.get("msa_config"))
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    backbone, hf_cfg = load_backbone(path, dtype=dtype, device=device)
    a = backbone.args
    engine = raw.get(ENGINE_KEY) if isinstance(raw.get(ENGINE_KEY), dict) else None
    if engine is not None and "config" in engine:
        base = MSAConfig.model_validate(engine["config"])
    else:
        base = engine_config(msa_cfg, a.num_layers, max_doc_tokens=a.rope.max_position_embeddings,
                             storage_dtype=dtype_name(dtype))
    cfg = _with_profile(merge_config(base, config), profile)
    generator = None  # hybrid answers use the backbone, unless a router file's delta changes it
    if router is not None:
        projectors, cfg, generator = make_router(backbone, cfg, router)
        projectors = projectors.to(device=device, dtype=dtype)
    elif msa_cfg["decouple_router"]:
        projectors, cfg = _checkpoint_router(path, backbone, cfg, device, dtype)
        generator = _restore_delta(path, backbone, projectors)
    else:
        projectors = AttentionRouter(backbone, cfg.resolve_routing_layers(a.num_layers))
    tokenizer = _quietly(AutoTokenizer.from_pretrained, str(path))
    return ModelParts(backbone, tokenizer, projectors, cfg, name=name or str(path),
                      eos_ids=declared_eos_ids(tokenizer, hf_cfg, path), generator=generator, hf_config=hf_cfg,
                      msa_config=msa_cfg)


def _with_profile(cfg: MSAConfig, profile: str | None) -> MSAConfig:
    chosen = profile or cfg.profile or "reference"
    if chosen not in ("default", "reference"):
        raise InvalidInputError(f"profile must be 'default' or 'reference', got {chosen!r}")
    return cfg.model_copy(update={"profile": chosen})


def msa_parts_from_components(backbone: Backbone, tokenizer: Any, msa_config: Mapping[str, Any] | None, *,
                              router: RouterProjectors | None = None,
                              config: MSAConfig | Mapping[str, Any] | None = None, profile: str | None = None,
                              eos_ids: Sequence[int] = (), name: str = "") -> ModelParts:
    """Model parts as if loaded from an MSA checkpoint, built from objects in memory (no files):
    e.g. a randomly initialised MSA-4B-shaped backbone for a benchmark. `router` is required when
    msa_config says decouple_router."""
    msa_cfg = read_msa_config(msa_config)
    a = backbone.args
    cfg = _with_profile(merge_config(engine_config(msa_cfg, a.num_layers, max_doc_tokens=a.rope.max_position_embeddings,
                                                   storage_dtype=dtype_name(backbone.dtype)), config), profile)
    if msa_cfg["decouple_router"]:
        if router is None:
            raise InvalidInputError("msa_config says decouple_router: pass the router projectors")
        projectors: Any = router
    else:
        projectors = AttentionRouter(backbone, cfg.resolve_routing_layers(a.num_layers))
    return ModelParts(backbone, tokenizer, projectors, cfg, name=name, eos_ids=eos_ids, msa_config=msa_cfg)


def _quietly(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call without transformers' warning that model_type "msa" is unknown to it (it reads config.json
    to find the tokenizer class; tokenizer_config.json names it)."""
    import warnings

    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():  # and its FutureWarning about the legacy rope fields
            warnings.simplefilter("ignore", FutureWarning)
            return fn(*args, **kwargs)
    finally:
        hf_logging.set_verbosity(level)


def _checkpoint_router(path: Path, backbone: Backbone, cfg: MSAConfig, device: torch.device,
                       dtype: torch.dtype) -> tuple[RouterProjectors, MSAConfig]:
    a = backbone.args
    tensors = read_router_tensors(path)
    if not tensors:
        raise ModelLoadError(f"{path} says decouple_router is true but holds no router projector tensors "
                             "(model.layers.{i}.self_attn.router_q_proj.0.weight ...)")
    projectors = RouterProjectors.from_state_dict_msa(tensors, a.num_heads, a.kv_heads, a.head_dim)
    want = cfg.resolve_routing_layers(a.num_layers)
    if projectors.layers != want:
        raise ModelLoadError(f"{path}: router tensors cover layers {projectors.layers} but the routing layers are "
                             f"{want} (router_layer_idx / config); make them agree")
    return projectors.to(device=device, dtype=dtype), cfg


def _restore_delta(path: Path, backbone: Backbone, projectors: RouterProjectors) -> Backbone | None:
    """Give the router back the delta saved beside the weights, and return the base weights of the layers it
    changed (unmerged from a private copy of them), for hybrid answers. None when the folder has no delta."""
    from safetensors import safe_open

    from ..decoder.lora import base_view, delta_layers, merge

    file = path / DELTA_FILE
    if not file.is_file():
        return None
    try:
        with safe_open(str(file), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            scale = float((f.metadata() or {})["scale"])
    except Exception as exc:  # truncated file, missing metadata, not safetensors
        raise ModelLoadError(f"{file} is unreadable ({exc}); save the model again") from exc
    projectors.backbone_delta, projectors.delta_scale = tensors, scale
    generator = base_view(backbone, delta_layers(tensors))
    merge(generator, tensors, -scale)
    return generator


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------
