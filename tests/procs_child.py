"""Child side of test_reliability_processes.py: writers and readers of one bank in separate processes.

Forked from a forkserver that imported msa_core.memory once (as tests/crash_child.py does). Banks hold
seeded random tensors (crash_child.encoded), no model.
"""

from __future__ import annotations

import random
import time
from typing import Any

from crash_child import encoded

from msa_core.memory.bank import MemoryBank
from msa_core.memory.locking import bank_lock


def writer(root: str, name: str, rounds: int, seed: int, conn: Any) -> None:
    """`rounds` times: under the lock load, add three new documents (and every other round delete one
    of ours), save; then load the bank without the lock as a reader and check ours are all there.
    Sends back the ids this process expects to remain, or the error it met."""
    rng = random.Random(seed)
    mine: list[str] = []
    try:
        for r in range(rounds):
            new = [f"{name}-r{r}-{j}" for j in range(3)]
            with bank_lock(root, timeout=60):
                bank = MemoryBank.load(root)
                bank.add(encoded(seed * 1000 + r, new))
                gone = [mine.pop(rng.randrange(len(mine)))] if r % 2 and mine else []
                bank.delete(gone)
                bank.save(root)
            mine += new
            seen = MemoryBank.load(root)  # a reader: checksums, shapes and counts verified
            missing = set(mine) - set(seen.ids())
            assert not missing, f"{name}: committed documents missing after round {r}: {sorted(missing)[:5]}"
            time.sleep(rng.random() * 0.01)
        conn.send(("ok", mine))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which fails the test with it
        conn.send(("error", f"{type(exc).__name__}: {exc}"))


def reader(root: str, seconds: float, conn: Any) -> None:
    """Load the bank over and over while writers save; every load must succeed and be consistent."""
    loads = 0
    try:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            bank = MemoryBank.load(root)
            assert len(bank.ids()) == len(set(bank.ids()))
            loads += 1
        conn.send(("ok", loads))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        conn.send(("error", f"after {loads} loads: {type(exc).__name__}: {exc}"))


def hold_lock(root: str, conn: Any) -> None:
    """Take the bank's write lock, say so, and wait to be killed."""
    with bank_lock(root):
        conn.send("locked")
        time.sleep(600)


def load_limited(root: str, kv: str, room: int, rows: list[int], conn: Any) -> None:
    """Load the bank with tier `kv` under a data limit of what this process uses now + `room` bytes,
    gather K̄/V̄ rows and send back their sums and the peak RSS (or the error met)."""
    import resource

    import torch

    def status_kb(key: str) -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))

    limit = status_kb("VmData") * 1024 + room
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    try:
        bank = MemoryBank.load(root, kv=kv)
        k, v = bank.gather_kv(1, torch.tensor(rows), "cpu", torch.float32)
        conn.send(("ok", (k.sum().item(), v.sum().item(), status_kb("VmHWM") * 1024)))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
