"""Fused answers against plain ones, interleaved question by question (both see the same machine load): the
default model on the shipped demo corpus, model.answer(q, bank, k=K) vs answer(..., fusion="bm25") in latent
and hybrid modes. Records latency (a fused latent answer adds one scoring pass of the question) and whether
the question's gold document is among the documents each answer used.

    python benchmarks/fusion_answer_latency.py [--modes latent,hybrid] [--k 4] [--max-new-tokens 8] [--repeats 1]
Writes benchmarks/results/fusion/answer_latency.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from msa_core import MSAModel
from msa_core.memory.corpus import DEMO_CORPUS_PATH, DEMO_QUESTIONS_PATH, read_corpus

ROOT = Path(__file__).resolve().parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modes", default="latent,hybrid")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "results/fusion/answer_latency.json"))
    args = p.parse_args()
    modes = args.modes.split(",")
    runs = {name: {"mode": m, **extra} for m in modes for name, extra in ((m, {}), (f"{m}+bm25", {"fusion": "bm25"}))}
    model = MSAModel.from_pretrained("default", device="cpu")
    records = read_corpus(DEMO_CORPUS_PATH)
    bank = model.index([r.text for r in records], ids=[r.id for r in records],
                       metadatas=[r.metadata for r in records], show_progress_bar=False)
    questions = json.loads(DEMO_QUESTIONS_PATH.read_text(encoding="utf-8"))
    kw = {"k": args.k, "max_new_tokens": args.max_new_tokens}
    for name, run in runs.items():  # warm-up (the lexical side is built on first use)
        model.answer(questions[0]["question"], bank, **kw, **run)
    times: dict[str, list[float]] = {n: [] for n in runs}
    gold: dict[str, int] = dict.fromkeys(runs, 0)
    used: dict[str, list[int]] = {n: [] for n in runs}
    for rep in range(args.repeats):
        for q in questions:
            for name, run in runs.items():
                t = time.perf_counter()
                answer = model.answer(q["question"], bank, **kw, **run)
                times[name].append((time.perf_counter() - t) * 1000)
                gold[name] += rep == 0 and q["gold_id"] in answer.doc_ids
                used[name].append(len(answer.doc_ids))
    p50 = {n: statistics.median(v) for n, v in times.items()}
    paired = {f"{n}+bm25_minus_{n}_p50_ms": statistics.median(b - a for a, b in zip(times[n], times[f"{n}+bm25"]))
              for n in modes}
    result = {"model": "default (SmolLM2-135M-Instruct, shipped router)", "device": "cpu",
              "bank_documents": len(bank), "questions": len(questions), "repeats": args.repeats, **kw,
              "fusion_alpha": model.config.routing.fusion_alpha, "load_average": os.getloadavg(),
              "p50_ms": p50, **paired, "ratio_p50": {n: p50[f"{n}+bm25"] / p50[n] for n in modes},
              "gold_in_used_documents": {n: f"{c}/{len(questions)}" for n, c in gold.items()},
              "documents_used_mean": {n: statistics.mean(v) for n, v in used.items()}, "times_ms": times}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print({k: v for k, v in result.items() if k != "times_ms"})


if __name__ == "__main__":
    main()
