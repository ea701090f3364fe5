"""Several processes on one bank folder: writers take turns through the inter-process lock, readers see
whole versions, a waiting writer says so and gives up after its timeout, and a killed lock holder never
leaves the bank locked. Also the CLI race of issue 24: two `msa add` at once on one bank.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import crash_child
import procs_child
import pytest
from filelock import FileLock

from msa_core.cli.main import main
from msa_core.memory.bank import MemoryBank
from msa_core.memory.locking import LOCK_NAME, BankLockedError, bank_lock
from msa_core.store import BankConflictError, MemoryStore

REPO = Path(__file__).resolve().parents[1]


def start(ctx, target, *args):
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=target, args=(*args, send))
    proc.start()
    send.close()
    return proc, recv


def finish(proc, recv, timeout: float = 120):
    assert recv.poll(timeout), "child did not report"
    status, value = recv.recv()
    proc.join(10)
    assert status == "ok", value
    return value


def seed_bank(root: Path, n: int = 10) -> list[str]:
    bank = crash_child.new_bank()
    ids = [f"base{i}" for i in range(n)]
    bank.add(crash_child.encoded(1, ids))
    bank.save(root)
    return ids


@pytest.mark.parametrize("writers", [2, 4])
def test_processes_adding_deleting_and_reading_lose_nothing(ctx, tmp_path, writers):
    root = tmp_path / "bank"
    base = seed_bank(root)
    procs = [start(ctx, procs_child.writer, str(root), f"w{i}", 8, 100 + i) for i in range(writers)]
    procs.append(start(ctx, procs_child.reader, str(root), 3.0))
    kept = [finish(p, r) for p, r in procs[:-1]]
    assert finish(*procs[-1]) > 0  # the reader loaded whole versions throughout
    bank = MemoryBank.load(root)
    expected = base + [i for ids in kept for i in ids]
    assert sorted(bank.ids()) == sorted(expected)  # every kept document there, exactly once
    assert len(bank.ids()) == len(set(bank.ids()))
    # 8 rounds of 3 additions, minus one deletion every other round, per writer
    assert len(bank) == len(base) + writers * (8 * 3 - 4)


def test_waiting_writer_says_so_and_times_out(tmp_path, capsys):
    root = tmp_path / "bank"
    ids = seed_bank(root)
    before = (root / "CURRENT").read_text()
    holder = FileLock(str(root / LOCK_NAME))  # another holder: a second lock object conflicts like a process
    with holder:
        code = main(["delete", str(root), ids[0], "--lock-timeout", "0.3"])
        err = capsys.readouterr().err
        with pytest.raises(BankLockedError, match="stayed locked"), bank_lock(root, timeout=0.1, on_wait=print):
            pass
    assert code == 2
    assert "waiting for another process writing the memory bank" in err
    assert "stayed locked by another writer" in err and "--lock-timeout" in err
    assert (root / "CURRENT").read_text() == before and MemoryBank.load(root).ids() == ids
    assert main(["delete", str(root), ids[0], "--lock-timeout", "0.3"]) == 0  # free again: it goes through


def test_killed_lock_holder_leaves_the_bank_unlocked(ctx, tmp_path):
    root = tmp_path / "bank"
    seed_bank(root)
    proc, recv = start(ctx, procs_child.hold_lock, str(root))
    assert recv.poll(60) and recv.recv() == "locked"
    with pytest.raises(BankLockedError), bank_lock(root, timeout=0.2, on_wait=lambda m: None):
        pass
    proc.kill()
    proc.join(10)
    with bank_lock(root, timeout=5):
        bank = MemoryBank.load(root)
        bank.delete(bank.ids()[:1])
        bank.save(root)
    assert len(MemoryBank.load(root)) == 9


def write_jsonl(path: Path, prefix: str, n: int) -> Path:
    rows = [{"id": f"{prefix}{i}", "text": f"Document {prefix}{i} tells of harbour {i} and its lighthouse."}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_two_msa_add_at_once_keep_all_80_documents(tmp_path, tiny_model_dir, capsys):
    bank = tmp_path / "bank"
    assert main(["index", str(write_jsonl(tmp_path / "base.jsonl", "base", 20)), "--bank", str(bank),
                 "--model", str(tiny_model_dir("qwen3")), "--chunk-size", "8", "--no-progress"]) == 0
    env = {**os.environ, "PYTHONPATH": str(REPO), "TRITON_INTERPRET": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "msa_core", "add", str(bank),
                               str(write_jsonl(tmp_path / f"{p}.jsonl", p, 30)), "--no-progress"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for p in ("a", "b")]
    results = [(p.wait(300), p.stderr.read()) for p in procs]
    assert [code for code, _ in results] == [0, 0], results
    capsys.readouterr()
    assert main(["info", str(bank), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["documents"] == 80 and info["parts"] >= 80
    ids = MemoryBank.load(bank).ids()
    assert sorted(ids) == sorted([f"base{i}" for i in range(20)] + [f"{p}{i}" for p in "ab" for i in range(30)])


def test_store_follows_new_versions_and_refuses_lost_updates(tmp_path, tiny_model_dir):
    from msa_core.model import MSAModel

    model = MSAModel.from_pretrained(str(tiny_model_dir("qwen3")))
    root = tmp_path / "bank"
    model.index(["The lighthouse was built in 1887."], ["one"]).save(root)
    reader = MemoryStore.load(root, model)
    writer = MemoryStore.load(root, model, write_through=True)
    writer.add(["Ferries leave at seven."], ["two"])  # saved at once, under the lock
    assert sorted(reader.ids()) == ["one", "two"]  # the reader picked the new version up
    assert MemoryBank.load(root).ids() == ["one", "two"]
    reader.add(["Paris is the capital of France."], ["three"])  # unsaved
    writer.delete(["one"])
    with pytest.raises(BankConflictError, match="another process saved"):
        reader.save()
    assert MemoryBank.load(root).ids() == ["two"]  # the other writer's change was not overwritten
    fresh = MemoryStore.load(root, model)
    fresh.add(["Paris is the capital of France."], ["three"])
    fresh.save()
    assert sorted(writer.ids()) == ["three", "two"]
