"""Concurrent answers become one batch: `AnswerBatcher` gathers `answer` calls that arrive together from
several threads (LangChain's `batch`/`abatch`, a web server's request threads) and runs them as one
`answer_batch` generation, where each row routes on its own.

    batcher = AnswerBatcher(lambda questions, options: model.answer_batch(questions, bank, **options))
    answer = batcher.submit("Who wrote it?", {"mode": "latent", "max_new_tokens": 64})  # from any thread

Only calls with equal options share a batch, and only greedy ones (temperature 0): a batch then answers
exactly as each call alone would (`answer_batch`'s contract). The first waiting caller leads: it waits
`wait_s` for others to join, runs the batch and hands each caller its answer; one batch runs at a time.
If a batch fails, its calls run one by one, so a bad question gets its own error and the others their
answers. Imports nothing of the engine: the caller passes the function that answers a batch.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

RunBatch = Callable[[list[Any], dict[str, Any]], Sequence[Any]]


@dataclass
class _Call:
    key: Hashable | None  # None: never shares a batch
    question: Any
    options: dict[str, Any]
    future: Future = field(default_factory=Future)


def batch_key(options: dict[str, Any]) -> Hashable | None:
    """Calls with equal keys may share a batch; None for sampled answers or options that cannot be compared."""
    if float(options.get("temperature") or 0.0) != 0.0:
        return None
    try:
        return repr(sorted(options.items()))  # filters are dicts: compare their text form
    except TypeError:
        return None


class AnswerBatcher:
    def __init__(self, run_batch: RunBatch, *, max_batch: int = 16, wait_s: float = 0.002,
                 key: Callable[[dict[str, Any]], Hashable | None] = batch_key) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self._run_batch, self.max_batch, self.wait_s, self._key = run_batch, max_batch, wait_s, key
        self._pending: list[_Call] = []
        self._mutex = threading.Lock()  # guards _pending
        self._leading = threading.Lock()  # held by the caller running a batch
        self.batches: list[int] = []  # sizes of the batches run (for tests and stats)

    def submit(self, question: Any, options: dict[str, Any]) -> Any:
        """The answer to `question`, maybe computed in a batch with other threads' calls; blocks until done."""
        call = _Call(self._key(options), question, dict(options))
        with self._mutex:
            self._pending.append(call)
        while not call.future.done():
            if self._leading.acquire(blocking=False):
                try:
                    if not call.future.done():
                        self._lead()
                finally:
                    self._leading.release()
            else:
                try:
                    call.future.result(timeout=0.01)  # another caller leads; wake up to lead next
                except TimeoutError:
                    pass
                except Exception:  # noqa: BLE001 - raised below, in this caller's own frame
                    break
        return call.future.result()

    def _lead(self) -> None:
        time.sleep(self.wait_s)  # let callers that arrive together join
        with self._mutex:
            first = self._pending[0]
            batch = [first] if first.key is None else [c for c in self._pending if c.key == first.key]
            batch = batch[: self.max_batch]
            taken = {id(c) for c in batch}
            self._pending = [c for c in self._pending if id(c) not in taken]
        self.batches.append(len(batch))
        try:
            answers = list(self._run_batch([c.question for c in batch], batch[0].options))
            if len(answers) != len(batch):
                raise RuntimeError(f"answer_batch returned {len(answers)} answers for {len(batch)} questions")
        except Exception as exc:  # noqa: BLE001 - each call gets its own outcome below
            if len(batch) == 1:
                batch[0].future.set_exception(exc)
                return
            for c in batch:  # one bad question must not fail the others
                self._run_alone(c)
            return
        for c, a in zip(batch, answers):
            c.future.set_result(a)

    def _run_alone(self, call: _Call) -> None:
        try:
            call.future.set_result(self._run_batch([call.question], call.options)[0])
        except Exception as exc:  # noqa: BLE001
            call.future.set_exception(exc)
