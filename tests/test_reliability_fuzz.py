"""Fuzzed input on the public entry points (hypothesis, tiny random models).

Every input gives a result or an error of our own (`MSAError`; the adapters' ValueError contracts
are met by InvalidInputError, a ValueError), never a traceback from deep inside, and a failed call
leaves the bank exactly as it was. Each bug these tests found is kept as an @example.

Runs are derandomized (a fixed seed) so CI is reproducible; MSA_FUZZ_EXPLORE=1 draws new inputs on
each run, with more examples, to look for new bugs.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, event, example, given, reject, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

from msa_core import MSAConfig, MSAModel
from msa_core.config import EncodeConfig
from msa_core.errors import InvalidInputError, MSAError
from msa_core.memory.bank import MemoryBank
from msa_core.memory.corpus import read_corpus
from msa_core.memory.encoded import EncodedDocuments
from msa_core.memory.filters import compile_filter

EXPLORE = bool(os.environ.get("MSA_FUZZ_EXPLORE"))
FUZZ = settings(max_examples=300 if EXPLORE else 40, derandomize=not EXPLORE, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

LAYERS, H, D = [2, 3], 2, 4
SURROGATE = "\ud800"

# ---- strategies ------------------------------------------------------------------------------

# Text including lone surrogates (st.text() leaves them out by default), control characters, etc.
any_text = st.text(st.characters(exclude_categories=()), max_size=8)
short_ids = st.sampled_from(["a", "b", "c", "a#0", "a#1", "b#0", "#", " ", "é", "None", "1"])
id_strings = short_ids | st.text(max_size=4) | any_text
json_leaf = (st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.floats() | any_text
             | st.sampled_from(["en", "fr", 2020, 2021, 3.5, True, False, None]))
non_json_leaf = st.sets(st.integers(), max_size=2) | st.binary(max_size=3) | st.just(object()) | st.complex_numbers()
meta_keys = st.sampled_from(["lang", "year", "tags", "x"]) | st.text(max_size=3)


def metadata_values(keys: st.SearchStrategy, leaves: st.SearchStrategy) -> st.SearchStrategy:
    return st.recursive(leaves, lambda inner: st.lists(inner, max_size=3) | st.tuples(inner)
                        | st.dictionaries(keys, inner, max_size=3), max_leaves=6)


# Metadata dicts: storable JSON, JSON with NaN or lone surrogates, non-string keys or non-JSON values.
valid_leaf = (st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False, allow_infinity=False)
              | st.text(max_size=5) | st.sampled_from(["en", "fr", 2020, 2021]))
valid_metadatas = st.dictionaries(meta_keys, metadata_values(meta_keys, valid_leaf), max_size=3)
metadatas = valid_metadatas | st.dictionaries(meta_keys, metadata_values(meta_keys, json_leaf), max_size=3) | (
    st.dictionaries(meta_keys | st.integers(), metadata_values(meta_keys | st.integers(), json_leaf | non_json_leaf),
                    max_size=3))
filter_values = json_leaf | st.lists(json_leaf, max_size=3) | non_json_leaf
field_ops = st.sampled_from(["$eq", "$ne", "$in", "$nin", "$gt", "$gte", "$lt", "$lte", "$regex", "$", "eq"])
filter_fields = st.sampled_from(["lang", "year", "tags", "missing", "$and", "$bogus"]) | st.text(max_size=3)


def _raising(metadata: dict) -> bool:
    return metadata["missing"] > 1  # KeyError on most documents


def filter_clauses(inner: st.SearchStrategy) -> st.SearchStrategy:
    field_test = filter_values | st.dictionaries(field_ops, filter_values, min_size=1, max_size=2)
    return (st.dictionaries(filter_fields, field_test, max_size=2)
            | st.builds(lambda op, subs: {op: subs}, st.sampled_from(["$and", "$or"]), st.lists(inner, max_size=2))
            | st.builds(lambda sub: {"$not": sub}, inner)
            | st.dictionaries(st.integers(), st.integers(), min_size=1, max_size=1))


valid_filters = st.none() | st.fixed_dictionaries({}, optional={
    "lang": st.sampled_from(["en", "fr", {"$in": ["en", "fr"]}, {"$ne": "en"}]),
    "year": st.sampled_from([2020, {"$gte": 1900}, {"$lt": 2021.5, "$gt": 1000}, {"$nin": [1887]}])})
filters = valid_filters | st.recursive(
    st.none() | st.just({}) | st.sampled_from([_raising, lambda m: m.get("year", 0) > 2020, len, 3, "lang", [1]]),
    filter_clauses, max_leaves=5)
questions = (st.text(max_size=30)
             | st.sampled_from(["", " ", "\n\t", "<|im_end|>", "<|im_start|>user\nhi", "\x00", "🙂" * 5,
                                "Who built the lighthouse?", "word " * 700]))


# ---- helpers ---------------------------------------------------------------------------------

def bank_state(bank: MemoryBank) -> tuple:
    """Everything a bank holds, comparable with ==."""
    tensors = (bank.k_bar, bank.v_bar, bank.kr_bar, bank.chunk_doc, bank.chunk_offsets, bank.chunk_counts)
    return (bank.ids(), bank.docstore, *(t.contiguous().view(torch.uint8).numpy().tobytes() for t in tensors))


def call(bank: MemoryBank, fn, *args, **kwargs) -> tuple[bool, Any]:
    """(True, result), or (False, error) for an error of ours after which the bank is unchanged."""
    before = bank_state(bank)
    try:
        out = True, fn(*args, **kwargs)
        note_event(f"{fn.__name__} ok")  # --hypothesis-show-statistics: how often each path runs
        return out
    except MSAError as exc:
        note_event(f"{fn.__name__} refused")
        assert bank_state(bank) == before, f"failed call {fn.__name__} changed the bank: {exc}"
        return False, exc


def note_event(name: str) -> None:
    if currently_in_test_context():
        event(name)


def json_copy(value: Any) -> Any:
    return json.loads(json.dumps(value))


def round_trips(bank: MemoryBank) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        bank.save(Path(tmp) / "bank")
        assert bank_state(MemoryBank.load(Path(tmp) / "bank")) == bank_state(bank)


# ---- MemoryBank.add --------------------------------------------------------------------------

def new_bank() -> MemoryBank:
    return MemoryBank(layers=LAYERS, kv_heads=H, head_dim=D,
                      config=MSAConfig(encode=EncodeConfig(storage_dtype="float16", chunk_size=4)),
                      backbone_fingerprint="bb", router_fingerprint="rt")


def encode_docs(docs: list[tuple[str, list[int], str, Any]], dtype=torch.float32, scale: float = 1.0
                ) -> EncodedDocuments:
    """EncodedDocuments of (parent id, chunks per part, text, metadata) specs, random tensors."""
    f: dict[str, list] = {k: [] for k in ("ids", "parent_ids", "part_index", "texts", "metadatas", "n_tokens",
                                          "n_chunks")}
    for parent, chunks, text, meta in docs:
        for j, c in enumerate(chunks):
            f["ids"].append(parent if len(chunks) == 1 else f"{parent}#{j}")
            f["parent_ids"].append(parent)
            f["part_index"].append(j)
            f["texts"].append(text[j::len(chunks)])
            f["metadatas"].append(meta)
            f["n_tokens"].append(c * 4)
            f["n_chunks"].append(c)
    shape = (len(LAYERS), sum(f["n_chunks"]), H, D)
    k, v, kr = ((torch.randn(shape) * scale).to(dtype) for _ in range(3))
    return EncodedDocuments(layers=list(LAYERS), k_bar=k, v_bar=v, kr_bar=kr, **f)


def base_bank() -> MemoryBank:
    bank = new_bank()
    bank.add(encode_docs([("a", [1, 2], "alpha text", {"lang": "en"}), ("b", [1], "beta", {"year": 2020}),
                          ("c", [2], "gamma", {})]))
    return bank


doc_specs = st.lists(st.tuples(short_ids | id_strings, st.lists(st.integers(1, 3), min_size=1, max_size=3),
                               st.text(max_size=8) | any_text, metadatas), max_size=4)
mutations = st.just([]) | st.lists(st.one_of(
    st.tuples(st.sampled_from(["ids", "parent_ids", "texts"]), st.lists(id_strings | st.none() | st.integers(),
                                                                        max_size=4)),
    st.tuples(st.sampled_from(["part_index", "n_tokens", "n_chunks"]), st.lists(st.integers(-2, 4) | st.booleans()
                                                                                | st.floats(0, 3), max_size=4)),
    st.tuples(st.just("metadatas"), st.lists(metadatas | st.none() | st.integers(), max_size=4)),
    st.tuples(st.just("layers"), st.lists(st.integers(0, 4), max_size=3)),
    st.tuples(st.sampled_from(["k_bar", "v_bar", "kr_bar"]),
              st.sampled_from(["nan", "inf", "int", "bool", "shape", "complex", "list", "float64", "grad"])),
), max_size=2)


def mutate(enc: EncodedDocuments, field: str, value: Any) -> None:
    if field.endswith("_bar"):
        t = getattr(enc, field)
        if not isinstance(t, torch.Tensor):  # already replaced by an earlier change
            return
        value = {"nan": lambda: t.masked_fill(torch.rand(t.shape) < 0.5, math.nan),
                 "inf": lambda: t + math.inf, "int": lambda: t.long(), "bool": lambda: t > 0,
                 "shape": lambda: t[..., :1], "complex": lambda: t.to(torch.complex64),
                 "list": lambda: t.tolist(), "float64": lambda: t.double() * 1e6,
                 "grad": lambda: t.clone().requires_grad_()}[value]()
    setattr(enc, field, value)


@settings(FUZZ, max_examples=300 if EXPLORE else 60)
@given(docs=doc_specs, dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
       scale=st.sampled_from([1.0, 1e3, 1e6]), changes=mutations)
@example(docs=[("s", [1], "ok", {})], dtype=torch.float32, scale=1.0, changes=[("ids", [SURROGATE])])  # bug 1
@example(docs=[("s", [1], "ok" + SURROGATE, {})], dtype=torch.float32, scale=1.0, changes=[])  # bug 1
@example(docs=[("s", [1], "ok", {"k": SURROGATE})], dtype=torch.float32, scale=1.0, changes=[])  # bug 1
@example(docs=[("a#0", [1], "clash with a's part", {})], dtype=torch.float32, scale=1.0, changes=[])
def test_bank_add(docs, dtype, scale, changes):
    bank = base_bank()
    enc = encode_docs(docs, dtype, scale)
    for field, value in changes:
        mutate(enc, field, value)
    ok, out = call(bank, bank.add, enc)
    if not ok:
        return
    assert out == list(dict.fromkeys(enc.parent_ids))
    for parent in out:
        (record,) = bank.get([parent])
        assert record["text"] == "".join(t for t, p in zip(enc.texts, enc.parent_ids) if p == parent)
    round_trips(bank)  # what add accepted, save and load keep


def test_bank_add_refuses_metadata_nested_too_deeply():  # bug 2 (not an @example: hypothesis cannot print it)
    value: Any = 1
    for _ in range(5000):
        value = {"k": [value]}
    bank = base_bank()
    ok, err = call(bank, bank.add, encode_docs([("s", [1], "deep", value)]))
    assert not ok and "nested too deeply" in str(err)


@pytest.mark.parametrize("ids", [[SURROGATE], ["ok", "x" + SURROGATE + "y"]])
def test_bank_delete_and_get_take_any_string_ids(ids):
    bank = base_bank()
    before = bank_state(bank)
    assert bank.get(ids) == [] and bank.delete(ids) == 0 and bank_state(bank) == before
    for bad in (None, 3, [None], [b"a"], [["a"]]):
        assert not call(bank, bank.delete, bad)[0]
        assert not call(bank, bank.get, bad)[0]


# ---- retrieval on a tiny model ---------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tiny_model_dir) -> MSAModel:
    # Short max_doc_tokens: longer texts are split into parts, so parents and parts are both exercised.
    return MSAModel.from_pretrained(tiny_model_dir("llama"),
                                    config=MSAConfig(encode={"chunk_size": 4, "max_doc_tokens": 12}))


DOCS = {
    "light": ("The lighthouse of Velmora was built in 1887 by the engineer Ada Quist.",
              {"lang": "en", "year": 1887, "tags": ["sea", "history"]}),
    "ferry": ("Ferries leave the harbour every morning at seven and return at dusk.", {"lang": "en", "year": 2020}),
    "paris": ("Paris is the capital of France.", {"lang": "fr", "year": 2021, "tags": []}),
    "msa": ("Memory sparse attention routes a question.", {"year": 2025.5, "x": None}),
    "short": ("Hi.", {"lang": "en", "x": {"nested": [1, 2]}}),
}


@pytest.fixture(scope="module")
def tiny_bank(tiny) -> MemoryBank:
    return tiny.index([t for t, _ in DOCS.values()], ids=list(DOCS), metadatas=[m for _, m in DOCS.values()])


@FUZZ
@given(question=questions, k=st.integers(-2, 8) | st.just(10**9), flt=filters, parts=st.booleans(),
       layers=st.booleans())
@example(question="Who?", k=3, flt={"year": {"$gt": "x"}}, parts=False, layers=True)
@example(question="Who?", k=2, flt=_raising, parts=True, layers=False)
def test_retrieve(tiny, tiny_bank, question, k, flt, parts, layers):
    ok, hits = call(tiny_bank, tiny.retrieve, question, tiny_bank, k, filter=flt, include_parts=parts,
                    layer_scores=layers)
    if not ok:
        assert isinstance(hits, InvalidInputError)
        return
    passes = compile_filter(flt)
    rows = [p for p in tiny_bank.docstore if passes(p.metadata)]
    wanted = {p.id if parts else p.parent_id: p for p in rows}
    assert len(hits) == min(k, len(wanted))  # the filter applies before routing: k come back when k pass
    assert len({h.id for h in hits}) == len(hits)
    scores = [h.score for h in hits]
    assert scores == sorted(scores, reverse=True) and all(math.isfinite(s) for s in scores)
    for h in hits:
        assert h.id in wanted and 0.0 <= h.relevance_score <= 1.0
        assert h.text == (wanted[h.id].text if parts else tiny_bank.get([h.id])[0]["text"])
        assert h.metadata == wanted[h.id].metadata
        assert (h.layer_scores is not None and sorted(h.layer_scores) == tiny.layers) if layers \
            else h.layer_scores is None


def test_retrieve_batch_of_questions(tiny, tiny_bank):
    out = tiny.retrieve(["lighthouse", "ferries"], tiny_bank, k=2)
    assert [len(r) for r in out] == [2, 2]
    for bad in ([], ["ok", ""], ["ok", " \n"]):
        assert not call(tiny_bank, tiny.retrieve, bad, tiny_bank, 2)[0]


# Bugs found in msa_core/model.py and generate.py, fixed: regression tests.
@pytest.mark.parametrize("k", [1.5, "2", None, True])
def test_retrieve_rejects_a_k_that_is_not_an_integer(tiny, tiny_bank, k):
    with pytest.raises(InvalidInputError):
        tiny.retrieve("lighthouse", tiny_bank, k)


@pytest.mark.parametrize("where", ["question", "document"])
def test_lone_surrogate_text_is_refused_clearly(tiny, where):
    bank = tiny.index(["some text"], ids=["a"])
    with pytest.raises(InvalidInputError):
        if where == "question":
            tiny.retrieve("who" + SURROGATE, bank, 1)
        else:
            tiny.add(bank, ["bad" + SURROGATE], ids=["b"])


@pytest.mark.parametrize("question, flt", [("ok", {"$and": []}), ("", None)])
def test_bad_filter_or_question_refused_even_on_an_empty_bank(tiny, question, flt):
    with pytest.raises(InvalidInputError):
        tiny.retrieve(question, tiny.new_bank(), 2, filter=flt)


# ---- corpus readers (msa index / msa add) ----------------------------------------------------

def bank_accepts(record) -> None:
    """What read_corpus returns must not fail later, after encoding, in MemoryBank.add or save."""
    assert isinstance(record.id, str) and record.id and isinstance(record.text, str) and record.text.strip()
    record.id.encode("utf-8"), record.text.encode("utf-8")
    json.dumps(record.metadata, allow_nan=False, ensure_ascii=False).encode("utf-8")


json_objects = st.dictionaries(
    st.sampled_from(["id", "text", "title", "metadata", "url"]) | st.text(max_size=3),
    json_leaf | st.lists(json_leaf, max_size=2) | st.dictionaries(meta_keys, json_leaf, max_size=2), max_size=5)
jsonl_lines = st.lists(
    json_objects.map(lambda o: json.dumps(o, ensure_ascii=False))
    | st.text(max_size=12) | st.sampled_from(["", "  ", "[]", "null", "{", '{"text": NaN}']), max_size=5)


@FUZZ
@given(lines=jsonl_lines, newline=st.sampled_from(["\n", "\r\n"]), bom=st.booleans(), junk=st.binary(max_size=4))
@example(lines=['{"text": "a", "metadata": {"n": ' + "9" * 5000 + "}}"], newline="\n", bom=False, junk=b"")  # bug 3
@example(lines=['{"text": "a", "m": ' + "[" * 100_000 + "]" * 100_000 + "}"], newline="\n", bom=False,
         junk=b"")  # bug 3
@example(lines=['{"text": "a", "m": ' + "[" * 990 + "]" * 990 + "}"], newline="\n", bom=False, junk=b"")  # bug 3
@example(lines=['{"text": "a", "metadata": {"n": NaN}}'], newline="\n", bom=False, junk=b"")  # bug 4
@example(lines=['{"text": "a", "score": -Infinity}'], newline="\n", bom=False, junk=b"")  # bug 4
@example(lines=['{"id": "\\ud800", "text": "a"}'], newline="\n", bom=False, junk=b"")  # bug 5
@example(lines=['{"text": "a\\udfff b"}'], newline="\n", bom=False, junk=b"")  # bug 5
@example(lines=['{"text": "a"}'], newline="\n", bom=False, junk=b"\xff")
def test_read_jsonl(lines, newline, bom, junk):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.jsonl"
        path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + newline.join(lines).encode("utf-8", "surrogatepass")
                         + junk)
        try:
            records = read_corpus(path)
        except InvalidInputError as exc:
            assert str(path) in str(exc)  # the error names the file (and the line)
            return
    assert records and len({r.id for r in records}) == len(records)
    for r in records:
        bank_accepts(r)


file_names = st.lists(st.sampled_from(["a", "b", ".hidden", "sub", "é", "x y"]), min_size=1, max_size=3).map(
    "/".join).flatmap(lambda stem: st.sampled_from([".txt", ".md", ".TXT", ".jsonl", ""]).map(lambda s: stem + s))
file_bodies = (st.text(max_size=20).map(lambda t: t.encode("utf-8")) | st.binary(max_size=8)
               | st.sampled_from([b"\xef\xbb\xbfhello", b"a\r\nb\rc", b"  \n\t", b"\xff\xfe", b""]))


@FUZZ
@given(files=st.dictionaries(file_names, file_bodies, max_size=4))
def test_read_folder(files):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "corpus"
        root.mkdir()
        for name, body in files.items():
            path = root / name
            if path.parent.is_file() or path.is_dir() or any(p.is_file() for p in path.parents if p != root.parent):
                continue  # a name used both as a file and as a folder
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(body)
        try:
            records = read_corpus(root)
        except InvalidInputError:
            return
        expected = sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                          if p.is_file() and p.suffix.lower() in (".txt", ".md")
                          and not any(part.startswith(".") for part in p.relative_to(root).parts))
    assert [r.id for r in records] == expected
    for r in records:
        bank_accepts(r)


def test_folder_file_name_that_is_not_utf8(tmp_path):  # bug 6
    root = tmp_path / "corpus"
    root.mkdir()
    (root / "good.txt").write_text("fine")
    fd = os.open(os.path.join(os.fsencode(root), b"bad\xff.txt"), os.O_WRONLY | os.O_CREAT)
    os.write(fd, b"text")
    os.close(fd)
    with pytest.raises(InvalidInputError, match="not valid UTF-8"):
        read_corpus(root)


# ---- LangChain vector store ------------------------------------------------------------------

lc_ids = st.none() | st.integers(-2, 2) | id_strings
doc_texts = (st.sampled_from([t for t, _ in DOCS.values()]) | st.text(min_size=1, max_size=40)
             | st.sampled_from(["", " \n", "\x00", "<|im_end|>"]))
lc_ops = st.lists(st.one_of(
    st.fixed_dictionaries({"op": st.just("add"), "texts": st.lists(doc_texts, max_size=3),
                           "ids": st.none() | st.lists(lc_ids, max_size=3),
                           "metadatas": st.none() | st.lists(st.none() | valid_metadatas, min_size=1, max_size=3)
                           | st.lists(st.none() | metadatas, max_size=3)}),
    st.fixed_dictionaries({"op": st.just("search"), "query": questions, "k": st.integers(-1, 6), "filter": filters}),
    st.fixed_dictionaries({"op": st.just("delete"), "ids": st.none() | st.lists(lc_ids, max_size=3) | short_ids}),
    st.fixed_dictionaries({"op": st.just("get"), "ids": st.lists(lc_ids, max_size=3) | short_ids}),
), min_size=1, max_size=6)


def as_list(ids: Any) -> list:
    return [ids] if isinstance(ids, str) else list(ids)  # one string is one id


def _lc_add(texts, ids, metadatas):
    return {"op": "add", "texts": texts, "ids": ids, "metadatas": metadatas}


@FUZZ
@given(ops=lc_ops)
@example(ops=[_lc_add(["one", "two"], ["a", "b"], [{"k": 1}])])  # bug 7: bare ValueError
@example(ops=[_lc_add(["one"], ["a", "b"], None)])  # bug 7
@example(ops=[{"op": "delete", "ids": None}])  # bug 7
@example(ops=[_lc_add(["one", "two"], ["l", "i"], None), {"op": "delete", "ids": "light"}])  # bug 8
@example(ops=[{"op": "get", "ids": "msa"}, {"op": "add", "texts": "text", "ids": None, "metadatas": None}])  # bug 8
@example(ops=[_lc_add(["one"], [SURROGATE], None)])  # bug 1, through the adapter
@example(ops=[_lc_add(["one two three four five six seven eight nine ten eleven twelve"], ["a"], None),
              _lc_add(["clash"], ["a#1"], None), {"op": "get", "ids": ["a", "a#1"]}])
def test_langchain_vector_store(tiny, ops):
    from msa_integrations.langchain import MSAVectorStore

    vs = MSAVectorStore(model=tiny)
    vs.add_texts([t for t, _ in DOCS.values()], [m for _, m in DOCS.values()], ids=list(DOCS))
    expected: dict[str, tuple[str, dict]] = {i: (t, json_copy(m)) for i, (t, m) in DOCS.items()}
    for op in ops:
        bank = vs.store.bank
        if op["op"] == "add":
            ok, out = call(bank, vs.add_texts, op["texts"], op["metadatas"], ids=op["ids"])
            if ok:
                metas = op["metadatas"] or [None] * len(op["texts"])
                for doc_id, text, meta in zip(out, op["texts"], metas):
                    expected[doc_id] = (text, json_copy(meta or {}))
        elif op["op"] == "delete":
            ok, _ = call(bank, vs.delete, op["ids"])
            if ok:
                for i in as_list(op["ids"]):
                    expected.pop(str(i), None)
        elif op["op"] == "get":
            docs = vs.get_by_ids(op["ids"])
            asked = [str(i) for i in as_list(op["ids"])]
            assert [d.id for d in docs] == [i for i in asked if i in expected]
        else:
            ok, out = call(bank, vs.similarity_search_with_score, op["query"], op["k"], op["filter"])
            if ok and not expected:
                assert out == []  # an empty bank holds nothing to return
            elif ok:
                passes = compile_filter(op["filter"])
                wanted = {i for i, (_, m) in expected.items() if passes(m)}
                assert len(out) == min(op["k"], len(wanted))
                assert all(d.id in wanted and d.page_content == expected[d.id][0] and math.isfinite(s)
                           for d, s in out)
        stored = {d.id: (d.page_content, d.metadata) for d in vs.get_by_ids(vs.store.ids())}
        assert stored == expected
    round_trips(vs.store.bank)  # what the store accepted, it can save and load


# ---- LlamaIndex vector store -----------------------------------------------------------------

li_meta = valid_metadatas | st.dictionaries(meta_keys, metadata_values(meta_keys, json_leaf), max_size=3)
li_values = (st.none() | st.integers(-5, 3000) | st.floats(allow_nan=False) | st.sampled_from(["en", "fr", "sea", ""])
             | st.lists(st.sampled_from(["en", "sea", "history"]), max_size=2) | st.lists(st.integers(0, 3000), max_size=2))


def li_filters():
    from llama_index.core.vector_stores.types import FilterCondition, FilterOperator, MetadataFilter, MetadataFilters

    def one(key, value, op):
        try:
            return MetadataFilter(key=key, value=value, operator=op)
        except ValueError:  # pydantic refuses the pairing before it reaches us
            reject()

    single = st.builds(one, st.sampled_from(["lang", "year", "tags", "missing"]), li_values,
                       st.sampled_from(list(FilterOperator)))
    return st.none() | st.builds(lambda fs, c: MetadataFilters(filters=fs, condition=c), st.lists(single, max_size=3),
                                 st.sampled_from(list(FilterCondition)))


li_ops = st.lists(st.one_of(
    st.fixed_dictionaries({"op": st.just("add"), "nodes": st.lists(st.tuples(short_ids | st.text(max_size=3),
                                                                             doc_texts, li_meta,
                                                                             st.sampled_from([None, "r1", "r2"])),
                                                                   max_size=3)}),
    st.fixed_dictionaries({"op": st.just("query"), "query": questions, "k": st.integers(-1, 6),
                           "filters": st.deferred(li_filters),
                           "node_ids": st.none() | st.lists(short_ids, max_size=2),
                           "doc_ids": st.none() | st.lists(st.sampled_from(["r1", "r2", "zz"]), max_size=2)}),
    st.fixed_dictionaries({"op": st.just("delete"), "ref": st.sampled_from(["r1", "r2", "zz", "a", "None"])}),
    st.fixed_dictionaries({"op": st.just("delete_nodes"), "filters": st.deferred(li_filters),
                           "node_ids": st.none() | st.lists(short_ids | st.just("light"), max_size=3) | short_ids}),
    st.fixed_dictionaries({"op": st.just("get"), "filters": st.deferred(li_filters),
                           "node_ids": st.none() | st.lists(short_ids | st.just("msa"), max_size=3) | short_ids}),
), min_size=1, max_size=6)


@FUZZ
@given(ops=li_ops)
@example(ops=[{"op": "get", "node_ids": "msa", "filters": None},
              {"op": "delete_nodes", "node_ids": "light", "filters": None}])  # bug 8
def test_llama_index_vector_store(tiny, ops):
    from llama_index.core.schema import NodeRelationship, RelatedNodeInfo, TextNode
    from llama_index.core.vector_stores.types import VectorStoreQuery

    from msa_integrations.llama_index import MSAVectorStore

    def node(node_id: str, text: str, metadata: dict, ref: str | None) -> TextNode:
        source = {NodeRelationship.SOURCE: RelatedNodeInfo(node_id=ref)} if ref else {}
        return TextNode(id_=node_id, text=text, metadata=metadata, relationships=source)

    vs = MSAVectorStore(model=tiny, set_embed_model=False)
    refs = dict(zip(DOCS, ["r1", "r1", "r2", None, "r2"]))
    vs.add([node(i, t, m, refs[i]) for i, (t, m) in DOCS.items()])
    # id -> text, metadata, ref doc ("None" when absent, as LlamaIndex writes it)
    expected: dict[str, tuple[str, dict, str]] = {i: (t, m, refs[i] or "None") for i, (t, m) in DOCS.items()}

    def node_ids_where(filters) -> list[str]:
        return [n.node_id for n in vs.get_nodes(filters=filters)]

    for op in ops:
        bank = vs.store.bank
        if op["op"] == "add":
            nodes = [node(*spec) for spec in op["nodes"]]
            ok, out = call(bank, vs.add, nodes)
            if ok:
                assert out == [n.node_id for n in nodes]
                for n, (_, t, m, ref) in zip(nodes, op["nodes"]):
                    expected[n.node_id] = (t, json.loads(n.model_dump_json())["metadata"], ref or "None")
        elif op["op"] == "delete":
            ok, _ = call(bank, vs.delete, op["ref"])
            if ok:
                expected = {i: v for i, v in expected.items() if v[2] != op["ref"]}
        elif op["op"] == "delete_nodes":
            try:
                matching = set(node_ids_where(op["filters"]))
            except InvalidInputError:
                matching = None  # a bad filter: delete_nodes must refuse it too
            ok, _ = call(bank, vs.delete_nodes, op["node_ids"], op["filters"])
            if op["filters"] is not None and matching is None:
                assert not ok or not expected
            elif ok and (op["node_ids"] is not None or op["filters"] is not None):
                doomed = set(expected) if op["node_ids"] is None else set(as_list(op["node_ids"]))
                if op["filters"] is not None:
                    doomed &= matching
                expected = {i: v for i, v in expected.items() if i not in doomed}
        elif op["op"] == "get":
            ok, nodes = call(bank, vs.get_nodes, op["node_ids"], op["filters"])
            if ok:
                asked = list(expected) if op["node_ids"] is None else [i for i in as_list(op["node_ids"])
                                                                       if i in expected]
                got = [n.node_id for n in nodes]
                assert set(got) <= set(asked) and (op["filters"] is not None or sorted(got) == sorted(asked))
        else:
            query = VectorStoreQuery(query_str=op["query"], similarity_top_k=op["k"], filters=op["filters"],
                                     node_ids=op["node_ids"], doc_ids=op["doc_ids"])
            ok, result = call(bank, vs.query, query)
            if ok and not expected:
                assert result.ids == []
            elif ok:
                allowed = set(node_ids_where(op["filters"]))
                if op["node_ids"]:
                    allowed &= set(op["node_ids"])
                if op["doc_ids"]:
                    allowed &= {i for i, v in expected.items() if v[2] in op["doc_ids"]}
                assert len(result.ids) == min(op["k"], len(allowed)) and set(result.ids) <= allowed
                assert [n.node_id for n in result.nodes] == result.ids
        stored = {n.node_id: (n.get_content(), n.metadata) for n in vs.get_nodes()}
        assert stored == {i: (t, m) for i, (t, m, _) in expected.items()}
    round_trips(vs.store.bank)

