"""Answers over the fused top-k: latent routing and BM25 pick the documents an answer uses.

Fusion (routing/fusion.py) gives one ranking per question, so a fused latent answer attends to one
selection in every routing layer: the question's fused top-k part rows, exactly as
`retrieve(question, fusion="bm25", alpha=alpha, include_parts=True)` ranks them. The selection reaches
the routed prefill as the routing's `allowed` mask (the mechanism filters use), so the prefill, the memory
hook and the reference profile run unchanged: each routing layer keeps its top-k of the allowed rows,
which are those k rows. A fused hybrid answer puts the fused top-k documents' texts into the prompt.

At alpha 1 the selection is routing's own ranking (the layers' scores aggregated); a plain latent answer
instead lets every routing layer keep its own top-k, so the two agree where the layers agree (one routing
layer; k at least the bank's size).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Protocol

import torch

from ..config import RoutingConfig
from ..errors import InvalidInputError
from ..memory.bank import MemoryBank
from ..memory.filters import Filter
from ..routing.fusion import check_fusion


class Retriever(Protocol):
    def retrieve(self, question: Any, bank: MemoryBank, k: int = 5, **kw: Any) -> Any: ...


def answer_fusion(mode: str, fusion: Any, alpha: Any, routing: RoutingConfig) -> float | None:
    """The alpha of a fused answer (the config's `fusion_alpha` when None), or None when fusion is off."""
    alpha = check_fusion(fusion, alpha, routing)
    if alpha is not None and mode == "interleave":
        raise InvalidInputError("fusion applies to mode='latent' and mode='hybrid'; interleave lets the model name "
                                "its documents: drop fusion= or pick another mode")
    return alpha


def fusion_kwargs(alpha: float | None) -> dict[str, Any]:
    """retrieve() arguments of a fused ranking with this alpha (none without fusion)."""
    return {} if alpha is None else {"fusion": "bm25", "alpha": alpha}


def fusion_record(alpha: float | None, hits: Sequence[Any], routing: RoutingConfig) -> dict[str, Any] | None:
    """Answer.fusion: how the documents were chosen and each side's score of every document (doc_ids' order)."""
    if alpha is None:
        return None
    return {"fusion": "bm25", "alpha": alpha, "method": routing.fusion_method,
            "latent_scores": [h.latent_score for h in hits], "lexical_scores": [h.lexical_score for h in hits]}


@dataclasses.dataclass
class FusedTopK:
    """The fused top-k part rows of each question of a batch, best first, and their hits."""

    rows: list[list[int]]  # bank rows per question
    parts: list[list[Any]]  # RetrievedDocument per row (part level: id = part id)
    parents: list[list[str]]  # parent id per row
    num_rows: int
    alpha: float
    routing: RoutingConfig

    def allowed(self) -> torch.Tensor:
        """[B, N] bool: each question's selected rows, the routing mask of its latent answer."""
        mask = torch.zeros(len(self.rows), self.num_rows, dtype=torch.bool)
        for b, rows in enumerate(self.rows):
            mask[b, rows] = True
        return mask


def fused_top_k(model: Retriever, questions: Sequence[str], bank: MemoryBank | None, k: int, filter: Filter,
                alpha: float | None, routing: RoutingConfig) -> FusedTopK | None:
    """The fused selection of each question's latent answer; None without fusion or documents."""
    if alpha is None or bank is None or not len(bank):
        return None
    hits = model.retrieve(list(questions), bank, k=k, filter=filter, include_parts=True, **fusion_kwargs(alpha))
    docstore = bank.docstore
    row_of = {rec.id: row for row, rec in enumerate(docstore)}
    rows = [[row_of[h.id] for h in per_question] for per_question in hits]
    parents = [[docstore[r].parent_id for r in per_question] for per_question in rows]
    return FusedTopK(rows, hits, parents, len(docstore), alpha, routing)


def annotate(answer: Any, fused: FusedTopK | None, b: int) -> Any:
    """A latent answer (of question b) with doc_ids, scores and fusion from the fused ranking, when there is one:
    every parent of the selection once, ranked (and scored) by its best part, as retrieve(fusion=...) ranks them."""
    if fused is None:
        return answer
    best: dict[str, Any] = {}
    for pid, hit in zip(fused.parents[b], fused.parts[b]):
        best.setdefault(pid, hit)
    hits = list(best.values())
    return dataclasses.replace(answer, doc_ids=list(best), scores=[h.score for h in hits],
                               fusion=fusion_record(fused.alpha, hits, fused.routing))
