"""`MSAVectorStore`: a LangChain VectorStore over an MSA memory bank, a drop-in for FAISS or Chroma.

There are no embedding vectors: documents are encoded by the language model itself into pooled
keys and values, and a query is routed against the pooled routing keys (paper Eq. 2). An
`embedding` argument is accepted wherever LangChain passes one, and ignored.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from langchain_core.documents import Document
from langchain_core.embeddings import Embeddings
from langchain_core.vectorstores import VectorStore

from msa_core.errors import InvalidInputError
from msa_core.model import RetrievedDocument
from msa_core.routing.mmr import document_vectors, mmr_select
from msa_core.store import MemoryStore

from .documents import fill_ids, hit_to_document, record_to_document
from .engine import as_memory_store, make_store, run_on_worker, store_lock
from .retrievers import MSAVectorStoreRetriever

_NO_VECTORS = ("MSAVectorStore has no embedding vectors: documents are encoded by the language model and a "
               "query is routed by its text. Call {name} with the query text instead.")


class MSAVectorStore(VectorStore):
    """A vector store whose documents live in an MSA memory bank.

        store = MSAVectorStore()                                # empty, on the embedded default model
        store = MSAVectorStore.from_texts(texts, metadatas=metas, ids=ids)   # embedding= accepted, ignored
        store.add_documents(docs)                               # Document.id honoured; same id = upsert
        store.similarity_search_with_score("question", k=4, filter={"topic": "town"})
        store.max_marginal_relevance_search("question", k=4, fetch_k=20, lambda_mult=0.5)
        store.save_local("my-bank"); MSAVectorStore.load_local("my-bank")   # safetensors + JSON, no pickle

    Scores: `similarity_search_with_score` gives the raw routing score (cosine in [-1, 1] with the
    default normalisation; higher is better); `similarity_search_with_relevance_scores` gives the
    engine's relevance_score in [0, 1]: calibrated for the shipped router, so that score_threshold=0.5
    keeps documents as likely to be the answer as not (docs/configuration.md, "Scores"); (s + 1) / 2
    for cosine routers without a calibration. `filter` is a dict ($eq, $ne, $in, $nin, $gt, $gte,
    $lt, $lte, $and, $or, $not) or a callable metadata -> bool, applied *before* routing.
    `store.as_retriever(...)` (every search type) returns Documents whose metadata carries "score"
    and "relevance_score", as `MSARetriever`'s do; the search methods leave the metadata as stored.
    Engine options (model, bank, router, config, device, dtype, profile): see `engine.make_store`.
    """

    def __init__(self, store: MemoryStore | None = None, *, embedding: Embeddings | None = None,
                 **engine_options: Any) -> None:
        if store is not None and engine_options:
            raise TypeError(f"pass either store= or engine options {sorted(engine_options)}, not both")
        self.store: MemoryStore = as_memory_store(store) if store is not None else make_store(**engine_options)

    @property
    def embeddings(self) -> Embeddings | None:
        return None

    # ---- construction ---------------------------------------------------------------------

    @classmethod
    def from_texts(cls, texts: list[str], embedding: Embeddings | None = None,
                   metadatas: list[dict[str, Any]] | None = None, *, ids: list[str] | None = None,
                   show_progress_bar: bool | None = None, **engine_options: Any) -> MSAVectorStore:
        """A new store holding `texts`; `embedding` is accepted for compatibility and ignored."""
        store = cls(**engine_options)
        store.add_texts(texts, metadatas, ids=ids, show_progress_bar=show_progress_bar)
        return store

    @classmethod
    async def afrom_texts(cls, texts: list[str], embedding: Embeddings | None = None,
                          metadatas: list[dict[str, Any]] | None = None, *, ids: list[str] | None = None,
                          show_progress_bar: bool | None = None, **engine_options: Any) -> MSAVectorStore:
        """`from_texts` without blocking the event loop; `embedding` is accepted and ignored."""
        store = await asyncio.to_thread(cls, **engine_options)  # loading a model is slow: off the loop
        await store.aadd_texts(texts, metadatas, ids=ids, show_progress_bar=show_progress_bar)
        return store

    @classmethod
    def from_documents(cls, documents: list[Document], embedding: Embeddings | None = None,
                       **kwargs: Any) -> MSAVectorStore:
        """A new store holding `documents` (their ids kept); `embedding` is ignored."""
        return super().from_documents(documents, embedding, **kwargs)  # type: ignore[arg-type]

    @classmethod
    async def afrom_documents(cls, documents: list[Document], embedding: Embeddings | None = None,
                              **kwargs: Any) -> MSAVectorStore:
        return await super().afrom_documents(documents, embedding, **kwargs)  # type: ignore[arg-type]

    # ---- writes -----------------------------------------------------------------------------

    def _batch(self, texts: Iterable[str], metadatas: list[dict[str, Any]] | None,
               ids: Sequence[str | None] | None) -> tuple[list[str], list[str], list[dict[str, Any]] | None]:
        if isinstance(texts, str):  # list("abc") would add three one-letter documents
            raise InvalidInputError("texts must be a list of strings, got a single string; wrap it in a list")
        texts = list(texts)
        if metadatas is not None and len(metadatas) != len(texts):
            raise InvalidInputError(f"got {len(metadatas)} metadatas for {len(texts)} texts; pass one per text")
        return texts, fill_ids(ids, len(texts)), metadatas

    def add_texts(self, texts: Iterable[str], metadatas: list[dict[str, Any]] | None = None, *,
                  ids: list[str] | None = None, show_progress_bar: bool | None = None,
                  **kwargs: Any) -> list[str]:
        """Encode and add texts; an id already stored is replaced (upsert). Returns the ids.

        Ids that are None are generated (uuid4). Other keyword arguments (e.g. the indexing API's
        batch_size) are accepted and ignored: the engine batches by its own encode settings.
        """
        texts, ids_, metadatas = self._batch(texts, metadatas, ids)
        if not texts:
            return []
        return self.store.add(texts, ids_, metadatas, show_progress_bar=show_progress_bar)

    async def aadd_texts(self, texts: Iterable[str], metadatas: list[dict[str, Any]] | None = None, *,
                         ids: list[str] | None = None, show_progress_bar: bool | None = None,
                         **kwargs: Any) -> list[str]:
        texts, ids_, metadatas = self._batch(texts, metadatas, ids)
        if not texts:
            return []
        return await self.store.aadd(texts, ids_, metadatas, show_progress_bar=show_progress_bar)

    def delete(self, ids: list[str] | None = None, **kwargs: Any) -> bool:
        """Delete documents by id; ids not stored are ignored. Nothing else is re-encoded."""
        self.store.delete(_ids_to_delete(ids))
        return True

    async def adelete(self, ids: list[str] | None = None, **kwargs: Any) -> bool:
        await self.store.adelete(_ids_to_delete(ids))
        return True

    # ---- reads ------------------------------------------------------------------------------

    def get_by_ids(self, ids: Sequence[str], /) -> list[Document]:
        """Stored documents with these ids, in the order asked; missing ids are skipped."""
        return [record_to_document(r) for r in self.store.get(_id_strings(ids))]

    async def aget_by_ids(self, ids: Sequence[str], /) -> list[Document]:
        return await run_on_worker(self.store, self.get_by_ids, ids)

    def as_retriever(self, **kwargs: Any) -> MSAVectorStoreRetriever:
        """LangChain's VectorStoreRetriever (search_type "similarity", "mmr" or
        "similarity_score_threshold"), whose Documents carry "score" and "relevance_score" in metadata."""
        tags = kwargs.pop("tags", None) or [*self._get_retriever_tags()]
        return MSAVectorStoreRetriever(vectorstore=self, tags=tags, **kwargs)

    def search_hits(self, query: str, k: int = 4, filter: Any = None,  # noqa: A002
                    **kwargs: Any) -> list[RetrievedDocument]:
        """The engine's hits (id, text, metadata, score, relevance_score), best first; fusion="bm25" and alpha
        fuse routing with BM25 (see similarity_search_with_score); other keyword arguments are ignored."""
        return self.store.retrieve(query, k=k, filter=filter, **_fusion(kwargs))

    def similarity_search_with_score(self, query: str, k: int = 4, filter: Any = None,  # noqa: A002
                                     **kwargs: Any) -> list[tuple[Document, float]]:
        """(Document, raw routing score) pairs, best first. fusion="bm25" (and alpha: 1 routing only, 0 BM25
        only) fuses routing with the bank's BM25 index: the score is then the fused one, and the metadata
        holds "latent_score" and "lexical_score". Other keyword arguments are ignored."""
        hits = self.search_hits(query, k, filter, **kwargs)
        return [(hit_to_document(h), h.score) for h in hits]

    async def asimilarity_search_with_score(self, query: str, k: int = 4, filter: Any = None,  # noqa: A002
                                            **kwargs: Any) -> list[tuple[Document, float]]:
        hits = await self.store.aretrieve(query, k=k, filter=filter, **_fusion(kwargs))
        return [(hit_to_document(h), h.score) for h in hits]

    def similarity_search(self, query: str, k: int = 4, filter: Any = None,  # noqa: A002
                          **kwargs: Any) -> list[Document]:
        return [doc for doc, _ in self.similarity_search_with_score(query, k, filter, **kwargs)]

    async def asimilarity_search(self, query: str, k: int = 4, filter: Any = None,  # noqa: A002
                                 **kwargs: Any) -> list[Document]:
        return [doc for doc, _ in await self.asimilarity_search_with_score(query, k, filter, **kwargs)]

    def _select_relevance_score_fn(self) -> Callable[[float], float]:
        if self.store.model.config.routing.normalization == "cosine":
            return _cosine_to_unit
        return _sigmoid  # scaled_dot scores are unbounded

    # The engine already maps each score to [0, 1] with the same rule; use its values directly.
    def _similarity_search_with_relevance_scores(self, query: str, k: int = 4, filter: Any = None,  # noqa: A002
                                                 **kwargs: Any) -> list[tuple[Document, float]]:
        hits = self.store.retrieve(query, k=k, filter=filter, **_fusion(kwargs))
        return [(hit_to_document(h), h.relevance_score) for h in hits]

    async def _asimilarity_search_with_relevance_scores(self, query: str, k: int = 4,
                                                        filter: Any = None,  # noqa: A002
                                                        **kwargs: Any) -> list[tuple[Document, float]]:
        hits = await self.store.aretrieve(query, k=k, filter=filter, **_fusion(kwargs))
        return [(hit_to_document(h), h.relevance_score) for h in hits]

    def max_marginal_relevance_search(self, query: str, k: int = 4, fetch_k: int = 20, lambda_mult: float = 0.5,
                                      filter: Any = None, **kwargs: Any) -> list[Document]:  # noqa: A002
        """k documents out of the fetch_k best, trading relevance for diversity (lambda_mult=1: none).

        Relevance is the routing relevance score; the similarity between two documents is the
        cosine of their pooled routing keys (msa_core.routing.mmr.document_vectors).
        """
        return [hit_to_document(h) for h in self.mmr_hits(query, k, fetch_k, lambda_mult, filter)]

    def mmr_hits(self, query: str, k: int = 4, fetch_k: int = 20, lambda_mult: float = 0.5,
                 filter: Any = None, **kwargs: Any) -> list[RetrievedDocument]:  # noqa: A002
        """The engine's hits that max_marginal_relevance_search returns, in pick order."""
        # Route and read the pooled keys under one lock hold: both must see the same bank version.
        with store_lock(self.store):
            hits = self.store.retrieve(query, k=max(k, fetch_k), filter=filter)
            if not hits:
                return []
            vectors = document_vectors(self.store.bank, [h.id for h in hits])
        picks = mmr_select([h.relevance_score for h in hits], vectors, k, lambda_mult)
        return [hits[i] for i in picks]

    async def amax_marginal_relevance_search(self, query: str, k: int = 4, fetch_k: int = 20,
                                             lambda_mult: float = 0.5, filter: Any = None,  # noqa: A002
                                             **kwargs: Any) -> list[Document]:
        return await run_on_worker(self.store, self.max_marginal_relevance_search, query, k, fetch_k,
                                   lambda_mult, filter)

    def similarity_search_by_vector(self, embedding: list[float], k: int = 4, **kwargs: Any) -> list[Document]:
        raise NotImplementedError(_NO_VECTORS.format(name="similarity_search"))

    def max_marginal_relevance_search_by_vector(self, embedding: list[float], k: int = 4, fetch_k: int = 20,
                                                lambda_mult: float = 0.5, **kwargs: Any) -> list[Document]:
        raise NotImplementedError(_NO_VECTORS.format(name="max_marginal_relevance_search"))

    # ---- persistence ------------------------------------------------------------------------

    def save_local(self, folder_path: str | Path) -> None:
        """Save the bank under folder_path (safetensors + JSON, atomic, versioned; no pickle)."""
        self.store.save(folder_path)

    @classmethod
    def load_local(cls, folder_path: str | Path, embeddings: Embeddings | None = None, *,
                   allow_dangerous_deserialization: bool = False, **engine_options: Any) -> MSAVectorStore:
        """Load a bank saved by save_local (or `msa index`).

        Nothing is unpickled, so no flag is needed: allow_dangerous_deserialization and embeddings
        are accepted for FAISS compatibility and ignored. Pass model= (and router=, ...) when the
        bank was not built by the default model; a bank of another model is refused, never misread.
        """
        if "bank" in engine_options:
            raise TypeError("load_local takes the bank's folder as folder_path; drop bank=")
        return cls(make_store(bank=Path(folder_path), **engine_options))


def _fusion(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The fusion options among search keyword arguments (as_retriever(search_kwargs={"fusion": "bm25"}))."""
    return {key: kwargs[key] for key in ("fusion", "alpha") if key in kwargs}


def _ids_to_delete(ids: Sequence[str] | None) -> list[str]:
    if ids is None:
        # InvalidInputError is a ValueError, as LangChain's contract asks, and an msa error like the rest.
        raise InvalidInputError("delete() needs the ids to delete; to empty the store pass all of them "
                                "(store.store.ids())")
    return _id_strings(ids)


def _id_strings(ids: Sequence[str] | str) -> list[str]:
    # One string is one id, as in MemoryBank: iterating it would delete (or get) its letters.
    return [ids] if isinstance(ids, str) else [str(i) for i in ids]


def _cosine_to_unit(score: float) -> float:
    return min(1.0, max(0.0, (score + 1.0) / 2.0))


def _sigmoid(score: float) -> float:
    return 1.0 / (1.0 + math.exp(-score))
