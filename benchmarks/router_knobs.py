"""Scoring knobs of the shipped router on held-out training data (never eval): 600 of the NQ/SelQA questions
it was not trained on, against their 581 documents, on CPU. Writes benchmarks/results/router_training/knobs_heldout_cpu.json.

The router was trained with the default reductions; each row swaps one reduction at inference only.
Run: python benchmarks/router_knobs.py  (needs ../shared/data/train; ~5 min on 2 cores)."""
import glob
import json
import random
import time
from pathlib import Path

import torch

from msa_core.model import MSAModel
from msa_core.training.cache import cache_documents, cache_queries
from msa_core.training.data import load_pairs
from msa_core.training.trainer import evaluate

torch.set_num_threads(2)
m = MSAModel.from_pretrained("default", device="cpu")  # shipped router
full = load_pairs(sorted(glob.glob(str(Path(__file__).resolve().parents[2] / "shared/data/train/*.jsonl"))))
_, held = full.split(0.0, ["nq_qed_dev", "selqa"])
rows = sorted(random.Random(0).sample(range(len(held)), 600))
held = held.subset(rows)
print(len(held), len(held.documents), flush=True)
t = time.time()
docs = cache_documents(m.backbone, m.tokenizer, held.documents, m.layers, batch_size=32, max_tokens_per_batch=8192)
qs = cache_queries(m.backbone, m.tokenizer, held.queries, m.layers, position_offset=16)
print("cached", round(time.time() - t), flush=True)
r = m.router.float()
out = {}
for name, upd in [("shipped (mean, max, max)", {}), ("layer_aggregate=max", {"layer_aggregate": "max"}),
                  ("chunk_reduce=mean", {"chunk_reduce": "mean"}), ("query_reduce=mean", {"query_reduce": "mean"}),
                  ("query_reduce=last", {"query_reduce": "last"}), ("head_reduce=max", {"head_reduce": "max"})]:
    cfg = m.config.routing.model_copy(update=upd)
    res = evaluate(r, m.layers, qs, docs, held.positives, cfg)
    out[name] = res
    print(name, {k: round(v, 3) for k, v in res.items() if k.startswith("recall")}, flush=True)
Path(__file__).parent.joinpath("results/router_training/knobs_heldout_cpu.json").write_text(json.dumps(out, indent=1))
