"""`MSAQueryEngine`: latent-mode question answering, with the routed documents as `source_nodes`.

    engine = MSAQueryEngine(store)                 # or an MSAVectorStore / VectorStoreIndex over one
    response = engine.query("Who keeps the lighthouse?")
    response.response, response.source_nodes      # answer; documents attended to, best first
    MSAQueryEngine(store, fusion="bm25", alpha=0.5) # attend to the top-k of routing fused with BM25

Hybrid mode needs no class of ours: `RetrieverQueryEngine.from_args(MSARetriever(store), llm=any_llm)`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

from llama_index.core.base.response.schema import AsyncStreamingResponse, Response, StreamingResponse
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.query_engine import CustomQueryEngine
from llama_index.core.schema import NodeWithScore

from msa_core.model import Answer
from msa_core.store import AsyncAnswerStream, LockedAnswerStream, MemoryStore

from .filters import FilterLike, to_msa_filter
from .generation import answer_kwargs
from .nodes import answer_sources
from .vector_stores import as_memory_store


class MSAQueryEngine(CustomQueryEngine):
    """Answers with MSA latent generation over a memory bank.

    With `streaming=True`, `query` returns a StreamingResponse whose `source_nodes` list is filled
    when the stream ends (the documents are known once generation is done). `response.metadata`
    holds mode, doc_ids, raw scores and finish_reason.
    """

    k: int | None = Field(default=None, ge=1, description="Documents per routing layer; None: the config's top_k.")
    max_new_tokens: int = Field(default=256, ge=1)
    temperature: float = Field(default=0.0, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)
    streaming: bool = False
    fusion: str | None = Field(default=None, description="'bm25': attend to the top-k of routing fused with the "
                               "bank's BM25 index (one selection for every routing layer).")
    alpha: float | None = Field(default=None, description="Fusion weight of routing (1) against BM25 (0); None: the "
                                "model's routing.fusion_alpha.")

    _store: MemoryStore = PrivateAttr()
    _filter: Any = PrivateAttr(default=None)

    def __init__(self, store: Any, *, filters: FilterLike = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._store = as_memory_store(store)
        self._filter = to_msa_filter(filters)

    @property
    def store(self) -> MemoryStore:
        return self._store

    def custom_query(self, query_str: str) -> Response | StreamingResponse:
        if self.streaming:
            stream = self._store.stream_answer(query_str, **self._kwargs())
            sources: list[NodeWithScore] = []
            metadata: dict[str, Any] = {"mode": "latent"}
            return StreamingResponse(response_gen=self._relay(stream, sources, metadata), source_nodes=sources,
                                     metadata=metadata)
        answer = self._store.answer(query_str, **self._kwargs())
        return Response(answer.text, source_nodes=answer_sources(self._store, answer.doc_ids, answer.scores),
                        metadata=_metadata(answer))

    async def acustom_query(self, query_str: str) -> Response | AsyncStreamingResponse:
        if self.streaming:
            stream = self._store.astream_answer(query_str, **self._kwargs())
            sources: list[NodeWithScore] = []
            metadata: dict[str, Any] = {"mode": "latent"}
            return AsyncStreamingResponse(response_gen=self._arelay(stream, sources, metadata),
                                          source_nodes=sources, metadata=metadata)
        answer = await self._store.aanswer(query_str, **self._kwargs())
        sources = await asyncio.to_thread(answer_sources, self._store, answer.doc_ids, answer.scores)
        return Response(answer.text, source_nodes=sources, metadata=_metadata(answer))

    def _relay(self, stream: LockedAnswerStream, sources: list[NodeWithScore],
               metadata: dict[str, Any]) -> Iterator[str]:
        yield from stream
        # The response already holds these very objects: filling them in makes them visible there.
        sources.extend(answer_sources(self._store, stream.result.doc_ids, stream.result.scores))
        metadata.update(_metadata(stream.result))

    async def _arelay(self, stream: AsyncAnswerStream, sources: list[NodeWithScore],
                      metadata: dict[str, Any]) -> AsyncIterator[str]:
        async for piece in stream:
            yield piece
        result = stream.result
        sources.extend(await asyncio.to_thread(answer_sources, self._store, result.doc_ids, result.scores))
        metadata.update(_metadata(result))

    def _kwargs(self) -> dict[str, Any]:
        return answer_kwargs(self, self._filter)


def _metadata(answer: Answer) -> dict[str, Any]:
    meta = {"mode": answer.mode, "doc_ids": list(answer.doc_ids), "scores": list(answer.scores),
            "finish_reason": answer.finish_reason}
    return meta if answer.fusion is None else {**meta, "fusion": answer.fusion}
