"""What retrieve's cached prompt head saves on a CPU: the query forward over the question tokens behind the
template head's cached K/V (msa_core/inference/question_head.py) against the same forward over the whole
prompts, alternating per question, on the default model in its default dtype.

    python benchmarks/cpu_question_head.py [--questions 40] [--threads 1] [--out benchmarks/results/cpu_question_head.json]

Questions: HotpotQA-100's (latency only, nothing is tuned); the bank is small (12 passages) so that the
question's forward, the part the head changes, dominates.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from msa_core import MSAModel, __version__
from msa_core.inference.generate import engine_for

DATA = Path(os.environ.get("MSA_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--questions", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 on a busy shared machine)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "cpu_question_head.json"))
    args = ap.parse_args()
    from msa_integrations.compare.dataset import load_dataset

    torch.set_num_threads(args.threads)
    ds = load_dataset(DATA / "eval" / "hotpotqa100", limit=args.questions)
    questions = [q.question for q in ds.queries]
    model = MSAModel.from_pretrained("default", device="cpu")
    bank = model.index([d.passage for d in ds.corpus[:12]], ids=[d.id for d in ds.corpus[:12]], show_progress_bar=False)
    heads = engine_for(model.backbone).question_heads
    model.retrieve(questions[0], bank, k=5)  # warm-up: fills the head cache
    times: dict[str, list[float]] = {"cached_head": [], "whole_prompt": []}
    load_start = os.getloadavg()[0]
    for n, q in enumerate(questions):
        order = [("cached_head", True), ("whole_prompt", False)]
        for name, enabled in (order if n % 2 == 0 else order[::-1]):
            heads.enabled = enabled
            t = time.perf_counter()
            model.retrieve(q, bank, k=5)
            times[name].append(1000 * (time.perf_counter() - t))
    result = {
        "benchmark": "cpu_question_head", "msa_version": __version__, "torch": torch.__version__,
        "device": {"kind": "cpu", "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "dtype": str(model.backbone.dtype).removeprefix("torch."), "questions": len(questions), "bank_passages": 12,
        "load_average_1min": {"start": load_start, "end": os.getloadavg()[0]},
        **{name: {"retrieve_p50_ms": statistics.median(t), "retrieve_mean_ms": statistics.fmean(t)}
           for name, t in times.items()},
    }
    result["p50_speedup"] = result["whole_prompt"]["retrieve_p50_ms"] / result["cached_head"]["retrieve_p50_ms"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
