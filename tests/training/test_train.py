"""Router training: the loss, the cached states against the engine's own retrieval, learning, determinism,
checkpoints and resumption, data handling and the CLI. Tiny random models; seconds each."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from msa_core.cli.main import main
from msa_core.config import MSAConfig
from msa_core.errors import InvalidInputError
from msa_core.model import MSAModel
from msa_core.routing.projectors import RouterProjectors
from msa_core.training.cache import cache_documents, cache_queries
from msa_core.training.data import load_pairs
from msa_core.training.run import prepare_trainer, train_router
from msa_core.training.trainer import (
    RouterTrainer,
    TrainConfig,
    choose_layers,
    decoupled_infonce,
    evaluate,
    layer_doc_scores,
    teacher_kl,
)

_SYLLABLES = ["ka", "lo", "mi", "ru", "te", "zu", "po", "na", "vi", "shi", "bo", "de", "fa", "gu", "ye"]
_FILLER = ["of", "and", "in", "to", "a", "is", "the", "on", "at", "by"]


# ---- the loss -------------------------------------------------------------------------------------


def test_decoupled_infonce_matches_hand_computation():
    scores = torch.tensor([[0.5, 0.2, -0.1], [0.1, 0.3, 0.0]])
    positive = torch.tensor([[True, False, False], [False, True, True]])
    # tau = 0.1: logits are scores * 10. Row 1 has two positives; each competes with the negative only.
    row0 = -math.log(math.exp(5) / (math.exp(5) + math.exp(2) + math.exp(-1)))
    row1_a = -math.log(math.exp(3) / (math.exp(3) + math.exp(1)))
    row1_b = -math.log(math.exp(0) / (math.exp(0) + math.exp(1)))
    expected = (row0 + row1_a + row1_b) / 3
    assert decoupled_infonce(scores, positive, tau=0.1).item() == pytest.approx(expected, rel=1e-6)


def test_decoupled_infonce_other_positives_are_not_negatives():
    """Raising a second positive's score must not change the first positive's term."""
    base = torch.tensor([[0.4, 0.1, 0.0]])
    positive = torch.tensor([[True, True, False]])
    a = decoupled_infonce(base, positive, tau=0.1)
    b = decoupled_infonce(torch.tensor([[0.4, 0.9, 0.0]]), positive, tau=0.1)
    first = -math.log(math.exp(4) / (math.exp(4) + math.exp(0)))
    assert a.item() == pytest.approx((first + -math.log(math.exp(1) / (math.exp(1) + 1))) / 2, rel=1e-6)
    assert b.item() == pytest.approx((first + -math.log(math.exp(9) / (math.exp(9) + 1))) / 2, rel=1e-6)


def test_decoupled_infonce_rejects_batches_without_positives():
    with pytest.raises(InvalidInputError, match="positive"):
        decoupled_infonce(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.bool))


def test_teacher_kl_matches_hand_computation_and_skips_unscored_rows():
    scores = torch.tensor([[0.3, 0.1, -0.2, 0.9], [0.5, 0.2, 0.0, 0.0], [0.1, 0.1, 0.1, 0.1]])
    inf = float("-inf")
    teacher = torch.tensor([[0.8, 0.4, 0.1, inf], [0.7, inf, inf, inf], [inf, inf, inf, inf]])
    got = teacher_kl(scores, teacher, tau=0.1, teacher_tau=0.05)
    p = torch.softmax(teacher[0, :3] / 0.05, 0)
    q = torch.softmax(scores[0, :3] / 0.1, 0)  # the unscored 4th document is not in the student's softmax
    assert torch.allclose(got, (p * (p / q).log()).sum(), atol=1e-6)  # rows 1 and 2 score < 2 documents
    same = teacher_kl(teacher[:1, :3] * 2, teacher[:1, :3], tau=0.1, teacher_tau=0.05)
    assert same.abs().item() < 1e-6  # the same distribution: nothing to learn
    assert teacher_kl(scores, torch.full_like(scores, inf), tau=0.1, teacher_tau=0.05) is None


# ---- a separable synthetic task -------------------------------------------------------------------


def _keys(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    keys: list[str] = []
    while len(keys) < n:
        k = "".join(rng.sample(_SYLLABLES, 3))
        if k not in keys:
            keys.append(k)
    return keys


@pytest.fixture(scope="module")
def keyword_model_dir(tmp_path_factory):
    """A tiny random Llama whose tokenizer knows 200 made-up keywords as whole tokens."""
    from tiny import hf_config, save_tiny_tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tmp_path_factory.mktemp("keyword-model")
    keys = _keys(200)
    save_tiny_tokenizer(path, sentences=[" ".join(keys[i:i + 10]) for i in range(0, len(keys), 10)]
                        + [" ".join(_FILLER) + " ?"], vocab_size=3000)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_config("llama", len(AutoTokenizer.from_pretrained(str(path)))),
                                             dtype=torch.float32)
    model.save_pretrained(str(path))
    return path


def _keyword_pairs(path: Path, n: int = 100, seed: int = 0) -> list[dict]:
    """Each document hides one keyword among filler words; its question names the keyword."""
    rng = random.Random(seed)
    rows = []
    for k in _keys(n, seed):
        words = [rng.choice(_FILLER) for _ in range(rng.randint(4, 14))]
        words.insert(rng.randint(0, len(words)), k)
        rows.append({"query": f"{k}?", "positive": " ".join(words)})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return rows


def _recall_at_5(model: MSAModel, rows: list[dict]) -> float:
    bank = model.index([r["positive"] for r in rows], ids=[str(i) for i in range(len(rows))])
    hits = model.retrieve([r["query"] for r in rows], bank, k=5)
    return sum(str(i) in {h.id for h in hs} for i, hs in enumerate(hits)) / len(rows)


def test_tiny_model_learns_a_separable_task(keyword_model_dir, tmp_path):
    """Recall@5 of the trained router, through the engine's own index/retrieve, goes from chance to > 0.9."""
    rows = _keyword_pairs(tmp_path / "pairs.jsonl")
    before = _recall_at_5(MSAModel.from_pretrained(str(keyword_model_dir)), rows)
    model = MSAModel.from_pretrained(str(keyword_model_dir))
    config = TrainConfig(steps=150, batch_size=64, lr=1e-2, warmup_steps=10, heldout_fraction=0.0,
                         bm25_depth=10, hard_negatives=2, mine_at=[0.5])
    report = train_router(model, [tmp_path / "pairs.jsonl"], tmp_path / "router.safetensors", config,
                          log=lambda m: None)
    after = _recall_at_5(MSAModel.from_pretrained(str(keyword_model_dir), router=tmp_path / "router.safetensors"),
                         rows)
    assert before < 0.2  # chance is 5/100
    assert after > 0.9, (before, after)
    assert report.steps == 150 and (tmp_path / "router.md").is_file()


# ---- cached states equal the engine's own --------------------------------------------------------


@pytest.fixture(scope="module")
def fp32_model(tiny_model_dir):
    cfg = MSAConfig.model_validate({"encode": {"storage_dtype": "float32"}})
    return MSAModel.from_pretrained(str(tiny_model_dir("llama")), router="random", config=cfg)


_DOCS = ["The lighthouse of Velmora was built in 1887 by the engineer Ada Quist. " * 5,
         "Ferries leave the harbour every morning at seven.",
         "What is the capital of France? Paris is the capital of France. " * 9,
         "Memory sparse attention routes a question to the documents it needs."]
_QUESTIONS = ["Who built the lighthouse?", "When do ferries leave the harbour every morning?"]


def _states(model: MSAModel):
    docs = cache_documents(model.backbone, model.tokenizer, _DOCS, model.layers, chunk_size=16,
                           dtype=torch.float32)
    qs = cache_queries(model.backbone, model.tokenizer, _QUESTIONS, model.layers,
                       position_offset=model.position_offset(model.config.routing.top_k), dtype=torch.float32)
    return docs, qs


def test_cached_document_states_give_the_banks_routing_keys(fp32_model, tiny_model_dir):
    cfg = MSAConfig.model_validate({"encode": {"storage_dtype": "float32", "chunk_size": 16}})
    model = MSAModel.from_pretrained(str(tiny_model_dir("llama")), router="random", config=cfg)
    bank = model.index(_DOCS, ids=[str(i) for i in range(len(_DOCS))])
    docs, _ = _states(model)
    assert docs.x.shape[0] == bank.kr_bar.shape[1]
    for li, layer in enumerate(model.layers):
        keys = model.router.project_keys(layer, docs.x[:, li])
        torch.testing.assert_close(keys, bank.kr_bar[li], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("query_reduce", ["max", "colbert"])
def test_training_scores_equal_retrieval_scores(tiny_model_dir, query_reduce):
    """layer_doc_scores on cached states == the per-layer scores `retrieve` reports (the loss trains
    exactly what retrieval ranks by), for Eq. 2 and for routing v2's ColBERT order."""
    cfg = MSAConfig.model_validate({"encode": {"storage_dtype": "float32", "chunk_size": 16},
                                    "routing": {"query_reduce": query_reduce}})
    model = MSAModel.from_pretrained(str(tiny_model_dir("llama")), router="random", config=cfg)
    bank = model.index(_DOCS, ids=[str(i) for i in range(len(_DOCS))])
    docs, qs = _states(model)
    hits = model.retrieve(_QUESTIONS, bank, k=len(_DOCS), layer_scores=True)
    all_docs = list(range(len(_DOCS)))
    d_x, owner = docs.flat(all_docs)
    q_x, q_mask = qs.padded([0, 1])
    for li, layer in enumerate(model.layers):
        scores = layer_doc_scores(model.router, layer, q_x[:, :, li], q_mask, d_x[:, li], owner, len(_DOCS),
                                  model.config.routing)
        for b, ranked in enumerate(hits):
            for h in ranked:
                assert scores[b, int(h.id)].item() == pytest.approx(h.layer_scores[layer], abs=1e-5)


def test_long_questions_keep_their_first_routing_tokens(fp32_model):
    long = " ".join(["lighthouse"] * 300)
    qs = cache_queries(fp32_model.backbone, fp32_model.tokenizer, [long, "short?"], fp32_model.layers,
                       max_query_tokens=32, dtype=torch.float32)
    assert qs.lengths().tolist()[0] == 32 and 0 < qs.lengths().tolist()[1] < 32


# ---- determinism, checkpoints, resumption ---------------------------------------------------------


def _trainer(model: MSAModel, data: Path, config: TrainConfig, ckpt: Path | None = None) -> RouterTrainer:
    return prepare_trainer(model, [data], config, checkpoint_dir=ckpt, log=lambda m: None)[0]


@pytest.fixture(scope="module")
def keyword_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("kw") / "pairs.jsonl"
    _keyword_pairs(path, n=60, seed=1)
    return path


def test_training_is_deterministic_under_a_seed(keyword_model_dir, keyword_data):
    model = MSAModel.from_pretrained(str(keyword_model_dir))
    config = TrainConfig(steps=8, batch_size=16, lr=1e-2, warmup_steps=2, heldout_fraction=0.0, bm25_depth=5,
                         mine_at=[0.5])
    a, b = _trainer(model, keyword_data, config), _trainer(model, keyword_data, config)
    a.run()
    b.run()
    assert a.router.fingerprint() == b.router.fingerprint()
    c = _trainer(model, keyword_data, config.model_copy(update={"seed": 1}))
    c.run()
    assert c.router.fingerprint() != a.router.fingerprint()


def test_resumed_training_equals_uninterrupted(keyword_model_dir, keyword_data, tmp_path):
    model = MSAModel.from_pretrained(str(keyword_model_dir))
    config = TrainConfig(steps=8, batch_size=16, lr=1e-2, warmup_steps=2, heldout_fraction=0.0, bm25_depth=5,
                         mine_at=[0.25], checkpoint_every=4)
    straight = _trainer(model, keyword_data, config)
    straight.run()
    interrupted = _trainer(model, keyword_data, config, tmp_path / "ckpt")
    interrupted.run(stop_at=5)  # checkpoint at step 4, then "killed" after step 5
    resumed = _trainer(model, keyword_data, config, tmp_path / "ckpt")
    assert resumed.load_checkpoint() and resumed.step == 4
    resumed.run()
    assert resumed.router.fingerprint() == straight.router.fingerprint()
    assert (tmp_path / "ckpt" / "LATEST").read_text() == "step-000008"


def test_corrupt_checkpoint_is_a_clear_error(keyword_model_dir, keyword_data, tmp_path):
    model = MSAModel.from_pretrained(str(keyword_model_dir))
    config = TrainConfig(steps=2, batch_size=16, heldout_fraction=0.0, bm25_depth=0, checkpoint_every=2)
    _trainer(model, keyword_data, config, tmp_path / "ckpt").run()
    (tmp_path / "ckpt" / "step-000002" / "router.safetensors").write_bytes(b"garbage")
    with pytest.raises(InvalidInputError, match="step-000002"):
        _trainer(model, keyword_data, config, tmp_path / "ckpt").load_checkpoint()


# ---- evaluation and layer choice -------------------------------------------------------------------


def test_layer_choice_and_evaluation_of_a_subset(keyword_model_dir, tmp_path):
    model = MSAModel.from_pretrained(str(keyword_model_dir), config={"routing": {"layers": [1, 2, 3]}})
    rows = _keyword_pairs(tmp_path / "p.jsonl", n=40)
    data = load_pairs([tmp_path / "p.jsonl"])
    docs = cache_documents(model.backbone, model.tokenizer, data.documents, model.layers, dtype=torch.float32)
    qs = cache_queries(model.backbone, model.tokenizer, data.queries, model.layers, dtype=torch.float32)
    chosen = choose_layers(model.router, model.layers, qs, docs, data.positives, model.config.routing, 2)
    assert 1 <= len(chosen) <= 2 and set(chosen) <= {1, 2, 3}
    # a subset evaluated on the full cache equals the subset evaluated on its own cache
    only = [chosen[-1]]
    own_docs = cache_documents(model.backbone, model.tokenizer, data.documents, only, dtype=torch.float32)
    own_qs = cache_queries(model.backbone, model.tokenizer, data.queries, only, dtype=torch.float32)
    a = evaluate(model.router, only, qs, docs, data.positives, model.config.routing, state_layers=model.layers)
    b = evaluate(model.router, only, own_qs, own_docs, data.positives, model.config.routing)
    assert a == b
    assert len(rows) == 40


# ---- data -------------------------------------------------------------------------------------------


def test_load_pairs_groups_documents_and_queries(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in [
        {"query": "q1", "positive": "doc A", "title": "T"},
        {"query": "q2", "positive": "doc A", "title": "T"},
        {"query": "q1", "positive": "doc B", "negatives": ["doc C", "doc A"]},
    ]) + "\n")
    data = load_pairs([f], title_rate=0.0)
    assert data.queries == ["q1", "q2"]
    assert [data.documents[d] for d in data.positives[0]] == ["doc A", "doc B"]
    assert [data.documents[d] for d in data.given_negatives[0]] == ["doc C"]  # a positive is never a negative
    titled = load_pairs([f], title_rate=1.0)
    assert titled.documents[0] == "T\ndoc A"


def test_titled_negatives_are_rendered_as_positives_are(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in [
        {"query": "q1", "positive": "doc A", "title": "TA", "negatives": [{"title": "TB", "text": "doc B"}]},
        {"query": "q2", "positive": "doc B", "title": "TB"},
    ]) + "\n")
    for rate, b in ((1.0, "TB\ndoc B"), (0.0, "doc B")):
        data = load_pairs([f], title_rate=rate)
        assert [data.documents[d] for d in data.given_negatives[0]] == [b]
        assert data.given_negatives[0] == data.positives[1]  # one document row, whether negative or positive


def test_bm25_mining_leaves_questions_with_given_negatives_alone(tmp_path):
    rows = _keyword_pairs(tmp_path / "p.jsonl", n=40)
    rows[0]["negatives"] = [rows[1]["positive"]]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    data = load_pairs([tmp_path / "p.jsonl"])
    data.mine_bm25_negatives(depth=5)
    q = data.queries.index(rows[0]["query"])
    assert data.mined_negatives[q] == [] and len(data.given_negatives[q]) == 1
    assert all(data.mined_negatives[i] for i in range(len(data)) if i != q)


@pytest.mark.parametrize("line, message", [
    ('{"query": "q", "positive": "p", "negatives": [{"title": "t"}]}', "d.jsonl:2: 'negatives'"),
    ("not json", "d.jsonl:2: not valid JSON"),
    ('{"query": "", "positive": "x"}', "d.jsonl:2: 'query'"),
    ('{"query": "q"}', "d.jsonl:2: 'positive'"),
    ('{"query": "q", "positive": "p", "negatives": "n"}', "d.jsonl:2: 'negatives'"),
    ("[1, 2]", "d.jsonl:2: each line must be a JSON object"),
    ('{"query": "q", "positive": "p", "negatives": ["n"], "teacher": {"positive": 1.0, "negatives": []}}',
     "d.jsonl:2: 'teacher'"),
    ('{"query": "q", "positive": "p", "teacher": {"positive": "high", "negatives": []}}', "d.jsonl:2: 'teacher'"),
    ('{"query": "q", "positive": "p", "teacher": {"positive": NaN, "negatives": []}}', "d.jsonl:2: 'teacher'"),
])
def test_bad_training_lines_name_file_and_line(tmp_path, line, message):
    f = tmp_path / "d.jsonl"
    f.write_text('{"query": "q0", "positive": "p0"}\n' + line + "\n")
    with pytest.raises(InvalidInputError, match=message):
        load_pairs([f])


def test_teacher_scores_are_read_per_document_and_drive_the_distillation_loss(keyword_model_dir, tmp_path):
    rows = _keyword_pairs(tmp_path / "p.jsonl", n=30)
    for i, r in enumerate(rows):  # each question: its document first, two others below it
        r["negatives"] = [rows[(i + 1) % 30]["positive"], rows[(i + 2) % 30]["positive"]]
        r["teacher"] = {"positive": 0.9, "negatives": [0.5, 0.1]}
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    data = load_pairs([tmp_path / "p.jsonl"])
    q = data.queries.index(rows[0]["query"])
    assert data.teacher[q] == {data.positives[q][0]: 0.9, data.given_negatives[q][0]: 0.5,
                               data.given_negatives[q][1]: 0.1}
    sub = data.subset([q])  # re-indexed with the documents
    assert {sub.documents[d]: t for d, t in sub.teacher[0].items()} == {data.documents[d]: t
                                                                        for d, t in data.teacher[q].items()}
    model = MSAModel.from_pretrained(str(keyword_model_dir))
    losses = {}
    for weight in (0.0, 1.0):
        config = TrainConfig(steps=1, batch_size=8, heldout_fraction=0.0, bm25_depth=0, teacher_weight=weight)
        trainer = prepare_trainer(model, [tmp_path / "p.jsonl"], config, log=lambda m: None)[0]
        loss, info = trainer.loss(0)
        loss.backward()
        losses[weight] = (float(loss.detach()), info)
        assert all(p.grad is not None for p in trainer.router.parameters())
    assert "teacher_kl" not in losses[0.0][1] and losses[1.0][1]["teacher_kl"] > 0
    assert losses[1.0][0] == pytest.approx(losses[0.0][0] + losses[1.0][1]["teacher_kl"], rel=1e-4)


def test_split_shares_no_document_and_mining_skips_positives(tmp_path):
    rows = _keyword_pairs(tmp_path / "p.jsonl", n=80)
    data = load_pairs([tmp_path / "p.jsonl"])
    train, held = data.split(0.25)
    assert len(held) > 0 and len(train) > 0 and len(train) + len(held) <= len(rows)
    assert not set(train.documents) & set(held.documents)
    train.mine_bm25_negatives(depth=5)
    for q in range(len(train)):
        assert train.mined_negatives[q] and not set(train.mined_negatives[q]) & set(train.positives[q])


# ---- the command line --------------------------------------------------------------------------------


def test_cli_trains_a_router_the_engine_loads(keyword_model_dir, keyword_data, tmp_path, capsys):
    out = tmp_path / "r.safetensors"
    code = main(["train-router", str(keyword_data), "--model", str(keyword_model_dir), "--out", str(out),
                 "--steps", "20", "--batch-size", "16", "--heldout", "0.2", "--eval-every", "10",
                 "--bm25-depth", "5", "--span-pairs", "10", "--report", str(tmp_path / "report.json"),
                 "--no-progress"])
    assert code == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["steps"] == 20 and "recall@5" in report["final"]
    card = out.with_suffix(".md").read_text()
    assert "Held-out metrics" in card and "20 steps" in card
    assert "10 span questions" in card  # synthetic data is disclosed
    model = MSAModel.from_pretrained(str(keyword_model_dir), router=out)
    assert model.router.fingerprint() == RouterProjectors.load(out).fingerprint()
    assert "held-out recall@1/5/10" in capsys.readouterr().err


def test_a_router_trained_in_colbert_order_is_loaded_in_colbert_order(keyword_model_dir, keyword_data, tmp_path):
    """The router file records the scoring it was trained with; a model loading it scores that way unless its
    config says otherwise."""
    out = tmp_path / "late.safetensors"
    code = main(["train-router", str(keyword_data), "--model", str(keyword_model_dir), "--out", str(out),
                 "--steps", "5", "--batch-size", "16", "--heldout", "0.2", "--bm25-depth", "5",
                 "--query-reduce", "colbert", "--no-progress"])
    assert code == 0
    assert RouterProjectors.load(out).extra["routing"]["query_reduce"] == "colbert"
    assert MSAModel.from_pretrained(str(keyword_model_dir), router=out).config.routing.query_reduce == "colbert"
    asked = MSAModel.from_pretrained(str(keyword_model_dir), router=out, config={"routing": {"query_reduce": "max"}})
    assert asked.config.routing.query_reduce == "max"
    plain = tmp_path / "plain.safetensors"
    assert main(["train-router", str(keyword_data), "--model", str(keyword_model_dir), "--out", str(plain),
                 "--steps", "2", "--batch-size", "16", "--heldout", "0.2", "--bm25-depth", "5", "--no-progress"]) == 0
    assert MSAModel.from_pretrained(str(keyword_model_dir), router=plain).config.routing.query_reduce == "max"


def test_a_router_trained_on_finer_keys_builds_banks_with_them(keyword_model_dir, keyword_data, tmp_path):
    """--chunk-size trains on keys pooled over that many tokens; the router file records it, a model loading it
    pools its banks that way unless its config says otherwise, and a bank pooled otherwise is refused."""
    out = tmp_path / "p8.safetensors"
    assert main(["train-router", str(keyword_data), "--model", str(keyword_model_dir), "--out", str(out),
                 "--steps", "3", "--batch-size", "16", "--heldout", "0.2", "--bm25-depth", "5",
                 "--chunk-size", "8", "--no-progress"]) == 0
    assert RouterProjectors.load(out).extra["encode"] == {"chunk_size": 8}
    model = MSAModel.from_pretrained(str(keyword_model_dir), router=out)
    assert model.config.encode.chunk_size == 8
    text = " ".join(f"word{i}" for i in range(40))
    bank = model.index([text], ids=["a"])
    assert bank.kr_bar.shape[1] == -(-len(model.tokenizer(text)["input_ids"]) // 8)  # one key per 8 tokens
    asked = MSAModel.from_pretrained(str(keyword_model_dir), router=out, config={"encode": {"chunk_size": 64}})
    assert asked.config.encode.chunk_size == 64
    with pytest.raises(InvalidInputError, match="chunk size 8"):
        asked.retrieve(["word3"], bank, k=1)
    plain = MSAModel.from_pretrained(str(keyword_model_dir), router="native")
    assert plain.config.encode.chunk_size == 64


def test_model_card_discloses_synthetic_questions():
    from msa_core.training.run import model_card
    from msa_core.training.trainer import TrainReport

    report = TrainReport(3, 1.0, "cpu", [1], 10, 10, 0, 0, {})
    config = TrainConfig(needles=500, span_pairs=7, pair_questions=9, heldout_fraction=0.01)
    card = model_card(report, config, ["a.jsonl"], "m")
    assert "500 in the needle format" in card and "5 to the held-out split" in card and "7 span questions" in card
    assert "9 two-document questions" in card
    assert "synthetic" not in model_card(report, TrainConfig(), ["a.jsonl"], "m")


def test_cli_train_router_bad_data_exits_2(keyword_model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{nope\n")
    code = main(["train-router", str(bad), "--model", str(keyword_model_dir), "--out", str(tmp_path / "r.st")])
    assert code == 2
    assert "bad.jsonl:1: not valid JSON" in capsys.readouterr().err


def test_needle_pairs_hide_a_key_the_question_asks_for(tmp_path):
    from msa_core.training.data import add_needle_pairs

    _keyword_pairs(tmp_path / "p.jsonl", n=80)
    data = load_pairs([tmp_path / "p.jsonl"])
    before = len(data)
    vocabulary = {w for d in data.documents for w in d.split()}
    add_needle_pairs(data, 30, doc_words=40, seed=3)
    assert len(data) == before + 30 and data.sources[-1] == "needles"
    for q in range(before, len(data)):
        doc = data.documents[data.positives[q][0]]
        key = data.queries[q].split(" for ")[1].split(" mentioned")[0]
        assert f"for {key} is: " in doc and len(doc.split()) >= 40
        assert set(key.split("-")) <= vocabulary  # keys are the documents' own words, not NIAH's lists
    again = load_pairs([tmp_path / "p.jsonl"])
    add_needle_pairs(again, 30, doc_words=40, seed=3)
    assert again.queries == data.queries  # deterministic for a seed


def test_heldout_sources_are_held_out_whole(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    _keyword_pairs(a, n=40, seed=1)
    _keyword_pairs(b, n=20, seed=2)
    data = load_pairs([a, b])
    train, held = data.split(0.0, ["b"])
    assert set(held.sources) == {"b"} and "b" not in train.sources and len(held) == 20
    with pytest.raises(InvalidInputError, match="not in the data"):
        data.split(0.0, ["c"])


def test_span_pairs_cut_a_few_words_from_the_body_of_their_own_document():
    from msa_core.training.data import TrainingSet, add_span_pairs

    rng = random.Random(0)
    docs = []
    for i in range(30):
        sentences = [" ".join(rng.choice(_FILLER) + str(j) for j in range(rng.randint(2, 12))) + "."
                     for _ in range(rng.randint(1, 4))]
        docs.append(f"Title words of doc{i} here now\n" + " ".join(sentences))
    data = TrainingSet(list(docs), ["q"], [[0]], [[]], ["src"])
    add_span_pairs(data, 40, min_words=6, max_words=9, seed=5)
    assert data.documents == docs  # no new documents: the positives' states are already cached
    assert len(data) == 41 and set(data.sources[1:]) == {"spans"} and len(set(data.queries)) == 41
    for q in range(1, 41):
        words = data.queries[q].split()
        body = data.documents[data.positives[q][0]].split("\n", 1)[1]
        assert 6 <= len(words) <= 9 and data.queries[q] in body and "Title" not in words
    again = TrainingSet(list(docs), ["q"], [[0]], [[]], ["src"])
    add_span_pairs(again, 40, min_words=6, max_words=9, seed=5)
    assert again.queries == data.queries and again.positives == data.positives


def test_pair_questions_join_words_around_a_name_in_each_of_two_documents():
    from msa_core.training.data import TrainingSet, add_pair_questions

    rng = random.Random(0)
    filler = [w for w in _FILLER if w != "and"]  # " and " joins the two windows
    docs = [f"Title{i} Heading\n" + " ".join(f"{rng.choice(filler)} the Name{i}x{j} was {rng.choice(filler)} here."
                                           for j in range(rng.randint(1, 3))) for i in range(20)]
    docs.append("Nameless\nall lower case words only. and again no names.")  # no window: never a positive
    data = TrainingSet(list(docs), ["q"], [[0]], [[]], ["src"])
    add_pair_questions(data, 25, seed=3)
    assert data.documents == docs and len(data) == 26 and set(data.sources[1:]) == {"pairs"}
    for q in range(1, 26):
        a, b = data.positives[q]
        assert a != b and len(docs) - 1 not in (a, b)
        left, right = data.queries[q].split(" and ")
        for window, d in ((left, a), (right, b)):
            assert window in docs[d].split("\n", 1)[1] and f"Name{d}x" in window and "Title" not in window
    again = TrainingSet(list(docs), ["q"], [[0]], [[]], ["src"])
    add_pair_questions(again, 25, seed=3)
    assert again.queries == data.queries and again.positives == data.positives


# ---- training the upper layers too (msa_core/train_tuned.py) ----------------------------------------


@pytest.mark.parametrize("first", [1, 2])
def test_split_forward_gives_the_cached_states(fp32_model, first):
    """Layers 0..F-1 once, then F.. per batch: the same states train_cache (and so the bank) computes."""
    from msa_core.training.tuned import lower_documents, lower_queries, ragged_states

    m = fp32_model
    docs, qs = _states(m)
    offset = m.position_offset(m.config.routing.top_k)
    lower_d = lower_documents(m.backbone, m.tokenizer, _DOCS, first, 2048, torch.float32)
    lower_q = lower_queries(m.backbone, m.tokenizer, _QUESTIONS, first, offset, torch.float32)
    got_q, got_d = ragged_states(m.backbone, lower_q, lower_d, first, m.layers, 16, 2048)
    assert torch.equal(got_d.offsets, docs.offsets) and torch.equal(got_q.offsets, qs.offsets)
    torch.testing.assert_close(got_d.x, docs.x, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got_q.x, qs.x, atol=1e-5, rtol=1e-4)


def test_tuned_training_learns_and_ships_its_adapters(keyword_model_dir, tmp_path):
    """With the upper layers tuned, recall@5 through the engine goes from chance to > 0.9; the router file
    carries the adapters, and the model that trained is left as it was."""
    from safetensors import safe_open

    rows = _keyword_pairs(tmp_path / "pairs.jsonl")
    model = MSAModel.from_pretrained(str(keyword_model_dir))
    base_fingerprint = model.backbone_fingerprint
    before = _recall_at_5(model, rows)
    config = TrainConfig(steps=150, batch_size=64, lr=1e-2, adapter_lr=2e-3, warmup_steps=10, heldout_fraction=0.0,
                         bm25_depth=10, hard_negatives=2, tune_from_layer=1, lora_rank=4, lm_weight=0.1)
    report = train_router(model, [tmp_path / "pairs.jsonl"], tmp_path / "tuned.safetensors", config,
                          log=lambda m: None)
    assert model.backbone.fingerprint() == base_fingerprint  # adapters removed from the training model
    assert not any(n.endswith((".a", ".b")) for n, _ in model.backbone.named_parameters())
    with safe_open(str(tmp_path / "tuned.safetensors"), framework="pt") as f:
        assert f.metadata()["version"] == "2" and sum(".lora_" in k for k in f.keys()) == 3 * 7 * 2  # layers 1-3
    tuned = MSAModel.from_pretrained(str(keyword_model_dir), router=tmp_path / "tuned.safetensors")
    after = _recall_at_5(tuned, rows)
    assert tuned.backbone_fingerprint != base_fingerprint
    assert before < 0.2 and after > 0.9, (before, after)
    assert report.steps == 150 and "lm_loss" in report.history[-1]
    assert "adapters of every projection from layer 1" in (tmp_path / "tuned.md").read_text()


def test_tuned_training_resumes_exactly(keyword_model_dir, keyword_data, tmp_path):
    model = MSAModel.from_pretrained(str(keyword_model_dir))
    config = TrainConfig(steps=6, batch_size=16, lr=1e-2, warmup_steps=2, heldout_fraction=0.0, bm25_depth=5,
                         checkpoint_every=3, tune_from_layer=2, lora_rank=2)

    def run(ckpt, stop_at=None, resume=False):
        from msa_core.decoder.lora import adapter_tensors, remove

        trainer = _trainer(model, keyword_data, config, ckpt)
        if resume:
            assert trainer.load_checkpoint() and trainer.step == 3
        trainer.run(stop_at=stop_at)
        out = trainer.router.fingerprint(), {n: t.clone() for n, t in adapter_tensors(model.backbone).items()}
        remove(model.backbone)
        return out

    straight = run(None)
    run(tmp_path / "ckpt", stop_at=4)  # checkpoint at step 3, then "killed" after step 4
    resumed = run(tmp_path / "ckpt", resume=True)
    assert resumed[0] == straight[0]
    for name, t in straight[1].items():
        torch.testing.assert_close(resumed[1][name], t, rtol=0, atol=0)


@pytest.mark.parametrize("first_from, again_from", [(1, None), (1, 2), (2, 1)])
def test_training_from_a_tuned_router_keeps_its_backbone_delta(keyword_model_dir, keyword_data, tmp_path,
                                                               first_from, again_from):
    """Starting from a router that carries adapters, the new file must carry that delta too (stacked with
    the new adapters when tuning again, on the same layers, fewer or more) and load on the base backbone:
    the loaded model's weights are the ones training ended with, its generator keeps the base weights, and
    it accepts its own banks."""
    from msa_core.decoder.lora import fold

    base = MSAModel.from_pretrained(str(keyword_model_dir))
    first = TrainConfig(steps=3, batch_size=16, lr=1e-2, adapter_lr=1e-2, warmup_steps=1, heldout_fraction=0.0,
                        bm25_depth=5, tune_from_layer=first_from, lora_rank=2, lm_weight=0.0)
    train_router(base, [keyword_data], tmp_path / "tuned.safetensors", first, log=lambda m: None)
    start = MSAModel.from_pretrained(str(keyword_model_dir), router=tmp_path / "tuned.safetensors")
    again = first.model_copy(update={"tune_from_layer": again_from, "precondition": "none"})
    trainer = _trainer(start, keyword_data, again)
    trainer.run()
    from msa_core.training.run import save_trained_router
    from msa_core.training.trainer import TrainReport

    saved = trainer.router.copy(dtype=torch.float32, device="cpu")
    saved.backbone_delta, saved.delta_scale = trainer.backbone_delta()
    save_trained_router(saved, tmp_path / "again.safetensors", start, again,
                        TrainReport(3, 0.0, "cpu", list(trainer.layers), 0, 0, 0, 0, {}), [str(keyword_data)])
    fold(start.backbone)  # what training ended with: the starting delta and (if tuned) the new adapters
    loaded = MSAModel.from_pretrained(str(keyword_model_dir), router=tmp_path / "again.safetensors")
    assert loaded.backbone_fingerprint != base.backbone_fingerprint
    assert loaded.generator.fingerprint() == start.generator.fingerprint() == base.backbone_fingerprint
    for (name, want), got in zip(start.backbone.state_dict().items(), loaded.backbone.state_dict().values()):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4, msg=name)  # the file stores fp16
    bank = loaded.index(["alpha beta gamma", "delta epsilon"], ids=["a", "b"])
    reloaded = MSAModel.from_pretrained(str(keyword_model_dir), router=tmp_path / "again.safetensors")
    assert len(reloaded.retrieve(["alpha?"], bank, k=1)[0]) == 1  # the same file accepts its own banks


def test_recomputed_activations_give_the_same_loss_and_gradients(keyword_model_dir, keyword_data):
    """--recompute (activation checkpointing of the tuned layers) is a memory trade, not a different model."""
    from msa_core.decoder.lora import remove

    model = MSAModel.from_pretrained(str(keyword_model_dir))

    def step(recompute):
        config = TrainConfig(steps=2, batch_size=16, heldout_fraction=0.0, bm25_depth=5, tune_from_layer=1,
                             lora_rank=2, lm_weight=0.1, recompute=recompute)
        trainer = _trainer(model, keyword_data, config)
        with torch.no_grad():  # B starts at zero: give the adapters a value so every gradient is non-trivial
            for name, p in trainer.names.items():
                if name.startswith("backbone."):
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.05)
        loss, info = trainer.loss(0)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in trainer.names.items()}
        remove(model.backbone)
        return loss.detach(), info, grads

    plain, recomputed = step(False), step(True)
    torch.testing.assert_close(recomputed[0], plain[0], rtol=1e-6, atol=1e-6)
    assert recomputed[1]["lm_loss"] == pytest.approx(plain[1]["lm_loss"], rel=1e-6)
    assert plain[2].keys() == recomputed[2].keys() and sum(n.startswith("backbone.") for n in plain[2]) > 0
    for name, g in plain[2].items():
        assert g.abs().sum() > 0, name
        torch.testing.assert_close(recomputed[2][name], g, rtol=1e-5, atol=1e-7)


def test_tune_from_layer_must_reach_the_routing_layers(keyword_model_dir, keyword_data):
    model = MSAModel.from_pretrained(str(keyword_model_dir))
    with pytest.raises(InvalidInputError, match="tune_from_layer"):
        _trainer(model, keyword_data, TrainConfig(steps=1, heldout_fraction=0.0, tune_from_layer=3))
