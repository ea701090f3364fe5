"""Routing v2's ColBERT-order scores (query_reduce='colbert') against a loop written from the definition."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from msa_core.config import RoutingConfig
from msa_core.errors import InvalidInputError
from msa_core.routing.scores import document_scores, late_interaction_scores, reduce_to_docs, score_chunks


def _loop_scores(q, mask, k, chunk_doc, n_docs, head_reduce, normalization):
    """For each row and document: mean over valid tokens of (max over the document's chunks of S(t, c))."""
    b, t, h, d = q.shape
    hkv = k.shape[1]
    out = torch.full((b, n_docs), float("-inf"), dtype=torch.float64)
    qn = F.normalize(q.double(), dim=-1) if normalization != "scaled_dot" else q.double()
    kn = F.normalize(k.double(), dim=-1) if normalization != "scaled_dot" else k.double()
    scale = d ** -0.5 if normalization in ("scaled_dot", "scaled_cosine") else 1.0
    for row in range(b):
        tokens = [i for i in range(t) if mask[row, i]]
        for doc in range(n_docs):
            chunks = [c for c in range(k.shape[0]) if chunk_doc[c] == doc]
            if not chunks:
                continue
            total = 0.0
            for i in tokens:
                best = -float("inf")
                for c in chunks:
                    per_head = [float(qn[row, i, hh] @ kn[c, hh // (h // hkv)]) * scale for hh in range(h)]
                    s = sum(per_head) / h if head_reduce == "mean" else max(per_head)
                    best = max(best, s)
                total += best
            out[row, doc] = total / len(tokens)
    return out


@pytest.mark.parametrize("head_reduce", ["mean", "max"])
@pytest.mark.parametrize("normalization", ["cosine", "scaled_dot", "scaled_cosine"])
def test_late_interaction_equals_the_definition(head_reduce, normalization):
    torch.manual_seed(0)
    q, k = torch.randn(3, 5, 4, 8), torch.randn(11, 2, 8)
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.bool)  # left/right pad
    chunk_doc = torch.tensor([0, 0, 1, 2, 2, 2, 4, 1, 0, 4, 4])  # document 3 has no chunk
    got = late_interaction_scores(q, mask, k, chunk_doc, 5, head_reduce=head_reduce, normalization=normalization,
                                  chunk_block=4)  # blocks split documents' chunks apart
    want = _loop_scores(q, mask, k, chunk_doc, 5, head_reduce, normalization)
    assert torch.isinf(got[:, 3]).all() and (got[:, 3] < 0).all()
    keep = [0, 1, 2, 4]
    torch.testing.assert_close(got[:, keep].double(), want[:, keep], atol=1e-5, rtol=1e-5)


def test_every_question_token_votes():
    """Doc A matches one question token exactly; doc B half-matches both. Eq. 2 (max-max) ranks A first, the
    ColBERT order B: the reason for routing v2 (a question naming two things wants the passage with both)."""
    e1, e2 = torch.eye(4)[0], torch.eye(4)[1]
    q = torch.stack([e1, e2]).view(1, 2, 1, 4)
    mask = torch.ones(1, 2, dtype=torch.bool)
    k = torch.stack([e1, F.normalize(e1 + e2, dim=0)]).view(2, 1, 4)  # chunk 0 -> doc A, chunk 1 -> doc B
    chunk_doc = torch.tensor([0, 1])
    kw = dict(head_reduce="mean", chunk_reduce="max", normalization="cosine")
    eq2 = document_scores(q, mask, k, chunk_doc, 2, query_reduce="max", **kw)
    late = document_scores(q, mask, k, chunk_doc, 2, query_reduce="colbert", **kw)
    assert eq2[0, 0] > eq2[0, 1]
    assert late[0, 1] > late[0, 0]


def test_document_scores_is_eq2_for_the_paper_reductions():
    torch.manual_seed(1)
    q, k, mask = torch.randn(2, 4, 4, 8), torch.randn(9, 2, 8), torch.ones(2, 4, dtype=torch.bool)
    chunk_doc = torch.tensor([0, 1, 1, 2, 2, 2, 0, 1, 2])
    for qr in ("max", "mean", "last"):
        want = reduce_to_docs(score_chunks(q, mask, k, head_reduce="mean", query_reduce=qr, normalization="cosine"),
                              chunk_doc, 3, chunk_reduce="max")
        got = document_scores(q, mask, k, chunk_doc, 3, head_reduce="mean", query_reduce=qr, chunk_reduce="max",
                              normalization="cosine")
        assert torch.equal(got, want)


def test_late_interaction_gradients_equal_a_scatter_reference():
    """The loss trains through the in-place slot updates: gradients equal those of a plain scatter-amax."""
    torch.manual_seed(2)
    q = torch.randn(2, 3, 4, 8, dtype=torch.float64)
    k = torch.randn(7, 2, 8, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    chunk_doc = torch.tensor([2, 0, 0, 1, 2, 1, 0])

    def reference(q, k):
        qn = F.normalize(q, dim=-1).unflatten(2, (2, 2)).sum(3)  # head mean: kv groups of 2 heads
        s = torch.einsum("btgd,cgd->btc", qn, F.normalize(k, dim=-1)) / 4
        best = torch.full((2, 3, 3), float("-inf"), dtype=s.dtype).scatter_reduce(
            2, chunk_doc.expand(2, 3, -1), s, reduce="amax", include_self=True)
        return best.masked_fill(~mask.unsqueeze(-1), 0).sum(1) / mask.sum(1, keepdim=True)

    grads = []
    for fn in (reference, lambda q, k: late_interaction_scores(q, mask, k, chunk_doc, 3, head_reduce="mean",
                                                                 normalization="cosine", chunk_block=3)):
        qq, kk = q.clone().requires_grad_(), k.clone().requires_grad_()
        fn(qq, kk).logsumexp(dim=1).sum().backward()
        grads.append((qq.grad, kk.grad))
    assert grads[1][0].abs().sum() > 0 and grads[1][1].abs().sum() > 0
    torch.testing.assert_close(grads[1][0], grads[0][0])
    torch.testing.assert_close(grads[1][1].float(), grads[0][1].float(), atol=1e-6, rtol=1e-5)


def test_bad_inputs_are_clear_errors():
    q, k, mask = torch.randn(1, 2, 4, 8), torch.randn(3, 2, 8), torch.ones(1, 2, dtype=torch.bool)
    with pytest.raises(InvalidInputError, match="document_scores"):
        score_chunks(q, mask, k, head_reduce="mean", query_reduce="colbert", normalization="cosine")
    with pytest.raises(InvalidInputError, match="chunk_doc"):
        late_interaction_scores(q, mask, k, torch.tensor([0, 1]), 2, head_reduce="mean", normalization="cosine")
    with pytest.raises(InvalidInputError, match=r"\[0, 2\)"):
        late_interaction_scores(q, mask, k, torch.tensor([0, 1, 2]), 2, head_reduce="mean", normalization="cosine")
    with pytest.raises(ValueError, match="Eq. 2 only"):
        RoutingConfig(query_reduce="colbert", kernel="triton")
