"""Stage-1 encoding: splitting, batching, pooling, and parity with transformers' own keys."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from msa_core.config import EncodeConfig
from msa_core.decoder.backbone import load_backbone
from msa_core.errors import InvalidInputError
from msa_core.inference.encode import DocumentPart, encode_parts, plan_batches, pool_chunks, split_documents
from msa_core.routing.projectors import RouterProjectors

TEXTS = [
    "The lighthouse of Velmora was built in 1887 by the engineer Ada Quist.",
    "Ferries leave the harbour every morning at seven and return at dusk. " * 3,
    "Paris.",
    "Memory sparse attention routes a question to the documents it needs, and only to them.",
]


def _parts(tok, texts, max_doc_tokens=10_000):
    return split_documents(tok, texts, [f"d{i}" for i in range(len(texts))], [{} for _ in texts], max_doc_tokens)


def _setup(tiny_model_dir, family="qwen3"):
    path = tiny_model_dir(family)
    backbone, _ = load_backbone(path)
    tok = AutoTokenizer.from_pretrained(str(path))
    a = backbone.args
    layers = [2, 3]
    router = RouterProjectors.random(layers, a.hidden_size, a.num_heads, a.kv_heads, a.head_dim, std=0.2)
    return path, backbone, tok, router, layers


def test_pool_chunks_matches_naive_mean():
    torch.manual_seed(0)
    x = torch.randn(3, 11, 2, 5)
    lengths = torch.tensor([11, 4, 8])
    out = pool_chunks(x, lengths, 4)
    assert out.shape == (3, 3, 2, 5)
    for b in range(3):
        n = int(lengths[b])
        for c in range(-(-n // 4)):
            seg = x[b, c * 4: min((c + 1) * 4, n)]
            assert torch.allclose(out[b, c], seg.mean(0), atol=1e-6)  # tail averaged over its real length


def test_pool_chunks_in_bf16_accumulates_in_float32():
    torch.manual_seed(0)
    x = torch.randn(2, 130, 3, 8).bfloat16() + 40.0  # large offsets: bf16 accumulation would drift
    lengths = torch.tensor([130, 70])
    got = pool_chunks(x, lengths, 64)
    assert got.dtype == torch.float32
    assert torch.allclose(got, pool_chunks(x.float(), lengths, 64), rtol=1e-6, atol=1e-5)


def test_backend_tokenizing_equals_the_tokenizer_call(tiny_model_dir):
    from msa_core.inference.encode import _token_ids_and_offsets

    _, _, tok, _, _ = _setup(tiny_model_dir)
    texts = [*TEXTS, "Ünïcödé  spaces\tand\nlines", " leading space"]
    assert tok.is_fast and tok.backend_tokenizer.truncation is None  # the backend path is the one tested
    want = tok(texts, add_special_tokens=False, return_offsets_mapping=True)
    got = _token_ids_and_offsets(tok, texts)
    assert [list(ids) for ids, _ in got] == want["input_ids"]
    assert [[tuple(o) for o in offs] for _, offs in got] == [[tuple(o) for o in offs] for offs in want["offset_mapping"]]
    tok.backend_tokenizer.enable_truncation(5)  # a backend set up to truncate: the tokenizer call decides
    try:
        assert [list(ids) for ids, _ in _token_ids_and_offsets(tok, texts)] == want["input_ids"]
    finally:
        tok.backend_tokenizer.no_truncation()


def test_plan_batches_respects_limits():
    lengths = [5, 300, 17, 64, 64, 9, 1, 120]
    batches = plan_batches(lengths, batch_size=3, max_tokens=256)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) <= 3
        assert len(b) == 1 or max(lengths[i] for i in b) * len(b) <= 256


def test_split_long_document_into_parts(tiny_model_dir):
    _, _, tok, _, _ = _setup(tiny_model_dir)
    text = TEXTS[1] * 4
    parts = split_documents(tok, [text, "short one"], ["long", "s"], [{"a": 1}, {}], max_doc_tokens=16)
    long_parts = [p for p in parts if p.parent_id == "long"]
    assert len(long_parts) > 2
    assert [p.id for p in long_parts] == [f"long#{i}" for i in range(len(long_parts))]
    assert "".join(p.text for p in long_parts) == text
    assert all(len(p.token_ids) <= 16 for p in parts)
    assert sum(len(p.token_ids) for p in long_parts) == len(tok(text, add_special_tokens=False)["input_ids"])
    assert all(p.metadata == {"a": 1} for p in long_parts)
    assert parts[-1].id == "s" and parts[-1].parent_id == "s"


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("batch_size", [8, 2])  # 2: several batches, longest first, put back in part order
def test_batched_encoding_equals_one_by_one(tiny_model_dir, family, batch_size):
    _, backbone, tok, router, layers = _setup(tiny_model_dir, family)
    parts = _parts(tok, TEXTS)
    assert len({len(p.token_ids) for p in parts}) > 2  # lengths differ, so batches reorder the parts
    cfg = EncodeConfig(chunk_size=4, storage_dtype="float32", batch_size=batch_size, max_tokens_per_batch=4096)
    together = encode_parts(backbone, router, layers, parts, cfg)
    singles = [encode_parts(backbone, router, layers, [p], cfg) for p in parts]
    for name in ("k_bar", "v_bar", "kr_bar"):
        alone = torch.cat([getattr(s, name) for s in singles], dim=1)
        assert torch.allclose(getattr(together, name), alone, atol=1e-5), name
    assert together.n_chunks == [s.n_chunks[0] for s in singles]
    assert together.ids == [p.id for p in parts]


def test_pooled_keys_match_transformers_forward(tiny_model_dir):
    """K̄ = chunk means of transformers' post-k_norm, post-RoPE keys of the document alone; K̄_R = W_KR·mean(x)."""
    path, backbone, tok, router, layers = _setup(tiny_model_dir, "qwen3")
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    part = _parts(tok, [TEXTS[1]])[0]
    cfg = EncodeConfig(chunk_size=4, storage_dtype="float32")
    enc = encode_parts(backbone, router, layers, [part], cfg)
    ids = torch.tensor([part.token_ids])
    n = ids.shape[1]
    with torch.no_grad():
        out = hf(ids, output_hidden_states=True)
        pos = torch.arange(n)[None]
        cos, sin = hf.model.rotary_emb(out.hidden_states[0], pos)
        for li, layer in enumerate(layers):
            blk = hf.model.layers[layer]
            x = blk.input_layernorm(out.hidden_states[layer])
            attn = blk.self_attn
            k = attn.k_norm(attn.k_proj(x).view(1, n, -1, attn.head_dim)).transpose(1, 2)
            v = attn.v_proj(x).view(1, n, -1, attn.head_dim).transpose(1, 2)
            _, k = apply_rotary_pos_emb(k, k, cos, sin)
            kr = router.project_keys(layer, x)[0]  # [n, kv, D], projected per token
            for c in range(-(-n // 4)):
                s = slice(c * 4, min((c + 1) * 4, n))
                assert torch.allclose(enc.k_bar[li, c], k[0, :, s].mean(1), atol=1e-5)
                assert torch.allclose(enc.v_bar[li, c], v[0, :, s].mean(1), atol=1e-5)
                assert torch.allclose(enc.kr_bar[li, c], kr[s].mean(0), atol=1e-5)


def test_storage_dtype_and_empty_input(tiny_model_dir):
    _, backbone, tok, router, layers = _setup(tiny_model_dir)
    enc = encode_parts(backbone, router, layers, _parts(tok, TEXTS[:2]), EncodeConfig(chunk_size=8))
    assert enc.k_bar.dtype == torch.float16
    with pytest.raises(InvalidInputError):
        encode_parts(backbone, router, layers, [], EncodeConfig())
    with pytest.raises(InvalidInputError, match="no tokens"):
        split_documents(tok, [""], ["e"], [{}], 10)


def test_progress_bar_reports_tokens(tiny_model_dir, capsys):
    _, backbone, tok, router, layers = _setup(tiny_model_dir)
    parts = [DocumentPart(p.id, p.parent_id, 0, p.text, p.token_ids, {}) for p in _parts(tok, TEXTS)]
    encode_parts(backbone, router, layers, parts, EncodeConfig(chunk_size=4), show_progress_bar=True)
    assert "encoding" in capsys.readouterr().err


def test_progress_shows_rate_and_time_left_from_the_first_batch(tiny_model_dir, capsys):
    import re

    from msa_core import MSAConfig, MSAModel

    cfg = MSAConfig(routing={"top_k": 2, "layers": [1, 2]}, encode={"chunk_size": 4, "batch_size": 2})
    model = MSAModel.from_pretrained(tiny_model_dir("qwen3"), config=cfg, device="cpu", dtype=torch.float32)
    texts = [f"Document {i} tells of the harbour, the ferries and the lighthouse, number {i}." for i in range(12)]
    model.index(texts, show_progress_bar=True)
    lines = [s for s in capsys.readouterr().err.replace("\r", "\n").splitlines() if s.startswith("encoding")]
    done = [s for s in lines if (m := re.search(r"\|\s*([\d.]+)k?/", s)) and float(m.group(1)) > 0]
    assert done, lines
    # e.g. "encoding:  40%|####      | 216/543 [00:00<00:01, 262tok/s]": rate and time left, no "?"
    assert re.search(r"\[\d\d:\d\d<\d\d:\d\d, [\d.]+k?tok/s\]", done[0]), done[0]


def test_encoding_batch_tokens_default_by_device():
    """max_tokens_per_batch=None: 2048 padded tokens per forward on a CPU (cache-sized), 8192 on a GPU; a value
    set in the config is kept on both; old manifests' 8192 still loads."""
    from msa_core.inference.encode import batch_tokens

    auto = EncodeConfig()
    assert auto.max_tokens_per_batch is None
    assert batch_tokens(auto, torch.device("cpu")) == 2048
    assert batch_tokens(auto, torch.device("cuda")) == 8192
    assert batch_tokens(EncodeConfig(max_tokens_per_batch=4096), torch.device("cpu")) == 4096
    assert EncodeConfig.model_validate({"max_tokens_per_batch": 8192}).max_tokens_per_batch == 8192
    with pytest.raises(ValueError):
        EncodeConfig(max_tokens_per_batch=0)


def test_the_encoding_forward_traces_as_one_graph(tiny_model_dir):
    """EncodeConfig.compile runs `pooled_batch` under torch.compile on a GPU: it must trace without a graph
    break (fullgraph) and give the eager numbers. Graphs: the first shape's, then one with dynamic batch and
    length per class of lengths (a multiple of P or not: pooling pads the others); further shapes reuse them."""
    from msa_core.inference.encode import pooled_batch

    torch._dynamo.reset()
    _, backbone, tok, router, layers = _setup(tiny_model_dir)
    traced = torch.compile(pooled_batch, fullgraph=True, backend="eager")
    tokens = _parts(tok, TEXTS)[1].token_ids
    assert len(tokens) >= 16
    torch._dynamo.utils.counters.clear()
    # (batch, length) with P = 4: first shape; lengths not a multiple of 4; multiples of 4; each class again
    for b, t in ((1, 7), (3, 10), (2, 12), (2, 9), (3, 16)):
        ids = torch.tensor([tokens[:t]] * b)
        lengths = torch.tensor([t - row for row in range(b)])  # right padding in all rows but the first
        want = pooled_batch(backbone, router, layers, ids, lengths, 4)
        got = traced(backbone, router, layers, ids, lengths, 4)
        assert want[0].shape == (len(layers), b * -(-t // 4), backbone.args.kv_heads, backbone.args.head_dim)
        for w, g in zip(want, got):
            torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-6)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 3
    torch._dynamo.reset()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (EncodeConfig.compile is GPU-only)")
def test_compiled_encoding_on_a_gpu_equals_eager(tiny_model_dir):
    _, backbone, tok, router, layers = _setup(tiny_model_dir)
    backbone, router = backbone.cuda(), router.cuda()
    parts = _parts(tok, TEXTS)
    eager = encode_parts(backbone, router, layers, parts, EncodeConfig(chunk_size=4, storage_dtype="float32",
                                                                       batch_size=2))
    compiled = encode_parts(backbone, router, layers, parts, EncodeConfig(chunk_size=4, storage_dtype="float32",
                                                                          batch_size=2, compile=True))
    for name in ("k_bar", "v_bar", "kr_bar"):
        torch.testing.assert_close(getattr(compiled, name), getattr(eager, name), atol=1e-4, rtol=1e-4)
