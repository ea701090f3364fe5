"""CPU bf16 encoding attention as two matmuls vs SDPA's flash kernel, decided on a dev split (issue 27).

`backbone.causal_matmul_attention` rounds the attention scores to bfloat16 (the flash kernel keeps them in
float32) to encode faster. This script encodes a wiki-dev corpus (`msa distill-data`'s held-out split: the gold
passages of its questions plus distractors; never ../shared/data/eval/) with the default model twice, the
encoding attention as the library chooses it and with SDPA forced (MATMUL_ATTENTION_MAX_TOKENS = 0),
slices alternated, and reports encode tokens/s and recall@5 of each bank on the split's questions.

    python benchmarks/cpu_attention_dev.py --dev-set /tmp/wiki_pseudo/dev --passages 1500
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

from msa_core import MSAModel, __version__
from msa_core.decoder import backbone


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dev-set", type=Path, required=True, help="a folder with corpus.jsonl and queries.jsonl")
    ap.add_argument("--passages", type=int, default=1500, help="gold passages plus seeded distractors up to this")
    ap.add_argument("--slices", type=int, default=4)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "cpu_attention_dev.json")
    args = ap.parse_args()
    if "eval" in args.dev_set.resolve().parts:
        raise SystemExit("choose on a dev split of training data, never on ../shared/data/eval/")
    corpus = {r["id"]: r for r in map(json.loads, (args.dev_set / "corpus.jsonl").open(encoding="utf-8"))}
    queries = [json.loads(line) for line in (args.dev_set / "queries.jsonl").open(encoding="utf-8")]
    keep = sorted({g for q in queries for g in q["gold_ids"]})
    rest = sorted(set(corpus) - set(keep))
    keep += random.Random(0).sample(rest, max(0, min(len(rest), args.passages - len(keep))))
    docs = [corpus[i] for i in sorted(keep)]
    model = MSAModel.from_pretrained("default", device="cpu")
    arms = {"matmul": backbone.MATMUL_ATTENTION_MAX_TOKENS, "sdpa": 0}
    banks = {arm: model.new_bank() for arm in arms}
    seconds = {arm: 0.0 for arm in arms}
    slice_speedups = []
    model.index([f"{d['title']}\n{d['text']}" for d in docs[:16]], show_progress_bar=False)  # warm-up
    for n in range(args.slices):
        part = docs[n::args.slices]
        took = {}
        for arm in (list(arms) if n % 2 == 0 else list(reversed(arms))):
            backbone.MATMUL_ATTENTION_MAX_TOKENS = arms[arm]
            start = time.perf_counter()
            model.add(banks[arm], [f"{d['title']}\n{d['text']}" for d in part], ids=[d["id"] for d in part],
                      show_progress_bar=False)
            took[arm] = time.perf_counter() - start
            seconds[arm] += took[arm]
        slice_speedups.append(took["sdpa"] / took["matmul"])
    backbone.MATMUL_ATTENTION_MAX_TOKENS = arms["matmul"]
    tokens = banks["sdpa"].info()["tokens"]

    def recall(bank) -> float:
        hits = model.retrieve([q["question"] for q in queries], bank, k=5)
        return statistics.mean(len(set(q["gold_ids"]) & {h.id for h in got}) / len(q["gold_ids"])
                               for q, got in zip(queries, hits))

    result = {
        "benchmark": "cpu_attention_dev", "msa_version": __version__, "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "dev_set": str(args.dev_set), "passages": len(docs),
        "tokens": tokens, "questions": len(queries),
        "arms": {"matmul": f"causal_matmul_attention for blocks <= {arms['matmul']} tokens (the default)",
                 "sdpa": "SDPA's flash kernel for every block (the earlier path)"},
        "encode_tokens_per_s": {arm: tokens / seconds[arm] for arm in arms},
        "encode_speedup_slices": slice_speedups,
        "encode_speedup_median": statistics.median(slice_speedups),
        "recall@5": {arm: recall(banks[arm]) for arm in arms},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: result[k] for k in ("encode_tokens_per_s", "encode_speedup_median", "recall@5")}, indent=1))


if __name__ == "__main__":
    main()
