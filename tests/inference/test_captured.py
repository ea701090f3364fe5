"""The captured routed prefill (inference/captured.py): its fixed-shape router against the eager MemoryRouter
(CPU, float32: the same logits, routing and greedy tokens), and on a GPU the graph against the eager prefill,
with no host sync inside a replay."""

from __future__ import annotations

import pytest
import torch

from msa_core.config import MSAConfig
from msa_core.inference.captured import memory_width, static_router
from msa_core.inference.engine import PROMPT_BUCKET, Engine, memory_bucket
from msa_core.inference.generate import build_prompt, engine_for, left_pad, query_positions, routed_prefill
from msa_core.inference.memory_router import MemoryRouter
from msa_core.model import MSAModel

DOCS = ["The lighthouse of Velmora was built in 1887 by the engineer Ada Quist. " * 3,
        "Ferries leave the harbour every morning at seven and return at dusk.",
        "Paris is the capital of France, and its museums are famous.",
        "Cheese from the sea caves is aged for nine weeks before it is sold."]
QUESTIONS = ["Who built the lighthouse?", "When do ferries leave the harbour every morning?", "Capital?"]
STEPS = 8
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _model(path, device: str = "cpu") -> MSAModel:
    cfg = MSAConfig(routing={"layers": [2, 3], "top_k": 2}, encode={"chunk_size": 4, "storage_dtype": "float32",
                                                                    "max_doc_tokens": 24})
    return MSAModel.from_pretrained(path, router="random", config=cfg, device=device, dtype=torch.float32)


@torch.no_grad()
def _run(model: MSAModel, bank, questions, k: int, allowed, static: bool):
    """(prefill logits and greedy decode logits [S+1, B, V], tokens [B, S], the hook) through the engine."""
    bb = model.backbone
    ids, valid, routing = left_pad([build_prompt(model.tokenizer, q) for q in questions], 0, bb.device)
    pos = query_positions(valid, model.position_offset(k))
    hook = MemoryRouter(bank, model.router, model.config.routing, routing, allowed=allowed, top_k=k, positions=pos)
    if static:
        hook = static_router(hook, len(questions))
    engine = Engine(bb, graphs=False)
    first, session = engine.prefill(ids, pos, valid, memory_hook=hook, extra_tokens=STEPS)
    logits, tokens = [first], []
    for _ in range(STEPS):
        tokens.append(logits[-1].argmax(-1))
        logits.append(engine.decode_one_token(session, tokens[-1]))
    return torch.stack(logits), torch.stack(tokens, 1), hook


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("k", [1, 2, 50])
@pytest.mark.parametrize("filtered", [False, True])
def test_the_fixed_shape_router_equals_the_eager_one(tiny_model_dir, family, k, filtered):
    model = _model(tiny_model_dir(family))
    bank = model.index(DOCS, ids=["a", "b", "c", "d"], metadatas=[{"n": i} for i in range(4)])
    allowed = bank.row_mask({"n": {"$in": [0, 2]}}) if filtered else None
    eager = _run(model, bank, QUESTIONS, k, allowed, static=False)
    fixed = _run(model, bank, QUESTIONS, k, allowed, static=True)
    assert (eager[0] - fixed[0]).abs().max().item() <= 1e-5
    assert torch.equal(eager[1], fixed[1])
    for layer in model.layers:
        a, b = eager[2].routings[layer], fixed[2].routings[layer]
        assert torch.equal(a.selected, b.selected)
        assert torch.equal(a.doc_scores, b.doc_scores)
    if filtered:
        allowed_rows = set(allowed.nonzero().flatten().tolist())
        assert all(set(r.selected.flatten().tolist()) <= allowed_rows for r in fixed[2].routings.values())


def test_the_memory_width_holds_the_longest_documents(tiny_model_dir):
    model = _model(tiny_model_dir("llama"))
    bank = model.index(DOCS, ids=["a", "b", "c", "d"])
    counts = sorted(bank.chunk_counts.tolist(), reverse=True)
    for k in (1, 2, 3):
        assert memory_width(bank, k) == memory_bucket(sum(counts[:k]))
    assert memory_width(bank, 100) == memory_bucket(sum(counts))


def test_hooks_that_cannot_take_fixed_shapes_stay_eager(tiny_model_dir):
    model = _model(tiny_model_dir("llama"))
    bank = model.index(DOCS, ids=["a", "b", "c", "d"], metadatas=[{"n": i} for i in range(4)])
    routing = torch.ones(1, 3, dtype=torch.bool)
    cfg, router = model.config.routing, model.router
    assert static_router(MemoryRouter(bank, router, cfg, routing, attend=False), 1) is None  # scoring only
    assert static_router(MemoryRouter(model.new_bank(), router, cfg, routing), 1) is None  # empty bank
    nothing = bank.row_mask({"n": 99})
    assert static_router(MemoryRouter(bank, router, cfg, routing, allowed=nothing), 1) is None


# ---- on a GPU: the graph ---------------------------------------------------------------------------


def _answer(model: MSAModel, bank, question: str, k: int = 2):
    prompt = build_prompt(model.tokenizer, question)
    state = routed_prefill(model.backbone, [prompt], offset=model.position_offset(k), extra_capacity=STEPS,
                           hook=lambda r, p: MemoryRouter(bank, model.router, model.config.routing, r, top_k=k,
                                                          positions=p))
    engine, token, tokens = engine_for(model.backbone), state.logits.argmax(-1), []
    for _ in range(STEPS):
        tokens.append(int(token[0]))
        token = engine.decode_one_token(state.session, token).argmax(-1)
    return state, tokens


@cuda
def test_the_captured_prefill_equals_the_eager_one(tiny_model_dir):
    model = _model(tiny_model_dir("qwen3"), device="cuda")
    bank = model.index(DOCS, ids=["a", "b", "c", "d"]).to("cuda")  # a bank in host memory stays eager
    engine = engine_for(model.backbone)
    for question in QUESTIONS * 2:  # the second round replays graphs captured in the first
        engine.capture_prefill = False
        eager, eager_tokens = _answer(model, bank, question)
        engine.capture_prefill = True
        graphed, graphed_tokens = _answer(model, bank, question)
        assert graphed_tokens == eager_tokens
        assert (graphed.logits - eager.logits).abs().max().item() <= 1e-4
        for layer in model.layers:
            assert torch.equal(graphed.hook.routings[layer].selected, eager.hook.routings[layer].selected)
    assert 1 <= len(engine.prefill_graphs) <= len({-(-len(q) // PROMPT_BUCKET) for q in QUESTIONS}) + 1
    model.add(bank, ["The lighthouse keeper of Velmora is named Ada."], ids=["e"])  # new bank state: recaptured
    engine.capture_prefill = False
    eager, eager_tokens = _answer(model, bank, QUESTIONS[0], k=3)
    engine.capture_prefill = True
    graphed, graphed_tokens = _answer(model, bank, QUESTIONS[0], k=3)
    assert graphed_tokens == eager_tokens
    assert all(g.held[2] is bank.kr_bar for g in engine.prefill_graphs.values())  # stale graphs were dropped
    host = model.index(DOCS, ids=["a", "b", "c", "d"])  # K/V in host memory: the eager path, no new graph
    before = len(engine.prefill_graphs)
    _answer(model, host, QUESTIONS[0])
    assert len(engine.prefill_graphs) == before


@cuda
def test_int8_keys_captured_equal_eager_and_take_their_own_graph(tiny_model_dir):
    """routing.score_keys='int8' in a captured prefill: the int8 keys are made in the warm-up (outside capture),
    replays equal the eager int8 prefill, and a graph captured with the bank's keys is not reused for int8."""
    model = _model(tiny_model_dir("qwen3"), device="cuda")
    bank = model.index(DOCS, ids=["a", "b", "c", "d"]).to("cuda")
    engine = engine_for(model.backbone)
    _answer(model, bank, QUESTIONS[0])  # a graph with the bank's keys
    graphs = len(engine.prefill_graphs)
    model.config.routing.score_keys = "int8"
    for _ in range(2):  # capture, then replay
        engine.capture_prefill = False
        eager, eager_tokens = _answer(model, bank, QUESTIONS[0])
        engine.capture_prefill = True
        graphed, graphed_tokens = _answer(model, bank, QUESTIONS[0])
        assert graphed_tokens == eager_tokens
        assert (graphed.logits - eager.logits).abs().max().item() <= 1e-4
        for layer in model.layers:
            assert torch.equal(graphed.hook.routings[layer].selected, eager.hook.routings[layer].selected)
    assert len(engine.prefill_graphs) == graphs + 1


@cuda
def test_a_replay_never_syncs_with_the_host(tiny_model_dir):
    model = _model(tiny_model_dir("qwen3"), device="cuda")
    bank = model.index(DOCS, ids=["a", "b", "c", "d"]).to("cuda")
    _answer(model, bank, QUESTIONS[0])  # captures
    (graph,) = engine_for(model.backbone).prefill_graphs.values()
    inputs = [t.clone() for t in (graph.ids, graph.positions, graph.valid, graph.router.routing_mask,
                                  graph.router.allowed)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        logits, _session, routings = graph.replay(*inputs)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert logits.shape[0] == 1 and routings


@cuda
def test_the_compiled_question_forward_routes_as_the_plain_graph(tiny_model_dir):
    from torch._dynamo.utils import counters

    model = _model(tiny_model_dir("qwen3"), device="cuda")
    bank = model.index(DOCS, ids=["a", "b", "c", "d"]).to("cuda")
    engine = engine_for(model.backbone)
    plain = [model.retrieve(q, bank, k=3) for q in QUESTIONS]
    torch._dynamo.reset()
    counters.clear()
    engine.set_compile(True)
    compiled = [model.retrieve(q, bank, k=3) for q in QUESTIONS]
    assert not counters["graph_break"], dict(counters["graph_break"])
    for a, b in zip(plain, compiled):
        assert [d.id for d in a] == [d.id for d in b]
        assert all(abs(x.score - y.score) <= 1e-4 for x, y in zip(a, b))
