"""Child side of test_reliability_crash.py: load a bank, change it, save it, and get killed meanwhile.

The children are forked from a multiprocessing forkserver that has imported msa_core.memory (and so
torch) once, so a trial costs a fork, not a two-second interpreter start. Banks are built from small
seeded random tensors, no model: the parent recomputes the expected "after" state with `apply`.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from typing import Any

import torch

from msa_core.config import EncodeConfig, MSAConfig
from msa_core.memory.bank import MemoryBank
from msa_core.memory.bank import persist as memory
from msa_core.memory.encoded import EncodedDocuments

LAYERS = [1, 2]
H, D = 2, 16
OPS = ("save", "add", "delete")
# The filesystem steps of a save; a child told to die at step n exits before the n-th such call.
_STEPS = [(os, "mkdir"), (os, "rename"), (os, "replace"), (os, "fsync"), (os, "unlink"), (os, "rmdir"),
          (memory, "save_file")]


def new_bank() -> MemoryBank:
    config = MSAConfig(encode=EncodeConfig(storage_dtype="float16", chunk_size=8))
    return MemoryBank(layers=LAYERS, kv_heads=H, head_dim=D, config=config,
                      backbone_fingerprint="bb" * 20, router_fingerprint="rt" * 20, model_name="crash")


def encoded(seed: int, ids: list[str]) -> EncodedDocuments:
    """Documents `ids` with seeded random tensors; every third one is split into parts."""
    rng = random.Random(seed)
    rows: dict[str, list] = {k: [] for k in ("ids", "parent_ids", "part_index", "texts", "n_tokens", "n_chunks")}
    metas = []
    for doc_id in ids:
        n_parts = rng.randint(2, 3) if rng.random() < 0.33 else 1
        for j in range(n_parts):
            chunks = rng.randint(1, 40)
            rows["ids"].append(doc_id if n_parts == 1 else f"{doc_id}#{j}")
            rows["parent_ids"].append(doc_id)
            rows["part_index"].append(j)
            rows["texts"].append(f"seed {seed} text of {doc_id} part {j} ")
            rows["n_tokens"].append(chunks * 8 - rng.randint(0, 7))
            rows["n_chunks"].append(chunks)
            metas.append({"seed": seed, "doc": doc_id, "tags": ["x", j]})
    g = torch.Generator().manual_seed(seed)
    shape = (len(LAYERS), sum(rows["n_chunks"]), H, D)
    k, v, kr = (torch.randn(shape, generator=g) for _ in range(3))
    return EncodedDocuments(metadatas=metas, layers=LAYERS, k_bar=k, v_bar=v, kr_bar=kr, **rows)


def base_bank() -> MemoryBank:
    """The bank on disk before every trial: 60 documents, d0..d59."""
    bank = new_bank()
    bank.add(encoded(1, [f"d{i}" for i in range(60)]))
    return bank


def apply(op: str, bank: MemoryBank | None, seed: int) -> MemoryBank:
    """The bank `op` saves: "save" writes a new in-memory bank over the old one; "add" upserts
    d40..d59 and adds d60..d79; "delete" drops a seeded third of the documents."""
    if op == "save":
        fresh = new_bank()
        fresh.add(encoded(seed, [f"d{i}" for i in range(0, 80, 2)]))
        return fresh
    assert bank is not None
    if op == "add":
        bank.add(encoded(seed, [f"d{i}" for i in range(40, 80)]))
    elif op == "delete":
        rng = random.Random(seed)
        bank.delete(rng.sample(bank.ids(), len(bank) // 3))
    else:
        raise ValueError(op)
    return bank


def child(root: str, op: str, seed: int, conn: Any, die_at: int | None = None) -> None:
    """Tell the parent we started, load, change and save the bank, tell it we are done.

    die_at=n: exit abruptly (os._exit, like SIGKILL: no cleanup runs) before the n-th filesystem step.
    Without it, the number of steps taken is sent back with the done message.
    """
    steps = _count_steps(die_at)
    conn.send_bytes(b"s")
    bank = None if op == "save" else MemoryBank.load(root)
    apply(op, bank, seed).save(root)
    conn.send_bytes(b"d" + str(steps()).encode())


def _count_steps(die_at: int | None) -> Callable[[], int]:
    calls = 0

    def wrap(fn: Callable) -> Callable:
        def step(*args: Any, **kwargs: Any) -> Any:
            nonlocal calls
            calls += 1
            if calls == die_at:
                os._exit(70)
            return fn(*args, **kwargs)

        return step

    for owner, name in _STEPS:
        setattr(owner, name, wrap(getattr(owner, name)))
    return lambda: calls
