"""AnswerBatcher: concurrent greedy calls with equal options meet in one batch; others answer alone."""

from __future__ import annotations

import threading

import pytest

from msa_core.inference.batcher import AnswerBatcher


def _run_threads(batcher, calls):
    results, start = [None] * len(calls), threading.Barrier(len(calls))

    def work(i, question, options):
        start.wait()
        try:
            results[i] = batcher.submit(question, options)
        except Exception as exc:  # noqa: BLE001 - asserted by the tests
            results[i] = exc

    threads = [threading.Thread(target=work, args=(i, *c)) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def _echo(log):
    def run(questions, options):
        log.append((list(questions), dict(options)))
        if "bad" in questions:
            raise ValueError("bad question")
        return [f"{q}:{options.get('k')}" for q in questions]
    return run


def test_concurrent_calls_share_a_batch_and_each_gets_its_own_answer():
    log = []
    batcher = AnswerBatcher(_echo(log), wait_s=0.05)
    results = _run_threads(batcher, [(f"q{i}", {"k": 2}) for i in range(6)])
    assert results == [f"q{i}:2" for i in range(6)]
    assert max(batcher.batches) > 1 and sum(batcher.batches) == 6


def test_different_options_and_sampled_calls_never_share():
    log = []
    batcher = AnswerBatcher(_echo(log), wait_s=0.05)
    calls = [("a", {"k": 1}), ("b", {"k": 2}), ("c", {"k": 1, "temperature": 0.7}),
             ("d", {"k": 1, "temperature": 0.7})]
    results = _run_threads(batcher, calls)
    assert results == ["a:1", "b:2", "c:1", "d:1"]
    asked = dict(calls)
    for questions, options in log:
        assert all(asked[q] == options for q in questions)  # a batch holds calls with the batch's options only
        if options.get("temperature"):
            assert len(questions) == 1  # sampled answers run alone


def test_a_bad_question_fails_alone():
    log = []
    batcher = AnswerBatcher(_echo(log), wait_s=0.05)
    results = _run_threads(batcher, [("ok1", {}), ("bad", {}), ("ok2", {})])
    assert results[0] == "ok1:None" and results[2] == "ok2:None"
    assert isinstance(results[1], ValueError)


def test_max_batch_is_respected_and_a_lone_call_is_not_held_up():
    log = []
    batcher = AnswerBatcher(_echo(log), max_batch=2, wait_s=0.05)
    _run_threads(batcher, [(f"q{i}", {}) for i in range(5)])
    assert max(batcher.batches) <= 2 and sum(batcher.batches) == 5
    assert AnswerBatcher(_echo([]), wait_s=0.0).submit("x", {"k": 3}) == "x:3"
    with pytest.raises(ValueError, match="max_batch"):
        AnswerBatcher(_echo([]), max_batch=0)
