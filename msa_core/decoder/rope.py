"""Rotary position embeddings with the scaling variants of the Llama, Qwen2 and Qwen3 families.

We own RoPE because MSA needs positions passed explicitly: documents restart at 0 and the question
starts after a memory offset. Frequencies follow the published formulas (and transformers'
`modeling_rope_utils`, which our parity tests compare against).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import ModelLoadError

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")


@dataclass(frozen=True)
class RopeSpec:
    """What a checkpoint's config says about RoPE, normalised across transformers versions."""

    theta: float
    dim: int  # rotary dimension (head_dim x partial_rotary_factor)
    rope_type: str = "default"
    max_position_embeddings: int = 2048
    params: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_hf_config(cls, cfg: Any, head_dim: int) -> "RopeSpec":
        # transformers 5 keeps everything in `rope_parameters`; 4.x used rope_theta + rope_scaling.
        params = dict(getattr(cfg, "rope_parameters", None) or {})
        legacy = getattr(cfg, "rope_scaling", None) or {}
        if not params:
            params = dict(legacy)
        theta = params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ModelLoadError(
                f"RoPE type {rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
            )
        partial = params.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", 1.0)) or 1.0
        return cls(
            theta=float(theta),
            dim=int(head_dim * partial),
            rope_type=rope_type,
            max_position_embeddings=int(getattr(cfg, "max_position_embeddings", 2048)),
            params=params,
        )


def _base_inv_freq(theta: float, dim: int) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _yarn(spec: RopeSpec) -> tuple[torch.Tensor, float]:
    p = spec.params
    dim, base = spec.dim, spec.theta
    original = p["original_max_position_embeddings"]
    factor = p.get("factor") or spec.max_position_embeddings / original

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = p.get("attention_factor")
    if attention_factor is None:
        if p.get("mscale") and p.get("mscale_all_dim"):
            attention_factor = mscale(factor, p["mscale"]) / mscale(factor, p["mscale_all_dim"])
        else:
            attention_factor = mscale(factor)
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a division by zero in the ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp  # share of each frequency kept unscaled
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


def _llama3(spec: RopeSpec) -> torch.Tensor:
    p = spec.params
    inv_freq = _base_inv_freq(spec.theta, spec.dim)
    factor, low_f, high_f = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_len = p["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low_f, old_len / high_f
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low_f) / (high_f - low_f)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def inverse_frequencies(spec: RopeSpec, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [dim/2] and the cos/sin scale for sequences up to `seq_len` positions."""
    t = spec.rope_type
    if t == "default":
        return _base_inv_freq(spec.theta, spec.dim), 1.0
    if t == "linear":
        return _base_inv_freq(spec.theta, spec.dim) / spec.params["factor"], 1.0
    if t == "llama3":
        return _llama3(spec), 1.0
    if t == "yarn":
        return _yarn(spec)
    if t == "dynamic":
        # NTK-aware: the base grows only once positions exceed the trained length.
        max_pos = spec.max_position_embeddings
        seq_len = max(seq_len or max_pos, max_pos)
        factor, dim = spec.params["factor"], spec.dim
        base = spec.theta * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
        return _base_inv_freq(base, dim), 1.0
    raise ModelLoadError(f"RoPE type {t!r} is not supported")


class RotaryEmbedding(torch.nn.Module):
    """cos/sin tables for explicit integer positions."""

    def __init__(self, spec: RopeSpec) -> None:
        super().__init__()
        self.spec = spec
        # A plain attribute, not a buffer: model.to(bfloat16) must not round the frequencies.
        self.inv_freq, self.attention_scaling = inverse_frequencies(spec)
        # One copy per device, never replaced: a captured CUDA graph keeps reading the copy it saw.
        self._inv_freq_on: dict[torch.device, torch.Tensor] = {self.inv_freq.device: self.inv_freq}

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, T] -> (cos, sin) [B, T, dim] in `dtype`."""
        inv_freq = self._inv_freq_on.get(positions.device)
        if inv_freq is None:
            inv_freq = self._inv_freq_on[positions.device] = self.inv_freq.to(positions.device)
        if self.spec.rope_type == "dynamic":
            seq_len = int(positions.max().item()) + 1 if positions.numel() else 1
            inv_freq = inverse_frequencies(self.spec, seq_len)[0].to(positions.device)
        freqs = positions[..., None].float() * inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, T, D]; cos/sin [B, T, rot_dim]. Partial rotary leaves the tail dims unrotated."""
    cos, sin = cos[:, None], sin[:, None]
    rot = cos.shape[-1]
    if rot == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    return torch.cat((x_rot * cos + _rotate_half(x_rot) * sin, x_pass), dim=-1)
