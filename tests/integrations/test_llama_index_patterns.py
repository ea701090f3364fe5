"""LlamaIndex patterns users compose, written as they write them, on a tiny random model (issue 25):
a folder with an empty file, IngestionPipeline, reloading with load_index_from_storage,
QueryFusionRetriever, pickling, Settings left alone, MMR and filter-only queries.

Routing quality is meaningless here (random weights): the tests check the adapter logic against the
engine's own answers and LlamaIndex's own components.
"""

from __future__ import annotations

import pickle

import pytest
from llama_index.core import (
    Document,
    Settings,
    SimpleDirectoryReader,
    StorageContext,
    VectorStoreIndex,
    load_index_from_storage,
)
from llama_index.core.base.base_retriever import BaseRetriever
from llama_index.core.ingestion import IngestionPipeline
from llama_index.core.llms import MockLLM
from llama_index.core.node_parser import SentenceSplitter
from llama_index.core.retrievers import QueryFusionRetriever
from llama_index.core.schema import NodeWithScore, QueryBundle
from llama_index.core.vector_stores.types import MetadataFilter, MetadataFilters, VectorStoreQuery

from msa_core import MSAConfig, MSAModel
from msa_core.routing.mmr import document_vectors, mmr_select
from msa_integrations.llama_index import MSAPlaceholderEmbedding, MSARetriever, MSAVectorStore

DOCS = [
    Document(id_="light", text="The lighthouse of Velmora was built in 1887 by the engineer Ada Quist.",
             metadata={"topic": "town"}),
    Document(id_="ferry", text="Ferries leave the harbour every morning at seven and return at dusk.",
             metadata={"topic": "travel"}),
    Document(id_="paris", text="What is the capital of France? Paris is the capital of France.",
             metadata={"topic": "geo"}),
    Document(id_="msa", text="Memory sparse attention routes a question to the documents it needs.",
             metadata={"topic": "ml"}),
    Document(id_="pier", text="The engineer Ada Quist also built the pier of Velmora in 1890.",
             metadata={"topic": "town"}),
]


@pytest.fixture(scope="module")
def model(tiny_model_dir) -> MSAModel:
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


# ---- item 1: an empty file in the folder -----------------------------------------------------


def test_an_empty_file_is_skipped_with_a_warning_not_fatal(store, tmp_path):
    (tmp_path / "light.txt").write_text(DOCS[0].text)
    (tmp_path / "ferry.txt").write_text(DOCS[1].text)
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text("  \n\n ")
    documents = SimpleDirectoryReader(str(tmp_path)).load_data()
    assert len(documents) == 4  # the splitter drops the blank one, the empty one reaches the store
    with pytest.warns(UserWarning, match="skipped 1 of 3 node"):
        index = VectorStoreIndex.from_documents(documents, storage_context=StorageContext.from_defaults(
            vector_store=store), embed_model=MSAPlaceholderEmbedding())
    assert len(store.store) == 2
    names = {n.node.metadata["file_name"] for n in index.as_retriever(similarity_top_k=5).retrieve("harbour")}
    assert names == {"light.txt", "ferry.txt"}


# ---- item 2: IngestionPipeline -----------------------------------------------------------------


def test_ingestion_pipeline_stores_the_nodes(store):
    """IngestionPipeline hands its vector store only nodes that have an embedding (LlamaIndex's rule, not
    ours): the placeholder ends the transformations, as an embedding model ends them upstream."""
    pipeline = IngestionPipeline(transformations=[SentenceSplitter(chunk_size=40, chunk_overlap=0),
                                                  MSAPlaceholderEmbedding()], vector_store=store)
    nodes = pipeline.run(documents=DOCS)
    assert len(nodes) >= len(DOCS) and sorted(store.store.ids()) == sorted(n.node_id for n in nodes)
    index = VectorStoreIndex.from_vector_store(store, embed_model=MSAPlaceholderEmbedding())
    assert len(index.as_retriever(similarity_top_k=3).retrieve("Who built the lighthouse?")) == 3
    assert Settings._embed_model is None


# ---- item 5: reloading ---------------------------------------------------------------------------


def test_load_index_from_storage_round_trip(index, model, tmp_path):
    question = "Who built the lighthouse?"
    before = index.as_retriever(similarity_top_k=4).retrieve(question)
    index.storage_context.persist(persist_dir=str(tmp_path))
    # the documented pattern
    ctx = StorageContext.from_defaults(vector_store=MSAVectorStore.from_persist_dir(tmp_path, model=model),
                                       persist_dir=str(tmp_path))
    loaded = load_index_from_storage(ctx, embed_model=MSAPlaceholderEmbedding())
    after = loaded.as_retriever(similarity_top_k=4).retrieve(question)
    assert [n.node.node_id for n in after] == [n.node.node_id for n in before]
    assert [n.score for n in after] == pytest.approx([n.score for n in before])
    # SimpleVectorStore's own loader name, for every namespace persisted
    stores = MSAVectorStore.from_namespaced_persist_dir(tmp_path, model=model)
    assert list(stores) == ["default"]
    ctx = StorageContext.from_defaults(vector_stores=stores, persist_dir=str(tmp_path))
    again = load_index_from_storage(ctx, embed_model=MSAPlaceholderEmbedding())
    assert [n.node.node_id for n in again.as_retriever(similarity_top_k=4).retrieve(question)] == \
        [n.node.node_id for n in before]


def test_namespaced_load_of_an_empty_folder_says_what_to_do(tmp_path, model):
    with pytest.raises(ValueError, match="no persisted MSAVectorStore in .*storage_context.persist"):
        MSAVectorStore.from_namespaced_persist_dir(tmp_path, model=model)


# ---- item 6: QueryFusionRetriever ---------------------------------------------------------------


class KeywordRetriever(BaseRetriever):
    """A second retriever over the same nodes, as BM25 would be: nodes containing a query word."""

    def __init__(self, store: MSAVectorStore) -> None:
        self._store = store
        super().__init__()

    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        words = {w.strip("?.").lower() for w in query_bundle.query_str.split() if len(w) > 3}
        hits = []
        for node in self._store.get_nodes():
            overlap = len(words & {w.strip("?.,").lower() for w in node.text.split()})
            if overlap:
                hits.append(NodeWithScore(node=node, score=float(overlap)))
        return sorted(hits, key=lambda n: -n.score)


def test_query_fusion_merges_the_same_node_from_two_retrievers(index, store):
    question = "Who built the lighthouse and the pier?"
    msa = index.as_retriever(similarity_top_k=3)
    keyword = KeywordRetriever(store)
    ours, theirs = msa.retrieve(question), keyword.retrieve(question)
    both = {n.node.node_id for n in ours} & {n.node.node_id for n in theirs}
    assert both, "the two retrievers should share a node for this check to mean anything"
    fusion = QueryFusionRetriever([msa, keyword], similarity_top_k=10, num_queries=1, mode="reciprocal_rerank",
                                  use_async=False, llm=MockLLM())
    fused = fusion.retrieve(question)
    distinct = {n.node.node_id for n in ours} | {n.node.node_id for n in theirs}
    assert sorted(n.node.node_id for n in fused) == sorted(distinct)  # one entry per node
    rank = {name: {n.node.node_id: i for i, n in enumerate(nodes)} for name, nodes in (("msa", ours),
                                                                                      ("kw", theirs))}
    for n in fused:
        expected = sum(1.0 / (r[n.node.node_id] + 60.0) for r in rank.values() if n.node.node_id in r)
        assert n.score == pytest.approx(expected)
    assert fused[0].node.node_id in both  # found by both, so it ranks first (~2/61)


def test_retriever_nodes_hash_as_stored(store, index):
    node = MSARetriever(store, similarity_top_k=1).retrieve("lighthouse")[0]
    stored = store.get_nodes(node_ids=[node.node.node_id])[0]
    assert node.node.hash == stored.hash and node.msa_score is not None


# ---- item 9: pickling ---------------------------------------------------------------------------


def test_pickling_an_index_fails_loudly_instead_of_emptying_it(index):
    with pytest.raises(TypeError, match="cannot be pickled.*persist.*from_persist_dir"):
        pickle.dumps(index)
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(index.vector_store)


# ---- item 10: Settings ---------------------------------------------------------------------------


def test_constructing_a_store_leaves_settings_alone(model):
    MSAVectorStore(model=model)
    assert Settings._embed_model is None
    MSAVectorStore(model=model, set_embed_model=True)  # the opt-in still exists
    assert isinstance(Settings._embed_model, MSAPlaceholderEmbedding)


# ---- item 13: MMR and filter-only queries --------------------------------------------------------


def test_mmr_through_the_index_matches_msa_core(index, store):
    question = "Who built the lighthouse?"
    hits = store.store.retrieve(question, k=5)
    vectors = document_vectors(store.store.bank, [h.id for h in hits])
    for lam in (0.0, 0.3, 1.0):
        expected = [hits[i].id for i in mmr_select([h.relevance_score for h in hits], vectors, 3, lam)]
        retriever = index.as_retriever(similarity_top_k=3, vector_store_query_mode="mmr",
                                       vector_store_kwargs={"mmr_threshold": lam, "mmr_prefetch_k": 5})
        got = retriever.retrieve(question)
        assert [n.node.node_id for n in got] == expected
        assert all(0.0 <= n.score <= 1.0 for n in got)
    plain = index.as_retriever(similarity_top_k=3).retrieve(question)
    lam1 = index.as_retriever(similarity_top_k=3, vector_store_query_mode="mmr",
                              vector_store_kwargs={"mmr_threshold": 1.0}).retrieve(question)
    assert [n.node.node_id for n in lam1] == [n.node.node_id for n in plain]  # lambda 1: relevance only


@pytest.mark.asyncio
async def test_mmr_async_equals_sync(index):
    retriever = index.as_retriever(similarity_top_k=2, vector_store_query_mode="mmr",
                                   vector_store_kwargs={"mmr_threshold": 0.2})
    sync = retriever.retrieve("ferries")
    got = await retriever.aretrieve("ferries")
    assert [n.node.node_id for n in got] == [n.node.node_id for n in sync]


def test_filter_only_queries(index, store):
    town = MetadataFilters(filters=[MetadataFilter(key="topic", value="town")])
    res = store.query(VectorStoreQuery(filters=town, similarity_top_k=10))
    assert sorted(ref_ids(res.nodes)) == ["light", "pier"] and res.similarities is None
    assert len(store.query(VectorStoreQuery(similarity_top_k=2)).nodes) == 2  # no filter: the first k
    nodes = index.as_retriever(similarity_top_k=10, filters=town).retrieve("")
    assert sorted(ref_ids(nodes)) == ["light", "pier"]
