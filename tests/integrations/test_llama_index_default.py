"""LlamaIndex adapters on the real embedded default model (SmolLM2-135M-Instruct), and the example.

Answer quality is not checked (the default router is untrained, see the README); these tests check
that the whole stack runs offline with nothing configured: no embedding model, no API key.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from llama_index.core import Document, Settings, StorageContext, VectorStoreIndex
from llama_index.core.llms import ChatMessage, MockLLM

from msa_core.memory.corpus import DEMO_CORPUS_PATH, read_corpus
from msa_integrations.llama_index import MSALLM, MSAPlaceholderEmbedding, MSAQueryEngine, MSARetriever, MSAVectorStore

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def index() -> VectorStoreIndex:
    saved = Settings._embed_model
    Settings._embed_model = None  # nothing configured, as in a fresh process
    docs = [Document(id_=r.id, text=r.text, metadata={"title": r.title, **r.metadata})
            for r in read_corpus(DEMO_CORPUS_PATH)[:3]]
    store = MSAVectorStore()
    assert len(store.store) == 0 and store.store.model.name == "default"
    yield VectorStoreIndex.from_documents(docs, storage_context=StorageContext.from_defaults(vector_store=store),
                                          embed_model=MSAPlaceholderEmbedding())
    Settings._embed_model = saved


def test_index_retriever_and_hybrid_engine(index):
    nodes = index.as_retriever(similarity_top_k=2).retrieve("Who keeps Greyhook Lighthouse?")
    assert len(nodes) == 2 and all(0.0 <= n.score <= 1.0 for n in nodes)
    assert all(n.node.metadata["title"] and n.node.ref_doc_id.startswith("velmora-") for n in nodes)
    response = index.as_query_engine(llm=MockLLM(), similarity_top_k=2).query("Who keeps Greyhook Lighthouse?")
    assert [n.node.node_id for n in response.source_nodes] == [n.node.node_id for n in nodes]
    assert all(n.node.text in response.response for n in nodes)  # MockLLM echoes the prompt it got


def test_latent_engine_and_llm(index):
    response = MSAQueryEngine(index, k=2, max_new_tokens=8).query("Who keeps Greyhook Lighthouse?")
    assert response.response.strip() and response.metadata["mode"] == "latent"
    assert {n.node.ref_doc_id for n in response.source_nodes} <= {"velmora-overview", "velmora-lighthouse",
                                                                  "velmora-harbour-festival"}
    retriever = MSARetriever(index, similarity_top_k=1)
    assert len(retriever.retrieve("ferry")) == 1
    plain = MSALLM(max_new_tokens=8)  # no store: plain generation on the shared default model
    meta = plain.metadata
    assert meta.context_window == 8192 and meta.model_name == "msa:default" and meta.is_chat_model
    assert plain.complete("Say hello.").text.strip()
    reply = MSALLM(index, max_new_tokens=8).chat([ChatMessage(role="user", content="Who keeps the lighthouse?")])
    assert reply.message.content.strip() and reply.additional_kwargs["doc_ids"]


def test_example_runs(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "llamaindex_query_engine.py"), "--docs", "3",
                           "--max-new-tokens", "12"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for marker in ("indexed 3 documents", "[hybrid]", "[latent]", "done in"):
        assert marker in done.stdout
