"""GPU smoke run of the plain-PyTorch engine with a default-shaped model (SmolLM2-135M architecture,
random weights, no GGUF needed): encode throughput, routing and answer latency on one GPU.

    python benchmarks/gpu_smoke.py --tokens 1000000 --out benchmarks/results/gpu_smoke.json

This is the reference path (no Triton kernels yet); the bank lives in host memory, so every routing
step copies K̄_R to the GPU. Issue 8 replaces both; these numbers are the baseline it must beat.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from tiny import save_tiny_tokenizer  # noqa: E402

from msa_core import MSAConfig, MSAModel, __version__  # noqa: E402
from msa_core.inference.encode import DocumentPart, encode_parts


def smollm2_shaped_checkpoint(path: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    save_tiny_tokenizer(path)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
                      rms_norm_eps=1e-5, tie_word_embeddings=True, eos_token_id=2, pad_token_id=0,
                      rope_parameters={"rope_type": "default", "rope_theta": 100000.0})
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(str(path))
    return path


def cuda_time(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--doc-tokens", type=int, default=512)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_smoke.json"))
    args = ap.parse_args()
    path = smollm2_shaped_checkpoint(Path(tempfile.mkdtemp()) / "smollm2-shaped")
    cfg = MSAConfig(encode={"batch_size": 64, "max_tokens_per_batch": 64 * 512})
    model = MSAModel.from_pretrained(path, config=cfg, device="cuda")  # bf16
    n_docs = args.tokens // args.doc_tokens
    gen = torch.Generator().manual_seed(0)
    parts = [DocumentPart(f"d{i}", f"d{i}", 0, f"random document {i}",
                          torch.randint(3, 49152, (args.doc_tokens,), generator=gen).tolist(), {})
             for i in range(n_docs)]
    encode_parts(model.backbone, model.router, model.layers, parts[:64], model.config.encode)  # warm-up
    torch.cuda.synchronize()
    t = time.perf_counter()
    encoded = encode_parts(model.backbone, model.router, model.layers, parts, model.config.encode)
    torch.cuda.synchronize()
    encode_s = time.perf_counter() - t
    bank = model.new_bank()
    bank.add(encoded)
    flops_per_token = 2 * sum(p.numel() for n, p in model.backbone.named_parameters()
                              if "embed" not in n and "lm_head" not in n)
    questions = [f"Question number {i} about the lighthouse?" for i in range(20)]
    retrieve = cuda_time(lambda: model.retrieve(questions[0], bank, k=5), 20)
    batch = cuda_time(lambda: model.retrieve(questions, bank, k=5), 5)
    ask = cuda_time(lambda: model.answer(questions[1], bank, max_new_tokens=32), 3)
    result = {
        "benchmark": "gpu_smoke", "msa_version": __version__, "torch": torch.__version__,
        "device": torch.cuda.get_device_name(), "model": "SmolLM2-135M-shaped, random weights, bf16",
        "bank_tokens": bank.info()["tokens"], "bank_bytes": bank.info()["bytes"],
        "encode_s": encode_s, "encode_tokens_per_s": args.tokens / encode_s,
        "encode_tflops": flops_per_token * args.tokens / encode_s / 1e12,
        "retrieve_k5_median_s": statistics.median(retrieve),
        "retrieve_batch20_median_s_per_question": statistics.median(batch) / len(questions),
        "ask_latent_32_tokens_median_s": statistics.median(ask),
        "peak_gpu_memory_gb": torch.cuda.max_memory_allocated() / 2**30,
        "note": "reference PyTorch path, bank in host memory (K̄_R copied to the GPU per routing step)",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
