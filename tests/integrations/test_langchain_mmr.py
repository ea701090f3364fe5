"""msa_core.mmr: pooled routing-key vectors per document and the MMR selection loop.

(Engine code, tested here because it was written for MSAVectorStore.max_marginal_relevance_search.)
"""

from __future__ import annotations

import math

import pytest
import torch

from msa_core import InvalidInputError, MSAConfig, MSAModel
from msa_core.routing.mmr import document_vectors, mmr_select


@pytest.fixture(scope="module")
def bank(tiny_model_dir):
    # max_doc_tokens=8 splits the long document into parts: its vector must pool all of them.
    model = MSAModel.from_pretrained(tiny_model_dir("llama"),
                                     config=MSAConfig(encode={"chunk_size": 4, "max_doc_tokens": 8}))
    long = "The lighthouse of Velmora was built in 1887 by the engineer Ada Quist on the rocks."
    return model.index([long, "Ferries leave at seven.", "Ferries leave at seven.", "Paris is in France."],
                       ids=["long", "ferry", "ferry-copy", "paris"])


def test_one_unit_vector_per_document_pooling_all_parts(bank):
    assert len(bank.parts("long")) > 1
    vecs = document_vectors(bank, ["long", "ferry", "paris"])
    assert vecs.shape == (3, bank.kv_heads * bank.head_dim) and vecs.dtype == torch.float32
    assert torch.allclose(vecs.norm(dim=1), torch.ones(3), atol=1e-5)
    # Reference: mean of K̄_R over every chunk of every part and every layer, per head unit-normed.
    chunks = bank.chunks_of(bank.rows_of(["long"]))
    mean = bank.kr_bar[:, chunks].float().mean(dim=(0, 1))
    ref = torch.cat([h / h.norm() for h in mean]) / math.sqrt(bank.kv_heads)
    assert torch.allclose(vecs[0], ref, atol=1e-5)


def test_identical_texts_have_identical_vectors(bank):
    ferry, copy, paris = document_vectors(bank, ["ferry", "ferry-copy", "paris"])
    assert float(ferry @ copy) == pytest.approx(1.0, abs=1e-5)
    assert float(ferry @ paris) < 1.0 - 1e-4


def test_document_vectors_errors(bank):
    with pytest.raises(InvalidInputError, match="'nope' is not in the bank"):
        document_vectors(bank, ["ferry", "nope"])
    with pytest.raises(InvalidInputError, match="single string"):
        document_vectors(bank, "ferry")
    assert document_vectors(bank, []).shape == (0, bank.kv_heads * bank.head_dim)


def test_mmr_select_trades_relevance_for_diversity():
    a = torch.tensor([1.0, 0.0])
    vecs = torch.stack([a, a, torch.tensor([0.0, 1.0]), torch.tensor([-1.0, 0.0])])  # 0 and 1 are the same
    rel = [0.9, 0.85, 0.6, 0.05]
    assert mmr_select(rel, vecs, 4, lambda_mult=1.0) == [0, 1, 2, 3]  # plain relevance order
    assert mmr_select(rel, vecs, 2, lambda_mult=0.5) == [0, 2]  # the duplicate loses to a new direction
    assert mmr_select(rel, vecs, 2, lambda_mult=0.0) == [0, 3]  # pure diversity: the opposite document
    # By hand, lambda 0.5 (similarities mapped to [0, 1]): step 2 gains are doc1 0.425 - 0.5 = -0.075,
    # doc2 0.3 - 0.25 = 0.05, doc3 0.025 - 0 = 0.025; step 3: doc1 -0.075, doc3 0.025 - 0.25 = -0.225.
    assert mmr_select(rel, vecs, 10) == [0, 2, 1, 3]  # k above n returns all n
    assert mmr_select([], torch.empty(0, 2), 3) == []


def test_mmr_select_errors():
    vecs = torch.eye(2)
    with pytest.raises(InvalidInputError, match="lambda_mult must be in"):
        mmr_select([0.5, 0.4], vecs, 1, lambda_mult=1.5)
    with pytest.raises(InvalidInputError, match="k must be >= 1"):
        mmr_select([0.5, 0.4], vecs, 0)
    with pytest.raises(InvalidInputError, match="one vector"):
        mmr_select([0.5, 0.4, 0.3], vecs, 1)
