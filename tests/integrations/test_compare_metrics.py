"""The harness's metrics on examples computed by hand."""

from __future__ import annotations

import math

import pytest

from msa_integrations.compare.metrics import (
    chance_metrics,
    exact_match,
    hit_at_k,
    latency_summary,
    ndcg_at_k,
    normalize_answer,
    percentile,
    recall_at_k,
    reciprocal_rank,
    retrieval_metrics,
    token_f1,
)

RANKING = ["d3", "g1", "d7", "d2", "g2", "d9"]  # gold documents at ranks 2 and 5
GOLD = {"g1", "g2"}


@pytest.mark.parametrize(("k", "expected"), [(1, 0.0), (2, 0.5), (4, 0.5), (5, 1.0), (10, 1.0)])
def test_recall_at_k(k, expected):
    assert recall_at_k(RANKING, GOLD, k) == expected


@pytest.mark.parametrize(("k", "expected"), [(1, 0.0), (2, 1.0), (10, 1.0)])
def test_hit_at_k(k, expected):
    assert hit_at_k(RANKING, GOLD, k) == expected


def test_ndcg_by_hand():
    # DCG = 1/log2(3) + 1/log2(6) = 0.63093 + 0.38685; ideal (2 gold) = 1/log2(2) + 1/log2(3) = 1.63093
    dcg = 1 / math.log2(3) + 1 / math.log2(6)
    ideal = 1 + 1 / math.log2(3)
    assert ndcg_at_k(RANKING, GOLD, 10) == pytest.approx(dcg / ideal)
    assert ndcg_at_k(RANKING, GOLD, 10) == pytest.approx(0.6241, abs=1e-4)
    assert ndcg_at_k(RANKING, GOLD, 4) == pytest.approx((1 / math.log2(3)) / ideal)  # rank 5 is cut
    assert ndcg_at_k(["g1", "g2", "x"], GOLD, 10) == pytest.approx(1.0)
    assert ndcg_at_k(["x", "y"], GOLD, 10) == 0.0
    # one gold document: the ideal DCG is 1 (only min(|G|, k) ideal ranks count)
    assert ndcg_at_k(["x", "g1"], {"g1"}, 10) == pytest.approx(1 / math.log2(3))


def test_reciprocal_rank():
    assert reciprocal_rank(RANKING, GOLD) == 0.5
    assert reciprocal_rank(["g2"], GOLD) == 1.0
    assert reciprocal_rank(["a", "b", "c"], GOLD) == 0.0


def test_duplicates_in_a_ranking_count_once():
    # a repeated document keeps its slot in the top k but counts once
    assert recall_at_k(["g1", "g1", "g2"], GOLD, 2) == 0.5
    assert recall_at_k(["g1", "g1", "g2"], GOLD, 3) == 1.0
    assert ndcg_at_k(["g1", "g1"], GOLD, 10) == pytest.approx(1 / (1 + 1 / math.log2(3)))
    assert reciprocal_rank(["x", "x", "g1"], GOLD) == pytest.approx(1 / 3)


def test_retrieval_metrics_average_over_questions():
    rankings = [RANKING, ["g3", "x", "y"], ["x", "y", "z"]]
    golds = [GOLD, {"g3"}, {"g4", "g5"}]
    m = retrieval_metrics(rankings, golds, ks=(1, 2, 5), ndcg_k=10)
    assert m["recall@1"] == pytest.approx((0 + 1 + 0) / 3)
    assert m["recall@2"] == pytest.approx((0.5 + 1 + 0) / 3)
    assert m["recall@5"] == pytest.approx((1 + 1 + 0) / 3)
    assert m["hit@1"] == pytest.approx(1 / 3)
    assert m["hit@2"] == pytest.approx(2 / 3)
    assert m["mrr"] == pytest.approx((0.5 + 1 + 0) / 3)
    assert m["ndcg@10"] == pytest.approx((0.6241 + 1 + 0) / 3, abs=1e-4)
    assert list(m) == ["recall@1", "recall@2", "recall@5", "hit@1", "hit@2", "hit@5", "ndcg@10", "mrr"]


def test_metric_errors():
    with pytest.raises(ValueError):
        recall_at_k(["a"], set(), 1)
    with pytest.raises(ValueError):
        retrieval_metrics([["a"]], [{"a"}, {"b"}])
    with pytest.raises(ValueError):
        retrieval_metrics([], [])


def test_chance_by_hand():
    c = chance_metrics(10, [2, 2], ks=(1, 5))
    assert c["recall@1"] == pytest.approx(0.1)
    assert c["recall@5"] == pytest.approx(0.5)
    # P(no gold in 1 draw) = 8/10; P(no gold in 5 draws) = C(8,5)/C(10,5) = 56/252
    assert c["hit@1"] == pytest.approx(0.2)
    assert c["hit@5"] == pytest.approx(1 - 56 / 252)
    assert chance_metrics(3, [1], ks=(5,))["recall@5"] == 1.0


def test_percentiles_interpolate_linearly():
    values = [10.0, 20.0, 30.0, 40.0]
    assert percentile(values, 50) == 25.0  # between 20 and 30
    assert percentile(values, 95) == pytest.approx(38.5)  # position 2.85: 30 + 0.85 * 10
    assert percentile(values, 0) == 10.0 and percentile(values, 100) == 40.0
    assert percentile([7.0], 95) == 7.0
    s = latency_summary([0.010, 0.020, 0.030, 0.040])
    assert s == {"latency_ms_p50": pytest.approx(25.0), "latency_ms_p95": pytest.approx(38.5),
                 "latency_ms_mean": pytest.approx(25.0)}
    with pytest.raises(ValueError):
        percentile([], 50)


def test_squad_normalisation():
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert normalize_answer("An apple, a pear and the plum.") == "apple pear and plum"


def test_exact_match_and_f1_by_hand():
    assert exact_match("the Latin language", "Latin language") == 1.0
    assert exact_match("Latin", ["French", "latin."]) == 1.0
    assert exact_match("Latin is it", "Latin") == 0.0
    # prediction "latin is it" vs gold "latin": 1 common token; P = 1/3, R = 1; F1 = 2PR/(P+R) = 0.5
    assert token_f1("Latin is it", "Latin") == pytest.approx(0.5)
    # "in 1887 by ada quist" vs "ada quist": common 2; P = 2/5 (in, 1887, by, ada, quist), R = 1 -> 4/7
    assert token_f1("In 1887, by Ada Quist.", "Ada Quist") == pytest.approx(4 / 7)
    assert token_f1("yes", "no") == 0.0
    assert token_f1("Paris", ["London", "paris"]) == 1.0  # the best over expected answers
