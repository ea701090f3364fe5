"""The `msa` command line, run in-process on tiny random checkpoints (see conftest.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from msa_core.cli.common import parse_filters
from msa_core.cli.main import main
from msa_core.errors import InvalidInputError
from msa_core.memory.persist import CURRENT, TENSORS

REPO = Path(__file__).resolve().parents[2]

DOCS = [
    {"id": "lighthouse", "title": "Greyhook Lighthouse", "text": "The lighthouse was built in 1887 by Ada Quist.",
     "metadata": {"topic": "landmarks", "year": 1887}},
    {"id": "ferry", "title": "Ferries", "text": "Ferries leave the harbour every morning at seven.",
     "metadata": {"topic": "transport", "year": 1950}},
    {"id": "capital", "text": "What is the capital of France? Paris is the capital of France.",
     "metadata": {"topic": "geography", "year": 2001}},
    {"id": "msa", "title": "MSA", "text": "Memory sparse attention routes a question to the documents it needs.",
     "source": "paper"},  # an extra top-level key ends up in metadata
]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def model(tiny_model_dir) -> Path:
    return tiny_model_dir("qwen3")


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "corpus.jsonl", DOCS)


@pytest.fixture
def bank(tmp_path: Path, corpus: Path, model: Path, capsys) -> Path:
    path = tmp_path / "bank"
    code, _, err = run(capsys, "index", corpus, "--bank", path, "--model", model, "--chunk-size", "8",
                       "--no-progress")
    assert code == 0, err
    return path


def info(capsys, bank: Path) -> dict:
    code, out, err = run(capsys, "info", bank, "--json")
    assert code == 0, err
    return json.loads(out)


def query(capsys, bank: Path, *extra: str) -> list[dict]:
    code, out, err = run(capsys, "query", bank, "Who built the lighthouse?", "--json", *extra)
    assert code == 0, err
    return json.loads(out)


def bank_state(bank: Path) -> tuple[str, list[str]]:
    """The live version name and the folder listing: equal before and after means untouched."""
    return (bank / CURRENT).read_text(), sorted(p.name for p in bank.iterdir())


# ---- help, version, entry points ---------------------------------------------------------------


@pytest.mark.parametrize("command", [[], ["index"], ["add"], ["delete"], ["info"], ["query"], ["ask"], ["demo"]])
def test_help_on_every_command(capsys, command):
    code, out, _ = run(capsys, *command, "--help")
    assert code == 0
    assert out.startswith("usage: msa")


def test_version_and_no_command(capsys):
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.startswith("msa ")
    code, _, err = run(capsys)
    assert code == 2 and "index" in err


def test_python_dash_m_help():
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-m", "msa_core", "--help"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "usage: msa" in done.stdout and "query" in done.stdout


# ---- the main flow -----------------------------------------------------------------------------


def test_index_info_query(capsys, tmp_path, corpus, model):
    path = tmp_path / "bank"
    code, out, err = run(capsys, "index", corpus, "--bank", path, "--model", model, "--chunk-size", "8",
                         "--no-progress")
    assert code == 0, err
    assert out == ""  # results only on stdout; the summary is a message
    assert "indexed 4 documents" in err and "tokens/s" in err and "chunks" in err

    meta = info(capsys, path)
    assert {"documents", "tokens", "chunks", "bytes", "parts", "model_name", "chunk_size"} <= meta.keys()
    assert meta["documents"] == 4 and meta["chunk_size"] == 8
    assert meta["model_name"] == str(model.resolve())  # later commands need no --model
    assert meta["encode_tokens_per_s"] > 0 and meta["encode_dtypes"] == ["float32"]  # the build's speed
    code, out, _ = run(capsys, "info", path)
    assert code == 0 and "documents:" in out

    hits = query(capsys, path, "-k", "2")  # no --model: the bank names it
    assert len(hits) == 2
    assert {"id", "score", "title", "text", "metadata"} <= hits[0].keys()
    assert hits[0]["score"] >= hits[1]["score"]
    by_id = {h["id"]: h for h in query(capsys, path, "-k", "50")}  # k above the bank size: all of them
    assert set(by_id) == {d["id"] for d in DOCS}
    assert by_id["lighthouse"]["title"] == "Greyhook Lighthouse"
    assert by_id["lighthouse"]["metadata"] == {"topic": "landmarks", "year": 1887, "title": "Greyhook Lighthouse"}
    assert by_id["capital"]["title"] is None
    assert by_id["msa"]["metadata"]["source"] == "paper"

    code, out, _ = run(capsys, "query", path, "Who built the lighthouse?", "-k", "3")
    assert code == 0
    assert out.startswith(" 1. ") and len([ln for ln in out.splitlines() if ln[:3].strip().rstrip(".").isdigit()]) == 3


def test_index_refuses_an_existing_bank_unless_overwrite(capsys, bank, corpus, model):
    before = bank_state(bank)
    code, _, err = run(capsys, "index", corpus, "--bank", bank, "--model", model, "--no-progress")
    assert code == 2 and "--overwrite" in err
    assert bank_state(bank) == before
    code, _, err = run(capsys, "index", corpus, "--bank", bank, "--model", model, "--no-progress", "--overwrite")
    assert code == 0, err
    assert info(capsys, bank)["chunk_size"] == 64


def test_index_refuses_a_foreign_folder(capsys, tmp_path, corpus, model):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    code, _, err = run(capsys, "index", corpus, "--bank", folder, "--model", model)
    assert code == 2 and "not empty" in err
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]


def test_filters(capsys, bank):
    ids = lambda *f: {h["id"] for h in query(capsys, bank, "-k", "10", *f)}  # noqa: E731
    assert ids("--filter", "topic=transport") == {"ferry"}
    assert ids("--filter", "year>=1950") == {"ferry", "capital"}
    assert ids("--filter", "year<1950") == {"lighthouse"}
    assert ids("--filter", "year>1887", "--filter", "year<=1950") == {"ferry"}
    assert ids("--filter", "topic=in:landmarks,geography") == {"lighthouse", "capital"}
    assert ids("--filter", "topic!=transport") == {"lighthouse", "capital", "msa"}  # missing key: not equal
    assert ids("--filter", "year=1887") == {"lighthouse"}  # parsed as a number
    assert ids("--filter", "year=nothing") == set()


def test_parse_filters():
    assert parse_filters(None) is None
    assert parse_filters(["a=1"]) == {"a": {"$eq": 1}}
    assert parse_filters(["a=true"]) == {"a": {"$eq": True}}
    assert parse_filters(["a=x=y"]) == {"a": {"$eq": "x=y"}}
    assert parse_filters(["a=NaN"]) == {"a": {"$eq": "NaN"}}
    assert parse_filters(["a!=in:1,b"]) == {"a": {"$nin": [1, "b"]}}
    assert parse_filters(["a>=1", "a<2"]) == {"$and": [{"a": {"$gte": 1}}, {"a": {"$lt": 2}}]}
    for bad in ("=1", "novalue", ">3"):
        with pytest.raises(InvalidInputError, match="bad --filter"):
            parse_filters([bad])


def test_query_text_and_bad_filter(capsys, bank):
    code, _, err = run(capsys, "query", bank, "q", "--filter", "oops")
    assert code == 2 and "bad --filter" in err


def test_add_upserts(capsys, tmp_path, bank):
    more = write_jsonl(tmp_path / "more.jsonl", [
        {"id": "ferry", "text": "The ferry now leaves at nine.", "metadata": {"topic": "transport", "year": 2024}},
        {"id": "bridge", "title": "Bridge", "text": "Saltmarsh Bridge opened on 3 May 1899."},
    ])
    code, out, err = run(capsys, "add", bank, more, "--no-progress")
    assert code == 0, err
    assert "1 new and replaced 1" in err
    assert info(capsys, bank)["documents"] == 5  # same id: replaced, not duplicated
    by_id = {h["id"]: h for h in query(capsys, bank, "-k", "10")}
    assert by_id["ferry"]["text"] == "The ferry now leaves at nine."
    assert by_id["ferry"]["metadata"]["year"] == 2024
    assert by_id["bridge"]["title"] == "Bridge"


def test_delete(capsys, bank):
    code, out, err = run(capsys, "delete", bank, "ferry", "capital", "nope")
    assert code == 0
    assert out.startswith("deleted 2 documents")
    assert "nope" in err
    assert info(capsys, bank)["documents"] == 2
    assert {h["id"] for h in query(capsys, bank, "-k", "10")} == {"lighthouse", "msa"}


@pytest.mark.parametrize("mode", ["latent", "hybrid"])
def test_ask_json(capsys, bank, mode):
    code, out, err = run(capsys, "ask", bank, "Who built the lighthouse?", "--mode", mode, "-k", "2",
                         "--max-new-tokens", "4", "--json")
    assert code == 0, err
    answer = json.loads(out)
    assert {"answer", "mode", "doc_ids", "scores"} <= answer.keys()
    assert answer["mode"] == mode
    assert isinstance(answer["answer"], str)
    assert len(answer["doc_ids"]) == len(answer["scores"]) >= 1
    assert set(answer["doc_ids"]) <= {d["id"] for d in DOCS}
    if mode == "hybrid":
        assert len(answer["doc_ids"]) == 2


def test_ask_text_streams_and_lists_documents(capsys, bank):
    code, out, err = run(capsys, "ask", bank, "Who built the lighthouse?", "--max-new-tokens", "3",
                         "--filter", "topic=landmarks")
    assert code == 0, err
    assert out.endswith("\n")
    assert "documents attended to" in err and "lighthouse" in err
    assert "ferry" not in err  # the filter kept it out


def test_bank_remembers_its_router(capsys, tmp_path, corpus, model, monkeypatch):
    from msa_core.model import MSAModel

    m = MSAModel.from_pretrained(model, router="random")
    (tmp_path / "routers").mkdir()
    m.router.save(tmp_path / "routers" / "r.safetensors", m.backbone_fingerprint)
    monkeypatch.chdir(tmp_path)  # a relative --router path is recorded as an absolute one
    code, _, err = run(capsys, "index", corpus, "--bank", "bank", "--model", model, "--router",
                       "routers/r.safetensors", "--no-progress")
    assert code == 0, err
    assert info(capsys, tmp_path / "bank")["router"] == str(tmp_path / "routers" / "r.safetensors")
    monkeypatch.chdir(REPO)
    assert len(query(capsys, tmp_path / "bank", "-k", "2")) == 2  # loaded with the recorded router
    code, _, err = run(capsys, "query", tmp_path / "bank", "q", "--router", "native")
    assert code == 2 and "another model" in err


# ---- bad input: exit 2, nothing lost -----------------------------------------------------------


def test_invalid_jsonl_line_changes_nothing(capsys, tmp_path, bank):
    before, before_info = bank_state(bank), info(capsys, bank)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "new", "text": "fine"}) + "\n{not json\n", encoding="utf-8")
    code, out, err = run(capsys, "add", bank, bad)
    assert code == 2
    assert "line 2" in err and "Traceback" not in err
    assert bank_state(bank) == before and info(capsys, bank) == before_info


def test_invalid_jsonl_on_index_writes_nothing(capsys, tmp_path, model):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"title": "no text"}\n', encoding="utf-8")
    code, _, err = run(capsys, "index", bad, "--bank", tmp_path / "bank", "--model", model)
    assert code == 2 and "line 2" in err
    assert not (tmp_path / "bank").exists()


def test_non_utf8_corpus(capsys, tmp_path, model):
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(json.dumps({"text": "caf\u00e9"}).encode("utf-8").replace(b"\\u00e9", b"\xe9") + b"\n")
    code, _, err = run(capsys, "index", bad, "--bank", tmp_path / "bank", "--model", model)
    assert code == 2 and "UTF-8" in err


def test_missing_corpus(capsys, tmp_path, model):
    code, _, err = run(capsys, "index", tmp_path / "nope.jsonl", "--bank", tmp_path / "bank", "--model", model)
    assert code == 2 and "does not exist" in err


def test_missing_model_path(capsys, tmp_path, corpus):
    code, _, err = run(capsys, "index", corpus, "--bank", tmp_path / "bank", "--model", tmp_path / "no-model")
    assert code == 2 and "not found" in err


@pytest.mark.parametrize("command", ["info", "query", "ask", "add", "delete"])
def test_missing_bank(capsys, tmp_path, corpus, command):
    extra = {"query": ["q"], "ask": ["q"], "add": [corpus], "delete": ["x"], "info": []}[command]
    code, _, err = run(capsys, command, tmp_path / "nowhere", *extra)
    assert code == 2 and "not an msa bank" in err


def test_half_written_bank(capsys, bank):
    (bank / CURRENT).unlink()
    code, _, err = run(capsys, "info", bank)
    assert code == 2 and "half-written" in err


def test_corrupt_bank(capsys, bank):
    tensors = bank / (bank / CURRENT).read_text().strip() / TENSORS
    data = bytearray(tensors.read_bytes())
    for i in range(len(data) - 16, len(data)):
        data[i] ^= 0xFF
    tensors.write_bytes(bytes(data))
    for argv in (["info", bank], ["query", bank, "q"]):
        code, _, err = run(capsys, *argv)
        assert code == 2 and "corrupt" in err


def test_empty_question(capsys, bank):
    for command in ("query", "ask"):
        code, _, err = run(capsys, command, bank, "   ")
        assert code == 2 and "question is empty" in err


def test_k_zero(capsys, bank):
    for command in ("query", "ask"):
        code, _, err = run(capsys, command, bank, "q", "-k", "0")
        assert code == 2 and "-k" in err


def test_bank_of_another_model(capsys, bank, tiny_model_dir):
    other = tiny_model_dir("llama")
    code, _, err = run(capsys, "query", bank, "q", "--model", other)
    assert code == 2 and "another model" in err


# ---- internal errors: exit 1 -------------------------------------------------------------------


def test_internal_error(capsys, bank, monkeypatch):
    from msa_core.model import MSAModel

    def boom(*args, **kwargs):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(MSAModel, "retrieve", boom)
    code, out, err = run(capsys, "query", bank, "q")
    assert code == 1
    assert "internal error: RuntimeError: boom" in err and "MSA_DEBUG=1" in err
    assert "Traceback" not in err and "second line" not in err
    monkeypatch.setenv("MSA_DEBUG", "1")
    code, _, err = run(capsys, "query", bank, "q")
    assert code == 1 and "Traceback" in err


def test_info_loads_no_model(capsys, bank):
    """`info` needs no model: nothing is loaded (no '[msa] loading model' message)."""
    code, _, err = run(capsys, "info", bank)
    assert code == 0 and "loading model" not in err


# ---- the demo with the real default model ------------------------------------------------------


@pytest.mark.integration
def test_demo(capsys):
    from msa_core.memory.corpus import DEMO_CORPUS_PATH

    n_docs = sum(1 for line in DEMO_CORPUS_PATH.read_text(encoding="utf-8").splitlines() if line.strip())
    code, out, err = run(capsys, "demo")
    assert code == 0, err
    assert f"indexed {n_docs} documents" in out
    assert "hits@3" in out and "router was trained" in out
    print(out, file=sys.stderr)  # visible with -s


def test_query_fusion_shows_both_sides(capsys, bank):
    hits = query(capsys, bank, "--fusion", "bm25", "--alpha", "0", "-k", "4")
    assert hits[0]["id"] == "lighthouse" and hits[0]["lexical_score"] > 0  # BM25 only: the passage it names
    assert all({"latent_score", "lexical_score"} <= set(h) for h in hits)
    code, out, err = run(capsys, "query", bank, "lighthouse", "--fusion", "bm25")
    assert code == 0 and "routing" in out and "BM25" in out, err
    code, _, err = run(capsys, "query", bank, "lighthouse", "--fusion", "bm25", "--alpha", "2")
    assert code == 2 and "alpha" in err
    code, _, err = run(capsys, "query", bank, "lighthouse", "--alpha", "0.5")
    assert code == 2 and "fusion" in err


@pytest.mark.parametrize("mode", ["latent", "hybrid"])
def test_ask_fusion_uses_the_fused_top_k(capsys, bank, mode):
    hits = query(capsys, bank, "--fusion", "bm25", "--alpha", "0", "-k", "2")
    code, out, err = run(capsys, "ask", bank, "Who built the lighthouse?", "--mode", mode, "-k", "2",
                         "--max-new-tokens", "3", "--fusion", "bm25", "--alpha", "0", "--json")
    assert code == 0, err
    answer = json.loads(out)
    assert answer["doc_ids"] == [h["id"] for h in hits] and answer["fusion"]["alpha"] == 0.0
    assert answer["fusion"]["lexical_scores"] == pytest.approx([h["lexical_score"] for h in hits])
    for selected in answer["layer_selections"].values():  # latent: every routing layer, the same two
        assert sorted(selected) == sorted(answer["doc_ids"])
    code, out, err = run(capsys, "ask", bank, "Who built the lighthouse?", "--mode", mode, "-k", "2",
                         "--max-new-tokens", "3", "--fusion", "bm25", "--alpha", "0")
    assert code == 0 and "fused with BM25 at alpha 0" in err, err
    code, _, err = run(capsys, "ask", bank, "lighthouse", "--mode", mode, "--fusion", "bm25", "--alpha", "-1")
    assert code == 2 and "alpha" in err
