"""Batched answers (MSAModel.answer_batch, generate_batch): each row equals its question answered alone."""

from __future__ import annotations

import pytest

from msa_core.config import MSAConfig
from msa_core.model import MSAModel

DOCS = ["The lighthouse of Velmora was built in 1887 by the engineer Ada Quist.",
        "Ferries leave the harbour every morning at seven and return at dusk.",
        "Paris is the capital of France, and its museums are famous.",
        "Cheese from the sea caves is aged for nine weeks before it is sold."]
QUESTIONS = ["Who built the lighthouse?", "When do the ferries leave the harbour every morning?", "Capital?"]


@pytest.fixture(scope="module")
def model(tiny_model_dir) -> MSAModel:
    cfg = MSAConfig(routing={"layers": [2, 3], "top_k": 2}, encode={"chunk_size": 4, "storage_dtype": "float32"})
    return MSAModel.from_pretrained(tiny_model_dir("qwen2"), router="random", config=cfg, device="cpu")


def _same(batch, alone) -> None:
    assert [a.text for a in batch] == [a.text for a in alone]
    assert [a.doc_ids for a in batch] == [a.doc_ids for a in alone]
    assert [a.finish_reason for a in batch] == [a.finish_reason for a in alone]
    assert [a.layer_selections for a in batch] == [a.layer_selections for a in alone]
    for b, a in zip(batch, alone):
        assert b.scores == pytest.approx(a.scores, abs=1e-5)


@pytest.mark.parametrize("mode", ["latent", "hybrid"])
def test_a_batch_equals_each_question_alone(model, mode):
    bank = model.index(DOCS, ids=["a", "b", "c", "d"], metadatas=[{"n": i} for i in range(4)])
    kw = {"mode": mode, "k": 2, "max_new_tokens": 10, "filter": {"n": {"$gte": 1}}}
    _same(model.answer_batch(QUESTIONS, bank, **kw), [model.answer(q, bank, **kw) for q in QUESTIONS])


def test_rows_that_end_early_leave_the_others_going(model):
    bank = model.index(DOCS, ids=["a", "b", "c", "d"])
    first = model.answer(QUESTIONS[0], bank, k=2, max_new_tokens=4)
    saved = model.eos_ids
    try:
        model.eos_ids = [model.tokenizer(first.text, add_special_tokens=False)["input_ids"][1]]  # row 0 ends at 2
        batch = model.answer_batch(QUESTIONS, bank, k=2, max_new_tokens=8)
        alone = [model.answer(q, bank, k=2, max_new_tokens=8) for q in QUESTIONS]
    finally:
        model.eos_ids = saved
    assert batch[0].finish_reason == "eos"
    _same(batch, alone)


def test_no_bank_and_an_empty_batch(model):
    assert model.answer_batch([], None) == []
    plain = model.answer_batch(QUESTIONS[:2], None, max_new_tokens=6)
    assert [a.text for a in plain] == [model.answer(q, None, max_new_tokens=6).text for q in QUESTIONS[:2]]
