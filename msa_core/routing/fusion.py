"""Fusion retrieval: one ranking from two retrievers' scores over the same rows (latent routing + BM25).

Both sides score every row; rows a filter rejects are left out before anything is normalised, so a
filter changes neither side's scale nor the ranking among the rows it keeps. Methods:

- "minmax" (the default): each side mapped to [0, 1] over the allowed rows, then the convex combination
  alpha * latent + (1 - alpha) * lexical (a side whose allowed scores are all equal contributes 0);
- "zscore": the same with each side standardised (mean 0, standard deviation 1) instead;
- "rrf": reciprocal rank fusion, alpha / (60 + latent rank) + (1 - alpha) / (60 + lexical rank).

alpha follows LlamaIndex's and Weaviate's convention: 1 is the dense (here: latent) side alone, 0 the
lexical side alone. At alpha 1 (or 0) the fused ranking is that side's ranking. The harness fuses MiniLM
with BM25 through the same `fuse`, so `minilm+bm25` is the reference a user could build without msa.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..config import RoutingConfig
from ..errors import InvalidInputError

FUSIONS = ("bm25",)
METHODS = ("minmax", "zscore", "rrf")
RRF_K = 60  # the constant of Cormack et al. (2009), as in Elasticsearch, Weaviate and LangChain


def check_fusion(fusion: Any, alpha: Any, routing: RoutingConfig) -> float | None:
    """The alpha to fuse with (the config's `fusion_alpha` when None), or None when fusion is off."""
    if fusion is None:
        if alpha is not None:
            raise InvalidInputError(f"alpha={alpha!r} needs fusion='bm25' (alpha weighs the latent side of a fusion)")
        return None
    if fusion not in FUSIONS:
        raise InvalidInputError(f"fusion must be None or one of {FUSIONS}, got {fusion!r}")
    alpha = routing.fusion_alpha if alpha is None else alpha
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise InvalidInputError(f"alpha must be a number in [0, 1] (1: latent only, 0: BM25 only), got {alpha!r}")
    return float(alpha)


def normalise(scores: Tensor, allowed: Tensor, method: str) -> Tensor:
    """[B, N] scores mapped per row over the allowed columns ("minmax" or "zscore"); other columns 0."""
    s = scores.float().masked_fill(~allowed, 0.0)
    n = int(allowed.sum())
    if n == 0:
        return s
    if method == "minmax":
        lo = scores.float().masked_fill(~allowed, math.inf).min(dim=1, keepdim=True).values
        hi = scores.float().masked_fill(~allowed, -math.inf).max(dim=1, keepdim=True).values
        span = hi - lo
        out = (s - lo) / torch.where(span > 0, span, torch.ones_like(span))
    elif method == "zscore":
        mean = s.sum(dim=1, keepdim=True) / n
        var = ((s - mean).masked_fill(~allowed, 0.0) ** 2).sum(dim=1, keepdim=True) / n
        std = var.sqrt()
        out = (s - mean) / torch.where(std > 0, std, torch.ones_like(std))
    else:
        raise InvalidInputError(f"normalisation must be 'minmax' or 'zscore', got {method!r}")
    return out.masked_fill(~allowed, 0.0)


def reciprocal_ranks(scores: Tensor, allowed: Tensor) -> Tensor:
    """[B, N]: 1 / (RRF_K + rank) of each allowed column by descending score (rank 1 = best, ties by column)."""
    s = scores.float().masked_fill(~allowed, -math.inf)
    order = torch.sort(s, dim=1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(1, s.shape[1] + 1).expand_as(order).contiguous())
    return (1.0 / (RRF_K + ranks.float())).masked_fill(~allowed, 0.0)


def fuse(latent: Tensor, lexical: Tensor, allowed: Tensor, alpha: float, method: str = "minmax") -> Tensor:
    """[B, N] fused scores of two [B, N] score matrices over the same columns; columns not allowed: -inf."""
    if latent.shape != lexical.shape or latent.dim() != 2 or allowed.shape != latent.shape[1:]:
        raise InvalidInputError(f"fuse takes two [B, N] score matrices and an [N] mask, got {tuple(latent.shape)}, "
                                f"{tuple(lexical.shape)} and {tuple(allowed.shape)}")
    if method not in METHODS:
        raise InvalidInputError(f"fusion method must be one of {METHODS}, got {method!r}")
    allowed = allowed.to(device=latent.device, dtype=torch.bool)
    lexical = lexical.to(latent.device)
    if method == "rrf":
        a, b = reciprocal_ranks(latent, allowed), reciprocal_ranks(lexical, allowed)
    else:
        a, b = normalise(latent, allowed, method), normalise(lexical, allowed, method)
    return (alpha * a + (1.0 - alpha) * b).masked_fill(~allowed, -math.inf)


def relevance_of(fused: Tensor, method: str) -> Tensor:
    """Fused scores mapped to [0, 1]: minmax as they are, zscore through a sigmoid, rrf over the best possible."""
    if method == "minmax":
        return fused.clamp(0.0, 1.0)
    if method == "zscore":
        return torch.sigmoid(fused)
    return (fused * (RRF_K + 1)).clamp(0.0, 1.0)


@dataclasses.dataclass
class Fused:
    """Fused scores of a batch of questions, with both sides kept for the hits."""

    latent: Tensor  # [B, N] raw routing scores
    lexical: Tensor  # [B, N] raw BM25 scores
    total: Tensor  # [B, N] fused (-inf where not allowed)
    method: str

    @classmethod
    def of(cls, latent: Tensor, lexical: Tensor, allowed: Tensor, alpha: float, method: str) -> Fused:
        lexical = lexical.to(latent.device)
        return cls(latent, lexical, fuse(latent, lexical, allowed, alpha, method), method)

    def hits(self, b: int, ranked: Sequence[tuple[int, Any]]) -> list[Any]:
        """The hits of question `b` (from (row, hit) pairs ranked by `total[b]`) with `latent_score`,
        `lexical_score` and a `relevance_score` of the fused score filled in."""
        rel = relevance_of(self.total[b], self.method)
        return [dataclasses.replace(hit, latent_score=float(self.latent[b, row]),
                                    lexical_score=float(self.lexical[b, row]), relevance_score=float(rel[row]))
                for row, hit in ranked]
