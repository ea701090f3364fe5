"""A Llama / Qwen2 / Qwen3 decoder whose attention, RoPE and KV cache we own.

MSA splices compressed memory K/V into the attention of the routing layers, so every layer must
accept positions and extra keys explicitly. transformers gives us config parsing, tokenizer and the
weights; module names mirror the Hugging Face state dict (`model.layers.3.self_attn.q_proj` ...), so
weights load by name without conversion.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelLoadError
from .packed import Packs, packing_wanted
from .rope import RopeSpec, RotaryEmbedding, apply_rotary

SUPPORTED_FAMILIES = ("llama", "qwen2", "qwen3")


@dataclass(frozen=True)
class BackboneArgs:
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeSpec
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    tie_word_embeddings: bool = False

    @classmethod
    def from_hf_config(cls, cfg: Any) -> "BackboneArgs":
        family = getattr(cfg, "model_type", None)
        if family == "msa":  # released MSA checkpoints are Qwen3 plus routers
            family = "qwen3"
        if family not in SUPPORTED_FAMILIES:
            raise ModelLoadError(
                f"model_type {family!r} is not supported; msa runs {', '.join(SUPPORTED_FAMILIES)} decoders"
            )
        act = getattr(cfg, "hidden_act", "silu")
        if act != "silu":
            raise ModelLoadError(f"hidden_act {act!r} is not supported (expected 'silu')")
        if getattr(cfg, "use_sliding_window", False):
            raise ModelLoadError("sliding-window attention is not supported; set use_sliding_window=false")
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        attention_bias = bool(getattr(cfg, "attention_bias", False))
        return cls(
            family=family,
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_layers=cfg.num_hidden_layers,
            num_heads=cfg.num_attention_heads,
            kv_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
            head_dim=head_dim,
            rms_norm_eps=float(cfg.rms_norm_eps),
            rope=RopeSpec.from_hf_config(cfg, head_dim),
            # Qwen2 always has q/k/v biases and never an o bias; Llama and Qwen3 follow attention_bias.
            qkv_bias=True if family == "qwen2" else attention_bias,
            o_bias=False if family == "qwen2" else attention_bias,
            mlp_bias=bool(getattr(cfg, "mlp_bias", False)),
            qk_norm=family == "qwen3",
            tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        )


class Memory(NamedTuple):
    """Compressed memory spliced in front of a layer's keys: post-RoPE K, V [B, kv_heads, M, D]."""

    k: torch.Tensor
    v: torch.Tensor
    valid: torch.Tensor  # [B, M] bool; rows select different documents, so some slots are padding


# layer index, normed hidden states [B, T, hidden] -> memory for this layer or None
MemoryHook = Callable[[int, torch.Tensor], Memory | None]
# layer index, normed hidden [B, T, hidden], post-RoPE keys [B, kv, T, D], values [B, kv, T, D]
CaptureHook = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x * rsqrt(mean(x²) + eps) in float32, as transformers computes it, in one fused kernel
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


class LayerCache:
    """One layer's keys and values in attention order (memory slots first, then tokens).

    Slots are not positions: RoPE is applied before storing, and routing layers hold extra memory
    slots, so callers always pass positions explicitly.
    """

    def __init__(self, batch: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, capacity: int = 256) -> None:
        self.k = torch.zeros(batch, kv_heads, capacity, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        self.length = 0

    def _grow(self, needed: int) -> None:
        capacity = max(needed, 2 * self.k.shape[2])
        pad = capacity - self.k.shape[2]
        self.k = F.pad(self.k, (0, 0, 0, pad))
        self.v = F.pad(self.v, (0, 0, 0, pad))
        self.valid = F.pad(self.valid, (0, pad))

    def append(self, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor) -> int:
        """Store k, v [B, kv, T, D]; returns the first slot written."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.k.shape[2]:
            self._grow(end)
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        self.valid[:, start:end] = valid
        self.length = end
        return start

    def view(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = self.length
        return self.k[:, :, :n], self.v[:, :, :n], self.valid[:, :n]


def attention_mask(valid_keys: torch.Tensor, first_query_slot: int, num_queries: int,
                   causal: bool = True) -> torch.Tensor:
    """[B, 1, T, S] bool: query i (slot first+i) sees valid keys at slots <= its own.

    causal=False: every query of the block also sees the block's later keys (the reference's
    decode-mode injection, spec §2.5 and §6.3).
    A query always sees its own slot, even when it is padding: a fully masked row would give NaN,
    and NaN values leak through later matmuls even with zero weights.
    """
    s = valid_keys.shape[1]
    key_slot = torch.arange(s, device=valid_keys.device)
    query_slot = first_query_slot + torch.arange(num_queries, device=valid_keys.device)
    sees_upto = query_slot if causal else torch.full_like(query_slot, first_query_slot + num_queries - 1)
    before = key_slot[None, :] <= sees_upto[:, None]
    own = key_slot[None, :] == query_slot[:, None]
    return ((before[None] & valid_keys[:, None, :]) | own[None])[:, None]


MATMUL_ATTENTION_MAX_TOKENS = 256  # CPU bf16 encoding blocks up to this length: causal_matmul_attention


def causal_matmul_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal self-attention of q [B, H, T, D] over k, v [B, kv, T, D] as two batched matmuls, each kv head's
    G query heads stacked into one [G*T, D] block (kv heads never repeated); returns [B, H, T, D].

    For encoding on a CPU in bfloat16: SDPA's CPU flash kernel works in 32-query blocks and ran at a sixth of
    the projections' rate on the 2-core machine, where these two products encoded HotpotQA passages 3-10%
    faster (blocks of up to MATMUL_ATTENTION_MAX_TOKENS; longer ones lose: the [T, T] scores grow). Products
    accumulate in fp32 and the softmax runs in fp32, as in the flash kernel, but the scores are rounded to
    bfloat16 before it (the flash kernel keeps them in fp32): pooled routing keys moved 9% further from the
    fp32 path's (mean 1 - cosine 8.7e-5 vs 8.0e-5).
    """
    b, h, t, d = q.shape
    kv = k.shape[1]
    g = h // kv
    future = torch.full((t, t), float("-inf"), dtype=q.dtype, device=q.device).triu_(1)  # the diagonal stays
    scores = torch.baddbmm(future.repeat(g, 1).expand(b * kv, g * t, t), q.reshape(b * kv, g * t, d),
                           k.reshape(b * kv, t, d).transpose(1, 2), alpha=d ** -0.5)
    return torch.bmm(torch.softmax(scores, dim=-1), v.reshape(b * kv, t, d)).view(b, h, t, d)


class Attention(nn.Module):
    packs = Packs(enabled=False)  # the backbone's own (packed.py) once it owns the layer

    def __init__(self, a: BackboneArgs) -> None:
        super().__init__()
        self.num_heads, self.kv_heads, self.head_dim = a.num_heads, a.kv_heads, a.head_dim
        self.q_proj = nn.Linear(a.hidden_size, a.num_heads * a.head_dim, bias=a.qkv_bias)
        self.k_proj = nn.Linear(a.hidden_size, a.kv_heads * a.head_dim, bias=a.qkv_bias)
        self.v_proj = nn.Linear(a.hidden_size, a.kv_heads * a.head_dim, bias=a.qkv_bias)
        self.o_proj = nn.Linear(a.num_heads * a.head_dim, a.hidden_size, bias=a.o_bias)
        if a.qk_norm:
            self.q_norm = RMSNorm(a.head_dim, a.rms_norm_eps)
            self.k_norm = RMSNorm(a.head_dim, a.rms_norm_eps)
        self.qk_norm = a.qk_norm

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [B, T, hidden] -> q [B, H, T, D], k and v [B, kv, T, D] (q and k rotated)."""
        b, t, _ = x.shape
        q, k, v = self.packs.apply(self, "qkv", (self.q_proj, self.k_proj, self.v_proj), x)
        q = q.reshape(b, t, self.num_heads, self.head_dim)
        k = k.reshape(b, t, self.kv_heads, self.head_dim)
        v = v.reshape(b, t, self.kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def forward(self, x, cos, sin, valid, cache: LayerCache | None, memory: Memory | None,
                capture: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
                causal: bool = True) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.project(x, cos, sin)
        if capture is not None:
            capture(k, v)
        if cache is None and memory is None and valid is None and causal:
            # Plain causal self-attention (encoding right-padded documents): pads come last, so
            # no real token ever sees them.
            if q.dtype == torch.bfloat16 and q.device.type == "cpu" and t <= MATMUL_ATTENTION_MAX_TOKENS:
                out = causal_matmul_attention(q, k, v)
            else:
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            if valid is None:
                valid = torch.ones(b, t, dtype=torch.bool, device=x.device)
            if cache is None:
                cache = LayerCache(b, self.kv_heads, self.head_dim, k.dtype, k.device, capacity=t)
            if memory is not None:
                cache.append(memory.k.to(k.dtype), memory.v.to(v.dtype), memory.valid)
            first = cache.append(k, v, valid)
            keys, values, valid_keys = cache.view()
            mask = attention_mask(valid_keys, first, t, causal)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)
        return self.output(out)

    def output(self, out: torch.Tensor) -> torch.Tensor:
        """The heads' outputs [B, H, T, D] through o_proj: [B, T, hidden]."""
        b, _, t, _ = out.shape
        return self.packs.apply(self, "o", (self.o_proj,), out.transpose(1, 2).reshape(b, t, -1))[0]


class MLP(nn.Module):
    packs = Packs(enabled=False)

    def __init__(self, a: BackboneArgs) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(a.hidden_size, a.intermediate_size, bias=a.mlp_bias)
        self.up_proj = nn.Linear(a.hidden_size, a.intermediate_size, bias=a.mlp_bias)
        self.down_proj = nn.Linear(a.intermediate_size, a.hidden_size, bias=a.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.packs.apply(self, "gate_up", (self.gate_proj, self.up_proj), x)
        return self.packs.apply(self, "down", (self.down_proj,), F.silu(gate) * up)[0]


class DecoderLayer(nn.Module):
    def __init__(self, a: BackboneArgs) -> None:
        super().__init__()
        self.self_attn = Attention(a)
        self.mlp = MLP(a)
        self.input_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)


class Backbone(nn.Module):
    """The decoder. `forward` returns final hidden states; `logits` applies the head."""

    def __init__(self, args: BackboneArgs) -> None:
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args) for _ in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = RotaryEmbedding(args.rope)
        # CPU bf16 inference: fused, prepacked projections (packed.py), for backbones small enough to pack
        weight_bytes = 2 * sum(p.numel() for p in self.parameters())
        self.packs = Packs(enabled=packing_wanted(weight_bytes))
        for layer in self.layers:
            layer.self_attn.packs = layer.mlp.packs = self.packs

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def new_caches(self, batch: int, capacity: int = 256) -> list[LayerCache]:
        a = self.args
        return [LayerCache(batch, a.kv_heads, a.head_dim, self.dtype, self.device, capacity)
                for _ in range(a.num_layers)]

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        *,
        valid: torch.Tensor | None = None,
        caches: list[LayerCache] | None = None,
        memory_hook: MemoryHook | None = None,
        capture: CaptureHook | None = None,
        last_layer: int | None = None,
        causal: bool = True,
        hooks_only_in_last: bool = False,
    ) -> torch.Tensor:
        """Run layers 0..last_layer (default all) over tokens at explicit RoPE positions.

        valid [B, T] marks real tokens (None: all real, right padding allowed without a cache);
        caches receive each layer's K/V; memory_hook may return memory for a layer;
        capture sees each layer's normed input, keys and values (encoding);
        causal=False lets the block's tokens see each other both ways (reference parity only);
        hooks_only_in_last=True stops last_layer after its memory hook and capture (its K/V projection),
        for callers that need nothing else from it (encoding, scoring-only retrieval): the returned
        hidden states are then those entering last_layer.
        """
        h = self.embed_tokens(input_ids)
        cos, sin = self.rotary(positions, h.dtype)
        stop = self.args.num_layers - 1 if last_layer is None else last_layer
        for i, layer in enumerate(self.layers[: stop + 1]):
            x = layer.input_layernorm(h)
            memory = memory_hook(i, x) if memory_hook is not None else None
            if hooks_only_in_last and i == stop:
                if capture is not None:
                    _, k, v = layer.self_attn.project(x, cos, sin)
                    capture(i, x, k, v)
                break
            cap = (lambda k, v, i=i, x=x: capture(i, x, k, v)) if capture is not None else None
            cache = caches[i] if caches is not None else None
            h = h + layer.self_attn(x, cos, sin, valid, cache, memory, cap, causal)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return h

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(hidden)).float()

    def attention_weights(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_Q, W_K) of a layer, the `native` router initialisation."""
        attn = self.layers[layer].self_attn
        return attn.q_proj.weight.detach(), attn.k_proj.weight.detach()

    def fingerprint(self) -> str:
        """Stable id of these weights: config plus a strided sample of every tensor (dtype-independent)."""
        h = hashlib.sha256()
        h.update(json.dumps(_args_dict(self.args), sort_keys=True).encode())
        for name, t in sorted(self.state_dict().items()):
            flat = t.detach().reshape(-1)
            step = max(1, flat.numel() // 4096)
            h.update(name.encode())
            h.update(str(tuple(t.shape)).encode())
            # Sampled values rounded to bfloat16: the same weights loaded in float32, float16 or
            # bfloat16 give one fingerprint, so banks and routers move between CPU and GPU.
            h.update(flat[::step].to(torch.bfloat16).float().cpu().numpy().tobytes())
        return h.hexdigest()[:16]


def _args_dict(a: BackboneArgs) -> dict[str, Any]:
    d = {k: v for k, v in a.__dict__.items() if k != "rope"}
    d["rope"] = {"theta": a.rope.theta, "dim": a.rope.dim, "type": a.rope.rope_type}
    return d


def load_backbone(path: str | Path, *, dtype: torch.dtype = torch.float32,
                  device: str | torch.device = "cpu") -> tuple[Backbone, Any]:
    """Build our decoder from a local Hugging Face folder; returns (backbone, hf_config)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} has no config.json; pass a folder with a Hugging Face checkpoint")
    cfg = _read_config(path, AutoConfig)
    args = BackboneArgs.from_hf_config(cfg)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{path} holds no *.safetensors weights (convert .bin checkpoints first)")
    with torch.device("meta"):
        model = Backbone(args)
    state: dict[str, torch.Tensor] = {}
    for f in files:
        for name, t in load_file(str(f)).items():
            if name.startswith("model."):
                name = name[len("model."):]
            if name.startswith(("lm_head.", "embed_tokens.", "layers.", "norm.")):
                state[name] = t
    model.load_state_dict(_only_backbone(state, model), strict=False, assign=True)
    if args.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.rotary = RotaryEmbedding(args.rope)  # built on the meta device above; frequencies are not weights
    return model.to(device=device, dtype=dtype).eval(), cfg


def _read_config(path: Path, auto_config: Any) -> Any:
    raw = json.loads((path / "config.json").read_text())
    if raw.get("model_type") == "msa":
        # MSA checkpoints are Qwen3 configs with extra keys and no auto_map; ours may record another
        # base family (e.g. a Llama backbone with a trained router) under `base_model_type`.
        from transformers import LlamaConfig, Qwen2Config, Qwen3Config

        classes = {"qwen3": Qwen3Config, "llama": LlamaConfig, "qwen2": Qwen2Config}
        base = raw.get("base_model_type") or "qwen3"
        if base not in classes:
            raise ModelLoadError(f"{path / 'config.json'}: base_model_type {base!r} is not supported "
                                 f"(supported: {', '.join(classes)})")
        skip = ("model_type", "architectures", "base_model_type")
        fields = {k: v for k, v in raw.items() if k not in skip}
        if isinstance(fields.get("sliding_window"), bool):
            # The reference's decoder layer writes `sliding_window: false` (spec §1.1); transformers 5
            # accepts only an int or null there. use_sliding_window still says whether it is used.
            fields["sliding_window"] = None
        with warnings.catch_warnings():  # legacy rope_theta/rope_scaling fields are expected here
            warnings.simplefilter("ignore", FutureWarning)
            return classes[base].from_dict(fields)
    try:
        return auto_config.from_pretrained(str(path))
    except Exception as e:  # transformers raises several types for unreadable configs
        raise ModelLoadError(f"cannot read {path / 'config.json'}: {e}") from e


def _only_backbone(state: dict[str, torch.Tensor], model: Backbone) -> dict[str, torch.Tensor]:
    """Drop tensors we do not model (e.g. MSA router projectors), fail clearly on missing ones."""
    expected = set(model.state_dict().keys())
    if model.args.tie_word_embeddings:
        expected.discard("lm_head.weight")
    missing = {k for k in expected - state.keys() if not k.startswith("rotary.")}
    if missing:
        raise ModelLoadError(f"checkpoint lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
    return {k: v for k, v in state.items() if k in expected}
