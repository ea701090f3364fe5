"""Sparse memory attention for prefill and decode (spec §2.4-2.5).

Queries q [B, H, Tq, D] attend to
  1. memory: pooled K̄/V̄ chunks of the selected documents, addressed by index into the bank tensors
     k_bar / v_bar [C, Hkv, D] (chunk_idx [B, M], padded; chunk_valid [B, M] marks real slots), then
  2. local keys k / v [B, Hkv, Tk, D] (the prompt, or the decode cache plus the new tokens):
     query i sits at local slot Tk - Tq + i and sees valid local keys at slots <= its own (causal,
     aligned bottom-right; causal=False: every local valid key) and always its own slot, even when it
     is padding (so no row is fully masked; backbone.attention_mask does the same).
GQA (head h reads kv head h // (H / Hkv)), scale 1/sqrt(D). The bank's chunks are cast to q's dtype
before use, as backbone.Attention casts Memory.k / Memory.v.

This is the semantics of backbone.Attention.forward with Memory(k, v, valid) spliced in front of the
layer's keys; the reference gathers the chunks and calls scaled_dot_product_attention with an
explicit boolean mask, the Triton kernel (attention_triton.py) reads the chunks where they lie.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import InvalidInputError
from ._common import Backend, resolve_backend


def memory_attention_reference(
    q: Tensor, k_bar: Tensor, v_bar: Tensor, chunk_idx: Tensor, chunk_valid: Tensor, k: Tensor, v: Tensor,
    local_valid: Tensor | None = None, *, causal: bool = True,
) -> Tensor:
    """Gather the chunks, build the [B, 1, Tq, M + Tk] mask, run SDPA. Output [B, H, Tq, D] in q's dtype."""
    b, _, tq, _ = q.shape
    tk = k.shape[2]
    if local_valid is None:
        local_valid = torch.ones(b, tk, dtype=torch.bool, device=q.device)
    k_mem, v_mem = gather_chunks(k_bar, v_bar, chunk_idx, chunk_valid, q.dtype)
    keys, values = torch.cat([k_mem, k], dim=2), torch.cat([v_mem, v], dim=2)
    query_slot = tk - tq + torch.arange(tq, device=q.device)
    key_slot = torch.arange(tk, device=q.device)
    if causal:
        before = key_slot[None, :] <= query_slot[:, None]
    else:
        before = torch.ones(tq, tk, dtype=torch.bool, device=q.device)
    own = key_slot[None, :] == query_slot[:, None]
    local_mask = (before[None] & local_valid[:, None, :]) | own[None]  # [B, Tq, Tk]
    mem_mask = chunk_valid[:, None, :].expand(b, tq, chunk_valid.shape[1])
    mask = torch.cat([mem_mask, local_mask], dim=2)[:, None]
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)


def gather_chunks(k_bar: Tensor, v_bar: Tensor, chunk_idx: Tensor, chunk_valid: Tensor,
                  dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Copies of the addressed chunks, [B, Hkv, M, D] each (invalid slots read chunk 0 or zeros)."""
    b, m = chunk_idx.shape
    if k_bar.shape[0] == 0:
        shape = (b, k_bar.shape[1], m, k_bar.shape[2])
        zeros = torch.zeros(shape, dtype=dtype, device=chunk_idx.device)
        return zeros, zeros
    safe = torch.where(chunk_valid, chunk_idx.long(), 0)
    return k_bar[safe].transpose(1, 2).to(dtype), v_bar[safe].transpose(1, 2).to(dtype)


def memory_attention(
    q: Tensor, k_bar: Tensor, v_bar: Tensor, chunk_idx: Tensor, chunk_valid: Tensor, k: Tensor, v: Tensor,
    local_valid: Tensor | None = None, *, causal: bool = True, backend: Backend = "auto",
    check_indices: bool = True, num_splits: int | None = None,
    block_m: int | None = None, block_n: int | None = None,
) -> Tensor:
    """Attention output [B, H, Tq, D] (q's dtype); see the module docstring for the semantics.

    check_indices: verify that every valid chunk index lies in [0, C) (one host sync). Out-of-range
    indices would make the kernel read out of bounds; pass False in a decode loop whose indices
    came from the bank. num_splits: split the keys over that many programs per query tile
    (flash-decoding; default: chosen so short-query calls still fill the GPU). block_m / block_n
    override the kernel's tile sizes (tests and tuning).
    """
    _check_inputs(q, k_bar, v_bar, chunk_idx, chunk_valid, k, v, local_valid)
    if check_indices:
        _check_indices(chunk_idx, chunk_valid, k_bar.shape[0])
    if resolve_backend(backend, q, k_bar, v_bar, k, v) == "reference":
        return memory_attention_reference(q, k_bar, v_bar, chunk_idx, chunk_valid, k, v, local_valid, causal=causal)
    from .attention_triton import memory_attention_triton

    return memory_attention_triton(q, k_bar, v_bar, chunk_idx, chunk_valid, k, v, local_valid, causal=causal,
                                   num_splits=num_splits, block_m=block_m, block_n=block_n)


def _check_inputs(q: Tensor, k_bar: Tensor, v_bar: Tensor, chunk_idx: Tensor, chunk_valid: Tensor, k: Tensor,
                  v: Tensor, local_valid: Tensor | None) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise InvalidInputError(f"q must be [B, H, Tq, D] and k, v [B, Hkv, Tk, D], "
                                f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    b, h, tq, d = q.shape
    _, hkv, tk, dk = k.shape
    if k.shape[0] != b or dk != d:
        raise InvalidInputError(f"k {tuple(k.shape)} does not fit q {tuple(q.shape)} (batch and head_dim must match)")
    if hkv == 0 or h % hkv:
        raise InvalidInputError(f"query heads ({h}) must be a multiple of kv heads ({hkv})")
    if tq == 0 or tk < tq:
        raise InvalidInputError(f"need 1 <= Tq <= Tk (the queries are the last Tq local slots), got Tq={tq}, Tk={tk}")
    if k_bar.dim() != 3 or v_bar.shape != k_bar.shape or tuple(k_bar.shape[1:]) != (hkv, d):
        raise InvalidInputError(f"k_bar and v_bar must be [C, Hkv={hkv}, D={d}], "
                                f"got {tuple(k_bar.shape)} and {tuple(v_bar.shape)}")
    if chunk_idx.dim() != 2 or chunk_idx.shape[0] != b or chunk_idx.is_floating_point():
        raise InvalidInputError(f"chunk_idx must be an integer tensor [B={b}, M], got "
                                f"{chunk_idx.dtype} {tuple(chunk_idx.shape)}")
    if chunk_valid.shape != chunk_idx.shape or chunk_valid.dtype != torch.bool:
        raise InvalidInputError(f"chunk_valid must be a bool tensor of shape {tuple(chunk_idx.shape)}, "
                                f"got {chunk_valid.dtype} {tuple(chunk_valid.shape)}")
    if local_valid is not None and (local_valid.shape != (b, tk) or local_valid.dtype != torch.bool):
        raise InvalidInputError(f"local_valid must be a bool tensor of shape {(b, tk)}, "
                                f"got {local_valid.dtype} {tuple(local_valid.shape)}")
    if q.dtype != k.dtype or v.dtype != k.dtype:
        raise InvalidInputError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    devices = {t.device for t in (q, k, v, k_bar, v_bar, chunk_idx, chunk_valid)}
    if len(devices) != 1:
        raise InvalidInputError(f"all tensors must be on one device, got {sorted(map(str, devices))}; "
                                "move the bank's tensors (or the chunk indices) to the queries' device")


def _check_indices(chunk_idx: Tensor, chunk_valid: Tensor, num_chunks: int) -> None:
    bad = chunk_valid & ((chunk_idx < 0) | (chunk_idx >= num_chunks))
    if bool(bad.any()):
        row, slot = bad.nonzero()[0].tolist()
        raise InvalidInputError(f"chunk_idx[{row}, {slot}] = {int(chunk_idx[row, slot])} is a valid slot outside "
                                f"the bank's {num_chunks} chunks; mark padding slots False in chunk_valid")
