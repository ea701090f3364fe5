"""The default model's behaviour on the demo corpus is pinned: retrieval (ids and scores) and greedy answers
in latent, hybrid and (reference profile) interleave mode, as recorded by `python tests/pins.py` on msa 0.3.0
before the layout change (tests/data/demo_pins.json). A refactor must not move them. Re-recorded on purpose when
router v10 shipped and again when v11 shipped (new routing projectors: rankings moved; with v11 the gold documents
stay at rank 1, and the first question's 12-token hybrid answers changed because their prompts hold a different
third document; at 48 tokens the default profile's answer still names the keeper) and again when v14 shipped (routing keys pooled
over 32 tokens: gold documents still at rank 1; at 48 tokens the first hybrid answer no longer names the keeper,
benchmarks/results/router_training/v14_plan.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
PINNED = json.loads((Path(__file__).parent / "data" / "demo_pins.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def now() -> dict:
    from pins import all_pins

    return all_pins()


@pytest.mark.parametrize("profile", ["default", "reference"])
def test_retrieval_is_pinned(now, profile):
    for got, want in zip(now[profile]["retrieve"], PINNED[profile]["retrieve"], strict=True):
        assert [d for d, _ in got] == [d for d, _ in want]
        assert [s for _, s in got] == pytest.approx([s for _, s in want], abs=1e-4)


@pytest.mark.parametrize("profile", ["default", "reference"])
def test_answers_are_pinned(now, profile):
    assert now[profile]["answers"] == PINNED[profile]["answers"]
