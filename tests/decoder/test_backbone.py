"""Our decoder reproduces transformers' logits (fp32, <= 1e-4) for prefill and 16 decode steps."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from msa_core.decoder.backbone import load_backbone
from msa_core.errors import ModelLoadError

ROPES = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 128},
}


def _run_ours(model, ids: torch.Tensor, steps: int) -> list[torch.Tensor]:
    b, t = ids.shape
    caches = model.new_caches(b, capacity=8)  # small on purpose: exercises cache growth
    pos = torch.arange(t).expand(b, t)
    logits = [model.logits(model(ids, pos, caches=caches))[:, -1]]
    for step in range(steps):
        nxt = logits[-1].argmax(-1, keepdim=True)
        pos = torch.full((b, 1), t + step)
        logits.append(model.logits(model(nxt, pos, caches=caches))[:, -1])
    return logits


def _run_hf(hf, ids: torch.Tensor, steps: int) -> list[torch.Tensor]:
    out = hf(ids, use_cache=True)
    logits, past = [out.logits[:, -1].float()], out.past_key_values
    for _ in range(steps):
        nxt = logits[-1].argmax(-1, keepdim=True)
        out = hf(nxt, past_key_values=past, use_cache=True)
        logits.append(out.logits[:, -1].float())
        past = out.past_key_values
    return logits


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("rope", list(ROPES))
def test_prefill_and_decode_match_transformers(tiny_model_dir, family, rope):
    if rope == "dynamic" and family != "llama":
        pytest.skip("dynamic NTK is a Llama-family option")
    path = tiny_model_dir(family, rope=ROPES[rope])
    ours, _ = load_backbone(path)
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    torch.manual_seed(1)
    ids = torch.randint(3, ours.args.vocab_size, (2, 11))
    with torch.no_grad():
        a, b = _run_ours(ours, ids, 16), _run_hf(hf, ids, 16)
    for step, (x, y) in enumerate(zip(a, b)):
        assert (x - y).abs().max().item() <= 1e-4, f"step {step}"


def test_dynamic_rope_beyond_trained_length(tiny_model_dir):
    path = tiny_model_dir("llama", rope=ROPES["dynamic"], max_position_embeddings=16)
    ours, _ = load_backbone(path)
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    ids = torch.randint(3, ours.args.vocab_size, (1, 40))
    with torch.no_grad():
        x = ours.logits(ours(ids, torch.arange(40)[None]))
        y = hf(ids).logits.float()
    assert (x - y).abs().max().item() <= 1e-4


def test_left_padded_batch_equals_single_rows(tiny_model_dir):
    ours, _ = load_backbone(tiny_model_dir("qwen3"))
    torch.manual_seed(2)
    long, short = torch.randint(3, 300, (1, 9)), torch.randint(3, 300, (1, 5))
    ids = torch.cat([long, torch.cat([torch.zeros(1, 4, dtype=torch.long), short], 1)])
    valid = ids != 0
    valid[0] = True
    pos = (valid.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        batched = ours.logits(ours(ids, pos, valid=valid, caches=ours.new_caches(2)))[:, -1]
        single_long = ours.logits(ours(long, torch.arange(9)[None]))[:, -1]
        single_short = ours.logits(ours(short, torch.arange(5)[None]))[:, -1]
    assert torch.allclose(batched[0], single_long[0], atol=1e-5)
    assert torch.allclose(batched[1], single_short[0], atol=1e-5)
    assert torch.isfinite(batched).all()


def test_missing_folder_and_unsupported_family(tmp_path):
    with pytest.raises(ModelLoadError, match="config.json"):
        load_backbone(tmp_path / "nope")
    (tmp_path / "config.json").write_text('{"model_type": "gpt2", "vocab_size": 10}')
    with pytest.raises(ModelLoadError):
        load_backbone(tmp_path)


def test_fingerprint_is_stable_and_sensitive(tiny_model_dir):
    path = tiny_model_dir("llama")
    a, _ = load_backbone(path)
    b, _ = load_backbone(path)
    assert a.fingerprint() == b.fingerprint()
    with torch.no_grad():
        b.layers[0].mlp.up_proj.weight[0, 0] += 1.0
    assert a.fingerprint() != b.fingerprint()


def test_rope_keeps_one_frequency_table_per_device():
    """A call on another device must not replace the table a captured CUDA graph reads (engine.QueryForward)."""
    from msa_core.decoder.rope import RopeSpec, RotaryEmbedding

    rope = RotaryEmbedding(RopeSpec(rope_type="default", theta=10000.0, dim=8))
    positions = torch.arange(4)[None]
    cos, _ = rope(positions, torch.float32)
    table = rope._inv_freq_on[positions.device]
    rope(positions.to("meta"), torch.float32)
    again, _ = rope(positions, torch.float32)
    assert rope._inv_freq_on[positions.device] is table and torch.equal(cos, again)


@pytest.mark.parametrize("heads,kv,t", [(9, 3, 37), (4, 4, 5), (8, 2, 1)])
def test_causal_matmul_attention_equals_sdpa(heads, kv, t):
    """The CPU bf16 encoding path's attention (two grouped matmuls) is causal attention: equal to SDPA in
    float32, and in bfloat16 as close to the float32 result as SDPA's own bf16 kernel is (scores rounded)."""
    from msa_core.decoder.backbone import causal_matmul_attention

    gen = torch.Generator().manual_seed(t)
    q = torch.randn(3, heads, t, 16, generator=gen) * 2
    k, v = torch.randn(3, kv, t, 16, generator=gen) * 2, torch.randn(3, kv, t, 16, generator=gen)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(causal_matmul_attention(q, k, v), want, atol=1e-5, rtol=1e-5)
    qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
    sdpa_err = (torch.nn.functional.scaled_dot_product_attention(qb, kb, vb, is_causal=True, enable_gqa=True).float()
                - want).abs().max().item()
    ours_err = (causal_matmul_attention(qb, kb, vb).float() - want).abs().max().item()
    assert ours_err <= max(4 * sdpa_err, 0.05)
    future = torch.randn(3, kv, t, 16, generator=gen)  # a key's change never reaches an earlier query
    k2 = torch.cat([k[:, :, : t // 2], future[:, :, t // 2:]], dim=2)
    early = causal_matmul_attention(q, k2, v)[:, :, : t // 2]
    torch.testing.assert_close(early, causal_matmul_attention(q, k, v)[:, :, : t // 2], atol=0, rtol=0)


def test_bf16_cpu_encoding_blocks_take_the_matmul_attention(tiny_model_dir, monkeypatch):
    """A bf16 backbone on a CPU encodes blocks up to MATMUL_ATTENTION_MAX_TOKENS through causal_matmul_attention,
    longer ones through SDPA; float32 always through SDPA (the exact path)."""
    from msa_core.decoder import backbone as bb_module

    calls = []
    real = bb_module.causal_matmul_attention
    monkeypatch.setattr(bb_module, "causal_matmul_attention", lambda *a: calls.append(a[0].shape[2]) or real(*a))
    monkeypatch.setattr(bb_module, "MATMUL_ATTENTION_MAX_TOKENS", 6)
    for dtype, t, used in ((torch.bfloat16, 6, True), (torch.bfloat16, 7, False), (torch.float32, 6, False)):
        calls.clear()
        model, _ = load_backbone(tiny_model_dir("llama"), device="cpu", dtype=dtype)
        ids = torch.randint(0, model.args.vocab_size, (2, t))
        with torch.no_grad():
            model(ids, torch.arange(t).expand_as(ids))
        assert bool(calls) == used and all(n == t for n in calls)
