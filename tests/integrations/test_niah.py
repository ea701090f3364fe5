"""The NIAH generator (msa_core/niah.py): format, one needle per document, sizes, determinism, scoring."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from msa_core.cli.main import main
from msa_core.errors import InvalidInputError
from msa_integrations.compare.niah import (
    NIAHSpec,
    default_haystack_path,
    generate_niah,
    load_haystack,
    parse_tokens,
    score_answer,
    score_answers,
)

# A small synthetic haystack: sentences with varied words, ~6,000 whitespace tokens.
HAYSTACK = " ".join(f"Sentence {i} tells of the {w} river and the {w2} hill near town {i % 17}."
                    for i, (w, w2) in enumerate(zip(["green", "old", "quiet", "long"] * 150,
                                                    ["steep", "bare", "round"] * 200)))
NEEDLE = re.compile(r"One of the special magic (\w+) for (\S+) is: (\S+)\.")


def gen(tmp_path: Path | None = None, **kw):
    spec = NIAHSpec(**{"tokens": 4000, "doc_tokens": 100, "queries": 10, **kw})
    return generate_niah(spec, tmp_path, haystack_text=HAYSTACK, tokenizer="whitespace")


def needles(text: str) -> list[tuple[str, str, str]]:
    return NEEDLE.findall(text)


@pytest.mark.parametrize(("text", "value"), [("16K", 16_000), ("1M", 1_000_000), ("1.5m", 1_500_000),
                                             ("4096", 4096), (" 128k ", 128_000), (64, 64)])
def test_parse_tokens(text, value):
    assert parse_tokens(text) == value


@pytest.mark.parametrize("bad", ["", "abc", "16Q", "0", "-5"])
def test_parse_tokens_rejects(bad):
    with pytest.raises(InvalidInputError):
        parse_tokens(bad)


def test_files_in_the_eval_format(tmp_path):
    out = gen(tmp_path / "set", task="multikey")
    corpus = [json.loads(line) for line in (tmp_path / "set" / "corpus.jsonl").read_text().splitlines()]
    queries = [json.loads(line) for line in (tmp_path / "set" / "queries.jsonl").read_text().splitlines()]
    info = json.loads((tmp_path / "set" / "dataset.json").read_text())
    assert corpus == out["corpus"] and queries == out["queries"] and info == out["info"]
    assert all(set(d) == {"id", "title", "text"} for d in corpus)
    assert all({"id", "question", "answer", "gold_ids"} <= set(q) for q in queries)
    assert info["documents"] == len(corpus) == 40 and info["questions"] == len(queries) == 10
    assert info["generator"] == "msa_core.niah" and info["tokenizer"] == "whitespace"
    # the harness reads it as a dataset
    from msa_integrations.compare import load_dataset

    ds = load_dataset(tmp_path / "set")
    assert ds.generated_by_niah and len(ds.queries) == 10 and ds.queries[0].answers == [queries[0]["answer"]]


def test_multikey_every_document_holds_one_needle_and_the_gold_one_answers():
    out = gen(task="multikey")
    docs = {d["id"]: d["text"] for d in out["corpus"]}
    assert all(len(needles(t)) == 1 for t in docs.values())
    keys = [needles(t)[0][1] for t in docs.values()]
    assert len(set(keys)) == len(keys)  # distinct keys
    for q in out["queries"]:
        (gold,) = q["gold_ids"]
        kind, key, value = needles(docs[gold])[0]
        assert (kind, key, value) == ("numbers", q["key"], q["answer"])
        assert q["question"] == f"What is the special magic numbers for {key} mentioned in the provided text?"
        assert sum(key in t for t in docs.values()) == 1  # no other document names the key


def test_single_only_asked_documents_hold_needles():
    out = gen(task="single", queries=7)
    with_needle = [d["id"] for d in out["corpus"] if needles(d["text"])]
    assert sorted(with_needle) == sorted(g for q in out["queries"] for g in q["gold_ids"])
    assert len(out["queries"]) == 7


def test_multivalue_one_needle_per_document_several_documents_per_key():
    out = gen(task="multivalue", queries=5, values=3)
    docs = {d["id"]: d["text"] for d in out["corpus"]}
    assert all(len(needles(t)) <= 1 for t in docs.values())
    for q in out["queries"]:
        assert len(q["gold_ids"]) == 3 == len(q["answers"]) == len(set(q["answers"]))
        found = [needles(docs[g])[0] for g in q["gold_ids"]]
        assert {f[1] for f in found} == {q["key"]}
        assert [f[2] for f in found] == q["answers"]
        assert q["answer"] == ", ".join(q["answers"])
        assert q["question"].startswith("What are all the special magic numbers for ")
    with pytest.raises(InvalidInputError, match="too few"):
        gen(task="multivalue", tokens=300, values=4)  # 3 documents cannot hold 4 needles of one key


@pytest.mark.parametrize(("key_type", "value_type"), [("words", "numbers"), ("numbers", "uuids"), ("uuids", "words")])
def test_key_and_value_types(key_type, value_type):
    out = gen(key_type=key_type, value_type=value_type)
    patterns = {"words": r"[a-z]+-[a-z]+", "numbers": r"\d{7}",
                "uuids": r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"}
    for q in out["queries"]:
        assert re.fullmatch(patterns[key_type], q["key"])
        assert re.fullmatch(patterns[value_type], q["answer"])
        assert f"special magic {value_type} for" in q["question"]


def test_deterministic_under_a_seed(tmp_path):
    gen(tmp_path / "a", seed=3)
    gen(tmp_path / "b", seed=3)
    gen(tmp_path / "c", seed=4)
    for name in ("corpus.jsonl", "queries.jsonl", "dataset.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "queries.jsonl").read_bytes() != (tmp_path / "c" / "queries.jsonl").read_bytes()


@pytest.mark.parametrize("tokens", [1_000, 16_000, 1_000_000])
def test_memory_size_is_reached(tokens):
    out = gen(tokens=tokens, doc_tokens=500, queries=20)
    assert abs(out["info"]["tokens"] - tokens) <= 0.01 * tokens + 20
    assert out["info"]["documents"] == -(-tokens // 500)
    if tokens > len(HAYSTACK.split()):
        assert out["info"]["haystack_passes"] > 1  # the haystack wraps around


def test_sizes_with_a_real_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir("llama")))
    spec = NIAHSpec(tokens=3000, doc_tokens=200, queries=5)
    out = generate_niah(spec, haystack_text=HAYSTACK, tokenizer=tok)
    counts = [len(tok(d["text"], add_special_tokens=False)["input_ids"]) for d in out["corpus"]]
    assert sum(counts) == out["info"]["tokens"]
    assert abs(sum(counts) - 3000) <= 0.05 * 3000
    assert max(counts) <= 200 * 1.1  # about doc_tokens each, needle included


def test_score_answer_is_ruler_string_match_all():
    assert score_answer("The number is 1234567.", ["1234567"]) == 1.0
    assert score_answer("1234567 and 7654321", ["1234567", "7654321", "1111111"]) == pytest.approx(2 / 3)
    assert score_answer("HUNGRY-CAT", "hungry-cat") == 1.0
    assert score_answer("nothing", ["1234567"]) == 0.0
    assert score_answers(["1234567", "x"], [{"answer": "1234567"}, {"answers": ["5", "x"], "answer": "5, x"}]) == 0.75


def test_haystack_sources(tmp_path, monkeypatch):
    (tmp_path / "h.json").write_text(json.dumps({"text": "Essay one."}))
    (tmp_path / "l.json").write_text(json.dumps(["A.", "B."]))
    (tmp_path / "o.json").write_text(json.dumps([{"text": "A."}, {"text": "B."}]))
    (tmp_path / "c.jsonl").write_text('{"text": "A."}\n{"text": "B."}\n')
    (tmp_path / "t.txt").write_text("Plain text.")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "x.md").write_text("From a folder.")
    assert load_haystack(tmp_path / "h.json") == "Essay one."
    assert load_haystack(tmp_path / "l.json") == load_haystack(tmp_path / "o.json") == "A.\n\nB."
    assert load_haystack(tmp_path / "c.jsonl") == "A.\n\nB."
    assert load_haystack(tmp_path / "t.txt") == "Plain text."
    assert load_haystack(tmp_path / "folder") == "From a folder."
    (tmp_path / "bad.json").write_text(json.dumps({"nope": 1}))
    with pytest.raises(InvalidInputError, match="expected"):
        load_haystack(tmp_path / "bad.json")
    with pytest.raises(InvalidInputError, match="does not exist"):
        load_haystack(tmp_path / "missing.json")
    monkeypatch.setenv("MSA_SHARED_DATA", str(tmp_path / "shared"))
    assert default_haystack_path() == tmp_path / "shared" / "haystack" / "paul_graham_essays.json"
    with pytest.raises(InvalidInputError, match="MSA_SHARED_DATA"):
        load_haystack()


def test_refuses_to_overwrite(tmp_path):
    gen(tmp_path / "set")
    with pytest.raises(InvalidInputError, match="--overwrite"):
        gen(tmp_path / "set")


def test_cli_niah(tmp_path, capsys):
    hay = tmp_path / "hay.txt"
    hay.write_text(HAYSTACK)
    argv = ["niah", "--tokens", "2K", "--out", str(tmp_path / "n"), "--task", "multivalue", "--values", "2",
            "--queries", "3", "--doc-tokens", "100", "--haystack", str(hay), "--tokenizer", "whitespace",
            "--no-progress"]
    assert main(argv) == 0
    out, _ = capsys.readouterr()
    assert "wrote 20 documents" in out and "3 multivalue questions" in out
    assert len((tmp_path / "n" / "queries.jsonl").read_text().splitlines()) == 3
    assert main(argv) == 2  # exists: needs --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0
    assert main(["niah", "--tokens", "lots", "--out", str(tmp_path / "x")]) == 2
    assert main(["niah", "--tokens", "2K", "--out", str(tmp_path / "y"), "--haystack", str(tmp_path / "no.json"),
                 "--tokenizer", "whitespace"]) == 2


@pytest.mark.skipif(not default_haystack_path().is_file(), reason="../shared/data/haystack not present")
def test_default_haystack_is_paul_graham():
    out = generate_niah(NIAHSpec(tokens=2000, doc_tokens=500, queries=2), tokenizer="whitespace")
    assert out["info"]["haystack"].endswith("paul_graham_essays.json")
    assert len(out["info"]["haystack_sha256"]) == 64
