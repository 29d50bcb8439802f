"""Triton backend: launchers and the autograd Function around the block-sparse kernels.

Public entry points (used by :mod:`diffattn.kernels.api`, which applies the layout's token
permutation before calling here and undoes it afterwards):

* :func:`triton_block_sparse_attention` — differentiable block-sparse attention on ``[B, H, N, D]``
  tensors already in the kernel's token order.
* :func:`triton_support_problems` — why a given call cannot run on this backend (``[]`` if it can).

The kernels (:mod:`.triton_fwd`, :mod:`.triton_bwd`) are imported lazily, so that importing this
module works without Triton and so that ``TRITON_INTERPRET`` may still be set by the caller before
the first launch.

Tile lists: a layout lists, per query block, the visited key blocks with a mask id (``-1`` =
full). The kernels want each list split in two: *full* tiles that need no element mask and no
bounds check, and *masked* tiles (partial, or touching the ragged last block on either side).
The split is computed once per (layout, device) and cached on the layout object (weakly).

Pooled tiles (``layout.kv_levels``, PSA) are not in those lists. Their keys and values are group
means, built once per call with torch ops into a pooled bank (:class:`_PoolLists`); each query
block lists the bank rows of its pooled tiles, and a third loop gathers them ``POOL_N`` rows at a
time, adding ``log2(group size)`` to each logit. A level-``p`` tile thus costs ``block_k / p``
keys; gathering across tiles (rather than one ``block_k / p``-row dot per tile) keeps every
``tl.dot`` at >= 16 rows with level 8 and 32-key blocks, and wastes at most one partial chunk
per query block. The backward adds the pooled rows' dK, dV atomically in the dQ kernel and
spreads them back to the raw keys (``1 / c`` each).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import UserError
from ..patterns._checks import is_finite_number
from ..patterns.layout import MASK_WORD_BITS, BlockLayout
from ._cache import cached_per_layout
from .backends import BACKENDS, triton_interpreter
from .op import attention_op
from .reference import add_pooled_grad, pooled_keys

try:
    import triton as _triton  # noqa: F401  (only probed here; kernels import it themselves)

    _TRITON_IMPORT_ERROR: str | None = None
except Exception as exc:  # pragma: no cover - depends on the platform
    _TRITON_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

# This backend's capabilities (dtypes, head dims, block sizes, devices) are its entry in the
# registry, BACKENDS["triton"]. Head dims 80 and 96 run padded to 128 with masked loads.
# CUDA caps grid dimension y (our B * H axis) at 65535.
_MAX_GRID_Y = 65535
# Rows per program of the small delta kernel.
_DELTA_BLOCK = 64

_LOG2E = 1.4426950408889634


# ------------------------------------------------------------------------------------ resources
# Shared memory the kernels need beyond their operand tiles (mask words, softmax statistics,
# layout conversions), from compiling them for sm_80/sm_90.
_SMEM_SLACK = 4096


def smem_estimate(kind: str, block_m: int, block_n: int, block_d: int, elem_bytes: int, stages: int) -> int:
    """Estimated shared memory (bytes) of kernel ``kind`` ("fwd", "dq", "dkdv").

    Resident tiles (Q for fwd; Q and dO for dq; K and V for dkdv) plus ``stages`` buffers of the
    two tiles loaded per iteration (K and V, or Q and dO). SPLIT does not change it: the chunks of
    one block are unrolled and all buffered. Matches the compiled kernels within ~3 KB.
    """
    stages = max(int(stages), 1)
    if kind == "fwd":
        rows = block_m + stages * 2 * block_n
    elif kind == "dq":
        rows = 2 * block_m + stages * 2 * block_n
    elif kind == "dkdv":
        rows = 2 * block_n + stages * 2 * block_m
    else:
        raise UserError(f"kind must be 'fwd', 'dq' or 'dkdv', got {kind!r}")
    return elem_bytes * block_d * rows + _SMEM_SLACK


def shared_memory_limit(device: torch.device) -> int | None:
    """Opt-in shared memory per block of a CUDA device in bytes (None if unknown / not CUDA)."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    limit = getattr(torch.cuda.get_device_properties(index), "shared_memory_per_block_optin", None)
    if limit:
        return int(limit)
    try:  # older torch: ask Triton's driver
        from triton.runtime import driver

        return int(driver.active.utils.get_device_properties(index)["max_shared_mem"])
    except Exception:
        return None


# ------------------------------------------------------------------------------------ support
# Under torch.compile the GPU's facts are read once, while tracing (dynamo does not trace the
# CUDA driver queries; a device's facts never change).
@torch.compiler.assume_constant_result
def _gpu_facts(device: str) -> tuple[int, str, int | None]:
    """(compute capability major, name, opt-in shared memory per block or None) of a CUDA device."""
    index = torch.device(device).index
    index = torch.cuda.current_device() if index is None else index
    major, _ = torch.cuda.get_device_capability(index)
    return major, torch.cuda.get_device_name(index), shared_memory_limit(torch.device("cuda", index))


def triton_support_problems(q: Any, k: Any, v: Any, layout: Any) -> list[str]:
    """Human-readable reasons why these inputs cannot run on the Triton backend (``[]`` if they can).

    Args:
        q, k, v: ``[B, H, N, D]`` tensors in the kernel's token order.
        layout: the :class:`BlockLayout` to execute.
    """
    problems: list[str] = []
    if _TRITON_IMPORT_ERROR is not None:
        problems.append(f"triton cannot be imported ({_TRITON_IMPORT_ERROR})")
    tensors = {"q": q, "k": k, "v": v}
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            problems.append(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if problems and any(not isinstance(t, torch.Tensor) for t in tensors.values()):
        return problems
    if q.dim() != 4:
        problems.append(f"q must be 4-D [B, H, N, D], got shape {tuple(q.shape)}")
        return problems
    for name in ("k", "v"):
        t = tensors[name]
        if tuple(t.shape) != tuple(q.shape):
            problems.append(f"{name} has shape {tuple(t.shape)}, q has {tuple(q.shape)}; "
                            "the Triton kernels need equal shapes")
        if t.dtype != q.dtype:
            problems.append(f"{name} has dtype {t.dtype}, q has {q.dtype}; they must match")
        if t.device != q.device:
            problems.append(f"{name} is on {t.device}, q is on {q.device}; they must be on one device")
    batch, heads, n, d = q.shape
    if batch * heads > _MAX_GRID_Y:
        problems.append(f"B * H = {batch * heads} exceeds the CUDA grid limit {_MAX_GRID_Y}")
    interpret = triton_interpreter()
    if interpret and q.dtype == torch.bfloat16:
        problems.append("dtype=bfloat16 is not supported under TRITON_INTERPRET=1 "
                        "(the interpreter's tl.dot gives wrong bf16 results); allowed there: float16, float32")
    on_gpu = q.device.type == "cuda" and not interpret
    if on_gpu and q.dtype == torch.bfloat16:
        major, gpu_name, _ = _gpu_facts(str(q.device))
        if major < 8:
            problems.append(f"dtype=bfloat16 needs compute capability >= 8.0, {gpu_name} has {major}.x; allowed there: "
                            "float16, float32")
    if not isinstance(layout, BlockLayout):
        problems.append(f"layout must be a BlockLayout, got {type(layout).__name__}")
        return problems
    if layout.num_tokens != n:
        problems.append(f"layout is for N={layout.num_tokens} tokens, q has N={n}")
    if layout.num_heads not in (1, heads):
        problems.append(f"layout has {layout.num_heads} heads; it must be shared (1) or per head ({heads})")
    table = BACKENDS["triton"].problems(q.device, q.dtype, d, layout.block_q, layout.block_k)
    problems += table
    if on_gpu and not table:
        # Even one pipeline stage must fit (fp32 with 128-wide blocks and D = 128 does not).
        limit = _gpu_facts(str(q.device))[2]
        kinds = ["fwd"] + (["dkdv", "dq"] if any(t.requires_grad for t in (q, k, v)) else [])
        block_d = _head_dim_meta(d)["BLOCK_D"]
        for kind in kinds:
            need = smem_estimate(kind, layout.block_q, layout.block_k, block_d, q.element_size(), 1)
            if limit is not None and need > limit:
                problems.append(
                    f"the {kind} kernel needs ~{need // 1024} KB of shared memory for {q.dtype} with blocks "
                    f"({layout.block_q}, {layout.block_k}) and head dim {d}; this GPU allows {limit // 1024} KB "
                    "(use smaller blocks or fp16/bf16)"
                )
    return problems


# ------------------------------------------------------------------------------------ tile lists
@dataclass(frozen=True)
class _TileLists:
    """One direction's tile lists split for the kernels (all int32, contiguous).

    full_count [Hl, M]; full_idx [Hl, M, Wf]; part_count [Hl, M]; part_idx, part_mid [Hl, M, Wp]
    (``part_mid`` is -1 for a full tile listed as masked only because it touches the ragged end).
    """

    full_count: torch.Tensor
    full_idx: torch.Tensor
    part_count: torch.Tensor
    part_idx: torch.Tensor
    part_mid: torch.Tensor

    @property
    def full_width(self) -> int:
        return int(self.full_idx.shape[-1])

    @property
    def part_width(self) -> int:
        return int(self.part_idx.shape[-1])


@dataclass(frozen=True)
class _PoolLists:
    """Pooled tiles (``layout.kv_levels``) as lists of pooled-bank rows per query block.

    The pooled bank of K (and V) holds, for each level ``p`` in ``levels``, the ``ceil(N / p)``
    group means, level after level. A level-``p`` tile of key block ``kb`` is the bank rows of
    its groups: ``block_k / p`` of them (fewer in the ragged last block).
    count int32 [Hl, Mq]; idx int32 [Hl, Mq, width] (ascending; entries past count unread);
    log2_sizes fp32 [rows]: log2 of each row's group size.
    """

    levels: tuple[int, ...]
    count: torch.Tensor
    idx: torch.Tensor
    log2_sizes: torch.Tensor

    @property
    def width(self) -> int:
        return int(self.idx.shape[-1])

    @property
    def rows(self) -> int:
        return int(self.log2_sizes.numel())

    def bank(self, x: torch.Tensor) -> torch.Tensor:
        """Group means of ``x [B, H, N, D]`` for every level: contiguous ``[B, H, rows, D]``, ``x.dtype``
        (means taken in fp32)."""
        return torch.cat([pooled_keys(x.float(), p)[0] for p in self.levels], dim=2).to(x.dtype).contiguous()

    def spread(self, raw: torch.Tensor, bank_grad: torch.Tensor) -> None:
        """Add the pooled rows' gradients ``[B, H, rows, D]`` to ``raw [B, H, N, D]`` (1/c per key)."""
        start = 0
        for p in self.levels:
            count = -(-raw.shape[2] // p)
            add_pooled_grad(raw, bank_grad[:, :, start : start + count], p)
            start += count


@dataclass(frozen=True)
class _KernelLayout:
    rows: _TileLists  # per query block: key blocks (forward, dQ); level-1 tiles only
    cols: _TileLists  # per key block: query blocks (dK, dV); level-1 tiles only
    masks: torch.Tensor  # int32 [max(P, 1), block_q, block_k // 32], contiguous
    pool: _PoolLists | None  # pooled tiles, None for a static layout


_KERNEL_LAYOUTS: dict[tuple, _KernelLayout] = {}


def _compact(selected: torch.Tensor, *lists: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Move the selected slots of each row to the front, keeping their order.

    Returns ``(count int32 [Hl, M], *compacted lists int32 [Hl, M, max(count, 1)])``.
    """
    count = selected.sum(-1)
    width = max(int(count.max()) if count.numel() else 0, 1)
    # Stable sort on "not selected" keeps selected slots first, in their ascending order.
    order = torch.argsort((~selected).to(torch.int8), dim=-1, stable=True)[..., :width]
    keep = torch.arange(width, device=selected.device) < count[..., None]
    out = [torch.where(keep, torch.gather(x.long(), -1, order), 0) for x in lists]
    return (count.to(torch.int32).contiguous(), *(x.to(torch.int32).contiguous() for x in out))


def _split_lists(
    counts: torch.Tensor, indices: torch.Tensor, mask_ids: torch.Tensor, own_ragged: int | None, iter_ragged: int | None
) -> _TileLists:
    """Split per-block tile lists into full and masked lists.

    ``own_ragged`` / ``iter_ragged``: index of the ragged last block (tokens ``>= N`` inside it) on
    the program's own side / the iterated side, or None when ``N`` is a multiple of the block.
    """
    slots = torch.arange(indices.shape[-1], device=indices.device)
    valid = slots < counts[..., None].long()
    masked = mask_ids >= 0
    if iter_ragged is not None:
        masked = masked | (indices == iter_ragged)
    if own_ragged is not None:
        own = torch.zeros_like(masked)
        own[:, own_ragged, :] = True
        masked = masked | own
    masked = masked & valid
    full = valid & ~masked
    full_count, full_idx = _compact(full, indices)
    part_count, part_idx, part_mid = _compact(masked, indices, torch.where(masked, mask_ids, -1))
    # Compaction pads with 0; a padded mask id must read as "full" (-1), never as tile 0.
    part_mid = torch.where(
        torch.arange(part_mid.shape[-1], device=part_mid.device) < part_count[..., None].long(), part_mid, -1
    ).to(torch.int32)
    return _TileLists(full_count, full_idx, part_count, part_idx, part_mid.contiguous())


def _kernel_layout(layout: BlockLayout, device: torch.device) -> _KernelLayout:
    """The split tile lists of ``layout`` on ``device`` (cached per layout tensors and device)."""
    return cached_per_layout(_KERNEL_LAYOUTS, layout, lambda: _build_kernel_layout(layout, device), str(device))


def _pool_lists(lay: BlockLayout) -> _PoolLists:
    """The pooled-bank rows each query block visits (see :class:`_PoolLists`)."""
    n, bk, device = lay.num_tokens, lay.block_k, lay.device
    valid, levels = lay._valid_slots(), lay._slot_levels()
    used = tuple(p for p in sorted(set(levels[valid].tolist())) if p > 1)
    candidates, keep, sizes = [], [], []
    start = 0
    for p in used:
        width, groups = bk // p, -(-n // p)
        group = lay.kv_indices.long()[..., None] * width + torch.arange(width, device=device)  # [Hl, Mq, T, w]
        keep.append(((valid & (levels == p))[..., None] & (group < groups)).flatten(2))
        candidates.append((group + start).flatten(2))
        sizes.append(pooled_keys(torch.zeros(n, 1, device=device), p)[1])
        start += groups
    # Bank rows ascend within a level: a row's concatenated position keeps that order.
    count, idx = _compact(torch.cat(keep, -1), torch.cat(candidates, -1))
    log2_sizes = torch.cat(sizes).to(torch.float32).log2().contiguous()
    return _PoolLists(used, count, idx, log2_sizes)


def _level_one_tiles(lay: BlockLayout) -> BlockLayout:
    """The layout's level-1 tiles only (what the full and masked tile loops run)."""
    keep = lay._valid_slots() & (lay._slot_levels() == 1)
    counts, indices, mask_ids = _compact(keep, lay.kv_indices, lay.kv_mask_ids)
    return BlockLayout(lay.num_tokens, lay.block_q, lay.block_k, counts, indices, mask_ids, lay.masks)


def _build_kernel_layout(layout: BlockLayout, device: torch.device) -> _KernelLayout:
    lay = layout.to(device)
    pool = None
    if lay.is_pooled:
        pool = _pool_lists(lay)
        lay = _level_one_tiles(lay)
    n = lay.num_tokens
    last_q = lay.num_q_blocks - 1 if n % lay.block_q else None
    last_k = lay.num_k_blocks - 1 if n % lay.block_k else None
    rows = _split_lists(lay.kv_counts, lay.kv_indices, lay.kv_mask_ids, own_ragged=last_q, iter_ragged=last_k)
    q_counts, q_indices, q_mask_ids = lay.transposed
    cols = _split_lists(q_counts, q_indices, q_mask_ids, own_ragged=last_k, iter_ragged=last_q)
    masks = lay.masks.to(device=device, dtype=torch.int32).contiguous()
    if masks.shape[0] == 0:  # the kernels need a valid pointer even when no tile is partial
        masks = torch.full((1, lay.block_q, lay.block_k // MASK_WORD_BITS), -1, dtype=torch.int32, device=device)
    return _KernelLayout(rows=rows, cols=cols, masks=masks, pool=pool)


# ------------------------------------------------------------------------------------ launchers
def _unit_stride_last(x: torch.Tensor) -> torch.Tensor:
    """Keep any view whose head dim is unit-stride (strides go to the kernel); copy otherwise."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: fp32 inputs follow torch's matmul TF32 switch (default: exact)."""
    if dtype == torch.float32:
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return "tf32"  # ignored by Triton for 16-bit inputs


def _head_dim_meta(d: int) -> dict[str, Any]:
    block_d = 1 << max(4, (d - 1).bit_length())
    return {"HEAD_DIM": d, "BLOCK_D": block_d, "PAD_D": block_d != d}


def _launch(autotuned: Any, raw: Any, grid: tuple[int, int], args: tuple, meta: dict, config: dict | None) -> None:
    """Launch the autotuned kernel, or the raw kernel with an explicit config (tests, debugging)."""
    if config is None:
        autotuned[grid](*args, **meta)
        return
    config = dict(config)
    num_warps = config.pop("num_warps", 4)
    num_stages = config.pop("num_stages", 1)
    raw[grid](*args, **meta, **config, num_warps=num_warps, num_stages=num_stages)


@dataclass(frozen=True)
class _PoolArgs:
    """The pooled-tile kernel arguments of one call (stand-ins of the right kinds when static)."""

    k: torch.Tensor
    v: torch.Tensor
    count: torch.Tensor
    idx: torch.Tensor
    bias: torch.Tensor
    width: int
    rows: int


def _pool_args(kl: _KernelLayout, k: torch.Tensor, v: torch.Tensor, fp32: torch.Tensor) -> _PoolArgs:
    """Pooled K/V banks (built once per call, torch ops) and lists; for a static layout, unread
    stand-ins (``fp32``: any float32 tensor of the call)."""
    pool = kl.pool
    if pool is None:
        return _PoolArgs(k, v, kl.rows.full_count, kl.rows.full_idx, fp32, 1, 0)
    return _PoolArgs(pool.bank(k), pool.bank(v), pool.count, pool.idx, pool.log2_sizes, pool.width, pool.rows)


def _pool_meta(kl: _KernelLayout, layout: BlockLayout) -> dict[str, Any]:
    # Pooled rows are gathered POOL_N at a time (tl.dot needs >= 16 per side); one partly
    # filled chunk per query block is all the padding, whatever the tiles' levels.
    return {"HAS_POOL": kl.pool is not None, "POOL_N": 64 if layout.block_k >= 64 else 32}


def _forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout,
    scale: float,
    store_lse: bool = True,
    config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the forward kernel. q, k, v: [B, H, N, D] (unit stride along D).

    Returns out [B, H, N, D] (q.dtype, contiguous) and lse fp32 [B, H, N] (uninitialised when
    ``store_lse`` is False).
    """
    from . import triton_fwd

    batch, heads, n, d = q.shape
    out = torch.empty((batch, heads, n, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads, n), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        lse.fill_(float("-inf"))
        return out, lse
    kl = _kernel_layout(layout, q.device)
    lists = kl.rows
    pool = _pool_args(kl, k, v, lse)
    grid = (layout.num_q_blocks, batch * heads)
    args = (
        q, k, v, out, lse,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        lists.full_count, lists.full_idx, lists.part_count, lists.part_idx, lists.part_mid, kl.masks,
        pool.k, pool.v, pool.count, pool.idx, pool.bias,
        lists.full_width, lists.part_width, pool.width, pool.rows, layout.num_heads, heads, n, float(scale) * _LOG2E,
    )  # fmt: skip
    meta = {
        **_head_dim_meta(d),
        "BLOCK_M": layout.block_q,
        "BLOCK_N": layout.block_k,
        "STORE_LSE": bool(store_lse),
        "PRECISION": _dot_precision(q.dtype),
        **_pool_meta(kl, layout),
    }
    _launch(triton_fwd.attn_fwd, triton_fwd.attn_fwd_kernel, grid, args, meta, config)
    return out, lse


def _backward(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dlse: torch.Tensor | None,
    layout: BlockLayout,
    scale: float,
    need_dq: bool = True,
    need_dkdv: bool = True,
    configs: dict[str, dict] | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Run delta, dK/dV and dQ kernels. All tensors [B, H, N, D] except lse/dlse fp32 [B, H, N].

    Returns (dq, dk, dv) in the dtypes of q, k, v (None where not needed).
    """
    from . import triton_bwd

    configs = configs or {}
    batch, heads, n, d = q.shape
    kl = _kernel_layout(layout, q.device)
    pooled = kl.pool is not None
    # With pooled tiles, dK and dV get the pooled rows' gradients added afterwards: keep them in
    # fp32 until then (one rounding), and the dQ kernel (which computes those) always runs.
    grad_dtype = (lambda x: torch.float32) if pooled else (lambda x: x.dtype)
    dq = torch.empty((batch, heads, n, d), dtype=q.dtype, device=q.device) if need_dq or pooled else None
    dk = torch.empty((batch, heads, n, d), dtype=grad_dtype(k), device=k.device) if need_dkdv else None
    dv = torch.empty((batch, heads, n, d), dtype=grad_dtype(v), device=v.device) if need_dkdv else None
    if q.numel() == 0:
        return (dq if need_dq else None), _as(dk, k), _as(dv, v)
    head_meta = _head_dim_meta(d)
    precision = _dot_precision(q.dtype)
    qk_scale = float(scale) * _LOG2E

    delta = torch.empty((batch, heads, n), dtype=torch.float32, device=q.device)
    has_dlse = dlse is not None
    dlse_arg = dlse.to(torch.float32).contiguous() if has_dlse else delta
    triton_bwd.bwd_preprocess_kernel[(-(-n // _DELTA_BLOCK), batch * heads)](
        out, do, dlse_arg, delta,
        out.stride(0), out.stride(1), out.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
        heads, n,
        **head_meta, BLOCK=_DELTA_BLOCK, HAS_DLSE=has_dlse,
    )  # fmt: skip

    common_meta = {**head_meta, "BLOCK_M": layout.block_q, "BLOCK_N": layout.block_k, "PRECISION": precision}
    if need_dkdv:
        cols = kl.cols
        args = (
            q, k, v, do, lse, delta, dk, dv,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            do.stride(0), do.stride(1), do.stride(2),
            dk.stride(0), dk.stride(1), dk.stride(2),
            dv.stride(0), dv.stride(1), dv.stride(2),
            cols.full_count, cols.full_idx, cols.part_count, cols.part_idx, cols.part_mid, kl.masks,
            cols.full_width, cols.part_width, layout.num_heads, heads, n, qk_scale, float(scale),
        )  # fmt: skip
        grid = (layout.num_k_blocks, batch * heads)
        _launch(triton_bwd.bwd_dkdv, triton_bwd.bwd_dkdv_kernel, grid, args, common_meta, configs.get("dkdv"))

    if need_dq or pooled:
        rows = kl.rows
        pool = _pool_args(kl, k, v, delta)
        pool_grads = [torch.zeros((batch, heads, pool.rows, d), dtype=torch.float32, device=q.device)
                      if pooled else torch.zeros(1, dtype=torch.float32, device=q.device) for _ in range(2)]
        args = (
            q, k, v, do, lse, delta, dq, pool.k, pool.v, *pool_grads, pool.count, pool.idx, pool.bias,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            do.stride(0), do.stride(1), do.stride(2),
            dq.stride(0), dq.stride(1), dq.stride(2),
            rows.full_count, rows.full_idx, rows.part_count, rows.part_idx, rows.part_mid, kl.masks,
            rows.full_width, rows.part_width, pool.width, pool.rows, layout.num_heads, heads, n, qk_scale,
            float(scale),
        )  # fmt: skip
        grid = (layout.num_q_blocks, batch * heads)
        meta = {**common_meta, **_pool_meta(kl, layout)}
        _launch(triton_bwd.bwd_dq, triton_bwd.bwd_dq_kernel, grid, args, meta, configs.get("dq"))
        if pooled and need_dkdv:
            kl.pool.spread(dk, pool_grads[0])
            kl.pool.spread(dv, pool_grads[1])
    return (dq if need_dq else None), _as(dk, k), _as(dv, v)


def _as(grad: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    """``grad`` in ``like``'s dtype (pooled layouts accumulate dK, dV in fp32)."""
    return None if grad is None else grad.to(like.dtype)


# ------------------------------------------------------------------------------------ autograd
class _TritonBlockSparseAttention(torch.autograd.Function):
    """out, lse = attention(q, k, v) restricted to ``layout`` with fixed launch configs (tests);
    the dispatcher's path is the custom op (:mod:`.op`)."""

    @staticmethod
    def forward(ctx, q, k, v, layout, scale, configs):  # type: ignore[override]
        configs = configs or {}
        q, k, v = (_unit_stride_last(x) for x in (q, k, v))
        out, lse = _forward(q, k, v, layout, scale, store_lse=True, config=configs.get("fwd"))
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.layout = layout
        ctx.scale = scale
        ctx.configs = configs
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):  # type: ignore[override]
        q, k, v, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dout = _unit_stride_last(dout)
        dq, dk, dv = _backward(
            dout, q, k, v, out, lse, dlse, ctx.layout, ctx.scale,
            need_dq=ctx.needs_input_grad[0],
            need_dkdv=ctx.needs_input_grad[1] or ctx.needs_input_grad[2],
            configs=ctx.configs,
        )  # fmt: skip
        if not ctx.needs_input_grad[1]:
            dk = None
        if not ctx.needs_input_grad[2]:
            dv = None
        return dq, dk, dv, None, None, None


def _check_scale(scale: Any) -> float:
    if not (is_finite_number(scale) and scale > 0):
        raise UserError(f"scale must be a finite float > 0, got {scale!r}")
    return float(scale)


def kernel_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout, scale: float, want_lse: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The custom op's forward on this backend (kernel order, validated inputs): ``out, lse``."""
    q, k, v = (_unit_stride_last(x) for x in (q, k, v))
    out, lse = _forward(q, k, v, layout, scale, store_lse=want_lse)
    return out, (lse if want_lse else None)


def kernel_backward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    grad_out: torch.Tensor, grad_lse: torch.Tensor | None, layout: BlockLayout, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """The custom op's backward on this backend: ``dq, dk, dv`` (``lse`` from the forward)."""
    q, k, v, grad_out = (_unit_stride_last(x) for x in (q, k, v, grad_out))
    return _backward(grad_out, q, k, v, out, lse, grad_lse, layout, scale)  # type: ignore[return-value]


def _attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout,
    scale: float,
    return_lse: bool,
    configs: dict[str, dict] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """:func:`triton_block_sparse_attention` with optional fixed launch configs per kernel
    (``{"fwd" | "dkdv" | "dq": {"SPLIT": 2, "num_warps": 4, "num_stages": 1}}``) instead of the
    autotuner, so tests can exercise every code path under the interpreter. Without configs it
    runs through the ``diffattn::block_sparse_attention`` custom op, like the dispatcher."""
    problems = triton_support_problems(q, k, v, layout)
    if problems:
        raise UserError("inputs cannot run on the Triton backend: " + "; ".join(problems))
    scale = _check_scale(scale)
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    if configs is None:
        out, lse = attention_op(q, k, v, layout, scale, return_lse, "triton")
    elif needs_grad:
        out, lse = _TritonBlockSparseAttention.apply(q, k, v, layout, scale, configs)
    else:
        q, k, v = (_unit_stride_last(x) for x in (q, k, v))
        out, lse = _forward(q, k, v, layout, scale, store_lse=return_lse, config=configs.get("fwd"))
    return (out, lse) if return_lse else out


def triton_block_sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout, scale: float, return_lse: bool
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse softmax attention on the Triton kernels.

    Args:
        q, k, v: ``[B, H, N, D]`` in the kernel's token order (the layout's permutation already
            applied), fp16/bf16/fp32, any strides (a copy is made only if the head dim is not
            unit-stride).
        layout: the tiles to compute; ``layout.num_heads`` is 1 (shared) or ``H``.
        scale: softmax scale (usually ``D ** -0.5``).
        return_lse: also return the log-sum-exp.

    Returns:
        ``out`` ``[B, H, N, D]`` in ``q.dtype``, and with ``return_lse`` the natural-log LSE, fp32
        ``[B, H, N]`` (``-inf`` for rows without an allowed key, whose output is 0). Both are
        differentiable through the Triton backward kernels.

    Raises:
        UserError: if :func:`triton_support_problems` reports a problem, or ``scale`` is not a
            positive finite number.
    """
    return _attention(q, k, v, layout, scale, return_lse)


__all__ = [
    "kernel_backward", "kernel_forward", "triton_block_sparse_attention", "triton_support_problems",
]
