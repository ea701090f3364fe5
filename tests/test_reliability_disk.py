"""A save that hits a full disk (ENOSPC) or an I/O error (EIO) at any write step: a clear error naming the
folder and the space a version needs, the previous version intact and loadable, no temporary files left,
and the next save succeeds once the disk is fine again. The errors are injected in the write path.
"""

from __future__ import annotations

import errno
import os

import crash_child
import pytest
import torch

from msa_core.errors import BankError
from msa_core.memory.bank import MemoryBank, persist

# (what fails, how): the write steps of a save, in order
STEPS = [("tensors", "save_file"), ("docstore", "_write_bytes:1"), ("manifest", "_write_bytes:2"),
         ("rename", "rename"), ("CURRENT", "_write_bytes:3")]


def snapshot(root):
    bank = MemoryBank.load(root)
    return sorted(p.name for p in root.iterdir()), bank.ids(), bank.k_bar.view(torch.int16).sum().item()


def inject(monkeypatch, how: str, code: int) -> None:
    name, _, nth = how.partition(":")
    owner = os if name == "rename" else persist
    real = getattr(owner, name)
    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == int(nth or 1):
            raise OSError(code, os.strerror(code))
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, failing)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO])
@pytest.mark.parametrize("step,how", STEPS)
def test_failed_save_keeps_the_previous_version_and_leaves_nothing(tmp_path, monkeypatch, step, how, code):
    root = tmp_path / "bank"
    crash_child.base_bank().save(root)
    before = snapshot(root)
    bigger = crash_child.base_bank()
    bigger.add(crash_child.encoded(5, [f"n{i}" for i in range(30)]))
    with monkeypatch.context() as m:
        inject(m, how, code)
        with pytest.raises(BankError) as info:
            bigger.save(root)
    message = str(info.value)
    assert str(root) in message and errno.errorcode[code] in message
    assert "A new version needs about" in message and "MB are free there" in message
    assert "previous version is intact" in message
    assert snapshot(root) == before  # previous version live and loadable; no .tmp-*, no CURRENT.tmp, no vN
    bigger.save(root)  # space is back: the next save goes through and leaves one version
    assert MemoryBank.load(root).ids() == bigger.ids()
    assert sorted(p.name for p in root.iterdir()) == [".msa-lock", "CURRENT", "v000002"]
