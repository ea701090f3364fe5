"""A bank whose K̄/V̄ do not fit the memory a process may use is still served from the disk tier
(issue 24, item 6; benchmarks/larger_than_memory.py does it at 5M tokens with the default model's shapes).

A child process limits its data (RLIMIT_DATA: heap and private writable mappings) to what it uses plus
K̄_R plus a little: less than K̄/V̄. Loading with kv="disk" and gathering rows must work (the file is mapped
read-only, so its pages are page cache, not the process's data); kv="same" (all in memory) must not fit.
"""

from __future__ import annotations

import crash_child
import procs_child
import pytest
import torch

from msa_core.memory.encoded import EncodedDocuments

CHUNKS_PER_DOC, DOCS = 2048, 128  # 262,144 chunks: 32 MiB per tensor in float16


@pytest.fixture(scope="module")
def big_bank(tmp_path_factory):
    root = tmp_path_factory.mktemp("large") / "bank"
    bank = crash_child.new_bank()
    g = torch.Generator().manual_seed(6)
    for first in range(0, DOCS, 32):  # built incrementally, batch by batch
        ids = [f"d{i}" for i in range(first, first + 32)]
        shape = (len(crash_child.LAYERS), len(ids) * CHUNKS_PER_DOC, crash_child.H, crash_child.D)
        k, v, kr = (torch.randn(shape, generator=g, dtype=torch.float16) for _ in range(3))
        bank.add(EncodedDocuments(ids=ids, parent_ids=ids, part_index=[0] * 32, texts=ids, metadatas=[{}] * 32,
                                  n_tokens=[CHUNKS_PER_DOC * 8] * 32, n_chunks=[CHUNKS_PER_DOC] * 32,
                                  layers=crash_child.LAYERS, k_bar=k, v_bar=v, kr_bar=kr))
    bank.save(root)
    rows = [0, 77, 100_000, 262_143]
    expected = tuple(bank.gather_kv(1, torch.tensor(rows), "cpu", torch.float32)[i].sum().item() for i in (0, 1))
    kv_bytes = 2 * bank.k_bar.numel() * bank.k_bar.element_size()
    return root, rows, expected, kv_bytes, bank.kr_bar.numel() * bank.kr_bar.element_size()


def run(ctx, root, kv, room, rows):
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=procs_child.load_limited, args=(str(root), kv, room, rows, send))
    proc.start()
    send.close()
    got = recv.recv() if recv.poll(120) else ("error", f"child died with exit code {proc.exitcode}")
    proc.join(10)
    return got


def test_disk_tier_serves_a_bank_larger_than_the_process_may_hold(ctx, big_bank):
    root, rows, expected, kv_bytes, kr_bytes = big_bank
    room = kr_bytes + (16 << 20)
    assert kv_bytes > room  # K̄/V̄ alone exceed what the process may allocate beyond its start
    status, value = run(ctx, root, "disk", room, rows)
    assert status == "ok", value
    k_sum, v_sum, _peak = value
    assert (k_sum, v_sum) == pytest.approx(expected)
    status, value = run(ctx, root, "same", room, rows)  # the control: all in memory does not fit
    assert status == "error", "the limit did not bite: the test proves nothing"
