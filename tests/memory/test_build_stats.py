"""A bank's build statistics (memory/build_stats.py): encoding tokens/s and dtypes, kept across `add`,
saved in the manifest, shown by `bank.info()`."""

from __future__ import annotations

import json

import torch

from msa_core import MSAConfig, MSAModel
from msa_core.memory.build_stats import BuildStats

DOCS = ["The lighthouse of Velmora was built in 1887.", "Ferries leave the harbour at seven.",
        "Cheese is aged in caves for two winters."]
CFG = MSAConfig(routing={"top_k": 2, "layers": [1, 2]}, encode={"chunk_size": 4})


def test_build_speed_is_recorded_and_saved(tiny_model_dir, tmp_path):
    model = MSAModel.from_pretrained(tiny_model_dir("qwen3"), config=CFG, device="cpu", dtype=torch.float32)
    bank = model.index(DOCS, ids=["a", "b", "c"])
    info = bank.info()
    assert info["encode_tokens_per_s"] > 0 and info["encode_dtypes"] == ["float32"]
    tokens = info["tokens"]
    model.add(bank, ["A fourth document about the harbour."], ids=["a"])  # a replacement counts as encoded
    version = bank.save(tmp_path / "b")
    build = json.loads((version / "manifest.json").read_text())["build"]
    assert build["tokens"] > tokens and build["seconds"] > 0 and build["dtypes"] == ["float32"]
    loaded = model.load_bank(tmp_path / "b")
    assert loaded.info()["encode_tokens_per_s"] == bank.info()["encode_tokens_per_s"]  # exact seconds kept
    assert loaded.to("cpu").info()["encode_dtypes"] == ["float32"]
    assert model.new_bank().info()["encode_tokens_per_s"] is None  # nothing encoded: no speed to report


def test_an_unreadable_build_record_is_empty():
    assert BuildStats.from_dict(None) == BuildStats()
    assert BuildStats.from_dict({"tokens": "many"}) == BuildStats()
    assert BuildStats.from_dict({"tokens": 10, "seconds": 2, "dtypes": ["bfloat16"]}).info() == \
        {"encode_tokens_per_s": 5.0, "encode_dtypes": ["bfloat16"]}
