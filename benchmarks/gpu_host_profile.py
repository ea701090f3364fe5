"""Where retrieve, a latent first token and encode spend *host* time on a GPU (issue 23), at MSA-4B shapes
with random bf16 weights: wall ms, then cProfile's top functions by own time, then the CUDA kernel total,
each with cuDNN's SDPA backend on and off (its per-call host cost shows in the latent prefill).

    python benchmarks/gpu_host_profile.py --out benchmarks/results/gpu_engine/host_profile_h200.txt
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]

from gpu_engine import build_model, grow, wall_ms  # noqa: E402
from msa4b_smoke import MSA_4B, TINY, documents  # noqa: E402
from msa_tiny import save_msa_tokenizer  # noqa: E402


def host_profile(fn, calls: list, rows: int = 22) -> str:
    pr = cProfile.Profile()
    pr.enable()
    for args in calls:
        fn(*args)
    torch.cuda.synchronize()
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(rows)
    pstats.Stats(pr, stream=s).sort_stats("cumulative").print_stats(rows)
    return s.getvalue()


def kernels(fn, calls: list, rows: int = 14) -> tuple[float, str]:
    """(CUDA kernel ms per call, the top kernels' table)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for args in calls:
            fn(*args)
        torch.cuda.synchronize()
    averages = prof.key_averages()
    total = sum(e.self_device_time_total for e in averages)
    return total / 1e3 / len(calls), averages.table(sort_by="self_cuda_time_total", row_limit=rows, max_name_column_width=70)


def retrieve_phases(model, bank, questions: list[str], k: int = 16) -> str:
    """Median ms of retrieve's phases run one after another with a sync between them: the prompt on the
    host, the question forward, scoring every layer, then ranking on the host; beside the unsynced wall."""
    from msa_core.inference.generate import MemoryRouter, build_prompt, engine_for, left_pad, query_positions
    from msa_core.routing.scores import aggregate_layers
    cfg, dev = model.config.routing, model.backbone.device
    engine = engine_for(model.backbone)
    phases: dict[str, list[float]] = {"prompt": [], "forward": [], "score": [], "rank": []}

    def lap(name: str, t: float) -> float:
        torch.cuda.synchronize()
        now = time.perf_counter()
        phases[name].append((now - t) * 1e3)
        return now

    for q in questions + questions:
        allowed = bank.row_mask(None)
        torch.cuda.synchronize()
        t = time.perf_counter()
        prompts = [build_prompt(model.tokenizer, q)]
        hook = MemoryRouter(bank, model.router, cfg, None, allowed=allowed, attend=False)
        forward = engine.query_forward(hook.router, list(hook.layer_pos))
        ids, valid, routing = left_pad(prompts, model.tokenizer.pad_token_id or 0, dev)
        positions = query_positions(valid, model.position_offset(cfg.top_k))
        t = lap("prompt", t)
        queries = forward(ids, positions, valid)
        t = lap("forward", t)
        pad = next(iter(queries.values())).shape[1] - routing.shape[1]
        hook.routing_mask = torch.nn.functional.pad(routing, (pad, 0))
        hook.score_queries(queries)
        per_layer = torch.stack([hook.routings[layer].doc_scores for layer in model.layers])
        t = lap("score", t)
        total = aggregate_layers(per_layer, cfg.layer_aggregate).cpu()
        model._rank(bank, total[0], per_layer[:, 0, :0].cpu(), allowed, k, False, False)
        lap("rank", t)
    half = len(questions)
    return "retrieve phases, synced (median ms): " + ", ".join(
        f"{name} {statistics.median(v[half:]):.2f}" for name, v in phases.items())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--small", action="store_true", help="the 8-document bank only (no 1M-token growth)")
    ap.add_argument("--cudnn", default="on,off", help="cuDNN SDPA settings to run: on, off or both")
    ap.add_argument("--jobs", default="retrieve,latent,encode")
    ap.add_argument("--compile", action="store_true", help="torch.compile the captured decode step and question forward")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    dev = torch.device("cuda")
    torch.set_grad_enabled(False)
    shape = dict(TINY if args.tiny else MSA_4B)
    tok_dir = Path(tempfile.mkdtemp())
    save_msa_tokenizer(tok_dir)
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    model = build_model(shape, tokenizer, torch.bfloat16, dev, False)
    if args.compile:
        from msa_core.inference.generate import engine_for
        engine_for(model.backbone).set_compile(True)
    texts = documents(tokenizer, 64, 512)
    questions = documents(tokenizer, 12, 40, seed=7)
    bank = model.new_bank()
    model.add(bank, texts[:8], ids=[f"d{i}" for i in range(8)], show_progress_bar=False)
    bank = bank.to(dev)  # every tensor on the GPU: the tier a captured prefill needs
    report = []
    if args.small:
        report.append("bank: 8 documents")
    else:
        grow(bank, 1_000_000)
        report.append(f"bank tokens {bank.info()['tokens']}")

    def retrieve(q):
        return model.retrieve(q, bank, k=16)

    def ttft(q):
        return model.answer(q, bank, mode="latent", k=8, max_new_tokens=1)

    def encode(batch):
        model.add(model.new_bank(), batch, ids=[f"e{i}" for i in range(len(batch))], show_progress_bar=False)

    jobs = [("retrieve", retrieve, [(q,) for q in questions[:6]]),
            ("latent first token", ttft, [(q,) for q in questions[:6]]),
            ("encode 32 x 512 tokens", encode, [(texts[:32],), (texts[32:],)])]
    jobs = [j for j in jobs if j[0].split()[0] in args.jobs.split(",")]
    if "retrieve" in args.jobs.split(","):
        retrieve(questions[0])
        line = retrieve_phases(model, bank, questions[:6])
        print(line, flush=True)
        report.append(line)
    for cudnn in [c == "on" for c in args.cudnn.split(",")]:
        torch.backends.cuda.enable_cudnn_sdp(cudnn)
        for name, fn, calls in jobs:
            fn(*calls[0])
            fn(*calls[-1])
            ms = statistics.median(wall_ms(lambda a=a: fn(*a), dev) for a in calls)
            total, table = kernels(fn, calls)
            head = (f"== {name}, cuDNN SDPA {'on' if cudnn else 'off'}: wall {ms:.1f} ms per call, "
                    f"CUDA kernels {total:.1f} ms per call")
            print(head, flush=True)
            report += [head, table, host_profile(fn, calls)]
    text = "\n".join(report)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
