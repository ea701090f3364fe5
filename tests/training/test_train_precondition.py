"""Preconditioned router training: the fitted maps, folding them into the saved router (same scores on raw
states as the trained router on conditioned ones), and learning from states shaped like a small LM's."""

from __future__ import annotations

import pytest
import torch

from msa_core.config import RoutingConfig
from msa_core.errors import InvalidInputError
from msa_core.routing.projectors import RouterProjectors
from msa_core.training.cache import RaggedStates
from msa_core.training.data import TrainingSet
from msa_core.training.precondition import Preconditioner, condition, fit_map
from msa_core.training.trainer import RouterTrainer, TrainConfig, evaluate, layer_doc_scores

HIDDEN, LAYERS = 48, [1, 3]


def _lm_like(rows: int, seed: int, signal: torch.Tensor | None = None) -> torch.Tensor:
    """States like a small LM's: a shared direction 30x the variation and two dimensions 50x the rest."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(99))
    x = torch.randn(rows, HIDDEN, generator=g) + 30 * shared / shared.norm() * HIDDEN**0.5
    if signal is not None:
        x = x + signal
    x[:, :2] *= 50
    return x


def _ragged(x: torch.Tensor, per_item: int) -> RaggedStates:
    n = x.shape[0] // per_item
    return RaggedStates(x, torch.arange(0, n * per_item + 1, per_item))


@pytest.mark.parametrize("mode", ["standardize", "whiten"])
def test_maps_drop_the_shared_direction_and_equalise_scale(mode):
    x = _lm_like(4000, 0)
    s = fit_map(x, mode)
    y = x @ s.T
    mean_dir = x.mean(0) / x.mean(0).norm()
    assert (s @ mean_dir).norm() < 1e-4 * s.norm()  # the shared direction is gone
    std = (y - y.mean(0)).std(0)
    assert std.max() / std.median() < 2.0  # raw: the two big dimensions are ~50x the median
    if mode == "whiten":
        cov = torch.cov(y.T)
        assert torch.linalg.eigvalsh(cov).max() < 1.05


def test_none_is_the_identity_and_bad_input_is_a_clear_error():
    x = _lm_like(10, 0)
    assert torch.equal(fit_map(x, "none"), torch.eye(HIDDEN))
    with pytest.raises(InvalidInputError, match="precondition must be one of"):
        fit_map(x, "pca")
    with pytest.raises(InvalidInputError, match="at least two states"):
        fit_map(x[:1], "standardize")


@pytest.mark.parametrize("mode", ["none", "standardize", "whiten"])
def test_folded_router_scores_raw_states_like_the_trained_router_scores_conditioned_ones(mode):
    q = RaggedStates(torch.stack([_lm_like(60, 1), _lm_like(60, 2)], dim=1), torch.tensor([0, 20, 45, 60]))
    d = RaggedStates(torch.stack([_lm_like(30, 3), _lm_like(30, 4)], dim=1), torch.tensor([0, 4, 11, 20, 30]))
    pre = Preconditioner.fit(q, d, LAYERS, mode)
    cq, cd = RaggedStates(q.x.clone(), q.offsets), RaggedStates(d.x.clone(), d.offsets)
    pre.apply(cq, LAYERS, "q")
    pre.apply(cd, LAYERS, "k")
    trained = RouterProjectors.random(LAYERS, HIDDEN, 4, 2, 8, std=0.3, seed=5)
    saved = trained.copy()
    pre.fold(saved)
    cfg = RoutingConfig()
    d_raw, owner = d.flat(range(len(d)))
    d_cond, _ = cd.flat(range(len(d)))
    q_raw, mask = q.padded(range(len(q)))
    q_cond, _ = cq.padded(range(len(q)))
    for li, layer in enumerate(LAYERS):
        want = layer_doc_scores(trained, layer, q_cond[:, :, li], mask, d_cond[:, li], owner, len(d), cfg)
        got = layer_doc_scores(saved, layer, q_raw[:, :, li], mask, d_raw[:, li], owner, len(d), cfg)
        torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)


def test_conditioned_start_acts_like_the_original_router_off_the_shared_direction():
    q = RaggedStates(torch.stack([_lm_like(50, 1), _lm_like(50, 2)], dim=1), torch.tensor([0, 50]))
    d = RaggedStates(torch.stack([_lm_like(50, 3), _lm_like(50, 4)], dim=1), torch.tensor([0, 50]))
    pre = Preconditioner.fit(q, d, LAYERS, "standardize")
    original = RouterProjectors.random(LAYERS, HIDDEN, 4, 2, 8, seed=1)
    router = original.copy()
    pre.into_conditioned(router)
    pre.fold(router)  # V S = W S^+ S: W with the dropped (shared) direction projected out
    for layer in LAYERS:
        x = d.x[:5, LAYERS.index(layer)]
        u = d.x[:, LAYERS.index(layer)].mean(0)
        u = u / u.norm()
        off_shared = x - (x @ u)[:, None] * u
        torch.testing.assert_close(router.project_keys(layer, x), original.project_keys(layer, off_shared),
                                   atol=1e-3, rtol=1e-3)


def _needle_task(n_docs: int, seed: int):
    """Each document carries one of n_docs random signal directions in 3 of its 4 chunks; its question
    carries the same direction on one token among noise tokens. LM-like shared direction and big dims."""
    g = torch.Generator().manual_seed(seed)
    signals = torch.randn(n_docs, HIDDEN, generator=g) * 1.5
    signals[:, :2] = 0  # in the ordinary dimensions only
    doc_rows, q_rows = [], []
    for i in range(n_docs):
        chunks = _lm_like(4, seed * 1000 + i)
        chunks[:3] += signals[i]
        doc_rows.append(chunks)
        tokens = _lm_like(6, seed * 1000 + n_docs + i)
        tokens[2] += signals[i]
        q_rows.append(tokens)
    d = torch.cat(doc_rows)[:, None].expand(-1, 1, -1).contiguous()
    q = torch.cat(q_rows)[:, None].expand(-1, 1, -1).contiguous()
    return _ragged(q, 6), _ragged(d, 4)


def test_training_on_conditioned_states_learns_an_lm_like_task():
    n = 64
    tq, td = _needle_task(n, 0)
    train = TrainingSet(documents=[f"d{i}" for i in range(n)], queries=[f"q{i}" for i in range(n)],
                        positives=[[i] for i in range(n)], given_negatives=[[] for _ in range(n)],
                        sources=["synthetic"] * n)
    results = {}
    for mode in ("none", "standardize"):
        q, d = RaggedStates(tq.x.clone(), tq.offsets), RaggedStates(td.x.clone(), td.offsets)
        router = RouterProjectors.random([0], HIDDEN, 4, 2, 8, seed=0)
        condition(router, [0], mode, [q], [d])
        config = TrainConfig(steps=60, batch_size=32, lr=1e-2, warmup_steps=5, heldout_fraction=0.0,
                             bm25_depth=0, hard_negatives=0, mine_at=[], precondition=mode)
        RouterTrainer(router, [0], train, q, d, None, None, None, config, RoutingConfig()).run()
        results[mode] = evaluate(router, [0], q, d, train.positives, RoutingConfig())["recall@5"]
    assert results["standardize"] > 0.9, results
    assert results["standardize"] > results["none"] + 0.2, results
