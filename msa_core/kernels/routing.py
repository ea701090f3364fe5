"""Routing scores for a batch of questions against a whole memory bank (spec §2.3, paper Eq. 2).

S(t, c) = mean_h <q[t, h], kr[c, h // G]>  (G = H / Hkv query heads per kv head)
S(c)    = max (or mean) over a row's routing tokens t;  s(d) = max (or mean) over the doc's chunks.

The reference is msa_core.routing.scores (score_chunks + reduce_to_docs + select_top_k); the Triton path
(routing_triton.py) computes the same chunk scores while reading the bank K̄_R exactly once per call,
for every row of the batch, and never builds the tokens x heads x chunks tensor. One question or a few
take a persistent, software-pipelined streaming kernel that can also score several routing layers in
one launch (`layer_routing_scores`, what retrieve() uses); bigger batches take a tiled kernel.

mean_h <q_h, k_g(h)> = (1/H) sum_g <sum_{h in g} q_h, k_g>, so a small kernel first sums the
normalised query heads per kv group (O(B*T*H*D)) and the scoring kernel does one dot product per
(token, kv head, chunk). Document scores are a segment reduction of the [B, C] chunk scores (torch
scatter_reduce, as in the reference). A Triton call syncs with the host once, to validate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import ChunkReduce, Normalization, QueryReduce
from ..errors import InvalidInputError
from ..routing.scores import check_score_shapes, dequantized_keys, reduce_to_docs, score_chunks, select_top_k
from ._common import Backend, resolve_backend

NORMALIZATIONS = ("cosine", "scaled_dot", "scaled_cosine")
QUERY_REDUCES = ("max", "mean", "last")
CHUNK_REDUCES = ("max", "mean")


# --------------------------------------------------------------------------------------------
# Reference (the existing PyTorch path)
# --------------------------------------------------------------------------------------------


def chunk_scores_reference(
    q: Tensor, token_mask: Tensor, kr_bar: Tensor, *,
    normalization: Normalization = "cosine", query_reduce: QueryReduce = "max", key_scales: Tensor | None = None,
) -> Tensor:
    """Chunk scores [B, C] fp32 by router.score_chunks with head_reduce='mean'. int8 kr_bar (`quantized_keys`,
    with key_scales): scored as their float32 dequantised, prepared keys."""
    quantized = kr_bar.dtype == torch.int8
    keys = dequantized_keys(kr_bar, key_scales) if quantized else kr_bar
    return score_chunks(q, token_mask, keys, head_reduce="mean", query_reduce=query_reduce,
                        normalization=normalization, keys_prepared=quantized)


def routing_scores_reference(
    q: Tensor, token_mask: Tensor, kr_bar: Tensor, chunk_doc: Tensor, num_docs: int, *,
    normalization: Normalization = "cosine", query_reduce: QueryReduce = "max", chunk_reduce: ChunkReduce = "max",
    key_scales: Tensor | None = None,
) -> Tensor:
    """Document scores [B, N] fp32: router.score_chunks then router.reduce_to_docs."""
    chunks = chunk_scores_reference(q, token_mask, kr_bar, normalization=normalization, query_reduce=query_reduce,
                                    key_scales=key_scales)
    return reduce_to_docs(chunks, chunk_doc, num_docs, chunk_reduce=chunk_reduce)


# --------------------------------------------------------------------------------------------
# Dispatchers
# --------------------------------------------------------------------------------------------


def chunk_scores(
    q: Tensor, token_mask: Tensor, kr_bar: Tensor, *,
    normalization: Normalization = "cosine", query_reduce: QueryReduce = "max", backend: Backend = "auto",
    block_c: int | None = None, block_m: int | None = None, validate: bool = True, exact: bool = True,
    key_inv_norms: Tensor | None = None, stream: bool = True, key_scales: Tensor | None = None,
) -> Tensor:
    """Chunk scores [B, C] fp32 for routing queries q [B, T, H, D] against kr_bar [C, Hkv, D].

    token_mask [B, T] bool marks routing tokens (padding on either side); a row without any raises.
    backend: 'auto' (Triton on CUDA when it imports, else the reference), 'triton' or 'reference'.
    block_c / block_m override the kernel's tile sizes (tests and tuning). validate=False skips the
    host sync that rejects rows without routing tokens (such rows then score -inf; NaN for 'mean'),
    e.g. inside a CUDA graph. exact=False: the kernel multiplies the fp32 group-summed queries rounded
    once to the bank's dtype (half the tensor-core work; scores off by ~1e-3 relative, still finer
    than the reference release's bf16 scoring) instead of reproducing the fp32 reference.
    key_inv_norms [C, Hkv] fp32 (`inverse_key_norms(kr_bar)`, cached by the caller): cosine scoring
    reads them instead of recomputing the key norms (the kernel's loads then pipeline). stream=False
    forces the tiled kernel even for batches small enough for the streaming one (tests, tuning).
    int8 kr_bar: keys from `routing.scores.quantized_keys` (already normalised for cosine), with their scales
    key_scales [C, Hkv] fp32: half the bytes of bfloat16 keys; the queries meet them in bfloat16.
    """
    _check_choices(normalization, query_reduce, "max")
    _check_inputs(q, token_mask, kr_bar, key_scales)
    _check_inv_norms(key_inv_norms, kr_bar)
    if resolve_backend(backend, q, kr_bar) == "reference":
        return chunk_scores_reference(q, token_mask, kr_bar, normalization=normalization, query_reduce=query_reduce,
                                      key_scales=key_scales)
    if validate:
        _check_rows_and_docs(token_mask, None, 0)
    return _chunk_scores_triton(q, token_mask, kr_bar, normalization, query_reduce, block_c, block_m, exact,
                                key_inv_norms, stream, key_scales)


def routing_scores(
    q: Tensor, token_mask: Tensor, kr_bar: Tensor, chunk_doc: Tensor, num_docs: int, *,
    normalization: Normalization = "cosine", query_reduce: QueryReduce = "max", chunk_reduce: ChunkReduce = "max",
    backend: Backend = "auto", block_c: int | None = None, block_m: int | None = None, validate: bool = True,
    exact: bool = True, key_inv_norms: Tensor | None = None, stream: bool = True, key_scales: Tensor | None = None,
) -> Tensor:
    """Document scores [B, N] fp32 (same contract as routing_scores_reference).

    chunk_doc [C] holds each chunk's document index in [0, num_docs); a document without chunks
    scores -inf. validate=False skips the one host sync (empty rows, chunk_doc range): for callers
    whose inputs come from the bank, or CUDA graphs. exact, key_inv_norms, stream, key_scales: see chunk_scores.
    """
    _check_choices(normalization, query_reduce, chunk_reduce)
    _check_inputs(q, token_mask, kr_bar, key_scales)
    if resolve_backend(backend, q, kr_bar) == "reference":
        return routing_scores_reference(q, token_mask, kr_bar, chunk_doc, num_docs, normalization=normalization,
                                        query_reduce=query_reduce, chunk_reduce=chunk_reduce, key_scales=key_scales)
    _check_inv_norms(key_inv_norms, kr_bar)
    _check_doc_map(chunk_doc, num_docs, kr_bar.shape[0])
    chunk_doc = chunk_doc.to(q.device)
    if validate:
        _check_rows_and_docs(token_mask, chunk_doc, num_docs)  # the one host sync of the call
    chunks = _chunk_scores_triton(q, token_mask, kr_bar, normalization, query_reduce, block_c, block_m, exact,
                                  key_inv_norms, stream, key_scales)
    return docs_from_chunks(chunks, chunk_doc, num_docs, chunk_reduce)


def _chunk_scores_triton(q: Tensor, token_mask: Tensor, kr_bar: Tensor, normalization: str, query_reduce: str,
                         block_c: int | None, block_m: int | None, exact: bool, key_inv_norms: Tensor | None,
                         stream: bool, key_scales: Tensor | None = None) -> Tensor:
    """[B, C] for q [B, T, H, D] and kr_bar [C, Hkv, D], or [L, B, C] for q [L, B, T, H, D] and kr_bar
    [L, C, Hkv, D] (several layers: streaming kernel only, callers check `stream_shape` first)."""
    # first use only: see _common.interpreting
    from .routing_triton import INT8_QUERY_DOTS, chunk_scores_triton, group_queries, stream_scores_triton, stream_shape

    quantized = kr_bar.dtype == torch.int8  # prepared keys: never normalised again, scaled per column
    normalize_k = normalization != "scaled_dot" and not quantized
    col_scale = key_scales if quantized else key_inv_norms

    token_mask = _last_token_only(token_mask.to(q.device)) if query_reduce == "last" else token_mask.to(q.device)
    shape = stream_shape(*token_mask.shape) if stream and block_m is None else None
    if shape is not None:  # one question or a few: the persistent, pipelined kernel
        pad = shape[1] - token_mask.shape[1]
        layers = q.shape[0] if q.dim() == 5 else 1
        q_rows = F.pad(q, (0, 0, 0, 0, 0, pad)).reshape(-1, shape[1], *q.shape[-2:])  # [L*B, TP, H, D]
        mask = F.pad(token_mask, (0, pad)).repeat(layers, 1)
        grouped = group_queries(q_rows, mask, kr_bar.dtype, kr_bar.shape[-2], normalization, exact, INT8_QUERY_DOTS)
        out = stream_scores_triton(grouped, kr_bar, col_scale, normalize_k=normalize_k,
                                   reduce_sum=query_reduce == "mean", exact=exact, block_c=block_c)
    else:
        grouped = group_queries(q, token_mask, kr_bar.dtype, kr_bar.shape[1], normalization, exact, INT8_QUERY_DOTS)
        out = chunk_scores_triton(grouped, kr_bar, normalize_k=normalize_k, reduce_sum=query_reduce == "mean",
                                  exact=exact, block_c=block_c, block_m=block_m, col_scale=col_scale)
    if query_reduce == "mean":
        out /= token_mask.sum(dim=1, keepdim=True)
    return out


def _last_token_only(token_mask: Tensor) -> Tensor:
    """Keep only each row's highest-index routing token (query_reduce='last')."""
    positions = torch.arange(token_mask.shape[1], device=token_mask.device)
    return positions == torch.where(token_mask, positions, -1).amax(dim=1, keepdim=True)


def layer_routing_scores(
    q: Tensor, token_mask: Tensor, kr_bar: Tensor, chunk_doc: Tensor, num_docs: int, *,
    normalization: Normalization = "cosine", query_reduce: QueryReduce = "max", chunk_reduce: ChunkReduce = "max",
    backend: Backend = "auto", validate: bool = True, exact: bool = True, key_inv_norms: Tensor | None = None,
    key_scales: Tensor | None = None,
) -> Tensor:
    """Document scores [L, B, N] of several routing layers: q [L, B, T, H, D] holds layer l's routing
    queries, kr_bar [L, C, Hkv, D] its pooled keys (key_inv_norms, or int8 keys' key_scales, [L, C, Hkv]);
    row l equals routing_scores(q[l], token_mask, kr_bar[l], ...). On the Triton path one launch streams every layer's
    K̄_R, so a bank is read as one long stream instead of L short ones (when the batch fits the
    streaming kernel; otherwise layer by layer)."""
    if q.dim() != 5 or kr_bar.dim() != 4 or q.shape[0] != kr_bar.shape[0]:
        raise InvalidInputError(f"q must be [L, B, T, H, D] and kr_bar [L, C, Hkv, D] with the same L, "
                                f"got {tuple(q.shape)} and {tuple(kr_bar.shape)}")
    kw = {"normalization": normalization, "query_reduce": query_reduce, "chunk_reduce": chunk_reduce}
    one_launch = resolve_backend(backend, q, kr_bar) == "triton"
    if one_launch:
        from .routing_triton import stream_shape

        one_launch = stream_shape(*token_mask.shape) is not None
    if not one_launch:
        return torch.stack([
            routing_scores(q[i], token_mask, kr_bar[i], chunk_doc, num_docs, backend=backend, validate=validate,
                           exact=exact, key_inv_norms=None if key_inv_norms is None else key_inv_norms[i],
                           key_scales=None if key_scales is None else key_scales[i], **kw)
            for i in range(q.shape[0])])
    _check_choices(normalization, query_reduce, chunk_reduce)
    _check_inputs(q[0], token_mask, kr_bar[0], None if key_scales is None else key_scales[0])
    _check_inv_norms(key_inv_norms, kr_bar)
    _check_doc_map(chunk_doc, num_docs, kr_bar.shape[1])
    chunk_doc = chunk_doc.to(q.device)
    if validate:
        _check_rows_and_docs(token_mask.to(q.device), chunk_doc, num_docs)
    chunks = _chunk_scores_triton(q, token_mask, kr_bar, normalization, query_reduce, None, None, exact,
                                  key_inv_norms, True, key_scales)  # [L, B, C]
    layers, b = chunks.shape[:2]
    return docs_from_chunks(chunks.flatten(0, 1), chunk_doc, num_docs, chunk_reduce).view(layers, b, num_docs)


def routing_top_k(
    q: Tensor, token_mask: Tensor, kr_bar: Tensor, chunk_doc: Tensor, num_docs: int, k: int, *,
    normalization: Normalization = "cosine", query_reduce: QueryReduce = "max", chunk_reduce: ChunkReduce = "max",
    allowed: Tensor | None = None, backend: Backend = "auto", exact: bool = True,
    key_inv_norms: Tensor | None = None, key_scales: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(values [B, k_eff], doc indices [B, k_eff]) of each row's best documents (router.select_top_k:
    score descending, ties by lower index, `allowed` masks documents out)."""
    scores = routing_scores(q, token_mask, kr_bar, chunk_doc, num_docs, normalization=normalization,
                            query_reduce=query_reduce, chunk_reduce=chunk_reduce, backend=backend, exact=exact,
                            key_inv_norms=key_inv_norms, key_scales=key_scales)
    return select_top_k(scores, k, allowed)


def inverse_key_norms(kr_bar: Tensor) -> Tensor:
    """[C, Hkv] fp32: 1 / max(||k||, eps) per chunk and kv head (F.normalize's formula), for cosine
    routing. Computing it reads the whole K̄_R once: callers cache it beside the bank. Norms are taken in
    float32 without a float32 copy of K̄_R (which would double a large bank's memory)."""
    return torch.linalg.vector_norm(kr_bar, dim=-1, dtype=torch.float32).clamp_min(1e-12).reciprocal()


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


def _check_inputs(q: Tensor, token_mask: Tensor, kr_bar: Tensor, key_scales: Tensor | None = None) -> None:
    check_score_shapes(q, token_mask, kr_bar)
    if not q.is_floating_point() or kr_bar.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.int8):
        raise InvalidInputError(f"q must be floating point and kr_bar float32/float16/bfloat16 (or int8 with "
                                f"key_scales), got {q.dtype} and {kr_bar.dtype}")
    if (kr_bar.dtype == torch.int8) != (key_scales is not None):
        raise InvalidInputError("int8 routing keys (routing.scores.quantized_keys) come with their key_scales, and "
                                f"only they do: got kr_bar {kr_bar.dtype} and key_scales "
                                f"{None if key_scales is None else tuple(key_scales.shape)}")
    if key_scales is not None and (key_scales.shape != kr_bar.shape[:-1] or key_scales.dtype != torch.float32
                                   or key_scales.device != kr_bar.device):
        raise InvalidInputError(f"key_scales must be float32 {tuple(kr_bar.shape[:-1])} on {kr_bar.device}, got "
                                f"{key_scales.dtype} {tuple(key_scales.shape)} on {key_scales.device}")
    if q.device != kr_bar.device:
        raise InvalidInputError(f"q is on {q.device} but kr_bar on {kr_bar.device}; the kernel reads both "
                                "on one device (move the bank's tensors with it)")


def _check_inv_norms(inv: Tensor | None, kr_bar: Tensor) -> None:
    if inv is None:
        return
    if inv.shape != kr_bar.shape[:-1] or inv.dtype != torch.float32 or inv.device != kr_bar.device:
        raise InvalidInputError(f"key_inv_norms must be float32 {tuple(kr_bar.shape[:-1])} on {kr_bar.device} "
                                f"(inverse_key_norms(kr_bar)), got {inv.dtype} {tuple(inv.shape)} on {inv.device}")


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
