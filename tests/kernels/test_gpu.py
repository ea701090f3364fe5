"""The engine on CUDA (bf16) agrees with the CPU fp32 path. Skipped without a GPU (CI has none);
run on the device machine with `pytest tests/test_gpu.py`."""

from __future__ import annotations

import pytest
import torch

from msa_core import MSAConfig, MSAModel

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DOCS = [f"Document {i}: the {w} of Velmora was built in {1800 + 7 * i} by {n}." * (1 + i % 3)
        for i, (w, n) in enumerate(zip(["lighthouse", "bridge", "library", "school", "museum", "bakery"] * 4,
                                       ["Ada", "Bo", "Cy", "Di", "Ed", "Flo", "Gus", "Hal"] * 3))]


def _pair(path):
    # exact_scores: the GPU routing kernel's default scores an fp32 bank in one TF32 pass (~1e-3 from the fp32
    # reference, see RoutingConfig.exact_scores); parity with the CPU needs the exact passes.
    cfg = MSAConfig(routing={"top_k": 3, "exact_scores": True}, encode={"chunk_size": 8, "storage_dtype": "float32"})
    cpu = MSAModel.from_pretrained(path, config=cfg, device="cpu", dtype=torch.float32)
    gpu = MSAModel.from_pretrained(path, config=cfg, device="cuda", dtype=torch.float32)
    return cpu, gpu


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_cuda_fp32_matches_cpu(tiny_model_dir, family):
    cpu, gpu = _pair(tiny_model_dir(family))
    ids = [f"d{i}" for i in range(len(DOCS))]
    bank_cpu, bank_gpu = cpu.index(DOCS, ids=ids), gpu.index(DOCS, ids=ids)
    assert torch.allclose(bank_cpu.kr_bar, bank_gpu.kr_bar, atol=1e-4)
    q = "Who built the library?"
    a = cpu.retrieve(q, bank_cpu, k=len(DOCS))
    b = gpu.retrieve(q, bank_gpu, k=len(DOCS))
    assert [h.score for h in a] == pytest.approx([h.score for h in b], abs=1e-4)
    assert gpu.answer(q, bank_gpu, max_new_tokens=8).text == cpu.answer(q, bank_cpu, max_new_tokens=8).text


def test_cuda_bf16_runs_end_to_end(tiny_model_dir):
    path = tiny_model_dir("qwen3")
    model = MSAModel.from_pretrained(path, config=MSAConfig(encode={"chunk_size": 8}), device="cuda")
    assert model.backbone.dtype == torch.bfloat16
    bank = model.index(DOCS, ids=[f"d{i}" for i in range(len(DOCS))])
    hits = model.retrieve(["Who built the library?", "When was the bridge built?"], bank, k=5)
    assert all(len(h) == 5 for h in hits)
    for mode in ("latent", "hybrid"):
        ans = model.answer("Who built the library?", bank, mode=mode, k=3, max_new_tokens=8)
        assert ans.doc_ids
