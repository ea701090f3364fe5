"""Answers over the fused top-k (inference/fused_answers.py): latent answers attend to one fused selection in
every routing layer, hybrid answers put the fused top-k's texts into the prompt."""

from __future__ import annotations

import pytest
import torch

from msa_core import InvalidInputError, MemoryBank, MSAConfig, MSAModel
from msa_core.inference.generate import hybrid_text

DOCS = {
    "light": "The lighthouse of Velmora was built in 1887 by the engineer Ada Quist.",
    "ferry": "Ferries leave the harbour every morning at seven and return at dusk.",
    "paris": "Paris is the capital of France.",
    "cheese": "Cheese from the island is aged in caves for two winters.",
    "harbour": "The harbour master keeps a lighthouse log and a ferry timetable.",
    "caves": "The caves of the island hold cheese, wine and old ferry ropes.",
}
TOPICS = ("town", "travel", "geo", "food", "travel", "food")
QUESTIONS = ["When was the lighthouse built?", "Which ferry leaves the harbour?", "Velmora engineer Ada Quist"]
K = 2


def _model(tiny_model_dir, **routing) -> MSAModel:
    cfg = MSAConfig(routing={"top_k": K, **routing}, encode={"chunk_size": 4, "max_doc_tokens": 64})
    return MSAModel.from_pretrained(tiny_model_dir("qwen3"), config=cfg, device="cpu")


def _bank(model: MSAModel) -> MemoryBank:
    bank = model.index(list(DOCS.values()), ids=list(DOCS), metadatas=[{"topic": t} for t in TOPICS])
    assert bank.num_parts == len(DOCS)  # one part per document: rows are documents
    return bank


@pytest.fixture(scope="module")
def model(tiny_model_dir) -> MSAModel:
    return _model(tiny_model_dir)


@pytest.fixture(scope="module")
def bank(model) -> MemoryBank:
    return _bank(model)


def _bm25_top(bank: MemoryBank, question: str, k: int) -> list[str]:
    scores = bank.lexical_index.scores([question])[0]
    rows = torch.sort(scores, descending=True, stable=True).indices[:k].tolist()
    return [bank.docstore[r].id for r in rows]


def _ids(hits) -> list[str]:
    return [h.id for h in hits]


def _approx_record(record: dict) -> dict:
    return {key: pytest.approx(v) if key.endswith("_scores") else v for key, v in record.items()}


def _recorder():
    """A hybrid generator that records its prompts and answers "ok"."""
    prompts: list[str] = []
    return prompts, lambda prompt: prompts.append(prompt) or "ok"


# ---- latent answers ---------------------------------------------------------------------------------------

def test_alpha_one_equals_the_plain_latent_answer_where_layers_agree(tiny_model_dir):
    # One routing layer: routing's aggregated ranking is that layer's ranking, so the fused selection at
    # alpha 1 is what the plain answer attends to, and the answers are the same tokens.
    model = _model(tiny_model_dir, layers=[2])
    bank = _bank(model)
    for q in QUESTIONS:
        plain = model.answer(q, bank, k=K, max_new_tokens=12)
        fused = model.answer(q, bank, k=K, max_new_tokens=12, fusion="bm25", alpha=1.0)
        assert fused.text == plain.text and fused.finish_reason == plain.finish_reason
        assert fused.layer_selections == plain.layer_selections
        assert fused.doc_ids == plain.doc_ids
        assert fused.doc_ids == _ids(model.retrieve(q, bank, k=K))


def test_alpha_one_with_every_document_attended_equals_the_plain_answer(model, bank):
    k = len(DOCS)  # every layer attends to every document either way
    for q in QUESTIONS:
        plain = model.answer(q, bank, k=k, max_new_tokens=12)
        fused = model.answer(q, bank, k=k, max_new_tokens=12, fusion="bm25", alpha=1.0)
        assert fused.text == plain.text and sorted(fused.doc_ids) == sorted(plain.doc_ids)


def test_every_routing_layer_attends_to_the_fused_top_k(model, bank):
    assert len(model.layers) > 1
    for q in QUESTIONS:
        for alpha in (0.0, 0.4, 1.0):
            expected = _ids(model.retrieve(q, bank, k=K, fusion="bm25", alpha=alpha))
            answer = model.answer(q, bank, k=K, max_new_tokens=4, fusion="bm25", alpha=alpha)
            assert answer.doc_ids == expected
            assert set(answer.layer_selections) == set(model.layers)
            for selected in answer.layer_selections.values():
                assert sorted(selected) == sorted(expected)


def test_alpha_zero_attends_to_bm25s_top_k(model, bank):
    for q in QUESTIONS:
        answer = model.answer(q, bank, k=K, max_new_tokens=4, fusion="bm25", alpha=0.0)
        assert answer.doc_ids == _bm25_top(bank, q, K)
        for selected in answer.layer_selections.values():
            assert sorted(selected) == sorted(_bm25_top(bank, q, K))
    named = model.answer("Velmora engineer Ada Quist", bank, k=1, max_new_tokens=4, fusion="bm25", alpha=0.0)
    assert named.doc_ids == ["light"]


def test_fused_answer_changes_the_generation(model, bank):
    # Attending to other documents changes what the model reads: some question's answer differs between
    # routing's own choice and BM25's where their top-k differ.
    differing = [q for q in QUESTIONS
                 if set(_ids(model.retrieve(q, bank, k=K))) != set(_bm25_top(bank, q, K))]
    assert differing
    texts = {(model.answer(q, bank, k=K, max_new_tokens=12, fusion="bm25", alpha=0.0).text,
              model.answer(q, bank, k=K, max_new_tokens=12, fusion="bm25", alpha=1.0).text) for q in differing}
    assert any(a != b for a, b in texts)


def test_the_answer_records_the_fused_selection(model, bank):
    q = QUESTIONS[1]
    hits = model.retrieve(q, bank, k=K, fusion="bm25", alpha=0.3)
    answer = model.answer(q, bank, k=K, max_new_tokens=4, fusion="bm25", alpha=0.3)
    assert answer.scores == pytest.approx([h.score for h in hits])
    assert answer.fusion == {"fusion": "bm25", "alpha": 0.3, "method": model.config.routing.fusion_method,
                             "latent_scores": pytest.approx([h.latent_score for h in hits]),
                             "lexical_scores": pytest.approx([h.lexical_score for h in hits])}
    d = answer.to_dict()
    assert d["fusion"]["alpha"] == 0.3 and set(d["layer_selections"]) == {str(layer) for layer in model.layers}
    assert "fusion" not in model.answer(q, bank, k=K, max_new_tokens=4).to_dict()


def test_default_alpha_comes_from_the_config(tiny_model_dir):
    model = _model(tiny_model_dir, fusion_alpha=0.0)
    bank = _bank(model)
    answer = model.answer(QUESTIONS[0], bank, k=K, max_new_tokens=4, fusion="bm25")
    assert answer.fusion["alpha"] == 0.0 and answer.doc_ids == _bm25_top(bank, QUESTIONS[0], K)


def test_filters_apply_before_fusing(model, bank):
    for alpha in (0.0, 1.0):
        answer = model.answer("lighthouse ferry cheese", bank, k=K, max_new_tokens=4, fusion="bm25", alpha=alpha,
                              filter={"topic": "food"})
        assert sorted(answer.doc_ids) == ["caves", "cheese"]
    none = model.answer("lighthouse", bank, k=K, max_new_tokens=4, fusion="bm25", filter={"topic": "none"})
    plain = model.answer("lighthouse", bank, k=K, max_new_tokens=4, filter={"topic": "none"})
    assert none.doc_ids == [] and not any(none.layer_selections.values()) and none.text == plain.text


def test_stream_and_batch_equal_one_answer(model, bank):
    kw = {"k": K, "max_new_tokens": 8, "fusion": "bm25", "alpha": 0.2}
    alone = [model.answer(q, bank, **kw) for q in QUESTIONS]
    stream = model.stream_answer(QUESTIONS[0], bank, **kw)
    assert "".join(stream) == alone[0].text and stream.result.doc_ids == alone[0].doc_ids
    for got, want in zip(model.answer_batch(QUESTIONS, bank, **kw), alone):
        assert (got.text, got.doc_ids, got.layer_selections) == (want.text, want.doc_ids, want.layer_selections)
        assert got.fusion == _approx_record(want.fusion)  # batched scoring may differ in the last bits


def test_without_documents_a_fused_answer_is_plain_generation(model):
    empty = model.new_bank()
    plain = model.answer(QUESTIONS[0], None, max_new_tokens=6)
    for bank in (None, empty):
        answer = model.answer(QUESTIONS[0], bank, max_new_tokens=6, fusion="bm25", alpha=0.5)
        assert answer.text == plain.text and answer.doc_ids == []


def test_reference_profile_latent_answer_attends_to_the_fused_top_k(tiny_msa_dir):
    model = MSAModel.from_pretrained(tiny_msa_dir(), device="cpu")
    bank = model.index(list(DOCS.values()), ids=list(DOCS))
    rows = bank.num_parts
    for q in QUESTIONS[:2]:
        expected = _ids(model.retrieve(q, bank, k=K, fusion="bm25", alpha=0.0))
        answer = model.answer(q, bank, k=K, max_new_tokens=4, fusion="bm25", alpha=0.0)
        assert answer.doc_ids == expected and answer.layer_selections
        for selected in answer.layer_selections.values():
            assert sorted(selected) == sorted(expected)
    assert rows == bank.num_parts


# ---- hybrid answers -----------------------------------------------------------------------------------------

def test_hybrid_answer_puts_the_fused_top_k_text_in_the_prompt(model, bank):
    for alpha in (0.0, 0.5, 1.0):
        for q in QUESTIONS:
            prompts, generator = _recorder()
            answer = model.answer(q, bank, mode="hybrid", k=K, fusion="bm25", alpha=alpha, generator=generator)
            hits = model.retrieve(q, bank, k=K, fusion="bm25", alpha=alpha)
            assert prompts == [hybrid_text(q, [h.text for h in hits])]
            assert answer.doc_ids == _ids(hits) and answer.scores == pytest.approx([h.score for h in hits])
            assert answer.fusion["lexical_scores"] == pytest.approx([h.lexical_score for h in hits])
    prompts, generator = _recorder()
    model.answer("Velmora engineer Ada Quist", bank, mode="hybrid", k=1, fusion="bm25", alpha=0.0, generator=generator)
    assert DOCS["light"] in prompts[0] and all(DOCS[d] not in prompts[0] for d in DOCS if d != "light")


def test_hybrid_batch_with_fusion_equals_one_at_a_time(model, bank):
    kw = {"mode": "hybrid", "k": K, "max_new_tokens": 6, "fusion": "bm25", "alpha": 0.0}
    for got, q in zip(model.answer_batch(QUESTIONS, bank, **kw), QUESTIONS):
        want = model.answer(q, bank, **kw)
        assert (got.text, got.doc_ids) == (want.text, want.doc_ids) and got.fusion == _approx_record(want.fusion)
        assert got.doc_ids == _bm25_top(bank, q, K)


# ---- bad input ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw, says", [
    ({"fusion": "tfidf"}, "fusion must be"), ({"fusion": "bm25", "alpha": 1.5}, "alpha must be"),
    ({"fusion": "bm25", "alpha": "0.5"}, "alpha must be"), ({"alpha": 0.5}, "needs fusion='bm25'"),
])
@pytest.mark.parametrize("mode", ["latent", "hybrid"])
def test_bad_fusion_arguments_are_refused(model, bank, kw, says, mode):
    with pytest.raises(InvalidInputError, match=says):
        model.answer(QUESTIONS[0], bank, mode=mode, max_new_tokens=2, **kw)
    with pytest.raises(InvalidInputError, match=says):
        model.answer_batch(QUESTIONS, bank, mode=mode, max_new_tokens=2, **kw)


def test_interleave_refuses_fusion(model, bank):
    with pytest.raises(InvalidInputError, match="interleave"):
        model.stream_answer(QUESTIONS[0], bank, mode="interleave", fusion="bm25")
