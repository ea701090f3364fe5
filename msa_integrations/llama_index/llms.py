"""`MSALLM`: the MSA backbone as a LlamaIndex LLM.

    MSALLM(store)                   # latent: routing layers attend to the store's memory bank
    MSALLM()                        # plain generation with the embedded default model (no bank)
    MSALLM(store, use_memory=False) # plain generation with the store's model (e.g. inside a RAG engine)

Prompts go through the backbone's chat template; in a chat, the last user message routes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
    MessageRole,
)
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.custom import CustomLLM

from msa_core.model import Answer, MSAModel
from msa_core.store import MemoryStore

from .filters import FilterLike, to_msa_filter
from .generation import answer_kwargs, to_msa_messages
from .vector_stores import as_memory_store


class MSALLM(CustomLLM):
    """Latent-mode (over a bank) or plain generation with an msa model.

    Args:
        store: a MemoryStore, an MSAVectorStore or a VectorStoreIndex over one; default: an empty
            store on `model` (plain generation).
        model: the MSAModel when no store is given; default: the shared embedded default model.
        use_memory: attend to the store's bank (latent mode); False generates without memory.
        filters: metadata filters limiting the documents the bank offers to routing.
    """

    k: int | None = Field(default=None, ge=1, description="Documents per routing layer; None: the config's top_k.")
    max_new_tokens: int = Field(default=256, ge=1, description="Most tokens generated per call.")
    temperature: float = Field(default=0.0, ge=0.0, description="0 decodes greedily.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, description="Sampling seed, for reproducible sampling.")
    stop: list[str] = Field(default_factory=list, description="Generation stops before any of these strings.")
    use_memory: bool = Field(default=True, description="Latent mode over the store's bank; False: plain.")
    fusion: str | None = Field(default=None, description="'bm25': attend to the top-k of routing fused with the "
                               "bank's BM25 index (one selection for every routing layer).")
    alpha: float | None = Field(default=None, description="Fusion weight of routing (1) against BM25 (0); None: the "
                                "model's routing.fusion_alpha.")

    _store: MemoryStore = PrivateAttr()
    _plain: MemoryStore = PrivateAttr()
    _filter: Any = PrivateAttr(default=None)

    def __init__(self, store: Any = None, *, model: MSAModel | None = None, filters: FilterLike = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._store = as_memory_store(store) if store is not None else MemoryStore(model)
        # Plain mode gets its own empty store: no bank to attend to, and no wait on the bank's lock.
        self._plain = MemoryStore(self._store.model)
        self._filter = to_msa_filter(filters)

    @classmethod
    def class_name(cls) -> str:
        return "MSALLM"

    @property
    def store(self) -> MemoryStore:
        return self._store

    @property
    def metadata(self) -> LLMMetadata:
        model = self._store.model
        return LLMMetadata(context_window=model.backbone.args.rope.max_position_embeddings,
                           num_output=self.max_new_tokens, is_chat_model=True, model_name=f"msa:{model.name}")

    # ---- sync ---------------------------------------------------------------------------

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        answer = self._target().answer(self._question(prompt, formatted), **self._kwargs(kwargs))
        return _completion(answer)

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        stream = self._target().stream_answer(self._question(prompt, formatted), **self._kwargs(kwargs))
        return _stream_completions(stream)

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        answer = self._target().answer(to_msa_messages(messages, self.system_prompt), **self._kwargs(kwargs))
        return _chat(answer)

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        stream = self._target().stream_answer(to_msa_messages(messages, self.system_prompt), **self._kwargs(kwargs))
        return _as_chat_stream(_stream_completions(stream))

    # ---- async: generation runs on the store's worker thread ------------------------------

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        answer = await self._target().aanswer(self._question(prompt, formatted), **self._kwargs(kwargs))
        return _completion(answer)

    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False,
                               **kwargs: Any) -> CompletionResponseAsyncGen:
        stream = self._target().astream_answer(self._question(prompt, formatted), **self._kwargs(kwargs))
        return _astream_completions(stream)

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        answer = await self._target().aanswer(to_msa_messages(messages, self.system_prompt), **self._kwargs(kwargs))
        return _chat(answer)

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        stream = self._target().astream_answer(to_msa_messages(messages, self.system_prompt),
                                               **self._kwargs(kwargs))

        async def gen() -> ChatResponseAsyncGen:
            async for r in _astream_completions(stream):
                yield _chat_chunk(r)

        return gen()

    # ---- helpers ------------------------------------------------------------------------

    def _target(self) -> MemoryStore:
        return self._store if self.use_memory else self._plain

    def _question(self, prompt: str, formatted: bool) -> str | list[dict[str, str]]:
        if formatted:  # LlamaIndex already applied its prompt templates and system prompt
            return prompt
        prompt = self.completion_to_prompt(prompt)
        if self.system_prompt:
            return [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": prompt}]
        return prompt

    def _kwargs(self, overrides: dict[str, Any]) -> dict[str, Any]:
        return answer_kwargs(self, self._filter, overrides)


def _extra(answer: Answer) -> dict[str, Any]:
    return {"doc_ids": answer.doc_ids, "scores": answer.scores, "finish_reason": answer.finish_reason}


def _completion(answer: Answer) -> CompletionResponse:
    return CompletionResponse(text=answer.text, raw=answer.to_dict(), additional_kwargs=_extra(answer))


def _chat(answer: Answer) -> ChatResponse:
    message = ChatMessage(role=MessageRole.ASSISTANT, content=answer.text)
    return ChatResponse(message=message, raw=answer.to_dict(), additional_kwargs=_extra(answer))


def _stream_completions(stream: Any) -> Iterator[CompletionResponse]:
    text = ""
    for piece in stream:
        text += piece
        yield CompletionResponse(text=text, delta=piece)
    # A last empty chunk carries what the answer was conditioned on.
    yield CompletionResponse(text=text, delta="", raw=stream.result.to_dict(), additional_kwargs=_extra(stream.result))


async def _astream_completions(stream: Any) -> AsyncIterator[CompletionResponse]:
    text = ""
    async for piece in stream:
        text += piece
        yield CompletionResponse(text=text, delta=piece)
    yield CompletionResponse(text=text, delta="", raw=stream.result.to_dict(), additional_kwargs=_extra(stream.result))


def _chat_chunk(r: CompletionResponse) -> ChatResponse:
    return ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=r.text), delta=r.delta, raw=r.raw,
                        additional_kwargs=r.additional_kwargs)


def _as_chat_stream(chunks: Iterator[CompletionResponse]) -> Iterator[ChatResponse]:
    return (_chat_chunk(r) for r in chunks)
