"""Tiny random MSA-format checkpoints (spec §1), written the way the reference's resave writes them.

config.json is a Qwen3 config in transformers-4.51 style (rope_theta, torch_dtype, sliding_window
false) with model_type "msa", architectures ["MSAForCausalLM"] and an msa_config whose
router_layer_idx is a comma string; with decouple_router the routing layers get router projectors
under the reference's names (std 0.2 to avoid ties), and a root `temperature` scalar is stored as the
reference does. The tokenizer knows <|im_start|>, <|im_end|> and <|object_ref_end|>;
<End-of-Retrieve> stays plain text, as in the released tokenizer (no tokens were added by resave).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from tiny import hf_config, save_tiny_tokenizer

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>"]
_SENTENCES = [
    "The lighthouse of Velmora was built in 1887 by the engineer Ada Quist.",
    "Ferries leave the harbour every morning at seven and return at dusk.",
    "What is the capital of France? Paris is the capital of France.",
    "user\nPlease answer the question based on the above historical document information\n\n",
    "\nPlease return all documents related to the question\n",
    "The user's question is: The answer to the question is: <End-of-Retrieve>",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,;:!?'\"()[]-",
]


def save_msa_tokenizer(path: Path) -> None:
    save_tiny_tokenizer(path, specials=SPECIALS, sentences=_SENTENCES, vocab_size=480)


def msa_config(*, layers: str = "2,3", decouple: bool = True, aux: str = "INFONCE_DECOUPLE", pooling: int = 4,
               doc_top_k: int | None = 2, **extra: Any) -> dict[str, Any]:
    cfg = {"router_layer_idx": layers, "decouple_router": decouple, "top_k_docs": 2,
           "pooling_kernel_size": pooling, "head_reduce_method": "mean", "query_reduce_method": "max",
           "chunk_reduce_method": "max", "aux_loss_method": aux, "aux_loss": False, "infonce_loss_temp": 0.1,
           "lmloss_weigth": 1.0, "auxloss_weight": 0.1, "recloss_weight": 0.0, "ansloss_weight": 1.0,
           "rewrite_position": True, "decouple_pooling_mode": "mean"}
    if doc_top_k is not None:
        cfg["doc_top_k"] = doc_top_k
    cfg.update(extra)
    return cfg


def save_tiny_msa_model(path: Path, *, seed: int = 0, router_std: float = 0.2, drop: tuple[str, ...] = (),
                        **msa: Any) -> Path:
    """A random tiny MSA checkpoint in `path`; `msa` overrides msa_config keys (see msa_config),
    `drop` removes msa_config keys (to test the reference defaults)."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path.mkdir(parents=True, exist_ok=True)
    save_msa_tokenizer(path)
    vocab = len(AutoTokenizer.from_pretrained(str(path)))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config("qwen3", vocab), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(str(path))
    cfg = msa_config(**msa)
    for key in drop:
        cfg.pop(key, None)
    _rewrite_config(path, cfg)
    tensors = load_file(str(path / "model.safetensors"))
    if cfg.get("decouple_router"):
        a = model.config
        gen = torch.Generator().manual_seed(seed + 1)
        for i in _layers(cfg["router_layer_idx"], a.num_hidden_layers):
            tensors[f"model.layers.{i}.self_attn.router_q_proj.0.weight"] = (
                torch.randn(a.num_attention_heads * a.head_dim, a.hidden_size, generator=gen) * router_std)
            tensors[f"model.layers.{i}.self_attn.router_k_proj.0.weight"] = (
                torch.randn(a.num_key_value_heads * a.head_dim, a.hidden_size, generator=gen) * router_std)
    tensors["temperature"] = torch.tensor(0.1)  # root scalar of the reference: ignored at inference
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def _layers(spec: str, n: int) -> list[int]:
    return list(range(n)) if spec == "all" else [int(x) for x in spec.split(",")]


def _rewrite_config(path: Path, msa: dict[str, Any]) -> None:
    """transformers-4.51 style, as the released config.json."""
    raw = json.loads((path / "config.json").read_text())
    rope = raw.pop("rope_parameters", {}) or {}
    raw.pop("dtype", None)
    raw.update({"model_type": "msa", "architectures": ["MSAForCausalLM"], "rope_theta": rope.get("rope_theta", 1e4),
                "rope_scaling": None, "torch_dtype": "float32", "sliding_window": False, "use_sliding_window": False,
                "transformers_version": "4.51.3", "msa_config": msa})
    (path / "config.json").write_text(json.dumps(raw, indent=2))
