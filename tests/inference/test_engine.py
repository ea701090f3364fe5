"""The engine (static caches, prefill, decode_one_token) against the eager path it replaced, kept as the
oracle: `Backbone.forward` with growing LayerCaches. CPU, float32, tiny random models."""

from __future__ import annotations

import pytest
import torch

from msa_core.config import MSAConfig
from msa_core.inference.engine import Engine, local_bucket, memory_bucket
from msa_core.inference.generate import MemoryRouter, build_prompt, left_pad, query_positions
from msa_core.model import MSAModel

DOCS = ["The lighthouse of Velmora was built in 1887 by the engineer Ada Quist. " * 3,
        "Ferries leave the harbour every morning at seven and return at dusk.",
        "Paris is the capital of France, and its museums are famous.",
        "Cheese from the sea caves is aged for nine weeks before it is sold."]
QUESTIONS = ["Who built the lighthouse?", "When do ferries leave the harbour every morning?", "Capital?"]
STEPS = 16


def _model(path, profile: str = "default") -> MSAModel:
    cfg = MSAConfig(routing={"layers": [2, 3], "top_k": 2}, encode={"chunk_size": 4, "storage_dtype": "float32",
                                                                    "max_doc_tokens": 24})
    return MSAModel.from_pretrained(path, router="random", config=cfg, device="cpu", profile=profile)


def _hook(model: MSAModel, bank, routing, positions, k: int, allowed=None):
    if model.reference is not None:
        return model.reference.hook(bank, routing, positions, allowed, k)
    return MemoryRouter(bank, model.router, model.config.routing, routing, allowed=allowed, top_k=k,
                        positions=positions)


def _prompts(model: MSAModel, questions):
    if model.reference is not None:
        return [model.reference.question_prompt(q) for q in questions]
    return [build_prompt(model.tokenizer, q) for q in questions]


@torch.no_grad()
def _oracle(model: MSAModel, bank, questions, k: int, allowed=None, steps: int = STEPS):
    """Prefill logits, greedy tokens and routing of the eager path (Backbone.forward + LayerCache)."""
    bb = model.backbone
    ids, valid, routing = left_pad(_prompts(model, questions), model.tokenizer.pad_token_id or 0, bb.device)
    pos = query_positions(valid, model.position_offset(k))
    hook = _hook(model, bank, routing, pos, k, allowed)
    caches = bb.new_caches(len(questions), capacity=ids.shape[1] + steps)
    logits = [bb.logits(bb(ids, pos, valid=valid, caches=caches, memory_hook=hook)[:, -1])]
    tokens = []
    nxt = pos[:, -1:] + 1
    for _ in range(steps):
        token = logits[-1].argmax(-1, keepdim=True)
        tokens.append(token[:, 0])
        logits.append(bb.logits(bb(token, nxt, caches=caches)[:, -1]))
        nxt = nxt + 1
    return torch.stack(logits), torch.stack(tokens, 1), hook


@torch.no_grad()
def _engine(model: MSAModel, engine: Engine, bank, questions, k: int, allowed=None, steps: int = STEPS):
    bb = model.backbone
    ids, valid, routing = left_pad(_prompts(model, questions), model.tokenizer.pad_token_id or 0, bb.device)
    pos = query_positions(valid, model.position_offset(k))
    hook = _hook(model, bank, routing, pos, k, allowed)
    first, session = engine.prefill(ids, pos, valid, memory_hook=hook, extra_tokens=steps)
    logits, tokens = [first], []
    for _ in range(steps):
        token = logits[-1].argmax(-1)
        tokens.append(token)
        logits.append(engine.decode_one_token(session, token))
    return torch.stack(logits), torch.stack(tokens, 1), hook


def _same_routing(a, b) -> None:
    assert a.routings.keys() == b.routings.keys()
    for layer in a.routings:
        assert torch.equal(a.routings[layer].selected, b.routings[layer].selected)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("k", [1, 2, 9])
def test_engine_equals_the_eager_path(tiny_model_dir, family, k):
    model = _model(tiny_model_dir(family))
    bank = model.index(DOCS, ids=["a", "b", "c", "d"])
    assert bank.num_parts > len(DOCS)  # the first document is split into parts
    want_logits, want_tokens, want_hook = _oracle(model, bank, QUESTIONS[:1], k)
    got_logits, got_tokens, got_hook = _engine(model, Engine(model.backbone), bank, QUESTIONS[:1], k)
    _same_routing(got_hook, want_hook)
    assert (got_logits[0] - want_logits[0]).abs().max().item() <= 1e-5  # the prefill
    assert torch.equal(got_tokens, want_tokens)
    assert (got_logits - want_logits).abs().max().item() <= 1e-4


def test_engine_equals_the_eager_path_with_a_filter_and_a_batch(tiny_model_dir):
    model = _model(tiny_model_dir("qwen3"))
    bank = model.index(DOCS, ids=["a", "b", "c", "d"], metadatas=[{"n": i} for i in range(4)])
    allowed = bank.row_mask({"n": {"$gte": 1}})
    want_logits, want_tokens, want_hook = _oracle(model, bank, QUESTIONS, 2, allowed)
    got_logits, got_tokens, got_hook = _engine(model, Engine(model.backbone), bank, QUESTIONS, 2, allowed)
    _same_routing(got_hook, want_hook)
    assert (got_logits - want_logits).abs().max().item() <= 1e-4
    assert torch.equal(got_tokens, want_tokens)


def test_reference_profile_engine_equals_the_eager_path(tiny_msa_dir):
    model = MSAModel.from_pretrained(tiny_msa_dir(), device="cpu")
    assert model.reference is not None
    bank = model.index(DOCS, ids=["a", "b", "c", "d"])
    want_logits, want_tokens, want_hook = _oracle(model, bank, QUESTIONS[:2], 2)
    got_logits, got_tokens, got_hook = _engine(model, Engine(model.backbone), bank, QUESTIONS[:2], 2)
    _same_routing(got_hook, want_hook)
    assert (got_logits - want_logits).abs().max().item() <= 1e-4
    assert torch.equal(got_tokens, want_tokens)


def test_rows_of_a_left_padded_batch_equal_each_row_alone(tiny_model_dir):
    model = _model(tiny_model_dir("llama"))
    bank = model.index(DOCS, ids=["a", "b", "c", "d"])
    engine = Engine(model.backbone)
    batch_logits, batch_tokens, _ = _engine(model, engine, bank, QUESTIONS, 2, steps=8)
    for row, q in enumerate(QUESTIONS):
        logits, tokens, _ = _engine(model, engine, bank, [q], 2, steps=8)
        assert torch.equal(tokens[0], batch_tokens[row])
        assert (logits[:, 0] - batch_logits[:, row]).abs().max().item() <= 1e-4


def test_pooled_caches_are_reused_and_reset(tiny_model_dir):
    """A second question of the same shape reuses the first one's caches and gets what a fresh engine gets."""
    model = _model(tiny_model_dir("qwen2"))
    bank = model.index(DOCS, ids=["a", "b", "c", "d"])
    engine = Engine(model.backbone)
    _engine(model, engine, bank, [QUESTIONS[0]], 2)
    pooled = dict(engine._caches)
    again = _engine(model, engine, bank, ["Who sold the cheese?"], 2)
    assert engine._caches.keys() == pooled.keys()
    fresh = _engine(model, Engine(model.backbone), bank, ["Who sold the cheese?"], 2)
    assert torch.equal(again[1], fresh[1]) and torch.equal(again[0], fresh[0])


@pytest.mark.parametrize("causal", [True, False])
def test_extend_equals_the_eager_path(tiny_model_dir, causal):
    """An injected block (interleave) after a prefill, causal or both ways, then a decode step."""
    model = _model(tiny_model_dir("qwen3"))
    bank = model.index(DOCS, ids=["a", "b", "c", "d"])
    bb = model.backbone
    ids, valid, routing = left_pad(_prompts(model, QUESTIONS[:1]), 0, bb.device)
    pos = query_positions(valid, model.position_offset(2))
    block = torch.tensor([[5, 9, 11, 7]])
    with torch.no_grad():
        caches = bb.new_caches(1)
        bb(ids, pos, valid=valid, caches=caches, memory_hook=_hook(model, bank, routing, pos, 2))
        after = pos[:, -1:] + 1 + torch.arange(4)
        want = bb.logits(bb(block, after, caches=caches, causal=causal)[:, -1])
        want_next = bb.logits(bb(torch.tensor([[3]]), after[:, -1:] + 1, caches=caches)[:, -1])
        engine = Engine(bb)
        _, session = engine.prefill(ids, pos, valid, memory_hook=_hook(model, bank, routing, pos, 2), extra_tokens=8)
        got = engine.extend(session, block, causal=causal)
        got_next = engine.decode_one_token(session, torch.tensor([3]))
    assert (got - want).abs().max().item() <= 1e-5
    assert (got_next - want_next).abs().max().item() <= 1e-5


def test_a_full_session_says_so(tiny_model_dir):
    model = _model(tiny_model_dir("llama"))
    engine = Engine(model.backbone)
    ids = torch.tensor([[1, 2, 3]])
    _, session = engine.prefill(ids, torch.arange(3)[None], torch.ones(1, 3, dtype=torch.bool))
    assert session.capacity == local_bucket(3)
    for _ in range(session.capacity - 3):
        engine.decode_one_token(session, torch.tensor([4]))
    with pytest.raises(RuntimeError, match="token slots are used up"):
        engine.decode_one_token(session, torch.tensor([4]))


def test_buckets():
    assert [memory_bucket(n) for n in (0, 1, 16, 17, 100)] == [0, 16, 16, 32, 128]
    assert [local_bucket(n) for n in (1, 128, 129)] == [128, 128, 256]


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _cuda_model(tiny_model_dir) -> MSAModel:
    cfg = MSAConfig(routing={"layers": [2, 3], "top_k": 2}, encode={"chunk_size": 4, "storage_dtype": "float32"})
    return MSAModel.from_pretrained(tiny_model_dir("qwen3"), router="random", config=cfg, device="cuda",
                                    dtype=torch.float32)


@cuda
def test_graph_replay_equals_eager_decode(tiny_model_dir):
    model = _cuda_model(tiny_model_dir)
    bank = model.index(DOCS, ids=["a", "b", "c", "d"])
    for questions in (QUESTIONS[:1], QUESTIONS):
        eager = _engine(model, Engine(model.backbone, graphs=False), bank, questions, 2)
        graphed = _engine(model, Engine(model.backbone, graphs=True), bank, questions, 2)
        assert torch.equal(eager[1], graphed[1])
        assert (eager[0] - graphed[0]).abs().max().item() <= 1e-4


@cuda
@pytest.mark.parametrize("graphs", [True, False])
def test_decode_steps_never_sync_with_the_host(tiny_model_dir, graphs):
    model = _cuda_model(tiny_model_dir)
    bank = model.index(DOCS, ids=["a", "b", "c", "d"])
    engine = Engine(model.backbone, graphs=graphs)
    ids, valid, routing = left_pad(_prompts(model, QUESTIONS), 0, model.backbone.device)
    pos = query_positions(valid, model.position_offset(2))
    logits, session = engine.prefill(ids, pos, valid, memory_hook=_hook(model, bank, routing, pos, 2),
                                     extra_tokens=16)
    token = engine.decode_one_token(session, logits.argmax(-1)).argmax(-1)  # a graph is captured here
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(8):
            token = engine.decode_one_token(session, token).argmax(-1)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert token.shape == (len(QUESTIONS),)


def _scores_both_ways(model: MSAModel, bank, questions, engine_graphs=None):
    from msa_core.inference.generate import route_questions, routed_prefill

    cfg = model.config.routing
    prompts = _prompts(model, questions)
    offset = model.position_offset(cfg.top_k)

    def hook(routing, positions):
        return MemoryRouter(bank, model.router, cfg, routing, positions=positions, attend=False)

    oracle = routed_prefill(model.backbone, prompts, offset=offset, hook=hook, score_only=True,
                            last_layer=max(model.layers)).hook
    engine = route_questions(model.backbone, prompts, hook(None, None), offset=offset)
    return oracle, engine


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_query_forward_scores_equal_the_eager_prefill(tiny_model_dir, family):
    model = _model(tiny_model_dir(family))
    bank = model.index(DOCS, ids=["a", "b", "c", "d"])
    oracle, engine = _scores_both_ways(model, bank, QUESTIONS)
    for layer in model.layers:
        a, b = oracle.routings[layer], engine.routings[layer]
        assert (a.doc_scores - b.doc_scores).abs().max().item() <= 1e-5
        assert torch.equal(a.selected, b.selected)


@cuda
def test_query_forward_graph_equals_eager(tiny_model_dir):
    model = _cuda_model(tiny_model_dir)
    bank = model.index(DOCS, ids=["a", "b", "c", "d"])
    oracle, engine = _scores_both_ways(model, bank, QUESTIONS)
    assert engine_for_uses_graphs(model)
    for layer in model.layers:
        assert (oracle.routings[layer].doc_scores - engine.routings[layer].doc_scores).abs().max().item() <= 1e-4
    again = _scores_both_ways(model, bank, QUESTIONS)[1]  # a replay of the captured graph
    for layer in model.layers:
        # Scores only: the first document's parts repeat their text, so some scores tie exactly, and the GPU
        # scoring kernel's reduction order may break a tie either way from one launch to the next.
        assert (again.routings[layer].doc_scores - engine.routings[layer].doc_scores).abs().max().item() <= 1e-5


@cuda
def test_query_forward_graph_survives_other_work_between_replays(tiny_model_dir):
    """The captured question forward keeps its scratch cache and RoPE table alive: memory that other work
    allocates and fills between replays (indexing, a CPU call moving RoPE) cannot change its scores. Before
    the fix the scratch was freed after capture, and GPU retrieval on HotpotQA-100 fell from 0.525 to 0.255."""
    model = _cuda_model(tiny_model_dir)
    bank = model.index(DOCS, ids=["a", "b", "c", "d"])
    oracle, first = _scores_both_ways(model, bank, QUESTIONS)
    model.backbone.rotary(torch.zeros(1, 3, dtype=torch.long), torch.float32)  # positions on the CPU
    junk = [torch.full((1 << 20,), float("nan"), device="cuda") for _ in range(64)]  # reuse freed blocks
    model.index(DOCS * 4, ids=[f"x{i}" for i in range(16)])
    again = _scores_both_ways(model, bank, QUESTIONS)[1]
    del junk
    for layer in model.layers:
        assert (again.routings[layer].doc_scores - oracle.routings[layer].doc_scores).abs().max().item() <= 1e-4


def engine_for_uses_graphs(model: MSAModel) -> bool:
    from msa_core.inference.generate import engine_for

    return engine_for(model.backbone).use_graphs


@cuda
def test_compiled_decode_graph_equals_eager(tiny_model_dir):
    model = _cuda_model(tiny_model_dir)
    bank = model.index(DOCS, ids=["a", "b", "c", "d"])
    eager = _engine(model, Engine(model.backbone, graphs=False), bank, QUESTIONS, 2)
    compiled = Engine(model.backbone, graphs=True)
    compiled.set_compile(True)
    got = _engine(model, compiled, bank, QUESTIONS, 2)
    assert torch.equal(eager[1], got[1])
    assert (eager[0] - got[0]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("t", [1, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_attention_equals_attention_written_out(t, dtype):
    """grouped_attention (a grouped matmul for one token; SDPA with enable_gqa on a CPU for several) equals
    softmax(q k^T / sqrt(D)) v per query head, head h reading kv head h // G, masked keys left out."""
    from msa_core.inference.engine import grouped_attention

    gen = torch.Generator().manual_seed(t)
    b, h, kv, s, d = 2, 6, 2, 9, 8
    q, k, v = (torch.randn(*shape, generator=gen) for shape in ((b, h, t, d), (b, kv, s, d), (b, kv, s, d)))
    mask = torch.rand(b, 1, t, s, generator=gen) > 0.4
    mask[..., -1] = True  # every query sees at least one key
    out = grouped_attention(q.to(dtype), k.to(dtype), v.to(dtype), mask)
    kr, vr = k.repeat_interleave(h // kv, dim=1), v.repeat_interleave(h // kv, dim=1)
    scores = (q @ kr.transpose(-1, -2) / d ** 0.5).masked_fill(~mask, float("-inf"))
    expected = torch.softmax(scores, dim=-1) @ vr
    torch.testing.assert_close(out.float(), expected, **({} if dtype == torch.float32 else {"atol": 3e-2, "rtol": 3e-2}))


def test_set_compile_refuses_a_mode_that_makes_its_own_cuda_graphs(tiny_model_dir):
    model = MSAModel.from_pretrained(tiny_model_dir("llama"), router="random", device="cpu")
    engine = Engine(model.backbone, graphs=False)
    for mode in ("reduce-overhead", "max-autotune"):
        with pytest.raises(ValueError, match="CUDA graphs itself"):
            engine.set_compile(True, mode)
    engine.set_compile(True, "max-autotune-no-cudagraphs")
    assert engine.compile_decode and engine.compile_mode == "max-autotune-no-cudagraphs"
    engine.set_compile(False)
    assert not engine.compile_decode and engine.compile_mode is None
