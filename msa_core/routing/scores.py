"""Routing scores of MSA (paper Eq. 2, spec §2.3), the plain-PyTorch reference.

A question's routing queries are scored against every pooled routing key (`score_chunks`), chunk
scores become document scores (`reduce_to_docs`), or, in ColBERT order, each question token keeps its
best chunk of each document and the tokens are averaged (`late_interaction_scores`); `document_scores`
picks the order the config names. Each row keeps its best documents (`select_top_k`); a retriever's single ranking aggregates the routing layers (`aggregate_layers`) and
`relevance` maps a score to [0, 1]. The Triton kernels (msa_core/kernels) are tested against these
functions, so they favour clarity and bounded memory over speed. Imports only config, errors, calibration.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import ChunkReduce, HeadReduce, LayerAggregate, Normalization, QueryReduce
from ..errors import InvalidInputError
from .calibration import calibrated

# F.normalize's default: small enough not to bias real vectors, and a zero vector stays zero.
NORM_EPS = 1e-12


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise InvalidInputError(f"{name} must be one of {allowed}, got {value!r}")


def _check_score_inputs(q: Tensor, token_mask: Tensor, kr_bar: Tensor, chunk_block: int) -> None:
    check_score_shapes(q, token_mask, kr_bar)
    if chunk_block <= 0:
        raise InvalidInputError(f"chunk_block must be > 0, got {chunk_block}")
    empty = (~token_mask.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise InvalidInputError(f"rows {empty} have no valid routing token (token_mask is all False)")


def check_score_shapes(q: Tensor, token_mask: Tensor, kr_bar: Tensor) -> None:
    """Shapes and head layout of routing-score inputs (shared with the Triton kernels' dispatcher)."""
    if q.dim() != 4:
        raise InvalidInputError(f"q must be [B, T, H, D], got shape {tuple(q.shape)}")
    if kr_bar.dim() != 3:
        raise InvalidInputError(f"kr_bar must be [C, Hkv, D], got shape {tuple(kr_bar.shape)}")
    b, t, h, d = q.shape
    if token_mask.shape != (b, t) or token_mask.dtype != torch.bool:
        raise InvalidInputError(
            f"token_mask must be a bool tensor of shape {(b, t)}, "
            f"got {token_mask.dtype} {tuple(token_mask.shape)}"
        )
    hkv = kr_bar.shape[1]
    if kr_bar.shape[2] != d:
        raise InvalidInputError(f"head_dim differs: q has {d}, kr_bar has {kr_bar.shape[2]}")
    if hkv == 0 or h % hkv:
        raise InvalidInputError(f"query heads ({h}) must be a multiple of kv heads ({hkv})")


def _last_valid_token(q: Tensor, token_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Keep only each row's highest-index valid token (works for left and right padding)."""
    t = token_mask.shape[1]
    positions = torch.arange(t, device=token_mask.device).expand_as(token_mask)
    last = torch.where(token_mask, positions, -1).amax(dim=1)  # [B]
    q_last = q[torch.arange(q.shape[0], device=q.device), last].unsqueeze(1)  # [B, 1, H, D]
    return q_last, torch.ones(q.shape[0], 1, dtype=torch.bool, device=q.device)


def _token_head_scores(q: Tensor, k: Tensor, head_reduce: str) -> Tensor:
    """S(t, c) for one block of chunks: q [B, T, Hkv, G, D], k [c, Hkv, D] -> [B, T, c]."""
    num_heads = q.shape[2] * q.shape[3]
    if head_reduce == "mean":
        # mean_h <q_h, k_g(h)> = (1/H) sum_g <sum_{h in g} q_h, k_g>: never builds [B, T, H, c]; the sum over
        # kv heads g is one dot product over the flattened (g, d) axis, so one matmul (an einsum that
        # permutes k first was 3-4x slower on a CPU)
        # (bfloat16 keys: the queries are rounded to bfloat16 too, products accumulate in float32)
        return torch.matmul(q.sum(dim=3).flatten(2).to(k.dtype), k.flatten(1).T).float() / num_heads

    def group_max(g: int) -> Tensor:  # one kv group at a time bounds memory to [B, T, G, c]
        return torch.einsum("btjd,cd->btjc", q[:, :, g].to(k.dtype), k[:, g]).amax(dim=2).float()

    best = group_max(0)
    for g in range(1, q.shape[2]):
        best = torch.maximum(best, group_max(g))
    return best


def _reduce_tokens(s: Tensor, token_mask: Tensor, query_reduce: str) -> Tensor:
    """[B, T, c] -> [B, c] over valid tokens ('last' was already reduced to one token)."""
    m = token_mask.unsqueeze(-1)
    if query_reduce == "mean":
        return s.masked_fill(~m, 0.0).sum(dim=1) / token_mask.sum(dim=1, keepdim=True).to(s.dtype)
    return s.masked_fill(~m, float("-inf")).amax(dim=1)  # max, and last (a single valid token)


def score_chunks(
    q: Tensor,
    token_mask: Tensor,
    kr_bar: Tensor,
    *,
    head_reduce: HeadReduce,
    query_reduce: QueryReduce,
    normalization: Normalization,
    chunk_block: int = 16384,
    keys_prepared: bool = False,
) -> Tensor:
    """Routing score of every pooled chunk for every row (paper Eq. 2), float32 [B, C].

    q [B, T, H, D] routing queries, token_mask [B, T] True for routing tokens (padding may be on
    either side), kr_bar [C, Hkv, D] pooled routing keys. Query head h reads kv head h // (H/Hkv).
    cosine: both sides L2-normalised; scaled_dot: raw dot product times 1/sqrt(D) (spec §2.3);
    scaled_cosine: cosine times 1/sqrt(D) (the reference without decouple_router, spec §9).
    Chunks are processed `chunk_block` at a time so memory does not grow with the bank.
    keys_prepared: kr_bar is already `prepared_keys(kr_bar, normalization)` (made once per bank, not per call).
    """
    if query_reduce == "colbert":
        raise InvalidInputError("query_reduce='colbert' ranks documents, not chunks: use document_scores")
    _check_choice("query_reduce", query_reduce, ("max", "mean", "last"))
    q, token_mask, k = _prepared(q, token_mask, kr_bar, head_reduce, normalization, chunk_block,
                                 last_only=query_reduce == "last", keys_prepared=keys_prepared)
    out = torch.empty(q.shape[0], k.shape[0], dtype=torch.float32, device=q.device)
    for start in range(0, k.shape[0], chunk_block):
        s = _token_head_scores(q, k[start : start + chunk_block], head_reduce)
        out[:, start : start + chunk_block] = _reduce_tokens(s, token_mask, query_reduce)
    return out


def prepared_keys(kr_bar: Tensor, normalization: Normalization, dtype: torch.dtype = torch.float32) -> Tensor:
    """Routing keys as the scores read them: L2-normalised in float32 for the cosine normalisations, held in
    `dtype`. Routing against one bank again and again, make this once and pass keys_prepared=True: float32
    keys give the same numbers; bfloat16 keys halve what each question reads, and the queries are rounded to
    bfloat16 to meet them (products accumulate in float32, each score is rounded to bfloat16: within about
    2e-3 of the float32 scores, as the Triton kernel's exact=False)."""
    k = kr_bar.float()
    k = F.normalize(k, dim=-1, eps=NORM_EPS) if normalization in ("cosine", "scaled_cosine") else k
    return k.to(dtype)


KEY_LEVELS = 127  # int8 routing keys: symmetric steps, the largest entry of each key at +-127
QUANTIZE_ROWS = 1 << 18  # keys quantised per block (bounds the float32 working copy to 256K keys)


def quantized_keys(kr_bar: Tensor, normalization: Normalization,
                   device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """`prepared_keys` as int8 with one float32 scale per key (per chunk and kv head): values [..., D] int8 and
    scales [...] with values * scales[..., None] within half a step (scale / 2) of each prepared entry, the step
    being the key's largest |entry| / 127. Half the bytes of bfloat16 keys for a scorer that streams them (the
    GPU kernel; routing.score_keys='int8'), with a finer grid than bfloat16's for a key's large entries. A zero
    key stays zero (scale 0). Made in blocks of QUANTIZE_ROWS keys on `device` (default: kr_bar's), so a large
    bank never needs a float32 copy, and a bank in host memory is quantised by the GPU that will score it."""
    device = kr_bar.device if device is None else torch.device(device)
    flat = kr_bar.reshape(-1, kr_bar.shape[-1])
    values = torch.empty(flat.shape, dtype=torch.int8, device=device)
    scales = torch.empty(flat.shape[0], dtype=torch.float32, device=device)
    for start in range(0, flat.shape[0], QUANTIZE_ROWS):
        k = prepared_keys(flat[start : start + QUANTIZE_ROWS].to(device), normalization)
        step = k.abs().amax(dim=-1) / KEY_LEVELS
        values[start : start + QUANTIZE_ROWS] = torch.round(k / torch.where(step > 0, step, 1.0)[:, None])
        scales[start : start + QUANTIZE_ROWS] = step
    return values.view(kr_bar.shape), scales.view(kr_bar.shape[:-1])


def dequantized_keys(values: Tensor, scales: Tensor) -> Tensor:
    """float32 prepared keys from `quantized_keys`: what the scores of int8 keys equal (keys_prepared=True)."""
    return values.float() * scales[..., None]


def _prepared(q: Tensor, token_mask: Tensor, kr_bar: Tensor, head_reduce: str, normalization: str,
              chunk_block: int, *, last_only: bool, keys_prepared: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Checked float32 inputs of the token-chunk scores: q [B, T', Hkv, G, D] normalised and scaled as
    `normalization` says, the token mask on q's device, k [C, Hkv, D]."""
    _check_choice("head_reduce", head_reduce, ("mean", "max"))
    _check_choice("normalization", normalization, ("cosine", "scaled_dot", "scaled_cosine"))
    _check_score_inputs(q, token_mask, kr_bar, chunk_block)
    h, d = q.shape[2], q.shape[3]
    hkv = kr_bar.shape[1]
    token_mask = token_mask.to(q.device)
    q = q.float()
    k = kr_bar.to(device=q.device) if keys_prepared else prepared_keys(kr_bar.to(q.device), normalization)
    if last_only:
        q, token_mask = _last_valid_token(q, token_mask)
    if normalization in ("cosine", "scaled_cosine"):
        q = F.normalize(q, dim=-1, eps=NORM_EPS)
    if normalization in ("scaled_dot", "scaled_cosine"):
        q = q * (1.0 / math.sqrt(d))  # scaling q once is cheaper than scaling every score
    return q.unflatten(2, (hkv, h // hkv)), token_mask, k  # q: [B, T, Hkv, G, D]


def late_interaction_scores(
    q: Tensor,
    token_mask: Tensor,
    kr_bar: Tensor,
    chunk_doc: Tensor,
    num_docs: int,
    *,
    head_reduce: HeadReduce,
    normalization: Normalization,
    chunk_block: int = 16384,
    keys_prepared: bool = False,
) -> Tensor:
    """Document scores [B, N] in ColBERT order (query_reduce='colbert'): for each routing token its best
    chunk of the document, then the mean over the row's routing tokens.

    Eq. 2 takes the max over tokens, then over chunks, so one (token, chunk) pair decides a document; here
    every question token votes, so a document that matches each named thing beats one that matches a
    single topical word. Same inputs as `score_chunks` + `reduce_to_docs`; a document without chunks
    scores -inf. Memory: [B, T, N] floats besides one [B, T, chunk_block] block; time: the Eq. 2 scores
    plus one pass over them per chunk slot (a document's j-th chunk), not a scatter with atomics.
    """
    q, token_mask, k = _prepared(q, token_mask, kr_bar, head_reduce, normalization, chunk_block, last_only=False,
                                 keys_prepared=keys_prepared)
    check_doc_map(chunk_doc, k.shape[0], num_docs)
    b, t = token_mask.shape
    chunk_doc = chunk_doc.to(device=q.device, dtype=torch.long)
    best = torch.full((b, t, num_docs), float("-inf"), device=q.device)
    for start in range(0, k.shape[0], chunk_block):
        s = _token_head_scores(q, k[start : start + chunk_block], head_reduce)  # [B, T, c]
        for chunks, docs in _chunk_slots(chunk_doc[start : start + chunk_block]):
            # each document at most once per slot: a gather, a max and a copy, no atomics
            best.index_copy_(2, docs, torch.maximum(best.index_select(2, docs), s.index_select(2, chunks)))
    return _reduce_tokens(best, token_mask, "mean")  # a chunkless document stays -inf


def _chunk_slots(chunk_doc: Tensor) -> list[tuple[Tensor, Tensor]]:
    """(chunk positions, their documents) for slot j = each document's j-th chunk (in any order of chunk_doc).

    Documents hold a few chunks, so a handful of slots cover every chunk."""
    order = torch.sort(chunk_doc, stable=True).indices
    docs = chunk_doc[order]
    starts = torch.ones_like(docs, dtype=torch.bool)
    starts[1:] = docs[1:] != docs[:-1]
    first = torch.cummax(torch.where(starts, torch.arange(len(docs), device=docs.device), 0), dim=0).values
    rank = torch.arange(len(docs), device=docs.device) - first  # j of each sorted chunk
    slots = int(rank.max()) + 1 if len(docs) else 0
    return [(order[rank == j], docs[rank == j]) for j in range(slots)]


def document_scores(
    q: Tensor,
    token_mask: Tensor,
    kr_bar: Tensor,
    chunk_doc: Tensor,
    num_docs: int,
    *,
    head_reduce: HeadReduce,
    query_reduce: QueryReduce,
    chunk_reduce: ChunkReduce,
    normalization: Normalization,
    keys_prepared: bool = False,
) -> Tensor:
    """Document scores [B, N] of one routing layer, as the routing config says: Eq. 2 (`score_chunks`
    then `reduce_to_docs`), or ColBERT order for query_reduce='colbert' (`late_interaction_scores`,
    chunk_reduce unused). Training and retrieval both rank with this function. keys_prepared: see score_chunks."""
    if query_reduce == "colbert":
        return late_interaction_scores(q, token_mask, kr_bar, chunk_doc, num_docs, head_reduce=head_reduce,
                                       normalization=normalization, keys_prepared=keys_prepared)
    chunks = score_chunks(q, token_mask, kr_bar, head_reduce=head_reduce, query_reduce=query_reduce,
                          normalization=normalization, keys_prepared=keys_prepared)
    return reduce_to_docs(chunks, chunk_doc, num_docs, chunk_reduce=chunk_reduce)


def reduce_to_docs(
    chunk_scores: Tensor,
    chunk_doc: Tensor,
    num_docs: int,
    *,
    chunk_reduce: ChunkReduce,
) -> Tensor:
    """Document scores [B, N] from chunk scores [B, C]; chunk c belongs to doc chunk_doc[c].

    A document without chunks scores -inf, so it can never outrank a real one.
    """
    _check_choice("chunk_reduce", chunk_reduce, ("max", "mean"))
    if chunk_scores.dim() != 2 or chunk_doc.dim() != 1 or chunk_doc.shape[0] != chunk_scores.shape[1]:
        raise InvalidInputError(
            f"chunk_scores must be [B, C] and chunk_doc [C], "
            f"got {tuple(chunk_scores.shape)} and {tuple(chunk_doc.shape)}"
        )
    check_doc_map(chunk_doc, chunk_scores.shape[1], num_docs)
    scores = chunk_scores.float()
    b = scores.shape[0]
    index = chunk_doc.to(device=scores.device, dtype=torch.long).expand(b, -1)
    if chunk_reduce == "max":
        init = torch.full((b, num_docs), float("-inf"), device=scores.device)
        return init.scatter_reduce(1, index, scores, reduce="amax", include_self=True)
    means = torch.zeros(b, num_docs, device=scores.device).scatter_reduce(
        1, index, scores, reduce="mean", include_self=False
    )
    has_chunk = torch.bincount(chunk_doc.long(), minlength=num_docs).to(scores.device) > 0
    return means.masked_fill(~has_chunk, float("-inf"))


def check_doc_map(chunk_doc: Tensor, num_chunks: int, num_docs: int) -> None:
    """chunk_doc is [C] with every chunk's document index in [0, num_docs) (InvalidInputError otherwise)."""
    if chunk_doc.dim() != 1 or chunk_doc.shape[0] != num_chunks:
        raise InvalidInputError(f"chunk_doc must be [C] with C = {num_chunks} chunks, got {tuple(chunk_doc.shape)}")
    if num_docs < 0:
        raise InvalidInputError(f"num_docs must be >= 0, got {num_docs}")
    if chunk_doc.numel() and (int(chunk_doc.min()) < 0 or int(chunk_doc.max()) >= num_docs):
        raise InvalidInputError(
            f"chunk_doc values must lie in [0, {num_docs}), "
            f"got [{int(chunk_doc.min())}, {int(chunk_doc.max())}]"
        )


def select_top_k(
    doc_scores: Tensor,
    k: int,
    allowed: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The k best allowed documents of each row: (values [B, k_eff], indices [B, k_eff]).

    `allowed` is a bool mask over documents, shared ([N]) or per row ([B, N]); a disallowed
    document is never returned. k_eff = min(k, fewest allowed documents of any row), so every
    row gets k_eff real documents and no sentinel index exists (a per-row filter that allows
    fewer documents in one row shortens every row; call per row if that matters).
    Order: score descending; equal scores by lower document index (stable sort).
    Allowed documents scoring -inf (no chunks) may still fill a row.
    """
    if k <= 0:
        raise InvalidInputError(f"k must be >= 1, got {k}")
    if doc_scores.dim() != 2:
        raise InvalidInputError(f"doc_scores must be [B, N], got shape {tuple(doc_scores.shape)}")
    if torch.isnan(doc_scores).any():
        raise InvalidInputError("doc_scores contains NaN; check the routing inputs")
    b, n = doc_scores.shape
    allowed_bn = _allowed_mask(allowed, b, n, doc_scores.device)
    k_eff = min(k, int(allowed_bn.sum(dim=1).min()) if b else 0)
    return ranked_top_k(doc_scores, allowed_bn, k_eff)


def ranked_top_k(doc_scores: Tensor, allowed: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """select_top_k's order without its checks or host syncs (a captured prefill's routing): allowed [B, N],
    k at most the fewest allowed documents of any row."""
    # Two stable sorts = lexicographic order (allowed first, then score desc, then index asc),
    # so a disallowed document cannot slip in by tying with an allowed -inf one.
    by_score = torch.sort(doc_scores, dim=1, descending=True, stable=True).indices
    flags = allowed.gather(1, by_score)
    by_allowed = torch.sort((~flags).to(torch.uint8), dim=1, stable=True).indices
    indices = by_score.gather(1, by_allowed)[:, :k]
    return doc_scores.gather(1, indices), indices


def _allowed_mask(allowed: Tensor | None, b: int, n: int, device: torch.device) -> Tensor:
    if allowed is None:
        return torch.ones(b, n, dtype=torch.bool, device=device)
    if allowed.dtype != torch.bool or allowed.shape not in ((n,), (b, n)):
        raise InvalidInputError(
            f"allowed must be a bool tensor of shape ({n},) or ({b}, {n}), "
            f"got {allowed.dtype} {tuple(allowed.shape)}"
        )
    return allowed.to(device).expand(b, n)


def aggregate_layers(layer_scores: Tensor, how: LayerAggregate) -> Tensor:
    """One ranking from per-layer document scores: [L, B, N] -> [B, N] by mean or max."""
    _check_choice("how", how, ("mean", "max"))
    if layer_scores.dim() != 3 or layer_scores.shape[0] == 0:
        raise InvalidInputError(f"layer_scores must be [L>=1, B, N], got shape {tuple(layer_scores.shape)}")
    if how == "mean":
        return layer_scores.float().mean(dim=0)
    return layer_scores.float().amax(dim=0)


def relevance(scores: Tensor, normalization: Normalization, head_dim: int | None = None,
              calibration: Sequence[float] | None = None) -> Tensor:
    """Scores mapped to [0, 1]: with a calibration (a, b), sigmoid(a*s + b) (calibration.py); else
    cosine -> (s+1)/2 clamped; scaled_dot -> sigmoid(s); scaled_cosine -> (s*sqrt(head_dim)+1)/2 clamped
    (head_dim required)."""
    _check_choice("normalization", normalization, ("cosine", "scaled_dot", "scaled_cosine"))
    if calibration is not None:
        return calibrated(scores, calibration)
    s = scores.float()
    if normalization == "scaled_cosine":
        if head_dim is None or head_dim <= 0:
            raise InvalidInputError("relevance of scaled_cosine scores needs head_dim (the routing head size)")
        s = s * math.sqrt(head_dim)
    if normalization in ("cosine", "scaled_cosine"):
        return ((s + 1.0) / 2.0).clamp(0.0, 1.0)
    return torch.sigmoid(s)
