"""retrieve's query forward over the question tokens alone, behind the cached K/V of the template's head
(inference/question_head.py), against the same forward over the whole prompts (tiny random models, fp32)."""

from __future__ import annotations

import pytest
import torch

from msa_core import MSAConfig, MSAModel
from msa_core.inference.generate import build_prompt, engine_for

from cpu_corpus import CFG, DOCS, QUESTIONS


def load(tiny_model_dir, family: str = "qwen3", cfg: MSAConfig = CFG) -> MSAModel:
    return MSAModel.from_pretrained(tiny_model_dir(family), config=cfg, device="cpu", dtype=torch.float32)


def scores(model: MSAModel, bank, question: str) -> dict[str, float]:
    return {h.id: h.score for h in model.retrieve(question, bank, k=len(DOCS))}


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_cached_prompt_head_gives_the_whole_prompts_scores(tiny_model_dir, family, monkeypatch):
    model = load(tiny_model_dir, family)
    bank = model.index(list(DOCS.values()), ids=list(DOCS))
    allowed = bank.row_mask(None)
    heads = engine_for(model.backbone).question_heads
    prompt = build_prompt(model.tokenizer, QUESTIONS[0])
    assert prompt.routing[0] is False and prompt.routing[-1] is False  # a head and a tail to skip
    fast = model._route_scores(QUESTIONS, bank, allowed)  # head from the cache, template tail skipped
    again = model._route_scores(QUESTIONS, bank, allowed)  # a cache hit
    assert len(heads) == 1
    # the same query forward over the whole left-padded prompts
    monkeypatch.setattr(heads, "enabled", False)
    slow = model._route_scores(QUESTIONS, bank, allowed)
    torch.testing.assert_close(fast, slow, rtol=0, atol=2e-6)
    torch.testing.assert_close(again, fast, rtol=0, atol=0)
    monkeypatch.undo()
    for q in QUESTIONS:  # one at a time equals the batch
        torch.testing.assert_close(model._route_scores([q], bank, allowed)[:, 0], fast[:, QUESTIONS.index(q)],
                                   rtol=0, atol=2e-6)


def test_the_head_cache_follows_weight_changes(tiny_model_dir):
    model = load(tiny_model_dir)
    bank = model.index(list(DOCS.values()), ids=list(DOCS))
    before = scores(model, bank, QUESTIONS[0])
    with torch.no_grad():  # an in-place update, as training makes: the cached head K/V must not be reused
        model.backbone.layers[0].mlp.down_proj.weight.mul_(3.0)
    fresh = load(tiny_model_dir)
    with torch.no_grad():
        fresh.backbone.layers[0].mlp.down_proj.weight.mul_(3.0)
    after = scores(model, bank, QUESTIONS[0])
    assert after != pytest.approx(before, abs=1e-4)
    assert after == pytest.approx(scores(fresh, bank, QUESTIONS[0]), abs=2e-6)


def test_prompts_without_a_shared_head_run_whole(tiny_model_dir):
    model = load(tiny_model_dir)
    heads = engine_for(model.backbone).question_heads
    a = build_prompt(model.tokenizer, QUESTIONS[0])
    b = build_prompt(model.tokenizer, QUESTIONS[1], system="Another system prompt.")
    prompts, offset, head = heads.split(model.backbone, [a, b], 7, max(model.layers))
    assert (prompts, offset, head) == ([a, b], 7, None) and len(heads) == 0
    bodies, offset, head = heads.split(model.backbone, [a], 7, max(model.layers))
    first = a.routing.index(True)
    assert bodies[0].ids == [t for t, r in zip(a.ids, a.routing) if r] and offset == 7 + first
    assert len(head.k) == max(model.layers) and head.k[0].shape[2] == first  # layers below the last routing one


def test_retrieve_with_memory_still_runs_the_whole_prompt(tiny_model_dir):
    cfg = CFG.model_copy(update={"routing": CFG.routing.model_copy(update={"retrieve_with_memory": True})})
    model = load(tiny_model_dir, cfg=cfg)
    bank = model.index(list(DOCS.values()), ids=list(DOCS))
    assert len(model.retrieve(QUESTIONS[0], bank, k=3)) == 3
    assert len(engine_for(model.backbone).question_heads) == 0  # the head attends to memory there: no cache
