"""Tests of msa_core.memory.MemoryBank: data operations and crash-safe persistence."""

import json
import os
from pathlib import Path

import pytest
import torch

from msa_core.config import EncodeConfig, MSAConfig
from msa_core.errors import BankError, BankMismatchError, CorruptBankError, InvalidInputError
from msa_core.memory.bank import MemoryBank
from msa_core.memory.encoded import EncodedDocuments

LAYERS = [2, 3]
H, D = 2, 4


def make_bank(dtype="float16", layers=LAYERS):
    config = MSAConfig(encode=EncodeConfig(storage_dtype=dtype, chunk_size=8))
    return MemoryBank(layers=list(layers), kv_heads=H, head_dim=D, config=config,
                      backbone_fingerprint="bb" * 20, router_fingerprint="rt" * 20, model_name="tiny")


def doc(parent, chunks=(2,), meta=None, text=None):
    """Spec of one document: `chunks` gives the chunk count of each part."""
    return {"parent": parent, "chunks": list(chunks), "meta": meta or {}, "text": text or f"text of {parent}"}


def make_encoded(*docs, seed=0, layers=LAYERS):
    """EncodedDocuments with random tensors; a split document's text is cut into len(chunks) slices."""
    ids, parents, index, texts, metas, n_tokens, n_chunks = [], [], [], [], [], [], []
    for d in docs:
        n = len(d["chunks"])
        step = -(-len(d["text"]) // n)
        for j, c in enumerate(d["chunks"]):
            ids.append(d["parent"] if n == 1 else f"{d['parent']}#{j}")
            parents.append(d["parent"])
            index.append(j)
            texts.append(d["text"][j * step:(j + 1) * step])
            metas.append(dict(d["meta"]))
            n_tokens.append(c * 8 - 1)
            n_chunks.append(c)
    g = torch.Generator().manual_seed(seed)
    shape = (len(layers), sum(n_chunks), H, D)
    k, v, kr = (torch.randn(shape, generator=g) for _ in range(3))
    return EncodedDocuments(ids=ids, parent_ids=parents, texts=texts, metadatas=metas, n_tokens=n_tokens,
                            n_chunks=n_chunks, layers=list(layers), k_bar=k, v_bar=v, kr_bar=kr, part_index=index)


def snapshot(bank):
    return {
        "tensors": {n: getattr(bank, n).clone() for n in ("k_bar", "v_bar", "kr_bar")},
        "index": [bank.chunk_doc.clone(), bank.chunk_offsets.clone(), bank.chunk_counts.clone()],
        "docstore": bank.docstore,
        "ids": bank.ids(),
    }


def assert_same(bank, snap):
    for name, t in snap["tensors"].items():
        assert torch.equal(getattr(bank, name), t), name
    for a, b in zip([bank.chunk_doc, bank.chunk_offsets, bank.chunk_counts], snap["index"]):
        assert torch.equal(a, b)
    assert bank.docstore == snap["docstore"]
    assert bank.ids() == snap["ids"]


def doc_tensors(bank, parent):
    chunks = bank.chunks_of(bank.rows_of([parent]))
    return [getattr(bank, n).index_select(1, chunks) for n in ("k_bar", "v_bar", "kr_bar")]


@pytest.fixture
def bank():
    b = make_bank()
    b.add(make_encoded(doc("a", [2], {"lang": "en", "year": 2020}),
                       doc("b", [1, 3, 2], {"lang": "fr", "year": 2022}, text="abcdefghi"),
                       doc("c", [1], {"lang": "en"})))
    return b


# ---- data operations ---------------------------------------------------------------------
def test_add_len_info(bank):
    assert len(bank) == 3 and bank.num_parts == 5 and bank.num_chunks == 9
    assert bank.ids() == ["a", "b", "c"]
    assert "b" in bank and "b#1" not in bank
    assert bank.k_bar.shape == (2, 9, H, D) and bank.k_bar.dtype == torch.float16
    assert bank.chunk_doc.tolist() == [0, 0, 1, 2, 2, 2, 3, 3, 4]
    assert bank.chunk_offsets.tolist() == [0, 2, 3, 6, 8]
    assert bank.chunk_counts.tolist() == [2, 1, 3, 2, 1]
    info = bank.info()
    assert info["documents"] == 3 and info["parts"] == 5 and info["chunks"] == 9
    assert info["tokens"] == sum(c * 8 - 1 for c in [2, 1, 3, 2, 1])
    assert info["layers"] == LAYERS and info["kv_heads"] == H and info["head_dim"] == D
    assert info["chunk_size"] == 8 and info["storage_dtype"] == "float16" and info["model_name"] == "tiny"
    assert info["bytes"] >= 3 * 2 * 9 * H * D * 2
    assert info["backbone_fingerprint"] == "bb" * 20


def test_add_returns_parent_ids_and_casts():
    b = make_bank("float32")
    enc = make_encoded(doc("x", [1, 1]), doc("y"))
    assert b.add(enc) == ["x", "y"]
    assert b.k_bar.dtype == torch.float32 and torch.equal(b.k_bar, enc.k_bar)


def test_get_and_parts(bank):
    recs = bank.get(["c", "missing", "b"])
    assert [r["id"] for r in recs] == ["c", "b"]
    assert recs[1]["text"] == "abcdefghi" and recs[1]["metadata"] == {"lang": "fr", "year": 2022}
    assert recs[1]["n_parts"] == 3
    recs[1]["metadata"]["lang"] = "xx"  # a copy: the bank is untouched
    assert bank.get("b")[0]["metadata"]["lang"] == "fr"
    parts = bank.parts("b")
    assert [p["id"] for p in parts] == ["b#0", "b#1", "b#2"]
    assert [p["row"] for p in parts] == [1, 2, 3] and [p["part_index"] for p in parts] == [0, 1, 2]
    assert bank.parts("missing") == []


def test_upsert_replaces_all_parts(bank):
    other = {p: doc_tensors(bank, p) for p in ("a", "c")}
    enc = make_encoded(doc("b", [4], {"lang": "de"}, text="new"), seed=1)
    assert bank.add(enc) == ["b"]
    assert len(bank) == 3 and bank.num_parts == 3 and bank.num_chunks == 7
    assert bank.ids() == ["a", "c", "b"]  # an upserted document moves to the end
    assert [p["id"] for p in bank.parts("b")] == ["b"]
    assert bank.get(["b"])[0] == {"id": "b", "text": "new", "metadata": {"lang": "de"}, "n_parts": 1, "n_tokens": 31}
    assert torch.equal(doc_tensors(bank, "b")[0], enc.k_bar.half())
    for p, ts in other.items():
        for old, new in zip(ts, doc_tensors(bank, p)):
            assert torch.equal(old, new)


def test_delete_keeps_other_documents_bit_identical(bank):
    other = {p: doc_tensors(bank, p) for p in ("a", "c")}
    assert bank.delete(["b", "missing", "b"]) == 1
    assert bank.ids() == ["a", "c"] and bank.num_parts == 2 and bank.num_chunks == 3
    assert bank.chunk_doc.tolist() == [0, 0, 1]
    for p, ts in other.items():
        for old, new in zip(ts, doc_tensors(bank, p)):
            assert torch.equal(old, new)
    assert bank.delete(["b#0"]) == 0  # part ids are not parent ids
    assert bank.delete("a") == 1 and bank.ids() == ["c"]
    assert bank.delete([]) == 0


def test_delete_everything_leaves_empty_tensors(bank):
    assert bank.delete(bank.ids()) == 3
    assert len(bank) == 0 and bank.k_bar.shape == (2, 0, H, D) and bank.chunk_doc.numel() == 0


def test_chunks_of(bank):
    assert bank.chunks_of(torch.tensor([3, 0])).tolist() == [6, 7, 0, 1]
    assert bank.chunks_of(torch.tensor([2])).tolist() == [3, 4, 5]
    assert bank.chunks_of(torch.tensor([], dtype=torch.long)).tolist() == []
    assert bank.chunks_of([4, 4]).tolist() == [8, 8]
    assert bank.chunks_of(bank.rows_of(["c", "a"])).tolist() == [8, 0, 1]
    mask = torch.tensor([False, True, False, False, True])
    assert bank.chunks_of(mask).tolist() == [2, 8]
    with pytest.raises(InvalidInputError, match="out of range"):
        bank.chunks_of(torch.tensor([5]))
    with pytest.raises(InvalidInputError, match="out of range"):
        bank.chunks_of(torch.tensor([-1]))


def test_rows_of(bank):
    assert bank.rows_of(["b", "nope", "a"]).tolist() == [1, 2, 3, 0]
    assert bank.rows_of([]).dtype == torch.long


def test_row_mask_with_filters(bank):
    assert bank.row_mask().tolist() == [True] * 5
    assert bank.row_mask({"lang": "en"}).tolist() == [True, False, False, False, True]
    assert bank.row_mask({"year": {"$gte": 2021}}).tolist() == [False, True, True, True, False]
    assert bank.row_mask({"year": {"$ne": 2020}}).tolist() == [False, True, True, True, True]
    assert bank.row_mask(lambda m: m.get("year") == 2020).tolist() == [True, False, False, False, False]
    with pytest.raises(InvalidInputError, match="\\$bad"):
        bank.row_mask({"year": {"$bad": 1}})


def test_row_mask_on_empty_bank():
    assert make_bank().row_mask({"a": 1}).shape == (0,)


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda e: setattr(e, "layers", [1, 2]), "layers"),
        (lambda e: setattr(e, "k_bar", e.k_bar[..., :2]), "k_bar"),
        (lambda e: setattr(e, "v_bar", torch.zeros(2, 5, 3, D)), "v_bar"),
        (lambda e: e.ids.__setitem__(1, e.ids[0]), "twice"),
        (lambda e: e.n_chunks.__setitem__(0, 0), "n_chunks"),
        (lambda e: e.metadatas.__setitem__(0, {"when": object()}), "JSON"),
        (lambda e: e.metadatas.__setitem__(0, {1: "x"}), "non-string key"),
        (lambda e: e.metadatas.__setitem__(0, {"x": float("nan")}), "JSON"),
        (lambda e: e.part_index.__setitem__(1, 5), "part_index"),
        (lambda e: setattr(e, "kr_bar", e.kr_bar * float("inf")), "inf"),
        (lambda e: e.texts.__setitem__(0, None), "text"),
        (lambda e: e.parent_ids.__setitem__(0, ""), "parent_id"),
    ],
)
def test_failed_add_leaves_bank_unchanged(bank, mutate, message):
    before = snapshot(bank)
    enc = make_encoded(doc("b", [1, 1]), doc("d", [3]), seed=2)  # upserts b, adds d
    mutate(enc)
    with pytest.raises(InvalidInputError, match=message):
        bank.add(enc)
    assert_same(bank, before)


def test_non_contiguous_parts_rejected(bank):
    before = snapshot(bank)
    enc = make_encoded(doc("x", [1, 1]), doc("y"))
    enc.parent_ids[:] = ["x", "y", "x"]
    enc.part_index[:] = [0, 0, 1]
    with pytest.raises(InvalidInputError, match="contiguous"):
        bank.add(enc)
    assert_same(bank, before)


def test_part_id_clash_with_other_document_rejected(bank):
    before = snapshot(bank)
    enc = make_encoded(doc("z"))
    enc.ids[0] = "b#1"  # already a part of b, which this batch does not replace
    with pytest.raises(InvalidInputError, match="already belong"):
        bank.add(enc)
    assert_same(bank, before)


def test_float16_overflow_rejected():
    b = make_bank("float16")
    enc = make_encoded(doc("x"))
    enc.k_bar[0, 0, 0, 0] = 1e6
    with pytest.raises(InvalidInputError, match="inf"):
        b.add(enc)
    assert len(b) == 0


def test_constructor_validation():
    with pytest.raises(InvalidInputError, match="layers"):
        make_bank(layers=[])
    with pytest.raises(InvalidInputError, match="config.routing.layers"):
        MemoryBank(layers=[1], kv_heads=1, head_dim=1, config=MSAConfig(routing={"layers": [2]}),
                   backbone_fingerprint="", router_fingerprint="")


def test_check_compatible(bank):
    bank.check_compatible("bb" * 20, "rt" * 20)
    with pytest.raises(BankMismatchError) as err:
        bank.check_compatible("other-backbone-fingerprint", "rt" * 20)
    msg = str(err.value)
    assert "backbone" in msg and "router" not in msg.split(".")[0]
    assert "'bbbbbbbbbbbb...'" in msg and "'other-backbo...'" in msg
    assert "Rebuild the bank" in msg and "tiny" in msg
    with pytest.raises(BankMismatchError, match="router"):
        bank.check_compatible("bb" * 20, "x")


# ---- persistence -------------------------------------------------------------------------
def assert_banks_equal(a, b):
    for name in ("k_bar", "v_bar", "kr_bar", "chunk_doc", "chunk_offsets", "chunk_counts"):
        ta, tb = getattr(a, name), getattr(b, name)
        assert ta.dtype == tb.dtype and torch.equal(ta, tb), name
    assert a.docstore == b.docstore and a.ids() == b.ids()
    assert a.info() == b.info() and a.config == b.config


def current_version(root):
    return (Path(root) / "CURRENT").read_text().strip()


@pytest.mark.parametrize("dtype", ["float16", "float32", "bfloat16"])
def test_save_load_round_trip(tmp_path, dtype):
    b = make_bank(dtype)
    b.add(make_encoded(doc("a", [2], {"k": [1, {"n": None}], "é": "ü"}), doc("b", [1, 2], text="xyz")))
    folder = b.save(tmp_path / "bank")
    assert folder.name == "v000001" and current_version(tmp_path / "bank") == "v000001"
    assert sorted(p.name for p in folder.iterdir()) == ["docstore.json", "lexical.json", "manifest.json",
                                                        "tensors.safetensors"]
    loaded = MemoryBank.load(tmp_path / "bank")
    assert_banks_equal(b, loaded)
    assert loaded.k_bar.dtype == {"float16": torch.float16, "float32": torch.float32,
                                  "bfloat16": torch.bfloat16}[dtype]
    loaded.check_compatible("bb" * 20, "rt" * 20)


def test_manifest_contents(tmp_path, bank):
    folder = bank.save(tmp_path)
    m = json.loads((folder / "manifest.json").read_text())
    assert m["format"] == "msa-memory-bank" and m["format_version"] == 1 and m["created_at"]
    assert m["counts"] == {"documents": 3, "parts": 5, "chunks": 9, "tokens": bank.info()["tokens"]}
    assert m["layers"] == LAYERS and m["kv_heads"] == H and m["head_dim"] == D
    assert m["config"] == bank.config.model_dump() and m["model_name"] == "tiny"
    for name in ("docstore.json", "tensors.safetensors", "lexical.json"):
        assert m["files"][name]["size"] == (folder / name).stat().st_size
        assert len(m["files"][name]["sha256"]) == 64


def test_loaded_bank_is_mutable_and_resaves(tmp_path, bank):
    bank.save(tmp_path)
    loaded = MemoryBank.load(tmp_path)
    loaded.add(make_encoded(doc("d", [1]), seed=5))
    loaded.delete(["a"])
    loaded.save(tmp_path)
    assert_banks_equal(loaded, MemoryBank.load(tmp_path))


def test_save_twice_keeps_only_latest(tmp_path, bank):
    bank.save(tmp_path)
    bank.delete(["a"])
    bank.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".msa-lock", "CURRENT", "v000002"]
    assert MemoryBank.load(tmp_path).ids() == ["b", "c"]


def test_empty_bank_save_load(tmp_path):
    b = make_bank()
    b.save(tmp_path / "empty")
    loaded = MemoryBank.load(tmp_path / "empty")
    assert len(loaded) == 0 and loaded.k_bar.shape == (2, 0, H, D)
    assert_banks_equal(b, loaded)


def test_corrupted_tensor_file(tmp_path, bank):
    folder = bank.save(tmp_path)
    path = folder / "tensors.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # same size, different content
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptBankError, match="tensors.safetensors"):
        MemoryBank.load(tmp_path)


def test_truncated_docstore(tmp_path, bank):
    folder = bank.save(tmp_path)
    path = folder / "docstore.json"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CorruptBankError, match="docstore.json"):
        MemoryBank.load(tmp_path)


def test_missing_tensor_file(tmp_path, bank):
    folder = bank.save(tmp_path)
    (folder / "tensors.safetensors").unlink()
    with pytest.raises(CorruptBankError, match="tensors.safetensors"):
        MemoryBank.load(tmp_path)


def test_unparseable_manifest(tmp_path, bank):
    folder = bank.save(tmp_path)
    (folder / "manifest.json").write_text("{not json")
    with pytest.raises(CorruptBankError, match="manifest.json"):
        MemoryBank.load(tmp_path)


def rewrite_manifest(folder, **changes):
    path = folder / "manifest.json"
    m = json.loads(path.read_text())
    m.update(changes)
    path.write_text(json.dumps(m))


def test_shapes_inconsistent_with_docstore(tmp_path, bank):
    folder = bank.save(tmp_path)
    rewrite_manifest(folder, head_dim=D * 2)  # checksums still match, shapes do not
    with pytest.raises(CorruptBankError, match="tensors.safetensors"):
        MemoryBank.load(tmp_path)


def test_counts_inconsistent(tmp_path, bank):
    folder = bank.save(tmp_path)
    rewrite_manifest(folder, counts={"documents": 9, "parts": 5, "chunks": 9, "tokens": 0})
    with pytest.raises(CorruptBankError, match="counts"):
        MemoryBank.load(tmp_path)


def test_newer_format_version(tmp_path, bank):
    folder = bank.save(tmp_path)
    rewrite_manifest(folder, format_version=2)
    with pytest.raises(BankError, match="upgrade msa") as err:
        MemoryBank.load(tmp_path)
    assert not isinstance(err.value, CorruptBankError)


def test_missing_dir_and_missing_current(tmp_path, bank):
    with pytest.raises(BankError, match="not an msa bank"):
        MemoryBank.load(tmp_path / "nowhere")
    with pytest.raises(BankError, match="not an msa bank"):
        MemoryBank.load(tmp_path)  # empty folder
    bank.save(tmp_path / "b")
    (tmp_path / "b" / "CURRENT").unlink()
    with pytest.raises(BankError, match="half-written") as err:
        MemoryBank.load(tmp_path / "b")
    assert str(tmp_path / "b") in str(err.value)


def test_current_pointing_nowhere(tmp_path, bank):
    bank.save(tmp_path)
    (tmp_path / "CURRENT").write_text("v000042\n")
    with pytest.raises(BankError, match="half-written"):
        MemoryBank.load(tmp_path)
    (tmp_path / "CURRENT").write_text("garbage")
    with pytest.raises(BankError, match="not an msa bank"):
        MemoryBank.load(tmp_path)


def test_leftover_tmp_dir_still_loads(tmp_path, bank):
    bank.save(tmp_path)
    junk = tmp_path / (".tmp-" + "0" * 32)
    junk.mkdir()
    (junk / "tensors.safetensors").write_bytes(b"partial")
    assert_banks_equal(bank, MemoryBank.load(tmp_path))
    bank.save(tmp_path)  # the next save cleans the leftover
    assert not junk.exists()


def test_interrupted_save_loads_previous_version(tmp_path, bank):
    bank.save(tmp_path)
    expected = snapshot(bank)
    # A later save killed at two moments: mid-write in .tmp-*, and after the rename, before CURRENT.
    tmp = tmp_path / (".tmp-" + "a" * 32)
    tmp.mkdir()
    (tmp / "docstore.json").write_text('{"parts": [')
    bank.delete(["a"])
    newer = bank.save(tmp_path / "scratch")
    os.rename(newer, tmp_path / "v000002")
    (tmp_path / "CURRENT.tmp").write_text("v0000")
    loaded = MemoryBank.load(tmp_path)
    assert_same(loaded, expected)
    # The next save supersedes everything and leaves one version.
    folder = bank.save(tmp_path)
    assert folder.name == "v000003"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".msa-lock", "CURRENT", "scratch", "v000003"]


def test_save_into_foreign_folder_refused(tmp_path, bank):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("precious")
    (user / "v000001").mkdir()  # looks like a version name, but is not ours
    with pytest.raises(BankError, match="not an msa bank"):
        bank.save(user)
    assert sorted(p.name for p in user.iterdir()) == ["notes.txt", "v000001"]
    assert (user / "notes.txt").read_text() == "precious"
    file_path = tmp_path / "afile"
    file_path.write_text("x")
    with pytest.raises(BankError, match="not a directory"):
        bank.save(file_path)
    assert file_path.read_text() == "x"


def test_save_into_folder_with_only_our_leftovers(tmp_path, bank):
    # A first save interrupted before CURRENT existed must not block the next save.
    (tmp_path / (".tmp-" + "b" * 32)).mkdir()
    bank.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".msa-lock", "CURRENT", "v000001"]


def test_user_files_next_to_a_bank_survive_save(tmp_path, bank):
    bank.save(tmp_path)
    (tmp_path / "README").write_text("mine")
    bank.save(tmp_path)
    assert (tmp_path / "README").read_text() == "mine"


@pytest.mark.parametrize("where", ["save_file", "write_current"])
@pytest.mark.parametrize("exc", [OSError("disk full"), KeyboardInterrupt()])
def test_save_failing_midway_keeps_previous_version(tmp_path, bank, monkeypatch, where, exc):
    from msa_core.memory.bank import persist as memory

    bank.save(tmp_path)
    expected = snapshot(bank)
    bank.delete(["a"])

    def boom(*args, **kwargs):
        raise exc

    monkeypatch.setattr(memory, where, boom)
    with pytest.raises(BankError if isinstance(exc, OSError) else KeyboardInterrupt):
        bank.save(tmp_path)
    monkeypatch.undo()
    assert not list(tmp_path.glob(".tmp-*"))
    assert_same(MemoryBank.load(tmp_path), expected)


def test_load_map_location(tmp_path, bank):
    bank.save(tmp_path)
    loaded = MemoryBank.load(tmp_path, map_location=torch.device("cpu"))
    assert loaded.device == torch.device("cpu") and loaded.k_bar.device.type == "cpu"
    with pytest.raises(InvalidInputError, match="map_location"):
        MemoryBank.load(tmp_path, map_location="nodevice")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_all_finite_finds_one_bad_value_anywhere(dtype, bad):
    from msa_core.memory.encoded import all_finite

    x = torch.randn(2, 3000, 5).to(dtype)
    assert all_finite(x) and all_finite(x[:0])
    for at in (0, 17, 9999, x.numel() - 1):  # inside and outside vectorised stretches
        y = x.clone()
        y.view(-1)[at] = bad
        assert not all_finite(y)
