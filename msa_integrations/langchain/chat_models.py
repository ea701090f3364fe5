"""`ChatMSA`: MSA generation as a LangChain chat model.

latent (default): the routing layers attend to the pooled K/V of the documents each layer picks
from the store's bank; without a store, or with an empty bank, it is plain generation.
hybrid: the best documents by routing score go, as text, into the prompt of the same backbone.
fusion="bm25" (alpha: 1 routing only, 0 BM25 only): both modes use the top-k of routing fused with the
bank's BM25 index; latent routing layers all attend to that one selection (MSAModel.answer(fusion=...)).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any, Literal

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LangSmithParams
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from pydantic import ConfigDict, Field, PrivateAttr, field_validator

from msa_core import Answer
from msa_core.inference.generate import build_prompt
from msa_core.memory.filters import compile_filter
from msa_core.store import MemoryStore

from .engine import as_memory_store, make_store

# Per-call overrides accepted by invoke/stream (e.g. `chat.invoke(msgs, k=4, mode="hybrid")`).
_CALL_OPTIONS = ("max_new_tokens", "temperature", "top_p", "k", "mode", "seed", "filter", "fusion", "alpha")
_ROLES = {"human": "user", "ai": "assistant", "system": "system", "tool": "tool", "function": "tool"}
_TEXT_BLOCKS = ("text", "reasoning")


class ChatMSA(BaseChatModel):
    """Chat with an MSA model over a memory bank.

        chat = ChatMSA(store=vector_store)          # an MSAVectorStore, MSARetriever or MemoryStore
        chat = ChatMSA()                            # the embedded default model, no documents
        msg = chat.invoke("Who keeps the lighthouse?")
        msg.response_metadata["doc_ids"], msg.response_metadata["scores"]   # documents used, best first
        for chunk in chat.stream("..."): ...        # token by token

    Messages map to the model's chat template (system / user / assistant); the last user message
    is the question that routes. Text only: image, audio and file blocks are refused.
    """

    store: MemoryStore | None = Field(default=None, exclude=True,
                                      description="Memory to answer from; None: the default model, no bank.")
    mode: Literal["latent", "hybrid"] = "latent"
    k: int | None = Field(default=None, ge=1, description="latent: documents per routing layer "
                          "(None: the model's routing.top_k); hybrid: documents put in the prompt (None: 4).")
    max_new_tokens: int = Field(default=256, ge=1, alias="max_tokens")
    temperature: float = Field(default=0.0, ge=0.0, description="0 decodes greedily.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: list[str] | None = None
    filter: Any = Field(default=None, description="Metadata filter applied before routing.")
    fusion: str | None = Field(default=None, description="'bm25': the documents are the top-k of routing fused "
                               "with the bank's BM25 index.")
    alpha: float | None = Field(default=None, description="Fusion weight of routing (1) against BM25 (0); None: "
                                "the model's routing.fusion_alpha.")
    streaming: bool = Field(default=False, description="invoke() goes through the token stream.")

    model_config = ConfigDict(arbitrary_types_allowed=True, populate_by_name=True)

    _default_store: MemoryStore | None = PrivateAttr(default=None)
    _default_lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    @field_validator("store", mode="before")
    @classmethod
    def _unwrap_store(cls, value: Any) -> Any:
        return None if value is None else as_memory_store(value)

    @field_validator("filter")
    @classmethod
    def _check_filter(cls, value: Any) -> Any:
        compile_filter(value)
        return value

    @property
    def _llm_type(self) -> str:
        return "msa-chat"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_name": self._model_label(), "mode": self.mode, "k": self.k,
                "max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "top_p": self.top_p}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = super()._get_ls_params(stop=stop, **kwargs)
        params["ls_provider"] = "msa"
        params["ls_model_name"] = kwargs.get("model") or self._model_label()
        params["ls_temperature"] = kwargs.get("temperature", self.temperature)
        params["ls_max_tokens"] = kwargs.get("max_new_tokens", self.max_new_tokens)
        if stop or self.stop:
            params["ls_stop"] = list(stop or self.stop or [])
        return params

    # ---- the engine -------------------------------------------------------------------------

    def _store(self) -> MemoryStore:
        """The store to answer from; without one, an empty store on the default model, made on first
        use (building a ChatMSA stays cheap: nothing loads until the first call)."""
        if self.store is not None:
            return self.store
        with self._default_lock:
            if self._default_store is None:
                self._default_store = make_store()
            return self._default_store

    async def _astore(self) -> MemoryStore:
        """`_store` without blocking the loop when the first call loads the default model."""
        if self.store is not None or self._default_store is not None:
            return self._store()
        return await asyncio.to_thread(self._store)

    def _model_label(self) -> str:
        store = self.store or self._default_store
        return f"msa:{store.model.name}" if store is not None and store.model.name else "msa:default"

    def _answer_options(self, stop: list[str] | None, kwargs: dict[str, Any]) -> dict[str, Any]:
        call = {name: kwargs[name] for name in _CALL_OPTIONS if kwargs.get(name) is not None}
        if "max_tokens" in kwargs and "max_new_tokens" not in call:
            call["max_new_tokens"] = kwargs["max_tokens"]
        options = {"mode": self.mode, "k": self.k, "max_new_tokens": self.max_new_tokens,
                   "temperature": self.temperature, "top_p": self.top_p, "seed": self.seed,
                   "filter": self.filter, "stop": stop if stop is not None else self.stop,
                   "fusion": self.fusion, "alpha": self.alpha, **call}
        if options["mode"] == "hybrid" and options["k"] is None:
            options["k"] = 4  # a prompt of 16 documents (the latent default) would swamp a small model
        return options

    def _usage(self, conversation: list[dict[str, str]], text: str) -> UsageMetadata:
        # Counted from text, as msa_core's Answer reports no token counts yet: input is the conversation
        # in the chat template (hybrid's inserted documents and latent memory are not counted).
        tokenizer = self._store().model.tokenizer
        n_in = len(build_prompt(tokenizer, conversation).ids)
        n_out = len(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0
        return UsageMetadata(input_tokens=n_in, output_tokens=n_out, total_tokens=n_in + n_out)

    def _metadata(self, answer: Answer) -> dict[str, Any]:
        meta: dict[str, Any] = {"model_name": self._model_label(), "mode": answer.mode,
                                "finish_reason": answer.finish_reason,
                                "doc_ids": list(answer.doc_ids), "scores": list(answer.scores)}
        if answer.layer_selections:
            meta["layer_selections"] = {str(layer): ids for layer, ids in answer.layer_selections.items()}
        if answer.fusion is not None:
            meta["fusion"] = answer.fusion
        return meta

    def _result(self, conversation: list[dict[str, str]], answer: Answer) -> ChatResult:
        message = AIMessage(content=answer.text, response_metadata=self._metadata(answer),
                            usage_metadata=self._usage(conversation, answer.text))
        return ChatResult(generations=[ChatGeneration(message=message,
                                                      generation_info={"finish_reason": answer.finish_reason})])

    def _last_chunk(self, conversation: list[dict[str, str]], answer: Answer) -> ChatGenerationChunk:
        message = AIMessageChunk(content="", response_metadata=self._metadata(answer),
                                 usage_metadata=self._usage(conversation, answer.text), chunk_position="last")
        return ChatGenerationChunk(message=message, generation_info={"finish_reason": answer.finish_reason})

    # ---- token counting (LangChain's default is GPT-2's tokenizer, fetched from the hub) -------

    def get_token_ids(self, text: str) -> list[int]:
        """Token ids of `text` in the model's own tokenizer (no special tokens)."""
        return list(self._store().model.tokenizer(text, add_special_tokens=False)["input_ids"])

    def get_num_tokens_from_messages(self, messages: list[BaseMessage], tools: Any = None) -> int:
        """Tokens of the conversation as the model reads it: its chat template, generation prompt included."""
        if tools:
            raise ValueError("ChatMSA has no tool calling, so tools add no tokens; call without tools=")
        return len(build_prompt(self._store().model.tokenizer, to_conversation(messages)).ids)

    # ---- LangChain hooks --------------------------------------------------------------------

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        conversation = to_conversation(messages)
        answer = self._store().answer(conversation, **self._answer_options(stop, kwargs))
        return self._result(conversation, answer)

    async def _agenerate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        conversation = to_conversation(messages)
        store = await self._astore()
        answer = await store.aanswer(conversation, **self._answer_options(stop, kwargs))
        return self._result(conversation, answer)

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        conversation = to_conversation(messages)
        stream = self._store().stream_answer(conversation, **self._answer_options(stop, kwargs))
        for piece in stream:
            chunk = ChatGenerationChunk(message=AIMessageChunk(content=piece))
            if run_manager:
                run_manager.on_llm_new_token(piece, chunk=chunk)
            yield chunk
        assert stream.result is not None
        yield self._last_chunk(conversation, stream.result)

    async def _astream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        conversation = to_conversation(messages)
        # Tokens are produced on the store's worker thread and handed to the loop as they come.
        stream = (await self._astore()).astream_answer(conversation, **self._answer_options(stop, kwargs))
        async for piece in stream:
            chunk = ChatGenerationChunk(message=AIMessageChunk(content=piece))
            if run_manager:
                await run_manager.on_llm_new_token(piece, chunk=chunk)
            yield chunk
        assert stream.result is not None
        yield self._last_chunk(conversation, stream.result)


def to_conversation(messages: list[BaseMessage]) -> list[dict[str, str]]:
    """LangChain messages as chat-template messages {role, content}."""
    out = []
    for i, message in enumerate(messages):
        role = getattr(message, "role", None) if message.type == "chat" else _ROLES.get(message.type)
        if role is None:
            raise ValueError(f"message {i} has type {message.type!r}, which ChatMSA cannot map to a chat role; "
                             "use System/Human/AI/Tool messages or ChatMessage(role=...)")
        if isinstance(message.content, list):
            for block in message.content:
                kind = block.get("type") if isinstance(block, dict) else "text"
                if kind not in _TEXT_BLOCKS and kind in ("image", "image_url", "audio", "file", "video"):
                    raise ValueError(f"message {i} ({message.type}) holds a {kind!r} block; ChatMSA reads text "
                                     "only: describe it in text or use a multimodal chat model")
        out.append({"role": role, "content": message.text})
    return out
