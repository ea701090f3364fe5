"""msa_core.kernels: the PyTorch references agree with the existing PyTorch path (router.py scoring,
backbone.Attention with Memory), and the Triton kernels agree with the references.

Triton cases run on CUDA when a GPU is present, else on CPU under Triton's interpreter
(TRITON_INTERPRET=1, set here before any kernel module loads) when `triton` is installed, else they
skip. On the device machine: `pytest tests/test_kernels.py`.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

CUDA = torch.cuda.is_available()
_KERNEL_MODULES = ("msa_core.kernels.routing_triton", "msa_core.kernels.attention_triton")
_IMPORTED_EARLY = any(m in sys.modules for m in _KERNEL_MODULES)
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton reads it when a kernel module is imported

from msa_core.decoder.backbone import Attention, BackboneArgs, LayerCache, Memory
from msa_core.decoder.rope import RopeSpec
from msa_core.errors import InvalidInputError
from msa_core.kernels import (
    chunk_scores,
    chunk_scores_reference,
    interpreting,
    memory_attention,
    memory_attention_reference,
    routing_scores,
    routing_scores_reference,
    routing_top_k,
    triton_available,
)
from msa_core.kernels._common import resolve_backend
from msa_core.kernels.attention import gather_chunks
from msa_core.kernels.routing import docs_from_chunks
from msa_core.routing.scores import reduce_to_docs, select_top_k


def _triton_skip_reason() -> str | None:
    if not triton_available():
        return "triton is not installed (pip install triton): the kernel-vs-reference cases need it"
    if CUDA:
        return None
    if not interpreting():
        return "no CUDA GPU and TRITON_INTERPRET is not 1: set it (or unset it to let this file set it)"
    if _IMPORTED_EARLY:
        return "a kernel module was imported before TRITON_INTERPRET was set; run this file on its own"
    return None


_SKIP = _triton_skip_reason()
needs_triton = pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")
DEVICE = "cuda" if CUDA else "cpu"


# --------------------------------------------------------------------------------------------
# Routing inputs
# --------------------------------------------------------------------------------------------

def _doc_layout(num_chunks: int, seed: int) -> tuple[torch.Tensor, int]:
    """chunk_doc [C]: contiguous ascending documents of 1..6 chunks, the first three single-chunk."""
    gen = torch.Generator().manual_seed(seed)
    sizes = [1, 1, 1]
    while sum(sizes) < num_chunks:
        sizes.append(int(torch.randint(1, 7, (1,), generator=gen)))
    sizes[-1] -= sum(sizes) - num_chunks
    sizes = [s for s in sizes if s > 0]
    return torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes)), len(sizes)


def _routing_inputs(b=3, t=37, hkv=3, g=3, d=64, c=203, q_dtype=torch.float32, k_dtype=torch.float16, seed=0,
                    q_scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    q = (torch.randn(b, t, hkv * g, d, generator=gen) * q_scale).to(q_dtype)
    mask = torch.zeros(b, t, dtype=torch.bool)
    mask[0, 6:] = True  # left padding
    mask[1 % b, : t - 9] = True  # right padding
    if b > 2:
        mask[2, 3:t - 2:3] = True  # holes: any pattern is allowed
    mask[3:, 1:] = True
    kr = (torch.randn(c, hkv, d, generator=gen) * 0.5 + 0.1).to(k_dtype)
    chunk_doc, n = _doc_layout(c, seed)
    return q.to(DEVICE), mask.to(DEVICE), kr.to(DEVICE), chunk_doc.to(DEVICE), n


def _brute_force_doc_scores(q, mask, kr, chunk_doc, n, normalization):
    """The definition, materialised: S[b, t, h, c], mean over h, max over routing tokens and chunks."""
    qf, kf = q.float(), kr.float()
    if normalization == "cosine":
        qf, kf = torch.nn.functional.normalize(qf, dim=-1), torch.nn.functional.normalize(kf, dim=-1)
    else:
        qf = qf / qf.shape[-1] ** 0.5
    g = q.shape[2] // kr.shape[1]
    s = torch.einsum("bthd,chd->bthc", qf, kf.repeat_interleave(g, dim=1)).mean(dim=2)
    chunk = s.masked_fill(~mask[:, :, None], float("-inf")).amax(dim=1)
    return torch.stack([chunk[:, chunk_doc == i].amax(dim=1) for i in range(n)], dim=1)


# --------------------------------------------------------------------------------------------
# Routing: reference vs the existing path
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("normalization", ["cosine", "scaled_dot"])
def test_routing_reference_is_the_definition(normalization):
    q, mask, kr, chunk_doc, n = (x.cpu() if torch.is_tensor(x) else x for x in _routing_inputs(hkv=2, g=3, c=41))
    ref = routing_scores_reference(q, mask, kr, chunk_doc, n, normalization=normalization)
    torch.testing.assert_close(ref, _brute_force_doc_scores(q, mask, kr, chunk_doc, n, normalization),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk_reduce", ["max", "mean"])
def test_docs_from_chunks_matches_reduce_to_docs(chunk_reduce):
    scores = torch.randn(2, 9)
    chunk_doc = torch.tensor([0, 0, 1, 3, 3, 3, 4, 5, 5])  # doc 2 has no chunk: -inf
    out = docs_from_chunks(scores, chunk_doc, 6, chunk_reduce)
    torch.testing.assert_close(out, reduce_to_docs(scores, chunk_doc, 6, chunk_reduce=chunk_reduce))


def test_auto_backend_falls_back_to_reference_without_cuda():
    x = torch.zeros(1)
    assert resolve_backend("auto", x) == "reference"
    assert resolve_backend("reference", x) == "reference"
    with pytest.raises(InvalidInputError, match="backend must be one of"):
        resolve_backend("cuda", x)


def test_triton_backend_on_cpu_without_interpreter_says_how(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(InvalidInputError, match="triton"):
        resolve_backend("triton", torch.zeros(1))


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_triton)])
def test_all_padding_row_is_rejected(backend):
    q, mask, kr, chunk_doc, n = _routing_inputs(c=40)
    mask[1] = False
    with pytest.raises(InvalidInputError, match=r"rows \[1\] have no valid routing token"):
        routing_scores(q, mask, kr, chunk_doc, n, backend=backend)


@needs_triton
def test_bad_chunk_doc_is_rejected():
    q, mask, kr, chunk_doc, _n = _routing_inputs(c=40)
    with pytest.raises(InvalidInputError, match=r"chunk_doc values must lie in \[0, 3\)"):
        routing_scores(q, mask, kr, chunk_doc, 3, backend="triton")


# --------------------------------------------------------------------------------------------
# Routing: Triton vs reference
# --------------------------------------------------------------------------------------------

ROUTING_CASES = [
    # hkv, g, d, q dtype, bank dtype, normalization, query_reduce, block_m
    (1, 1, 64, torch.float32, torch.float16, "cosine", "max", None),
    (3, 3, 64, torch.bfloat16, torch.float16, "cosine", "max", 16),  # SmolLM2-135M shapes
    (2, 4, 128, torch.bfloat16, torch.bfloat16, "scaled_dot", "max", 16),
    (1, 3, 128, torch.float32, torch.float32, "scaled_dot", "max", None),
    (2, 1, 64, torch.float16, torch.float16, "scaled_cosine", "mean", 16),
    (1, 4, 64, torch.float32, torch.float16, "cosine", "last", None),
]


@needs_triton
@pytest.mark.parametrize("hkv,g,d,q_dtype,k_dtype,normalization,query_reduce,block_m", ROUTING_CASES)
def test_routing_triton_matches_reference(hkv, g, d, q_dtype, k_dtype, normalization, query_reduce, block_m):
    q, mask, kr, chunk_doc, n = _routing_inputs(hkv=hkv, g=g, d=d, q_dtype=q_dtype, k_dtype=k_dtype)
    kw = {"normalization": normalization, "query_reduce": query_reduce}
    got = chunk_scores(q, mask, kr, backend="triton", block_m=block_m, **kw)
    want = chunk_scores_reference(q, mask, kr, **kw)
    scale = want.abs().max().item()
    # The kernel reproduces the fp32 reference (16-bit banks are exact; q is split into 16-bit parts).
    torch.testing.assert_close(got, want, atol=2e-6 * max(scale, 1.0), rtol=1e-5)
    docs = routing_scores(q, mask, kr, chunk_doc, n, backend="triton", block_m=block_m, **kw)
    torch.testing.assert_close(docs, routing_scores_reference(q, mask, kr, chunk_doc, n, **kw),
                               atol=2e-6 * max(scale, 1.0), rtol=1e-5)


STREAM_CASES = [
    # b, t, hkv, g, d, bank dtype, normalization, query_reduce, precomputed inverse norms
    (1, 19, 3, 3, 64, torch.bfloat16, "cosine", "max", True),  # one question, SmolLM2-135M shapes
    (1, 5, 2, 4, 128, torch.float16, "cosine", "max", False),  # short question padded to 16 rows
    (3, 37, 1, 2, 64, torch.float16, "scaled_cosine", "mean", True),  # 4 x 64 rows > 128: tiled kernel
    (4, 20, 3, 3, 64, torch.bfloat16, "cosine", "last", True),  # 4 x 32 rows: streaming, padded batch
    (2, 13, 2, 1, 64, torch.float32, "scaled_dot", "max", False),
]


@needs_triton
@pytest.mark.parametrize("b,t,hkv,g,d,k_dtype,normalization,query_reduce,inv", STREAM_CASES)
def test_routing_streaming_kernel_matches_reference_and_tiled(b, t, hkv, g, d, k_dtype, normalization,
                                                               query_reduce, inv):
    from msa_core.kernels import inverse_key_norms

    q, mask, kr, chunk_doc, n = _routing_inputs(b=b, t=t, hkv=hkv, g=g, d=d, c=150, k_dtype=k_dtype,
                                                q_dtype=torch.bfloat16)
    kw = {"normalization": normalization, "query_reduce": query_reduce}
    norms = inverse_key_norms(kr) if inv else None
    got = chunk_scores(q, mask, kr, backend="triton", key_inv_norms=norms, block_c=32, **kw)
    tiled = chunk_scores(q, mask, kr, backend="triton", stream=False, block_c=32, **kw)
    want = chunk_scores_reference(q, mask, kr, **kw)
    scale = max(want.abs().max().item(), 1.0)
    torch.testing.assert_close(got, want, atol=2e-6 * scale, rtol=1e-5)
    torch.testing.assert_close(got, tiled, atol=2e-6 * scale, rtol=1e-5)
    docs = routing_scores(q, mask, kr, chunk_doc, n, backend="triton", key_inv_norms=norms, **kw)
    torch.testing.assert_close(docs, routing_scores_reference(q, mask, kr, chunk_doc, n, **kw),
                               atol=2e-6 * scale, rtol=1e-5)


@needs_triton
@pytest.mark.parametrize("head_stages", [2, 3])
def test_streaming_kernel_with_a_pipelined_head_loop_equals_the_unrolled_one(head_stages):
    """Wide layouts (Hkv * D > 256, MSA-4B's 8 x 128) may pipeline the kv-head loop (head_stages) instead of
    unrolling it: the same products summed in the same order, so the same scores, and the reference's."""
    from msa_core.kernels import inverse_key_norms
    from msa_core.kernels.routing_triton import group_queries, stream_scores_triton

    q, mask, kr, _, _ = _routing_inputs(b=1, t=9, hkv=4, g=2, d=128, c=150, k_dtype=torch.bfloat16,
                                        q_dtype=torch.bfloat16)
    qp = torch.nn.functional.pad(q, (0, 0, 0, 0, 0, 16 - q.shape[1]))  # the streaming kernel's padded rows
    mp = torch.nn.functional.pad(mask[:1], (0, 16 - q.shape[1]))
    grouped = group_queries(qp, mp, kr.dtype, kr.shape[1], "cosine", True)
    norms = inverse_key_norms(kr)
    kw = {"normalize_k": True, "reduce_sum": False, "block_c": 32}
    unrolled = stream_scores_triton(grouped, kr, norms, head_stages=1, **kw)
    pipelined = stream_scores_triton(grouped, kr, norms, head_stages=head_stages, **kw)
    torch.testing.assert_close(pipelined, unrolled, atol=0, rtol=0)
    want = chunk_scores_reference(q[:1], mask[:1], kr)
    torch.testing.assert_close(pipelined, want, atol=2e-6 * max(want.abs().max().item(), 1.0), rtol=1e-5)


INT8_CASES = [  # (b, t, hkv, g, d, normalization, query_reduce, stream)
    (1, 9, 4, 2, 128, "cosine", "max", True),  # one question, a wide layout: the streaming kernel
    (3, 37, 3, 3, 64, "cosine", "max", False),  # the tiled kernel
    (2, 13, 2, 1, 64, "scaled_dot", "mean", True),  # raw keys: no norm, only the scale
    (4, 20, 3, 3, 64, "scaled_cosine", "last", True),
]


@needs_triton
@pytest.mark.parametrize("b,t,hkv,g,d,normalization,query_reduce,stream", INT8_CASES)
@pytest.mark.parametrize("exact,int8_queries", [(True, False), (False, False), (False, True)])
def test_int8_keys_score_as_their_dequantised_keys(b, t, hkv, g, d, normalization, query_reduce, stream, exact,
                                                   int8_queries, monkeypatch):
    """int8 routing keys (`quantized_keys`): the kernel reads half a bfloat16 bank's bytes and scores what the
    reference scores from the dequantised keys (exact: to fp32 rounding; exact=False: the queries rounded once to
    bfloat16; int8_queries: the group sums as int8 with a step each, int8 dots), and both stay near the scores of
    the keys before quantisation."""
    from msa_core.kernels import routing_triton
    from msa_core.routing.scores import quantized_keys

    monkeypatch.setattr(routing_triton, "INT8_QUERY_DOTS", int8_queries)

    q, mask, kr, chunk_doc, n = _routing_inputs(b=b, t=t, hkv=hkv, g=g, d=d, c=150, k_dtype=torch.bfloat16,
                                                q_dtype=torch.bfloat16)
    kw = {"normalization": normalization, "query_reduce": query_reduce}
    values, scales = quantized_keys(kr, normalization)
    assert values.dtype == torch.int8 and values.shape == kr.shape and scales.shape == kr.shape[:-1]
    got = chunk_scores(q, mask, values, backend="triton", key_scales=scales, stream=stream, block_c=32,
                       exact=exact, **kw)
    want = chunk_scores_reference(q, mask, values, key_scales=scales, **kw)
    scale = max(want.abs().max().item(), 1.0)
    tol = 2e-6 if exact else 4e-3
    torch.testing.assert_close(got, want, atol=tol * scale, rtol=tol)
    unquantized = chunk_scores_reference(q, mask, kr, **kw)
    torch.testing.assert_close(want, unquantized, atol=5e-3 * scale, rtol=5e-3)
    docs = routing_scores(q, mask, values, chunk_doc, n, backend="triton", key_scales=scales, exact=exact, **kw)
    torch.testing.assert_close(docs, routing_scores_reference(q, mask, values, chunk_doc, n, key_scales=scales, **kw),
                               atol=tol * scale, rtol=tol)


@needs_triton
def test_int8_keys_in_one_launch_over_layers_equal_each_layer():
    from msa_core.kernels import layer_routing_scores
    from msa_core.routing.scores import quantized_keys

    q, mask, kr, chunk_doc, n = _routing_inputs(b=1, t=9, hkv=2, g=2, d=64, c=90, k_dtype=torch.bfloat16,
                                                q_dtype=torch.bfloat16)
    kr_all = torch.stack([kr, kr.flip(0)])
    q_all = torch.stack([q[:1], q[:1].flip(1)])
    values, scales = quantized_keys(kr_all, "cosine")
    got = layer_routing_scores(q_all, mask[:1], values, chunk_doc, n, backend="triton", key_scales=scales)
    for i in range(2):
        want = routing_scores_reference(q_all[i], mask[:1], values[i], chunk_doc, n, key_scales=scales[i])
        torch.testing.assert_close(got[i], want, atol=2e-6, rtol=1e-5)


def test_quantized_keys_round_each_entry_to_half_a_step():
    from msa_core.routing import scores

    gen = torch.Generator().manual_seed(3)
    kr = torch.randn(2, 50, 3, 64, generator=gen)
    kr[0, 7, 1] = 0.0  # a zero key stays zero
    kr[1, 3, 2, 5] = 40.0  # one large entry sets its key's step
    old = scores.QUANTIZE_ROWS
    try:
        scores.QUANTIZE_ROWS = 64  # several blocks, the last one partial
        values, scales = scores.quantized_keys(kr, "cosine")
    finally:
        scores.QUANTIZE_ROWS = old
    prepared = scores.prepared_keys(kr, "cosine")
    error = (scores.dequantized_keys(values, scales) - prepared).abs()
    assert (error <= scales[..., None] / 2 + 1e-7).all()
    assert (values[0, 7, 1] == 0).all() and scales[0, 7, 1] == 0
    spans = values.abs().amax(dim=-1)[scales > 0]  # every nonzero key spans the whole grid
    assert spans.numel() == scales.numel() - 1 and torch.equal(spans, torch.full_like(spans, 127))
    raw_values, raw_scales = scores.quantized_keys(kr, "scaled_dot")
    assert (scores.dequantized_keys(raw_values, raw_scales) - kr).abs().max() <= raw_scales.max() / 2 + 1e-6


def test_int8_keys_are_checked():
    from msa_core.routing.scores import quantized_keys

    q, mask, kr, _, _ = _routing_inputs(c=40)
    values, scales = quantized_keys(kr, "cosine")
    with pytest.raises(InvalidInputError, match="come with their key_scales"):
        chunk_scores(q, mask, values)
    with pytest.raises(InvalidInputError, match="come with their key_scales"):
        chunk_scores(q, mask, kr, key_scales=scales)
    with pytest.raises(InvalidInputError, match="key_scales must be float32"):
        chunk_scores(q, mask, values, key_scales=scales.double())


@needs_triton
def test_int8_score_keys_through_the_kernel_equal_the_pytorch_path(tiny_model_dir):
    """A model routing with score_keys='int8' and kernel='triton' (Triton's interpreter on a CPU) ranks as the
    PyTorch path scoring the same int8 keys, every layer's scores within the kernel's bf16 query rounding."""
    from msa_core.config import MSAConfig
    from msa_core.model import MSAModel

    cfg = MSAConfig(routing={"layers": [1, 2, 3], "top_k": 2, "score_keys": "int8"},
                    encode={"chunk_size": 4, "storage_dtype": "float32"})
    model = MSAModel.from_pretrained(tiny_model_dir("llama"), router="random", config=cfg, device="cpu")
    docs = ["The lighthouse of Velmora was built in 1887.", "Ferries leave the harbour at seven.",
            "Paris is the capital of France.", "Cheese from the island is aged in caves."]
    bank = model.index(docs, ids=["a", "b", "c", "d"])
    want = {h.id: h for h in model.retrieve("Who built the lighthouse?", bank, k=4, layer_scores=True)}
    model.config.routing.kernel = "triton"
    got = model.retrieve("Who built the lighthouse?", bank, k=4, layer_scores=True)
    assert {h.id for h in got} == set(want)
    for h in got:
        assert all(abs(h.layer_scores[layer] - want[h.id].layer_scores[layer]) <= 4e-3 for layer in h.layer_scores)


def test_inverse_key_norms_are_checked():
    from msa_core.kernels import inverse_key_norms

    q, mask, kr, _, _ = _routing_inputs(c=40)
    with pytest.raises(InvalidInputError, match="key_inv_norms must be float32"):
        chunk_scores(q, mask, kr, key_inv_norms=inverse_key_norms(kr)[:-1])
    norms = inverse_key_norms(kr)
    torch.testing.assert_close(kr.float() * norms[..., None], torch.nn.functional.normalize(kr.float(), dim=-1))


@needs_triton
@pytest.mark.parametrize("k_dtype", [torch.float16, torch.float32])
def test_routing_fast_mode_is_close(k_dtype):
    q, mask, kr, chunk_doc, n = _routing_inputs(hkv=3, g=3, c=90, k_dtype=k_dtype)
    got = routing_scores(q, mask, kr, chunk_doc, n, backend="triton", exact=False)
    torch.testing.assert_close(got, routing_scores_reference(q, mask, kr, chunk_doc, n), atol=2e-3, rtol=2e-3)


@needs_triton
def test_routing_triton_large_scaled_dot_queries_do_not_overflow_fp16():
    q, mask, kr, chunk_doc, n = _routing_inputs(hkv=1, g=2, c=70, q_scale=3e4)
    got = routing_scores(q, mask, kr, chunk_doc, n, normalization="scaled_dot", chunk_reduce="mean",
                         backend="triton", block_c=32)
    want = routing_scores_reference(q, mask, kr, chunk_doc, n, normalization="scaled_dot", chunk_reduce="mean")
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, atol=1e-5 * want.abs().max().item(), rtol=1e-5)


@needs_triton
def test_routing_top_k_matches_select_top_k():
    q, mask, kr, chunk_doc, n = _routing_inputs(hkv=3, g=3, c=120, seed=3)
    allowed = torch.ones(n, dtype=torch.bool, device=DEVICE)
    allowed[::4] = False
    values, idx = routing_top_k(q, mask, kr, chunk_doc, n, 5, allowed=allowed, backend="triton")
    ref = routing_scores_reference(q, mask, kr, chunk_doc, n)
    want_values, want_idx = select_top_k(ref, 5, allowed)
    assert torch.equal(idx, want_idx)
    torch.testing.assert_close(values, want_values, atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# Memory attention: inputs, reference vs backbone.Attention
# --------------------------------------------------------------------------------------------

def _attention_inputs(b=2, hkv=2, g=3, d=64, tq=5, tk=23, m=11, c=40, dtype=torch.float32,
                      bank_dtype=torch.float16, left_pad=(0, 4), seed=0, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    q, k, v = randn(b, hkv * g, tq, d).to(dtype), randn(b, hkv, tk, d).to(dtype), randn(b, hkv, tk, d).to(dtype)
    k_bar, v_bar = randn(c, hkv, d).to(bank_dtype), randn(c, hkv, d).to(bank_dtype)
    chunk_idx = torch.randint(0, max(c, 1), (b, m), generator=gen)
    chunk_valid = torch.rand(b, m, generator=gen) > 0.25
    if m:
        chunk_valid[:, 0] = c > 0
    if b > 1 and m > 2:
        chunk_valid[1, m // 2:] = False  # a row with fewer chunks: right padding, as generate.py builds it
    chunk_idx = torch.where(chunk_valid, chunk_idx, -7)  # padding indices are never read
    local_valid = torch.ones(b, tk, dtype=torch.bool)
    for row, pad in enumerate(left_pad[:b]):
        local_valid[row, :pad] = False
    return tuple(x.to(device) for x in (q, k_bar, v_bar, chunk_idx, chunk_valid, k, v, local_valid))


def _identity_attention(h, hkv, d, qkv):
    """backbone.Attention whose projections hand back the given q, k, v and whose o_proj is the identity."""
    rope = RopeSpec(theta=10000.0, dim=d)
    args = BackboneArgs(family="llama", vocab_size=8, hidden_size=h * d, intermediate_size=8, num_layers=1,
                        num_heads=h, kv_heads=hkv, head_dim=d, rms_norm_eps=1e-6, rope=rope)
    attn = Attention(args)
    with torch.no_grad():
        attn.o_proj.weight.copy_(torch.eye(h * d))
    attn.project = lambda x, cos, sin: qkv.pop(0)
    return attn


def _heads_last(out):
    return out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)


def test_attention_reference_matches_backbone_prefill():
    q, k_bar, v_bar, idx, cv, k, v, lv = _attention_inputs(tq=9, tk=9, device="cpu")
    b, h, tq, d = q.shape
    attn = _identity_attention(h, k.shape[1], d, [(q, k, v)])
    memory = Memory(*gather_chunks(k_bar, v_bar, idx, cv, q.dtype), cv)
    want = attn(torch.zeros(b, tq, h * d), None, None, lv, None, memory)
    got = memory_attention_reference(q, k_bar, v_bar, idx, cv, k, v, lv)
    torch.testing.assert_close(_heads_last(got), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_attention_reference_matches_backbone_decode(causal):
    """Prefill fills a LayerCache (memory, then prompt); then a block of 2 new tokens attends to it."""
    q, k_bar, v_bar, idx, cv, k, v, lv = _attention_inputs(tq=2, tk=12, device="cpu")
    b, h, _, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    prompt = (torch.randn(b, h, tk - 2, d), k[:, :, :-2], v[:, :, :-2])
    attn = _identity_attention(h, hkv, d, [prompt, (q, k[:, :, -2:], v[:, :, -2:])])
    cache = LayerCache(b, hkv, d, q.dtype, q.device, capacity=4)
    memory = Memory(*gather_chunks(k_bar, v_bar, idx, cv, q.dtype), cv)
    attn(torch.zeros(b, tk - 2, h * d), None, None, lv[:, :-2], cache, memory)
    want = attn(torch.zeros(b, 2, h * d), None, None, lv[:, -2:], cache, None, causal=causal)
    got = memory_attention_reference(q, k_bar, v_bar, idx, cv, k, v, lv, causal=causal)
    torch.testing.assert_close(_heads_last(got), want, atol=1e-5, rtol=1e-5)


def test_attention_rejects_bad_inputs():
    q, k_bar, v_bar, idx, cv, k, v, lv = _attention_inputs(tq=5, tk=23, device="cpu")
    with pytest.raises(InvalidInputError, match="Tq <= Tk"):
        memory_attention(q, k_bar, v_bar, idx, cv, k[:, :, :3], v[:, :, :3], lv[:, :3])
    bad = idx.clone()
    bad[1, 0] = k_bar.shape[0]
    with pytest.raises(InvalidInputError, match=r"chunk_idx\[1, 0\] = 40 is a valid slot outside"):
        memory_attention(q, k_bar, v_bar, bad, cv, k, v, lv)
    with pytest.raises(InvalidInputError, match="multiple of kv heads"):
        memory_attention(q[:, :5], k_bar, v_bar, idx, cv, k, v, lv)


# --------------------------------------------------------------------------------------------
# Memory attention: Triton vs reference
# --------------------------------------------------------------------------------------------

def _case(name, causal=True, num_splits=None, block_m=None, block_n=None, **inputs):
    return pytest.param(inputs, causal, num_splits, block_m, block_n, id=name)


ATTENTION_CASES = [
    _case("decode-smollm2", hkv=3, g=3, d=64, tq=1, tk=29, m=13, dtype=torch.bfloat16),
    _case("decode-split", num_splits=3, hkv=2, g=4, d=128, tq=1, tk=70, m=20, dtype=torch.float32),
    _case("prefill-tiles", block_m=16, block_n=16, hkv=2, g=1, d=64, tq=19, tk=19, m=9, dtype=torch.float32),
    _case("prefill-cache-no-memory", block_n=16, hkv=1, g=3, d=128, tq=7, tk=40, m=0, dtype=torch.bfloat16,
          bank_dtype=torch.float32),
    _case("noncausal-split", causal=False, num_splits=2, block_n=16, hkv=1, g=4, d=64, tq=4, tk=30, m=6,
          dtype=torch.float16),
    _case("prefill-fp32-bank-bf16", num_splits=2, block_m=16, block_n=16, hkv=3, g=1, d=64, tq=12, tk=12, m=5,
          dtype=torch.float32, bank_dtype=torch.bfloat16, left_pad=(5, 0)),
]
ATOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


@needs_triton
@pytest.mark.parametrize("inputs,causal,num_splits,block_m,block_n", ATTENTION_CASES)
def test_attention_triton_matches_reference(inputs, causal, num_splits, block_m, block_n):
    args = _attention_inputs(**inputs)
    got = memory_attention(*args, causal=causal, backend="triton", num_splits=num_splits, block_m=block_m,
                           block_n=block_n)
    want = memory_attention_reference(*args, causal=causal)
    assert got.dtype == want.dtype and got.shape == want.shape
    atol = ATOL[got.dtype]
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=atol)


@needs_triton
def test_attention_triton_without_local_valid_and_empty_bank():
    q, _, _, _, _, k, v, _ = _attention_inputs(hkv=1, g=1, tq=3, tk=8, m=0)
    empty = torch.empty(0, 1, q.shape[-1], dtype=torch.float16, device=DEVICE)
    idx = torch.zeros(q.shape[0], 2, dtype=torch.long, device=DEVICE)
    cv = torch.zeros(q.shape[0], 2, dtype=torch.bool, device=DEVICE)
    got = memory_attention(q, empty, empty, idx, cv, k, v, backend="triton")
    want = memory_attention_reference(q, empty, empty, idx, cv, k, v)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


# --------------------------------------------------------------------------------------------
# The model routes through the kernel (MemoryRouter wiring)
# --------------------------------------------------------------------------------------------

@needs_triton
@pytest.mark.parametrize("normalization", ["cosine", "scaled_dot"])
def test_model_routing_through_the_kernel_matches_the_reference(tiny_model_dir, normalization):
    from msa_core import MSAConfig, MSAModel

    texts = [f"document {i} about {w} and {w}s" * (1 + i % 3) for i, w in
             enumerate(["ships", "trains", "cats", "bread", "rain", "stars", "maps", "tea", "glass"])]
    models = {}
    for kernel in ("triton", "reference"):
        cfg = MSAConfig(routing={"top_k": 3, "normalization": normalization, "kernel": kernel, "exact_scores": True},
                        encode={"chunk_size": 4})
        models[kernel] = MSAModel.from_pretrained(tiny_model_dir("llama"), config=cfg, router="random", device=DEVICE)
    bank = models["reference"].index(texts).to(DEVICE)  # a CPU bank routes with the reference: give it the GPU
    questions = ["which document is about trains?", "tea and glass"]
    got = models["triton"].retrieve(questions, bank, k=4, layer_scores=True)
    want = models["reference"].retrieve(questions, bank, k=4, layer_scores=True)
    for g_row, w_row in zip(got, want):
        assert [h.id for h in g_row] == [h.id for h in w_row]
        for g, w in zip(g_row, w_row):
            assert g.score == pytest.approx(w.score, abs=1e-5)
    answers = {k: m.answer("tell me about trains", bank, k=3, max_new_tokens=4, temperature=0.0).to_dict()
               for k, m in models.items()}
    assert answers["triton"]["layer_selections"] == answers["reference"]["layer_selections"]
    assert answers["triton"]["answer"] == answers["reference"]["answer"]


@needs_triton
@pytest.mark.parametrize("b,t,normalization,inv", [(1, 19, "cosine", True), (2, 13, "scaled_dot", False),
                                                   (4, 40, "cosine", False)])  # 4 x 64 rows: layer by layer
def test_layer_routing_scores_one_launch_equals_each_layer(b, t, normalization, inv):
    from msa_core.kernels import inverse_key_norms, layer_routing_scores

    _, mask, _, chunk_doc, n = _routing_inputs(b=b, t=t, hkv=3, g=3, d=64, c=130, seed=0)
    layers = []  # three routing layers: their own queries and keys, one mask and document layout
    for seed in range(3):
        q, _, kr, _, _ = _routing_inputs(b=b, t=t, hkv=3, g=3, d=64, c=130, k_dtype=torch.float16,
                                         q_dtype=torch.bfloat16, seed=seed + 1)
        layers.append((q, kr))
    q_all = torch.stack([x for x, _ in layers])
    kr_all = torch.stack([k for _, k in layers])
    norms = inverse_key_norms(kr_all) if inv else None
    got = layer_routing_scores(q_all, mask, kr_all, chunk_doc, n, normalization=normalization, backend="triton",
                               key_inv_norms=norms)
    for i in range(3):
        want = routing_scores_reference(q_all[i], mask, kr_all[i], chunk_doc, n, normalization=normalization)
        scale = max(want[torch.isfinite(want)].abs().max().item(), 1.0)
        torch.testing.assert_close(got[i], want, atol=2e-6 * scale, rtol=1e-5)
    ref = layer_routing_scores(q_all, mask, kr_all, chunk_doc, n, normalization=normalization, backend="reference")
    assert ref.shape == got.shape
    with pytest.raises(InvalidInputError, match=r"\[L, B, T, H, D\]"):
        layer_routing_scores(q_all[0], mask, kr_all, chunk_doc, n)


def test_routing_copies_are_made_once_per_bank_state(tiny_model_dir):
    import gc

    from msa_core import MSAConfig, MSAModel
    from msa_core.inference.memory_router import PER_STATE as _ROUTING_COPIES
    from msa_core.inference.memory_router import routing_on

    model = MSAModel.from_pretrained(tiny_model_dir("llama"), config=MSAConfig(encode={"chunk_size": 4}),
                                     router="random", device="cpu")
    bank = model.index(["one document about ships", "another about trains", "a third about tea"])
    own = routing_on(bank, bank.device)
    assert own[0] is bank.kr_bar and own[1] is bank.chunk_doc  # where they live: no copy
    first, again = routing_on(bank, torch.device("meta")), routing_on(bank, torch.device("meta"))
    assert first[0] is again[0] and first[0].device.type == "meta" and first[0].shape == bank.kr_bar.shape
    key = (id(bank.kr_bar), "meta")
    assert key in _ROUTING_COPIES
    del own
    bank.delete([bank.ids()[0]])  # a new bank state: the old copy goes with the old keys
    gc.collect()
    assert key not in _ROUTING_COPIES


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_gpu_model_routes_a_cpu_bank_through_the_kernel(tiny_model_dir):
    from msa_core import MSAConfig, MSAModel
    from msa_core.inference.memory_router import PER_STATE as _ROUTING_COPIES

    cfg = MSAConfig(routing={"top_k": 3, "exact_scores": True}, encode={"chunk_size": 4})
    model = MSAModel.from_pretrained(tiny_model_dir("llama"), config=cfg, router="random", device="cuda")
    texts = [f"document {i} about {w}" for i, w in enumerate(["ships", "trains", "cats", "bread", "rain", "tea"])]
    cpu_bank = model.index(texts)
    got = model.retrieve("which one is about trains?", cpu_bank, k=4)
    assert (id(cpu_bank.kr_bar), "cuda:0") in _ROUTING_COPIES or (id(cpu_bank.kr_bar), "cuda") in _ROUTING_COPIES
    want = model.retrieve("which one is about trains?", cpu_bank.to("cuda"), k=4)
    assert [h.id for h in got] == [h.id for h in want]
    model.config.routing.kernel = "reference"
    ref = model.retrieve("which one is about trains?", cpu_bank, k=4)
    assert [h.id for h in got] == [h.id for h in ref]
