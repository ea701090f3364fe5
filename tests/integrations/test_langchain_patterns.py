"""LangChain patterns users compose, written as they write them, on a tiny random model (issue 25):
afrom_texts, scores on every as_retriever path, token counting with the model's own tokenizer."""

from __future__ import annotations

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage

from msa_core import MSAConfig, MSAModel
from msa_core.inference.generate import build_prompt
from msa_integrations.langchain import ChatMSA, MSAVectorStore

TEXTS = ["The lighthouse was built in 1887 by Ada Quist.", "Ferries leave the harbour at seven.",
         "Paris is the capital of France.", "Memory sparse attention routes a question.",
         "The engineer Ada Quist also built the pier."]
IDS = ["light", "ferry", "paris", "msa", "pier"]
METAS = [{"topic": "town"}, {"topic": "travel"}, {"topic": "geo"}, {"topic": "ml"}, {"topic": "town"}]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir) -> MSAModel:
    return MSAModel.from_pretrained(tiny_model_dir("llama"), config=MSAConfig(encode={"chunk_size": 4}))


@pytest.fixture
def vs(tiny) -> MSAVectorStore:
    return MSAVectorStore.from_texts(TEXTS, metadatas=METAS, ids=IDS, model=tiny)


# ---- item 3 ------------------------------------------------------------------------------------


async def test_afrom_texts_needs_no_embedding(tiny):
    store = await MSAVectorStore.afrom_texts(TEXTS, metadatas=METAS, ids=IDS, model=tiny)
    assert sorted(store.store.ids()) == sorted(IDS)
    sync = MSAVectorStore.from_texts(TEXTS, metadatas=METAS, ids=IDS, model=tiny)
    got = await store.asimilarity_search_with_score("Who built the lighthouse?", k=3)
    expected = sync.similarity_search_with_score("Who built the lighthouse?", k=3)
    assert [(d.id, s) for d, s in got] == [(d.id, pytest.approx(s)) for d, s in expected]
    assert (await store.aget_by_ids(["paris"]))[0].metadata == {"topic": "geo"}


# ---- item 4 ------------------------------------------------------------------------------------


@pytest.mark.parametrize("search_type, search_kwargs", [
    ("similarity", {"k": 3}),
    ("mmr", {"k": 3, "fetch_k": 5, "lambda_mult": 0.3}),
    ("similarity_score_threshold", {"k": 5, "score_threshold": 0.0}),
])
def test_as_retriever_documents_carry_scores(vs, search_type, search_kwargs):
    question = "Who built the lighthouse?"
    retriever = vs.as_retriever(search_type=search_type, search_kwargs=search_kwargs)
    docs = retriever.invoke(question)
    hits = {h.id: h for h in vs.store.retrieve(question, k=5)}
    assert docs and len(docs) == min(search_kwargs["k"], 5)
    for doc in docs:
        assert doc.metadata["score"] == pytest.approx(hits[doc.id].score)
        assert doc.metadata["relevance_score"] == pytest.approx(hits[doc.id].relevance_score)
        assert doc.metadata["topic"] == METAS[IDS.index(doc.id)]["topic"]
    plain = {"similarity": vs.similarity_search, "mmr": vs.max_marginal_relevance_search,
             "similarity_score_threshold": vs.similarity_search}[search_type]
    options = {k: v for k, v in search_kwargs.items() if k != "score_threshold"}
    assert [d.id for d in docs] == [d.id for d in plain(question, **options)]  # same documents, same order


def test_score_threshold_filters_by_relevance(vs):
    question = "Who built the lighthouse?"
    scores = sorted(h.relevance_score for h in vs.store.retrieve(question, k=5))
    cut = (scores[1] + scores[2]) / 2  # keeps the three best
    retriever = vs.as_retriever(search_type="similarity_score_threshold",
                                search_kwargs={"k": 5, "score_threshold": cut})
    docs = retriever.invoke(question)
    assert len(docs) == 3 and all(d.metadata["relevance_score"] >= cut for d in docs)
    assert [(d.id, d.metadata["relevance_score"]) for d in docs] == \
        [(d.id, pytest.approx(s)) for d, s in vs.similarity_search_with_relevance_scores(question, k=5,
                                                                                         score_threshold=cut)]


async def test_as_retriever_async_equals_sync(vs):
    retriever = vs.as_retriever(search_kwargs={"k": 2, "filter": {"topic": "town"}})
    docs = await retriever.ainvoke("Ada Quist")
    assert sorted(d.id for d in docs) == ["light", "pier"]
    assert [d.metadata for d in docs] == [d.metadata for d in retriever.invoke("Ada Quist")]


def test_store_search_methods_keep_metadata_as_stored(vs):
    """The standard VectorStore contract: similarity_search returns the metadata as stored."""
    assert {d.id: d.metadata for d in vs.similarity_search("lighthouse", k=5)} == dict(zip(IDS, METAS))


# ---- item 7 ------------------------------------------------------------------------------------


def test_token_counts_use_the_models_tokenizer(vs, tiny):
    chat = ChatMSA(store=vs)
    ids = tiny.tokenizer("hello world", add_special_tokens=False)["input_ids"]
    assert chat.get_token_ids("hello world") == list(ids) and len(ids) > 0
    assert chat.get_num_tokens("hello world") == len(ids)
    messages = [SystemMessage("Be brief."), HumanMessage("Hi"), AIMessage("Hello."), HumanMessage("Who built it?")]
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Who built it?"}]
    n = chat.get_num_tokens_from_messages(messages)
    assert n == len(build_prompt(tiny.tokenizer, conversation).ids)
    assert n > sum(chat.get_num_tokens(m.text) for m in messages)  # the template's role tags count too
