"""Block-sparse FlashAttention-2 backward kernels (Triton): delta, dK/dV and dQ.

* :func:`bwd_preprocess_kernel`: ``delta = rowsum(dO * O) - dLSE`` in fp32 (the ``dLSE`` term makes
  the returned log-sum-exp differentiable: ``d lse_i / d s_ij = P_ij``).
* :func:`bwd_dkdv_kernel`: one program per key block; it visits the query blocks that list it
  (``layout.transposed``), recomputes ``P`` from Q, K and the saved LSE with the same masks as the
  forward, and accumulates ``dV += P^T dO`` and ``dK += dS^T Q`` in registers.
* :func:`bwd_dq_kernel`: one program per query block over its listed key blocks,
  ``dQ += dS K``.

Each output element of dQ, dK, dV is written by exactly one program, so the static-layout
backward has no atomics and is deterministic. Pooled tiles (``layout.kv_levels``) are the
exception: their keys are group means in a pooled bank, and the dQ program of each query block
that lists a pooled row adds that row's dK, dV atomically (fp32) into a pooled-gradient bank;
the launcher then spreads each pooled row's gradient back to the raw keys of its group (``1/c``
each). A program per pooled row would need, per listed query block, a mask of which of its
rows the block visits (pooled tiles are scattered by importance), and would pay for the rows it
does not. As in the forward, each program runs a *full* tile loop (no masks, no
bounds checks) and a *masked* loop (partial tiles and tiles touching the ragged end).

Rows whose LSE is ``-inf`` (no allowed key) are treated as ``+inf`` here, so ``P = exp2(s - lse)``
is exactly 0 instead of ``inf``/NaN; rows ``>= N`` load ``lse = +inf`` for the same reason.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_fwd import INTERPRET, load_rows, pooled_chunk, prune_configs, store_rows, tile_allowed, tuning_configs

_LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _lse_log2(lse):
    """Natural-log LSE -> log2 units, with -inf (empty row) mapped to +inf so that P = 0."""
    return tl.where(lse == float("-inf"), float("inf"), lse * _LOG2E)


# ------------------------------------------------------------------------------------ delta
@triton.jit
def bwd_preprocess_kernel(
    Out,
    dOut,
    dLse,
    Delta,
    stride_ob,
    stride_oh,
    stride_on,
    stride_dob,
    stride_doh,
    stride_don,
    num_heads,
    n_tokens,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAD_D: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_DLSE: tl.constexpr,
):
    """Grid ``(ceil(N / BLOCK), B * H)``. Out, dOut: [B, H, N, D]; dLse, Delta: fp32 [B * H, N]."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_heads).to(tl.int64)
    h = (pid_bh % num_heads).to(tl.int64)
    offs_t = tl.arange(0, BLOCK)
    offs_m = pid_m * BLOCK + offs_t
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < n_tokens
    d_ok = offs_d < HEAD_DIM
    start = (pid_m * BLOCK).to(tl.int64)
    o_blk = Out + b * stride_ob + h * stride_oh + start * stride_on
    do_blk = dOut + b * stride_dob + h * stride_doh + start * stride_don
    o = load_rows(o_blk + offs_t[:, None] * stride_on + offs_d[None, :], m_ok, d_ok, True, PAD_D)
    do = load_rows(do_blk + offs_t[:, None] * stride_don + offs_d[None, :], m_ok, d_ok, True, PAD_D)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    row = pid_bh.to(tl.int64) * n_tokens + offs_m
    if HAS_DLSE:
        delta -= tl.load(dLse + row, mask=m_ok, other=0.0)
    tl.store(Delta + row, delta, mask=m_ok)


# ------------------------------------------------------------------------------------ dK, dV
@triton.jit
def _dkdv_tiles(
    dk,
    dv,
    k,
    v,
    q_base,
    do_base,
    lse_base,
    delta_base,
    stride_qn,
    stride_don,
    idx_ptr,
    mid_ptr,
    count,
    masks_ptr,
    n_ok,
    offs_d,
    d_ok,
    n_tokens,
    qk_scale,
    MASKED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr,
    PAD_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Accumulate dK, dV (fp32 [BLOCK_N, BLOCK_D]) of one key block over ``count`` query blocks.

    Works on transposed tiles ``[BLOCK_N, SUB_M]`` so that P^T and dS^T feed the dots directly.
    """
    SUB_M: tl.constexpr = BLOCK_M // SPLIT
    WORDS: tl.constexpr = BLOCK_N // 32
    for i in range(count):
        qb = tl.load(idx_ptr + i)
        mask_id = -1
        if MASKED:
            mask_id = tl.load(mid_ptr + i)
        start = (qb * BLOCK_M).to(tl.int64)
        q_blk = q_base + start * stride_qn
        do_blk = do_base + start * stride_don
        for sub in tl.static_range(SPLIT):
            offs_t = sub * SUB_M + tl.arange(0, SUB_M)
            m_ok = qb * BLOCK_M + offs_t < n_tokens
            q = load_rows(q_blk + offs_t[:, None] * stride_qn + offs_d[None, :], m_ok, d_ok, MASKED, PAD_D)
            do = load_rows(do_blk + offs_t[:, None] * stride_don + offs_d[None, :], m_ok, d_ok, MASKED, PAD_D)
            if MASKED:
                lse = tl.load(lse_base + start + offs_t, mask=m_ok, other=float("inf"))
                delta = tl.load(delta_base + start + offs_t, mask=m_ok, other=0.0)
            else:
                lse = tl.load(lse_base + start + offs_t)
                delta = tl.load(delta_base + start + offs_t)
            s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
            p_t = tl.math.exp2(s_t - _lse_log2(lse)[None, :])
            if MASKED:
                allowed = tl.trans(tile_allowed(masks_ptr, mask_id, sub * SUB_M, 0, SUB_M, BLOCK_N, BLOCK_M, WORDS))
                allowed = allowed & m_ok[None, :] & n_ok[:, None]
                p_t = tl.where(allowed, p_t, 0.0)
            dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PRECISION)
            dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            ds_t = p_t * (dp_t - delta[None, :])
            dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=PRECISION)
    return dk, dv


@triton.jit
def bwd_dkdv_kernel(
    Q,
    K,
    V,
    dOut,
    Lse,
    Delta,
    dK,
    dV,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_dob,
    stride_doh,
    stride_don,
    stride_dkb,
    stride_dkh,
    stride_dkn,
    stride_dvb,
    stride_dvh,
    stride_dvn,
    FullCount,
    FullIdx,
    PartCount,
    PartIdx,
    PartMid,
    Masks,
    full_width,
    part_width,
    layout_heads,
    num_heads,
    n_tokens,
    qk_scale,
    sm_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAD_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
    SPLIT: tl.constexpr,
):
    """Grid ``(ceil(N / BLOCK_N), B * H)``; Full*/Part* are the split *transposed* lists
    ([Hl, Mk] counts, [Hl, Mk, width] query-block lists). Lse, Delta: fp32 [B * H, N]."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_heads).to(tl.int64)
    h = pid_bh % num_heads
    num_n = tl.cdiv(n_tokens, BLOCK_N)
    row = ((h % layout_heads) * num_n + pid_n).to(tl.int64)
    h = h.to(tl.int64)

    offs_t = tl.arange(0, BLOCK_N)
    offs_n = pid_n * BLOCK_N + offs_t
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < n_tokens
    d_ok = offs_d < HEAD_DIM
    start = (pid_n * BLOCK_N).to(tl.int64)
    k = load_rows(K + b * stride_kb + h * stride_kh + start * stride_kn + offs_t[:, None] * stride_kn + offs_d[None, :],
                  n_ok, d_ok, True, PAD_D)
    v = load_rows(V + b * stride_vb + h * stride_vh + start * stride_vn + offs_t[:, None] * stride_vn + offs_d[None, :],
                  n_ok, d_ok, True, PAD_D)
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = dOut + b * stride_dob + h * stride_doh
    lse_base = Lse + pid_bh.to(tl.int64) * n_tokens
    delta_base = Delta + pid_bh.to(tl.int64) * n_tokens

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dk, dv = _dkdv_tiles(
        dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qn, stride_don,
        FullIdx + row * full_width, FullIdx, tl.load(FullCount + row), Masks,
        n_ok, offs_d, d_ok, n_tokens, qk_scale,
        False, BLOCK_M, BLOCK_N, SPLIT, PAD_D, PRECISION,
    )  # fmt: skip
    dk, dv = _dkdv_tiles(
        dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qn, stride_don,
        PartIdx + row * part_width, PartMid + row * part_width, tl.load(PartCount + row), Masks,
        n_ok, offs_d, d_ok, n_tokens, qk_scale,
        True, BLOCK_M, BLOCK_N, SPLIT, PAD_D, PRECISION,
    )  # fmt: skip
    dk = dk * sm_scale
    dk_blk = dK + b * stride_dkb + h * stride_dkh + start * stride_dkn
    dv_blk = dV + b * stride_dvb + h * stride_dvh + start * stride_dvn
    store_rows(dk_blk + offs_t[:, None] * stride_dkn + offs_d[None, :], dk.to(dK.dtype.element_ty), n_ok, d_ok, PAD_D)
    store_rows(dv_blk + offs_t[:, None] * stride_dvn + offs_d[None, :], dv.to(dV.dtype.element_ty), n_ok, d_ok, PAD_D)


# ------------------------------------------------------------------------------------ dQ
@triton.jit
def _dq_tiles(
    dq,
    q,
    do,
    lse2,
    delta,
    k_base,
    v_base,
    stride_kn,
    stride_vn,
    idx_ptr,
    mid_ptr,
    count,
    masks_ptr,
    m_ok,
    offs_d,
    d_ok,
    n_tokens,
    qk_scale,
    MASKED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr,
    PAD_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Accumulate dQ (fp32 [BLOCK_M, BLOCK_D]) of one query block over ``count`` key blocks."""
    SUB_N: tl.constexpr = BLOCK_N // SPLIT
    WORDS: tl.constexpr = BLOCK_N // 32
    for i in range(count):
        kb = tl.load(idx_ptr + i)
        mask_id = -1
        if MASKED:
            mask_id = tl.load(mid_ptr + i)
        k_blk = k_base + (kb * BLOCK_N).to(tl.int64) * stride_kn
        v_blk = v_base + (kb * BLOCK_N).to(tl.int64) * stride_vn
        for sub in tl.static_range(SPLIT):
            offs_t = sub * SUB_N + tl.arange(0, SUB_N)
            n_ok = kb * BLOCK_N + offs_t < n_tokens
            k = load_rows(k_blk + offs_t[:, None] * stride_kn + offs_d[None, :], n_ok, d_ok, MASKED, PAD_D)
            v = load_rows(v_blk + offs_t[:, None] * stride_vn + offs_d[None, :], n_ok, d_ok, MASKED, PAD_D)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            p = tl.math.exp2(s - lse2[:, None])
            if MASKED:
                allowed = tile_allowed(masks_ptr, mask_id, 0, sub * SUB_N, BLOCK_M, SUB_N, BLOCK_M, WORDS)
                allowed = allowed & n_ok[None, :] & m_ok[:, None]
                p = tl.where(allowed, p, 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    return dq


@triton.jit
def _dq_pooled(
    dq,
    q,
    do,
    lse2,
    delta,
    pk_base,
    pv_base,
    dpk_base,
    dpv_base,
    idx_ptr,
    count,
    bias_ptr,
    offs_d,
    d_ok,
    qk_scale,
    sm_scale,
    HEAD_DIM: tl.constexpr,
    POOL_N: tl.constexpr,
    PAD_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dQ over the query block's pooled keys, and their dK, dV added atomically (fp32) into the
    pooled-gradient banks: a pooled row is shared by every query block that lists it, and a
    program per pooled row would need per-block column masks (see the module docstring)."""
    for start in range(0, count, POOL_N):
        rows, c_ok, k, v, s = pooled_chunk(q, pk_base, pv_base, idx_ptr, start, count, bias_ptr, offs_d, d_ok,
                                           qk_scale, HEAD_DIM, POOL_N, PAD_D, PRECISION)
        p = tl.where(c_ok[None, :], tl.math.exp2(s - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
        dv_rows = tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
        dk_rows = tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION) * sm_scale
        grad_ptrs = rows.to(tl.int64)[:, None] * HEAD_DIM + offs_d[None, :]
        grad_ok = c_ok[:, None] & d_ok[None, :]
        # Relaxed: only the sums matter, and the kernel's end orders them before they are read.
        tl.atomic_add(dpv_base + grad_ptrs, dv_rows, mask=grad_ok, sem="relaxed")
        tl.atomic_add(dpk_base + grad_ptrs, dk_rows, mask=grad_ok, sem="relaxed")
    return dq


@triton.jit
def bwd_dq_kernel(
    Q,
    K,
    V,
    dOut,
    Lse,
    Delta,
    dQ,
    PoolK,
    PoolV,
    dPoolK,
    dPoolV,
    PoolCount,
    PoolIdx,
    PoolBias,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_dob,
    stride_doh,
    stride_don,
    stride_dqb,
    stride_dqh,
    stride_dqn,
    FullCount,
    FullIdx,
    PartCount,
    PartIdx,
    PartMid,
    Masks,
    full_width,
    part_width,
    pool_width,
    pool_rows,
    layout_heads,
    num_heads,
    n_tokens,
    qk_scale,
    sm_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAD_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
    HAS_POOL: tl.constexpr,
    POOL_N: tl.constexpr,
    SPLIT: tl.constexpr,
):
    """Grid ``(ceil(N / BLOCK_M), B * H)``; Full*/Part* are the forward's split lists; Pool* as
    in the forward, plus dPoolK, dPoolV: fp32 ``[B, H, pool_rows, HEAD_DIM]`` zeroed buffers that
    receive the pooled keys' gradients."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_heads).to(tl.int64)
    h = pid_bh % num_heads
    num_m = tl.cdiv(n_tokens, BLOCK_M)
    row = ((h % layout_heads) * num_m + pid_m).to(tl.int64)
    h = h.to(tl.int64)

    offs_t = tl.arange(0, BLOCK_M)
    offs_m = pid_m * BLOCK_M + offs_t
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < n_tokens
    d_ok = offs_d < HEAD_DIM
    start = (pid_m * BLOCK_M).to(tl.int64)
    q = load_rows(Q + b * stride_qb + h * stride_qh + start * stride_qn + offs_t[:, None] * stride_qn + offs_d[None, :],
                  m_ok, d_ok, True, PAD_D)
    do = load_rows(dOut + b * stride_dob + h * stride_doh + start * stride_don
                   + offs_t[:, None] * stride_don + offs_d[None, :],
                   m_ok, d_ok, True, PAD_D)
    stats = pid_bh.to(tl.int64) * n_tokens + offs_m
    lse2 = _lse_log2(tl.load(Lse + stats, mask=m_ok, other=float("inf")))
    delta = tl.load(Delta + stats, mask=m_ok, other=0.0)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = _dq_tiles(
        dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn,
        FullIdx + row * full_width, FullIdx, tl.load(FullCount + row), Masks,
        m_ok, offs_d, d_ok, n_tokens, qk_scale,
        False, BLOCK_M, BLOCK_N, SPLIT, PAD_D, PRECISION,
    )  # fmt: skip
    dq = _dq_tiles(
        dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn,
        PartIdx + row * part_width, PartMid + row * part_width, tl.load(PartCount + row), Masks,
        m_ok, offs_d, d_ok, n_tokens, qk_scale,
        True, BLOCK_M, BLOCK_N, SPLIT, PAD_D, PRECISION,
    )  # fmt: skip
    if HAS_POOL:
        bank = pid_bh.to(tl.int64) * pool_rows * HEAD_DIM
        dq = _dq_pooled(
            dq, q, do, lse2, delta, PoolK + bank, PoolV + bank, dPoolK + bank, dPoolV + bank,
            PoolIdx + row * pool_width, tl.load(PoolCount + row), PoolBias,
            offs_d, d_ok, qk_scale, sm_scale, HEAD_DIM, POOL_N, PAD_D, PRECISION,
        )  # fmt: skip
    dq = dq * sm_scale
    dq_blk = dQ + b * stride_dqb + h * stride_dqh + start * stride_dqn
    store_rows(dq_blk + offs_t[:, None] * stride_dqn + offs_d[None, :], dq.to(dQ.dtype.element_ty), m_ok, d_ok, PAD_D)


# ------------------------------------------------------------------------------------ autotuning
bwd_dkdv = triton.autotune(
    configs=tuning_configs((1, 2, 4)),  # SPLIT chops the iterated *query* block
    key=["HEAD_DIM", "BLOCK_M", "BLOCK_N", "PRECISION"],
    prune_configs_by={"early_config_prune": prune_configs("dkdv")},
    cache_results=True,
)(bwd_dkdv_kernel)
"""Autotuned :func:`bwd_dkdv_kernel`."""

bwd_dq = triton.autotune(
    configs=tuning_configs((1, 2, 4)),  # SPLIT chops the iterated *key* block
    key=["HEAD_DIM", "BLOCK_M", "BLOCK_N", "PRECISION", "HAS_POOL"],
    # Pooled-key gradients are added atomically: every timed run must start from zero.
    reset_to_zero=["dPoolK", "dPoolV"],
    prune_configs_by={"early_config_prune": prune_configs("dq")},
    cache_results=True,
)(bwd_dq_kernel)
"""Autotuned :func:`bwd_dq_kernel`."""

__all__ = [
    "INTERPRET",
    "bwd_dkdv",
    "bwd_dkdv_kernel",
    "bwd_dq",
    "bwd_dq_kernel",
    "bwd_preprocess_kernel",
]
