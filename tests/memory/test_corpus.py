from __future__ import annotations

import json
from pathlib import Path

import pytest

from msa_core.errors import InvalidInputError
from msa_core.memory.corpus import DEMO_CORPUS_PATH, DEMO_QUESTIONS_PATH, CorpusRecord, read_corpus


def write_jsonl(path: Path, lines: list[str], newline: str = "\n", bom: bool = False) -> Path:
    data = newline.join(lines).encode("utf-8")
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + data)
    return path


def rec(**fields) -> str:
    return json.dumps(fields)


# --- JSONL happy paths -------------------------------------------------------------------------


def test_jsonl_reads_fields_and_skips_blank_lines(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "c.jsonl",
        [
            rec(id="a", text="alpha", title="A", metadata={"k": 1}),
            "",
            "   ",
            rec(id=7, text="seven"),
            rec(text="no id here"),
        ],
    )
    records = read_corpus(path)
    assert records == [
        CorpusRecord(id="a", text="alpha", title="A", metadata={"k": 1}),
        CorpusRecord(id="7", text="seven", title=None, metadata={}),
        CorpusRecord(id="line-5", text="no id here", title=None, metadata={}),
    ]


def test_jsonl_bom_and_windows_newlines(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "c.jsonl", [rec(id="a", text="é"), rec(id="b", text="ü"), ""], "\r\n", bom=True)
    records = read_corpus(str(path))
    assert [(r.id, r.text) for r in records] == [("a", "é"), ("b", "ü")]


def test_jsonl_extra_keys_go_to_metadata(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "c.jsonl", [rec(id="a", text="t", url="http://x", metadata={"y": 2})])
    assert read_corpus(path)[0].metadata == {"y": 2, "url": "http://x"}


def test_jsonl_keeps_unicode_line_separators_inside_strings(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text('{"id": "a", "text": "one\u2028two"}\n', encoding="utf-8")
    assert read_corpus(path)[0].text == "one\u2028two"


# --- JSONL errors: each names the file and line ------------------------------------------------


@pytest.mark.parametrize(
    ("bad_line", "expected"),
    [
        ('{"id": "x", "text": ', "line 2: invalid JSON"),
        ('["a", "b"]', "line 2: expected a JSON object, got list"),
        (rec(id="x"), "line 2: missing 'text'"),
        (rec(id="x", text=5), "line 2: 'text' must be a string"),
        (rec(id="x", text="  \n "), "line 2: 'text' is empty"),
        (rec(id=1.5, text="t"), "line 2: 'id' must be a non-empty string or an integer"),
        (rec(id=True, text="t"), "line 2: 'id' must be"),
        (rec(id="", text="t"), "line 2: 'id' must be"),
        (rec(id="x", text="t", metadata=[1]), "line 2: 'metadata' must be a JSON object, got list"),
        (rec(id="x", text="t", title=3), "line 2: 'title' must be a string"),
        (rec(id="x", text="t", src=1, metadata={"src": 2}), "line 2: key 'src'"),
    ],
)
def test_jsonl_bad_line_is_named(tmp_path: Path, bad_line: str, expected: str) -> None:
    path = write_jsonl(tmp_path / "corpus.jsonl", [rec(id="ok", text="fine"), bad_line])
    with pytest.raises(InvalidInputError) as info:
        read_corpus(path)
    assert "corpus.jsonl" in str(info.value)
    assert expected in str(info.value)


def test_jsonl_duplicate_ids_name_both_lines(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "c.jsonl", [rec(id="a", text="1"), rec(id="b", text="2"), rec(id="a", text="3")])
    with pytest.raises(InvalidInputError, match=r"line 3: duplicate id 'a' \(first used on line 1\)"):
        read_corpus(path)


def test_jsonl_default_id_cannot_shadow_explicit_id(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "c.jsonl", [rec(id="line-2", text="1"), rec(text="2")])
    with pytest.raises(InvalidInputError, match="duplicate id 'line-2'"):
        read_corpus(path)


def test_jsonl_not_utf8_names_line_and_fix(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    path.write_bytes(rec(id="a", text="ok").encode() + b"\n" + '{"id": "b", "text": "caf\xe9"}'.encode("latin-1"))
    with pytest.raises(InvalidInputError, match=r"c\.jsonl line 2: not valid UTF-8.*re-encode"):
        read_corpus(path)


def test_empty_jsonl_is_an_error(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "c.jsonl", ["", "  "])
    with pytest.raises(InvalidInputError, match="has no documents"):
        read_corpus(path)


def test_missing_path_and_wrong_kind(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="nope.jsonl does not exist"):
        read_corpus(tmp_path / "nope.jsonl")
    other = tmp_path / "corpus.csv"
    other.write_text("id,text\n", encoding="utf-8")
    with pytest.raises(InvalidInputError, match=r"corpus\.csv must be a \.jsonl file"):
        read_corpus(other)


# --- folders -----------------------------------------------------------------------------------


def test_folder_recursive_sorted_with_relative_ids(tmp_path: Path) -> None:
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "b.md").write_text("# B\nbody\n", encoding="utf-8")
    (tmp_path / "a.txt").write_text("alpha\n", encoding="utf-8")
    (tmp_path / "sub" / "deeper" / "c.TXT").write_text("gamma", encoding="utf-8")
    (tmp_path / "sub" / "skip.json").write_text("{}", encoding="utf-8")
    (tmp_path / ".hidden" / "x.txt").write_text("hidden", encoding="utf-8")
    records = read_corpus(tmp_path)
    assert [r.id for r in records] == ["a.txt", "b.md", "sub/deeper/c.TXT"]
    assert records[0] == CorpusRecord(id="a.txt", text="alpha", title="a", metadata={"source": "a.txt"})
    assert records[1].text == "# B\nbody"
    assert records[2].title == "c"
    assert records[2].metadata == {"source": "sub/deeper/c.TXT"}


def test_folder_bom_and_windows_newlines(tmp_path: Path) -> None:
    (tmp_path / "w.txt").write_bytes(b"\xef\xbb\xbfline one\r\nline two\r\n")
    (record,) = read_corpus(tmp_path)
    assert record.text == "line one\nline two"


def test_folder_not_utf8_names_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "good.txt").write_text("fine", encoding="utf-8")
    (tmp_path / "bad.txt").write_bytes(b"one\ntwo\ncaf\xe9\n")
    with pytest.raises(InvalidInputError, match=r"bad\.txt line 3: not valid UTF-8.*re-encode"):
        read_corpus(tmp_path)


def test_folder_without_text_files_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "data.csv").write_text("x", encoding="utf-8")
    with pytest.raises(InvalidInputError, match=r"no \.txt or \.md files"):
        read_corpus(tmp_path)


def test_folder_empty_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("text", encoding="utf-8")
    (tmp_path / "empty.md").write_text(" \n\n", encoding="utf-8")
    with pytest.raises(InvalidInputError, match=r"empty\.md: file is empty"):
        read_corpus(tmp_path)


# --- the bundled demo corpus -------------------------------------------------------------------


def test_demo_corpus_reads_cleanly_and_gold_ids_exist() -> None:
    records = read_corpus(DEMO_CORPUS_PATH)
    ids = {r.id for r in records}
    assert 20 <= len(records) <= 30
    for r in records:
        assert r.title and r.metadata.get("topic")
        assert 60 <= len(r.text.split()) <= 180, r.id
    questions = json.loads(DEMO_QUESTIONS_PATH.read_text(encoding="utf-8"))
    assert len(questions) >= 6
    for q in questions:
        assert set(q) == {"question", "answer", "gold_id"}
        assert q["gold_id"] in ids
