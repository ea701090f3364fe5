"""Fusion retrieval: the bank's lexical index (memory/lexical.py), fused ranking (routing/fusion.py) and
MSAModel.retrieve(fusion="bm25", alpha=...)."""

from __future__ import annotations

import json

import pytest
import torch

from msa_core import CorruptBankError, InvalidInputError, MemoryBank, MSAConfig, MSAModel
from msa_core.memory import lexical
from msa_core.memory.lexical import LEXICAL, LexicalIndex
from msa_core.memory.persist import CURRENT, MANIFEST
from msa_core.routing.fusion import METHODS, fuse

DOCS = {
    "light": "The lighthouse of Velmora was built in 1887 by the engineer Ada Quist.",
    "ferry": "Ferries leave the harbour every morning at seven and return at dusk.",
    "paris": "Paris is the capital of France.",
    "cheese": "Cheese from the island is aged in caves for two winters.",
    "harbour": "The harbour master keeps a lighthouse log and a ferry timetable.",
}
QUESTIONS = ["When was the lighthouse built?", "Which ferry leaves the harbour?", "capital of France"]


@pytest.fixture
def model(tiny_model_dir) -> MSAModel:
    cfg = MSAConfig(routing={"top_k": 2}, encode={"chunk_size": 4, "max_doc_tokens": 24})
    return MSAModel.from_pretrained(tiny_model_dir("qwen3"), config=cfg, device="cpu")


@pytest.fixture
def bank(model) -> MemoryBank:
    metas = [{"topic": t} for t in ("town", "travel", "geo", "food", "travel")]
    return model.index(list(DOCS.values()), ids=list(DOCS), metadatas=metas)


def _ranking(scores: torch.Tensor) -> list[list[int]]:
    return torch.sort(scores, dim=1, descending=True, stable=True).indices.tolist()


# ---- the fusion function -----------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_fusion_equals_each_side_at_alpha_one_and_zero(method):
    g = torch.Generator().manual_seed(0)
    latent, lexical_ = torch.randn(4, 30, generator=g), torch.rand(4, 30, generator=g) * 7
    lexical_[:, ::3] = 0.0  # BM25 gives many rows no score at all
    allowed = torch.ones(30, dtype=torch.bool)
    assert _ranking(fuse(latent, lexical_, allowed, 1.0, method)) == _ranking(latent)
    assert _ranking(fuse(latent, lexical_, allowed, 0.0, method)) == _ranking(lexical_)
    mid = _ranking(fuse(latent, lexical_, allowed, 0.5, method))
    assert mid != _ranking(latent) and mid != _ranking(lexical_)  # in between, both sides count


@pytest.mark.parametrize("method", METHODS)
def test_filtered_rows_are_left_out_before_normalising(method):
    g = torch.Generator().manual_seed(1)
    latent, lexical_ = torch.randn(2, 12, generator=g), torch.rand(2, 12, generator=g)
    allowed = torch.zeros(12, dtype=torch.bool)
    allowed[[1, 4, 5, 9]] = True
    fused = fuse(latent, lexical_, allowed, 0.4, method)
    assert torch.isinf(fused[:, ~allowed]).all() and torch.isfinite(fused[:, allowed]).all()
    # A rejected row, however high it scores, changes nothing: same as fusing the kept columns alone.
    latent[:, 0] = lexical_[:, 0] = 1e6
    sub = fuse(latent[:, allowed], lexical_[:, allowed], torch.ones(4, dtype=torch.bool), 0.4, method)
    assert torch.allclose(fuse(latent, lexical_, allowed, 0.4, method)[:, allowed], sub)


def test_fusion_with_a_constant_side_follows_the_other():
    latent = torch.tensor([[0.3, 0.1, 0.2]])
    fused = fuse(latent, torch.zeros(1, 3), torch.ones(3, dtype=torch.bool), 0.5, "minmax")
    assert torch.isfinite(fused).all() and _ranking(fused) == [[0, 2, 1]]


# ---- the engine ---------------------------------------------------------------------------------------

def test_retrieve_fused_equals_each_side_at_the_ends(model, bank):
    lex = bank.lexical_index.scores(QUESTIONS)
    parent = [p.parent_id for p in bank.docstore]  # long documents are split into parts: rows != documents
    for q, lex_row in zip(QUESTIONS, lex):
        plain = model.retrieve(q, bank, k=5)
        latent_only = model.retrieve(q, bank, k=5, fusion="bm25", alpha=1.0)
        assert [h.id for h in latent_only] == [h.id for h in plain]
        assert [h.latent_score for h in latent_only] == pytest.approx([h.score for h in plain], abs=1e-6)
        lexical_only = model.retrieve(q, bank, k=5, fusion="bm25", alpha=0.0)
        rows = torch.sort(lex_row, descending=True, stable=True).indices.tolist()
        best = list(dict.fromkeys(parent[r] for r in rows))  # a document ranks by its best part
        assert [h.id for h in lexical_only] == best
        assert [h.lexical_score for h in lexical_only] == pytest.approx(
            [max(float(lex_row[r]) for r in range(len(parent)) if parent[r] == d) for d in best])
        for h in model.retrieve(q, bank, k=5, fusion="bm25", alpha=0.5):
            assert 0.0 <= h.relevance_score <= 1.0 and h.score == pytest.approx(h.relevance_score)
            assert set(h.to_dict()) >= {"latent_score", "lexical_score"}


def test_lexical_side_finds_the_passage_a_question_names(model, bank):
    hits = model.retrieve("Velmora lighthouse engineer", bank, k=2, fusion="bm25", alpha=0.0)
    assert hits[0].id == "light" and hits[0].lexical_score > 0


def test_default_alpha_comes_from_the_config(model, bank):
    model.config.routing.fusion_alpha = 0.0
    assert [h.id for h in model.retrieve(QUESTIONS[0], bank, k=5, fusion="bm25")] == \
        [h.id for h in model.retrieve(QUESTIONS[0], bank, k=5, fusion="bm25", alpha=0.0)]


def test_filters_apply_to_both_sides(model, bank):
    for alpha in (0.0, 0.5, 1.0):
        hits = model.retrieve("lighthouse harbour ferry", bank, k=5, fusion="bm25", alpha=alpha,
                              filter={"topic": "travel"})
        assert {h.id for h in hits} == {"ferry", "harbour"}
    assert model.retrieve("lighthouse", bank, k=5, fusion="bm25", filter={"topic": "none"}) == []


def test_batch_fusion_equals_one_at_a_time(model, bank):
    together = model.retrieve(QUESTIONS, bank, k=4, fusion="bm25", alpha=0.3)
    for q, got in zip(QUESTIONS, together):
        alone = model.retrieve(q, bank, k=4, fusion="bm25", alpha=0.3)
        assert [h.id for h in got] == [h.id for h in alone]


def test_bad_fusion_arguments_are_refused(model, bank):
    for kw in ({"fusion": "tfidf"}, {"fusion": "bm25", "alpha": 1.5}, {"fusion": "bm25", "alpha": "0.5"},
               {"alpha": 0.5}):
        with pytest.raises(InvalidInputError):
            model.retrieve("lighthouse", bank, **kw)


# ---- the lexical index of the bank ------------------------------------------------------------------------

def _consistent(bank: MemoryBank) -> None:
    index = bank.lexical_index
    fresh = LexicalIndex.from_texts([p.id for p in bank.docstore], [p.text for p in bank.docstore])
    assert index.part_ids == fresh.part_ids and index.tokens == fresh.tokens
    assert torch.equal(index.scores(QUESTIONS), fresh.scores(QUESTIONS))


def test_upsert_and_delete_keep_both_sides_consistent(model, bank):
    _consistent(bank)
    model.add(bank, ["The zeppelin hangar of Velmora burned down in 1921."], ids=["light"])  # upsert
    model.add(bank, ["Turnips are sold at the Tuesday market."], ids=["market"])
    bank.delete(["cheese"])
    _consistent(bank)
    assert model.retrieve("zeppelin hangar", bank, k=1, fusion="bm25", alpha=0.0)[0].id == "light"
    assert all(h.lexical_score == 0 for h in model.retrieve("lighthouse Quist engineer 1887", bank, k=5,
                                                            fusion="bm25", alpha=0.0) if h.id == "light")
    assert "cheese" not in {h.id for h in model.retrieve("cheese caves", bank, k=5, fusion="bm25", alpha=0.0)}


def test_rebuild_tokenises_only_new_texts(model, bank, monkeypatch):
    assert len(bank.lexical_index) == bank.num_parts  # built for the current rows
    seen: list[str] = []
    real = lexical.tokenize
    monkeypatch.setattr(lexical, "tokenize", lambda texts, *a: (seen.extend(texts), real(texts, *a))[1])
    model.add(bank, ["Turnips are sold at the Tuesday market."], ids=["market"])
    assert len(bank.lexical_index) == bank.num_parts
    assert "".join(seen) == "Turnips are sold at the Tuesday market."  # its parts, nothing else


def test_saved_bank_holds_the_index_under_the_manifest_checksums(model, bank, tmp_path, monkeypatch):
    vdir = bank.save(tmp_path / "bank")
    manifest = json.loads((vdir / MANIFEST).read_text())
    assert LEXICAL in manifest["files"] and (vdir / LEXICAL).is_file()
    monkeypatch.setattr(lexical, "tokenize", lambda texts, *a: pytest.fail(f"re-tokenised {texts[:1]}"))
    loaded = model.load_bank(tmp_path / "bank")
    assert loaded.lexical_index.tokens == bank.lexical_index.tokens  # read from the file, not rebuilt


def test_old_bank_without_the_index_loads_and_gets_one(model, bank, tmp_path):
    vdir = bank.save(tmp_path / "bank")
    (vdir / LEXICAL).unlink()  # as a bank saved before the lexical index existed
    manifest = json.loads((vdir / MANIFEST).read_text())
    del manifest["files"][LEXICAL]
    (vdir / MANIFEST).write_text(json.dumps(manifest))
    old = model.load_bank(tmp_path / "bank")
    assert [h.id for h in model.retrieve(QUESTIONS[1], old, k=5, fusion="bm25", alpha=0.3)] == \
        [h.id for h in model.retrieve(QUESTIONS[1], bank, k=5, fusion="bm25", alpha=0.3)]
    new = old.save(tmp_path / "bank")
    assert (new / LEXICAL).is_file()
    assert LEXICAL in json.loads((new / MANIFEST).read_text())["files"]


def test_a_lexical_index_of_other_rows_is_refused(model, bank, tmp_path):
    root = tmp_path / "bank"
    vdir = bank.save(root)
    other = LexicalIndex.from_texts(["a"], ["another text"]).to_bytes()
    (vdir / LEXICAL).write_bytes(other)
    manifest = json.loads((vdir / MANIFEST).read_text())
    import hashlib

    manifest["files"][LEXICAL] = {"sha256": hashlib.sha256(other).hexdigest(), "size": len(other)}
    (vdir / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CorruptBankError, match="lexical.json"):
        MemoryBank.load(root)
    assert (root / CURRENT).is_file()
