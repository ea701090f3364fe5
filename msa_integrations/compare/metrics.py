"""Retrieval and answer metrics. Binary relevance: a document is relevant when it is a gold document.

Per question, with G the gold ids and R the ranking (best first; a repeated document keeps its slot
but counts once):

* recall@k  |G ∩ R[:k]| / |G|                                   (then averaged over questions)
* hit@k     1 if G ∩ R[:k] is not empty, else 0
* nDCG@k    Σ_{i ≤ k, R[i] ∈ G} 1/log2(i + 1)  /  Σ_{i ≤ min(|G|, k)} 1/log2(i + 1)   (ranks i from 1)
* MRR       1 / (rank of the first gold document in R), 0 when none is in R (R is as deep as was retrieved)

Latency percentiles interpolate linearly between order statistics (numpy's default). Answers: SQuAD
v1.1's normalisation (lower case, punctuation and the articles a/an/the removed, whitespace collapsed),
exact match and token F1, the best over the expected answers.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Iterable, Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def _gold_ranks(ranking: Sequence[str], gold: set[str], k: int | None = None) -> list[int]:
    """0-based ranks of the first occurrence of each gold document in ranking[:k] (a repeated document
    keeps its slot but counts once)."""
    seen: set[str] = set()
    ranks = []
    for i, doc in enumerate(ranking[:k] if k is not None else ranking):
        if doc in gold and doc not in seen:
            seen.add(doc)
            ranks.append(i)
    return ranks


def _gold_set(gold: Iterable[str]) -> set[str]:
    gold = set(gold)
    if not gold:
        raise ValueError("a question needs at least one gold document")
    return gold


def recall_at_k(ranking: Sequence[str], gold: Iterable[str], k: int) -> float:
    gold = _gold_set(gold)
    return len(_gold_ranks(ranking, gold, k)) / len(gold)


def hit_at_k(ranking: Sequence[str], gold: Iterable[str], k: int) -> float:
    return float(bool(_gold_ranks(ranking, _gold_set(gold), k)))


def ndcg_at_k(ranking: Sequence[str], gold: Iterable[str], k: int = 10) -> float:
    gold = _gold_set(gold)
    dcg = sum(1.0 / math.log2(i + 2) for i in _gold_ranks(ranking, gold, k))
    ideal = sum(1.0 / math.log2(i + 2) for i in range(min(len(gold), k)))
    return dcg / ideal


def reciprocal_rank(ranking: Sequence[str], gold: Iterable[str]) -> float:
    ranks = _gold_ranks(ranking, _gold_set(gold))
    return 1.0 / (ranks[0] + 1) if ranks else 0.0


def per_question_metrics(rankings: Sequence[Sequence[str]], golds: Sequence[Iterable[str]],
                         ks: Sequence[int] = (1, 2, 5, 10), ndcg_k: int = 10) -> dict[str, list[float]]:
    """{"recall@K", "hit@K" for each K, "ndcg@<ndcg_k>", "mrr"}: one value per question, in order
    (what the confidence intervals and paired tests of stats.py resample)."""
    if len(rankings) != len(golds):
        raise ValueError(f"{len(rankings)} rankings for {len(golds)} questions")
    if not rankings:
        raise ValueError("no questions to score")
    golds = [set(g) for g in golds]
    out: dict[str, list[float]] = {}
    for k in ks:
        out[f"recall@{k}"] = [recall_at_k(r, g, k) for r, g in zip(rankings, golds)]
    for k in ks:
        out[f"hit@{k}"] = [hit_at_k(r, g, k) for r, g in zip(rankings, golds)]
    out[f"ndcg@{ndcg_k}"] = [ndcg_at_k(r, g, ndcg_k) for r, g in zip(rankings, golds)]
    out["mrr"] = [reciprocal_rank(r, g) for r, g in zip(rankings, golds)]
    return out


def retrieval_metrics(rankings: Sequence[Sequence[str]], golds: Sequence[Iterable[str]],
                      ks: Sequence[int] = (1, 2, 5, 10), ndcg_k: int = 10) -> dict[str, float]:
    """{"recall@K", "hit@K" for each K, "ndcg@<ndcg_k>", "mrr"}, each averaged over the questions."""
    per_question = per_question_metrics(rankings, golds, ks, ndcg_k)
    return {name: sum(values) / len(values) for name, values in per_question.items()}


def chance_metrics(n_docs: int, gold_sizes: Sequence[int], ks: Sequence[int] = (1, 2, 5, 10)) -> dict[str, float]:
    """Expected recall@k and hit@k of a uniformly random ranking of `n_docs` documents:
    recall@k = min(k, N)/N; hit@k = 1 - C(N-g, k)/C(N, k) for g gold documents."""
    out: dict[str, float] = {}
    n = len(gold_sizes)
    for k in ks:
        out[f"recall@{k}"] = min(k, n_docs) / n_docs
    for k in ks:
        out[f"hit@{k}"] = sum(1.0 - math.comb(n_docs - g, k) / math.comb(n_docs, k) if k <= n_docs else 1.0
                              for g in gold_sizes) / n
    return out


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear interpolation between order statistics (numpy's default)."""
    if not values:
        raise ValueError("no values")
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q}")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def latency_summary(seconds: Sequence[float]) -> dict[str, float]:
    """{"latency_ms_p50", "latency_ms_p95", "latency_ms_mean"} of per-query times in seconds."""
    ms = [1000.0 * s for s in seconds]
    return {"latency_ms_p50": percentile(ms, 50), "latency_ms_p95": percentile(ms, 95),
            "latency_ms_mean": sum(ms) / len(ms)}


# ---- answers (SQuAD v1.1 evaluation script) -------------------------------------------------------


def normalize_answer(text: str) -> str:
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, answers: str | Sequence[str]) -> float:
    answers = [answers] if isinstance(answers, str) else list(answers)
    return float(any(normalize_answer(prediction) == normalize_answer(a) for a in answers))


def token_f1(prediction: str, answers: str | Sequence[str]) -> float:
    answers = [answers] if isinstance(answers, str) else list(answers)
    return max((_f1(prediction, a) for a in answers), default=0.0)


def _f1(prediction: str, answer: str) -> float:
    pred, gold = normalize_answer(prediction).split(), normalize_answer(answer).split()
    common = sum((Counter(pred) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)
