"""Fused GPU projections (decoder/packed.py, issue 23) against the plain modules, on a tiny random backbone
on a CUDA device: the same outputs within half-precision rounding, refilled in place (where captured graphs
read them) when weights change, none when device memory is short, no graph break under torch.compile."""

from __future__ import annotations

import pytest
import torch

from msa_core.decoder import packed
from msa_core.decoder.backbone import load_backbone
from msa_core.inference.engine import Engine
from msa_core.inference.generate import engine_for

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(params=["llama", "qwen2"])  # qwen2: q/k/v with biases
def gpu_bf16(request, tiny_model_dir):
    bb, _ = load_backbone(tiny_model_dir(request.param), dtype=torch.bfloat16)
    bb = bb.to("cuda")
    bb.packs.gpu = True
    return bb


def ids() -> torch.Tensor:
    return torch.randint(0, 100, (2, 11), generator=torch.Generator().manual_seed(0)).cuda()


@torch.no_grad()
def forward(bb, *, gpu_pack: bool) -> torch.Tensor:
    bb.packs.gpu = gpu_pack
    x = ids()
    pos = torch.arange(x.shape[1], device="cuda").expand_as(x)
    return bb(x, pos, caches=bb.new_caches(x.shape[0])).float()


@torch.no_grad()
def decode(engine: Engine, steps: int = 6) -> torch.Tensor:
    x = ids()
    pos = torch.arange(x.shape[1], device="cuda").expand_as(x)
    logits, session = engine.prefill(x, pos, torch.ones_like(x, dtype=torch.bool), extra_tokens=steps)
    out = [logits]
    for _ in range(steps):
        out.append(engine.decode_one_token(session, out[-1].argmax(-1)))
    return torch.stack(out).float()


def test_gpu_packs_match_the_modules(gpu_bf16):
    plain = forward(gpu_bf16, gpu_pack=False)
    gpu_bf16.packs.gpu = True
    with torch.no_grad():
        gpu_bf16.packs.refresh(gpu_bf16)
    assert len(gpu_bf16.packs) == 2 * len(gpu_bf16.layers)  # q|k|v and gate|up per layer; o and down stay
    fast = forward(gpu_bf16, gpu_pack=True)
    assert (fast - plain).abs().max() <= 0.02 * plain.abs().max()


def test_a_graph_replays_refilled_weights_after_an_in_place_update(gpu_bf16):
    engine = engine_for(gpu_bf16)  # refreshes the packs, then captures decode graphs that read them
    decode(engine)
    pack = next(iter(gpu_bf16.packs._store.values()))
    with torch.no_grad():
        for layer in gpu_bf16.layers:
            layer.self_attn.k_proj.weight.mul_(-0.5)
            layer.mlp.up_proj.weight.mul_(1.5)
    engine = engine_for(gpu_bf16)  # before the next question: the stale packs are refilled in place
    assert next(iter(gpu_bf16.packs._store.values())) is pack and len(engine._graphs) == 1
    graphed = decode(engine)  # the same graph replays
    gpu_bf16.packs.gpu = False
    plain = decode(Engine(gpu_bf16, graphs=False))
    assert (graphed - plain).abs().max() <= 0.03 * plain.abs().max()
    assert torch.equal(graphed[1:].argmax(-1), plain[1:].argmax(-1))


@torch.no_grad()
def test_a_replaced_projection_and_a_cast_are_seen_by_the_next_refresh(gpu_bf16):
    """refresh returns at once while nothing changed; a new module or a cast must still remake the packs."""
    engine_for(gpu_bf16)
    mlp = gpu_bf16.layers[0].mlp
    old = mlp.up_proj
    mlp.up_proj = torch.nn.Linear(old.in_features, old.out_features, bias=old.bias is not None).to("cuda", torch.bfloat16)
    engine_for(gpu_bf16)
    pack = gpu_bf16.packs._store[(id(mlp), "gate_up", "cuda")]
    assert pack.modules[1] is mlp.up_proj
    x = torch.randn(3, old.in_features, device="cuda", dtype=torch.bfloat16)
    assert torch.allclose(pack(x)[1].float(), mlp.up_proj(x).float(), atol=2e-2, rtol=2e-2)
    gpu_bf16.to(torch.float16)
    engine_for(gpu_bf16)
    assert all(p.weight.dtype == torch.float16 for p in gpu_bf16.packs._store.values())


def test_no_packs_when_device_memory_is_short(gpu_bf16, monkeypatch):
    monkeypatch.setattr(packed, "GPU_KEEP_FREE", 1.0)
    with torch.no_grad():
        gpu_bf16.packs.refresh(gpu_bf16)
    assert len(gpu_bf16.packs) == 0 and not gpu_bf16.packs.gpu


def test_the_switch_turns_gpu_packs_off(monkeypatch, tiny_model_dir):
    monkeypatch.setenv("MSA_GPU_PACK", "0")
    bb, _ = load_backbone(tiny_model_dir("llama"), dtype=torch.bfloat16)
    bb = bb.to("cuda")
    with torch.no_grad():
        bb.packs.refresh(bb)
    assert len(bb.packs) == 0


def test_the_compiled_decode_step_traces_packs_without_a_graph_break(gpu_bf16):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    engine = engine_for(gpu_bf16)
    eager = decode(engine)
    engine.set_compile(True)
    compiled = decode(engine)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert torch.equal(compiled[1:].argmax(-1), eager[1:].argmax(-1))


def test_large_blocks_keep_the_modules(gpu_bf16, monkeypatch):
    calls = []
    real = packed.PackedLinear.__call__
    monkeypatch.setattr(packed.PackedLinear, "__call__", lambda self, x: calls.append(x.shape) or real(self, x))
    with torch.no_grad():
        gpu_bf16.packs.refresh(gpu_bf16)
    forward(gpu_bf16, gpu_pack=True)  # 22 tokens: packed
    assert len(calls) == 2 * len(gpu_bf16.layers)
    monkeypatch.setattr(packed, "GPU_MAX_ROWS", 8)  # encoding-sized blocks: the modules
    calls.clear()
    forward(gpu_bf16, gpu_pack=True)
    assert not calls
