"""`MemoryStore`: one model and one bank, safe to share between threads and asyncio tasks.

The LangChain and LlamaIndex adapters (and any server) wrap a MemoryStore instead of touching
MSAModel and MemoryBank directly. Every operation holds one lock, so a reader never sees a half-applied
update; the async methods run the same work on a single worker thread (answers on a pool, so that
concurrent ones can meet), so the event loop never blocks on the model. Greedy answers asked at the same time
with the same options are generated as one batch (inference/batcher.py).

Several processes. A store loaded from a folder (`MemoryStore.load(path)`) follows it: before each
operation it looks at the folder's CURRENT and, when another process saved a newer version and this store
has no unsaved changes, loads it. `save()` to that folder holds the bank's inter-process write lock and
refuses (BankConflictError) to save unsaved changes over a version this store has not seen. With
`write_through=True`, add() and delete() hold the lock across load-newest, change and save, so any number
of processes can write one bank and no document is lost.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, Callable, TypeVar

from .errors import BankError, InvalidInputError
from .inference.batcher import AnswerBatcher, batch_key
from .memory.bank import MemoryBank
from .memory.filters import Filter
from .memory.locking import bank_lock
from .memory.persist import current_name
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


_ANSWER_THREADS = 16  # concurrent aanswer calls that can meet in one batch
_BATCH_OPTIONS = frozenset(inspect.signature(MSAModel.answer_batch).parameters) - {"self", "questions", "bank"}


def _answer_batch_key(options: dict[str, Any]) -> Any:
    """Options answer_batch takes (others, e.g. interleave's, answer alone), greedy ones only (batch_key)."""
    return batch_key(options) if set(options) <= _BATCH_OPTIONS else None


class MemoryStore:
    def __init__(self, model: MSAModel | None = None, bank: MemoryBank | None = None) -> None:
        self.model = model or shared_default_model()
        self.bank = bank if bank is not None else self.model.new_bank()
        self.model.check_bank(self.bank)
        self._lock = threading.RLock()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="msa-store")
        # answers from several threads (or aanswer calls) that arrive together run as one batch
        self._batcher = AnswerBatcher(self._answer_rows, key=_answer_batch_key)
        self._answer_pool = ThreadPoolExecutor(max_workers=_ANSWER_THREADS, thread_name_prefix="msa-answer")
        self.path: Path | None = None  # the folder this store follows (set by load)
        self.write_through = False
        self._version: str | None = None  # the version of `path` the bank holds; None: unknown
        self._dirty = False  # changes not saved to `path` yet

    # ---- sync --------------------------------------------------------------------------

    def add(self, texts: Sequence[str], ids: Sequence[str] | None = None,
            metadatas: Sequence[dict[str, Any]] | None = None, *, show_progress_bar: bool | None = None
            ) -> list[str]:
        with self._lock, self._writing():
            return self.model.add(self.bank, texts, ids, metadatas, show_progress_bar=show_progress_bar)

    def delete(self, ids: Sequence[str]) -> int:
        with self._lock, self._writing():
            return self.bank.delete(ids)

    def get(self, ids: Sequence[str]) -> list[dict[str, Any]]:
        with self._lock:
            self.reload_if_newer()
            return self.bank.get(ids)

    def ids(self) -> list[str]:
        with self._lock:
            self.reload_if_newer()
            return self.bank.ids()

    def __len__(self) -> int:
        with self._lock:
            self.reload_if_newer()
            return len(self.bank)

    def retrieve(self, question: str | Sequence[str], k: int = 4, *, filter: Filter = None,
                 **kw: Any) -> list[RetrievedDocument] | list[list[RetrievedDocument]]:
        with self._lock:
            self.reload_if_newer()
            return self.model.retrieve(question, self.bank, k, filter=filter, **kw)

    def answer(self, question: str, **kw: Any) -> Answer:
        """The model's answer from this store's bank. Greedy calls made at the same time from several threads
        with the same options are generated as one batch (inference/batcher.py), with the same answers."""
        return self._batcher.submit(question, kw)

    def _answer_rows(self, questions: list[Any], options: dict[str, Any]) -> list[Answer]:
        with self._lock:
            self.reload_if_newer()
            if len(questions) == 1:
                return [self.model.answer(questions[0], self.bank, **options)]
            return self.model.answer_batch(questions, self.bank, **options)

    def stream_answer(self, question: str, **kw: Any) -> "LockedAnswerStream":
        """Text pieces; the lock is held until the stream ends, so the bank cannot change mid-answer.
        After iteration, `.result` holds the Answer (documents used, scores)."""
        with self._lock:
            self.reload_if_newer()
            return LockedAnswerStream(self._lock, partial(self.model.stream_answer, question, self.bank, **kw))

    def save(self, path: str | Path | None = None) -> Path:
        """Save the bank to `path` (default: the folder the store was loaded from).

        Saving to the store's own folder holds the bank's write lock; unsaved changes are never saved over
        a version another process wrote meanwhile (BankConflictError: reload and apply them again)."""
        with self._lock:
            if path is None and self.path is None:
                raise InvalidInputError("save() needs a path: this store was not loaded from a folder")
            target = self.path if path is None else Path(path)
            if self.path is None or os.path.realpath(target) != os.path.realpath(self.path):
                return self.bank.save(target)
            with bank_lock(self.path):
                self._check_not_behind()
                return self._save_own()

    @classmethod
    def load(cls, path: str | Path, model: MSAModel | None = None, *,
             write_through: bool = False) -> "MemoryStore":
        """A store over the bank saved at `path`, following newer versions other processes save there.
        write_through=True: add() and delete() save at once, under the bank's inter-process lock."""
        model = model or shared_default_model()
        version, bank = _load_versioned(model, Path(path))
        store = cls(model, bank)
        store.path, store.write_through, store._version = Path(path), write_through, version
        return store

    def reload_if_newer(self) -> bool:
        """Load the newest version of the store's folder if another process saved one since this store
        last read or wrote it; True when it did. A store holding unsaved changes keeps them instead."""
        with self._lock:
            if self.path is None or self._dirty:
                return False
            if self._version is not None and current_name(self.path) == self._version:
                return False
            version, bank = _load_versioned(self.model, self.path)
            self._version, self.bank = version, bank
            return True

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """Around a change: under write_through, newest version in, change, save, all under the lock."""
        if self.path is None or not self.write_through:
            before = self.bank.docstore  # every change swaps in a new tuple
            yield
            self._dirty = self._dirty or (self.path is not None and self.bank.docstore is not before)
            return
        with bank_lock(self.path):
            self.reload_if_newer()
            self._check_not_behind()
            before = self.bank.docstore
            yield
            if self.bank.docstore is not before or self._dirty:
                self._dirty = True
                self._save_own()

    def _check_not_behind(self) -> None:
        live = current_name(self.path)
        if self._dirty and live is not None and live != self._version:
            raise BankConflictError(
                f"another process saved {self.path} (version {live}) after this store loaded "
                f"{self._version or 'an earlier version'}; this store's unsaved changes were not saved over it. "
                "Call store.reload_if_newer() after discarding them (a new store: MemoryStore.load), apply them "
                "again, then save; or load the store with write_through=True"
            )

    def _save_own(self) -> Path:
        folder = self.bank.save(self.path)
        self._version, self._dirty = folder.name, False
        return folder

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
        # not on the one worker: concurrent aanswer calls must meet in the batcher
        return await asyncio.get_running_loop().run_in_executor(self._answer_pool, partial(self.answer, question, **kw))

    def astream_answer(self, question: str, **kw: Any) -> "AsyncAnswerStream":
        """`async for piece in store.astream_answer(q)`; `.result` holds the Answer afterwards."""
        return AsyncAnswerStream(self, self.stream_answer(question, **kw))


class BankConflictError(BankError):
    """Unsaved changes of a store would overwrite a version of its folder that another process saved."""


def _load_versioned(model: MSAModel, path: Path) -> tuple[str | None, MemoryBank]:
    """(version name or None when a writer switched versions during the load, the loaded bank)."""
    before = current_name(path)
    bank = model.load_bank(path)
    return (before if current_name(path) == before else None), bank


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
