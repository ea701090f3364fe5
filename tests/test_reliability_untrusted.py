"""Bank folders, router files and corpus folders from someone else: absurd safetensors headers, files
that are not what the manifest says, paths and links out of the folder, each refused with a clear error
before anything large is read; a corpus folder's links out are skipped unless asked for.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tracemalloc
from pathlib import Path

import crash_child
import pytest

from msa_core.cli.main import build_parser
from msa_core.errors import BankError, CorruptBankError, ModelLoadError
from msa_core.memory.bank import MemoryBank
from msa_core.memory.corpus import read_corpus
from msa_core.memory.persist import CURRENT, DOCSTORE, MANIFEST, TENSORS
from msa_core.routing.projectors import RouterProjectors


@pytest.fixture
def bank_dir(tmp_path) -> Path:
    root = tmp_path / "bank"
    bank = crash_child.new_bank()
    bank.add(crash_child.encoded(3, ["a", "b", "c"]))
    bank.save(root)
    return root


def vdir(root: Path) -> Path:
    return root / (root / CURRENT).read_text().strip()


def reseal(folder: Path, **counts) -> None:
    """Rewrite the manifest's checksums (and counts) to match the files: a forger's bank."""
    manifest = json.loads((folder / MANIFEST).read_text())
    for name in (DOCSTORE, TENSORS):
        sha = hashlib.sha256((folder / name).read_bytes()).hexdigest()
        manifest["files"][name] = {"sha256": sha, "size": (folder / name).stat().st_size}
    manifest["counts"].update(counts)
    (folder / MANIFEST).write_text(json.dumps(manifest))


def absurd_header_file(path: Path, claimed: int, size: int) -> None:
    with open(path, "wb") as f:
        f.write(claimed.to_bytes(8, "little"))
        f.truncate(size)  # sparse: no disk used


@pytest.mark.parametrize("kv", ["same", "host", "disk"])
def test_absurd_tensor_header_refused_without_reading_it(bank_dir, kv):
    folder = vdir(bank_dir)
    absurd_header_file(folder / TENSORS, claimed=120_000_000, size=130_000_000)
    reseal(folder)
    tracemalloc.start()
    try:
        with pytest.raises(CorruptBankError, match="more than the 100,000,000 a safetensors header may have"):
            MemoryBank.load(bank_dir, kv=kv)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20e6, f"read {peak / 1e6:.0f} MB of a forged header"


def test_header_claiming_exabytes_refused(bank_dir):
    folder = vdir(bank_dir)
    absurd_header_file(folder / TENSORS, claimed=1 << 62, size=4096)
    reseal(folder)
    with pytest.raises(CorruptBankError, match="header claims"):
        MemoryBank.load(bank_dir, kv="disk")


def test_docstore_not_what_the_manifest_says(bank_dir):
    folder = vdir(bank_dir)
    docstore = json.loads((folder / DOCSTORE).read_text())
    docstore["parts"][0]["text"] = "forged"
    (folder / DOCSTORE).write_text(json.dumps(docstore))
    with pytest.raises(CorruptBankError, match="the manifest says|does not match its sha256"):
        MemoryBank.load(bank_dir)
    docstore["parts"][0]["n_chunks"] += 1  # one chunk more than the tensors hold
    (folder / DOCSTORE).write_text(json.dumps(docstore))
    reseal(folder)
    with pytest.raises(CorruptBankError, match="imply"):
        MemoryBank.load(bank_dir)
    docstore["parts"][0]["n_chunks"] -= 1
    (folder / DOCSTORE).write_text(json.dumps(docstore))
    reseal(folder, documents=99)
    with pytest.raises(CorruptBankError, match="counts"):
        MemoryBank.load(bank_dir)


def test_huge_manifest_refused(bank_dir):
    with open(vdir(bank_dir) / MANIFEST, "ab") as f:
        f.truncate(64 << 20)
    with pytest.raises(CorruptBankError, match="a manifest may have"):
        MemoryBank.load(bank_dir)


@pytest.mark.parametrize("name", ["../elsewhere", "/tmp/v000001", "v000001/../../x"])
def test_current_naming_a_path_out_refused(bank_dir, name):
    (bank_dir / CURRENT).write_text(name)
    with pytest.raises(BankError, match="not a version name"):
        MemoryBank.load(bank_dir)


def test_version_folder_linked_out_refused(bank_dir, tmp_path):
    folder = vdir(bank_dir)
    outside = tmp_path / "outside"
    shutil.move(folder, outside)
    os.symlink(outside, folder)  # the same files, but living outside the bank
    with pytest.raises(CorruptBankError, match="symbolic link"):
        MemoryBank.load(bank_dir)


@pytest.mark.parametrize("name", [TENSORS, DOCSTORE, MANIFEST])
def test_bank_file_linked_out_refused(bank_dir, tmp_path, name):
    target = vdir(bank_dir) / name
    outside = tmp_path / ("outside-" + name)
    shutil.move(target, outside)
    os.symlink(outside, target)  # identical bytes: checksums alone would pass
    with pytest.raises(CorruptBankError, match="symbolic link"):
        MemoryBank.load(bank_dir, kv="disk")


def test_current_linked_out_refused(bank_dir, tmp_path):
    outside = tmp_path / "CURRENT-elsewhere"
    shutil.move(bank_dir / CURRENT, outside)
    os.symlink(outside, bank_dir / CURRENT)
    with pytest.raises(CorruptBankError, match="symbolic link"):
        MemoryBank.load(bank_dir)


def test_router_file_with_absurd_header_refused(tmp_path):
    path = tmp_path / "router.safetensors"
    absurd_header_file(path, claimed=1 << 40, size=4096)
    with pytest.raises(ModelLoadError, match="header claims"):
        RouterProjectors.load(path)
    header = json.dumps({"w": {"dtype": "F32", "shape": [1 << 20, 1 << 20], "data_offsets": [0, 1 << 42]}})
    path.write_bytes(len(header).to_bytes(8, "little") + header.encode() + b"\0" * 64)
    with pytest.raises(ModelLoadError, match="do not fit"):
        RouterProjectors.load(path)


def test_corpus_folder_does_not_follow_links_out_unless_asked(tmp_path):
    corpus, outside = tmp_path / "corpus", tmp_path / "outside"
    (corpus / "sub").mkdir(parents=True)
    (outside / "deep").mkdir(parents=True)
    (corpus / "a.txt").write_text("inside")
    (corpus / "sub" / "b.md").write_text("inside too")
    (outside / "secret.txt").write_text("someone's private notes")
    (outside / "deep" / "c.txt").write_text("more private notes")
    os.symlink(outside / "secret.txt", corpus / "secret.txt")
    os.symlink(outside / "deep", corpus / "deep")
    os.symlink(corpus / "a.txt", corpus / "alias.txt")  # a link inside the folder is fine
    os.symlink(corpus, corpus / "sub" / "loop")  # never a loop
    with pytest.warns(UserWarning, match="skipped 2 symbolic link"):
        ids = [r.id for r in read_corpus(corpus)]
    assert ids == ["a.txt", "alias.txt", "sub/b.md"]
    followed = [r.id for r in read_corpus(corpus, follow_symlinks=True)]
    assert followed == ["a.txt", "alias.txt", "deep/c.txt", "secret.txt", "sub/b.md"]
    args = build_parser().parse_args(["index", str(corpus), "--bank", str(tmp_path / "b"), "--follow-symlinks"])
    assert args.follow_symlinks
