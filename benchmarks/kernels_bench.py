"""Triton kernels (msa_core.kernels) against their PyTorch references on one CUDA GPU. Not run in CI.

    python benchmarks/kernels_bench.py [--out benchmarks/results/kernels_bench.json] [--quick] [--only routing]

Self-contained: random tensors, no model weights; about 1 minute on an H100 (plus Triton compiles).
Each case reports GPU time (*_gpu_ms: the call captured in a CUDA graph and replayed, so Python and
launch overhead are excluded) and, where it matters, the eager call (*_ms: what a Python caller waits,
the validation sync included).
- routing: banks of 1M and 10M tokens (C = tokens / 64 chunks, 8 chunks per document) with the default
  SmolLM2-135M routing shapes (H=9, Hkv=3, D=64) and a Qwen3-4B-like layout (H=32, Hkv=8, D=128);
  K̄_R in fp16, B questions of 64 routing tokens (bf16). Times the kernel alone (chunk scores), the
  whole Triton path (doc scores: query prep, checks, kernel, segment max) and the PyTorch reference
  (router.score_chunks + reduce_to_docs on the same GPU). Bandwidth = bytes of K̄_R / kernel time,
  compared with the H100 SXM's ~3.35 TB/s; a few tile sizes and exact=False are timed too.
  L2 is flushed before every timed call.
- attention: the kernel (chunks read by index from a 1M-token bank) against SDPA with an explicit
  boolean mask on pre-gathered tensors, and against the full reference (gather + mask + SDPA).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from msa_core.kernels import chunk_scores_reference, memory_attention, routing_scores, routing_scores_reference
from msa_core.kernels.attention import gather_chunks

H100_BANDWIDTH = 3.35e12  # bytes/s, H100 SXM HBM3
CHUNK = 64
CHUNKS_PER_DOC = 8


def time_cuda(fn, reps: int, flush: torch.Tensor | None) -> list[float]:
    """Seconds per call (CUDA events), one warm-up call; `flush` is overwritten before each call to empty L2."""
    fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        if flush is not None:
            flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end) / 1e3)
    return out


def time_graph(fn, reps: int, flush: torch.Tensor | None) -> list[float]:
    """GPU time only: `fn` captured once in a CUDA graph, the replays timed (no Python or launch overhead)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return time_cuda(graph.replay, reps, flush)


def med_ms(times: list[float]) -> float:
    return statistics.median(times) * 1e3


def routing_case(tokens: int, h: int, hkv: int, d: int, b: int, reps: int, flush: torch.Tensor) -> dict:
    from msa_core.kernels.routing_triton import chunk_scores_triton, group_queries

    c = tokens // CHUNK
    gen = torch.Generator(device="cuda").manual_seed(0)
    kr = torch.randn(c, hkv, d, device="cuda", generator=gen).half()
    chunk_doc = torch.arange(c, device="cuda") // CHUNKS_PER_DOC
    n = int(chunk_doc[-1]) + 1
    t = 64
    q = torch.randn(b, t, h, d, device="cuda", generator=gen).bfloat16()
    mask = torch.ones(b, t, dtype=torch.bool, device="cuda")
    mask[:, :5] = False  # some left padding
    kw = {"normalization": "cosine", "query_reduce": "max"}
    grouped = group_queries(q, mask, kr.dtype, hkv, "cosine")
    kr_bytes = kr.numel() * kr.element_size()
    row = {"tokens": tokens, "chunks": c, "docs": n, "batch": b, "routing_tokens": t, "num_heads": h,
           "kv_heads": hkv, "head_dim": d, "kr_bar_bytes": kr_bytes}
    # the kernel alone, GPU time (CUDA graph replay): the default launch and a few variants
    grouped_fast = group_queries(q, mask, kr.dtype, hkv, "cosine", exact=False)
    variants = {
        "default": (grouped, {}),
        "block_c32": (grouped, {"block_c": 32}),
        "block_c64": (grouped, {"block_c": 64}),
        "block_c128": (grouped, {"block_c": 128}),
        "fast_default": (grouped_fast, {"exact": False}),
    }
    sweep = {}
    for name, (gq, extra) in variants.items():
        sweep[name] = med_ms(time_graph(
            lambda gq=gq, extra=extra: chunk_scores_triton(gq, kr, normalize_k=True, reduce_sum=False, **extra),
            reps, flush))
    kernel_ms = sweep["default"]
    best = min(sweep, key=sweep.get)
    row.update({
        "kernel_gpu_ms_by_variant": sweep, "kernel_gpu_ms": kernel_ms,
        "kernel_bandwidth_GBps": kr_bytes / (kernel_ms / 1e3) / 1e9,
        "kernel_fraction_of_h100_peak": kr_bytes / (kernel_ms / 1e3) / H100_BANDWIDTH,
        "kernel_best_variant": best,
        "kernel_best_fraction_of_h100_peak": kr_bytes / (sweep[best] / 1e3) / H100_BANDWIDTH,
    })
    # the whole Triton path: eager call (Python, launches and the validation sync included) and GPU time
    row["triton_doc_scores_ms"] = med_ms(time_cuda(
        lambda: routing_scores(q, mask, kr, chunk_doc, n, backend="triton", **kw), reps, flush))
    row["triton_doc_scores_gpu_ms"] = med_ms(time_graph(
        lambda: routing_scores(q, mask, kr, chunk_doc, n, backend="triton", validate=False, **kw), reps, flush))
    row["reference_doc_scores_ms"] = med_ms(time_cuda(
        lambda: routing_scores_reference(q, mask, kr, chunk_doc, n, **kw), max(3, reps // 3), flush))
    row["speedup_doc_scores"] = row["reference_doc_scores_ms"] / row["triton_doc_scores_ms"]
    got = routing_scores(q, mask, kr, chunk_doc, n, backend="triton", **kw)
    want = routing_scores_reference(q, mask, kr, chunk_doc, n, **kw)
    row["max_abs_err_vs_reference"] = (got - want).abs().max().item()
    row["top16_equal"] = bool(torch.equal(got.topk(16).indices.sort().values, want.topk(16).indices.sort().values))
    return row


def stream_sweep(tokens: int, h: int, hkv: int, d: int, t: int, reps: int, flush: torch.Tensor,
                 dtype: torch.dtype = torch.bfloat16, retrieve_only: bool = False) -> dict:
    """One question (B=1, t routing tokens): the streaming kernel's tile / pipeline / grid variants, and
    the tiled kernel at the same shape. Bandwidth counts every byte the kernel must read (K̄_R, plus the
    [C, Hkv] fp32 inverse norms when given). retrieve_only: only what retrieve runs (exact=False, inverse norms)."""
    import triton

    from msa_core.kernels import inverse_key_norms
    from msa_core.kernels.routing_triton import (
        chunk_scores_triton,
        group_queries,
        stream_scores_triton,
        stream_shape,
    )

    c = tokens // CHUNK
    gen = torch.Generator(device="cuda").manual_seed(0)
    kr = torch.randn(c, hkv, d, device="cuda", generator=gen).to(dtype)
    inv = inverse_key_norms(kr)
    q = torch.randn(1, t, h, d, device="cuda", generator=gen).bfloat16()
    mask = torch.ones(1, t, dtype=torch.bool, device="cuda")
    _, tp = stream_shape(1, t)
    qp = torch.nn.functional.pad(q, (0, 0, 0, 0, 0, tp - t))
    mp = torch.nn.functional.pad(mask, (0, tp - t))
    kr_bytes = kr.numel() * kr.element_size()
    inv_bytes = inv.numel() * 4
    want = chunk_scores_reference(q, mask, kr)
    rows = []
    wide = hkv * d > 256  # whole blocks cannot be pipelined there; their kv-head loop can (head_stages)
    for exact in ((False,) if retrieve_only else (True, False)):
        grouped = group_queries(qp, mp, kr.dtype, hkv, "cosine", exact)
        for with_inv in ((True,) if retrieve_only else (True, False)):
            for block_c in ((64, 128) if d <= 64 else (32, 64, 128)):
                for stages, head_stages in (((1, 1), (1, 2), (1, 3), (1, 4)) if wide else ((1, 1), (3, 1))):
                    for warps in (4, 8):
                        for per_sm in (2, 4, 10**6):  # 10**6: one program per block (no persistence)
                            v = {"exact": exact, "inv_norms": with_inv, "block_c": block_c, "num_stages": stages,
                                 "head_stages": head_stages, "num_warps": warps, "programs_per_sm": per_sm}

                            def fn(grouped=grouped, v=v):
                                return stream_scores_triton(grouped, kr, inv if v["inv_norms"] else None,
                                                            normalize_k=True, reduce_sum=False, exact=v["exact"],
                                                            block_c=v["block_c"], num_stages=v["num_stages"],
                                                            programs_per_sm=v["programs_per_sm"],
                                                            num_warps=v["num_warps"], head_stages=v["head_stages"])
                            try:
                                got = fn()
                                ms = med_ms(time_graph(fn, reps, flush))
                            except (triton.runtime.errors.OutOfResources, RuntimeError) as e:  # shared memory etc.
                                rows.append({**v, "error": str(e)[:120]})
                                continue
                            read = kr_bytes + (inv_bytes if with_inv else 0)
                            rows.append({**v, "gpu_ms": ms, "bytes_read": read,
                                         "bandwidth_tb_s": read / (ms / 1e3) / 1e12,
                                         "fraction_of_h100_peak": read / (ms / 1e3) / H100_BANDWIDTH,
                                         "max_abs_err_vs_reference": (got - want).abs().max().item()})
    grouped = group_queries(q, mask, kr.dtype, hkv, "cosine", True)
    tiled_ms = med_ms(time_graph(lambda: chunk_scores_triton(grouped, kr, normalize_k=True, reduce_sum=False),
                                 reps, flush))
    ok = [r for r in rows if "gpu_ms" in r]
    best = {e: min((r for r in ok if r["exact"] == e), key=lambda r: r["gpu_ms"], default=None) for e in (True, False)}
    return {"tokens": tokens, "chunks": c, "num_heads": h, "kv_heads": hkv, "head_dim": d, "routing_tokens": t,
            "bank_dtype": str(dtype).replace("torch.", ""), "kr_bar_bytes": kr_bytes,
            "tiled_kernel_gpu_ms": tiled_ms, "tiled_fraction_of_h100_peak": kr_bytes / (tiled_ms / 1e3) / H100_BANDWIDTH,
            "best_exact": best[True], "best_fast": best[False], "variants": rows}


def int8_sweep(tokens: int, h: int, hkv: int, d: int, t: int, reps: int, flush: torch.Tensor) -> dict:
    """One question against int8 routing keys (routing.score_keys='int8') beside the same keys in bfloat16 with the
    default launch, in one run: the streaming kernel's block / head-stage / warp / grid variants on the int8 keys
    and their scales. Bandwidth counts what each must read (keys plus their [C, Hkv] fp32 scales or norms).
    Errors: against the reference on the dequantised keys, and against the bf16 keys' reference."""
    import triton

    from msa_core.kernels import inverse_key_norms
    from msa_core.kernels.routing_triton import group_queries, stream_scores_triton, stream_shape
    from msa_core.routing.scores import quantized_keys

    c = tokens // CHUNK
    gen = torch.Generator(device="cuda").manual_seed(0)
    kr = torch.randn(c, hkv, d, device="cuda", generator=gen).bfloat16()
    inv = inverse_key_norms(kr)
    values, scales = quantized_keys(kr, "cosine")
    q = torch.randn(1, t, h, d, device="cuda", generator=gen).bfloat16()
    mask = torch.ones(1, t, dtype=torch.bool, device="cuda")
    _, tp = stream_shape(1, t)
    qp = torch.nn.functional.pad(q, (0, 0, 0, 0, 0, tp - t))
    mp = torch.nn.functional.pad(mask, (0, tp - t))
    want_bf16 = chunk_scores_reference(q, mask, kr)
    want = chunk_scores_reference(q, mask, values, key_scales=scales)
    grouped = group_queries(qp, mp, kr.dtype, hkv, "cosine", False)
    int8_grouped = {q8: group_queries(qp, mp, values.dtype, hkv, "cosine", False, q8) for q8 in (False, True)}
    bf16_bytes = kr.numel() * 2 + inv.numel() * 4
    int8_bytes = values.numel() + scales.numel() * 4
    bf16_ms = med_ms(time_graph(lambda: stream_scores_triton(grouped, kr, inv, normalize_k=True, reduce_sum=False,
                                                             exact=False), reps, flush))
    rows = []
    # int8 tiles take half the shared memory of bf16 ones: whole 64-chunk blocks may pipeline again (num_stages);
    # int8_queries: int8 tensor-core dots instead of widening the keys to bf16 (routing_triton.INT8_QUERY_DOTS)
    for q8, block_c, (stages, head_stages), warps, per_sm in itertools.product(
            (False, True), (64, 128, 256), ((1, 1), (1, 3), (2, 1), (3, 1)), (4, 8), (2,)):  # 48 variants
        v = {"int8_queries": q8, "block_c": block_c, "num_stages": stages, "head_stages": head_stages,
             "num_warps": warps, "programs_per_sm": per_sm}

        def fn(v=v):
            return stream_scores_triton(int8_grouped[v["int8_queries"]], values, scales,
                                        normalize_k=False, reduce_sum=False,
                                        exact=False, block_c=v["block_c"], num_stages=v["num_stages"],
                                        programs_per_sm=v["programs_per_sm"], num_warps=v["num_warps"],
                                        head_stages=v["head_stages"])
        try:
            got = fn()
            ms = med_ms(time_graph(fn, reps, flush))
        except (triton.runtime.errors.OutOfResources, RuntimeError) as e:
            rows.append({**v, "error": str(e)[:120]})
            continue
        rows.append({**v, "gpu_ms": ms, "bandwidth_tb_s": int8_bytes / (ms / 1e3) / 1e12,
                     "max_abs_err_vs_dequantised_reference": (got - want).abs().max().item(),
                     "max_abs_err_vs_bf16_reference": (got - want_bf16).abs().max().item()})
    default = next((r for r in rows if "gpu_ms" in r and not r["int8_queries"] and r["block_c"] == 128
                    and r["num_stages"] == 1 and r["head_stages"] == 3 and r["num_warps"] == 4
                    and r["programs_per_sm"] == 2), None)
    best = min((r for r in rows if "gpu_ms" in r), key=lambda r: r["gpu_ms"], default=None)
    return {"tokens": tokens, "chunks": c, "num_heads": h, "kv_heads": hkv, "head_dim": d, "routing_tokens": t,
            "bf16_default_gpu_ms": bf16_ms, "bf16_bytes": bf16_bytes,
            "bf16_bandwidth_tb_s": bf16_bytes / (bf16_ms / 1e3) / 1e12, "int8_bytes": int8_bytes,
            "int8_default": default, "int8_best": best,
            "speedup_default_vs_bf16": None if default is None else bf16_ms / default["gpu_ms"],
            "speedup_best_vs_bf16": None if best is None else bf16_ms / best["gpu_ms"], "variants": rows}


def attention_case(name: str, b: int, h: int, hkv: int, d: int, tq: int, tk: int, docs: int, reps: int,
                   flush: torch.Tensor) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(1)
    dt = torch.bfloat16
    c = 1_000_000 // CHUNK  # a 1M-token bank
    k_bar = torch.randn(c, hkv, d, device="cuda", generator=gen).half()
    v_bar = torch.randn(c, hkv, d, device="cuda", generator=gen).half()
    m = docs * CHUNKS_PER_DOC
    first = torch.randint(0, c // CHUNKS_PER_DOC, (b, docs), device="cuda", generator=gen) * CHUNKS_PER_DOC
    chunk_idx = (first[:, :, None] + torch.arange(CHUNKS_PER_DOC, device="cuda")).flatten(1)
    chunk_valid = torch.ones(b, m, dtype=torch.bool, device="cuda")
    q = torch.randn(b, h, tq, d, device="cuda", generator=gen).to(dt)
    k = torch.randn(b, hkv, tk, d, device="cuda", generator=gen).to(dt)
    v = torch.randn(b, hkv, tk, d, device="cuda", generator=gen).to(dt)
    local_valid = torch.ones(b, tk, dtype=torch.bool, device="cuda")
    local_valid[0, :7] = False
    args = (q, k_bar, v_bar, chunk_idx, chunk_valid, k, v, local_valid)

    # SDPA on pre-gathered tensors with the explicit mask (what the kernel replaces, minus the gather)
    k_mem, v_mem = gather_chunks(k_bar, v_bar, chunk_idx, chunk_valid, dt)
    keys, values = torch.cat([k_mem, k], 2), torch.cat([v_mem, v], 2)
    qs = tk - tq + torch.arange(tq, device="cuda")
    ks = torch.arange(tk, device="cuda")
    local = ((ks[None] <= qs[:, None])[None] & local_valid[:, None]) | (ks[None] == qs[:, None])[None]
    mask = torch.cat([chunk_valid[:, None].expand(b, tq, m), local], 2)[:, None]

    def sdpa():
        return torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)

    def kernel():
        return memory_attention(*args, backend="triton", check_indices=False)

    def reference():
        return memory_attention(*args, backend="reference", check_indices=False)

    row = {"name": name, "batch": b, "num_heads": h, "kv_heads": hkv, "head_dim": d, "tq": tq, "tk": tk,
           "memory_chunks": m, "dtype": str(dt).replace("torch.", "")}
    # eager calls (Python and launch overhead included) and GPU time (CUDA graph replay)
    row["triton_ms"] = med_ms(time_cuda(kernel, reps, flush))
    row["triton_gpu_ms"] = med_ms(time_graph(kernel, reps, flush))
    row["sdpa_pregathered_ms"] = med_ms(time_cuda(sdpa, reps, flush))
    row["sdpa_pregathered_gpu_ms"] = med_ms(time_graph(sdpa, reps, flush))
    row["reference_gather_mask_sdpa_ms"] = med_ms(time_cuda(reference, reps, flush))
    row["speedup_vs_sdpa_pregathered_gpu"] = row["sdpa_pregathered_gpu_ms"] / row["triton_gpu_ms"]
    if tq > 1:  # prefill: a few other tile shapes (GPU time)
        row["triton_gpu_ms_by_tiles"] = {
            f"m{bm}_n{bn}": med_ms(time_graph(
                lambda bm=bm, bn=bn: memory_attention(*args, backend="triton", check_indices=False, block_m=bm,
                                                      block_n=bn), reps, flush))
            for bm, bn in ((64, 64), (128, 64), (64, 128), (128, 128))}
        row["triton_gpu_ms_by_splits"] = {
            str(ns): med_ms(time_graph(
                lambda ns=ns: memory_attention(*args, backend="triton", check_indices=False, num_splits=ns),
                reps, flush))
            for ns in (1, 2, 4, 8)}
    row["speedup_vs_reference"] = row["reference_gather_mask_sdpa_ms"] / row["triton_ms"]
    row["max_abs_err_vs_reference"] = (kernel().float() - sdpa().float()).abs().max().item()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "kernels_bench.json"))
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="1M-token banks only, fewer repetitions")
    ap.add_argument("--only", choices=["routing", "attention", "stream", "stream-wide", "stream-int8"],
                    help="run one part (stream-wide: the streaming sweep at MSA-4B's 8 x 128 layout only; "
                         "stream-int8: int8 keys beside bf16 ones at that layout)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("kernels_bench.py needs a CUDA GPU (the Triton kernels run on CUDA only)")
    import triton

    t0 = time.perf_counter()
    reps = 5 if args.quick else args.reps
    flush = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device="cuda")  # > H100's 50 MB L2
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
        "h100_peak_bandwidth_Bps": H100_BANDWIDTH, "timing": f"median of {reps} calls, CUDA events, L2 flushed before each; *_gpu_ms: CUDA graph "
                  "replay (GPU time only), other *_ms: eager calls (Python, launches, syncs included)",
        "routing": [], "attention": [], "stream_sweep": [],
    }
    if args.only == "stream-int8":
        result["int8_sweep"] = sweep = int8_sweep(10_000_000, 32, 8, 128, t=24, reps=reps, flush=flush)
        print(json.dumps({k: v for k, v in sweep.items() if k != "variants"}, indent=1), flush=True)
    stream_cases = ((10_000_000, (9, 3, 64)), (100_000_000, (9, 3, 64)), (10_000_000, (32, 8, 128)))
    if args.only == "stream-wide":
        stream_cases = stream_cases[2:]
    for tokens, (h, hkv, d) in stream_cases if args.only in (None, "stream", "stream-wide") else ():
        sw = stream_sweep(tokens, h, hkv, d, t=24, reps=reps, flush=flush, retrieve_only=args.only == "stream-wide")
        result["stream_sweep"].append(sw)
        for name in ("best_exact", "best_fast"):
            r = sw[name]
            if r is None:
                continue
            print(f"stream {tokens / 1e6:.0f}M H={h} Hkv={hkv} D={d} {name}: {r['gpu_ms']:.4f} ms "
                  f"({r['bandwidth_tb_s']:.2f} TB/s) block_c={r['block_c']} stages={r['num_stages']} "
                  f"head_stages={r['head_stages']} "
                  f"warps={r['num_warps']} per_sm={r['programs_per_sm']} inv={r['inv_norms']} "
                  f"err {r['max_abs_err_vs_reference']:.1e}; tiled kernel {sw['tiled_kernel_gpu_ms']:.4f} ms "
                  f"({100 * sw['tiled_fraction_of_h100_peak']:.0f}%)", flush=True)
        torch.cuda.empty_cache()
    token_sizes = (1_000_000,) if args.quick else (1_000_000, 10_000_000)
    for tokens in token_sizes if args.only in (None, "routing") else ():
        for h, hkv, d in ((9, 3, 64), (32, 8, 128)):
            for b in (1, 8):
                row = routing_case(tokens, h, hkv, d, b, reps, flush)
                result["routing"].append(row)
                print(f"routing {tokens / 1e6:.0f}M tok H={h} Hkv={hkv} D={d} B={b}: kernel {row['kernel_gpu_ms']:.3f} "
                      f"ms GPU ({row['kernel_bandwidth_GBps']:.0f} GB/s, "
                      f"{100 * row['kernel_fraction_of_h100_peak']:.0f}% of peak; best {row['kernel_best_variant']} "
                      f"{100 * row['kernel_best_fraction_of_h100_peak']:.0f}%); doc scores "
                      f"{row['triton_doc_scores_ms']:.3f} ms eager / {row['triton_doc_scores_gpu_ms']:.3f} ms GPU vs "
                      f"reference {row['reference_doc_scores_ms']:.3f} ms (x{row['speedup_doc_scores']:.1f}), "
                      f"err {row['max_abs_err_vs_reference']:.1e}", flush=True)
                torch.cuda.empty_cache()
    cases = [("decode", 1, 1, 1024), ("decode", 8, 1, 1024), ("prefill", 1, 512, 512), ("prefill", 4, 2048, 2048)]
    for h, hkv, d in ((9, 3, 64), (32, 8, 128)) if args.only in (None, "attention") else ():
        for kind, b, tq, tk in cases:
            name = f"{kind}-H{h}-Hkv{hkv}-D{d}-B{b}-Tq{tq}-Tk{tk}"
            row = attention_case(name, b, h, hkv, d, tq, tk, docs=16, reps=reps, flush=flush)
            result["attention"].append(row)
            print(f"attention {name}: triton {row['triton_ms']:.3f} ms eager / {row['triton_gpu_ms']:.3f} ms GPU; "
                  f"SDPA pre-gathered {row['sdpa_pregathered_ms']:.3f} / {row['sdpa_pregathered_gpu_ms']:.3f} ms "
                  f"(GPU x{row['speedup_vs_sdpa_pregathered_gpu']:.2f}); reference "
                  f"{row['reference_gather_mask_sdpa_ms']:.3f} ms eager (x{row['speedup_vs_reference']:.2f}); "
                  f"err {row['max_abs_err_vs_reference']:.1e}", flush=True)
    result["wall_s"] = time.perf_counter() - t0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out} in {result['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
