"""Memory Parallel benchmark: routing latency over a bank sharded across ranks (msa_core/distributed.py).

    # 2 GPUs, NCCL, SmolLM2-135M-shaped random model, synthetic 1M-chunk bank:
    torchrun --standalone --nproc_per_node=2 benchmarks/distributed_routing.py \
        --model smollm2-random --docs 125000 --chunks-per-doc 8
    # CPU, gloo, tiny sizes (a smoke run; its JSON is labelled cpu-gloo):
    torchrun --standalone --nproc_per_node=2 benchmarks/distributed_routing.py \
        --model tiny --docs 64 --chunks-per-doc 4 --questions 3 --repeats 2

Device: cuda:LOCAL_RANK with NCCL when CUDA is available, else CPU with gloo. The bank is either a
saved one (--bank PATH, loaded with load_sharded: each rank reads only its rows) or synthetic: each rank
draws random K̄/V̄/K̄_R for its own contiguous range of documents only, so banks larger than one
device's memory can be benchmarked. Synthetic scores are meaningless; timings are what this measures.

Per question it times, on every rank: `distributed_retrieve` (routing up to the last routing layer,
all_gather of local top-k per layer, the K̄/V̄ exchange when retrieve_with_memory, the hit merge),
a latent prefill `distributed_answer(max_new_tokens=1)`, and `retrieve` on the local shard alone (no
communication: the compute floor of one shard). Rank 0 writes JSON with per-rank bank bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]

from msa_core import MSAConfig, MSAModel, __version__
from msa_core.distributed import ShardedBank, _bank_like, distributed_answer, distributed_retrieve, load_sharded
from msa_core.memory.records import PartRecord

QUESTIONS = ["Who built the lighthouse of Velmora?", "When do the ferries return to the harbour?",
             "What is the capital of France?", "How long is the cheese aged?",
             "Which documents does memory sparse attention route to?"]


def model_path(name: str, rank: int) -> str:
    """'tiny' / 'smollm2-random' are built once by rank 0 into a shared temp folder; else passed on."""
    if name not in ("tiny", "smollm2-random"):
        return name
    path = Path(tempfile.gettempdir()) / f"msa-dist-bench-{name}-{os.environ.get('TORCHELASTIC_RUN_ID', 'x')}"
    if rank == 0 and not (path / "config.json").exists():
        if name == "tiny":
            from tiny import save_tiny_model
            save_tiny_model(path, "qwen3")
        else:
            from gpu_smoke import smollm2_shaped_checkpoint
            smollm2_shaped_checkpoint(path)
    dist.barrier()
    return str(path)


def synthetic_shard(model: MSAModel, docs: int, chunks: int, rank: int, world: int, device: torch.device,
                    seed: int) -> ShardedBank:
    """This rank's contiguous share of a bank of `docs` documents of `chunks` chunks, random tensors."""
    lo, hi = rank * docs // world, (rank + 1) * docs // world
    template = model.new_bank()
    template._device = device
    a, n_layers, size = model.backbone.args, len(model.layers), model.config.encode.chunk_size
    gen = torch.Generator(device=device).manual_seed(seed + rank)
    shape = (n_layers, (hi - lo) * chunks, a.kv_heads, a.head_dim)
    # drawn straight in the storage dtype: an fp32 draw would need twice the bank's memory at its peak
    tensors = {n: torch.randn(shape, generator=gen, device=device, dtype=template.storage_dtype)
               for n in ("k_bar", "v_bar", "kr_bar")}
    parts = tuple(PartRecord(id=f"doc{g}", parent_id=f"doc{g}", part_index=0, text=f"synthetic document {g}",
                             metadata={"i": g}, n_tokens=chunks * size, n_chunks=chunks) for g in range(lo, hi))
    local = _bank_like(template, parts, tensors)
    return ShardedBank(local, torch.arange(lo, hi), torch.full((docs,), chunks), docs, rank, world)


def timed(fn, device: torch.device, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        dist.barrier()  # every rank starts together: the slowest rank sets the latency
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        out.append((time.perf_counter() - t) * 1e3)
    return out


def summary(ms: list[float]) -> dict[str, float]:
    s = sorted(ms)
    return {"mean_ms": statistics.fmean(s), "p50_ms": s[len(s) // 2], "p90_ms": s[int(0.9 * (len(s) - 1))],
            "min_ms": s[0], "n": len(s)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-random",
                    help="'tiny', 'smollm2-random' (random SmolLM2-135M shape), 'default' or a model folder")
    ap.add_argument("--bank", default=None, help="a saved bank to shard (else a synthetic bank)")
    ap.add_argument("--docs", type=int, default=4096, help="synthetic bank: documents")
    ap.add_argument("--chunks-per-doc", type=int, default=8, help="synthetic bank: chunks per document")
    ap.add_argument("--strategy", default="contiguous", choices=["contiguous", "round_robin"])
    ap.add_argument("--layers", default=None,
                    help="routing layers, e.g. 7,18,24,28,29 (the default model's trained router); default: the model's")
    ap.add_argument("--k", type=int, default=16, help="documents per routing layer")
    ap.add_argument("--questions", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per question")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/distributed_routing_<tag>.json)")
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        run(args, device, rank, world)
    finally:
        dist.destroy_process_group()


def run(args: argparse.Namespace, device: torch.device, rank: int, world: int) -> None:
    routing = {"top_k": args.k} | ({"layers": [int(x) for x in args.layers.split(",")]} if args.layers else {})
    t = time.perf_counter()
    model = MSAModel.from_pretrained(model_path(args.model, rank), config=MSAConfig(routing=routing), device=device)
    load_model_s = time.perf_counter() - t
    t = time.perf_counter()
    try:
        if args.bank:
            shard = load_sharded(args.bank, strategy=args.strategy, map_location=device)
        else:
            shard = synthetic_shard(model, args.docs, args.chunks_per_doc, rank, world, device, args.seed)
    except torch.OutOfMemoryError as e:  # the capacity question's other answer: record it, do not crash
        out_of_memory(args, device, rank, world, model, e)
        return
    build_bank_s = time.perf_counter() - t
    questions = (QUESTIONS * (args.questions // len(QUESTIONS) + 1))[: args.questions]

    per_q = {"retrieve": [], "latent_prefill": [], "local_only_retrieve": []}
    for q in questions:
        calls = {
            "retrieve": lambda q=q: distributed_retrieve(model, q, shard, k=args.k),
            "latent_prefill": lambda q=q: distributed_answer(model, q, shard, k=args.k, max_new_tokens=1),
            "local_only_retrieve": lambda q=q: model.retrieve(q, shard.local, k=args.k),
        }
        for name, fn in calls.items():
            timed(fn, device, args.warmup)
            per_q[name].append(statistics.fmean(timed(fn, device, args.repeats)))
    mine = {"rank": rank, "device": str(device), "bank": shard.info(),
            "latency": {name: summary(v) for name, v in per_q.items()}}
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        mine |= {"gpu_total_gb": total / 2**30, "gpu_free_after_bank_gb": free / 2**30,
                 "gpu_allocated_gb": torch.cuda.memory_allocated(device) / 2**30}
    hits = distributed_retrieve(model, questions[0], shard, k=min(args.k, 5))
    gathered: list = [None] * world
    dist.all_gather_object(gathered, mine)
    if rank != 0:
        return
    tag = f"{'cuda-nccl' if device.type == 'cuda' else 'cpu-gloo'}-x{world}"
    result = {
        "benchmark": "distributed_routing", "label": tag, "msa_version": __version__,
        "torch": torch.__version__, "platform": platform.platform(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "world_size": world, "backend": dist.get_backend(), "model": args.model,
        "bank": args.bank or "synthetic", "docs": shard.num_documents, "parts": shard.num_parts,
        "chunks": int(shard.chunk_counts.sum()), "k": args.k, "strategy": args.strategy,
        "routing_layers": model.layers, "questions": len(questions), "repeats": args.repeats,
        "load_model_s_rank0": load_model_s, "build_bank_s_rank0": build_bank_s,
        "bank_bytes_per_rank": [g["bank"]["bytes"] for g in gathered],
        "bank_tokens": int(shard.chunk_counts.sum()) * model.config.encode.chunk_size,
        "bank_bytes_per_token": sum(g["bank"]["bytes"] for g in gathered) / (
            int(shard.chunk_counts.sum()) * model.config.encode.chunk_size),
        "latency_ms": {name: summary(v) for name, v in per_q.items()},  # rank 0's clock, ranks in lockstep
        "per_rank": gathered,
        "sample_hits": [h.id for h in hits],
    }
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"distributed_routing_{tag}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("label", "docs", "chunks", "bank_bytes_per_rank", "latency_ms")},
                     indent=2))
    print(f"wrote {out}")


def out_of_memory(args: argparse.Namespace, device: torch.device, rank: int, world: int, model: MSAModel,
                  error: Exception) -> None:
    """The bank does not fit these GPUs: every rank reports, rank 0 writes JSON saying so."""
    torch.cuda.empty_cache()
    gathered: list = [None] * world
    dist.all_gather_object(gathered, {"rank": rank, "error": str(error).splitlines()[0][:300]})
    if rank != 0:
        return
    tag = f"cuda-nccl-x{world}"
    tokens = args.docs * args.chunks_per_doc * model.config.encode.chunk_size
    result = {"benchmark": "distributed_routing", "label": tag, "world_size": world, "model": args.model,
              "docs": args.docs, "chunks": args.docs * args.chunks_per_doc, "bank_tokens": tokens,
              "routing_layers": model.layers, "fits": False, "gpu": torch.cuda.get_device_name(device),
              "gpu_total_gb": torch.cuda.mem_get_info(device)[1] / 2**30, "per_rank": gathered}
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"distributed_routing_{tag}_oom.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"out of memory: a {tokens / 1e6:.0f}M-token bank does not fit {world} GPU(s); wrote {out}")


if __name__ == "__main__":
    main()
