"""Fused, prepacked CPU projections (decoder/packed.py) against the plain nn.Linear path, on tiny random
backbones: same outputs, used only where they should be, repacked when weights change."""

from __future__ import annotations

import copy

import pytest
import torch

from msa_core.decoder import packed
from msa_core.decoder.backbone import load_backbone
from msa_core.decoder.lora import attach
from msa_core.errors import InvalidInputError

pytestmark = pytest.mark.skipif(not packed._available(), reason="this torch build has no oneDNN linear ops")


def forward(bb, ids: torch.Tensor, *, pack: bool) -> torch.Tensor:
    bb.packs.enabled = pack
    pos = torch.arange(ids.shape[1]).expand_as(ids)
    with torch.no_grad():
        return bb(ids, pos, caches=bb.new_caches(ids.shape[0])).float()


@pytest.fixture(params=["llama", "qwen2"])  # qwen2: q/k/v with biases
def bf16(request, tiny_model_dir):
    bb, _ = load_backbone(tiny_model_dir(request.param), dtype=torch.bfloat16)
    bb.packs._store.clear()
    return bb


def ids() -> torch.Tensor:
    return torch.randint(0, 100, (2, 11), generator=torch.Generator().manual_seed(0))


def test_packed_forward_matches_the_plain_one(bf16):
    plain = forward(bf16, ids(), pack=False)
    assert len(bf16.packs) == 0
    fast = forward(bf16, ids(), pack=True)
    assert len(bf16.packs) == 4 * len(bf16.layers)  # qkv, o, gate|up, down per layer
    scale = plain.abs().max()
    assert (fast - plain).abs().max() <= 0.02 * scale  # bf16 rounding of different kernels, nothing more
    assert torch.equal(fast, forward(bf16, ids(), pack=True))  # deterministic


def test_an_in_place_weight_update_repacks(bf16):
    forward(bf16, ids(), pack=True)
    old = bf16.packs._store[(id(bf16.layers[0].mlp), "down", "cpu")]
    with torch.no_grad():
        bf16.layers[0].mlp.down_proj.weight.mul_(-1.0)
    plain = forward(bf16, ids(), pack=False)
    fast = forward(bf16, ids(), pack=True)
    assert bf16.packs._store[(id(bf16.layers[0].mlp), "down", "cpu")] is not old
    assert (fast - plain).abs().max() <= 0.02 * plain.abs().max()


def test_training_fp32_and_lora_never_pack(bf16, tiny_model_dir):
    bf16.packs.enabled = True
    pos = torch.arange(11).expand(2, 11)
    out = bf16(ids(), pos)  # gradients on: plain modules, so autograd reaches the weights
    out.float().sum().backward()
    assert len(bf16.packs) == 0 and bf16.layers[0].self_attn.q_proj.weight.grad is not None
    fp32, _ = load_backbone(tiny_model_dir("llama"), dtype=torch.float32)
    fp32.packs.enabled = True
    forward(fp32, ids(), pack=True)
    assert len(fp32.packs) == 0  # the exact path stays exact
    attach(bf16, layers=[0], rank=2)
    bf16.packs._store.clear()
    forward(bf16, ids(), pack=True)
    assert (id(bf16.layers[0].self_attn), "qkv", "cpu") not in bf16.packs._store  # LoRA-wrapped: the modules
    assert (id(bf16.layers[1].self_attn), "qkv", "cpu") in bf16.packs._store


def test_a_copied_backbone_starts_without_packs_and_packs_its_own(bf16):
    forward(bf16, ids(), pack=True)
    twin = copy.deepcopy(bf16)
    assert len(twin.packs) == 0 and twin.packs.enabled and twin.layers[0].mlp.packs is twin.packs
    assert torch.equal(forward(twin, ids(), pack=True), forward(bf16, ids(), pack=True))


def test_the_switch(monkeypatch):
    monkeypatch.delenv(packed.ENV_VAR, raising=False)
    assert packed.packing_wanted(300 << 20)
    assert not packed.packing_wanted(8 << 30)  # a 4B model's bf16 weights would be doubled: not by default
    monkeypatch.setenv(packed.ENV_VAR, "1")
    assert packed.packing_wanted(8 << 30)
    monkeypatch.setenv(packed.ENV_VAR, "0")
    assert not packed.packing_wanted(300 << 20)
    monkeypatch.setenv(packed.ENV_VAR, "yes please")
    with pytest.raises(InvalidInputError, match="MSA_CPU_PACK"):
        packed.packing_wanted(300 << 20)
