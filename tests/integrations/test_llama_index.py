"""LlamaIndex adapters on a tiny random model: contracts, filters, ids, persistence, async.

Routing quality is meaningless here (random weights); these tests check the adapter logic against
the engine's own answers and LlamaIndex's own components (VectorStoreIndex, RetrieverQueryEngine,
MockLLM). tests/integrations/test_llama_index_default.py runs the real default model.
"""

from __future__ import annotations

import asyncio

import pytest
from heartbeat import ticks_during
from llama_index.core import Document, Settings, StorageContext, VectorStoreIndex
from llama_index.core.base.base_query_engine import BaseQueryEngine
from llama_index.core.base.base_retriever import BaseRetriever
from llama_index.core.base.embeddings.base import BaseEmbedding
from llama_index.core.base.llms.base import BaseLLM
from llama_index.core.base.response.schema import Response, StreamingResponse
from llama_index.core.embeddings import MockEmbedding
from llama_index.core.llms import ChatMessage, CustomLLM, MockLLM
from llama_index.core.node_parser import SentenceSplitter
from llama_index.core.query_engine import CustomQueryEngine, RetrieverQueryEngine
from llama_index.core.schema import NodeWithScore, TextNode
from llama_index.core.vector_stores.types import (
    BasePydanticVectorStore,
    FilterCondition,
    FilterOperator,
    MetadataFilter,
    MetadataFilters,
    VectorStoreQuery,
    VectorStoreQueryMode,
)
from llama_index.core.vector_stores.utils import build_metadata_filter_fn

from msa_core import InvalidInputError, MSAConfig, MSAModel
from msa_core.memory.filters import compile_filter
from msa_core.store import MemoryStore
from msa_integrations.llama_index import (
    MSALLM,
    MSAPlaceholderEmbedding,
    MSAQueryEngine,
    MSARetriever,
    MSAVectorStore,
    to_msa_filter,
)

DOCS = [
    Document(id_="light", text="The lighthouse of Velmora was built in 1887 by the engineer Ada Quist.",
             metadata={"topic": "town", "year": 1887, "tags": ["sea", "history"]}),
    Document(id_="ferry", text="Ferries leave the harbour every morning at seven and return at dusk.",
             metadata={"topic": "travel", "year": 2020, "tags": ["sea"]}),
    Document(id_="paris", text="What is the capital of France? Paris is the capital of France.",
             metadata={"topic": "geo", "year": 1900}),
    Document(id_="msa", text="Memory sparse attention routes a question to the documents it needs.",
             metadata={"topic": "ml", "year": 2026, "tags": []}),
]


def F(key, value, op=FilterOperator.EQ) -> MetadataFilter:  # noqa: N802 - reads like the table below
    return MetadataFilter(key=key, value=value, operator=op)


@pytest.fixture(scope="module")
def model(tiny_model_dir) -> MSAModel:
    # A 4096-position window: LlamaIndex's prompt packing reserves more than the tiny default of 512.
    path = tiny_model_dir("llama", max_position_embeddings=4096)
    return MSAModel.from_pretrained(path, config=MSAConfig(encode={"chunk_size": 4}))


@pytest.fixture(autouse=True)
def no_embed_model():
    """Every test starts with no embedding model configured, as a new user's process does."""
    saved = Settings._embed_model
    Settings._embed_model = None
    yield
    Settings._embed_model = saved


@pytest.fixture
def store(model) -> MSAVectorStore:
    return MSAVectorStore(model=model)


@pytest.fixture
def index(store) -> VectorStoreIndex:
    return VectorStoreIndex.from_documents(DOCS, storage_context=StorageContext.from_defaults(vector_store=store),
                                           embed_model=MSAPlaceholderEmbedding())


def ref_ids(nodes) -> list[str]:
    return [(n.node if isinstance(n, NodeWithScore) else n).ref_doc_id for n in nodes]


# ---- contracts ---------------------------------------------------------------------------


def test_class():
    names = [b.__name__ for b in MSAVectorStore.__mro__]
    assert BasePydanticVectorStore.__name__ in names
    assert BaseRetriever in MSARetriever.__mro__
    assert CustomLLM in MSALLM.__mro__ and BaseLLM in MSALLM.__mro__
    assert CustomQueryEngine in MSAQueryEngine.__mro__ and BaseQueryEngine in MSAQueryEngine.__mro__
    assert BaseEmbedding in MSAPlaceholderEmbedding.__mro__


def test_store_flags_and_client(store):
    assert store.stores_text is True and store.is_embedding_query is False
    assert isinstance(store.client, MemoryStore) and len(store.client) == 0


# ---- filters -----------------------------------------------------------------------------


@pytest.mark.parametrize("filters, expected", [
    (F("topic", "town"), {"topic": {"$eq": "town"}}),
    (F("topic", "town", FilterOperator.NE), {"topic": {"$ne": "town"}}),
    (F("year", 1900, FilterOperator.GT), {"year": {"$gt": 1900}}),
    (F("year", 1900, FilterOperator.GTE), {"year": {"$gte": 1900}}),
    (F("year", 1900, FilterOperator.LT), {"year": {"$lt": 1900}}),
    (F("year", 1900, FilterOperator.LTE), {"year": {"$lte": 1900}}),
    (F("topic", ["a", "b"], FilterOperator.IN), {"topic": {"$in": ["a", "b"]}}),
    (F("topic", ["a", "b"], FilterOperator.NIN), {"topic": {"$nin": ["a", "b"]}}),
    (MetadataFilters(filters=[F("a", 1)]), {"a": {"$eq": 1}}),
    (MetadataFilters(filters=[F("a", 1), F("b", 2)]), {"$and": [{"a": {"$eq": 1}}, {"b": {"$eq": 2}}]}),
    (MetadataFilters(filters=[F("a", 1), F("b", 2)], condition=FilterCondition.OR),
     {"$or": [{"a": {"$eq": 1}}, {"b": {"$eq": 2}}]}),
    (MetadataFilters(filters=[F("a", 1), MetadataFilters(filters=[F("b", 2), F("c", 3)], condition="or")]),
     {"$and": [{"a": {"$eq": 1}}, {"$or": [{"b": {"$eq": 2}}, {"c": {"$eq": 3}}]}]}),
    (MetadataFilters(filters=[F("a", 1)], condition=FilterCondition.NOT), {"$not": {"$or": [{"a": {"$eq": 1}}]}}),
    (MetadataFilters(filters=[]), None),
    (None, None),
    ({"year": {"$lt": 2000}}, {"year": {"$lt": 2000}}),  # an msa filter passes through
])
def test_filter_translation(filters, expected):
    assert to_msa_filter(filters) == expected


META = [{"topic": "town", "year": 1887}, {"topic": "travel", "year": 2020}, {"topic": "geo", "year": 1900},
        {"topic": "ml"}]


@pytest.mark.parametrize("op, value", [
    (FilterOperator.EQ, "geo"), (FilterOperator.NE, "geo"), (FilterOperator.GT, 1900), (FilterOperator.GTE, 1900),
    (FilterOperator.LT, 1900), (FilterOperator.LTE, 1900), (FilterOperator.IN, ["geo", "ml"]),
    (FilterOperator.NIN, ["geo", "ml"]),
])
@pytest.mark.parametrize("condition", [FilterCondition.AND, FilterCondition.OR, FilterCondition.NOT])
def test_filters_match_llama_index_semantics(op, value, condition):
    """Same verdicts as LlamaIndex's own in-memory filter function (keys typed consistently)."""
    key = "year" if isinstance(value, int) else "topic"
    filters = MetadataFilters(filters=[F(key, value, op), F("topic", "town", FilterOperator.NE)], condition=condition)
    theirs = build_metadata_filter_fn(lambda i: META[i], filters)
    ours = compile_filter(to_msa_filter(filters))
    assert [ours(m) for m in META] == [theirs(i) for i in range(len(META))]


@pytest.mark.parametrize("f, verdicts", [
    (F("tags", "sea", FilterOperator.CONTAINS), [True, True, False, False]),
    (F("tags", ["history", "x"], FilterOperator.ANY), [True, False, False, False]),
    (F("tags", ["sea", "history"], FilterOperator.ALL), [True, False, False, False]),
    (F("name", "reyh", FilterOperator.TEXT_MATCH), [False, False, False, True]),
    (F("name", "REYH", FilterOperator.TEXT_MATCH_INSENSITIVE), [False, False, False, True]),
    (F("tags", None, FilterOperator.IS_EMPTY), [False, False, True, True]),
])
def test_list_and_text_operators(f, verdicts):
    meta = [{"tags": ["sea", "history"]}, {"tags": ["sea"]}, {"tags": []}, {"name": "greyhook", "tags": None}]
    predicate = compile_filter(to_msa_filter(MetadataFilters(filters=[f])))
    assert [predicate(m) for m in meta] == verdicts


def test_bad_filters_name_the_value():
    with pytest.raises(InvalidInputError, match="needs a list value.*'geo'"):
        to_msa_filter(F("topic", "geo", FilterOperator.IN))
    with pytest.raises(InvalidInputError, match="got int"):
        to_msa_filter(3)


# ---- VectorStoreIndex --------------------------------------------------------------------


def test_index_works_with_no_embedding_model(index, store):
    nodes = index.as_retriever(similarity_top_k=2).retrieve("Who built the lighthouse?")
    assert len(nodes) == 2 and len(store.store) == 4
    for n in nodes:
        assert 0.0 <= n.score <= 1.0
        assert "msa_score" not in n.node.metadata  # the node stays as stored: its hash is unchanged
        source = next(d for d in DOCS if d.id_ == n.node.ref_doc_id)
        assert n.node.text == source.text and n.node.metadata["topic"] == source.metadata["topic"]
        assert n.node.node_id in store.store.ids()  # a bank document per node
    assert Settings._embed_model is None  # the placeholder is the index's own, not the process's
    with pytest.raises(RuntimeError, match="pass embed_model="):
        index._embed_model.get_query_embedding("other stores need a real model")


def test_a_configured_embed_model_is_left_alone(model):
    mine = MockEmbedding(embed_dim=3)
    Settings.embed_model = mine
    MSAVectorStore(model=model, set_embed_model=True)
    assert Settings.embed_model is mine


def test_retrieval_matches_the_engine(index, store):
    nodes = index.as_retriever(similarity_top_k=3).retrieve("ferries in the morning")
    hits = store.store.retrieve("ferries in the morning", k=3)
    assert [n.node.node_id for n in nodes] == [h.id for h in hits]
    assert [n.score for n in nodes] == pytest.approx([h.relevance_score for h in hits])


def test_hybrid_mode_fuses_routing_with_bm25(index, store):
    q = "Who built the lighthouse of Velmora?"
    for alpha in (0.0, 0.4, 1.0):
        nodes = index.as_retriever(similarity_top_k=3, vector_store_query_mode="hybrid", alpha=alpha).retrieve(q)
        hits = store.store.retrieve(q, k=3, fusion="bm25", alpha=alpha)
        assert [n.node.node_id for n in nodes] == [h.id for h in hits]
        assert [n.score for n in nodes] == pytest.approx([h.relevance_score for h in hits])
        # the index's retriever hands back plain NodeWithScores: the nodes stay as stored (their hash covers
        # metadata), so each side's score is only on MSARetriever's MSANodeWithScore (test_nodes_carry...)
        assert "msa_lexical_score" not in nodes[0].node.metadata
    plain = index.as_retriever(similarity_top_k=4).retrieve(q)
    latent_only = index.as_retriever(similarity_top_k=4, vector_store_query_mode="hybrid", alpha=1.0).retrieve(q)
    assert [n.node.node_id for n in latent_only] == [n.node.node_id for n in plain]
    bm25_only = index.as_retriever(similarity_top_k=1, vector_store_query_mode="hybrid", alpha=0.0).retrieve(q)
    assert ref_ids(bm25_only) == ["light"]


def test_filters_apply_before_routing(index, store):
    ranked = index.as_retriever(similarity_top_k=4).retrieve("lighthouse")
    last = ranked[-1].node.metadata["topic"]  # ranks last, yet must come first once filtered
    flt = MetadataFilters(filters=[F("topic", last)])
    nodes = index.as_retriever(similarity_top_k=1, filters=flt).retrieve("lighthouse")
    assert [n.node.metadata["topic"] for n in nodes] == [last]
    older = MetadataFilters(filters=[F("year", 1950, FilterOperator.LT), F("topic", "ml")], condition="or")
    got = index.as_retriever(similarity_top_k=4, filters=older).retrieve("anything")
    assert sorted(ref_ids(got)) == ["light", "msa", "paris"]


def test_insert_and_delete_ref_doc_remove_every_node(model):
    store = MSAVectorStore(model=model)
    ctx = StorageContext.from_defaults(vector_store=store)
    splitter = SentenceSplitter(chunk_size=40, chunk_overlap=0)
    index = VectorStoreIndex.from_documents(DOCS[:2], storage_context=ctx, transformations=[splitter],
                                            embed_model=MSAPlaceholderEmbedding())
    long_doc = Document(id_="long", text=" ".join(d.text for d in DOCS) * 2, metadata={"topic": "long"})
    index.insert(long_doc)
    long_nodes = store.get_nodes(filters=MetadataFilters(filters=[F("ref_doc_id", "long")]))
    assert len(long_nodes) > 1 and len(store.store) == 2 + len(long_nodes)
    index.delete_ref_doc("long")
    assert sorted(ref_ids(store.get_nodes())) == ["ferry", "light"]
    index.delete_ref_doc("missing")  # no error, nothing removed
    assert len(store.store) == 2


def test_get_delete_clear(index, store):
    by_ref = {n.ref_doc_id: n.node_id for n in store.get_nodes()}
    got = store.get_nodes(node_ids=[by_ref["paris"], "missing", by_ref["light"]])
    assert ref_ids(got) == ["paris", "light"]  # order kept, missing skipped
    assert isinstance(got[0], TextNode) and got[0].text == DOCS[2].text
    sea = MetadataFilters(filters=[F("year", 2000, FilterOperator.LT)])
    assert sorted(ref_ids(store.get_nodes(filters=sea))) == ["light", "paris"]
    assert ref_ids(store.get_nodes(node_ids=[by_ref["paris"], by_ref["ferry"]], filters=sea)) == ["paris"]
    store.delete_nodes(node_ids=[by_ref["light"], by_ref["ferry"]], filters=sea)  # intersection: light only
    assert sorted(ref_ids(store.get_nodes())) == ["ferry", "msa", "paris"]
    store.delete_nodes()  # neither ids nor filters: nothing
    assert len(store.store) == 3
    store.delete_nodes(filters=MetadataFilters(filters=[F("topic", "ml")]))
    assert sorted(ref_ids(store.get_nodes())) == ["ferry", "paris"]
    store.clear()
    assert store.get_nodes() == [] and len(store.store) == 0


def test_query_restrictions_and_refusals(index, store):
    by_ref = {n.ref_doc_id: n.node_id for n in store.get_nodes()}
    res = store.query(VectorStoreQuery(query_str="harbour", similarity_top_k=4, doc_ids=["ferry", "msa"]))
    assert sorted(ref_ids(res.nodes)) == ["ferry", "msa"] and len(res.similarities) == 2
    res = store.query(VectorStoreQuery(query_str="harbour", similarity_top_k=1,
                                       node_ids=[by_ref["paris"], by_ref["light"]]))
    assert len(res.ids) == 1 and res.ids[0] in (by_ref["paris"], by_ref["light"])
    with pytest.raises(InvalidInputError, match="'sparse' is not supported.*'default', 'mmr' or 'hybrid'"):
        store.query(VectorStoreQuery(query_str="x", mode=VectorStoreQueryMode.SPARSE))
    with pytest.raises(InvalidInputError, match="query_str is empty"):
        store.query(VectorStoreQuery(query_embedding=[1.0], similarity_top_k=2))


def test_empty_store_and_empty_nodes(model):
    store = MSAVectorStore(model=model)
    assert store.query(VectorStoreQuery(query_str="x", similarity_top_k=3)).nodes == []
    assert store.add([]) == []
    with pytest.warns(UserWarning, match="skipped 1 of 2 node"):
        assert store.add([TextNode(id_="blank", text="  "), TextNode(id_="ok", text="Some text.")]) == ["ok"]
    assert store.store.ids() == ["ok"]


def test_persist_round_trip(index, store, model, tmp_path):
    question = "Who built the lighthouse?"
    before = index.as_retriever(similarity_top_k=4).retrieve(question)
    index.storage_context.persist(persist_dir=str(tmp_path))
    loaded = MSAVectorStore.from_persist_dir(tmp_path, model=model)
    again = VectorStoreIndex.from_vector_store(loaded, embed_model=MSAPlaceholderEmbedding())
    after = again.as_retriever(similarity_top_k=4).retrieve(question)
    assert [n.node.node_id for n in after] == [n.node.node_id for n in before]
    assert [n.score for n in after] == pytest.approx([n.score for n in before])
    assert [n.node.metadata for n in after] == [n.node.metadata for n in before]
    bank_dir = tmp_path / "default__vector_store.json"
    files = {p.suffix for p in bank_dir.rglob("*") if p.is_file()}
    assert files <= {".json", ".safetensors", ""}  # no pickle
    with pytest.raises(InvalidInputError, match="no persisted MSAVectorStore"):
        MSAVectorStore.from_persist_path(tmp_path / "nowhere", model=model)


# ---- MSARetriever ------------------------------------------------------------------------


def test_retriever_over_a_plain_bank(model):
    mem = MemoryStore(model)
    mem.add([d.text for d in DOCS], ids=[d.id_ for d in DOCS], metadatas=[d.metadata for d in DOCS])
    retriever = MSARetriever(mem, similarity_top_k=3, filters={"year": {"$gte": 1900}})
    nodes = retriever.retrieve("Where do ferries go?")
    hits = mem.retrieve("Where do ferries go?", k=3, filter={"year": {"$gte": 1900}})
    assert [n.node.node_id for n in nodes] == [h.id for h in hits] and len(nodes) == 3
    for n, h in zip(nodes, hits):
        assert isinstance(n.node, TextNode) and n.node.text == h.text
        assert n.score == pytest.approx(h.relevance_score) and n.msa_score == pytest.approx(h.score)
        assert n.node.metadata["topic"] == h.metadata["topic"]
    with pytest.raises(InvalidInputError, match="similarity_top_k must be an integer >= 1, got 0"):
        MSARetriever(mem, similarity_top_k=0)
    with pytest.raises(InvalidInputError, match="got str"):
        MSARetriever("not a store")


def test_vector_store_over_a_bank_written_by_other_tools(model):
    mem = MemoryStore(model)
    mem.add([d.text for d in DOCS], ids=[d.id_ for d in DOCS], metadatas=[d.metadata for d in DOCS])
    index = VectorStoreIndex.from_vector_store(MSAVectorStore(mem), embed_model=MSAPlaceholderEmbedding())
    nodes = index.as_retriever(similarity_top_k=4).retrieve("harbour")
    assert sorted(n.node.node_id for n in nodes) == sorted(d.id_ for d in DOCS)
    index.delete_ref_doc("ferry")  # a record without a source is its own source document
    assert sorted(mem.ids()) == ["light", "msa", "paris"]


def test_retriever_accepts_store_and_index(index, store):
    a = MSARetriever(store, similarity_top_k=2).retrieve("lighthouse")
    b = MSARetriever(index, similarity_top_k=2).retrieve("lighthouse")
    assert [n.node.node_id for n in a] == [n.node.node_id for n in b]
    assert a[0].node.ref_doc_id in {d.id_ for d in DOCS}  # nodes written by the store come back whole


@pytest.mark.asyncio
async def test_async_calls_run_off_the_event_loop(index, store):
    retriever = MSARetriever(store, similarity_top_k=2)
    ticks, results = await ticks_during(asyncio.gather(
        *[retriever.aretrieve("lighthouse") for _ in range(5)],
        *[store.aquery(VectorStoreQuery(query_str="harbour", similarity_top_k=2)) for _ in range(5)],
        store.async_add([TextNode(id_="extra", text="An extra note about cheese.")]),
    ))
    assert ticks > 3  # the loop kept running while the model routed
    assert all(len(r) == 2 for r in results[:5]) and all(len(r.nodes) == 2 for r in results[5:10])
    assert results[10] == ["extra"] and "extra" in store.store.ids()
    await store.adelete("light")
    assert "light" not in ref_ids(store.get_nodes())
    nodes = await index.as_retriever(similarity_top_k=2).aretrieve("lighthouse")
    assert len(nodes) == 2


# ---- query engines -----------------------------------------------------------------------


def test_hybrid_engine_with_mock_llm(index, store):
    retriever = MSARetriever(store, similarity_top_k=2)
    engine = RetrieverQueryEngine.from_args(retriever, llm=MockLLM())  # MockLLM echoes its prompt
    response = engine.query("Who built the lighthouse?")
    expected = retriever.retrieve("Who built the lighthouse?")
    assert [n.node.node_id for n in response.source_nodes] == [n.node.node_id for n in expected]
    for n in expected:
        assert n.node.text in response.response  # the routed text reached the generator
    streamed = RetrieverQueryEngine.from_args(retriever, llm=MockLLM(), streaming=True).query("lighthouse")
    assert isinstance(streamed, StreamingResponse) and "".join(streamed.response_gen)
    via_index = index.as_query_engine(llm=MockLLM(max_tokens=3), similarity_top_k=2).query("ferries")
    assert via_index.response == "text text text" and len(via_index.source_nodes) == 2


def test_latent_engine_sources_are_the_routed_documents(index, store):
    engine = MSAQueryEngine(index, max_new_tokens=4, k=2)
    response = engine.query("Who built the lighthouse?")
    answer = store.store.answer("Who built the lighthouse?", mode="latent", k=2, max_new_tokens=4)
    assert isinstance(response, Response) and response.response == answer.text
    assert [n.node.node_id for n in response.source_nodes] == answer.doc_ids
    assert [n.msa_score for n in response.source_nodes] == pytest.approx(answer.scores)
    assert all(0 <= n.score <= 1 for n in response.source_nodes) and response.source_nodes[0].node.ref_doc_id
    assert response.metadata["mode"] == "latent" and response.metadata["doc_ids"] == answer.doc_ids
    only_ml = MSAQueryEngine(store, max_new_tokens=2, filters=MetadataFilters(filters=[F("topic", "ml")]))
    assert ref_ids(only_ml.query("anything").source_nodes) == ["msa"]


def test_latent_engine_and_llm_answer_from_the_fused_top_k(index, store):
    q = "Who built the lighthouse?"
    hits = store.store.retrieve(q, k=2, fusion="bm25", alpha=0.0)
    response = MSAQueryEngine(store, max_new_tokens=3, k=2, fusion="bm25", alpha=0.0).query(q)
    answer = store.store.answer(q, k=2, max_new_tokens=3, fusion="bm25", alpha=0.0)
    assert response.response == answer.text and response.metadata["doc_ids"] == [h.id for h in hits] != []
    assert [n.node.node_id for n in response.source_nodes] == answer.doc_ids
    assert response.metadata["fusion"]["alpha"] == 0.0
    llm = MSALLM(store, max_new_tokens=3, k=2)
    done = llm.complete(q, fusion="bm25", alpha=0.0)
    assert done.text == answer.text and done.additional_kwargs["doc_ids"] == answer.doc_ids
    assert done.raw["fusion"]["alpha"] == 0.0
    assert MSALLM(store, max_new_tokens=3, k=2, fusion="bm25", alpha=0.0).complete(q).text == answer.text
    with pytest.raises(InvalidInputError, match="alpha"):
        llm.complete(q, fusion="bm25", alpha=3.0)


def test_latent_engine_streams(store, index):
    engine = MSAQueryEngine(store, max_new_tokens=4, streaming=True)
    response = engine.query("Who built the lighthouse?")
    assert isinstance(response, StreamingResponse) and response.source_nodes == []  # known once generated
    text = "".join(response.response_gen)
    assert text == engine.model_copy(update={"streaming": False}).query("Who built the lighthouse?").response
    assert len(response.source_nodes) == len(response.metadata["doc_ids"]) > 0


@pytest.mark.asyncio
async def test_latent_engine_async(store, index):
    plain = await MSAQueryEngine(store, max_new_tokens=3).aquery("lighthouse")
    streamed = await MSAQueryEngine(store, max_new_tokens=3, streaming=True).aquery("lighthouse")
    pieces = [p async for p in streamed.async_response_gen()]
    assert "".join(pieces) == plain.response
    assert [n.node.node_id for n in streamed.source_nodes] == [n.node.node_id for n in plain.source_nodes]


# ---- MSALLM ------------------------------------------------------------------------------


def test_llm_metadata(store):
    meta = MSALLM(store, max_new_tokens=7).metadata
    assert meta.context_window == 4096 and meta.num_output == 7 and meta.is_chat_model
    assert meta.model_name.startswith("msa:")


def test_llm_complete_stream_and_chat(index, store):
    llm = MSALLM(store, max_new_tokens=4)
    done = llm.complete("Who built the lighthouse?")
    expected = store.store.answer("Who built the lighthouse?", max_new_tokens=4)
    assert done.text == expected.text and done.additional_kwargs["doc_ids"] == expected.doc_ids
    chunks = list(llm.stream_complete("Who built the lighthouse?"))
    assert "".join(c.delta for c in chunks) == chunks[-1].text == done.text
    assert chunks[-1].additional_kwargs["doc_ids"] == expected.doc_ids
    chat = [ChatMessage(role="system", content="Be brief."), ChatMessage(role="user", content="Hello"),
            ChatMessage(role="assistant", content="Hi."), ChatMessage(role="user", content="Who built it?")]
    reply = llm.chat(chat)
    as_dicts = [{"role": m.role.value, "content": m.content} for m in chat]
    assert reply.message.content == store.store.answer(as_dicts, max_new_tokens=4).text
    assert "".join(r.delta for r in llm.stream_chat(chat)) == reply.message.content
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['tools'\]"):
        llm.complete("x", tools=[])


def test_llm_plain_mode_uses_no_memory(store, index):
    llm = MSALLM(store, max_new_tokens=3, use_memory=False)
    done = llm.complete("Who built the lighthouse?")
    assert done.additional_kwargs["doc_ids"] == []
    assert done.text == MemoryStore(store.store.model).answer("Who built the lighthouse?", max_new_tokens=3).text
    assert MSALLM(model=store.store.model, max_new_tokens=2).complete("hi").additional_kwargs["doc_ids"] == []


def test_llm_as_the_generator_of_a_rag_engine(index):
    llm = MSALLM(index, max_new_tokens=3, use_memory=False)
    response = index.as_query_engine(llm=llm, similarity_top_k=2).query("Who built the lighthouse?")
    assert isinstance(response.response, str) and len(response.source_nodes) == 2


@pytest.mark.asyncio
async def test_llm_async(store, index):
    llm = MSALLM(store, max_new_tokens=3)
    sync = llm.complete("lighthouse").text
    assert (await llm.acomplete("lighthouse")).text == sync
    pieces = [r.delta async for r in await llm.astream_complete("lighthouse")]
    assert "".join(pieces) == sync
    msgs = [ChatMessage(role="user", content="lighthouse")]
    assert (await llm.achat(msgs)).message.content == llm.chat(msgs).message.content
    assert "".join([r.delta async for r in await llm.astream_chat(msgs)]) == llm.chat(msgs).message.content


def test_chat_errors_name_the_problem(store):
    llm = MSALLM(store, max_new_tokens=2)
    with pytest.raises(InvalidInputError, match="no user message"):
        llm.chat([ChatMessage(role="system", content="x")])
    with pytest.raises(InvalidInputError, match="role 'tool'"):
        llm.chat([ChatMessage(role="tool", content="x"), ChatMessage(role="user", content="y")])


def test_nodes_carry_each_sides_score_in_a_fusion(store):
    from msa_integrations.llama_index.nodes import hit_to_node

    q = "Who built the lighthouse of Velmora?"
    hits = store.store.retrieve(q, k=3, fusion="bm25", alpha=0.4)
    nodes = [hit_to_node(h) for h in hits]
    assert [n.msa_latent_score for n in nodes] == pytest.approx([h.latent_score for h in hits])
    assert [n.msa_lexical_score for n in nodes] == pytest.approx([h.lexical_score for h in hits])
    assert all(n.msa_score == h.score for n, h in zip(nodes, hits))
