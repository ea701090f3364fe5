"""The reference profile against a hand-written version of spec §2.1-2.4 (template head in every layer,
documents encoded alone and pooled, per-layer top-k, positions from T + k), plus its prompts and
the stable document numbers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from msa_core import InvalidInputError, MSAModel
from msa_core.inference.debug import trace
from msa_core.inference.reference import (
    DOC_INDEX_KEY,
    INSTRUCTION_HEAD,
    INSTRUCTION_TAIL,
    PROMPT_TAIL,
    TEMPLATE_HEAD,
    render_document,
)

DOCS = ["The lighthouse of Velmora was built in 1887 by the engineer Ada Quist.",
        "Ferries leave the harbour every morning at seven and return at dusk.",
        "Paris is the capital of France.",
        "x"]
QUESTION = "Who built the lighthouse?"


@pytest.fixture(scope="module")
def model(tiny_msa_dir) -> MSAModel:
    return MSAModel.from_pretrained(tiny_msa_dir(), device="cpu")


def _capture(bb, ids: list[int]) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """A document (or the template) alone, causal, positions 0..n-1: per layer k, v [kv, n, D], x [n, hidden]."""
    ks, vs, xs = {}, {}, {}

    def cap(layer, x, k, v):
        ks[layer], vs[layer], xs[layer] = k[0], v[0], x[0]

    with torch.no_grad():
        bb(torch.tensor([ids]), torch.arange(len(ids))[None], capture=cap)
    return ks, vs, xs


def _pool(t: torch.Tensor, p: int, dim: int) -> torch.Tensor:
    n = t.shape[dim]
    return torch.stack([t.narrow(dim, s, min(p, n - s)).mean(dim) for s in range(0, n, p)], dim=dim)


def _manual(model: MSAModel, selected: dict[int, list[int]]):
    """Spec §2.1-2.4 written out directly: returns last-position logits and doc scores per layer."""
    bb, p, k = model.backbone, model.config.encode.chunk_size, model.config.routing.top_k
    head = model.tokenizer(TEMPLATE_HEAD, add_special_tokens=False)["input_ids"]
    tk, tv, _ = _capture(bb, head)
    docs = [model.tokenizer(render_document(i, t), add_special_tokens=False)["input_ids"] for i, t in enumerate(DOCS)]
    pooled = []
    for ids in docs:
        dk, dv, dx = _capture(bb, ids)
        pooled.append({layer: (_pool(dk[layer], p, 1), _pool(dv[layer], p, 1), _pool(dx[layer], p, 0))
                       for layer in model.layers})
    route = model.tokenizer(INSTRUCTION_HEAD + QUESTION + INSTRUCTION_TAIL, add_special_tokens=False)["input_ids"]
    tail = model.tokenizer(PROMPT_TAIL, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([route + tail])
    t = ids.shape[1]
    pos = (len(head) + k + torch.arange(t))[None]
    scores = {}
    with torch.no_grad():
        h = bb.embed_tokens(ids)
        cos, sin = bb.rotary(pos, h.dtype)
        for layer, block in enumerate(bb.layers):
            x = block.input_layernorm(h)
            q, kk, vv = block.self_attn.project(x, cos, sin)
            mem_k, mem_v = [tk[layer]], [tv[layer]]
            if layer in model.layers:
                scores[layer] = _scores(model, layer, x[0, : len(route)], pooled)
                for d in sorted(selected[layer]):  # ascending document index
                    mem_k.append(pooled[d][layer][0])
                    mem_v.append(pooled[d][layer][1])
            keys = torch.cat(mem_k + [kk[0]], 1)[None]
            values = torch.cat(mem_v + [vv[0]], 1)[None]
            m = keys.shape[2] - t
            mask = torch.arange(keys.shape[2])[None, :] <= (m + torch.arange(t))[:, None]
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)
            h = h + block.self_attn.o_proj(out.transpose(1, 2).reshape(1, t, -1))
            h = h + block.mlp(block.post_attention_layernorm(h))
        return bb.logits(h[:, -1])[0], scores, pooled, docs


def _scores(model: MSAModel, layer: int, x: torch.Tensor, pooled) -> torch.Tensor:
    """Spec §2.3, scaled_dot with projectors: mean over heads, max over tokens, max over chunks."""
    a = model.backbone.args
    g = a.num_heads // a.kv_heads
    rq = model.router.project_queries(layer, x) / math.sqrt(a.head_dim)  # [t, H, D]
    out = []
    for doc in pooled:
        rk = model.router.project_keys(layer, doc[layer][2])  # [C, Hkv, D]: W_KR mean(x) = mean(W_KR x)
        s = torch.einsum("thd,chd->tch", rq, rk.repeat_interleave(g, dim=1)).mean(-1)  # [t, C]
        out.append(s.max(0).values.max())
    return torch.stack(out)


def test_prefill_matches_the_spec_written_out(model):
    t = trace(model, DOCS, QUESTION, max_new_tokens=2)
    selected = {layer: t[f"layers.{layer}.selected"].tolist() for layer in model.layers}
    logits, scores, pooled, docs = _manual(model, selected)
    assert t["document_token_ids"] == docs
    for layer in model.layers:
        assert torch.allclose(t[f"layers.{layer}.doc_scores"], scores[layer], atol=1e-5)
        top = torch.topk(scores[layer], 2).indices.tolist()
        assert selected[layer] == top
        k_bar = torch.cat([d[layer][0] for d in pooled], 1)
        assert torch.allclose(t[f"layers.{layer}.k_bar"], k_bar, atol=1e-5)
        counts = torch.bincount(t[f"layers.{layer}.chunk_doc"]).tolist()
        assert counts == [math.ceil(len(ids) / 4) for ids in docs]
    assert torch.allclose(t["prefill_logits"], logits, atol=1e-4)
    head = model.reference.head_ids
    assert t["query_position_ids"].tolist() == list(range(len(head) + 2, len(head) + 2 + len(t["query_token_ids"])))


def test_selection_other_than_the_engines_changes_logits(model):
    """The manual check is sensitive to which documents the routing layers attend to."""
    t = trace(model, DOCS, QUESTION, max_new_tokens=1)
    other = {layer: [d for d in range(4) if d not in t[f"layers.{layer}.selected"].tolist()] for layer in model.layers}
    logits, *_ = _manual(model, other)
    assert not torch.allclose(t["prefill_logits"], logits, atol=1e-3)


def test_template_head_is_measured_and_encoded_alone(model):
    prof = model.reference
    assert prof.head_ids == model.tokenizer(TEMPLATE_HEAD, add_special_tokens=False)["input_ids"]
    assert prof.template_length == 3  # <|im_start|> user \n, as with Qwen's tokenizer
    tk, tv, _ = _capture(model.backbone, prof.head_ids)
    tpl = prof.template()
    assert all(torch.equal(tpl.k[i], tk[i]) and torch.equal(tpl.v[i], tv[i]) for i in range(4))
    assert prof.template() is tpl  # computed once


def test_without_a_bank_the_prompt_is_template_then_question(model):
    prof = model.reference
    prompt = prof.question_prompt(QUESTION)
    state = prof.prefill(prompt, None, k=2)
    ids = prof.head_ids + prompt.ids
    with torch.no_grad():
        plain = model.backbone.logits(model.backbone(torch.tensor([ids]), torch.arange(len(ids))[None])[:, -1])
    assert torch.allclose(state.logits, plain, atol=1e-5)
    assert state.positions[0, 0].item() == prof.template_length
    answer = model.answer(QUESTION, None, max_new_tokens=2)
    assert answer.doc_ids == [] and answer.finish_reason in {"length", "eos"}


def test_routing_tokens_are_the_whole_instruction(model):
    prompt = model.reference.question_prompt(QUESTION)
    route = model.tokenizer(INSTRUCTION_HEAD + QUESTION + INSTRUCTION_TAIL, add_special_tokens=False)["input_ids"]
    assert prompt.routing == [True] * len(route) + [False] * (len(prompt.ids) - len(route))
    assert model.tokenizer.decode(prompt.ids[len(route):]) == PROMPT_TAIL
    text = TEMPLATE_HEAD + INSTRUCTION_HEAD + QUESTION + INSTRUCTION_TAIL + PROMPT_TAIL
    # tokenizing the whole prompt at once gives the same ids: every span boundary is a special token
    assert model.tokenizer(text, add_special_tokens=False)["input_ids"] == model.reference.head_ids + prompt.ids


def test_documents_keep_stable_numbers(model):
    bank = model.index(DOCS[:3], ids=["a", "b", "c"])
    number = {r.parent_id: r.metadata[DOC_INDEX_KEY] for r in bank.docstore}
    assert number == {"a": 0, "b": 1, "c": 2}
    model.add(bank, ["Paris is a city on the Seine.", "new"], ids=["b", "d"])  # b replaced: keeps 1
    assert {r.parent_id: r.metadata[DOC_INDEX_KEY] for r in bank.docstore} == {"a": 0, "c": 2, "b": 1, "d": 3}
    bank.delete(["a"])
    model.add(bank, ["again"], ids=["e"])
    assert {r.parent_id: r.metadata[DOC_INDEX_KEY] for r in bank.docstore}["e"] == 4
    model.add(bank, ["given"], ids=["f"], metadatas=[{DOC_INDEX_KEY: 10}])
    assert bank.get(["f"])[0]["metadata"][DOC_INDEX_KEY] == 10
    with pytest.raises(InvalidInputError, match="already belongs"):
        model.add(bank, ["clash"], ids=["g"], metadatas=[{DOC_INDEX_KEY: 2}])
    with pytest.raises(InvalidInputError, match=DOC_INDEX_KEY):
        model.add(bank, ["bad"], ids=["h"], metadatas=[{DOC_INDEX_KEY: "one"}])


def test_long_documents_split_into_parts_of_the_rendered_text(tiny_msa_dir):
    model = MSAModel.from_pretrained(tiny_msa_dir(), device="cpu", config={"encode": {"max_doc_tokens": 8}})
    long = " ".join(DOCS)
    bank = model.index([long, DOCS[2]], ids=["long", "p"])
    parts = bank.parts("long")
    assert len(parts) > 2 and "".join(p["text"] for p in parts) == long
    assert bank.get(["long"])[0]["text"] == long
    rendered = model.tokenizer(render_document(0, long), add_special_tokens=False)["input_ids"]
    assert sum(p["n_tokens"] for p in parts) == len(rendered)
    assert {h.id for h in model.retrieve(QUESTION, bank, k=2)} == {"long", "p"}


def test_chunks_are_spliced_in_ascending_document_order(model):
    from msa_core.inference.generate import left_pad, query_positions

    bank = model.index(DOCS, ids=list("abcd"))
    prof = model.reference
    prompt = prof.question_prompt(QUESTION)
    ids, valid, routing = left_pad([prompt], 0, torch.device("cpu"))
    hook = prof.hook(bank, routing, query_positions(valid, 5), None, 2)
    x = torch.randn(1, ids.shape[1], model.backbone.args.hidden_size)
    memory = hook(2, x)
    chosen = hook.routings[2].selected[0].tolist()
    order = sorted(chosen)
    li = bank.layers.index(2)
    expected = torch.cat([bank.k_bar[li, bank.chunks_of([r])] for r in order]).transpose(0, 1)
    t = prof.template_length
    assert torch.equal(memory.k[0, :, :t], prof.template().k[2])
    assert torch.equal(memory.k[0, :, t:], expected)
    lower = hook(0, x)  # lower layers: the template alone
    assert lower.k.shape[2] == t and 0 not in hook.routings
