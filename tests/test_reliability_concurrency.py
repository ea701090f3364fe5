"""One engine shared by many async callers: the LangChain and LlamaIndex retrievers, 100 queries each,
mixed with adds, upserts and deletes in one asyncio.gather.

Every query asks for more documents than the bank holds, so each answer is the whole bank as that
query saw it. Writes come in batches (one call each), so "no half-applied update" reads: every batch
is wholly visible or wholly invisible in every answer. Then: documents deleted before the batch never
come back, texts always match their ids and versions, the final bank is the expected one and survives
save and load (checksums verified), the event loop kept ticking, and the store was touched only on its
worker thread, never on the loop.
"""

from __future__ import annotations

import asyncio
import random
import threading

import pytest
from heartbeat import ticks_during

from msa_core import MSAConfig, MSAModel
from msa_core.memory.bank import MemoryBank
from msa_core.store import MemoryStore

READERS = 100
SEED = 1234
K = 100  # more than the bank ever holds: an answer is the whole bank as the query saw it
BASE = [f"b{i}" for i in range(20)]
DELETED_BEFORE = ["b18", "b19"]
DELETE_BATCHES = [["b0", "b1"], ["b2", "b3"], ["b4", "b5"], ["b6", "b7"], ["b8", "b9"]]
UPSERT_BATCHES = [["b10", "b11", "u0"], ["b12", "b13", "u1"], ["b14", "b15", "u2"]]
ADD_BATCHES = [[f"n{b}_{j}" for j in range(3)] for b in range(7)]
STORE_METHODS = ("add", "delete", "get", "ids", "retrieve")


def text_of(doc_id: str, version: int = 1) -> str:
    return f"{'updated' if version == 2 else 'original'} text of document {doc_id}, about item {doc_id[1:]}."


@pytest.fixture(scope="module")
def tiny(tiny_model_dir) -> MSAModel:
    return MSAModel.from_pretrained(tiny_model_dir("llama"), config=MSAConfig(encode={"chunk_size": 4}))


@pytest.fixture
def store(tiny) -> MemoryStore:
    s = MemoryStore(tiny)
    yield s
    s._worker.shutdown(wait=True)


def record_threads(store: MemoryStore, monkeypatch) -> list[tuple[str, str]]:
    """(method, thread name) of every MemoryStore call from now on."""
    calls: list[tuple[str, str]] = []
    for name in STORE_METHODS:
        original = getattr(store, name)

        def recorded(*args, _name=name, _original=original, **kwargs):
            calls.append((_name, threading.current_thread().name))
            return _original(*args, **kwargs)

        monkeypatch.setattr(store, name, recorded)
    return calls


def check_answer(seen: dict[str, str]) -> None:
    """One answer ({id: text}) is the bank after some prefix of the writes, in some serial order."""
    assert not set(seen) & set(DELETED_BEFORE), "a document deleted before the batch came back"
    known = set(BASE) | {i for b in UPSERT_BATCHES + ADD_BATCHES for i in b}
    assert set(seen) <= known
    for batch in DELETE_BATCHES + ADD_BATCHES:
        assert len(set(batch) & set(seen)) in (0, len(batch)), f"half-applied batch {batch}: saw {sorted(seen)}"
    for batch in UPSERT_BATCHES:
        old, new = batch[:2], batch[2]
        applied = new in seen
        for doc_id in old:
            assert seen[doc_id] == text_of(doc_id, 2 if applied else 1), f"half-applied upsert {batch}"
    for doc_id, text in seen.items():
        if doc_id not in {i for b in UPSERT_BATCHES for i in b[:2]}:
            assert text == text_of(doc_id), doc_id


def expected_final() -> dict[str, str]:
    final = {i: text_of(i) for i in BASE if i not in DELETED_BEFORE}
    for batch in DELETE_BATCHES:
        for i in batch:
            del final[i]
    for batch in UPSERT_BATCHES:
        final.update({i: text_of(i, 2) for i in batch[:2]})
        final[batch[2]] = text_of(batch[2])
    for batch in ADD_BATCHES:
        final.update({i: text_of(i) for i in batch})
    return final


def shuffled(calls: list, seed: str) -> list:
    random.Random(f"{SEED}-{seed}").shuffle(calls)
    return calls


def check_saved(store: MemoryStore, tmp_path) -> None:
    store.save(tmp_path / "bank")
    again = MemoryBank.load(tmp_path / "bank")  # verifies the checksums
    assert again.ids() == store.ids() and again.docstore == store.bank.docstore
    assert all(bool((getattr(again, n) == getattr(store.bank, n)).all()) for n in ("k_bar", "v_bar", "kr_bar"))


def test_langchain_retriever_under_concurrent_writes(store, monkeypatch, tmp_path):
    from msa_integrations.langchain import MSARetriever, MSAVectorStore

    vs = MSAVectorStore(store=store)
    vs.add_texts([text_of(i) for i in BASE], [{"kind": "base"} for _ in BASE], ids=BASE)
    vs.delete(DELETED_BEFORE)
    retriever = MSARetriever(store=store, k=K)
    calls = record_threads(store, monkeypatch)

    async def scenario():
        queries = [retriever.ainvoke(f"what is item {i % 23}?") for i in range(READERS)]
        writes = ([vs.aadd_texts([text_of(i) for i in b], ids=b) for b in ADD_BATCHES]
                  + [vs.aadd_texts([text_of(b[0], 2), text_of(b[1], 2), text_of(b[2])], ids=b) for b in UPSERT_BATCHES]
                  + [vs.adelete(b) for b in DELETE_BATCHES])
        return await ticks_during(asyncio.gather(*shuffled(queries + writes, "langchain")))

    ticks, results = asyncio.run(scenario())
    calls = list(calls)  # the calls made during the batch (the checks below call the store too)
    answers = [r for r in results if isinstance(r, list) and (not r or hasattr(r[0], "page_content"))]
    assert len(answers) == READERS
    for docs in answers:
        seen = {d.id: d.page_content for d in docs}
        assert len(seen) == len(docs)
        check_answer(seen)
    assert {d.id: d.page_content for d in vs.get_by_ids(store.ids())} == expected_final()
    assert ticks > 20, "the event loop was blocked while the model worked"
    assert calls and all(thread.startswith("msa-store") for _, thread in calls), calls
    check_saved(store, tmp_path)


def test_llama_index_retriever_under_concurrent_writes(store, monkeypatch, tmp_path):
    from llama_index.core.schema import NodeRelationship, RelatedNodeInfo, TextNode

    from msa_integrations.llama_index import MSARetriever, MSAVectorStore

    def node(doc_id: str, version: int = 1) -> TextNode:
        ref = f"src{int(doc_id[1:]) // 2}" if doc_id.startswith("b") else f"src-{doc_id}"
        return TextNode(id_=doc_id, text=text_of(doc_id, version), metadata={"kind": doc_id[0]},
                        relationships={NodeRelationship.SOURCE: RelatedNodeInfo(node_id=ref)})

    vs = MSAVectorStore(store, set_embed_model=False)
    vs.add([node(i) for i in BASE])
    vs.delete("src9")  # b18 and b19
    retriever = MSARetriever(vs, similarity_top_k=K)
    calls = record_threads(store, monkeypatch)

    async def scenario():
        queries = [retriever.aretrieve(f"what is item {i % 23}?") for i in range(READERS)]
        listings = [vs.aget_nodes() for _ in range(5)]
        writes = ([vs.async_add([node(i) for i in b]) for b in ADD_BATCHES]
                  + [vs.async_add([node(b[0], 2), node(b[1], 2), node(b[2])]) for b in UPSERT_BATCHES]
                  + [vs.adelete(f"src{int(b[0][1:]) // 2}") for b in DELETE_BATCHES[:4]]  # by source document
                  + [vs.adelete_nodes(DELETE_BATCHES[4])])  # by node id
        return await ticks_during(asyncio.gather(*shuffled(queries + listings + writes, "llama_index")))

    ticks, results = asyncio.run(scenario())
    calls = list(calls)  # the calls made during the batch (the checks below call the store too)
    answers = [r for r in results if isinstance(r, list) and r and hasattr(r[0], "score")]
    listings = [r for r in results if isinstance(r, list) and r and isinstance(r[0], TextNode)]
    assert len(answers) == READERS and len(listings) == 5
    for nodes in answers + listings:
        seen = {(n.node if hasattr(n, "node") else n).node_id: (n.node if hasattr(n, "node") else n).get_content()
                for n in nodes}
        assert len(seen) == len(nodes)
        check_answer(seen)
    assert {n.node_id: n.get_content() for n in vs.get_nodes()} == expected_final()
    assert ticks > 20, "the event loop was blocked while the model worked"
    assert calls and all(thread.startswith("msa-store") for _, thread in calls), calls
    check_saved(store, tmp_path)
