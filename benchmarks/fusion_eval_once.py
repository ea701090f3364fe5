"""HotpotQA-100 recall@5 of msa + BM25 at the default fusion setting and at one chosen on a dev split, in one run
(issue 22). The setting to test comes from a dev sweep (`fusion_alpha_dev.py --dev-set ...`), never from this set.

    python benchmarks/fusion_eval_once.py --alpha 0.6 --method minmax --out benchmarks/results/fusion/hotpotqa100_v14_dev_choice.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from msa_integrations.compare.dataset import load_dataset
from msa_integrations.compare.metrics import recall_at_k
from msa_integrations.compare.retrievers import MSARouting

DATA = Path(__file__).resolve().parents[2] / "shared/data/eval/hotpotqa100"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--alpha", type=float, required=True)
    p.add_argument("--method", default="minmax")
    p.add_argument("--cache", default=None)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    data = load_dataset(DATA)
    r = MSARouting(cache_dir=args.cache, show_progress=False)
    t = time.perf_counter()
    r.index(data.corpus)
    build_s = time.perf_counter() - t
    out = {"dataset": str(DATA), "passages": len(data.corpus), "questions": len(data.queries), "build_s": build_s,
           "chosen_on": "benchmarks/results/fusion/alpha_dev_wiki_v14.json (wiki-dev, training data)"}
    settings = [("default", None, None), ("latent only", 1.0, None), ("dev choice", args.alpha, args.method)]
    for name, alpha, method in settings:
        cfg = r.model.config.routing
        before = cfg.fusion_method
        if method:
            cfg.fusion_method = method
        try:
            rows = r.model.retrieve([q.question for q in data.queries], r.bank, k=5, fusion="bm25", alpha=alpha)
        finally:
            cfg.fusion_method = before
        out[name] = {"alpha": alpha if alpha is not None else cfg.fusion_alpha, "method": method or before,
                     "recall@5": statistics.fmean(recall_at_k([h.id for h in hits], q.gold_ids, 5)
                                                  for hits, q in zip(rows, data.queries))}
        print(name, out[name], flush=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
