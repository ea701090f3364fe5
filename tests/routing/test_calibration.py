"""Calibrated relevance (msa_core/routing/calibration.py): the fit, the map, the sidecar beside a router file, and
what a score threshold keeps on the default model (integration)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from msa_core import InvalidInputError, MSAConfig, MSAModel
from msa_core.routing.calibration import calibrated, fit_calibration, load_sidecar, sidecar_path
from msa_core.routing.scores import relevance

DOCS = ["The lighthouse was built in 1887 by Ada Quist.", "Ferries leave the harbour at seven.",
        "Paris is the capital of France.", "Memory sparse attention routes a question."]
IDS = ["light", "ferry", "paris", "msa"]


def test_fit_recovers_a_known_logistic_map():
    gen = torch.Generator().manual_seed(0)
    a, b = 12.0, -3.0
    x = torch.rand(40_000, generator=gen, dtype=torch.float64) * 0.8 - 0.2
    y = torch.rand(40_000, generator=gen, dtype=torch.float64) < torch.sigmoid(a * x + b)
    # balanced weights: resampling the negatives changes the intercept by log(n_pos/n_neg) only
    fa, fb = fit_calibration(x[y].tolist(), x[~y].tolist())
    prior = math.log(y.sum().item() / (~y).sum().item())
    assert fa == pytest.approx(a, rel=0.05) and fb == pytest.approx(b - prior, abs=0.1)
    with pytest.raises(InvalidInputError, match="gold and other scores"):
        fit_calibration([], [0.1])


def test_calibrated_map_keeps_the_order():
    s = torch.tensor([0.9, 0.3, -0.2, 0.31])
    r = relevance(s, "cosine", calibration=[10.0, -5.0])
    assert torch.equal(torch.argsort(r, descending=True), torch.argsort(s, descending=True))
    assert r.tolist() == pytest.approx(torch.sigmoid(10 * s - 5).tolist())
    assert relevance(s, "cosine").tolist() == pytest.approx(((s + 1) / 2).tolist())  # unchanged without one


def test_retrieve_reports_calibrated_relevance(tiny_model_dir):
    path = tiny_model_dir("llama")
    plain = MSAModel.from_pretrained(path, config=MSAConfig(encode={"chunk_size": 4}))
    cal = MSAModel.from_pretrained(path, config=MSAConfig(encode={"chunk_size": 4},
                                                          routing={"relevance_calibration": [8.0, -1.0]}))
    hits = cal.retrieve("lighthouse", cal.index(DOCS, ids=IDS), k=4)
    base = plain.retrieve("lighthouse", plain.index(DOCS, ids=IDS), k=4)
    assert [h.id for h in hits] == [h.id for h in base]
    assert [h.score for h in hits] == pytest.approx([h.score for h in base])
    for h in hits:
        assert h.relevance_score == pytest.approx(1 / (1 + math.exp(-(8.0 * h.score - 1.0))), abs=1e-6)
    with pytest.raises(ValueError):
        MSAConfig(routing={"relevance_calibration": [1.0]})


def test_a_router_file_brings_its_sidecar(tiny_model_dir, tmp_path):
    path = tiny_model_dir("llama")
    model = MSAModel.from_pretrained(path, router="random")
    router_file = tmp_path / "r.safetensors"
    model.router.save(router_file, model.backbone_fingerprint)
    assert sidecar_path(router_file) == tmp_path / "r.calibration.json"
    assert MSAModel.from_pretrained(path, router=router_file).config.routing.relevance_calibration is None
    sidecar_path(router_file).write_text(json.dumps({"router_fingerprint": model.router_fingerprint,
                                                     "a": 5.0, "b": -2.0}))
    assert load_sidecar(router_file, model.router_fingerprint) == [5.0, -2.0]
    assert MSAModel.from_pretrained(path, router=router_file).config.routing.relevance_calibration == [5.0, -2.0]
    mine = MSAModel.from_pretrained(path, router=router_file, config={"routing": {"relevance_calibration": [1, 0]}})
    assert mine.config.routing.relevance_calibration == [1.0, 0.0]  # the user's own wins
    assert load_sidecar(router_file, "another-router") is None  # fitted for other scores: ignored


@pytest.mark.integration
def test_thresholds_on_the_default_model_mean_something():
    """score_threshold=0.5 (carried over from FAISS/Chroma) keeps the answer to a real question and drops
    everything for questions the bank knows nothing about (with the fixed (s+1)/2 map most of it passed)."""
    from msa_core.memory.corpus import DEMO_CORPUS_PATH, read_corpus
    from msa_integrations.langchain import MSAVectorStore

    records = read_corpus(DEMO_CORPUS_PATH)
    store = MSAVectorStore.from_texts([r.text for r in records], ids=[r.id for r in records])
    assert store.store.model.config.routing.relevance_calibration is not None  # the shipped router's
    retriever = store.as_retriever(search_type="similarity_score_threshold",
                                   search_kwargs={"k": 24, "score_threshold": 0.5})
    unrelated = ["qwv zpxk lrtm bbq jjf", "How do I configure the Apache2 mod_rewrite module?",
                 "What is the boiling point of liquid nitrogen?", "asdf ghjk qwer tyui zxcv"]
    passed = [len(retriever.invoke(q)) for q in unrelated]
    assert sum(passed) <= 2, passed  # out of 4 x 24 (question, document) pairs
    keeper = retriever.invoke("Who is the keeper of Greyhook Lighthouse?")
    assert keeper and keeper[0].id == "velmora-lighthouse"
    fixed = calibrated(torch.tensor([0.0]), [1.0, 0.0])
    assert float(fixed[0]) == 0.5
