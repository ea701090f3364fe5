"""Engine results as LangChain `Document`s."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from langchain_core.documents import Document

from msa_core import InvalidInputError, RetrievedDocument


def hit_to_document(hit: RetrievedDocument, *, with_scores: bool = False) -> Document:
    """A Document with the hit's id, text and metadata.

    with_scores adds metadata "score" (raw routing score: cosine in [-1, 1] by default),
    "relevance_score" (in [0, 1]) and, when the engine returned them, "layer_scores"
    ({routing layer: score}, string keys so the metadata stays JSON). They replace user keys of the
    same names. The vector store leaves them out: its callers get scores from *_with_score.
    A fused hit (fusion="bm25") always carries "latent_score" (routing) and "lexical_score" (BM25), the
    sides of its fused score, since no *_with_score return value can hold them.
    """
    metadata: dict[str, Any] = dict(hit.metadata)
    if hit.latent_score is not None:
        metadata["latent_score"], metadata["lexical_score"] = hit.latent_score, hit.lexical_score
    if with_scores:
        metadata["score"] = hit.score
        metadata["relevance_score"] = hit.relevance_score
        if hit.layer_scores is not None:
            metadata["layer_scores"] = {str(layer): s for layer, s in hit.layer_scores.items()}
    return Document(id=hit.id, page_content=hit.text, metadata=metadata)


def record_to_document(record: dict[str, Any]) -> Document:
    """A Document from a bank record {id, text, metadata, ...} (MemoryStore.get)."""
    return Document(id=record["id"], page_content=record["text"], metadata=record["metadata"])


def fill_ids(ids: Sequence[str | None] | None, n: int) -> list[str]:
    """n string ids: the given ones (as strings), a new uuid4 where an id is None or missing."""
    if ids is None:
        ids = [None] * n
    ids = list(ids)
    if len(ids) != n:
        raise InvalidInputError(f"got {len(ids)} ids for {n} texts; pass one id per text (None to generate one)")
    return [str(uuid.uuid4()) if i is None else str(i) for i in ids]
