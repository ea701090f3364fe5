"""What stage-1 encoding hands to a memory bank: pooled tensors plus the document records."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class EncodedDocuments:
    """Pooled memory of a batch of document parts, ready for `MemoryBank.add`.

    Parts are in order; part j owns chunks [offsets[j], offsets[j] + n_chunks[j]) of the tensors.
    Tensors are [L, C, kv_heads, head_dim] with L = len(layers) routing layers, C = sum(n_chunks).
    """

    ids: list[str]  # part ids (equal to parent_ids for documents that were not split)
    parent_ids: list[str]
    texts: list[str]  # text of each part
    metadatas: list[dict[str, Any]]
    n_tokens: list[int]
    n_chunks: list[int]
    layers: list[int]  # routing layer indices the tensors belong to
    k_bar: torch.Tensor  # pooled keys after k_norm and RoPE
    v_bar: torch.Tensor  # pooled values
    kr_bar: torch.Tensor  # pooled routing keys (W_KR applied to the pooled normed hidden state)
    part_index: list[int] = field(default_factory=list)  # index of each part within its parent
    encode_seconds: float = 0.0  # time the backbone forwards and pooling took (bank build statistics)
    compute_dtype: str = ""  # the backbone dtype that encoded them ('float32', 'bfloat16', ...)

    def __post_init__(self) -> None:
        n = len(self.ids)
        if not self.part_index:
            self.part_index = [0] * n
        lengths = {len(self.parent_ids), len(self.texts), len(self.metadatas), len(self.n_tokens),
                   len(self.n_chunks), len(self.part_index)}
        if lengths != {n}:
            raise ValueError("EncodedDocuments fields have different lengths")
        c = sum(self.n_chunks)
        for name in ("k_bar", "v_bar", "kr_bar"):
            t = getattr(self, name)
            if t.dim() != 4 or t.shape[0] != len(self.layers) or t.shape[1] != c:
                raise ValueError(f"{name} has shape {tuple(t.shape)}, expected [{len(self.layers)}, {c}, H, D]")


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or inf in `t`: its min and max are finite (aminmax propagates NaN). On a CPU ~50x faster than
    isfinite(t).all() for bfloat16 (measured: 1.2 against 58 ms on 19M values), one host sync on a GPU."""
    if not t.numel():
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))
