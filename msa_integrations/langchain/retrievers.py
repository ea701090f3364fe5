"""`MSARetriever`: MSA routing as a LangChain retriever, with the scores on every document."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForRetrieverRun, CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from langchain_core.vectorstores import VectorStoreRetriever
from pydantic import ConfigDict, Field, field_validator, model_validator

from msa_core.memory.filters import compile_filter
from msa_core.model import RetrievedDocument
from msa_core.store import MemoryStore

from .documents import fill_ids, hit_to_document
from .engine import as_memory_store, make_store, run_on_worker, split_engine_options


class MSARetriever(BaseRetriever):
    """Documents ranked by MSA routing score (mean of the per-layer scores of Eq. 2).

        retriever = MSARetriever.from_texts(texts, k=4, metadatas=metas, ids=ids)
        retriever = MSARetriever(store=memory_store)            # or store=an MSAVectorStore
        retriever = MSARetriever(model=msa_model, bank=bank)    # engine options, see engine.make_store
        docs = retriever.invoke("question", k=2, filter={"year": {"$lt": 2000}})

    Each Document carries `id` and metadata "score" (raw routing score, cosine in [-1, 1] with the
    default normalisation), "relevance_score" (in [0, 1]) and, with layer_scores=True,
    "layer_scores" ({routing layer: score}). `filter` (a dict of $eq/$ne/$in/$nin/$gt/$gte/$lt/$lte/
    $and/$or/$not clauses, or a callable metadata -> bool) masks documents *before* routing, so k
    results come back whenever k documents pass it. No score threshold is applied.

    fusion="bm25" ranks by routing fused with the bank's BM25 index (alpha: 1 routing only, 0 BM25 only,
    None the model's default); "score" is then the fused score, "latent_score" and "lexical_score" its sides.
    Both can be set on the retriever or per call: retriever.invoke(q, fusion="bm25", alpha=0.3).
    """

    store: MemoryStore
    k: int = Field(default=4, ge=1, description="Documents returned per query.")
    filter: Any = Field(default=None, description="Metadata filter applied before routing.")
    layer_scores: bool = Field(default=False, description="Add per-routing-layer scores to the metadata.")
    include_parts: bool = Field(default=False, description="Return parts of split documents, not parents.")
    fusion: str | None = Field(default=None, description="'bm25': fuse routing with the bank's BM25 index.")
    alpha: float | None = Field(default=None, description="Fusion weight of routing (1) against BM25 (0).")

    model_config = ConfigDict(arbitrary_types_allowed=True)

    @model_validator(mode="before")
    @classmethod
    def _resolve_store(cls, values: Any) -> Any:
        if not isinstance(values, dict):
            return values
        engine, rest = split_engine_options(values)
        store = rest.get("store")
        if engine and store is not None:
            raise ValueError(f"pass either store= or engine options {sorted(engine)}, not both")
        rest["store"] = as_memory_store(store) if store is not None else make_store(**engine)
        return rest

    @field_validator("filter")
    @classmethod
    def _check_filter(cls, value: Any) -> Any:
        compile_filter(value)  # a bad filter fails here, naming the bad clause, not at the first query
        return value

    @classmethod
    def from_texts(cls, texts: Sequence[str], k: int = 4, metadatas: Sequence[dict[str, Any]] | None = None,
                   ids: Sequence[str] | None = None, *, show_progress_bar: bool | None = None,
                   **options: Any) -> MSARetriever:
        """Encode `texts` into a new bank and retrieve from it.

        options: engine options (model, bank, router, config, device, dtype, profile; see engine.make_store)
        and retriever fields (filter, layer_scores, include_parts).
        """
        engine, fields = split_engine_options(options)
        store = make_store(**engine)
        store.add(list(texts), None if ids is None else list(ids), metadatas, show_progress_bar=show_progress_bar)
        return cls(store=store, k=k, **fields)

    @classmethod
    def from_documents(cls, documents: Sequence[Document], k: int = 4, **options: Any) -> MSARetriever:
        """`from_texts` for Documents; a Document's `id` becomes its id (generated when absent)."""
        return cls.from_texts([d.page_content for d in documents], k, [d.metadata for d in documents],
                              fill_ids([d.id for d in documents], len(documents)), **options)

    def _search_options(self, k: int | None, filter: Any, fusion: str | None = None,  # noqa: A002
                        alpha: float | None = None) -> dict[str, Any]:
        return {"k": self.k if k is None else k, "filter": self.filter if filter is None else filter,
                "layer_scores": self.layer_scores, "include_parts": self.include_parts,
                "fusion": self.fusion if fusion is None else fusion, "alpha": self.alpha if alpha is None else alpha}

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun,
                                k: int | None = None, filter: Any = None,  # noqa: A002
                                fusion: str | None = None, alpha: float | None = None) -> list[Document]:
        hits = self.store.retrieve(query, **self._search_options(k, filter, fusion, alpha))
        return [hit_to_document(h, with_scores=True) for h in hits]

    async def _aget_relevant_documents(self, query: str, *, run_manager: AsyncCallbackManagerForRetrieverRun,
                                       k: int | None = None, filter: Any = None,  # noqa: A002
                                       fusion: str | None = None, alpha: float | None = None) -> list[Document]:
        # aretrieve routes on the store's worker thread: the event loop keeps running meanwhile.
        hits = await self.store.aretrieve(query, **self._search_options(k, filter, fusion, alpha))
        return [hit_to_document(h, with_scores=True) for h in hits]


class MSAVectorStoreRetriever(VectorStoreRetriever):
    """What `MSAVectorStore.as_retriever()` returns: LangChain's VectorStoreRetriever (search types
    "similarity", "mmr", "similarity_score_threshold" with search_kwargs as usual), whose Documents
    carry metadata "score" (raw routing score) and "relevance_score" (in [0, 1]) like MSARetriever's."""

    def _hits(self, query: str, kwargs: dict[str, Any]) -> list[RetrievedDocument]:
        options = self.search_kwargs | kwargs
        store = self.vectorstore
        if self.search_type == "mmr":
            return store.mmr_hits(query, **options)  # type: ignore[attr-defined]
        if self.search_type == "similarity_score_threshold":
            threshold = options.pop("score_threshold")
            return [h for h in store.search_hits(query, **options)  # type: ignore[attr-defined]
                    if h.relevance_score >= threshold]
        if self.search_type == "similarity":
            return store.search_hits(query, **options)  # type: ignore[attr-defined]
        raise ValueError(f"search_type of {self.search_type} not allowed.")

    def _documents(self, query: str, kwargs: dict[str, Any]) -> list[Document]:
        return [hit_to_document(h, with_scores=True) for h in self._hits(query, kwargs)]

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun,
                                **kwargs: Any) -> list[Document]:
        return self._documents(query, kwargs)

    async def _aget_relevant_documents(self, query: str, *, run_manager: AsyncCallbackManagerForRetrieverRun,
                                       **kwargs: Any) -> list[Document]:
        return await run_on_worker(self.vectorstore.store, self._documents, query, kwargs)  # type: ignore[attr-defined]
