"""Writing a model as an MSA-format folder (the released checkpoint's layout): config.json with msa_config
and our engine settings, backbone and router tensors under Hugging Face / reference names, sharded
safetensors, tokenizer and generation config. Reading is msa_format.py."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..decoder.backbone import Backbone, BackboneArgs
from ..errors import InvalidInputError
from .loading import LoadedModel
from .msa_format import (
    ARCHITECTURES,
    BASE_KEY,
    DELTA_FILE,
    ENGINE_FORMAT_VERSION,
    ENGINE_KEY,
    MODEL_TYPE,
    dtype_name,
    msa_config_for,
)


def _backbone_tensors(backbone: Backbone, dtype: torch.dtype | None) -> dict[str, Tensor]:
    """The backbone under Hugging Face names (`model.` prefix, lm_head omitted when tied)."""
    out: dict[str, Tensor] = {}
    for name, t in backbone.state_dict().items():
        if name.startswith("rotary."):
            continue
        if name.startswith("lm_head."):
            if backbone.args.tie_word_embeddings:
                continue
            key = name
        else:
            key = "model." + name
        t = t.detach()
        out[key] = (t.to(dtype) if dtype is not None else t).cpu().contiguous()
    return out


def _hf_config_dict(model: LoadedModel) -> dict[str, Any]:
    hf = getattr(model, "hf_config", None)
    if hf is not None:
        d = hf.to_dict()
    else:
        d = _config_from_args(model.backbone.args, model.eos_ids)
    for key in (ENGINE_KEY, "msa_config", BASE_KEY, "_name_or_path", "transformers_version"):
        d.pop(key, None)
    return d


def _config_from_args(a: BackboneArgs, eos_ids: Sequence[int]) -> dict[str, Any]:
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[a.family]
    rope = {**a.rope.params, "rope_type": a.rope.rope_type, "rope_theta": a.rope.theta}
    kw: dict[str, Any] = dict(
        vocab_size=a.vocab_size, hidden_size=a.hidden_size, intermediate_size=a.intermediate_size,
        num_hidden_layers=a.num_layers, num_attention_heads=a.num_heads, num_key_value_heads=a.kv_heads,
        head_dim=a.head_dim, rms_norm_eps=a.rms_norm_eps, max_position_embeddings=a.rope.max_position_embeddings,
        tie_word_embeddings=a.tie_word_embeddings, hidden_act="silu", rope_parameters=rope,
        eos_token_id=list(eos_ids) if len(eos_ids) > 1 else (eos_ids[0] if eos_ids else None),
    )
    if a.family != "qwen2":
        kw["attention_bias"] = a.qkv_bias
    if a.family == "llama":
        kw["mlp_bias"] = a.mlp_bias
    return cls(**kw).to_dict()


def msa_config_json(model: LoadedModel, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """The config.json that `save_msa` writes for `model`."""
    a = model.backbone.args
    d = _hf_config_dict(model)
    decouple = not getattr(model.router, "keys_from_attention", False)
    d.update({
        "model_type": MODEL_TYPE,
        "architectures": list(ARCHITECTURES),
        "msa_config": msa_config_for(model.config, model.layers, a.num_layers, decouple,
                                     getattr(model, "msa_config", None)),
        ENGINE_KEY: {"format_version": ENGINE_FORMAT_VERSION, "profile": model.config.profile,
                     "config": model.config.model_dump(mode="json"), "router_init_mode": model.router.init_mode},
    })
    if a.family != "qwen3":
        d[BASE_KEY] = a.family
    # Legacy fields for transformers 4.x (the reference pins 4.51.3): it reads rope_theta/rope_scaling
    # and torch_dtype, not rope_parameters/dtype.
    d["rope_theta"] = a.rope.theta
    scaling = {k: v for k, v in a.rope.params.items() if k != "rope_theta"}
    d["rope_scaling"] = scaling if a.rope.rope_type != "default" else None
    name = dtype_name(dtype or model.backbone.dtype)
    d["dtype"] = d["torch_dtype"] = name
    return d


def save_msa(model: LoadedModel, path: str | os.PathLike[str], *, dtype: torch.dtype | None = None,
             max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write `model` as an MSA-format folder: config.json, safetensors (sharded above max_shard_bytes,
    with an index), generation_config.json and the tokenizer. Loading it back gives the same weights,
    router fingerprint and settings. Earlier weight files in the folder are removed first.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InvalidInputError(f"{path} exists and is not a folder; pick a folder to save the model to")
    path.mkdir(parents=True, exist_ok=True)
    tensors = _backbone_tensors(model.backbone, dtype)
    for name, t in model.router.state_dict_msa().items():
        tensors[name] = (t.to(dtype) if dtype is not None else t).cpu().contiguous()
    for old in list(path.glob("model*.safetensors")) + list(path.glob("model.safetensors.index.json")) \
            + list(path.glob(DELTA_FILE)):
        old.unlink()
    delta = getattr(model.router, "backbone_delta", None)
    if delta:  # the weights below include it; kept for the router's fingerprint and the hybrid generator
        save_file({n: t.detach().cpu().contiguous() for n, t in delta.items()}, str(path / DELTA_FILE),
                  metadata={"scale": repr(model.router.delta_scale)})
    shards = _shard(tensors, max_shard_bytes)
    if len(shards) == 1:
        save_file(shards[0], str(path / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map: dict[str, str] = {}
        for n, shard in enumerate(shards, 1):
            fname = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(path / fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in shard})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    config = msa_config_json(model, dtype)
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    _save_generation_config(model, path)
    model.tokenizer.save_pretrained(str(path))
    return path


def _shard(tensors: Mapping[str, Tensor], max_bytes: int) -> list[dict[str, Tensor]]:
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
    return shards


def _save_generation_config(model: LoadedModel, path: Path) -> None:
    eos = list(model.eos_ids)
    gen = {"eos_token_id": eos if len(eos) != 1 else eos[0]}
    pad = getattr(model.tokenizer, "pad_token_id", None)
    if pad is not None:
        gen["pad_token_id"] = pad
    (path / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n", encoding="utf-8")
