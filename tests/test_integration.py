"""The real embedded default model (SmolLM2-135M-Instruct) end to end: load, index, retrieve, answer."""

from __future__ import annotations

import json
import time

import pytest

from msa_core import MSAModel
from msa_core.checkpoints.defaults import DEFAULT_ROUTER, default_model_dir
from msa_core.memory.corpus import DEMO_CORPUS_PATH, DEMO_QUESTIONS_PATH, read_corpus
from msa_core.routing.projectors import RouterProjectors

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def model() -> MSAModel:
    default_model_dir()  # converts once per cache; later loads must be fast
    start = time.perf_counter()
    m = MSAModel.from_pretrained("default", device="cpu")
    m.load_seconds = time.perf_counter() - start
    return m


@pytest.fixture(scope="module")
def demo(model):
    records = read_corpus(DEMO_CORPUS_PATH)
    bank = model.index([r.text for r in records], ids=[r.id for r in records],
                       metadatas=[{"title": r.title, **r.metadata} for r in records])
    return records, bank


def test_default_model_is_smollm2_and_loads_fast_once_converted(model):
    a = model.backbone.args
    assert (a.family, a.num_layers, a.hidden_size, a.num_heads, a.kv_heads) == ("llama", 30, 576, 9, 3)
    # the shipped trained router decides which layers route (msa_core/data/routers, model card beside it)
    # it carries a LoRA delta of the upper layers, merged at load: checked against the base backbone's fingerprint
    base = MSAModel.from_pretrained("default", router="native", device="cpu")
    shipped = RouterProjectors.load(DEFAULT_ROUTER, expected_backbone_fingerprint=base.backbone_fingerprint)
    assert model.layers == shipped.layers and model.router.fingerprint() == shipped.fingerprint()
    assert shipped.backbone_delta and model.backbone_fingerprint != base.backbone_fingerprint
    assert model.generator is not model.backbone  # hybrid answers keep the base weights
    assert "tuned" in model.router.init_mode  # v10: projectors trained further on v8's tuned backbone
    assert model.load_seconds < 5.0, f"loading the cached default model took {model.load_seconds:.1f} s"


def test_trained_router_beats_the_native_one_on_the_demo_corpus(model, demo):
    """The shipped router finds more demo gold documents in the top 3 than the untrained native one
    (which found 0 of 7 before training)."""
    records, _ = demo
    questions = json.loads(DEMO_QUESTIONS_PATH.read_text())

    def hits_at_3(m: MSAModel) -> int:
        bank = m.index([r.text for r in records], ids=[r.id for r in records])
        ranked = m.retrieve([q["question"] for q in questions], bank, k=3)
        return sum(q["gold_id"] in {h.id for h in r} for q, r in zip(questions, ranked))

    native = MSAModel.from_pretrained("default", router="native", device="cpu")
    trained, untrained = hits_at_3(model), hits_at_3(native)
    assert trained > untrained, (trained, untrained)


def test_index_and_retrieve_demo_corpus(model, demo):
    records, bank = demo
    info = bank.info()
    assert info["documents"] == len(records) and info["tokens"] > 1000 and info["chunks"] >= len(records)
    questions = json.loads(DEMO_QUESTIONS_PATH.read_text())
    hits = model.retrieve([q["question"] for q in questions], bank, k=len(records))
    for q, ranked in zip(questions, hits):
        assert len(ranked) == len(records)  # every document is scored and ranked
        assert all(-1 <= h.score <= 1 for h in ranked)
        assert q["gold_id"] in {h.id for h in ranked}


def test_answers_in_both_modes(model, demo):
    _, bank = demo
    question = "Who keeps the lighthouse?"
    latent = model.answer(question, bank, mode="latent", k=4, max_new_tokens=12)
    hybrid = model.answer(question, bank, mode="hybrid", k=2, max_new_tokens=12)
    for ans in (latent, hybrid):
        assert ans.text.strip(), ans
        assert ans.doc_ids and len(ans.doc_ids) == len(ans.scores)
    plain = model.answer("What is the capital of France?", None, max_new_tokens=12)
    assert "Paris" in plain.text  # our own decoder runs the real weights correctly


def test_bank_round_trip_with_real_model(model, demo, tmp_path):
    _, bank = demo
    bank.save(tmp_path / "bank")
    loaded = model.load_bank(tmp_path / "bank")
    q = "When does the first ferry leave?"
    assert [h.id for h in model.retrieve(q, loaded, k=5)] == [h.id for h in model.retrieve(q, bank, k=5)]
