"""Crash safety of MemoryBank persistence: a save, an add or a delete killed at any moment.

A child process loads the bank, changes it and saves it (tests/crash_child.py); the test kills it
with SIGKILL after a seeded random fraction of the operation's measured duration, or makes it die
before each filesystem step in turn. Afterwards the bank must load (checksums verified) and hold
exactly the state before or the state after the operation, and the next save must leave a clean
folder. Children fork from a forkserver that imported torch once, so a trial costs milliseconds.
"""

from __future__ import annotations

import json
import random
import shutil
import statistics
import time
from pathlib import Path

import crash_child
import pytest
import torch
from crash_child import OPS, apply, base_bank

from msa_core.errors import CorruptBankError
from msa_core.memory.bank import MemoryBank
from msa_core.memory.lexical import LEXICAL
from msa_core.memory.locking import LOCK_NAME
from msa_core.memory.persist import CURRENT, DOCSTORE, MANIFEST, TENSORS

TRIALS = 20
SEED = 20260101
OP_SEED = 7  # seed of the documents the operation writes


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A bank with a history: 60 documents, then 30 of them, then all 60 again (the live state)."""
    root = tmp_path_factory.mktemp("template") / "bank"
    bank = base_bank()
    bank.save(root)
    half = MemoryBank.load(root)
    half.delete(half.ids()[30:])
    half.save(root)
    bank.save(root)
    return root


def state(bank: MemoryBank) -> tuple:
    """Everything a bank holds, comparable with ==: both sides, latent (tensors) and lexical (BM25 tokens)."""
    lexical = bank.lexical_index
    return (bank.ids(), bank.docstore, tuple(bank.chunk_counts.tolist()), lexical.part_ids, lexical.tokens,
            *(getattr(bank, n).view(torch.int16).flatten().tolist() for n in ("k_bar", "v_bar", "kr_bar")))


@pytest.fixture(scope="module")
def expected(template) -> dict[str, tuple]:
    """State before, and the state after each operation."""
    out = {"before": state(MemoryBank.load(template))}
    for op in OPS:
        out[op] = state(apply(op, MemoryBank.load(template), OP_SEED))
    assert all(out[op] != out["before"] for op in OPS)  # every operation changes the bank
    return out


def run_child(ctx, root: Path, op: str, *, die_at: int | None = None, kill_after: float | None = None):
    """Run one child; returns (exit code, its done message or None, seconds from start to done or death)."""
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=crash_child.child, args=(str(root), op, OP_SEED, send, die_at))
    proc.start()
    send.close()
    assert recv.poll(30), "child did not start"
    assert recv.recv_bytes() == b"s"
    start = time.perf_counter()
    if kill_after is not None:
        time.sleep(kill_after)
        if proc.exitcode is None:
            proc.kill()  # SIGKILL: no finally blocks, no cleanup
    try:
        done = recv.recv_bytes()  # blocks until the child is done or dead
    except EOFError:  # it died before saying it was done
        done = None
    elapsed = time.perf_counter() - start
    proc.join(30)
    recv.close()
    return proc.exitcode, done, elapsed


def check_after_crash(root: Path, op: str, expected: dict[str, tuple]) -> str:
    """The bank loads, holds the state before or after `op`, and a new save leaves a clean folder."""
    bank = MemoryBank.load(root)  # verifies checksums, shapes and counts
    vdir = root / (root / CURRENT).read_text().strip()
    assert LEXICAL in json.loads((vdir / MANIFEST).read_text())["files"]  # the lexical side is the saved one
    got = state(bank)
    outcome = "before" if got == expected["before"] else "after" if got == expected[op] else "mixed"
    assert outcome != "mixed", f"{op}: the bank holds neither the state before nor after the operation"
    live = bank.save(root)  # the next run recovers: leftovers of the crashed save are cleaned up
    assert sorted(e.name for e in root.iterdir()) == sorted([LOCK_NAME, CURRENT, live.name]), "leftovers remain"
    assert state(MemoryBank.load(root)) == got
    return outcome


def fresh_copy(template: Path, tmp_path: Path, name: str) -> Path:
    root = tmp_path / name
    shutil.copytree(template, root)
    return root


@pytest.mark.parametrize("op", OPS)
def test_sigkill_at_random_moments_leaves_before_or_after(ctx, template, expected, tmp_path, op):
    durations = []
    for i in range(3):  # the operation's duration on this machine, unkilled
        code, done, elapsed = run_child(ctx, fresh_copy(template, tmp_path, f"measure{i}"), op)
        assert code == 0 and done is not None
        durations.append(elapsed)
    duration = statistics.median(durations)
    rng = random.Random(f"{SEED}-{op}")
    outcomes, killed = [], 0
    for trial in range(TRIALS):
        root = fresh_copy(template, tmp_path, f"trial{trial}")
        code, done, _ = run_child(ctx, root, op, kill_after=rng.uniform(0.0, 1.1) * duration)
        killed += code == -9
        outcomes.append(check_after_crash(root, op, expected))
    # Durations vary a lot on a busy machine; some children finish first, most must not.
    assert killed >= TRIALS // 4, f"only {killed} of {TRIALS} children were killed mid-operation"
    assert "before" in outcomes  # kills landed before the new version went live


@pytest.mark.parametrize("op", OPS)
def test_death_before_each_filesystem_step(ctx, template, expected, tmp_path, op):
    code, done, _ = run_child(ctx, fresh_copy(template, tmp_path, "count"), op)
    assert code == 0 and done is not None
    steps = int(done[1:])
    assert steps >= 8  # mkdir, save_file, fsyncs, rename, replace, stale removal
    outcomes = []
    for n in range(1, steps + 1):
        root = fresh_copy(template, tmp_path, f"step{n}")
        code, done, _ = run_child(ctx, root, op, die_at=n)
        assert code == 70 and done is None
        outcomes.append(check_after_crash(root, op, expected))
    # One switch point: the os.replace of CURRENT. Before it the old bank, after it the new one.
    switch = outcomes.index("after")
    assert outcomes == ["before"] * switch + ["after"] * (steps - switch), outcomes


@pytest.mark.parametrize("name", [TENSORS, DOCSTORE, LEXICAL])
@pytest.mark.parametrize("damage", ["truncate_half", "truncate_one", "flip_first", "flip_middle", "flip_last",
                                    "append"])
def test_checksums_name_the_damaged_file(template, tmp_path, name, damage):
    root = fresh_copy(template, tmp_path, "bank")
    path = root / (root / CURRENT).read_text().strip() / name
    data = bytearray(path.read_bytes())
    if damage == "truncate_half":
        data = data[: len(data) // 2]
    elif damage == "truncate_one":
        data = data[:-1]
    elif damage == "append":
        data += b"\0"
    else:
        at = {"flip_first": 0, "flip_middle": len(data) // 2, "flip_last": len(data) - 1}[damage]
        data[at] ^= 0x01  # one bit: the size is unchanged, only the sha256 can tell
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptBankError) as err:
        MemoryBank.load(root)
    assert str(path) in str(err.value)
    assert ("sha256" in str(err.value)) == damage.startswith("flip")


def test_manifest_lists_a_checksum_for_every_data_file(template):
    vdir = template / (template / CURRENT).read_text().strip()
    files = json.loads((vdir / MANIFEST).read_text())["files"]
    assert set(files) == {DOCSTORE, TENSORS, LEXICAL}
    assert all(len(f["sha256"]) == 64 and f["size"] == (vdir / n).stat().st_size for n, f in files.items())
