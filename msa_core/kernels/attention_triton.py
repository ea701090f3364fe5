"""Triton kernels of attention.memory_attention. Imported on first use (it imports triton).

Tiling (FlashAttention-2 style, online softmax in the exp2 domain):
- grid = (query tiles, B * Hkv, key splits). A query tile is BLOCK_M rows of the [Tq * G] matrix of one
  kv group (row r = token r // G, head g*G + r % G): the G query heads that share a kv head are
  scored against each loaded K/V tile together, so decode (Tq = 1) still fills a tensor-core tile
  and every K/V byte is loaded once per kv head, not once per query head.
- The key sequence is [memory chunks (M slots) ++ local keys (Tk)], walked in BLOCK_N tiles. Memory
  tiles load their chunk indices and gather K̄/V̄ rows straight from the bank [C, Hkv, D]; local
  tiles read k/v [B, Hkv, Tk, D]. Causal tiles past the query tile's last slot are skipped.
- Short-query calls (decode) would launch too few programs, so the key tiles can be split over
  `num_splits` programs (flash-decoding); each writes (out, log-sum-exp) partials in fp32 and a
  second small kernel merges them.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import interpreting, next_power_of_2, num_sms

_LOG2E = 1.4426950408889634


@triton.jit
def _softmax_step(s, v, m_i, l_i, acc, DOT_PRECISION: tl.constexpr):
    """Fold one tile of log2-domain scores s [M, N] (masked = -inf) and values v [N, D] into (m, l, acc)."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet stays at 0
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _memory_attention_kernel(
    q_ptr, stride_qb, stride_qh, stride_qt,  # [B, H, Tq, D]
    kb_ptr, vb_ptr, stride_kbc, stride_kbh, stride_vbc, stride_vbh,  # bank [C, Hkv, D]
    idx_ptr, stride_ib, cv_ptr, stride_cvb,  # chunk indices [B, M] (any int), chunk validity [B, M] uint8
    k_ptr, v_ptr, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,  # local [B, Hkv, Tk, D]
    lv_ptr, stride_lvb,  # local validity [B, Tk] uint8
    o_ptr, stride_ob, stride_oh, stride_ot,  # out [B, H, Tq, D]
    po_ptr, pl_ptr,  # split partials: out [S, B*H*Tq, D] fp32, log2-sum-exp [S, B*H*Tq] fp32
    H, HKV, TQ, TK, M, qk_scale,
    G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_LOCAL_VALID: tl.constexpr, NUM_SPLITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bg = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = pid_bg // HKV
    g = pid_bg % HKV
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    t = rows // G
    h = g * G + rows % G
    row_ok = t < TQ
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q = tl.load(q_ptr + b * stride_qb + h[:, None] * stride_qh + t[:, None] * stride_qt + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:  # Triton's CPU interpreter multiplies bf16 bit patterns in tl.dot (triton#11584)
        q = q.to(tl.float32)
    q_slot = TK - TQ + t  # local slot of each row's token

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    n_mem = tl.cdiv(M, BLOCK_N)
    if CAUSAL:  # keys past the tile's last query slot are invisible to the whole tile
        last_t = tl.minimum(pid_m * BLOCK_M + BLOCK_M - 1, TQ * G - 1) // G
        local_end = TK - TQ + last_t + 1
    else:
        local_end = TK
    n_blocks = n_mem + tl.cdiv(local_end, BLOCK_N)
    per_split = tl.cdiv(n_blocks, NUM_SPLITS)
    blk_lo = pid_s * per_split
    blk_hi = tl.minimum(blk_lo + per_split, n_blocks)
    offs_n0 = tl.arange(0, BLOCK_N)

    # 1. memory: chunks gathered by index from the bank
    for blk in range(blk_lo, tl.minimum(blk_hi, n_mem)):
        offs_n = blk * BLOCK_N + offs_n0
        ok = tl.load(cv_ptr + b * stride_cvb + offs_n, mask=offs_n < M, other=0) != 0
        chunk = tl.load(idx_ptr + b * stride_ib + offs_n, mask=ok, other=0).to(tl.int64)
        kt = tl.load(kb_ptr + chunk[None, :] * stride_kbc + g * stride_kbh + offs_d[:, None],
                     mask=ok[None, :] & d_ok[:, None], other=0.0).to(q.dtype)  # [D, N]
        vt = tl.load(vb_ptr + chunk[:, None] * stride_vbc + g * stride_vbh + offs_d[None, :],
                     mask=ok[:, None] & d_ok[None, :], other=0.0).to(q.dtype)  # [N, D]
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
        s = tl.where(ok[None, :], s, float("-inf"))
        m_i, l_i, acc = _softmax_step(s, vt, m_i, l_i, acc, DOT_PRECISION)

    # 2. local keys: causal (bottom-right), validity, and always the query's own slot
    k_base = k_ptr + b * stride_kb + g * stride_kh
    v_base = v_ptr + b * stride_vb + g * stride_vh
    for blk in range(tl.maximum(blk_lo, n_mem), blk_hi):
        offs_n = (blk - n_mem) * BLOCK_N + offs_n0
        in_range = offs_n < TK
        kt = tl.load(k_base + offs_n[None, :] * stride_kt + offs_d[:, None], mask=in_range[None, :] & d_ok[:, None],
                     other=0.0)
        vt = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :], mask=in_range[:, None] & d_ok[None, :],
                     other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
            vt = vt.to(tl.float32)
        if HAS_LOCAL_VALID:
            valid = tl.load(lv_ptr + b * stride_lvb + offs_n, mask=in_range, other=0) != 0
        else:
            valid = in_range
        own = offs_n[None, :] == q_slot[:, None]
        if CAUSAL:
            visible = ((offs_n[None, :] <= q_slot[:, None]) & valid[None, :]) | own
        else:
            visible = valid[None, :] | own
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
        s = tl.where(visible & in_range[None, :], s, float("-inf"))
        m_i, l_i, acc = _softmax_step(s, vt, m_i, l_i, acc, DOT_PRECISION)

    io_mask = row_ok[:, None] & d_ok[None, :]
    if NUM_SPLITS == 1:
        out = acc / l_i[:, None]  # l > 0: every row sees its own slot
        tl.store(o_ptr + b * stride_ob + h[:, None] * stride_oh + t[:, None] * stride_ot + offs_d[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=io_mask)
    else:
        n_rows = tl.num_programs(1) // HKV * H * TQ  # B * H * Tq
        r = (b * H + h) * TQ + t
        seen = l_i > 0
        out = acc / tl.where(seen, l_i, 1.0)[:, None]
        tl.store(po_ptr + (pid_s * n_rows + r)[:, None] * D + offs_d[None, :], out, mask=io_mask)
        tl.store(pl_ptr + pid_s * n_rows + r, tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("-inf")),
                 mask=row_ok)


@triton.jit
def _merge_splits_kernel(
    po_ptr, pl_ptr, o_ptr, stride_ob, stride_oh, stride_ot, H, TQ, N_ROWS,
    D: tl.constexpr, BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr,
):
    """out[r] = sum_s 2^lse_s * out_s / sum_s 2^lse_s for one row r = (b, h, t)."""
    r = tl.program_id(0)
    offs_s = tl.arange(0, SPLITS_P2)
    s_ok = offs_s < NUM_SPLITS
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    lse = tl.load(pl_ptr + offs_s * N_ROWS + r, mask=s_ok, other=float("-inf"))
    w = tl.exp2(lse - tl.max(lse, axis=0))  # the max is finite: some split holds the row's own slot
    part = tl.load(po_ptr + (offs_s[:, None] * N_ROWS + r) * D + offs_d[None, :], mask=s_ok[:, None] & d_ok[None, :],
                   other=0.0)
    out = tl.sum(w[:, None] * part, axis=0) / tl.sum(w, axis=0)
    b = r // (H * TQ)
    h = (r // TQ) % H
    t = r % TQ
    tl.store(o_ptr + b * stride_ob + h * stride_oh + t * stride_ot + offs_d, out.to(o_ptr.dtype.element_ty), mask=d_ok)


def default_tiles(rows: int, head_dim: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N): query tiles no taller than the G*Tq rows need (>= 16 for tensor cores); long
    prefills of 128-wide heads take 128x128 tiles (measured on an H100: benchmarks/kernels_bench.py)."""
    if rows <= 32:
        return (16 if rows <= 16 else 32), 64
    if head_dim > 64 and rows > 64:
        return 128, 128
    return 64, 64


def default_splits(programs: int, key_blocks: int, device: torch.device) -> int:
    """Enough key splits to give the GPU ~2 programs per SM, each split keeping >= 2 key tiles; none once
    the query tiles alone fill 2/3 of the SMs (a prefill of 32 heads x 512 tokens, 128 programs: 1 split
    0.031 ms, 2 splits 0.051 ms, SDPA 0.035 ms on an H100; benchmarks/results/kernels_bench.json)."""
    if device.type != "cuda" or 3 * programs >= 2 * num_sms(device):
        return 1
    return max(1, min(triton.cdiv(2 * num_sms(device), programs), key_blocks // 2, 32))


def memory_attention_triton(q, k_bar, v_bar, chunk_idx, chunk_valid, k, v, local_valid, *, causal: bool,
                            num_splits: int | None = None, block_m: int | None = None,
                            block_n: int | None = None) -> torch.Tensor:
    """Launch the kernel(s); inputs already checked by attention.memory_attention."""
    b, h, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    g = h // hkv
    m = chunk_idx.shape[1]
    q, k, v, k_bar, v_bar = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v, k_bar, v_bar))
    out = torch.empty_like(q)
    auto_m, auto_n = default_tiles(tq * g, d)
    block_m, block_n = block_m or auto_m, block_n or auto_n
    programs = triton.cdiv(tq * g, block_m) * b * hkv
    key_blocks = triton.cdiv(m, block_n) + triton.cdiv(tk, block_n)
    splits = num_splits or default_splits(programs, key_blocks, q.device)
    cv = chunk_valid.contiguous().view(torch.uint8)
    lv = local_valid.contiguous().view(torch.uint8) if local_valid is not None else cv
    if splits > 1:
        partial_out = torch.empty(splits, b * h * tq, d, dtype=torch.float32, device=q.device)
        partial_lse = torch.empty(splits, b * h * tq, dtype=torch.float32, device=q.device)
    else:
        partial_out = partial_lse = out  # unused
    upcast = interpreting() and q.dtype == torch.bfloat16
    block_d = max(16, next_power_of_2(d))
    _memory_attention_kernel[(triton.cdiv(tq * g, block_m), b * hkv, splits)](
        q, q.stride(0), q.stride(1), q.stride(2),
        k_bar, v_bar, k_bar.stride(0), k_bar.stride(1), v_bar.stride(0), v_bar.stride(1),
        chunk_idx, chunk_idx.stride(0), cv, cv.stride(0),
        k, v, k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        lv, lv.stride(0),
        out, out.stride(0), out.stride(1), out.stride(2),
        partial_out, partial_lse,
        h, hkv, tq, tk, m, _LOG2E / math.sqrt(d),
        G=g, D=d, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n,
        CAUSAL=causal, HAS_LOCAL_VALID=local_valid is not None, NUM_SPLITS=splits,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", UPCAST=upcast,
        num_warps=4 if block_m * block_d <= 64 * 64 else 8,
    )
    if splits > 1:
        _merge_splits_kernel[(b * h * tq,)](
            partial_out, partial_lse, out, out.stride(0), out.stride(1), out.stride(2), h, tq, b * h * tq,
            D=d, BLOCK_D=block_d, NUM_SPLITS=splits, SPLITS_P2=next_power_of_2(splits),
        )
    return out
