"""Routing scores for a batch of questions against a whole memory bank (spec §2.3, paper Eq. 2).

S(t, c) = mean_h <q[t, h], kr[c, h // G]>  (G = H / Hkv query heads per kv head)
S(c)    = max (or mean) over a row's routing tokens t;  s(d) = max (or mean) over the doc's chunks.

The reference is msa_core.router (score_chunks + reduce_to_docs + select_top_k); the Triton path
(routing_triton.py) computes the same chunk scores while reading the bank K̄_R exactly once per call,
for every row of the batch, and never builds the tokens x heads x chunks tensor:
mean_h <q_h, k_g(h)> = (1/H) sum_g <sum_{h in g} q_h, k_g>, so a small kernel first sums the
normalised query heads per kv group (O(B*T*H*D)) and the scoring kernel does one dot product per
(token, kv head, chunk). Document scores are a segment reduction of the [B, C] chunk scores (torch
scatter_reduce, as in the reference). A Triton call syncs with the host once, to validate.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..config import ChunkReduce, Normalization, QueryReduce
from ..errors import InvalidInputError
from ..router import check_score_shapes, reduce_to_docs, score_chunks, select_top_k
from ._common import Backend, resolve_backend

NORMALIZATIONS = ("cosine", "scaled_dot", "scaled_cosine")
QUERY_REDUCES = ("max", "mean", "last")
CHUNK_REDUCES = ("max", "mean")


# --------------------------------------------------------------------------------------------
# Reference (the existing PyTorch path)
# --------------------------------------------------------------------------------------------


def chunk_scores_reference(
    q: Tensor, token_mask: Tensor, kr_bar: Tensor, *,
    normalization: Normalization = "cosine", query_reduce: QueryReduce = "max",
) -> Tensor:
    """Chunk scores [B, C] fp32 by router.score_chunks with head_reduce='mean'."""
    return score_chunks(q, token_mask, kr_bar, head_reduce="mean", query_reduce=query_reduce,
                        normalization=normalization)


def routing_scores_reference(
    q: Tensor, token_mask: Tensor, kr_bar: Tensor, chunk_doc: Tensor, num_docs: int, *,
    normalization: Normalization = "cosine", query_reduce: QueryReduce = "max", chunk_reduce: ChunkReduce = "max",
) -> Tensor:
    """Document scores [B, N] fp32: router.score_chunks then router.reduce_to_docs."""
    chunks = chunk_scores_reference(q, token_mask, kr_bar, normalization=normalization, query_reduce=query_reduce)
    return reduce_to_docs(chunks, chunk_doc, num_docs, chunk_reduce=chunk_reduce)


# --------------------------------------------------------------------------------------------
# Dispatchers
# --------------------------------------------------------------------------------------------


def chunk_scores(
    q: Tensor, token_mask: Tensor, kr_bar: Tensor, *,
    normalization: Normalization = "cosine", query_reduce: QueryReduce = "max", backend: Backend = "auto",
    block_c: int | None = None, block_m: int | None = None, validate: bool = True, exact: bool = True,
) -> Tensor:
    """Chunk scores [B, C] fp32 for routing queries q [B, T, H, D] against kr_bar [C, Hkv, D].

    token_mask [B, T] bool marks routing tokens (padding on either side); a row without any raises.
    backend: 'auto' (Triton on CUDA when it imports, else the reference), 'triton' or 'reference'.
    block_c / block_m override the kernel's tile sizes (tests and tuning). validate=False skips the
    host sync that rejects rows without routing tokens (such rows then score -inf; NaN for 'mean'),
    e.g. inside a CUDA graph. exact=False: the kernel multiplies the fp32 group-summed queries rounded
    once to the bank's dtype (half the tensor-core work; scores off by ~1e-3 relative, still finer
    than the reference release's bf16 scoring) instead of reproducing the fp32 reference.
    """
    _check_choices(normalization, query_reduce, "max")
    _check_inputs(q, token_mask, kr_bar)
    if resolve_backend(backend, q, kr_bar) == "reference":
        return chunk_scores_reference(q, token_mask, kr_bar, normalization=normalization, query_reduce=query_reduce)
    if validate:
        _check_rows_and_docs(token_mask, None, 0)
    return _chunk_scores_triton(q, token_mask, kr_bar, normalization, query_reduce, block_c, block_m, exact)


def routing_scores(
    q: Tensor, token_mask: Tensor, kr_bar: Tensor, chunk_doc: Tensor, num_docs: int, *,
    normalization: Normalization = "cosine", query_reduce: QueryReduce = "max", chunk_reduce: ChunkReduce = "max",
    backend: Backend = "auto", block_c: int | None = None, block_m: int | None = None, validate: bool = True,
    exact: bool = True,
) -> Tensor:
    """Document scores [B, N] fp32 (same contract as routing_scores_reference).

    chunk_doc [C] holds each chunk's document index in [0, num_docs); a document without chunks
    scores -inf. validate=False skips the one host sync (empty rows, chunk_doc range): for callers
    whose inputs come from the bank, or CUDA graphs. exact: see chunk_scores.
    """
    _check_choices(normalization, query_reduce, chunk_reduce)
    if resolve_backend(backend, q, kr_bar) == "reference":
        return routing_scores_reference(q, token_mask, kr_bar, chunk_doc, num_docs, normalization=normalization,
                                        query_reduce=query_reduce, chunk_reduce=chunk_reduce)
    _check_inputs(q, token_mask, kr_bar)
    _check_doc_map(chunk_doc, num_docs, kr_bar.shape[0])
    chunk_doc = chunk_doc.to(q.device)
    if validate:
        _check_rows_and_docs(token_mask, chunk_doc, num_docs)  # the one host sync of the call
    chunks = _chunk_scores_triton(q, token_mask, kr_bar, normalization, query_reduce, block_c, block_m, exact)
    return docs_from_chunks(chunks, chunk_doc, num_docs, chunk_reduce)


def _chunk_scores_triton(q: Tensor, token_mask: Tensor, kr_bar: Tensor, normalization: str, query_reduce: str,
                         block_c: int | None, block_m: int | None, exact: bool) -> Tensor:
    from .routing_triton import chunk_scores_triton, group_queries  # first use only: see _common.interpreting

    token_mask = token_mask.to(q.device)
    if query_reduce == "last":  # keep only each row's highest-index routing token
        positions = torch.arange(token_mask.shape[1], device=q.device)
        token_mask = positions == torch.where(token_mask, positions, -1).amax(dim=1, keepdim=True)
    grouped = group_queries(q, token_mask, kr_bar.dtype, kr_bar.shape[1], normalization, exact)
    out = chunk_scores_triton(grouped, kr_bar, normalize_k=normalization != "scaled_dot",
                              reduce_sum=query_reduce == "mean", exact=exact, block_c=block_c, block_m=block_m)
    if query_reduce == "mean":
        out /= token_mask.sum(dim=1, keepdim=True)
    return out


def routing_top_k(
    q: Tensor, token_mask: Tensor, kr_bar: Tensor, chunk_doc: Tensor, num_docs: int, k: int, *,
    normalization: Normalization = "cosine", query_reduce: QueryReduce = "max", chunk_reduce: ChunkReduce = "max",
    allowed: Tensor | None = None, backend: Backend = "auto", exact: bool = True,
) -> tuple[Tensor, Tensor]:
    """(values [B, k_eff], doc indices [B, k_eff]) of each row's best documents (router.select_top_k:
    score descending, ties by lower index, `allowed` masks documents out)."""
    scores = routing_scores(q, token_mask, kr_bar, chunk_doc, num_docs, normalization=normalization,
                            query_reduce=query_reduce, chunk_reduce=chunk_reduce, backend=backend, exact=exact)
    return select_top_k(scores, k, allowed)


def docs_from_chunks(chunk_scores: Tensor, chunk_doc: Tensor, num_docs: int, chunk_reduce: ChunkReduce) -> Tensor:
    """[B, C] -> [B, N] like router.reduce_to_docs, without its host syncs (inputs already checked)."""
    b = chunk_scores.shape[0]
    index = chunk_doc.to(torch.long).expand(b, -1)
    if chunk_reduce == "max":
        init = torch.full((b, num_docs), float("-inf"), device=chunk_scores.device)
        return init.scatter_reduce(1, index, chunk_scores, reduce="amax", include_self=True)
    means = torch.zeros(b, num_docs, device=chunk_scores.device).scatter_reduce(
        1, index, chunk_scores, reduce="mean", include_self=False)
    has_chunk = torch.bincount(chunk_doc.long(), minlength=num_docs) > 0
    return means.masked_fill(~has_chunk, float("-inf"))


# --------------------------------------------------------------------------------------------
# Checks (messages as in router.py; one host sync per call)
# --------------------------------------------------------------------------------------------


def _check_choices(normalization: str, query_reduce: str, chunk_reduce: str) -> None:
    for name, value, allowed in (("normalization", normalization, NORMALIZATIONS),
                                 ("query_reduce", query_reduce, QUERY_REDUCES),
                                 ("chunk_reduce", chunk_reduce, CHUNK_REDUCES)):
        if value not in allowed:
            raise InvalidInputError(f"{name} must be one of {allowed}, got {value!r}")


def _check_inputs(q: Tensor, token_mask: Tensor, kr_bar: Tensor) -> None:
    check_score_shapes(q, token_mask, kr_bar)
    if not q.is_floating_point() or kr_bar.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise InvalidInputError(f"q must be floating point and kr_bar float32/float16/bfloat16, "
                                f"got {q.dtype} and {kr_bar.dtype}")
    if q.device != kr_bar.device:
        raise InvalidInputError(f"q is on {q.device} but kr_bar on {kr_bar.device}; the kernel reads both "
                                "on one device (move the bank's tensors with it)")


def _check_doc_map(chunk_doc: Tensor, num_docs: int, num_chunks: int) -> None:
    if chunk_doc.dim() != 1 or chunk_doc.shape[0] != num_chunks or chunk_doc.is_floating_point():
        raise InvalidInputError(f"chunk_doc must be an integer tensor [C={num_chunks}], "
                                f"got {chunk_doc.dtype} {tuple(chunk_doc.shape)}")
    if num_docs < 0:
        raise InvalidInputError(f"num_docs must be >= 0, got {num_docs}")


def _check_rows_and_docs(token_mask: Tensor, chunk_doc: Tensor | None, num_docs: int) -> None:
    """Rows without routing tokens and out-of-range document indices, in one host sync."""
    flags = [(~token_mask.any(dim=1)).any()]
    if chunk_doc is not None and chunk_doc.numel():
        flags += [chunk_doc.min() < 0, chunk_doc.max() >= num_docs]
    if not any(torch.stack(flags).tolist()):
        return
    empty = (~token_mask.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise InvalidInputError(f"rows {empty} have no valid routing token (token_mask is all False)")
    lo, hi = int(chunk_doc.min()), int(chunk_doc.max())
    raise InvalidInputError(f"chunk_doc values must lie in [0, {num_docs}), got [{lo}, {hi}]")
