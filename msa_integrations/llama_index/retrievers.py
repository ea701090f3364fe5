"""`MSARetriever`: LlamaIndex retriever whose ranking is MSA routing over a memory bank.

    retriever = MSARetriever(store, similarity_top_k=3, filters=MetadataFilters(...))
    engine = RetrieverQueryEngine.from_args(retriever, llm=any_llm)   # hybrid mode
"""

from __future__ import annotations

from typing import Any

from llama_index.core.base.base_retriever import BaseRetriever
from llama_index.core.callbacks import CallbackManager
from llama_index.core.constants import DEFAULT_SIMILARITY_TOP_K
from llama_index.core.schema import NodeWithScore, QueryBundle

from msa_core.errors import InvalidInputError

from .filters import FilterLike, to_msa_filter
from .nodes import hit_to_node
from .vector_stores import as_memory_store


class MSARetriever(BaseRetriever):
    """Top documents by routing score, as `NodeWithScore`.

    `score` is the relevance in [0, 1]; the raw routing score is `msa_score` (an `MSANodeWithScore`
    field: the node itself is left as stored, so its hash matches for fusion retrievers). Filters (LlamaIndex `MetadataFilters` or an msa filter) apply before routing.

    Args:
        store: a MemoryStore, an MSAVectorStore, or a VectorStoreIndex over one.
        similarity_top_k: documents returned per query.
        filters: metadata filters.
        include_parts: return the parts of split long documents instead of their parents.
    """

    def __init__(self, store: Any, similarity_top_k: int = DEFAULT_SIMILARITY_TOP_K, filters: FilterLike = None,
                 include_parts: bool = False, callback_manager: CallbackManager | None = None,
                 object_map: dict | None = None, verbose: bool = False) -> None:
        if isinstance(similarity_top_k, bool) or not isinstance(similarity_top_k, int) or similarity_top_k < 1:
            raise InvalidInputError(f"similarity_top_k must be an integer >= 1, got {similarity_top_k!r}")
        self._store = as_memory_store(store)
        self._filter = to_msa_filter(filters)
        self.similarity_top_k = similarity_top_k
        self.include_parts = include_parts
        super().__init__(callback_manager=callback_manager, object_map=object_map, verbose=verbose)

    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        hits = self._store.retrieve(query_bundle.query_str, k=self.similarity_top_k, filter=self._filter,
                                    include_parts=self.include_parts)
        return [hit_to_node(h) for h in hits]

    async def _aretrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        # On the store's worker thread: the event loop keeps running while the model routes.
        hits = await self._store.aretrieve(query_bundle.query_str, k=self.similarity_top_k, filter=self._filter,
                                           include_parts=self.include_parts)
        return [hit_to_node(h) for h in hits]
