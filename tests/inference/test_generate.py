"""Latent generation: memory splicing, positions, routing per layer, sampling and streaming."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from msa_core.config import MSAConfig
from msa_core.errors import InvalidInputError
from msa_core.inference.generate import (
    MemoryRouter,
    SamplingParams,
    TextStream,
    build_prompt,
    left_pad,
    query_positions,
    sample_next,
)
from msa_core.model import MSAModel

DOCS = ["The lighthouse of Velmora was built in 1887 by the engineer Ada Quist.",
        "Ferries leave the harbour every morning at seven and return at dusk."]
QUESTION = "Who built the lighthouse?"


def _model(path, **routing) -> MSAModel:
    cfg = MSAConfig(routing=routing, encode={"chunk_size": 4, "storage_dtype": "float32"})
    return MSAModel.from_pretrained(path, router="random", config=cfg, device="cpu")


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_memory_with_chunk_size_one_equals_plain_forward_over_document_then_prompt(tiny_model_dir, family):
    """With P=1 pooling is the identity; if every layer routes to the one document at query offset n,
    prefill and 8 decode steps must equal transformers' forward over [document; prompt]."""
    path = tiny_model_dir(family)
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    probe = _model(path)
    doc_tokens = probe.tokenizer(DOCS[0], add_special_tokens=False)["input_ids"]
    n = len(doc_tokens)
    cfg = MSAConfig(routing={"layers": [0, 1, 2, 3], "top_k": 1, "position_offset": n},
                    encode={"chunk_size": 1, "storage_dtype": "float32"})
    model = MSAModel.from_pretrained(path, router="random", config=cfg, device="cpu")
    bank = model.index([DOCS[0]], ids=["a"])
    prompt = build_prompt(model.tokenizer, QUESTION)
    ids, valid, routing = left_pad([prompt], 0, torch.device("cpu"))
    router = MemoryRouter(bank, model.router, model.config.routing, routing)
    caches = model.backbone.new_caches(1)
    with torch.no_grad():
        pos = query_positions(valid, n)
        h = model.backbone(ids, pos, valid=valid, caches=caches, memory_hook=router)
        ours = [model.backbone.logits(h)[:, -1]]
        out = hf(torch.tensor([doc_tokens + prompt.ids]), use_cache=True)
        ref, past = [out.logits[:, -1].float()], out.past_key_values
        for step in range(8):
            token = ref[-1].argmax(-1, keepdim=True)
            out = hf(token, past_key_values=past, use_cache=True)
            ref.append(out.logits[:, -1].float())
            past = out.past_key_values
            h = model.backbone(token, torch.tensor([[int(pos[0, -1]) + 1 + step]]), caches=caches)
            ours.append(model.backbone.logits(h)[:, -1])
    assert caches[0].length == n + len(prompt.ids) + 8  # memory slots first, then the tokens
    for step, (a, b) in enumerate(zip(ours, ref)):
        assert (a - b).abs().max().item() <= 1e-4, f"step {step}"


def test_lower_layers_see_only_local_context(tiny_model_dir):
    model = _model(tiny_model_dir("qwen3"), layers=[2, 3], top_k=2, position_offset=0)
    bank = model.index(DOCS, ids=["a", "b"])
    ids, valid, routing = left_pad([build_prompt(model.tokenizer, QUESTION)], 0, torch.device("cpu"))
    pos = query_positions(valid, 0)
    seen: dict[bool, dict[int, torch.Tensor]] = {True: {}, False: {}}
    for with_memory in (True, False):
        hook = MemoryRouter(bank, model.router, model.config.routing, routing) if with_memory else None
        with torch.no_grad():
            model.backbone(ids, pos, valid=valid, memory_hook=hook,
                           capture=lambda i, x, k, v, w=with_memory: seen[w].__setitem__(i, x.clone()))
    for layer in (0, 1, 2):  # inputs up to the first routing layer are untouched by memory
        assert torch.equal(seen[True][layer], seen[False][layer])
    assert not torch.allclose(seen[True][3], seen[False][3])


def test_each_routing_layer_picks_its_own_top_k_and_filters_apply_before(tiny_model_dir):
    model = _model(tiny_model_dir("llama"), layers=[1, 2, 3], top_k=2)
    texts = DOCS + ["Paris is the capital of France.", "Cheese from the island is aged in caves."]
    bank = model.index(texts, ids=["a", "b", "c", "d"], metadatas=[{"g": 1}, {"g": 2}, {"g": 1}, {"g": 2}])
    ids, valid, routing = left_pad([build_prompt(model.tokenizer, QUESTION)], 0, torch.device("cpu"))
    allowed = bank.row_mask({"g": 2})
    router = MemoryRouter(bank, model.router, model.config.routing, routing, allowed=allowed)
    with torch.no_grad():
        model.backbone(ids, query_positions(valid, 2), valid=valid, memory_hook=router)
    assert sorted(router.routings) == [1, 2, 3]
    for layer, rt in router.routings.items():
        chosen = {bank.docstore[r].id for r in rt.selected[0].tolist()}
        assert chosen == {"b", "d"}  # only allowed documents, and k=2 of them
        best = rt.doc_scores[0].topk(2).indices.tolist()
        assert set(best) == set(rt.selected[0].tolist())
    # the filtered documents are scored -inf, so they can never take a slot
    assert torch.isinf(router.routings[1].doc_scores[0, ~allowed]).all()


def test_query_positions_start_at_offset_for_left_padded_rows():
    valid = torch.tensor([[False, False, True, True], [True, True, True, True]])
    assert query_positions(valid, 16).tolist() == [[16, 16, 16, 17], [16, 17, 18, 19]]


def test_sampling_greedy_top_p_and_seed():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9]])
    assert sample_next(logits, 0.0, 1.0, None).item() == 1
    assert sample_next(logits, 1.0, 1e-6, torch.Generator().manual_seed(0)).item() == 1  # nucleus of one
    draws = [sample_next(logits, 1.0, 1.0, torch.Generator().manual_seed(s)).item() for s in range(50)]
    again = [sample_next(logits, 1.0, 1.0, torch.Generator().manual_seed(s)).item() for s in range(50)]
    assert draws == again and len(set(draws)) > 1
    with pytest.raises(InvalidInputError):
        SamplingParams(top_p=0)
    with pytest.raises(InvalidInputError):
        SamplingParams(max_new_tokens=0)


def test_text_stream_holds_back_partial_stop_strings(tiny_model_dir):
    model = _model(tiny_model_dir("llama"))
    tok = model.tokenizer
    ids = tok("Ferries leave the harbour every morning", add_special_tokens=False)["input_ids"]
    stream = TextStream(tok, ["every morning"])
    pieces = [stream.push(t) for t in ids]
    assert "".join(pieces) + stream.flush() == "Ferries leave the harbour "
    assert stream.stopped
    plain = TextStream(tok, [])
    assert "".join(plain.push(t) for t in ids) + plain.flush() == "Ferries leave the harbour every morning"


def test_streaming_pieces_join_to_the_answer_and_stop_on_length(tiny_model_dir):
    model = _model(tiny_model_dir("qwen2"), top_k=1)
    bank = model.index(DOCS, ids=["a", "b"])
    stream = model.stream_answer(QUESTION, bank, max_new_tokens=6)
    pieces = list(stream)
    assert stream.result is not None
    assert "".join(pieces) == stream.result.text
    assert stream.result.finish_reason in {"length", "eos"}
    assert stream.result.doc_ids and set(stream.result.doc_ids) <= {"a", "b"}
    sampled = [model.answer(QUESTION, bank, temperature=0.8, top_p=0.9, seed=3, max_new_tokens=6).text
               for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_conversation_prompt_routes_only_the_last_user_message(tiny_model_dir):
    model = _model(tiny_model_dir("llama"))
    tok = model.tokenizer
    messages = [{"role": "user", "content": "Tell me about ferries."},
                {"role": "assistant", "content": "They leave at seven."},
                {"role": "user", "content": QUESTION}]
    prompt = build_prompt(tok, messages)
    routed = [t for t, r in zip(prompt.ids, prompt.routing) if r]
    assert tok.decode(routed) == QUESTION
    full = tok.decode(prompt.ids)
    assert "Tell me about ferries." in full and "They leave at seven." in full
    with pytest.raises(InvalidInputError, match="no user message"):
        build_prompt(tok, [{"role": "assistant", "content": "hi"}])
    bank = model.index(DOCS, ids=["a", "b"])
    assert model.answer(messages, bank, max_new_tokens=3).doc_ids
    assert model.answer(messages, bank, mode="hybrid", k=1, max_new_tokens=3).doc_ids


def test_a_question_prompt_is_its_rendered_template_whatever_was_cached(tiny_model_dir):
    """build_prompt renders the chat template's ends once per (template, system prompt, vocabulary): each
    prompt equals the template rendered around that very question, and a changed template, system prompt or
    vocabulary is seen at once."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir("llama")))

    def rendered(question: str, system: str | None = None) -> list[int]:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        head, _, tail = text.partition(question)
        return [i for part in (head, question, tail) if part for i in tok(part, add_special_tokens=False)["input_ids"]]

    for question, system in ((QUESTION, None), ("Capital of France?", None), (QUESTION, "Be brief."), (QUESTION, None)):
        prompt = build_prompt(tok, question, system=system)
        assert prompt.ids == rendered(question, system)
        assert tok.decode([t for t, r in zip(prompt.ids, prompt.routing) if r]) == question
    tok.chat_template = "{% for m in messages %}<<{{ m['role'] }}>> {{ m['content'] }}\n{% endfor %}ANSWER:"
    assert build_prompt(tok, QUESTION).ids == rendered(QUESTION)
    tok.add_tokens(["ANSWER:"])  # a new vocabulary entry changes how the tail tokenizes
    assert build_prompt(tok, QUESTION).ids == rendered(QUESTION)


def test_a_scoring_only_router_chooses_on_demand_what_select_top_k_chooses(tiny_model_dir):
    """retrieve reads only the scores: a scoring-only router makes each layer's choice when it is first read
    (select_top_k's checks sync with a GPU), and then exactly as select_top_k over those scores."""
    from msa_core.inference.generate import route_questions
    from msa_core.routing.scores import select_top_k

    model = _model(tiny_model_dir("llama"), layers=[1, 2, 3], top_k=2)
    bank = model.index(DOCS + ["Paris is the capital of France."], ids=["a", "b", "c"],
                       metadatas=[{"g": 1}, {"g": 2}, {"g": 2}])
    allowed = bank.row_mask({"g": 2})
    hook = MemoryRouter(bank, model.router, model.config.routing, None, allowed=allowed, attend=False)
    with torch.no_grad():
        route_questions(model.backbone, [build_prompt(model.tokenizer, QUESTION)], hook, offset=2)
    assert sorted(hook.routings) == [1, 2, 3]
    for rt in hook.routings.values():
        assert rt._choice is None  # nothing read it yet
        values, rows = select_top_k(rt.doc_scores, 2, allowed)
        assert torch.equal(rt.selected, rows) and torch.equal(rt.selected_scores, values)
        assert set(rt.selected[0].tolist()) == {1, 2}  # the allowed documents only


def test_a_prompt_without_routing_tokens_is_refused_before_it_is_scored(tiny_model_dir):
    from msa_core.inference.generate import Prompt, route_questions

    model = _model(tiny_model_dir("llama"), layers=[1, 2, 3], top_k=2)
    bank = model.index(DOCS, ids=["a", "b"])
    good = build_prompt(model.tokenizer, QUESTION)
    mute = Prompt(list(good.ids), [False] * len(good.ids))
    hook = MemoryRouter(bank, model.router, model.config.routing, None, attend=False)
    with pytest.raises(InvalidInputError, match=r"rows \[1\] have no valid routing token"):
        route_questions(model.backbone, [good, mute], hook, offset=2)


def test_cpu_scoring_prepares_the_bank_keys_once_and_scores_the_same(tiny_model_dir):
    """The PyTorch scorer's float32 unit keys are made once per bank state (memory_router.scoring_keys), and
    scores through them equal scores that prepare the keys per call, bit for bit."""
    from msa_core.inference import memory_router
    from msa_core.routing.scores import document_scores

    model = _model(tiny_model_dir("llama"), layers=[1, 2, 3], top_k=2)
    bank = model.index(DOCS + ["Paris is the capital of France."], ids=["a", "b", "c"])
    cfg = model.config.routing
    keys = memory_router.scoring_keys(bank, cfg.normalization)
    assert keys is memory_router.scoring_keys(bank, cfg.normalization)  # made once for this bank state
    q = torch.randn(2, 5, model.backbone.args.num_heads, model.backbone.args.head_dim)
    mask = torch.tensor([[True] * 5, [False, False, True, True, True]])
    for li in range(len(bank.layers)):
        kw = dict(head_reduce=cfg.head_reduce, query_reduce=cfg.query_reduce, chunk_reduce=cfg.chunk_reduce,
                  normalization=cfg.normalization)
        plain = document_scores(q, mask, bank.kr_bar[li], bank.chunk_doc, bank.num_parts, **kw)
        cached = document_scores(q, mask, keys[li], bank.chunk_doc, bank.num_parts, keys_prepared=True, **kw)
        assert torch.equal(plain, cached)
    model.add(bank, ["Cheese from the island is aged in caves."], ids=["d"])  # a new bank state: new keys
    assert memory_router.scoring_keys(bank, cfg.normalization).shape[1] == bank.kr_bar.shape[1] != keys.shape[1]


def test_cpu_scoring_holds_bf16_keys_for_a_bf16_model_unless_exact_scores(tiny_model_dir):
    """A bfloat16 model scores against bfloat16 unit keys (memory_router.key_dtype; half the bytes each question
    reads), within 3e-3 of the float32 keys' scores; routing.exact_scores=True and a float32 model keep float32."""
    from msa_core.inference import memory_router
    from msa_core.routing.scores import document_scores

    assert memory_router.key_dtype(torch.bfloat16, exact_scores=False) == torch.bfloat16
    assert memory_router.key_dtype(torch.bfloat16, exact_scores=True) == torch.float32
    assert memory_router.key_dtype(torch.float32, exact_scores=False) == torch.float32
    cfg = MSAConfig(routing={"layers": [1, 2, 3], "top_k": 2}, encode={"chunk_size": 4})
    model = MSAModel.from_pretrained(tiny_model_dir("llama"), router="random", config=cfg, device="cpu",
                                     dtype=torch.bfloat16)
    docs = DOCS + ["Paris is the capital of France.", "Cheese from the island is aged in caves."]
    bank = model.index(docs, ids=["a", "b", "c", "d"])
    rc = model.config.routing
    memory_router.PER_STATE.clear()
    bf16 = model.retrieve(QUESTION, bank, k=4, layer_scores=True)
    kinds = {what for _, what in memory_router.PER_STATE if what.startswith("prepared_keys")}
    assert kinds == {f"prepared_keys_{rc.normalization}_torch.bfloat16"}
    rc.exact_scores = True
    exact = model.retrieve(QUESTION, bank, k=4, layer_scores=True)
    kinds = {what for _, what in memory_router.PER_STATE if what.startswith("prepared_keys")}
    assert f"prepared_keys_{rc.normalization}_torch.float32" in kinds
    by_id = {h.id: h for h in exact}
    assert {h.id for h in bf16} == set(by_id)
    for h in bf16:  # the same documents, each layer's score within bf16 rounding of the exact one
        want = by_id[h.id].layer_scores
        assert h.layer_scores.keys() == want.keys()
        assert all(abs(h.layer_scores[layer] - want[layer]) <= 3e-3 for layer in want)
    # the scorer itself, on random unit queries: bf16 keys within 3e-3 of float32 keys, every reduction
    q = torch.randn(2, 6, model.backbone.args.num_heads, model.backbone.args.head_dim)
    mask = torch.tensor([[True] * 6, [False, False, True, True, True, True]])
    for head_reduce in ("mean", "max"):
        kw = dict(head_reduce=head_reduce, query_reduce="max", chunk_reduce="max", normalization=rc.normalization)
        want = document_scores(q, mask, memory_router.scoring_keys(bank, rc.normalization)[0], bank.chunk_doc,
                               bank.num_parts, keys_prepared=True, **kw)
        got = document_scores(q, mask, memory_router.scoring_keys(bank, rc.normalization, torch.bfloat16)[0],
                              bank.chunk_doc, bank.num_parts, keys_prepared=True, **kw)
        assert got.dtype == torch.float32 and torch.allclose(got, want, atol=3e-3) and not torch.equal(got, want)


def test_int8_score_keys_rank_as_the_bank_keys(tiny_model_dir):
    """routing.score_keys='int8': the scorer reads the bank's keys quantised once per bank state (the GPU kernel's
    numbers; here the PyTorch path scores their dequantised values): the same documents, each layer's score
    within 3e-3 of the bank keys' scores; the kernels' inputs are the int8 keys and their scales, with no copy of
    the bank's own keys; exact scores and int8 keys do not go together."""
    from msa_core.inference import memory_router

    with pytest.raises(ValueError, match="choose one"):
        MSAConfig(routing={"score_keys": "int8", "exact_scores": True})
    model = _model(tiny_model_dir("qwen3"), layers=[1, 2, 3], top_k=2)
    docs = DOCS + ["Paris is the capital of France.", "Cheese from the island is aged in caves."]
    bank = model.index(docs, ids=["a", "b", "c", "d"])
    rc = model.config.routing
    want = {h.id: h for h in model.retrieve(QUESTION, bank, k=4, layer_scores=True)}
    memory_router.PER_STATE.clear()
    rc.score_keys = "int8"
    got = model.retrieve(QUESTION, bank, k=4, layer_scores=True)
    assert {what for _, what in memory_router.PER_STATE if "keys" in what} == {f"int8_keys_{rc.normalization}"}
    assert [h.id for h in got] == list(want)
    for h in got:
        assert all(abs(h.layer_scores[layer] - want[h.id].layer_scores[layer]) <= 3e-3 for layer in h.layer_scores)
    assert any(h.layer_scores != want[h.id].layer_scores for h in got)  # int8 keys, not the bank's
    hook = MemoryRouter(bank, model.router, rc, torch.ones(1, 3, dtype=torch.bool))
    keys, chunk_doc, columns = hook._kernel_inputs(torch.device("cpu"))
    assert keys.dtype == torch.int8 and keys.shape == bank.kr_bar.shape and torch.equal(chunk_doc, bank.chunk_doc)
    assert list(columns) == ["key_scales"] and columns["key_scales"].shape == bank.kr_bar.shape[:-1]
    assert not any(what == "cpu" for _, what in memory_router.PER_STATE)  # the bank's keys were not copied
