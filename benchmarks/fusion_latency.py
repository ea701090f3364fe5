"""Fusion's query latency against plain routing, interleaved question by question on one saved bank (so
both see the same machine load): MSAModel.retrieve(q, bank, k=5) vs retrieve(..., fusion="bm25").

    python benchmarks/fusion_latency.py --bank DIR --data ../shared/data/eval/hotpotqa100 [--n 30]
Writes benchmarks/results/fusion/latency_interleaved.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from msa_core import MSAModel
from msa_integrations.compare.dataset import load_dataset

ROOT = Path(__file__).resolve().parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bank", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--n", type=int, default=30)
    p.add_argument("--out", default=str(ROOT / "results/fusion/latency_interleaved.json"))
    args = p.parse_args()
    model = MSAModel.from_pretrained("default", device="cpu")
    bank = model.load_bank(args.bank)
    questions = [q.question for q in load_dataset(args.data).queries][:args.n]
    model.retrieve(questions[0], bank, k=5, fusion="bm25")  # warm-up: the lexical side is built here
    times: dict[str, list[float]] = {"msa": [], "msa+bm25": []}
    for q in questions:
        for name, kw in (("msa", {}), ("msa+bm25", {"fusion": "bm25"})):
            t = time.perf_counter()
            model.retrieve(q, bank, k=5, **kw)
            times[name].append((time.perf_counter() - t) * 1000)
    diffs = [b - a for a, b in zip(times["msa"], times["msa+bm25"])]
    result = {"bank_documents": len(bank), "questions": len(questions), "load_average": os.getloadavg(),
              **{f"{n}_p50_ms": statistics.median(v) for n, v in times.items()},
              "paired_difference_p50_ms": statistics.median(diffs), "times_ms": times}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print({k: v for k, v in result.items() if k != "times_ms"})


if __name__ == "__main__":
    main()
