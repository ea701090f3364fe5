"""The short form of benchmarks/soak.py (issue 24, item 5): mixed add/upsert/delete/query/save/load
cycles on a tiny random model, invariants checked after every step, no growth of open file handles.
The full form (10,000 cycles, default model) writes benchmarks/results/soak.json and is not run here."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import soak

from msa_core.model import MSAModel


def test_short_soak_keeps_invariants_and_handles(tiny_model_dir):
    import torch

    model = MSAModel.from_pretrained(str(tiny_model_dir("qwen3")))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is much faster on a busy machine
    try:
        result = soak.run(model, 200, docs=20, sample_every=10)
    finally:
        torch.set_num_threads(threads)
    assert result["cycles"] == 200 and sum(result["ops"].values()) == 200
    assert set(result["ops"]) == set(soak.OPS)  # every kind of operation ran
    assert result["fds_stable"], result["open_fds"]
    assert result["open_fds"]["max"] < 64
