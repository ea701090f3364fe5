"""LangChain adapters on a tiny random model: ids, upsert, delete, filters, scores, MMR, persistence,
async off the event loop, chat model, RAG chain. The standard suites on the real model are in
test_langchain_standard.py."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from heartbeat import ticks_during
from langchain_chat_flags import ChatMSASuiteFlags
from langchain_core.documents import Document
from langchain_core.language_models.fake_chat_models import ParrotFakeChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, SystemMessage
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.vectorstores import VectorStoreRetriever
from langchain_tests.unit_tests import ChatModelUnitTests

from msa_core import InvalidInputError, MSAConfig, MSAModel
from msa_core.store import MemoryStore
from msa_integrations.langchain import ChatMSA, MSARetriever, MSAVectorStore, build_rag_chain, format_docs
from msa_integrations.langchain.chat_models import to_conversation

TEXTS = ["The lighthouse was built in 1887 by Ada Quist.", "Ferries leave the harbour at seven.",
         "Paris is the capital of France.", "Memory sparse attention routes a question.",
         "The engineer Ada Quist also built the pier."]
IDS = ["light", "ferry", "paris", "msa", "pier"]
METAS = [{"topic": "town", "year": 1887}, {"topic": "travel", "year": 2020}, {"topic": "geo", "year": 1900},
         {"topic": "ml", "year": 2025}, {"topic": "town", "year": 1890}]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir) -> MSAModel:
    return MSAModel.from_pretrained(tiny_model_dir("llama"), config=MSAConfig(encode={"chunk_size": 4}))


@pytest.fixture
def vs(tiny) -> MSAVectorStore:
    return MSAVectorStore.from_texts(TEXTS, None, metadatas=METAS, ids=IDS, model=tiny)


def _on_worker_thread(store: MemoryStore, monkeypatch, method: str, delay: float = 0.2) -> list[str]:
    """Wrap store.<method> to record the thread it runs on and block that thread for `delay` s."""
    threads: list[str] = []
    original = getattr(store, method)

    def slow(*args, **kwargs):
        threads.append(threading.current_thread().name)
        time.sleep(delay)  # a blocking call: it would freeze the loop if run on it
        return original(*args, **kwargs)

    monkeypatch.setattr(store, method, slow)
    return threads


# ---- MSARetriever -----------------------------------------------------------------------------

def test_retriever_documents_carry_ids_and_scores(tiny):
    retriever = MSARetriever.from_texts(TEXTS, k=3, metadatas=METAS, ids=IDS, model=tiny)
    docs = retriever.invoke("Who built the lighthouse?")
    assert len(docs) == 3 and len({d.id for d in docs}) == 3 and {d.id for d in docs} <= set(IDS)
    for d in docs:
        assert -1.0 <= d.metadata["score"] <= 1.0
        assert d.metadata["relevance_score"] == pytest.approx((d.metadata["score"] + 1) / 2, abs=1e-6)
        assert d.page_content == TEXTS[IDS.index(d.id)] and d.metadata["topic"] == METAS[IDS.index(d.id)]["topic"]
    scores = [d.metadata["score"] for d in docs]
    assert scores == sorted(scores, reverse=True)
    assert [d.id for d in retriever.invoke("Who built the lighthouse?", k=1)] == [docs[0].id]
    assert len(retriever.invoke("Who built the lighthouse?", k=10)) == len(TEXTS)  # no threshold


def test_retriever_layer_scores_and_constructors(tiny):
    store = MemoryStore(tiny)
    store.add(TEXTS, IDS, METAS)
    by_store = MSARetriever(store=store, k=2, layer_scores=True)
    by_model = MSARetriever(model=tiny, bank=store.bank, k=2)
    by_vs = MSARetriever(store=MSAVectorStore(store), k=2)
    doc = by_store.invoke("ferry")[0]
    assert set(doc.metadata["layer_scores"]) == {str(layer) for layer in tiny.layers}
    mean = sum(doc.metadata["layer_scores"].values()) / len(tiny.layers)
    assert doc.metadata["score"] == pytest.approx(mean, abs=1e-5)  # the default layer aggregate
    assert by_vs.store is store
    assert [d.id for d in by_model.invoke("ferry")] == [d.id for d in by_store.invoke("ferry")]
    assert "layer_scores" not in by_model.invoke("ferry")[0].metadata
    with pytest.raises(ValueError, match="not both"):
        MSARetriever(store=store, model=tiny)


def test_retriever_filters_apply_before_routing(tiny):
    retriever = MSARetriever.from_texts(TEXTS, k=2, metadatas=METAS, ids=IDS, model=tiny)
    unfiltered = retriever.invoke("Who built the lighthouse?", k=len(TEXTS))
    best = unfiltered[0].id
    keep = [i for i in IDS if i != best]
    # A post-filter over k=2 results would return 1 document; a pre-routing mask returns 2.
    by_dict = retriever.invoke("Who built the lighthouse?", filter={"topic": {"$ne": METAS[IDS.index(best)]["topic"]},
                                                                    "year": {"$gte": 0}})
    assert len(by_dict) == 2 and best not in {d.id for d in by_dict}
    by_callable = MSARetriever(store=retriever.store, k=2, filter=lambda m: m["year"] != METAS[IDS.index(best)]["year"])
    got = by_callable.invoke("Who built the lighthouse?")
    assert [d.id for d in got] == [d.id for d in unfiltered if d.id in keep][:2]
    assert retriever.invoke("x", filter={"topic": "none"}) == []
    with pytest.raises(ValueError, match=r"\$bogus"):  # pydantic wraps the engine's InvalidInputError
        MSARetriever(store=retriever.store, filter={"year": {"$bogus": 1}})


def test_retriever_ainvoke_runs_off_the_loop(tiny, monkeypatch):
    retriever = MSARetriever.from_texts(TEXTS, k=2, ids=IDS, model=tiny)
    threads = _on_worker_thread(retriever.store, monkeypatch, "retrieve")
    ticks, docs = asyncio.run(ticks_during(retriever.ainvoke("lighthouse"), interval=0.005))
    assert len(docs) == 2 and docs[0].metadata["relevance_score"] >= docs[1].metadata["relevance_score"]
    assert threads and all(name.startswith("msa-store") for name in threads)
    assert ticks >= 10  # ~40 heartbeats fit in the 0.2 s the engine call blocked its thread


# ---- MSAVectorStore ---------------------------------------------------------------------------

def test_ids_generated_honoured_and_upserted(tiny):
    vs = MSAVectorStore(model=tiny)
    assert vs.similarity_search("anything") == [] and vs.embeddings is None
    docs = [Document(page_content=TEXTS[0], metadata={"n": 1}, id="given"), Document(page_content=TEXTS[1])]
    ids = vs.add_documents(docs)
    assert ids[0] == "given" and isinstance(ids[1], str) and ids[1]
    assert docs[1].id is None  # inputs are not mutated
    vs.add_documents([Document(page_content="Rewritten text.", metadata={"n": 2})], ids=["given"])
    assert vs.store.ids() == [ids[1], "given"]  # replaced, not duplicated
    assert vs.get_by_ids(["given"]) == [Document(id="given", page_content="Rewritten text.", metadata={"n": 2})]
    assert vs.add_texts([]) == []


def test_delete_and_get_by_ids(vs):
    assert [d.id for d in vs.get_by_ids(["pier", "nope", "light"])] == ["pier", "light"]  # order kept
    assert vs.get_by_ids(["nope"]) == []
    assert vs.delete(["light", "missing"]) is True
    assert "light" not in vs.store.ids() and len(vs.store) == 4
    assert "light" not in {d.id for d in vs.similarity_search("lighthouse", k=10)}
    with pytest.raises(ValueError, match="needs the ids"):
        vs.delete()


def test_scores_raw_and_relevance(vs):
    raw = vs.similarity_search_with_score("Who built the lighthouse?", k=5)
    rel = vs.similarity_search_with_relevance_scores("Who built the lighthouse?", k=5)
    assert [d.id for d, _ in raw] == [d.id for d, _ in rel]
    for (doc, s), (_, r) in zip(raw, rel, strict=True):
        assert "score" not in doc.metadata  # plain metadata, as FAISS/Chroma return it
        assert 0.0 <= r <= 1.0 and r == pytest.approx((s + 1) / 2, abs=1e-6)
        assert vs._select_relevance_score_fn()(s) == pytest.approx(r, abs=1e-6)
    threshold = (rel[1][1] + rel[2][1]) / 2
    kept = vs.similarity_search_with_relevance_scores("Who built the lighthouse?", k=5, score_threshold=threshold)
    assert [d.id for d, _ in kept] == [d.id for d, _ in rel[:2]]


def test_vectorstore_filters(vs):
    town = vs.similarity_search("Ada Quist", k=5, filter={"topic": "town"})
    assert {d.id for d in town} == {"light", "pier"}
    old = vs.similarity_search("Ada Quist", k=5, filter=lambda m: m["year"] < 1895)
    assert {d.id for d in old} == {"light", "pier"}
    assert {d.id for d in vs.max_marginal_relevance_search("Ada", k=5, filter={"topic": "town"})} == {"light", "pier"}


def test_as_retriever_search_types(vs):
    sim = vs.as_retriever(search_kwargs={"k": 2})
    assert isinstance(sim, VectorStoreRetriever)
    assert [d.id for d in sim.invoke("ferry")] == [d.id for d in vs.similarity_search("ferry", k=2)]
    mmr = vs.as_retriever(search_type="mmr", search_kwargs={"k": 3, "fetch_k": 5})
    assert len(mmr.invoke("ferry")) == 3
    rel = vs.similarity_search_with_relevance_scores("ferry", k=5)
    cut = vs.as_retriever(search_type="similarity_score_threshold",
                          search_kwargs={"k": 5, "score_threshold": float(rel[0][1])})
    assert [d.id for d in cut.invoke("ferry")] == [rel[0][0].id]


def test_fusion_through_search_kwargs_and_the_retriever(vs):
    q = "Who built the lighthouse?"
    for alpha in (0.0, 0.5, 1.0):
        hits = vs.store.retrieve(q, k=3, fusion="bm25", alpha=alpha)
        docs = vs.as_retriever(search_kwargs={"k": 3, "fusion": "bm25", "alpha": alpha}).invoke(q)
        assert [d.id for d in docs] == [h.id for h in hits]
        assert [d.metadata["latent_score"] for d in docs] == pytest.approx([h.latent_score for h in hits])
        assert [d.metadata["lexical_score"] for d in docs] == pytest.approx([h.lexical_score for h in hits])
        pairs = vs.similarity_search_with_score(q, k=3, fusion="bm25", alpha=alpha)
        assert [s for _, s in pairs] == pytest.approx([h.score for h in hits])  # the fused score
        retrieved = MSARetriever(store=vs, k=3, fusion="bm25", alpha=alpha).invoke(q)
        assert [d.id for d in retrieved] == [h.id for h in hits]
        assert [d.metadata["score"] for d in retrieved] == pytest.approx([h.score for h in hits])
    plain = vs.similarity_search(q, k=5)
    assert "latent_score" not in plain[0].metadata  # no fusion: no side scores
    fused = vs.similarity_search(q, k=5, fusion="bm25", alpha=1.0)
    assert [d.id for d in fused] == [d.id for d in plain]
    per_call = MSARetriever(store=vs, k=1).invoke("lighthouse 1887", fusion="bm25", alpha=0.0)
    assert [d.id for d in per_call] == ["light"]


def test_mmr_prefers_diversity(tiny):
    texts = TEXTS + [TEXTS[0]]  # an exact duplicate of the lighthouse document
    vs = MSAVectorStore.from_texts(texts, ids=IDS + ["light-copy"], model=tiny)
    plain = [d.id for d in vs.similarity_search("Who built the lighthouse?", k=6)]
    assert [d.id for d in vs.max_marginal_relevance_search("Who built the lighthouse?", k=6, fetch_k=6,
                                                            lambda_mult=1.0)] == plain
    diverse = [d.id for d in vs.max_marginal_relevance_search("Who built the lighthouse?", k=2, fetch_k=6,
                                                               lambda_mult=0.0)]
    assert diverse[0] == plain[0] and {"light", "light-copy"} - set(diverse)  # never both copies
    with pytest.raises(NotImplementedError, match="no embedding vectors"):
        vs.similarity_search_by_vector([0.1, 0.2])
    with pytest.raises(NotImplementedError, match="max_marginal_relevance_search"):
        vs.max_marginal_relevance_search_by_vector([0.1, 0.2])


def test_save_local_load_local_round_trip(vs, tiny, tmp_path):
    vs.save_local(tmp_path / "bank")
    assert not list(tmp_path.rglob("*.pkl"))
    again = MSAVectorStore.load_local(tmp_path / "bank", None, allow_dangerous_deserialization=True, model=tiny)
    assert again.store.ids() == vs.store.ids()
    q = "When do the ferries leave?"
    assert vs.similarity_search_with_score(q, k=5) == again.similarity_search_with_score(q, k=5)
    assert again.get_by_ids(["paris"])[0].metadata == {"topic": "geo", "year": 1900}


def test_constructors_and_engine_options(tiny):
    docs = [Document(page_content=t, metadata=m, id=i) for t, m, i in zip(TEXTS, METAS, IDS, strict=True)]
    vs = MSAVectorStore.from_documents(docs, model=tiny)
    assert vs.store.ids() == IDS
    vs2 = MSAVectorStore.from_texts(TEXTS, object(), model=tiny)  # any embedding is ignored
    assert len(vs2.store) == len(TEXTS)
    assert MSARetriever.from_documents(docs, k=1, model=tiny).invoke("ferry")[0].id in IDS
    with pytest.raises(TypeError, match="unknown engine option"):
        MSAVectorStore(modle=tiny)
    with pytest.raises(TypeError, match="already loaded"):
        MSAVectorStore(model=tiny, device="cpu")


def test_async_vectorstore_methods_run_on_the_store_worker(vs, monkeypatch):
    async def scenario():
        ids = await vs.aadd_texts(["Bread is baked at dawn."], metadatas=[{"topic": "food"}], ids=["bread"])
        got = await vs.aget_by_ids(["bread", "missing"])
        found = await vs.asimilarity_search("bread", k=2)
        scored = await vs.asimilarity_search_with_score("bread", k=2)
        rel = await vs.asimilarity_search_with_relevance_scores("bread", k=2)
        mmr = await vs.amax_marginal_relevance_search("bread", k=2, fetch_k=4)
        await vs.adelete(["bread"])
        return ids, got, found, scored, rel, mmr

    threads = _on_worker_thread(vs.store, monkeypatch, "get", delay=0.0)
    ids, got, found, scored, rel, mmr = asyncio.run(scenario())
    assert ids == ["bread"] and [d.id for d in got] == ["bread"]
    assert len(found) == len(scored) == len(rel) == len(mmr) == 2
    assert all(0 <= r <= 1 for _, r in rel)
    assert "bread" not in vs.store.ids()
    assert threads and all(name.startswith("msa-store") for name in threads)


def test_async_search_does_not_block_the_loop(vs, monkeypatch):
    threads = _on_worker_thread(vs.store, monkeypatch, "retrieve")
    ticks, docs = asyncio.run(ticks_during(vs.asimilarity_search("ferry", k=2), interval=0.005))
    assert len(docs) == 2 and ticks >= 10 and all(n.startswith("msa-store") for n in threads)


# ---- ChatMSA ----------------------------------------------------------------------------------

def test_chat_latent_reports_documents_and_streams(vs):
    chat = ChatMSA(store=vs, max_new_tokens=6, k=2)
    msg = chat.invoke([SystemMessage("Be brief."), HumanMessage("Who built the lighthouse?")])
    assert isinstance(msg, AIMessage)
    meta = msg.response_metadata
    assert meta["mode"] == "latent" and meta["doc_ids"] and set(meta["doc_ids"]) <= set(IDS)
    assert len(meta["scores"]) == len(meta["doc_ids"]) and meta["model_name"].startswith("msa:")
    assert msg.usage_metadata["input_tokens"] > 0 and msg.usage_metadata["total_tokens"] >= msg.usage_metadata[
        "input_tokens"]
    chunks = list(chat.stream("Who built the lighthouse?"))
    assert all(isinstance(c, AIMessageChunk) for c in chunks) and chunks[-1].chunk_position == "last"
    text = "".join(c.content for c in chunks)
    assert text == chat.invoke("Who built the lighthouse?").content  # greedy: same text both ways
    assert len([c for c in chunks if c.content]) >= 2  # token by token, not one block
    full = sum(chunks[1:], chunks[0])
    again = chat.invoke("Who built the lighthouse?").response_metadata
    assert full.response_metadata["doc_ids"] == again["doc_ids"] and full.response_metadata["scores"] == again["scores"]
    assert full.usage_metadata["output_tokens"] == len([c for c in chunks if c.content])  # one token a chunk


def test_chat_astream_and_ainvoke(vs):
    chat = ChatMSA(store=vs, max_new_tokens=5)

    async def scenario():
        chunks = [c async for c in chat.astream("Where do ferries go?")]
        msg = await chat.ainvoke("Where do ferries go?")
        return chunks, msg

    chunks, msg = asyncio.run(scenario())
    assert "".join(c.content for c in chunks) == msg.content
    assert chunks[-1].chunk_position == "last" and chunks[-1].response_metadata["doc_ids"]


@pytest.mark.parametrize("asynchronous", [False, True])
def test_chat_batch_generates_together_and_equals_invoke(vs, asynchronous):
    """chat.batch / abatch: LangChain's concurrent invokes meet in the store's batcher (one answer_batch)."""
    chat = ChatMSA(store=vs, max_new_tokens=5, k=2)
    questions = ["Who built the lighthouse?", "Where do ferries go?", "What is Paris?"]
    alone = [chat.invoke(q) for q in questions]
    vs.store._batcher.wait_s = 0.05
    before = len(vs.store._batcher.batches)
    msgs = asyncio.run(chat.abatch(questions)) if asynchronous else chat.batch(questions)
    assert max(vs.store._batcher.batches[before:]) > 1
    assert [m.content for m in msgs] == [m.content for m in alone]
    assert [m.response_metadata["doc_ids"] for m in msgs] == [m.response_metadata["doc_ids"] for m in alone]


def test_chat_hybrid_and_plain_generation(vs, tiny):
    hybrid = ChatMSA(store=vs, mode="hybrid", k=2, max_new_tokens=4).invoke("ferries")
    assert hybrid.response_metadata["mode"] == "hybrid" and len(hybrid.response_metadata["doc_ids"]) == 2
    override = ChatMSA(store=vs, max_new_tokens=4).invoke("ferries", mode="hybrid", k=3)
    assert len(override.response_metadata["doc_ids"]) == 3
    plain = ChatMSA(store=MemoryStore(tiny), max_tokens=4).invoke("hello")  # an empty bank
    assert plain.response_metadata["doc_ids"] == [] and plain.usage_metadata["output_tokens"] <= 8
    free = ChatMSA(store=vs, max_new_tokens=12).invoke("hello").content
    assert len(free) >= 3
    cut = free[1:3]
    for chat, kw in ((ChatMSA(store=vs, max_new_tokens=12), {"stop": [cut]}),
                     (ChatMSA(store=vs, max_new_tokens=12, stop=[cut]), {})):
        stopped = chat.invoke("hello", **kw)
        assert stopped.response_metadata["finish_reason"] == "stop"
        assert cut not in stopped.content and free.startswith(stopped.content)


def test_chat_fusion_answers_from_the_fused_top_k(vs, tiny):
    bank = vs.store.bank
    for mode in ("latent", "hybrid"):
        hits = tiny.retrieve("Ada Quist engineer", bank, k=2, fusion="bm25", alpha=0.0)
        meta = ChatMSA(store=vs, mode=mode, k=2, max_new_tokens=3, fusion="bm25", alpha=0.0).invoke(
            "Ada Quist engineer").response_metadata
        assert meta["doc_ids"] == [h.id for h in hits] and meta["fusion"]["alpha"] == 0.0
        per_call = ChatMSA(store=vs, mode=mode, k=2, max_new_tokens=3).invoke(
            "Ada Quist engineer", fusion="bm25", alpha=0.0).response_metadata
        assert per_call["doc_ids"] == meta["doc_ids"]
    assert set(meta["doc_ids"]) == {"light", "pier"}  # the two passages naming her
    assert "fusion" not in ChatMSA(store=vs, k=2, max_new_tokens=3).invoke("Ada Quist").response_metadata
    with pytest.raises(InvalidInputError, match="alpha"):
        ChatMSA(store=vs, max_new_tokens=3, fusion="bm25", alpha=2.0).invoke("Ada Quist")


def test_messages_map_to_chat_roles():
    from langchain_core.messages import ChatMessage, ToolMessage

    conv = to_conversation([SystemMessage("s"), HumanMessage("h", name="x"), AIMessage("a"),
                            ToolMessage("t", tool_call_id="1"), ChatMessage(role="user", content="c"),
                            HumanMessage(content=[{"type": "text", "text": "list"}])])
    assert conv == [{"role": "system", "content": "s"}, {"role": "user", "content": "h"},
                    {"role": "assistant", "content": "a"}, {"role": "tool", "content": "t"},
                    {"role": "user", "content": "c"}, {"role": "user", "content": "list"}]
    with pytest.raises(ValueError, match="'image' block"):
        to_conversation([HumanMessage(content=[{"type": "image", "base64": "xx", "mime_type": "image/png"}])])


class TestChatMSAStandardUnit(ChatMSASuiteFlags, ChatModelUnitTests):
    """langchain-tests' unit suite: construction and params only, nothing is loaded."""

    @property
    def chat_model_params(self) -> dict:
        return {"max_new_tokens": 8}


# ---- the hybrid chain helper -------------------------------------------------------------------

def test_rag_chain_formats_documents_into_any_chat_model(vs):
    chain = build_rag_chain(vs.store, ParrotFakeChatModel(), k=2)
    prompt_seen = chain.invoke("Who built the lighthouse?")  # the parrot answers with its prompt
    expected_docs = MSARetriever(store=vs.store, k=2).invoke("Who built the lighthouse?")
    assert format_docs(expected_docs) in prompt_seen and "Question: Who built the lighthouse?" in prompt_seen
    out = build_rag_chain(vs.as_retriever(search_kwargs={"k": 3}), ParrotFakeChatModel(),
                          with_sources=True).invoke("ferries")
    assert set(out) == {"question", "documents", "answer"} and len(out["documents"]) == 3
    assert all(d.id in IDS for d in out["documents"]) and out["documents"][0].page_content in out["answer"]
    custom = ChatPromptTemplate.from_template("C={context} Q={question}")
    assert build_rag_chain(vs, ParrotFakeChatModel(), custom, search_kwargs={"k": 1}).invoke("x").startswith("C=")
    with pytest.raises(ValueError, match="lacks the variables"):
        build_rag_chain(vs, ParrotFakeChatModel(), ChatPromptTemplate.from_template("{question}"))


def test_rag_chain_async(vs):
    chain = build_rag_chain(MSARetriever(store=vs.store, k=1), ParrotFakeChatModel())
    assert "Document [1]:" in asyncio.run(chain.ainvoke("ferries"))
