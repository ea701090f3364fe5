"""Confidence intervals and paired significance tests for the A/B harness (scipy.stats).

Every retriever answers the same questions, so each metric is a vector of per-question values
(metrics.per_question_metrics) and two retrievers are compared question by question:

* 95% confidence interval of a mean: percentile bootstrap over questions (`scipy.stats.bootstrap`,
  10,000 resamples, fixed seed, so a report is reproducible).
* Paired test of two retrievers: two-sided randomisation test of the mean per-question difference
  (sign flips of the paired differences, `scipy.stats.permutation_test` with
  permutation_type="samples"; exact when 2^n <= the resamples), the test Smucker, Allan and
  Carterette (CIKM 2007) recommend for IR metrics; the paired t-test's p-value
  (`scipy.stats.ttest_rel`) is reported beside it, and a bootstrap 95% interval of the difference.
* Several comparisons: Holm's step-down correction over every pair of retrievers, per metric;
  "significant" means the corrected p-value is below alpha (0.05).
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

N_RESAMPLES = 10_000
CONFIDENCE = 0.95
ALPHA = 0.05


def _stats() -> Any:
    try:
        from scipy import stats
    except ImportError as e:  # scipy comes with the `compare` extra
        raise ImportError("the A/B statistics need scipy: pip install 'msa-rag[compare]' (or pip install scipy)") from e
    return stats


def _mean(x: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(x, axis=axis)


def bootstrap_ci(values: Sequence[float], *, confidence: float = CONFIDENCE, n_resamples: int = N_RESAMPLES,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean of `values` (questions resampled with replacement)."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise ValueError("no values to bootstrap")
    if np.all(x == x[0]):  # every resample has the same mean
        return float(x[0]), float(x[0])
    res = _stats().bootstrap((x,), _mean, confidence_level=confidence, n_resamples=n_resamples,
                             method="percentile", vectorized=True, rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def paired_test(a: Sequence[float], b: Sequence[float], *, n_resamples: int = N_RESAMPLES,
                seed: int = 0) -> dict[str, Any]:
    """{"diff": mean(a - b), "diff_ci": bootstrap interval, "p_value": randomisation test, "p_ttest"}."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape or x.size == 0:
        raise ValueError(f"paired values need the same questions: got {x.size} and {y.size} values")
    stats = _stats()
    d = x - y
    if np.all(d == 0):
        return {"diff": 0.0, "diff_ci": [0.0, 0.0], "p_value": 1.0, "p_ttest": 1.0}
    perm = stats.permutation_test((x, y), lambda u, v, axis: np.mean(u - v, axis=axis), vectorized=True,
                                  permutation_type="samples", n_resamples=n_resamples, alternative="two-sided",
                                  rng=np.random.default_rng(seed))
    with warnings.catch_warnings():  # constant non-zero differences: t is infinite, p is 0 (correct)
        warnings.simplefilter("ignore", RuntimeWarning)
        p_t = float(stats.ttest_rel(x, y).pvalue)
    return {"diff": float(d.mean()), "diff_ci": list(bootstrap_ci(d, n_resamples=n_resamples, seed=seed)),
            "p_value": float(perm.pvalue), "p_ttest": 0.0 if np.isnan(p_t) else p_t}


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (step-down, monotone, capped at 1), in the input order."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted = [0.0] * len(p_values)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def summarize(per_question: Mapping[str, Mapping[str, Sequence[float]]], *, alpha: float = ALPHA,
              n_resamples: int = N_RESAMPLES, seed: int = 0) -> dict[str, Any]:
    """Intervals and paired comparisons of every retriever's per-question metrics.

    per_question: {retriever: {metric: [value per question]}} (same questions, same order).
    Returns {"ci95": {retriever: {metric: [low, high]}}, "comparisons": {metric: [{"a", "b", "diff",
    "diff_ci", "p_value", "p_ttest", "p_holm", "significant"}, ...]}, "method": {...}}.
    """
    names = list(per_question)
    ci = {n: {m: list(bootstrap_ci(v, n_resamples=n_resamples, seed=seed)) for m, v in per_question[n].items()}
          for n in names}
    comparisons: dict[str, list[dict[str, Any]]] = {}
    metrics = list(per_question[names[0]]) if names else []
    for metric in metrics:
        rows = [{"a": a, "b": b, **paired_test(per_question[a][metric], per_question[b][metric],
                                               n_resamples=n_resamples, seed=seed)}
                for a, b in itertools.combinations(names, 2)]
        for row, p in zip(rows, holm([r["p_value"] for r in rows])):
            row["p_holm"] = p
            row["significant"] = p < alpha
        comparisons[metric] = rows
    method = {"ci": f"percentile bootstrap over questions, {n_resamples} resamples, seed {seed}",
              "test": f"two-sided paired randomisation test (sign flips), {n_resamples} resamples; paired t-test "
                      "p beside it", "correction": "Holm over the retriever pairs, per metric", "alpha": alpha,
              "confidence": CONFIDENCE}
    return {"ci95": ci, "comparisons": comparisons, "method": method}
