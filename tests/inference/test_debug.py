"""debug.trace: every key the issue lists, consistent with the bank, the routing and generation."""

from __future__ import annotations

import math

import pytest
import torch

from msa_core import MSAModel
from msa_core.inference.debug import trace

DOCS = ["The lighthouse of Velmora was built in 1887 by the engineer Ada Quist.",
        "Ferries leave the harbour every morning at seven and return at dusk.",
        "Paris is the capital of France.",
        "x"]
QUESTION = "Who built the lighthouse?"


@pytest.mark.parametrize("decouple,aux", [(True, "INFONCE_DECOUPLE"), (True, "INFONCE"), (False, "INFONCE_DECOUPLE")])
def test_trace_keys_shapes_and_consistency(tiny_msa_dir, decouple, aux):
    model = MSAModel.from_pretrained(tiny_msa_dir(decouple=decouple, aux=aux), device="cpu")
    t = trace(model, DOCS, QUESTION, max_new_tokens=8)
    a = model.backbone.args
    chunks = sum(math.ceil(len(ids) / 4) for ids in t["document_token_ids"])
    for layer in model.layers:
        for name in ("k_bar", "v_bar", "kr_bar"):
            assert t[f"layers.{layer}.{name}"].shape == (a.kv_heads, chunks, a.head_dim)
        chunk_doc = t[f"layers.{layer}.chunk_doc"]
        assert chunk_doc.tolist() == sorted(chunk_doc.tolist()) and chunk_doc.max().item() == 3
        scores, selected = t[f"layers.{layer}.doc_scores"], t[f"layers.{layer}.selected"]
        assert scores.shape == (4,) and selected.tolist() == torch.topk(scores, 2).indices.tolist()
        if aux == "INFONCE" and decouple:  # stored as the reference stores R̄: unit vectors
            assert torch.allclose(t[f"layers.{layer}.kr_bar"].norm(dim=-1), torch.ones(a.kv_heads, chunks), atol=1e-5)
        if not decouple:
            assert torch.equal(t[f"layers.{layer}.kr_bar"], t[f"layers.{layer}.k_bar"])
    for layer in range(a.num_layers):
        assert t[f"layers.{layer}.template_k"].shape == (a.kv_heads, 3, a.head_dim)
    assert t["prefill_logits"].shape == (a.vocab_size,) and t["prefill_logits"].dtype == torch.float32
    assert t["query_position_ids"][0].item() == 3 + 2 and len(t["query_position_ids"]) == len(t["query_token_ids"])
    assert t["prompt_token_ids"] == t["template_token_ids"] + t["query_token_ids"]
    assert model.tokenizer(t["prompt"], add_special_tokens=False)["input_ids"] == t["prompt_token_ids"]
    assert t["documents_rendered"][2] == "<|im_start|>[2]. Paris is the capital of France.[2]<|im_end|>"
    assert 1 <= len(t["greedy_tokens"]) <= 8 or t["greedy_tokens"] == []
    assert t["profile"] == "reference" and t["routing_layers"] == [2, 3] and t["top_k"] == 2


def test_trace_greedy_tokens_equal_latent_generation(tiny_msa_dir):
    model = MSAModel.from_pretrained(tiny_msa_dir(), device="cpu")
    t = trace(model, DOCS, QUESTION, max_new_tokens=6)
    bank = model.index(DOCS, ids=[str(i) for i in range(4)])
    answer = model.answer(QUESTION, bank, max_new_tokens=6)
    assert answer.text == model.tokenizer.decode(t["greedy_tokens"], skip_special_tokens=True)
    assert answer.layer_selections == {layer: [str(d) for d in t[f"layers.{layer}.selected"].tolist()]
                                       for layer in model.layers}


def test_trace_of_a_default_profile_model(tiny_model_dir):
    model = MSAModel.from_pretrained(tiny_model_dir("qwen3"), config={"routing": {"top_k": 2},
                                                                      "encode": {"chunk_size": 4}}, device="cpu")
    t = trace(model, DOCS, QUESTION, max_new_tokens=3)
    assert t["profile"] == "default" and t["template_token_ids"] == []
    assert all(f"layers.{layer}.doc_scores" in t for layer in model.layers)
    assert t["query_position_ids"][0].item() == 2


def test_trace_refuses_split_documents(tiny_msa_dir):
    from msa_core import InvalidInputError

    model = MSAModel.from_pretrained(tiny_msa_dir(), device="cpu", config={"encode": {"max_doc_tokens": 8}})
    with pytest.raises(InvalidInputError, match="split"):
        trace(model, DOCS, QUESTION)
