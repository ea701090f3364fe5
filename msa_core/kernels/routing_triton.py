"""Triton kernels of routing.chunk_scores. Imported on first use (it imports triton).

1. `_group_queries_kernel` (one program per token, O(B*T*H*D), tiny): normalise / scale each query
   head as router.score_chunks does, sum the heads of each kv group, and split the fp32 sum into
   N_PARTS pieces of the bank's dtype (sum of pieces == value to 22-24 bits). The bank's 16-bit
   K̄_R is exact in its own dtype, so N_PARTS 16-bit tensor-core dots reproduce the fp32 reference.
   For an fp16 bank each token is first multiplied by a power of two that puts its largest entry
   just under 2^14 (no overflow, full precision in the low piece); the main kernel undoes it.
2. `_chunk_scores_kernel`: one program per block of BLOCK_C chunks (grid = ceil(C / BLOCK_C)). The
   batch's tokens are flattened to B*T rows and walked in tiles of BLOCK_M (one tile for a single
   question of <= 64-128 tokens). Per tile and kv head g: one [BLOCK_M, D] x [D, BLOCK_C] tensor-core
   dot per piece, the cosine norm of K̄_R applied per (chunk, g) to the dot's columns, heads summed,
   the per-token multiplier applied, padding masked; then the tile's max (or sum) over the tokens of
   each batch row it overlaps is folded into out[b, block] (first tile of a row stores, later ones
   read-modify-write: the program owns those outputs, no atomics). K̄_R is read from HBM by the first
   tile; later tiles of the same program find it in L1/L2.
HBM traffic: K̄_R once, plus the queries (B*T*Hkv*D*N_PARTS elements) and the [B, C] fp32 scores.
3. `_stream_scores_kernel` (batches whose B*T tokens, padded to BP*TP, fit one 128-row tile: one question
   or a few): persistent programs (2 per SM) walk the (layer, chunk block) pairs with software-pipelined
   K̄_R loads; the cosine norms come precomputed ([L, C, Hkv] fp32, 1/16-1/32 of K̄_R's bytes) so the
   tile feeds only the dots. It reaches 82% of an H100's bandwidth on a 600 MB layer where the tiled
   kernel reaches 30% (benchmarks/results/kernels_bench.json, stream_sweep).
int8 keys (`routing.scores.quantized_keys`: prepared keys, a float32 scale per chunk and kv head) take both
kernels: each tile is widened to bf16 in registers (exact: |v| <= 127) and each column multiplied by its
scale where a 16-bit bank's takes its inverse norm; the queries come in bf16 pieces, or (INT8_QUERY_DOTS) as
int8 group sums with a step each, for int8 tensor-core dots. Half the bytes to stream.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import interpreting, next_power_of_2, num_sms

_PIECES = {torch.float16: 2, torch.bfloat16: 3, torch.float32: 1}


@triton.jit
def _group_sum(q_row_ptr, stride_qh, g, offs_j, offs_d, d_ok,
               G: tl.constexpr, D: tl.constexpr, NORMALIZE_Q: tl.constexpr, Q_SCALE: tl.constexpr):
    """sum over the G heads of kv group g of the (normalised, scaled) query: [BLOCK_D] fp32."""
    heads = g * G + offs_j
    x = tl.load(q_row_ptr + heads[:, None] * stride_qh + offs_d[None, :],
                mask=(offs_j < G)[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    if NORMALIZE_Q:
        x = x / tl.maximum(tl.sqrt(tl.sum(x * x, axis=1)), 1e-12)[:, None]
    return tl.sum(x, axis=0) * Q_SCALE


@triton.jit
def _group_queries_kernel(
    q_ptr, stride_qb, stride_qt, stride_qh,  # q [B, T, H, D], last dim contiguous
    out_ptr, stride_op, stride_ob, stride_ot,  # pieces [P, B, T, HKV*D] in the bank's dtype
    scale_ptr,  # [B, T] fp32: what the main kernel multiplies a token's scores by (1 / (2^e * H))
    gscale_ptr,  # [B, T, HKV] fp32 (Q_INT8): the step of each int8 group sum, else unused
    T, inv_heads,
    HKV: tl.constexpr, G: tl.constexpr, G_P2: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    N_PARTS: tl.constexpr, NORMALIZE_Q: tl.constexpr, Q_SCALE: tl.constexpr, FP16_RANGE: tl.constexpr,
    Q_INT8: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // T
    t = pid % T
    offs_j = tl.arange(0, G_P2)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q_row = q_ptr + b * stride_qb + t * stride_qt
    mult = 1.0
    if FP16_RANGE:  # 2^(14 - e), e = exponent of the largest |entry| (as torch.frexp gives it)
        amax = tl.zeros([BLOCK_D], dtype=tl.float32)
        for g in range(HKV):
            amax = tl.maximum(amax, tl.abs(_group_sum(q_row, stride_qh, g, offs_j, offs_d, d_ok,
                                                      G, D, NORMALIZE_Q, Q_SCALE)))
        amax = tl.maximum(tl.max(amax, axis=0), 1e-30)
        e = tl.floor(tl.log2(amax)).to(tl.int32) + 1
        k = tl.minimum(tl.maximum(14 - e, -126), 127)
        mult = ((k + 127) << 23).to(tl.float32, bitcast=True)  # exact power of two
    tl.store(scale_ptr + pid, inv_heads / mult)
    out_row = out_ptr + b * stride_ob + t * stride_ot
    for g in range(HKV):
        rest = _group_sum(q_row, stride_qh, g, offs_j, offs_d, d_ok, G, D, NORMALIZE_Q, Q_SCALE) * mult
        if Q_INT8:  # one int8 piece: the group sum in steps of its largest |entry| / 127 (as quantized_keys)
            step = tl.max(tl.abs(rest), axis=0) / 127.0
            tl.store(gscale_ptr + pid * HKV + g, step)
            rest = tl.floor(rest / tl.where(step > 0, step, 1.0) + 0.5)
        for p in tl.static_range(N_PARTS):
            piece = rest.to(out_ptr.dtype.element_ty)
            tl.store(out_row + p * stride_op + g * D + offs_d, piece, mask=d_ok)
            rest = rest - piece.to(tl.float32)


@triton.jit
def _head_part(g, q_tile_ptr, q_tile_mask, stride_qp, qs_tile_ptr, row_ok, k_tile_ptr, k_tile_mask, stride_kh,
               col_tile_ptr, c_ok,
               D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, N_PARTS: tl.constexpr,
               NORMALIZE_K: tl.constexpr, COL_SCALE: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
               K_INT8: tl.constexpr, Q_INT8: tl.constexpr):
    """<q_g pieces, K̄_R[:, g]> of kv head g, each column multiplied by its key's scale (COL_SCALE: read
    from col_tile_ptr + g) or divided by its key's norm (cosine without precomputed norms): [BLOCK_M, BLOCK_C]
    fp32. K_INT8: the keys are int8 (`quantized_keys`), widened to the queries' bfloat16 (exact); Q_INT8: the
    queries are int8 too (one piece, each row's step of group g at qs_tile_ptr + g): an int8 tensor-core dot,
    exact in int32."""
    k = tl.load(k_tile_ptr + g * stride_kh, mask=k_tile_mask, other=0)
    kd = k
    if Q_INT8:
        qp = tl.load(q_tile_ptr + g * D, mask=q_tile_mask, other=0)
        part = tl.dot(qp, k, out_dtype=tl.int32).to(tl.float32)
        part = part * tl.load(qs_tile_ptr + g, mask=row_ok, other=0.0)[:, None]
    else:
        if UPCAST:  # Triton's CPU interpreter multiplies bf16 bit patterns in tl.dot (triton#11584)
            kd = k.to(tl.float32)
        elif K_INT8:
            kd = k.to(tl.bfloat16)
        part = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
        for p in tl.static_range(N_PARTS):
            qp = tl.load(q_tile_ptr + p * stride_qp + g * D, mask=q_tile_mask, other=0.0)
            if UPCAST:
                qp = qp.to(tl.float32)
            part = tl.dot(qp, kd, part, input_precision=DOT_PRECISION)
    if COL_SCALE:
        part = part * tl.load(col_tile_ptr + g, mask=c_ok, other=0.0)[None, :]
    elif NORMALIZE_K:  # cosine: divide column c by max(||k_c,g||, eps), F.normalize's formula
        kf = k.to(tl.float32)
        part = part / tl.maximum(tl.sqrt(tl.sum(kf * kf, axis=0)), 1e-12)[None, :]
    return part


@triton.jit
def _score_tile(q_tile_ptr, q_tile_mask, stride_qp, qs_tile_ptr, row_ok, k_tile_ptr, k_tile_mask, stride_kh,
                col_tile_ptr, c_ok,
                HKV: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                N_PARTS: tl.constexpr, NORMALIZE_K: tl.constexpr, COL_SCALE: tl.constexpr,
                DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, K_INT8: tl.constexpr, Q_INT8: tl.constexpr,
                HEAD_STAGES: tl.constexpr = 1):
    """sum_g <q_g pieces, K̄_R[:, g]> (each g's column scaled, see _head_part): [BLOCK_M, BLOCK_C] fp32.

    COL_SCALE: the multipliers come precomputed (col_tile_ptr + g -> [BLOCK_C]: 1 / max(||k_c,g||, eps) for
    cosine, the scale of int8 keys), so the K̄_R tile feeds only the dots and Triton can pipeline its loads.
    HEAD_STAGES > 1: the kv heads are a software-pipelined loop (one head's tile per stage), for layouts too
    wide to pipeline whole blocks.
    """
    s = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    if HEAD_STAGES > 1:
        for g in tl.range(0, HKV, num_stages=HEAD_STAGES):
            s += _head_part(g, q_tile_ptr, q_tile_mask, stride_qp, qs_tile_ptr, row_ok, k_tile_ptr, k_tile_mask,
                            stride_kh, col_tile_ptr, c_ok, D, BLOCK_M, BLOCK_C, N_PARTS, NORMALIZE_K, COL_SCALE,
                            DOT_PRECISION, UPCAST, K_INT8, Q_INT8)
    else:
        for g in tl.static_range(HKV):
            s += _head_part(g, q_tile_ptr, q_tile_mask, stride_qp, qs_tile_ptr, row_ok, k_tile_ptr, k_tile_mask,
                            stride_kh, col_tile_ptr, c_ok, D, BLOCK_M, BLOCK_C, N_PARTS, NORMALIZE_K, COL_SCALE,
                            DOT_PRECISION, UPCAST, K_INT8, Q_INT8)
    return s


@triton.jit
def _chunk_scores_kernel(
    q_ptr, stride_qp,  # pieces [P, B*T, HKV*D] (rows = flattened tokens), contiguous
    qs_ptr,  # [B*T, HKV] fp32 steps of int8 queries (Q_INT8), else unused
    tscale_ptr, mask_ptr,  # [B*T] fp32 per-token score multiplier, [B*T] uint8 routing-token mask
    k_ptr, stride_kc, stride_kh,  # K̄_R [C, HKV, D], last dim contiguous
    col_ptr,  # [C, HKV] fp32 column multipliers (COL_SCALE), else unused
    out_ptr, stride_ob,  # [B, C] fp32
    B, T, C,
    HKV: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
    N_PARTS: tl.constexpr, NORMALIZE_K: tl.constexpr, COL_SCALE: tl.constexpr, REDUCE_SUM: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, K_INT8: tl.constexpr, Q_INT8: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_c = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    k_tile_ptr = k_ptr + offs_c.to(tl.int64)[None, :] * stride_kc + offs_d[:, None]  # [BLOCK_D, BLOCK_C], head 0
    k_tile_mask = d_ok[:, None] & c_ok[None, :]
    n_tokens = B * T
    for m0 in range(0, n_tokens, BLOCK_M):  # K̄_R comes from HBM on the first tile, from cache after
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < n_tokens
        s = _score_tile(q_ptr + rows[:, None] * (HKV * D) + offs_d[None, :], row_ok[:, None] & d_ok[None, :],
                        stride_qp, qs_ptr + rows * HKV, row_ok, k_tile_ptr, k_tile_mask, stride_kh,
                        col_ptr + offs_c.to(tl.int64) * HKV, c_ok,
                        HKV, D, BLOCK_M, BLOCK_C, N_PARTS, NORMALIZE_K, COL_SCALE, DOT_PRECISION, UPCAST, K_INT8,
                        Q_INT8)
        routing = tl.load(mask_ptr + rows, mask=row_ok, other=0) != 0
        s = s * tl.load(tscale_ptr + rows, mask=row_ok, other=0.0)[:, None]
        s = tl.where(routing[:, None], s, 0.0 if REDUCE_SUM else float("-inf"))
        # fold the tile into every batch row it overlaps; this program owns these outputs, so a
        # row's first tile stores and later tiles read-modify-write
        row_of = rows // T
        b_last = tl.minimum(m0 + BLOCK_M, n_tokens) - 1
        for b in range(m0 // T, b_last // T + 1):
            sel = (row_of == b)[:, None]
            out_ptrs = out_ptr + b * stride_ob + offs_c
            if REDUCE_SUM:
                val = tl.sum(tl.where(sel, s, 0.0), axis=0)
                if b * T < m0:
                    val += tl.load(out_ptrs, mask=c_ok, other=0.0)
            else:
                val = tl.max(tl.where(sel, s, float("-inf")), axis=0)
                if b * T < m0:
                    val = tl.maximum(val, tl.load(out_ptrs, mask=c_ok, other=0.0))
            tl.store(out_ptrs, val, mask=c_ok)


@triton.jit
def _stream_scores_kernel(
    q_ptr, stride_qp, stride_ql,  # pieces [P, L*B*TP, HKV*D], contiguous; layer l, row b*TP + t
    qs_ptr,  # [L*B*TP, HKV] fp32 steps of int8 queries (Q_INT8), else unused
    tscale_ptr, mask_ptr,  # [L, B*TP] fp32 multiplier, [B*TP] uint8 routing-token mask (False on padding)
    k_ptr, stride_kl, stride_kc, stride_kh,  # K̄_R [L, C, HKV, D], last dim contiguous
    col_ptr, stride_il,  # [L, C, HKV] fp32 column multipliers (COL_SCALE), else unused
    out_ptr, stride_ol, stride_ob,  # [L, B, C] fp32
    B, C, L,
    HKV: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BP: tl.constexpr, TP: tl.constexpr,
    BLOCK_C: tl.constexpr, N_PARTS: tl.constexpr, NORMALIZE_K: tl.constexpr, COL_SCALE: tl.constexpr,
    REDUCE_SUM: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, K_INT8: tl.constexpr,
    Q_INT8: tl.constexpr, NUM_STAGES: tl.constexpr, HEAD_STAGES: tl.constexpr,
):
    """Small batches (BP*TP token rows fit one tile), one or several routing layers in one launch: a
    persistent program walks the (layer, chunk block) pairs pid, pid + nprog, ... with software-pipelined
    K̄_R loads, so a bank is one long stream however it splits into layers; each block's scores reduce
    over each row's TP tokens in registers (no output read-modify-write)."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    BLOCK_M: tl.constexpr = BP * TP
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < B * TP
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q_rows_ptr = q_ptr + rows[:, None] * (HKV * D) + offs_d[None, :]
    q_tile_mask = row_ok[:, None] & d_ok[None, :]
    routing = tl.load(mask_ptr + rows, mask=row_ok, other=0) != 0
    row_of = rows // TP
    n_blocks = tl.cdiv(C, BLOCK_C)
    for job in tl.range(pid, L * n_blocks, nprog, num_stages=NUM_STAGES):
        layer = job // n_blocks
        offs_c = (job % n_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = offs_c < C
        k_tile_ptr = k_ptr + layer.to(tl.int64) * stride_kl + offs_c.to(tl.int64)[None, :] * stride_kc + offs_d[:, None]
        s = _score_tile(q_rows_ptr + layer * stride_ql, q_tile_mask, stride_qp,
                        qs_ptr + (layer * (B * TP) + rows) * HKV, row_ok, k_tile_ptr,
                        d_ok[:, None] & c_ok[None, :], stride_kh,
                        col_ptr + layer.to(tl.int64) * stride_il + offs_c.to(tl.int64) * HKV, c_ok,
                        HKV, D, BLOCK_M, BLOCK_C, N_PARTS, NORMALIZE_K, COL_SCALE, DOT_PRECISION, UPCAST, K_INT8,
                        Q_INT8, HEAD_STAGES)
        s = s * tl.load(tscale_ptr + layer * (B * TP) + rows, mask=row_ok, other=0.0)[:, None]
        out_layer = out_ptr + layer.to(tl.int64) * stride_ol + offs_c
        for b in tl.static_range(BP):  # a static loop over the tile's rows: no reshape of the register tile
            sel = (routing & (row_of == b))[:, None]
            if REDUCE_SUM:
                val = tl.sum(tl.where(sel, s, 0.0), axis=0)
            else:
                val = tl.max(tl.where(sel, s, float("-inf")), axis=0)
            tl.store(out_layer + b * stride_ob, val, mask=c_ok & (offs_c * 0 + b < B))


class GroupedQueries:
    """Output of `group_queries`: the pieces [P, B, T, Hkv*D], the per-token multiplier [B, T], and for int8
    queries each group sum's step [B, T, Hkv] (else None)."""

    def __init__(self, pieces: torch.Tensor, token_scale: torch.Tensor, mask: torch.Tensor,
                 group_scale: torch.Tensor | None = None) -> None:
        self.pieces, self.token_scale, self.mask, self.group_scale = pieces, token_scale, mask, group_scale


# int8 keys meet the queries in bf16 (False: the int8 tile is widened in registers) or as int8 group sums with a
# step each (True: int8 tensor-core dots, exact in int32). Both within ~2e-3 of fp32 scores; on wiki-dev the
# int8 queries changed 10 of 730 top-5 sets against fp32 keys and queries, bf16 queries 8. Which streams faster
# on an H200 is for `benchmarks/kernels_bench.py --only stream-int8` to say.
INT8_QUERY_DOTS = False


def group_queries(q: torch.Tensor, token_mask: torch.Tensor, kr_dtype: torch.dtype, kv_heads: int,
                  normalization: str, exact: bool = True, int8_queries: bool = False) -> GroupedQueries:
    """Launch the query-preparation kernel (inputs already checked). exact=False: one piece. The pieces take
    the bank's dtype; for int8 keys (`quantized_keys`) bfloat16, which holds their values exactly, or with
    int8_queries one int8 piece per group sum, in steps of its largest |entry| / 127 (`group_scale`)."""
    b, t, h, d = q.shape
    if q.stride(3) != 1:
        q = q.contiguous()
    int8_queries = int8_queries and kr_dtype == torch.int8
    piece_dtype = torch.int8 if int8_queries else torch.bfloat16 if kr_dtype == torch.int8 else kr_dtype
    n_parts = _PIECES[piece_dtype] if exact and not int8_queries else 1
    pieces = torch.empty(n_parts, b, t, kv_heads * d, dtype=piece_dtype, device=q.device)
    token_scale = torch.empty(b, t, dtype=torch.float32, device=q.device)
    group_scale = torch.empty(b, t, kv_heads, dtype=torch.float32, device=q.device) if int8_queries else None
    g = h // kv_heads
    _group_queries_kernel[(b * t,)](
        q, q.stride(0), q.stride(1), q.stride(2),
        pieces, pieces.stride(0), pieces.stride(1), pieces.stride(2),
        token_scale, token_scale if group_scale is None else group_scale, t, 1.0 / h,
        HKV=kv_heads, G=g, G_P2=next_power_of_2(g), D=d, BLOCK_D=max(16, next_power_of_2(d)),
        N_PARTS=n_parts, NORMALIZE_Q=normalization in ("cosine", "scaled_cosine"),
        Q_SCALE=d ** -0.5 if normalization in ("scaled_dot", "scaled_cosine") else 1.0,
        FP16_RANGE=piece_dtype == torch.float16, Q_INT8=int8_queries,
    )
    return GroupedQueries(pieces, token_scale, token_mask.contiguous().view(torch.uint8), group_scale)


def default_blocks(tokens: int, head_dim: int) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_M) for a batch of `tokens` = B*T: token tiles no taller than needed; 64 chunks a
    program, 32 when many tokens meet 128-wide heads (measured on an H100: benchmarks/kernels_bench.py)."""
    block_m = 64 if tokens <= 64 else 128
    return (32 if block_m > 64 and head_dim > 64 else 64), block_m


def chunk_scores_triton(grouped: GroupedQueries, kr_bar: torch.Tensor, *, normalize_k: bool, reduce_sum: bool,
                        exact: bool = True, block_c: int | None = None, block_m: int | None = None,
                        num_warps: int | None = None, col_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Launch the scoring kernel: [B, C] fp32 max (or, reduce_sum, sum) over routing tokens.

    exact=False: an fp32 bank is multiplied in one tf32 pass instead of three (the 16-bit banks'
    precision is set by the pieces of `grouped`). col_scale [C, Hkv] fp32: each key's dot is multiplied by
    it (required for int8 keys: their scales; then normalize_k must be False, the keys being prepared).
    """
    pieces = grouped.pieces
    n_parts, b, t, _ = pieces.shape
    c, hkv, d = kr_bar.shape
    if kr_bar.stride(2) != 1:
        kr_bar = kr_bar.contiguous()
    out = torch.empty(b, c, dtype=torch.float32, device=kr_bar.device)
    if c == 0 or b == 0:
        return out
    auto_c, auto_m = default_blocks(b * t, d)
    block_c, block_m = block_c or auto_c, block_m or auto_m
    block_d = max(16, next_power_of_2(d))
    col_scale = _col_scale(col_scale, kr_bar, normalize_k)
    qs = grouped.group_scale
    _chunk_scores_kernel[(triton.cdiv(c, block_c),)](
        pieces, pieces.stride(0), grouped.token_scale if qs is None else qs, grouped.token_scale, grouped.mask,
        kr_bar, kr_bar.stride(0), kr_bar.stride(1), kr_bar if col_scale is None else col_scale,
        out, out.stride(0), b, t, c,
        HKV=hkv, D=d, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_C=block_c, N_PARTS=n_parts,
        NORMALIZE_K=normalize_k, COL_SCALE=col_scale is not None, REDUCE_SUM=reduce_sum,
        DOT_PRECISION="tf32x3" if kr_bar.dtype == torch.float32 and exact else "tf32",  # unused for 16-bit
        UPCAST=_upcast(kr_bar), K_INT8=kr_bar.dtype == torch.int8, Q_INT8=qs is not None,
        num_warps=num_warps or (8 if block_m * block_c > 64 * 64 or block_d > 64 else 4),
        num_stages=1,  # the loads sit in unrolled kv-head loops: pipelining them only costs shared memory
    )
    return out


def _upcast(kr_bar: torch.Tensor) -> bool:
    """Under Triton's CPU interpreter, bfloat16 dots (a bf16 bank's, or int8 keys met by bf16 queries) run in fp32."""
    return interpreting() and kr_bar.dtype in (torch.bfloat16, torch.int8)


def _col_scale(col_scale: torch.Tensor | None, kr_bar: torch.Tensor, normalize_k: bool) -> torch.Tensor | None:
    """The column multipliers a launch reads, contiguous: the scales of int8 keys (required), the inverse norms
    of cosine keys (optional), None where keys are not normalised."""
    if kr_bar.dtype == torch.int8:
        if col_scale is None or normalize_k:
            raise ValueError("int8 keys are prepared keys: they need their scales and normalize_k=False")
    elif not normalize_k:
        return None
    return None if col_scale is None else col_scale.contiguous()


# Wide layouts (Hkv * D > 256): 128-chunk blocks whose kv-head loop is pipelined in 3 stages. On an H200 at
# MSA-4B's 8 x 128 (one 10M-token layer, benchmarks/kernels_bench.py --only stream-wide): 3.59 TB/s, where
# 64-chunk blocks with the loop unrolled (the earlier default) read 2.61 TB/s.
WIDE_HEAD_STAGES = 3
STREAM_MAX_ROWS = 128  # batches whose padded token rows fit one tile take the streaming kernel
# (Hkv, D, BP, TP, pieces, bank dtype, inverse norms, block_c asked) -> the (block_c, stages) that fit shared memory
_FITS: dict[tuple, tuple[int, int]] = {}


def stream_shape(b: int, t: int) -> tuple[int, int] | None:
    """(BP, TP) padded batch and token counts for the streaming kernel, or None when it does not fit."""
    bp, tp = next_power_of_2(b), next_power_of_2(t)
    tp = max(tp, 16 // bp)  # tl.dot needs >= 16 rows
    return (bp, tp) if bp * tp <= STREAM_MAX_ROWS else None


def stream_scores_triton(grouped: GroupedQueries, kr_bar: torch.Tensor, col_scale: torch.Tensor | None, *,
                         normalize_k: bool, reduce_sum: bool, exact: bool = True, block_c: int | None = None,
                         num_stages: int | None = None, programs_per_sm: int | None = None,
                         num_warps: int | None = None, head_stages: int | None = None) -> torch.Tensor:
    """Launch the streaming kernel: [L, B, C] fp32 for kr_bar [L, C, Hkv, D] and queries grouped from
    [L*B, TP, H, D] (layer-major; T padded to TP, see `stream_shape`), or [B, C] for kr_bar [C, Hkv, D].

    col_scale ([L,] C, Hkv fp32) multiplies each key's dot: the inverse key norms (`inverse_key_norms`) let the
    kernel skip recomputing them for cosine scoring (None: computed from the tile); int8 keys (`quantized_keys`)
    need their scales (normalize_k=False: they are prepared keys). Defaults (measured on an H100,
    benchmarks/kernels_bench.py --only stream): 2 programs per SM, 4 warps, 128-chunk blocks; 64-wide heads: 3 pipeline stages; wider layouts (Hkv*D > 256):
    no pipelining of whole blocks (3 stages would need more shared memory than an SM has) but of their kv-head
    loop (head_stages, WIDE_HEAD_STAGES by default; measured on an H200).
    """
    single = kr_bar.dim() == 3
    if single:
        kr_bar = kr_bar.unsqueeze(0)
        col_scale = col_scale.unsqueeze(0) if col_scale is not None else None
    pieces = grouped.pieces
    n_parts, lb, tp, _ = pieces.shape
    n_layers, c, hkv, d = kr_bar.shape
    b = lb // n_layers
    if kr_bar.stride(3) != 1:
        kr_bar = kr_bar.contiguous()
    out = torch.empty(n_layers, b, c, dtype=torch.float32, device=kr_bar.device)
    if c and b:
        block_d = max(16, next_power_of_2(d))
        wide = hkv * d > 256
        col_scale = _col_scale(col_scale, kr_bar, normalize_k)
        grid_per_sm = programs_per_sm or 2
        head_stages = head_stages or (WIDE_HEAD_STAGES if wide else 1)
        bc0 = block_c or 128
        choices = [(bc0, (1 if wide else 3) if num_stages is None else num_stages)]
        key = (hkv, d, next_power_of_2(b), tp, n_parts, pieces.dtype, kr_bar.dtype, col_scale is not None, block_c,
               head_stages)
        if num_stages is None:  # default pipelining: fall back to fewer stages / smaller tiles where they do not fit
            fallbacks = [(bc0, 2), (bc0, 1)] + ([(64, 1), (32, 1)] if block_c is None else [])
            choices = [_FITS[key]] if key in _FITS else list(dict.fromkeys([*choices, *fallbacks]))
        for i, (bc, stages) in enumerate(choices):
            jobs = n_layers * triton.cdiv(c, bc)
            try:
                _stream_scores_kernel[(min(jobs, num_sms(kr_bar.device) * grid_per_sm),)](
                    pieces, pieces.stride(0), b * tp * hkv * d,
                    grouped.token_scale if grouped.group_scale is None else grouped.group_scale,
                    grouped.token_scale, grouped.mask,
                    kr_bar, kr_bar.stride(0), kr_bar.stride(1), kr_bar.stride(2),
                    kr_bar if col_scale is None else col_scale, c * hkv, out, out.stride(0), out.stride(1),
                    b, c, n_layers,
                    HKV=hkv, D=d, BLOCK_D=block_d, BP=next_power_of_2(b), TP=tp, BLOCK_C=bc, N_PARTS=n_parts,
                    NORMALIZE_K=normalize_k, COL_SCALE=col_scale is not None, REDUCE_SUM=reduce_sum,
                    DOT_PRECISION="tf32x3" if kr_bar.dtype == torch.float32 and exact else "tf32",
                    UPCAST=_upcast(kr_bar), K_INT8=kr_bar.dtype == torch.int8,
                    Q_INT8=grouped.group_scale is not None, NUM_STAGES=stages, HEAD_STAGES=head_stages, num_warps=num_warps or 4,
                )
            except triton.runtime.errors.OutOfResources:  # raised before the launch: nothing ran
                if i == len(choices) - 1:
                    raise
                continue
            _FITS[key] = (bc, stages)
            break
    return out[0] if single else out
