"""Where a CPU `retrieve` spends its time (issue 27): the default model over HotpotQA-100's 994 passages, one
question at a time: p50 of 40 questions, then cProfile over 20 and torch.profiler over 10.

    .venv/bin/python benchmarks/cpu_retrieve_profile.py [N_PASSAGES] > profile.txt
"""
import cProfile
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

from msa_core import MSAModel

DATA = Path(__file__).resolve().parents[2] / "shared/data/eval/hotpotqa100"
rows = [json.loads(line) for line in (DATA / "corpus.jsonl").open()]
questions = [json.loads(line)["question"] for line in (DATA / "queries.jsonl").open()]
model = MSAModel.from_pretrained("default")
n = int(sys.argv[1]) if len(sys.argv) > 1 else len(rows)
bank = model.index([f"{r['title']}\n{r['text']}" for r in rows[:n]], [r["id"] for r in rows[:n]],
                   show_progress_bar=False)
for q in questions[:5]:
    model.retrieve([q], bank, k=10)
times = []
for q in questions[:40]:
    start = time.perf_counter()
    model.retrieve([q], bank, k=10)
    times.append((time.perf_counter() - start) * 1000)
print("retrieve p50 ms", round(statistics.median(times), 1), "torch threads", torch.get_num_threads())
profile = cProfile.Profile()
profile.enable()
for q in questions[40:60]:
    model.retrieve([q], bank, k=10)
profile.disable()
pstats.Stats(profile).sort_stats("cumulative").print_stats(35)
with torch.profiler.profile() as prof:
    for q in questions[60:70]:
        model.retrieve([q], bank, k=10)
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
