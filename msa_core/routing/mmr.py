"""Maximal marginal relevance (MMR) over a memory bank, without embedding vectors.

MSA has no per-document embedding: a document lives in the bank as pooled routing keys K̄_R
[layers, chunks, kv_heads, head_dim]. For the redundancy term of MMR we reduce those to one unit
vector per document and compare documents by cosine; the relevance term is the routing score the
question already gave each document.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..errors import InvalidInputError
from ..memory.bank import MemoryBank


def document_vectors(bank: MemoryBank, ids: Sequence[str]) -> torch.Tensor:
    """FloatTensor [len(ids), kv_heads * head_dim] on the CPU: one unit vector per document id.

    K̄_R is averaged over the document's chunks (all its parts) and the routing layers; each kv head
    is L2-normalised, the heads are concatenated and scaled by 1/sqrt(kv_heads). A dot product of
    two such vectors is then the mean over heads of per-head cosines, the head reduction of Eq. 2.

    Read the bank under the lock of whoever owns it (MemoryStore): the ids and the tensors must
    come from the same version of the bank. Raises InvalidInputError for an id not in the bank.
    """
    if isinstance(ids, str):
        raise InvalidInputError("ids must be a list of document ids, got a single string; wrap it in a list")
    kr = bank.kr_bar
    heads = bank.kv_heads
    pooled = []
    for doc_id in ids:
        rows = bank.rows_of([doc_id])
        if rows.numel() == 0:
            raise InvalidInputError(f"document {doc_id!r} is not in the bank; pass ids of stored documents")
        chunks = bank.chunks_of(rows)
        pooled.append(kr.index_select(1, chunks).float().mean(dim=(0, 1)))  # [kv_heads, head_dim]
    if not pooled:
        return torch.empty(0, heads * bank.head_dim)
    per_head = F.normalize(torch.stack(pooled), dim=-1) / math.sqrt(heads)
    return per_head.flatten(1).cpu()


def mmr_select(relevance: Sequence[float] | torch.Tensor, vectors: torch.Tensor, k: int,
               lambda_mult: float = 0.5) -> list[int]:
    """Positions of up to k documents picked by maximal marginal relevance, in pick order.

    Each step picks argmax  lambda_mult * relevance[d] - (1 - lambda_mult) * max_s sim(d, s)  over the
    documents d not picked yet, s running over the picked ones; the first pick is the most relevant.
    `relevance` should lie in [0, 1] (the relevance scores); sim is the cosine of the unit `vectors`
    mapped the same way, (cos + 1) / 2, so both terms share one scale. For cosine routing this
    affine map leaves every choice as it would be with raw cosines on both sides.
    lambda_mult = 1 is plain relevance order, 0 is maximal diversity.
    """
    rel = torch.as_tensor(relevance, dtype=torch.float32).flatten()
    vectors = torch.as_tensor(vectors, dtype=torch.float32)
    if k < 1:
        raise InvalidInputError(f"k must be >= 1, got {k}")
    if not 0.0 <= lambda_mult <= 1.0:
        raise InvalidInputError(f"lambda_mult must be in [0, 1], got {lambda_mult}")
    if vectors.dim() != 2 or vectors.shape[0] != rel.numel():
        raise InvalidInputError(
            f"got {rel.numel()} relevance scores but vectors of shape {tuple(vectors.shape)}; "
            "pass one vector (a row) per document")
    n = rel.numel()
    if n == 0:
        return []
    sim = (vectors @ vectors.T + 1.0) / 2.0
    picked = [int(torch.argmax(rel))]
    redundancy = sim[picked[0]].clone()  # max similarity of each document to the picked ones
    available = torch.ones(n, dtype=torch.bool)
    available[picked[0]] = False
    while len(picked) < min(k, n):
        gain = lambda_mult * rel - (1.0 - lambda_mult) * redundancy
        gain[~available] = float("-inf")
        best = int(torch.argmax(gain))
        picked.append(best)
        available[best] = False
        redundancy = torch.maximum(redundancy, sim[best])
    return picked
