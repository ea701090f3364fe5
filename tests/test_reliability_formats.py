"""Banks written by released msa versions load with this one, and `msa migrate` never risks the original.

tests/fixtures/banks/msa-0.2.0 and msa-0.3.0 were written by those releases' own code
(tests/fixtures/banks/make_fixture.py, run on `git archive` of the release commits). Both are
format_version 1, the format this release writes: they must load unchanged.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

from msa_core.cli.main import main
from msa_core.errors import BankError
from msa_core.memory.bank import MemoryBank, persist
from msa_core.memory.migrate import migrate_bank

FIXTURES = Path(__file__).parent / "fixtures" / "banks"
RELEASES = ["msa-0.2.0", "msa-0.3.0"]
sys.path.insert(0, str(FIXTURES))
from make_fixture import contents


def listing(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("release", RELEASES)
def test_released_bank_loads(release):
    bank = MemoryBank.load(FIXTURES / release)
    want = contents()
    assert bank.ids() == ["alpha", "beta", "gamma"]
    assert [p.id for p in bank.docstore] == want["ids"]
    assert [p.text for p in bank.docstore] == want["texts"]
    assert [p.metadata for p in bank.docstore] == want["metadatas"]
    assert bank.get(["beta"])[0]["text"] == "Ferries leave the harbour at seven and return at dusk — every day."
    for name in ("k_bar", "v_bar", "kr_bar"):
        assert torch.equal(getattr(bank, name), want[name].to(torch.float16))
    assert bank.config.encode.chunk_size == 4 and bank.model_name == "fixture"


@pytest.mark.parametrize("release", RELEASES)
def test_migrate_current_format_changes_nothing(release, tmp_path, capsys):
    root = tmp_path / release
    shutil.copytree(FIXTURES / release, root)
    before = listing(root)
    assert main(["migrate", str(root)]) == 0
    assert "already format_version 1" in capsys.readouterr().out
    assert listing(root) == before


@pytest.mark.parametrize("release", RELEASES)
def test_migrate_to_new_folder_leaves_original_untouched(release, tmp_path, capsys):
    root = tmp_path / release
    shutil.copytree(FIXTURES / release, root)
    before = listing(root)
    out = tmp_path / "migrated"
    assert main(["migrate", str(root), "--output", str(out)]) == 0
    assert "verified" in capsys.readouterr().out
    assert listing(root) == before
    old, new = MemoryBank.load(root), MemoryBank.load(out)
    assert new.docstore == old.docstore and torch.equal(new.k_bar, old.k_bar)


def test_failed_migration_leaves_original_and_no_half_copy(tmp_path, monkeypatch):
    root = tmp_path / "bank"
    shutil.copytree(FIXTURES / "msa-0.3.0", root)
    before = listing(root)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(persist, "save_file", full_disk)
    out = tmp_path / "migrated"
    with pytest.raises(BankError, match="No space left"):
        migrate_bank(root, out)
    assert listing(root) == before and not out.exists()


def test_migrate_refuses_a_non_empty_target(tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["migrate", str(FIXTURES / "msa-0.3.0"), "--output", str(out)]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
