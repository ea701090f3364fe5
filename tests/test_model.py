"""The MSAModel facade: index, upsert, delete, retrieve, answer in both modes, bad input."""

from __future__ import annotations

import pytest
import torch

from msa_core import BankMismatchError, InvalidInputError, MemoryBank, MSAConfig, MSAModel

DOCS = {
    "light": "The lighthouse of Velmora was built in 1887 by the engineer Ada Quist.",
    "ferry": "Ferries leave the harbour every morning at seven and return at dusk.",
    "paris": "Paris is the capital of France.",
    "cheese": "Cheese from the island is aged in caves for two winters.",
}


@pytest.fixture
def model(tiny_model_dir) -> MSAModel:
    cfg = MSAConfig(routing={"top_k": 2}, encode={"chunk_size": 4, "max_doc_tokens": 24})
    return MSAModel.from_pretrained(tiny_model_dir("qwen3"), config=cfg, device="cpu")


@pytest.fixture
def bank(model) -> MemoryBank:
    metas = [{"topic": t, "year": y} for t, y in [("town", 1887), ("travel", 2020), ("geo", 1900), ("food", 2001)]]
    return model.index(list(DOCS.values()), ids=list(DOCS), metadatas=metas)


def test_retrieve_ranks_all_documents_with_readable_scores(model, bank):
    hits = model.retrieve("When was the lighthouse built?", bank, k=10, layer_scores=True)
    assert sorted(h.id for h in hits) == sorted(DOCS)  # k above the bank size returns all
    scores = [h.score for h in hits]
    assert scores == sorted(scores, reverse=True)
    for h in hits:
        assert -1.0 <= h.score <= 1.0 and 0.0 <= h.relevance_score <= 1.0
        assert h.relevance_score == pytest.approx((h.score + 1) / 2, abs=1e-6)
        assert set(h.layer_scores) == set(model.layers)
        assert h.score == pytest.approx(sum(h.layer_scores.values()) / len(model.layers), abs=1e-5)
        assert h.text == DOCS[h.id]


def test_batch_of_questions_equals_one_at_a_time(model, bank):
    questions = ["When was the lighthouse built?", "What is the capital of France and where is it?"]
    together = model.retrieve(questions, bank, k=4)
    for q, got in zip(questions, together):
        alone = model.retrieve(q, bank, k=4)
        assert [h.id for h in got] == [h.id for h in alone]
        assert [h.score for h in got] == pytest.approx([h.score for h in alone], abs=1e-5)


def test_filters_apply_before_ranking(model, bank):
    assert {h.id for h in model.retrieve("lighthouse", bank, k=4, filter={"year": {"$gte": 2000}})} == {"ferry", "cheese"}
    assert [h.id for h in model.retrieve("x", bank, k=4, filter=lambda m: m["topic"] == "geo")] == ["paris"]
    assert model.retrieve("x", bank, k=4, filter={"topic": {"$in": ["none"]}}) == []


def test_upsert_and_delete_keep_other_documents_untouched(model, bank):
    before = {h.id: h.score for h in model.retrieve("the harbour", bank, k=4)}
    model.add(bank, ["Paris is a city on the Seine."], ids=["paris"])
    assert len(bank) == 4 and bank.get(["paris"])[0]["text"] == "Paris is a city on the Seine."
    after = {h.id: h.score for h in model.retrieve("the harbour", bank, k=4)}
    for doc in ("light", "ferry", "cheese"):
        assert after[doc] == pytest.approx(before[doc], abs=1e-6)
    assert bank.delete(["paris", "missing"]) == 1
    assert len(bank) == 3 and "paris" not in {h.id for h in model.retrieve("Paris", bank, k=4)}


def test_long_documents_split_into_parts_and_return_the_parent(model):
    long_text = " ".join(DOCS.values()) * 3
    bank = model.index([long_text, DOCS["paris"]], ids=["long", "p"])
    assert len(bank) == 2 and bank.num_parts > 2
    hits = model.retrieve("the lighthouse", bank, k=5)
    assert {h.id for h in hits} == {"long", "p"}
    assert next(h for h in hits if h.id == "long").text == long_text
    parts = model.retrieve("the lighthouse", bank, k=50, include_parts=True)
    assert {h.id for h in parts} >= {"long#0", "long#1"}


def test_answer_latent_and_hybrid_report_documents(model, bank):
    latent = model.answer("Who built the lighthouse?", bank, mode="latent", k=2, max_new_tokens=5)
    assert latent.mode == "latent" and 2 <= len(latent.doc_ids) <= 4
    assert set(latent.layer_selections) == set(model.layers)
    assert all(len(ids) == 2 for ids in latent.layer_selections.values())
    prompts = []

    def echo(prompt: str):
        prompts.append(prompt)
        yield "Ada "
        yield "Quist"

    hybrid = model.answer("Who built the lighthouse?", bank, mode="hybrid", k=2, generator=echo)
    assert hybrid.text == "Ada Quist" and len(hybrid.doc_ids) == 2
    top2 = [h.id for h in model.retrieve("Who built the lighthouse?", bank, k=2)]
    assert hybrid.doc_ids == top2
    assert all(DOCS[i] in prompts[0] for i in top2)
    own = model.answer("Who built the lighthouse?", bank, mode="hybrid", k=1, max_new_tokens=4)
    assert own.finish_reason in {"length", "eos"} and len(own.doc_ids) == 1
    plain = model.answer("Hello", None, max_new_tokens=3)
    assert plain.doc_ids == []


def test_bad_input_is_rejected_clearly(model, bank):
    with pytest.raises(InvalidInputError, match="k must be"):
        model.retrieve("q", bank, k=0)
    with pytest.raises(InvalidInputError, match="empty"):
        model.retrieve("  ", bank)
    with pytest.raises(InvalidInputError, match="empty"):
        model.add(bank, ["ok", "  "], ids=["x", "y"])
    assert "x" not in bank  # nothing from a failed call lands
    with pytest.raises(InvalidInputError, match="duplicate"):
        model.add(bank, ["a", "b"], ids=["same", "same"])
    with pytest.raises(InvalidInputError, match="single string"):
        model.index("just one string")
    with pytest.raises(InvalidInputError, match="mode"):
        model.answer("q", bank, mode="other")
    with pytest.raises(InvalidInputError):
        model.answer("q", None, mode="hybrid")


def test_bank_round_trip_and_other_model_refused(model, bank, tmp_path, tiny_model_dir):
    bank.save(tmp_path / "bank")
    loaded = model.load_bank(tmp_path / "bank")
    assert loaded.ids() == bank.ids()
    assert [h.id for h in model.retrieve("ferry", loaded, k=4)] == [h.id for h in model.retrieve("ferry", bank, k=4)]
    other = MSAModel.from_pretrained(tiny_model_dir("qwen3"), router="random",
                                     config=MSAConfig(encode={"chunk_size": 4}), device="cpu")
    with pytest.raises(BankMismatchError, match="router"):
        other.load_bank(tmp_path / "bank")
    different_backbone = MSAModel.from_pretrained(tiny_model_dir("llama"), config=MSAConfig(encode={"chunk_size": 4}))
    with pytest.raises(BankMismatchError):
        different_backbone.retrieve("q", bank)


def test_empty_bank_retrieves_nothing(model):
    assert model.retrieve("anything", model.new_bank(), k=3) == []
    assert torch.is_tensor(model.new_bank().kr_bar)


def test_k_zero_is_an_error_in_every_mode(model, bank):
    for mode in ("latent", "hybrid"):
        with pytest.raises(InvalidInputError, match="k must be"):
            model.answer("q", bank, mode=mode, k=0)


def test_router_file_round_trip_sets_routing_layers(model, tmp_path, tiny_model_dir):
    from msa_core import RouterProjectors
    from msa_core.errors import ModelLoadError

    a = model.backbone.args
    trained = RouterProjectors.random([1, 3], a.hidden_size, a.num_heads, a.kv_heads, a.head_dim, seed=5)
    trained.save(tmp_path / "router.safetensors", backbone_fingerprint=model.backbone_fingerprint)
    loaded = MSAModel.from_pretrained(tiny_model_dir("qwen3"), router=tmp_path / "router.safetensors")
    assert loaded.layers == [1, 3] and loaded.router_fingerprint == trained.fingerprint()
    with pytest.raises(ModelLoadError, match="another backbone"):
        MSAModel.from_pretrained(tiny_model_dir("llama"), router=tmp_path / "router.safetensors")
    with pytest.raises(ModelLoadError, match="covers layers"):
        MSAModel.from_pretrained(tiny_model_dir("qwen3"), router=tmp_path / "router.safetensors",
                                 config=MSAConfig(routing={"layers": [2, 3]}))


def test_router_with_another_head_layout_is_refused_at_load(model, tmp_path, tiny_model_dir):
    from msa_core import RouterProjectors
    from msa_core.errors import ModelLoadError

    a = model.backbone.args
    wide = RouterProjectors.random([1, 3], a.hidden_size, a.num_heads, a.num_heads, a.head_dim, seed=5)
    assert a.kv_heads != a.num_heads  # the tiny model uses GQA, so this router's keys are wider
    wide.save(tmp_path / "wide.safetensors", backbone_fingerprint=model.backbone_fingerprint)
    with pytest.raises(ModelLoadError, match=f"{a.num_heads} key heads.*routing keys in that layout"):
        MSAModel.from_pretrained(tiny_model_dir("qwen3"), router=tmp_path / "wide.safetensors")


def test_router_fingerprint_follows_in_place_and_replaced_weights(model):
    before = model.router_fingerprint
    assert model.router_fingerprint == before  # cached: the same value again
    layer = model.router.layers[0]
    with torch.no_grad():
        model.router.k_weight(layer).mul_(2.0)  # an in-place update must not be missed
    changed = model.router_fingerprint
    assert changed != before and changed == model.router.fingerprint()
    model.router = model.router.copy(init_mode="custom")
    with torch.no_grad():
        model.router.k_weight(layer).div_(2.0)
    assert model.router_fingerprint == before == model.router.fingerprint()
