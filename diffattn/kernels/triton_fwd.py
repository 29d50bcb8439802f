"""Block-sparse FlashAttention-2 forward kernel (Triton) and the tile helpers shared with backward.

The kernel executes a :class:`~diffattn.patterns.layout.BlockLayout`. One program owns one query
block of one (batch, head) and visits only that block's listed key blocks. The launcher
(:mod:`diffattn.kernels.triton_attention`) splits every block's list into two lists:

* **full** tiles: no element mask and no token beyond ``N`` on either side. The loop over them is
  a plain dense FlashAttention inner loop: no bit unpacking, no bounds checks, no ``-inf`` guards.
* **masked** tiles: partial tiles (packed element mask), plus any tile touching the ragged last
  block (tokens ``>= N``). Their loop loads with bounds masks, unpacks the mask words and guards
  rows that have seen no allowed key yet.

Both loops are the same ``@triton.jit`` function specialised on the ``MASKED`` constexpr, so each
compiles to a branch-free loop that Triton can software-pipeline; a per-tile scalar branch would
put a data-dependent ``if`` around the mask work in the hot loop and keep the bounds masks on
every load. The iteration order (full list, then masked list, each ascending) is fixed, so the
forward is deterministic.

Softmax runs in base 2: scores are multiplied by ``scale * log2(e)`` once, ``exp2`` replaces
``exp``, and the log-sum-exp is converted back to natural log on the way out.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .backends import triton_interpreter

#: True when the kernels in this module run under Triton's CPU interpreter (``TRITON_INTERPRET=1``
#: was set before this module was imported): ``triton.jit`` below decides it now, once.
INTERPRET: bool = triton_interpreter()

_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)


# ------------------------------------------------------------------------------------ helpers
@triton.jit
def tile_allowed(
    masks_ptr,
    mask_id,
    q_start,
    k_start,
    ROWS: tl.constexpr,
    COLS: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    WORDS: tl.constexpr,
):
    """Element mask of a ``[ROWS, COLS]`` window of one tile (query rows ``q_start + i``, key
    columns ``k_start + j`` inside the tile; ``k_start`` a multiple of 32), bool.

    Loads only ``ROWS * COLS / 32`` int32 words and expands them in registers (shift by the bit
    position, reshape ``[ROWS, COLS/32, 32] -> [ROWS, COLS]``, which keeps bit ``b`` of word ``w``
    at column ``32 w + b``). A per-element gather of the words would issue 32x more loads and,
    when pipelined, stage a full int32 tile in shared memory.

    ``mask_id < 0`` (a full tile that is only in the masked list because it touches the ragged
    end) gives all True; it reads mask row 0 (the launcher guarantees one exists) and discards it,
    which is cheaper than a second code path for these few edge tiles.
    """
    CHUNK_WORDS: tl.constexpr = COLS // 32
    tile_base = masks_ptr + tl.maximum(mask_id, 0).to(tl.int64) * (BLOCK_Q * WORDS)
    rows = q_start + tl.arange(0, ROWS)
    cols = k_start // 32 + tl.arange(0, CHUNK_WORDS)
    words = tl.load(tile_base + rows[:, None] * WORDS + cols[None, :])
    bits = (words[:, :, None] >> tl.arange(0, 32)[None, None, :]) & 1
    return (tl.reshape(bits, (ROWS, COLS)) != 0) | (mask_id < 0)


@triton.jit
def load_rows(ptrs, row_ok, d_ok, CHECK_ROWS: tl.constexpr, PAD_D: tl.constexpr):
    """Load a ``[R, BLOCK_D]`` tile; masks are only emitted where the constexprs ask for them."""
    if CHECK_ROWS:
        if PAD_D:
            x = tl.load(ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        else:
            x = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    else:
        if PAD_D:
            x = tl.load(ptrs, mask=d_ok[None, :], other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def store_rows(ptrs, x, row_ok, d_ok, PAD_D: tl.constexpr):
    """Store a ``[R, BLOCK_D]`` tile, skipping rows ``>= N`` and padded head-dim columns."""
    if PAD_D:
        tl.store(ptrs, x, mask=row_ok[:, None] & d_ok[None, :])
    else:
        tl.store(ptrs, x, mask=row_ok[:, None])


# ------------------------------------------------------------------------------------ forward
@triton.jit
def online_softmax_step(acc, l_i, m_i, s, v, MAY_BE_EMPTY: tl.constexpr, PRECISION: tl.constexpr):
    """Fold one chunk of scores ``s`` [BLOCK_M, C] (log2 units) and values ``v`` [C, BLOCK_D] into
    the running ``(acc, l_i, m_i)``; returns the updated triple.

    ``MAY_BE_EMPTY``: some rows may have no allowed key so far (m_new = -inf); subtracting 0
    instead keeps exp2(-inf - -inf) = NaN out of p and alpha (both become exactly 0).
    """
    m_new = tl.maximum(m_i, tl.max(s, 1))
    if MAY_BE_EMPTY:
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_use = m_new
    p = tl.math.exp2(s - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
    return acc, l_i, m_new


@triton.jit
def _fwd_tiles(
    acc,
    l_i,
    m_i,
    q,
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
    """Online-softmax update of one query block over ``count`` listed key blocks.

    acc: fp32 [BLOCK_M, BLOCK_D]; l_i, m_i: fp32 [BLOCK_M] (m_i in log2 units).
    """
    SUB_N: tl.constexpr = BLOCK_N // SPLIT
    WORDS: tl.constexpr = BLOCK_N // 32
    for i in range(count):
        kb = tl.load(idx_ptr + i)
        mask_id = -1
        if MASKED:
            mask_id = tl.load(mid_ptr + i)
        k_blk = k_base + (kb * BLOCK_N).to(tl.int64) * stride_kn
        v_blk = v_base + (kb * BLOCK_N).to(tl.int64) * stride_vn
        # The key block may be processed in SPLIT column chunks (autotuned): same tiles visited,
        # smaller register footprint per step.
        for sub in tl.static_range(SPLIT):
            offs_t = sub * SUB_N + tl.arange(0, SUB_N)
            n_ok = kb * BLOCK_N + offs_t < n_tokens
            k = load_rows(k_blk + offs_t[:, None] * stride_kn + offs_d[None, :], n_ok, d_ok, MASKED, PAD_D)
            v = load_rows(v_blk + offs_t[:, None] * stride_vn + offs_d[None, :], n_ok, d_ok, MASKED, PAD_D)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            if MASKED:
                allowed = tile_allowed(masks_ptr, mask_id, 0, sub * SUB_N, BLOCK_M, SUB_N, BLOCK_M, WORDS)
                allowed = allowed & n_ok[None, :] & m_ok[:, None]
                s = tl.where(allowed, s, float("-inf"))
            acc, l_i, m_i = online_softmax_step(acc, l_i, m_i, s, v, MASKED, PRECISION)
    return acc, l_i, m_i


@triton.jit
def load_pooled(base, rows, c_ok, offs_d, d_ok, HEAD_DIM: tl.constexpr, PAD_D: tl.constexpr):
    """Gather pooled-bank rows ``rows`` ([POOL_N], masked by ``c_ok``) of a contiguous
    ``[R, HEAD_DIM]`` bank: ``[POOL_N, BLOCK_D]``, zeros where masked."""
    return load_rows(base + rows.to(tl.int64)[:, None] * HEAD_DIM + offs_d[None, :], c_ok, d_ok, True, PAD_D)


@triton.jit
def pooled_chunk(q, pk_base, pv_base, idx_ptr, start, count, bias_ptr, offs_d, d_ok, qk_scale,
                 HEAD_DIM: tl.constexpr, POOL_N: tl.constexpr, PAD_D: tl.constexpr, PRECISION: tl.constexpr):
    """The ``POOL_N`` pooled-bank rows of a query block's list from ``start`` on: ``(rows, c_ok, k,
    v, s)`` with ``c_ok`` masking entries past ``count`` and ``s`` the scores plus each group's
    ``log2(size)`` (``bias_ptr``, base-2 units like the scores); masked columns are not -inf yet."""
    offs = start + tl.arange(0, POOL_N)
    c_ok = offs < count
    rows = tl.load(idx_ptr + offs, mask=c_ok, other=0)
    k = load_pooled(pk_base, rows, c_ok, offs_d, d_ok, HEAD_DIM, PAD_D)
    v = load_pooled(pv_base, rows, c_ok, offs_d, d_ok, HEAD_DIM, PAD_D)
    bias = tl.load(bias_ptr + rows, mask=c_ok, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale + bias[None, :]
    return rows, c_ok, k, v, s


@triton.jit
def _fwd_pooled(
    acc,
    l_i,
    m_i,
    q,
    pk_base,
    pv_base,
    idx_ptr,
    count,
    bias_ptr,
    offs_d,
    d_ok,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    POOL_N: tl.constexpr,
    PAD_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Online-softmax update over the query block's pooled keys: ``count`` rows of the pooled
    bank (listed at ``idx_ptr``), gathered ``POOL_N`` at a time, each logit plus its group's
    ``log2(size)`` (``bias_ptr``, base-2 units like the scores)."""
    for start in range(0, count, POOL_N):
        rows, c_ok, k, v, s = pooled_chunk(q, pk_base, pv_base, idx_ptr, start, count, bias_ptr, offs_d, d_ok,
                                           qk_scale, HEAD_DIM, POOL_N, PAD_D, PRECISION)
        s = tl.where(c_ok[None, :], s, float("-inf"))
        acc, l_i, m_i = online_softmax_step(acc, l_i, m_i, s, v, True, PRECISION)
    return acc, l_i, m_i


@triton.jit
def attn_fwd_kernel(
    Q,
    K,
    V,
    Out,
    Lse,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_ob,
    stride_oh,
    stride_on,
    FullCount,
    FullIdx,
    PartCount,
    PartIdx,
    PartMid,
    Masks,
    PoolK,
    PoolV,
    PoolCount,
    PoolIdx,
    PoolBias,
    full_width,
    part_width,
    pool_width,
    pool_rows,
    layout_heads,
    num_heads,
    n_tokens,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAD_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    STORE_LSE: tl.constexpr,
    PRECISION: tl.constexpr,
    HAS_POOL: tl.constexpr,
    POOL_N: tl.constexpr,
    SPLIT: tl.constexpr,
):
    """Grid ``(ceil(N / BLOCK_M), B * H)``.

    Q, K, V: [B, H, N, D] (any strides, unit stride along D). Out: [B, H, N, D]. Lse: fp32
    [B * H, N] contiguous, natural log, ``-inf`` for rows without an allowed key.
    Full*/Part*: the launcher's split tile lists, [Hl, Mq] counts and [Hl, Mq, width] lists
    (``Hl = layout_heads``, 1 when the layout is shared by all heads).
    With ``HAS_POOL``: PoolK, PoolV: contiguous ``[B, H, pool_rows, HEAD_DIM]`` group means of K
    and V (pooled tiles, ``layout.kv_levels``); PoolCount [Hl, Mq] and PoolIdx [Hl, Mq,
    pool_width]: each query block's pooled rows; PoolBias fp32 [pool_rows]: log2(group size).
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_heads).to(tl.int64)
    h = pid_bh % num_heads
    num_m = tl.cdiv(n_tokens, BLOCK_M)
    row = (h % layout_heads) * num_m + pid_m

    offs_t = tl.arange(0, BLOCK_M)
    offs_m = pid_m * BLOCK_M + offs_t
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < n_tokens
    d_ok = offs_d < HEAD_DIM
    h64 = h.to(tl.int64)
    q_blk = Q + b * stride_qb + h64 * stride_qh + (pid_m * BLOCK_M).to(tl.int64) * stride_qn
    q = load_rows(q_blk + offs_t[:, None] * stride_qn + offs_d[None, :], m_ok, d_ok, True, PAD_D)
    k_base = K + b * stride_kb + h64 * stride_kh
    v_base = V + b * stride_vb + h64 * stride_vh

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)

    full_count = tl.load(FullCount + row)
    acc, l_i, m_i = _fwd_tiles(
        acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn,
        FullIdx + row.to(tl.int64) * full_width, FullIdx, full_count, Masks,
        m_ok, offs_d, d_ok, n_tokens, qk_scale,
        False, BLOCK_M, BLOCK_N, SPLIT, PAD_D, PRECISION,
    )  # fmt: skip
    part_count = tl.load(PartCount + row)
    acc, l_i, m_i = _fwd_tiles(
        acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn,
        PartIdx + row.to(tl.int64) * part_width, PartMid + row.to(tl.int64) * part_width, part_count, Masks,
        m_ok, offs_d, d_ok, n_tokens, qk_scale,
        True, BLOCK_M, BLOCK_N, SPLIT, PAD_D, PRECISION,
    )  # fmt: skip
    if HAS_POOL:
        bank = pid_bh.to(tl.int64) * pool_rows * HEAD_DIM
        acc, l_i, m_i = _fwd_pooled(
            acc, l_i, m_i, q, PoolK + bank, PoolV + bank,
            PoolIdx + row.to(tl.int64) * pool_width, tl.load(PoolCount + row), PoolBias,
            offs_d, d_ok, qk_scale, HEAD_DIM, POOL_N, PAD_D, PRECISION,
        )  # fmt: skip

    # Rows without any allowed key have l_i == 0 (and acc == 0): output 0, lse -inf, no 0/0.
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    o_blk = Out + b * stride_ob + h64 * stride_oh + (pid_m * BLOCK_M).to(tl.int64) * stride_on
    store_rows(o_blk + offs_t[:, None] * stride_on + offs_d[None, :], out.to(Out.dtype.element_ty), m_ok, d_ok, PAD_D)
    if STORE_LSE:
        lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * _LN2)
        tl.store(Lse + pid_bh.to(tl.int64) * n_tokens + offs_m, lse, mask=m_ok)


# ------------------------------------------------------------------------------------ autotuning
def tuning_configs(splits: tuple[int, ...]) -> list[triton.Config]:
    """Launch configurations to try on a GPU; a single one under the interpreter (where
    benchmarking is meaningless and every extra config costs seconds).

    ``num_warps`` 4/8 and ``num_stages`` 1-3 cover Ampere (A100: 163 KB of shared memory per
    block) and Hopper (H100: 227 KB). SPLIT cuts the iterated block into chunks: the layout fixes
    which tiles are visited, not the register tile size, and smaller chunks avoid register spills
    in the backward kernels (whose accumulators are a whole block). :func:`prune_configs` keeps
    only the few that make sense for the actual block sizes, head dim, dtype and GPU.
    """
    if INTERPRET:
        return [triton.Config({"SPLIT": 1}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"SPLIT": split}, num_warps=warps, num_stages=stages)
        for split in splits
        for warps in (4, 8)
        for stages in (1, 2, 3)
    ]


def prune_configs(kind: str, min_chunk: int = 32):
    """``early_config_prune`` hook for kernel ``kind`` ("fwd", "dq" or "dkdv").

    * SPLIT must leave chunks of at least ``min_chunk`` rows (or no split at all);
    * the fp32 accumulators a program keeps for its whole life (O or dQ: ``own x D``; dK and dV:
      ``2 x own x D``) may take at most 64 (fwd, dq) / 128 (dkdv) registers per thread: beyond
      that ptxas spills heavily (compiling for sm_80 showed 12 KB of stack for 128 x 128, D=128
      on 4 warps);
    * 4 warps only for score tiles of at most 128 x 64 elements, 8 warps only from 64 x 64 up
      (fewer warps on a big tile spill registers; more warps on a small tile idle);
    * stages whose estimated shared memory exceeds the GPU's limit are dropped, and 1 stage is
      kept only when nothing pipelined fits.
    """
    from .triton_attention import shared_memory_limit, smem_estimate

    def prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
        args = {**named_args, **kwargs}
        block_m, block_n, block_d = int(args["BLOCK_M"]), int(args["BLOCK_N"]), int(args["BLOCK_D"])
        own, iterated = (block_n, block_m) if kind == "dkdv" else (block_m, block_n)
        elem = args["Q"].element_size()
        limit = shared_memory_limit(args["Q"].device)
        shaped = []
        for config in configs:
            split = config.kwargs["SPLIT"]
            chunk = iterated // split
            if iterated % split or (split > 1 and chunk < min_chunk):
                continue
            threads = 32 * config.num_warps
            if kind == "dkdv" and 2 * own * block_d > 128 * threads or kind != "dkdv" and own * block_d > 64 * threads:
                continue
            tile = own * chunk
            if (config.num_warps <= 4 and tile > 128 * 64) or (config.num_warps >= 8 and tile < 64 * 64):
                continue
            shaped.append(config)
        shaped = shaped or configs[:1]
        fits = [c for c in shaped
                if limit is None or smem_estimate(kind, block_m, block_n, block_d, elem, c.num_stages) <= limit]
        pipelined = [c for c in fits if c.num_stages > 1]
        return pipelined or fits or [min(shaped, key=lambda c: c.num_stages)]

    return prune


attn_fwd = triton.autotune(
    configs=tuning_configs((1, 2)),
    key=["HEAD_DIM", "BLOCK_M", "BLOCK_N", "PRECISION", "HAS_POOL"],
    prune_configs_by={"early_config_prune": prune_configs("fwd")},
    cache_results=True,
)(attn_fwd_kernel)
"""Autotuned :func:`attn_fwd_kernel` (the tensors' dtypes are part of the tuning key too)."""
