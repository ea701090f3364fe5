"""`MemoryStore`: one model and one bank, safe to share between threads and asyncio tasks.

The LangChain and LlamaIndex adapters (and any server) wrap a MemoryStore instead of touching
MSAModel and MemoryBank directly. Every operation holds one lock, so a reader never sees a half-applied
update; the async methods run the same work on a single worker thread, so the event loop never blocks
on the model.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, Callable, TypeVar

from .memory.bank import MemoryBank
from .memory.filters import Filter
from .model import Answer, AnswerStream, MSAModel, RetrievedDocument

T = TypeVar("T")
_DEFAULT_LOCK = threading.Lock()
_DEFAULT_MODEL: MSAModel | None = None


def shared_default_model() -> MSAModel:
    """The embedded default model, loaded once per process and shared by every default store."""
    global _DEFAULT_MODEL
    with _DEFAULT_LOCK:
        if _DEFAULT_MODEL is None:
            _DEFAULT_MODEL = MSAModel.from_pretrained("default")
        return _DEFAULT_MODEL


class MemoryStore:
    def __init__(self, model: MSAModel | None = None, bank: MemoryBank | None = None) -> None:
        self.model = model or shared_default_model()
        self.bank = bank if bank is not None else self.model.new_bank()
        self.model.check_bank(self.bank)
        self._lock = threading.RLock()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="msa-store")

    # ---- sync --------------------------------------------------------------------------

    def add(self, texts: Sequence[str], ids: Sequence[str] | None = None,
            metadatas: Sequence[dict[str, Any]] | None = None, *, show_progress_bar: bool | None = None
            ) -> list[str]:
        with self._lock:
            return self.model.add(self.bank, texts, ids, metadatas, show_progress_bar=show_progress_bar)

    def delete(self, ids: Sequence[str]) -> int:
        with self._lock:
            return self.bank.delete(ids)

    def get(self, ids: Sequence[str]) -> list[dict[str, Any]]:
        with self._lock:
            return self.bank.get(ids)

    def ids(self) -> list[str]:
        with self._lock:
            return self.bank.ids()

    def __len__(self) -> int:
        with self._lock:
            return len(self.bank)

    def retrieve(self, question: str | Sequence[str], k: int = 4, *, filter: Filter = None,
                 **kw: Any) -> list[RetrievedDocument] | list[list[RetrievedDocument]]:
        with self._lock:
            return self.model.retrieve(question, self.bank, k, filter=filter, **kw)

    def answer(self, question: str, **kw: Any) -> Answer:
        with self._lock:
            return self.model.answer(question, self.bank, **kw)

    def stream_answer(self, question: str, **kw: Any) -> "LockedAnswerStream":
        """Text pieces; the lock is held until the stream ends, so the bank cannot change mid-answer.
        After iteration, `.result` holds the Answer (documents used, scores)."""
        return LockedAnswerStream(self._lock, partial(self.model.stream_answer, question, self.bank, **kw))

    def save(self, path: str | Path) -> Path:
        with self._lock:
            return self.bank.save(path)

    @classmethod
    def load(cls, path: str | Path, model: MSAModel | None = None) -> "MemoryStore":
        model = model or shared_default_model()
        return cls(model, model.load_bank(path))

    def locked(self) -> threading.RLock:
        """`with store.locked(): ...` reads the bank and routes against one bank version (re-entrant)."""
        return self._lock

    # ---- async: the same work on the store's worker thread ------------------------------

    async def run_async(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        """Run any function on the store's worker thread, so the event loop never waits on the model."""
        return await asyncio.get_running_loop().run_in_executor(self._worker, partial(fn, *args, **kw))

    _run = run_async

    async def aadd(self, *args: Any, **kw: Any) -> list[str]:
        return await self._run(self.add, *args, **kw)

    async def adelete(self, ids: Sequence[str]) -> int:
        return await self._run(self.delete, ids)

    async def aretrieve(self, *args: Any, **kw: Any):
        return await self._run(self.retrieve, *args, **kw)

    async def aanswer(self, question: str, **kw: Any) -> Answer:
        return await self._run(self.answer, question, **kw)

    def astream_answer(self, question: str, **kw: Any) -> "AsyncAnswerStream":
        """`async for piece in store.astream_answer(q)`; `.result` holds the Answer afterwards."""
        return AsyncAnswerStream(self, self.stream_answer(question, **kw))


class LockedAnswerStream:
    def __init__(self, lock: threading.RLock, make: Callable[[], AnswerStream]) -> None:
        self._lock, self._make = lock, make
        self.result: Answer | None = None

    def __iter__(self) -> Iterator[str]:
        with self._lock:
            inner = self._make()
            yield from inner
            self.result = inner.result

    def collect(self) -> Answer:
        for _ in self:
            pass
        assert self.result is not None
        return self.result


class AsyncAnswerStream:
    """Pieces produced on the store's worker thread, handed to the event loop as they come."""

    def __init__(self, store: MemoryStore, stream: LockedAnswerStream) -> None:
        self._store, self._stream = store, stream
        self.result: Answer | None = None

    async def __aiter__(self) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        done = object()

        def produce() -> None:
            try:
                for piece in self._stream:
                    loop.call_soon_threadsafe(queue.put_nowait, piece)
            except BaseException as e:  # handed to the consumer and raised there
                loop.call_soon_threadsafe(queue.put_nowait, e)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, done)

        future = loop.run_in_executor(self._store._worker, produce)
        while (item := await queue.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
        await future
        self.result = self._stream.result
