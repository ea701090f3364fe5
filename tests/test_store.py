"""MemoryStore: the thread- and asyncio-safe wrapper the adapters share."""

from __future__ import annotations

import asyncio
import threading

import pytest
from heartbeat import ticks_during

from msa_core import MSAConfig, MSAModel
from msa_core.store import MemoryStore

DOCS = ["The lighthouse was built in 1887 by Ada Quist.", "Ferries leave at seven.", "Paris is in France."]


@pytest.fixture
def store(tiny_model_dir) -> MemoryStore:
    model = MSAModel.from_pretrained(tiny_model_dir("llama"), config=MSAConfig(encode={"chunk_size": 4}))
    s = MemoryStore(model)
    s.add(DOCS, ids=["a", "b", "c"])
    return s


def test_sync_operations(store, tmp_path):
    assert len(store) == 3 and store.ids() == ["a", "b", "c"]
    assert len(store.retrieve("lighthouse", k=2)) == 2
    assert store.delete(["c"]) == 1 and len(store) == 2
    store.save(tmp_path / "bank")
    again = MemoryStore.load(tmp_path / "bank", model=store.model)
    assert again.ids() == ["a", "b"]
    stream = store.stream_answer("Who built it?", max_new_tokens=4)
    assert "".join(stream) == stream.result.text


def test_async_calls_do_not_block_the_loop_and_see_whole_updates(store):
    async def work():
        reads = [store.aretrieve("lighthouse", k=10) for _ in range(10)]
        writes = [store.aadd([f"new doc {i}"], ids=[f"n{i}"]) for i in range(3)]
        results = await asyncio.gather(*reads, *writes, store.adelete(["b"]))
        stream = store.astream_answer("Who?", max_new_tokens=3)
        pieces = [p async for p in stream]
        return results, pieces, stream.result

    async def scenario():
        ticks, (results, pieces, answer) = await ticks_during(work())
        return ticks, results, pieces, answer

    ticks, results, pieces, answer = asyncio.run(scenario())
    assert ticks > 5  # the loop kept running while the model worked
    for hits in results[:10]:
        ids = {h.id for h in hits}
        assert {"a", "c"} <= ids  # never a half-applied bank: base documents always present
    assert "".join(pieces) == answer.text
    assert {"n0", "n1", "n2"} <= set(store.ids()) and "b" not in store.ids()


def test_threads_share_one_store(store):
    errors = []

    def work(i):
        try:
            store.add([f"thread doc {i}"], ids=[f"t{i}"])
            store.retrieve("doc", k=3)
        except Exception as e:  # collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(store) == 9


def test_concurrent_answers_are_generated_as_one_batch_with_the_same_answers(store):
    questions = ["Who built the lighthouse?", "When do ferries leave?", "Where is Paris?", "Who?"]
    alone = [store.answer(q, max_new_tokens=6, k=2) for q in questions]
    store._batcher.wait_s = 0.05  # a wide window, so the threads surely meet
    before = len(store._batcher.batches)
    got = [None] * len(questions)
    start = threading.Barrier(len(questions))

    def work(i):
        start.wait()
        got[i] = store.answer(questions[i], max_new_tokens=6, k=2)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(questions))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert max(store._batcher.batches[before:]) > 1
    assert [a.text for a in got] == [a.text for a in alone]
    assert [a.doc_ids for a in got] == [a.doc_ids for a in alone]


def test_concurrent_aanswer_calls_meet_in_a_batch(store):
    store._batcher.wait_s = 0.05

    async def work():
        return await asyncio.gather(*[store.aanswer(q, max_new_tokens=4) for q in ("Who?", "When?", "Where?")])

    before = len(store._batcher.batches)
    answers = asyncio.run(work())
    assert len(answers) == 3 and max(store._batcher.batches[before:]) > 1
