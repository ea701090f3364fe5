"""The LangChain and LlamaIndex stores loaded from a folder pick up versions another writer saves there
(issue 24, item 1), and do not save their own unsaved changes over them."""

from __future__ import annotations

import pytest
from llama_index.core.vector_stores.types import VectorStoreQuery

from msa_core import MSAConfig, MSAModel
from msa_core.store import BankConflictError, MemoryStore
from msa_integrations.langchain import MSAVectorStore as LangChainStore
from msa_integrations.llama_index import MSAVectorStore as LlamaStore


@pytest.fixture(scope="module")
def model(tiny_model_dir) -> MSAModel:
    return MSAModel.from_pretrained(tiny_model_dir("llama"), config=MSAConfig(encode={"chunk_size": 4}))


def other_writer(model, folder) -> MemoryStore:
    """Another process's store: every change saved at once under the bank's lock."""
    return MemoryStore.load(folder, model, write_through=True)


def test_langchain_store_follows_the_folder(model, tmp_path):
    folder = tmp_path / "bank"
    LangChainStore.from_texts(["The lighthouse was built in 1887."], ids=["one"], model=model).save_local(folder)
    vs = LangChainStore.load_local(folder, model=model)
    other_writer(model, folder).add(["Ferries leave at seven."], ["two"])
    assert [d.id for d in vs.get_by_ids(["one", "two"])] == ["one", "two"]
    assert {d.id for d in vs.similarity_search("ferries", k=5)} == {"one", "two"}
    vs.add_texts(["Paris is the capital of France."], ids=["three"])  # unsaved in this store
    other_writer(model, folder).delete(["one"])
    with pytest.raises(BankConflictError):
        vs.save_local(folder)


def test_llama_index_store_follows_the_folder(model, tmp_path):
    folder = tmp_path / "bank"
    first = MemoryStore(model)
    first.add(["The lighthouse was built in 1887."], ["one"])
    first.save(folder)
    vs = LlamaStore.from_persist_path(folder, model=model)
    other_writer(model, folder).add(["Ferries leave at seven."], ["two"])
    result = vs.query(VectorStoreQuery(query_str="ferries", similarity_top_k=5))
    assert set(result.ids) == {"one", "two"}
    assert [n.node_id for n in vs.get_nodes(["two"])] == ["two"]
