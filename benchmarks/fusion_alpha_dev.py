"""Choose fusion's default alpha on a dev split of TRAINING data (never ../shared/data/eval/).

Dev split: the two Wikipedia QA sources held out of the default router's training whole (NQ-QED and SelQA,
see msa_core/data/routers/*.md), so neither the router nor BM25 has seen them: --questions per source
(seeded sample), the corpus their gold passages plus --distractors other passages per source. For each
retriever pair (msa + BM25, MiniLM + BM25) both sides score every passage once; alpha then sweeps 0..1
through msa_core.routing.fusion.fuse (min-max, and z-score and RRF for comparison). The chosen alpha is
the best recall@5 under min-max, ties broken by MRR, then by the alpha closest to 0.5. Writes
benchmarks/results/fusion/alpha_dev.json.

    python benchmarks/fusion_alpha_dev.py [--cache /tmp/fusion_dev_cache]

`--dev-set DIR` sweeps on a dev retrieval set in the eval format instead (e.g. the `wiki-dev` set `msa distill-data`
writes from held-out passages; questions with several gold passages count each, as recall@k does).
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import time
from pathlib import Path

import torch

from msa_core.routing.fusion import METHODS, fuse
from msa_integrations.compare.dataset import Document
from msa_integrations.compare.retrievers import BM25, DenseFaiss, MSARouting

ROOT = Path(__file__).resolve().parent
TRAIN = ROOT.parents[1] / "shared/data/train"
SOURCES = ("nq_qed_dev.jsonl", "selqa.jsonl")
ALPHAS = [round(i * 0.05, 2) for i in range(21)]


def dev_split(questions: int, distractors: int, seed: int) -> tuple[list[Document], list[tuple[str, str]]]:
    """(corpus, [(question, gold id)]) from SOURCES."""
    rng = random.Random(seed)
    corpus: dict[str, Document] = {}
    pairs: list[tuple[str, str]] = []
    for source in SOURCES:
        recs = [json.loads(line) for line in (TRAIN / source).open(encoding="utf-8")]
        ids: dict[str, str] = {}
        for r in recs:
            ids.setdefault(r["positive"], f"{source.split('.')[0]}-{len(ids):05d}")
        by_id = {ids[r["positive"]]: r for r in recs}
        for r in rng.sample(recs, questions):
            pid = ids[r["positive"]]
            corpus[pid] = Document(pid, r["positive"], r.get("title") or "")
            pairs.append((r["query"], pid))
        others = sorted(set(by_id) - set(corpus))
        for pid in rng.sample(others, distractors):
            corpus[pid] = Document(pid, by_id[pid]["positive"], by_id[pid].get("title") or "")
    docs = sorted(corpus.values(), key=lambda d: d.id)
    return docs, pairs


def msa_sides(corpus: list[Document], questions: list[str], cache: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, N] routing and BM25 scores of every passage (corpus order), from the engine's own fusion call."""
    r = MSARouting(cache_dir=cache, show_progress=False)
    r.index(corpus)
    col = {d.id: i for i, d in enumerate(corpus)}
    latent = torch.full((len(questions), len(corpus)), float("-inf"))
    lexical = torch.zeros(len(questions), len(corpus))
    for start in range(0, len(questions), 16):
        batch = questions[start:start + 16]
        for b, hits in enumerate(r.model.retrieve(batch, r.bank, k=len(corpus), fusion="bm25", alpha=1.0)):
            for h in hits:
                latent[start + b, col[h.id]] = h.latent_score
                lexical[start + b, col[h.id]] = h.lexical_score
    return latent, lexical


def scores_of(fused: torch.Tensor, gold: list[list[int]]) -> dict[str, float]:
    """Recall@1/5 (the share of each question's gold passages in its top k) and MRR of the first gold one."""
    order = torch.sort(fused, dim=1, descending=True, stable=True).indices
    rank_of = torch.empty_like(order)
    rank_of.scatter_(1, order, torch.arange(1, order.shape[1] + 1).expand_as(order).contiguous())
    ranks = [rank_of[q, g] for q, g in enumerate(gold)]
    return {"recall@5": sum(float((r <= 5).float().mean()) for r in ranks) / len(ranks),
            "recall@1": sum(float((r <= 1).float().mean()) for r in ranks) / len(ranks),
            "mrr": sum(float(1.0 / r.min().float()) for r in ranks) / len(ranks)}


def sweep(a: torch.Tensor, b: torch.Tensor, gold: list[list[int]]) -> dict[str, list[dict]]:
    allowed = torch.ones(a.shape[1], dtype=torch.bool)
    return {m: [{"alpha": al, **scores_of(fuse(a, b, allowed, al, m), gold)} for al in ALPHAS] for m in METHODS}


def choose(curve: list[dict]) -> float:
    best = max(curve, key=lambda r: (round(r["recall@5"], 6), round(r["mrr"], 6), -abs(r["alpha"] - 0.5)))
    return best["alpha"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--questions", type=int, default=100, help="questions per source")
    p.add_argument("--distractors", type=int, default=100, help="non-gold passages per source")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", default=None, help="keep the msa bank and MiniLM embeddings here")
    p.add_argument("--dev-set", help="a dev retrieval set (corpus.jsonl, queries.jsonl) instead of the NQ/SelQA split")
    p.add_argument("--out", default=str(ROOT / "results/fusion/alpha_dev.json"))
    args = p.parse_args()
    if args.dev_set:
        from msa_integrations.compare.dataset import load_dataset

        data = load_dataset(args.dev_set)
        corpus, pairs = list(data.corpus), [(q.question, list(q.gold_ids)) for q in data.queries]
        split = {"dev_set": args.dev_set, "questions": len(pairs), "passages": len(corpus)}
    else:
        corpus, single = dev_split(args.questions, args.distractors, args.seed)
        pairs = [(q, [g]) for q, g in single]
        split = {"sources": list(SOURCES), "questions_per_source": args.questions,
                 "distractors_per_source": args.distractors, "seed": args.seed, "questions": len(pairs),
                 "passages": len(corpus), "why": "Wikipedia QA sources held out of the default router's training"}
    questions = [q for q, _ in pairs]
    col = {d.id: i for i, d in enumerate(corpus)}
    gold = [[col[g] for g in gs] for _, gs in pairs]
    started = time.perf_counter()
    latent, lexical = msa_sides(corpus, questions, args.cache)
    dense = DenseFaiss(cache_dir=args.cache, show_progress=False)
    dense.index(corpus)
    bm25 = BM25()
    bm25.index(corpus)
    lex = bm25.all_scores(questions)
    assert torch.allclose(lex, lexical, atol=1e-4), "the bank's BM25 and the bm25 retriever differ"
    result = {
        "split": split,
        "rule": "best recall@5 under min-max, ties by MRR, then alpha closest to 0.5",
        "msa+bm25": sweep(latent, lexical, gold),
        "minilm+bm25": sweep(dense.all_scores(questions), lex, gold),
        "seconds": round(time.perf_counter() - started, 1),
        "machine": {"platform": platform.platform(), "torch": torch.__version__},
    }
    result["chosen"] = {name: choose(result[name]["minmax"]) for name in ("msa+bm25", "minilm+bm25")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    for name in ("msa+bm25", "minilm+bm25"):
        curve = {r["alpha"]: r["recall@5"] for r in result[name]["minmax"]}
        print(name, "chosen alpha", result["chosen"][name], "recall@5 by alpha", curve)


if __name__ == "__main__":
    main()
