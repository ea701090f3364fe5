"""A/B statistics (compare/stats.py) and the metrics checked against the IR reference (ir-measures, which
runs trec_eval's code through pytrec_eval)."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest

from msa_integrations.compare import Document, Query, RandomRanking, Settings, compare, write_dataset, write_report
from msa_integrations.compare.dataset import load_dataset
from msa_integrations.compare.metrics import per_question_metrics
from msa_integrations.compare.stats import bootstrap_ci, holm, paired_test, summarize


def _random_runs(seed: int, questions: int = 40, docs: int = 30):
    rng = random.Random(seed)
    ids = [f"d{i}" for i in range(docs)]
    rankings, golds = [], []
    for _ in range(questions):
        rankings.append(rng.sample(ids, rng.randint(5, 20)))  # no repeats, depth varies
        golds.append(set(rng.sample(ids, rng.randint(1, 4))))
    return rankings, golds


def test_metrics_match_trec_eval_through_ir_measures():
    ir_measures = pytest.importorskip("ir_measures")
    from ir_measures import RR, R, Success, nDCG

    rankings, golds = _random_runs(0)
    ours = per_question_metrics(rankings, golds, ks=(1, 2, 5, 10), ndcg_k=10)
    qrels = [ir_measures.Qrel(f"q{i}", d, 1) for i, g in enumerate(golds) for d in g]
    run = [ir_measures.ScoredDoc(f"q{i}", d, float(len(r) - rank)) for i, r in enumerate(rankings)
           for rank, d in enumerate(r)]
    measures = {"ndcg@10": nDCG @ 10, "mrr": RR, **{f"recall@{k}": R @ k for k in (1, 2, 5, 10)},
                **{f"hit@{k}": Success @ k for k in (1, 2, 5, 10)}}
    theirs = {(m.query_id, str(m.measure)): m.value for m in ir_measures.iter_calc(list(measures.values()), qrels, run)}
    checked = 0
    for name, measure in measures.items():
        for i, value in enumerate(ours[name]):
            assert value == pytest.approx(theirs.get((f"q{i}", str(measure)), 0.0), abs=1e-9), (name, i)
            checked += 1
    assert checked == 40 * len(measures)


def test_bootstrap_interval_matches_the_normal_approximation():
    rng = np.random.default_rng(3)
    hits = (rng.random(400) < 0.6).astype(float)
    low, high = bootstrap_ci(hits)
    p, se = hits.mean(), math.sqrt(hits.mean() * (1 - hits.mean()) / hits.size)
    assert low < p < high
    assert low == pytest.approx(p - 1.96 * se, abs=0.01) and high == pytest.approx(p + 1.96 * se, abs=0.01)
    assert bootstrap_ci([1.0, 1.0, 1.0]) == (1.0, 1.0)
    assert bootstrap_ci(hits) == (low, high)  # seeded: a report is reproducible


def test_paired_randomisation_test_exact_and_limits():
    # five questions, each +1 for a: of the 2^5 sign patterns only all-plus and all-minus reach |mean| = 1
    exact = paired_test([1, 1, 1, 1, 1], [0, 0, 0, 0, 0])
    assert exact["diff"] == 1.0 and exact["p_value"] == pytest.approx(2 / 32)
    assert paired_test([0.5, 0.2], [0.5, 0.2]) == {"diff": 0.0, "diff_ci": [0.0, 0.0], "p_value": 1.0, "p_ttest": 1.0}
    rng = np.random.default_rng(0)
    b = rng.random(100)
    clear = paired_test(b + 0.2 + rng.normal(0, 0.05, 100), b)
    assert clear["p_value"] < 1e-3 and clear["p_ttest"] < 1e-3 and clear["diff_ci"][0] > 0.1
    noise = paired_test(b + rng.normal(0, 0.05, 100), b)
    assert noise["p_value"] > 0.01 and noise["diff_ci"][0] < 0 < noise["diff_ci"][1]
    with pytest.raises(ValueError, match="same questions"):
        paired_test([1, 0], [1])


def test_holm_correction():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    assert holm([]) == []


def test_summarize_compares_every_pair():
    per_q = {"a": {"recall@5": [1, 1, 1, 1, 1, 1, 1, 1]}, "b": {"recall@5": [0, 0, 0, 0, 0, 0, 0, 0]},
             "c": {"recall@5": [1, 1, 1, 1, 1, 1, 1, 0]}}
    out = summarize(per_q)
    rows = {(r["a"], r["b"]): r for r in out["comparisons"]["recall@5"]}
    assert set(rows) == {("a", "b"), ("a", "c"), ("b", "c")}
    assert rows[("a", "b")]["p_value"] == pytest.approx(2 / 256) and rows[("a", "b")]["significant"]
    assert rows[("a", "c")]["p_value"] == 1.0 and not rows[("a", "c")]["significant"]
    assert rows[("a", "b")]["p_holm"] == pytest.approx(3 * 2 / 256)
    assert out["ci95"]["a"]["recall@5"] == [1.0, 1.0]


def test_report_carries_intervals_and_tests(tmp_path):
    pytest.importorskip("matplotlib")
    rng = random.Random(0)
    corpus = [Document(f"d{i}", f"passage number {i} about topic {i % 7}", f"title {i}") for i in range(40)]
    queries = [Query(f"q{i}", f"question {i}", (f"d{i}",), None) for i in range(30)]
    data = load_dataset(write_dataset(tmp_path / "ds", corpus, queries))

    class Oracle:
        name = "oracle"

        def index(self, corpus):
            self.ids = [d.id for d in corpus]

        def search(self, questions, k):
            return [[(f"d{q.split()[1]}", 1.0)] + [(d, 0.0) for d in rng.sample(self.ids, k - 1)] for q in questions]

        def size_bytes(self):
            return {"memory": None, "disk": None}

    report = compare([data], [Oracle(), RandomRanking()], Settings(ks=(1, 5), latency_queries=0, progress=False))
    write_report(report, tmp_path / "rep")
    got = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert got["retrievers"]["oracle"]["ci95"]["recall@1"] == [1.0, 1.0]
    low, high = got["retrievers"]["random"]["ci95"]["recall@5"]
    assert low <= got["retrievers"]["random"]["recall@5"] <= high
    (row,) = got["comparisons"]["recall@1"]
    assert (row["a"], row["b"]) == ("oracle", "random") and row["significant"] and row["p_holm"] < 0.001
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "### 95% confidence intervals" in md and "| recall@1 | oracle − random |" in md
    assert "randomisation" in md and "Holm" in md
    write_report(got, tmp_path / "again")  # a report.json re-renders the same markdown
    assert (tmp_path / "again" / "report.md").read_text() == md
