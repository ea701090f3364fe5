"""Tests of msa_core.router: scoring parity with a naive loop, top-k, projectors and persistence."""

from __future__ import annotations

import itertools
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from msa_core.errors import InvalidInputError, ModelLoadError
from msa_core.routing.projectors import RouterProjectors
from msa_core.routing.scores import aggregate_layers, reduce_to_docs, relevance, score_chunks, select_top_k

B, T, H, HKV, D, C = 3, 5, 4, 2, 8, 7
N_DOCS = 5
# Docs 2 and 4 own no chunk; doc 1's chunks are not contiguous.
CHUNK_DOC = torch.tensor([0, 0, 1, 3, 3, 3, 1])
# Row 0 full, row 1 left-padded, row 2 has a hole and a masked tail ("last" = index 3).
MASK = torch.tensor(
    [
        [True, True, True, True, True],
        [False, False, True, True, True],
        [True, False, True, True, False],
    ]
)


# ---------------------------------------------------------------------------------------------
# Naive references: plain Python loops over b, t, h, c.
# ---------------------------------------------------------------------------------------------


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b))


def _unit(a: list[float]) -> list[float]:
    n = math.sqrt(_dot(a, a))
    return [x / max(n, 1e-12) for x in a]


def naive_score_chunks(q, mask, k, head_reduce, query_reduce, normalization):
    b_, t_, h_, d_ = q.shape
    c_, hkv_, _ = k.shape
    group = h_ // hkv_
    out = [[0.0] * c_ for _ in range(b_)]
    for b in range(b_):
        tokens = [t for t in range(t_) if mask[b, t]]
        if query_reduce == "last":
            tokens = [max(tokens)]
        for c in range(c_):
            per_token = []
            for t in tokens:
                per_head = []
                for h in range(h_):
                    qv, kv = q[b, t, h].tolist(), k[c, h // group].tolist()
                    if normalization == "cosine":
                        per_head.append(_dot(_unit(qv), _unit(kv)))
                    else:
                        per_head.append(_dot(qv, kv) / math.sqrt(d_))
                per_token.append(sum(per_head) / h_ if head_reduce == "mean" else max(per_head))
            out[b][c] = sum(per_token) / len(per_token) if query_reduce == "mean" else max(per_token)
    return torch.tensor(out, dtype=torch.float32)


def naive_reduce_to_docs(chunk_scores, chunk_doc, num_docs, chunk_reduce):
    out = torch.full((chunk_scores.shape[0], num_docs), float("-inf"))
    for b in range(chunk_scores.shape[0]):
        for d in range(num_docs):
            vals = [chunk_scores[b, c].item() for c in range(len(chunk_doc)) if chunk_doc[c] == d]
            if vals:
                out[b, d] = max(vals) if chunk_reduce == "max" else sum(vals) / len(vals)
    return out


def _inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=g)
    k = torch.randn(C, HKV, D, generator=g) * 3.0  # not unit length: normalisation matters
    return q, k


# ---------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "head_reduce,query_reduce,normalization,chunk_reduce",
    list(itertools.product(["mean", "max"], ["max", "mean", "last"], ["cosine", "scaled_dot"], ["max", "mean"])),
)
def test_scores_match_naive_loop(head_reduce, query_reduce, normalization, chunk_reduce):
    q, k = _inputs()
    got = score_chunks(
        q, MASK, k, head_reduce=head_reduce, query_reduce=query_reduce, normalization=normalization, chunk_block=3
    )
    want = naive_score_chunks(q, MASK, k, head_reduce, query_reduce, normalization)
    assert got.dtype == torch.float32 and got.shape == (B, C)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

    docs = reduce_to_docs(got, CHUNK_DOC, N_DOCS, chunk_reduce=chunk_reduce)
    want_docs = naive_reduce_to_docs(want, CHUNK_DOC, N_DOCS, chunk_reduce)
    torch.testing.assert_close(docs, want_docs, atol=1e-5, rtol=1e-5)
    assert torch.isneginf(docs[:, [2, 4]]).all()


@pytest.mark.parametrize("chunk_block", [1, 2, 3, 7, 100])
def test_blocking_does_not_change_scores(chunk_block):
    q, k = _inputs(1)
    kw = dict(head_reduce="max", query_reduce="mean", normalization="cosine")
    ref = score_chunks(q, MASK, k, chunk_block=16384, **kw)
    torch.testing.assert_close(score_chunks(q, MASK, k, chunk_block=chunk_block, **kw), ref, atol=1e-6, rtol=1e-6)


def test_padding_values_are_ignored():
    q, k = _inputs(2)
    q2 = q.clone()
    q2[~MASK] = 1e6  # garbage in padded slots must not leak into any reduction
    for qr, hr in itertools.product(["max", "mean", "last"], ["mean", "max"]):
        kw = dict(head_reduce=hr, query_reduce=qr, normalization="scaled_dot")
        torch.testing.assert_close(score_chunks(q2, MASK, k, **kw), score_chunks(q, MASK, k, **kw))


def test_cosine_scores_lie_in_unit_interval():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 6, 4, 16, generator=g) * 100
    k = torch.randn(50, 2, 16, generator=g) * 0.01
    mask = torch.ones(2, 6, dtype=torch.bool)
    for hr, qr in itertools.product(["mean", "max"], ["max", "mean", "last"]):
        s = score_chunks(q, mask, k, head_reduce=hr, query_reduce=qr, normalization="cosine")
        assert s.min() >= -1.0 - 1e-6 and s.max() <= 1.0 + 1e-6
    # Identical directions score 1 whatever the lengths.
    v = torch.randn(16, generator=g)
    same = score_chunks(v.expand(1, 1, 2, 16) * 5.0, torch.ones(1, 1, dtype=torch.bool), v.expand(1, 2, 16),
                        head_reduce="mean", query_reduce="max", normalization="cosine")
    torch.testing.assert_close(same, torch.ones(1, 1))


def test_zero_vectors_are_safe():
    q = torch.zeros(1, 2, 4, 8)
    k = torch.zeros(3, 2, 8)
    s = score_chunks(q, torch.ones(1, 2, dtype=torch.bool), k, head_reduce="mean", query_reduce="max",
                     normalization="cosine")
    assert torch.equal(s, torch.zeros(1, 3))


def test_low_precision_inputs_give_float32():
    q, k = _inputs()
    kw = dict(head_reduce="mean", query_reduce="max", normalization="cosine")
    s = score_chunks(q.bfloat16(), MASK, k.bfloat16(), **kw)
    assert s.dtype == torch.float32
    torch.testing.assert_close(s, score_chunks(q, MASK, k, **kw), atol=0.05, rtol=0)


def test_score_errors():
    q, k = _inputs()
    kw = dict(head_reduce="mean", query_reduce="max", normalization="cosine")
    bad_mask = MASK.clone()
    bad_mask[1] = False
    with pytest.raises(InvalidInputError, match="rows \\[1\\]"):
        score_chunks(q, bad_mask, k, **kw)
    with pytest.raises(InvalidInputError):
        score_chunks(q, MASK.int(), k, **kw)
    with pytest.raises(InvalidInputError):
        score_chunks(q, MASK, torch.randn(C, 3, D), **kw)  # 4 heads not a multiple of 3
    with pytest.raises(InvalidInputError):
        score_chunks(q, MASK, k, head_reduce="sum", query_reduce="max", normalization="cosine")
    with pytest.raises(InvalidInputError):
        score_chunks(q, MASK, k, chunk_block=0, **kw)


def test_empty_bank():
    q, _ = _inputs()
    s = score_chunks(q, MASK, torch.zeros(0, HKV, D), head_reduce="mean", query_reduce="max", normalization="cosine")
    assert s.shape == (B, 0)
    docs = reduce_to_docs(s, torch.zeros(0, dtype=torch.long), 2, chunk_reduce="mean")
    assert docs.shape == (B, 2) and torch.isneginf(docs).all()


def test_reduce_to_docs_rejects_bad_map():
    with pytest.raises(InvalidInputError):
        reduce_to_docs(torch.zeros(1, 3), torch.tensor([0, 1, 5]), 3, chunk_reduce="max")
    with pytest.raises(InvalidInputError):
        reduce_to_docs(torch.zeros(1, 3), torch.tensor([0, 1]), 3, chunk_reduce="max")


# ---------------------------------------------------------------------------------------------
# Top-k, layer aggregation, relevance
# ---------------------------------------------------------------------------------------------


def test_select_top_k_orders_by_score():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.7], [0.4, 0.3, 0.2, 0.1]])
    values, indices = select_top_k(scores, 2)
    assert indices.tolist() == [[1, 3], [0, 1]]
    assert torch.equal(values, torch.tensor([[0.9, 0.7], [0.4, 0.3]]))


def test_select_top_k_filters():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.7], [0.4, 0.3, 0.2, 0.1]])
    _, idx = select_top_k(scores, 2, torch.tensor([True, False, True, True]))
    assert idx.tolist() == [[3, 2], [0, 2]]
    per_row = torch.tensor([[True, True, False, False], [False, False, True, True]])
    values, idx = select_top_k(scores, 2, per_row)
    assert idx.tolist() == [[1, 0], [2, 3]]
    assert torch.equal(values, scores.gather(1, idx))


def test_select_top_k_k_larger_than_allowed():
    scores = torch.tensor([[float("-inf"), 0.2, float("-inf"), 0.1]])
    allowed = torch.tensor([True, False, False, True])
    values, idx = select_top_k(scores, 10, allowed)
    assert idx.tolist() == [[3, 0]]  # disallowed doc 2 never chosen, even tied at -inf with doc 0
    assert values[0, 0] == 0.1 and torch.isneginf(values[0, 1])
    # Per-row filters: k_eff is the smallest allowed count, so every row holds real documents.
    per_row = torch.tensor([[True, True, True, False], [False, True, False, False]])
    _, idx = select_top_k(torch.zeros(2, 4), 3, per_row)
    assert idx.shape == (2, 1) and idx.tolist() == [[0], [1]]


def test_select_top_k_nothing_allowed_gives_empty():
    values, idx = select_top_k(torch.rand(2, 4), 3, torch.zeros(4, dtype=torch.bool))
    assert values.shape == (2, 0) and idx.shape == (2, 0) and idx.dtype == torch.long


def test_select_top_k_ties_prefer_lower_index():
    scores = torch.tensor([[0.5, 0.7, 0.5, 0.7, 0.5]])
    _, idx = select_top_k(scores, 5)
    assert idx.tolist() == [[1, 3, 0, 2, 4]]


@pytest.mark.parametrize("k", [0, -1])
def test_select_top_k_rejects_non_positive_k(k):
    with pytest.raises(InvalidInputError):
        select_top_k(torch.rand(1, 3), k)


def test_select_top_k_rejects_bad_filter_and_nan():
    with pytest.raises(InvalidInputError):
        select_top_k(torch.rand(2, 3), 1, torch.ones(3))  # not bool
    with pytest.raises(InvalidInputError):
        select_top_k(torch.rand(2, 3), 1, torch.ones(4, dtype=torch.bool))
    with pytest.raises(InvalidInputError):
        select_top_k(torch.tensor([[0.1, float("nan")]]), 1)


def test_aggregate_layers():
    s = torch.tensor([[[0.0, 1.0]], [[0.5, -1.0]]])  # [L=2, B=1, N=2]
    assert torch.equal(aggregate_layers(s, "mean"), torch.tensor([[0.25, 0.0]]))
    assert torch.equal(aggregate_layers(s, "max"), torch.tensor([[0.5, 1.0]]))
    with pytest.raises(InvalidInputError):
        aggregate_layers(s, "sum")
    with pytest.raises(InvalidInputError):
        aggregate_layers(torch.zeros(0, 1, 2), "mean")


def test_relevance():
    s = torch.tensor([-1.0, 0.0, 1.0, 1.0000001, float("-inf")])
    torch.testing.assert_close(relevance(s, "cosine"), torch.tensor([0.0, 0.5, 1.0, 1.0, 0.0]))
    torch.testing.assert_close(relevance(torch.tensor([0.0, float("-inf")]), "scaled_dot"), torch.tensor([0.5, 0.0]))


# ---------------------------------------------------------------------------------------------
# Projectors and persistence
# ---------------------------------------------------------------------------------------------

HIDDEN = 16


def _router(seed: int = 0) -> RouterProjectors:
    return RouterProjectors.random([3, 2], HIDDEN, H, HKV, D, std=0.2, seed=seed)


def test_native_init_copies_attention_weights():
    g = torch.Generator().manual_seed(0)
    attn = {i: (torch.randn(H * D, HIDDEN, generator=g), torch.randn(HKV * D, HIDDEN, generator=g)) for i in (2, 3)}
    r = RouterProjectors.native(attn, H, HKV, D)
    assert r.layers == [2, 3] and r.init_mode == "native" and r.hidden == HIDDEN
    for i, (wq, wk) in attn.items():
        assert torch.equal(r.q_weight(i), wq) and torch.equal(r.k_weight(i), wk)
    before = attn[2][0].clone()
    attn[2][0].add_(1.0)  # a copy, not a view of the backbone's weights
    assert torch.equal(r.q_weight(2), before)


def test_projections_shape_and_values():
    r = _router()
    x = torch.randn(2, 5, HIDDEN)
    q = r.project_queries(3, x)
    k = r.project_keys(3, x)
    assert q.shape == (2, 5, H, D) and k.shape == (2, 5, HKV, D)
    torch.testing.assert_close(q, (x @ r.q_weight(3).T).view(2, 5, H, D))
    torch.testing.assert_close(k, (x @ r.k_weight(3).T).view(2, 5, HKV, D))
    with pytest.raises(InvalidInputError):
        r.project_queries(0, x)


def test_random_init_is_deterministic():
    a, b, c = _router(0), _router(0), _router(1)
    assert a.layers == [2, 3]
    for i in a.layers:
        assert torch.equal(a.q_weight(i), b.q_weight(i)) and torch.equal(a.k_weight(i), b.k_weight(i))
    assert not torch.equal(a.q_weight(2), c.q_weight(2))
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
    big = RouterProjectors.random([0], 256, 4, 2, 32, std=0.02, seed=0)
    assert abs(big.q_weight(0).std().item() - 0.02) < 0.002


def test_state_dict_names_and_round_trip():
    r = _router()
    sd = r.state_dict_msa()
    assert sorted(sd) == sorted(
        f"model.layers.{i}.self_attn.router_{p}_proj.0.weight" for i in (2, 3) for p in ("q", "k")
    )
    assert sd["model.layers.2.self_attn.router_q_proj.0.weight"].shape == (H * D, HIDDEN)
    assert sd["model.layers.2.self_attn.router_k_proj.0.weight"].shape == (HKV * D, HIDDEN)
    # Backbone tensors in the same dict are ignored.
    full = {**sd, "model.layers.2.self_attn.q_proj.weight": torch.zeros(1)}
    back = RouterProjectors.from_state_dict_msa(full, H, HKV, D)
    assert back.fingerprint() == r.fingerprint()
    with pytest.raises(ModelLoadError):
        RouterProjectors.from_state_dict_msa({"model.layers.2.self_attn.router_q_proj.0.weight": sd[
            "model.layers.2.self_attn.router_q_proj.0.weight"]}, H, HKV, D)
    with pytest.raises(ModelLoadError):
        RouterProjectors.from_state_dict_msa(sd, H, HKV, D * 2)


def test_save_load_round_trip(tmp_path: Path):
    from safetensors import safe_open

    r = _router()
    path = tmp_path / "router.safetensors"
    r.save(path, backbone_fingerprint="bb123", extra={"steps": 10})
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        assert sorted(f.keys()) == sorted(r.state_dict_msa())
    assert meta["format"] == "msa-router" and meta["version"] == "1"
    assert meta["backbone_fingerprint"] == "bb123" and meta["init_mode"] == "random"
    back = RouterProjectors.load(path, expected_backbone_fingerprint="bb123")
    assert back.layers == r.layers and back.init_mode == "random"
    assert back.backbone_fingerprint == "bb123" and back.extra == {"steps": 10}
    for name, t in r.state_dict_msa().items():
        assert torch.equal(back.state_dict_msa()[name], t)
    assert back.fingerprint() == r.fingerprint()
    assert RouterProjectors.load(path).fingerprint() == r.fingerprint()  # no check asked
    assert [p.name for p in tmp_path.iterdir()] == ["router.safetensors"]  # no temp file left


def test_load_errors(tmp_path: Path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        RouterProjectors.load(tmp_path / "missing.safetensors")
    path = tmp_path / "router.safetensors"
    _router().save(path, backbone_fingerprint="bb123")
    with pytest.raises(ModelLoadError, match="another backbone"):
        RouterProjectors.load(path, expected_backbone_fingerprint="other")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00not a safetensors file at all")
    with pytest.raises(ModelLoadError):
        RouterProjectors.load(garbage)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(ModelLoadError):
        RouterProjectors.load(truncated)


def test_load_rejects_foreign_safetensors(tmp_path: Path):
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file(_router().state_dict_msa(), str(path))  # right tensors, no msa metadata
    with pytest.raises(ModelLoadError, match="not an msa router file"):
        RouterProjectors.load(path)


def test_fingerprint_tracks_weights():
    r = _router()
    fp = r.fingerprint()
    assert len(fp) == 16 and int(fp, 16) >= 0
    with torch.no_grad():
        r.k_weight(3)[0, 0] += 1e-3
    assert r.fingerprint() != fp


def test_fingerprint_is_stable_across_processes():
    code = (
        "from msa_core.routing.projectors import RouterProjectors as R;"
        f"print(R.random([3, 2], {HIDDEN}, {H}, {HKV}, {D}, std=0.2, seed=0).fingerprint())"
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == _router().fingerprint()

