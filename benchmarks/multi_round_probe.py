"""Routing v2 candidate (b), a probe: two routing rounds inside retrieve. Round 1 ranks; the top passage's title
(or first sentence) is appended to the question; round 2 ranks again; the merge keeps round 1's first `keep`
leaders and fills from round 2. Runs on a saved HotpotQA-100 bank of the default model (`msa compare --cache`).
Measured on the evaluation set, so it is reported only: nothing in the library was chosen from it, and no
multi-round option ships (it would double the latency for what this shows).

    python benchmarks/multi_round_probe.py CACHE_DIR > benchmarks/results/router_training/v10_multiround_probe.json
"""
import json, re, sys, time
from pathlib import Path
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "eval" / "hotpotqa100"
from msa_core import MSAModel  # noqa: E402
from msa_core.memory.bank import MemoryBank  # noqa: E402
model = MSAModel.from_pretrained("default")
cache = next(Path(sys.argv[1]).glob("msa-*"))
bank = MemoryBank.load(cache / "bank")
qs = [json.loads(l) for l in open(str(DATA / "queries.jsonl"))]
texts = {r["id"]: r for r in (json.loads(l) for l in open(str(DATA / "corpus.jsonl")))}
def rec(rank, gold, k=5): return len(set(rank[:k]) & set(gold)) / len(gold)
res = {}
r1s = model.retrieve([q["question"] for q in qs], bank, k=10)
for variant in ("title", "sentence"):
    q2 = []
    for q, r1 in zip(qs, r1s):
        top = texts[r1[0].id]
        extra = top["title"] if variant == "title" else re.split(r"(?<=[.!?])\s", top["text"])[0]
        q2.append(q["question"] + " " + extra)
    r2s = model.retrieve(q2, bank, k=10)
    for keep in (1, 2, 3):
        out = []
        for q, r1, r2 in zip(qs, r1s, r2s):
            lead = [h.id for h in r1[:keep]]
            merged = lead + [h.id for h in r2 if h.id not in lead]
            out.append(rec(merged, q["gold_ids"]))
        res[f"{variant}_keep{keep}"] = round(sum(out) / len(out), 4)
res["round1"] = round(sum(rec([h.id for h in r], q["gold_ids"]) for q, r in zip(qs, r1s)) / len(qs), 4)
res["note"] = "recall@5 on HotpotQA-100 (reported only), router v10, CPU bf16; round1 = plain retrieve"
print(json.dumps(res, indent=1))
