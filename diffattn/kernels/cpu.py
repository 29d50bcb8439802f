"""Fast exact block-sparse attention on the CPU with plain PyTorch ops.

A flash-attention style loop over tiles is slow in eager PyTorch (one tiny op per tile), so this
path batches instead. For every query block the plan lists the *key tokens* it needs: the key
columns of its visited tiles in which at least one of its queries has an allowed pair (for a
partial tile, the OR of the tile's rows; for a full tile, every in-range key). Keys past ``N``
(the ragged last block) and key columns that no query of the block may attend are dropped, so
the work is usually *below* the layout's tile density. Query blocks are then bucketed by the
length ``L`` of that list, and a bucket of ``G`` query blocks becomes

* one gather of those K and V rows into ``[G, L, D]`` buffers (no gather at all when every
  block needs the same contiguous key range, as for Dense),
* one batched matmul for the scores ``[G, block_q, L]``,
* one add of a cached additive float32 bias (0 / -1e30) when the bucket has partial tiles,
* one softmax and one batched matmul with V,

chunked so the score buffer stays around a few MiB (cache friendly, and the buffers are reused
instead of being re-faulted in). Chunks run on single-threaded worker threads, one per intra-op
thread, instead of running each small op on all cores (see :class:`_Pool`). The math is exactly
masked softmax attention: excluded scores become ``-1e30``, whose ``exp`` is exactly 0 in
float32. Everything is computed in float32 whatever the input dtype (float64 inputs in float64).

Pooled tiles (``layout.kv_levels``, PSA) fit the same scheme: the key rows a gather indexes are
a bank (:class:`_KeyBank`) of the raw keys, a zero row, then the group means of each pooling
level used (built once per call), and a level-``p`` tile lists one row per group, so it costs
``1 / p`` of a level-1 tile. Buckets with pooled keys add the groups' ``log(size)`` to the scores
(folded into the cached bias of partial buckets). The backward spreads each pooled row's dK, dV
back to its group's keys (``1 / c`` each).

The backward pass recomputes the probabilities chunk by chunk (nothing ``O(N^2)`` is saved) and
accumulates dK, dV with ``index_add_`` over the gathered key rows. The plan (buckets, key lists,
biases) is built once per layout object and cached for the layout's lifetime.
"""

from __future__ import annotations

import itertools
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from .._threads import one_cpu_thread
from ..patterns.layout import BlockLayout
from ._cache import cached_per_layout
from .op import attention_op
from .reference import add_pooled_grad, pooled_keys

# Finite stand-in for -inf: exp(-1e30 - max) == 0 exactly in float32, and a row whose every score
# is masked gives a finite (uniform) softmax instead of NaN, which is then zeroed explicitly.
_MASKED = -1.0e30
# q elements (B * H * N * D) up to which a call's plan build and copies run on one intra-op thread:
# the embedded model's calls (2 x 4 x 2,112 x 32 = 540k) are below, N = 16,384 x 4 x 64 is above.
_SMALL_CALL_ELEMENTS = 1 << 21
# Score elements per chunk (float32): a few MiB keeps the score / probability buffers in the
# last-level cache and below glibc's mmap threshold, so buffers are reused, not faulted in again.
_CHUNK_SCORES = 1 << 19
# Cached additive biases of partial-tile buckets are float32 (4 bytes per computed pair: a
# bfloat16 bias would be converted to float32 by every add). Above this total the bias is rebuilt
# from the packed bits for every chunk instead.
_BIAS_CACHE_BYTES = 256 << 20
# Key lists of buckets with partial tiles are padded up to a multiple of this (bounds the number
# of buckets; padded keys point at a zero row and are masked by the bias).
_KEY_ROUND = 32
# Elements of temporary int32 tensors while building masks (bounds plan-building memory).
_BUILD_CHUNK = 1 << 24


@dataclass
class _Group:
    """Query blocks of one head-layout that need the same number ``L`` of key tokens."""

    q_blocks: torch.Tensor  # int64 [G]
    keys: torch.Tensor  # int64 [G, L]: key token indices (kernel order), N = padding (zero row)
    tile_mask_ids: torch.Tensor | None  # int64 [G, T]: mask id of each visited tile (-1 full); partial buckets only
    key_columns: torch.Tensor | None  # int64 [G, L]: slot * block_k + column of each key (-1 padding); partial only
    shared: bool  # every block needs the same keys: fold the blocks into one matmul
    key_slice: slice | None  # shared keys that are a contiguous range: no gather at all
    empty_rows: torch.Tensor | None  # bool [G, block_q]: in-range rows with no allowed key
    bias: torch.Tensor | None = None  # float32 [G, block_q, L] when cached (key_bias folded in)
    key_bias: torch.Tensor | None = None  # float32 [G, 1, L]: log(group size) of pooled keys, else 0

    @property
    def has_partial(self) -> bool:
        return self.tile_mask_ids is not None

    @property
    def num_blocks(self) -> int:
        return int(self.q_blocks.numel())

    @property
    def num_keys(self) -> int:
        return int(self.keys.shape[1])


@dataclass
class _Plan:
    heads: list[list[_Group]]  # one list of buckets per head-layout
    unvisited: list[torch.Tensor]  # per head-layout: int64 query blocks that attend nothing
    computed_pairs: int  # (query, key) scores computed per head-layout (mean), padding included
    bank: "_KeyBank"  # where each level's keys sit in the key rows


_PLANS: dict[tuple, _Plan] = {}


@dataclass(frozen=True)
class _KeyBank:
    """Key rows the gathers index: raw keys ``[0, N)``, a zero row at ``N`` (what padded key
    slots point at), then for each pooling level ``p`` used, the ``ceil(N / p)`` group means.

    Pooled tiles (``layout.kv_levels``) list pooled rows: a level-``p`` tile costs ``block_k / p``
    keys, and its logits get ``log(group size)`` (:attr:`log_sizes`).
    """

    num_tokens: int
    levels: tuple[int, ...]  # pooling levels > 1 present, ascending

    def offset(self, level: int) -> int:
        """First row of ``level``'s means (0 for the raw keys)."""
        if level == 1:
            return 0
        start = self.num_tokens + 1
        for p in self.levels:
            if p == level:
                return start
            start += -(-self.num_tokens // p)
        raise KeyError(level)

    @property
    def rows(self) -> int:
        return self.num_tokens + 1 + sum(-(-self.num_tokens // p) for p in self.levels)

    def log_sizes(self) -> torch.Tensor:
        """float32 ``[rows]``: ``log(c)`` for a mean of ``c`` keys, 0 for raw keys and the zero row."""
        out = torch.zeros(self.rows, dtype=torch.float32)
        for p in self.levels:
            _, sizes = pooled_keys(torch.zeros(self.num_tokens, 1), p)
            out[self.offset(p) : self.offset(p) + sizes.numel()] = sizes.float().log()
        return out

    def fill(self, x: torch.Tensor) -> None:
        """Write the group means of ``x[:, :N]`` into ``x``'s pooled rows (``x``: ``[R, rows, D]``)."""
        n = self.num_tokens
        for p in self.levels:
            means, _ = pooled_keys(x[:, :n], p)
            x[:, self.offset(p) : self.offset(p) + means.shape[1]] = means

    def spread(self, grad: torch.Tensor) -> None:
        """Add each pooled row's gradient, divided by its group size, to the raw rows of its group
        (``grad``: ``[R, rows, D]``; the mean's Jacobian is ``1 / c`` for each of its ``c`` keys)."""
        n = self.num_tokens
        for p in self.levels:
            add_pooled_grad(grad[:, :n], grad[:, self.offset(p) : self.offset(p) + -(-n // p)], p)


def _plan(layout: BlockLayout) -> _Plan:
    """Bucket the layout's query blocks and prepare masks (cached per layout tensors)."""
    return cached_per_layout(_PLANS, layout, lambda: _build_plan(layout))


def computed_pairs(layout: BlockLayout) -> int:
    """(query, key) scores the CPU path computes per head (<= ``layout.visited_pairs`` + padding).

    Example:
        >>> from diffattn import Neighborhood, VideoGrid
        >>> layout = Neighborhood(kernel_size=(1, 3, 3)).layout(VideoGrid(2, 8, 8), block_size=32)
        >>> computed_pairs(layout) <= 128 * 128
        True
    """
    return _plan(layout).computed_pairs


# bits of every byte value, bit i of byte j of a little-endian word = key 8j + i of the word.
_BYTE_BITS = ((torch.arange(256)[:, None] >> torch.arange(8)) & 1).bool()


def _unpack_bits(words: torch.Tensor) -> torch.Tensor:
    """int32 ``[..., W]`` -> bool ``[..., W * 32]`` (bit b of word w = position 32w + b)."""
    return _BYTE_BITS[words.contiguous().view(torch.uint8).long()].flatten(-2)


def _build_plan(layout: BlockLayout) -> _Plan:
    layout = layout.to("cpu")
    n, bq, bk = layout.num_tokens, layout.block_q, layout.block_k
    max_kv = layout.max_kv_blocks
    all_levels = layout._slot_levels()
    bank = _KeyBank(n, tuple(p for p in sorted(set(all_levels[layout._valid_slots()].tolist())) if p > 1))
    log_sizes = bank.log_sizes() if bank.levels else None
    per_head = []
    for h in range(layout.num_heads):
        counts = layout.kv_counts[h].long()
        slot_ok = torch.arange(max_kv)[None, :] < counts[:, None]  # [Mq, T]
        mask_ids = torch.where(slot_ok, layout.kv_mask_ids[h].long(), -1)
        partial = mask_ids >= 0
        levels = all_levels[h]
        # Key columns of each visited tile that some query of the block may attend: all in-range
        # columns of a full tile, the OR of the rows of a partial tile (bits past N are 0); a
        # pooled tile of level p has one key per group: its groups' first columns.
        col_any = slot_ok[:, :, None] & (layout.kv_indices[h].long()[:, :, None] * bk + torch.arange(bk) < n)
        col_any &= torch.arange(bk) % levels[:, :, None] == 0
        part_ids = mask_ids[partial]
        if part_ids.numel():
            rows_or = torch.empty(part_ids.numel(), bk, dtype=torch.bool)
            step = max(1, _BUILD_CHUNK // (bq * bk))
            for s in range(0, part_ids.numel(), step):
                rows_or[s : s + step] = _unpack_bits(layout.masks[part_ids[s : s + step]]).any(1)
            col_any[partial] = rows_or
        lengths = col_any.flatten(1).sum(1)
        has_partial = partial.any(1)
        padded = torch.where(has_partial, (lengths + _KEY_ROUND - 1) // _KEY_ROUND * _KEY_ROUND, lengths)
        per_head.append((counts, mask_ids, col_any, has_partial, padded, levels))
    bias_bytes = sum(int(padded[has_partial].sum()) * bq * 4 for _, _, _, has_partial, padded, _ in per_head)
    cache_bias = bias_bytes <= _BIAS_CACHE_BYTES

    heads: list[list[_Group]] = []
    unvisited: list[torch.Tensor] = []
    pairs = 0
    for h, (counts, mask_ids, col_any, has_partial, padded, levels) in enumerate(per_head):
        groups: list[_Group] = []
        for part_flag, length in torch.unique(torch.stack([has_partial.long(), padded], 1), dim=0).tolist():
            if length == 0:
                continue
            q_blocks = ((has_partial.long() == part_flag) & (padded == length)).nonzero(as_tuple=True)[0]
            t = int(counts[q_blocks].max())  # visited slots of this bucket's widest block
            groups.append(
                _make_group(layout, h, q_blocks, col_any[q_blocks, :t].flatten(1), mask_ids[q_blocks, :t],
                            int(length), bool(part_flag), cache_bias, levels[q_blocks, :t], bank, log_sizes)
            )
            pairs += q_blocks.numel() * bq * int(length)
        heads.append(groups)
        unvisited.append((padded == 0).nonzero(as_tuple=True)[0])
    return _Plan(heads, unvisited, pairs // layout.num_heads, bank)


def _make_group(
    layout: BlockLayout,
    head: int,
    q_blocks: torch.Tensor,
    needed: torch.Tensor,
    mask_ids: torch.Tensor,
    length: int,
    has_partial: bool,
    cache_bias: bool,
    levels: torch.Tensor,
    bank: _KeyBank,
    log_sizes: torch.Tensor | None,
) -> _Group:
    """A bucket from its blocks' needed columns ``[G, T * block_k]`` (T = visited slots) and the
    slots' pooling levels ``[G, T]`` (a level-p slot's needed columns are its groups' first)."""
    n, bq, bk = layout.num_tokens, layout.block_q, layout.block_k
    g = q_blocks.numel()
    # Row-major nonzero lists each block's needed columns in ascending (slot, column) = key order.
    row, column = needed.nonzero(as_tuple=True)
    per_row = needed.sum(1)
    position = torch.arange(row.numel()) - (torch.cumsum(per_row, 0) - per_row)[row]
    kv_blocks = layout.kv_indices[head, q_blocks, : needed.shape[1] // bk].long()
    keys = torch.full((g, length), n, dtype=torch.int64)
    token = kv_blocks[row, column // bk] * bk + column % bk
    level = levels[row, column // bk].long()
    if bank.levels:  # a pooled key's row: its level's offset + its group's index
        offsets = torch.tensor([bank.offset(p) if p in bank.levels or p == 1 else 0 for p in range(9)])
        token = torch.where(level > 1, offsets[level] + token // level, token)
    keys[row, position] = token
    key_bias = None
    if log_sizes is not None and bool((level > 1).any()):
        key_bias = log_sizes[keys][:, None, :].contiguous()
    shared = bool((keys == keys[:1]).all())
    key_slice = None
    if shared and not has_partial:
        first = int(keys[0, 0])
        if torch.equal(keys[0], torch.arange(first, first + length)):
            key_slice = slice(first, first + length)
    group = _Group(q_blocks, keys, None, None, shared, key_slice, None, key_bias=key_bias)
    if not has_partial:
        return group
    group.tile_mask_ids = mask_ids.contiguous()
    group.key_columns = torch.full((g, length), -1, dtype=torch.int64)
    group.key_columns[row, position] = column
    # One pass over the masks: the cached bias (if it fits the budget) and the empty rows.
    bias = torch.empty(g, bq, length, dtype=torch.float32) if cache_bias else None
    has_key = torch.empty(g, bq, dtype=torch.bool)
    step = max(1, _BUILD_CHUNK // max(1, bq * needed.shape[1]))
    for s in range(0, g, step):
        allowed = _allowed(layout, group.tile_mask_ids[s : s + step], group.key_columns[s : s + step])
        has_key[s : s + step] = allowed.any(-1)
        if bias is not None:
            bias[s : s + step] = torch.where(allowed, 0.0, _MASKED)
            if key_bias is not None:
                bias[s : s + step] += key_bias[s : s + step]
    empty = ~has_key & (q_blocks[:, None] * bq + torch.arange(bq) < n)
    group.empty_rows = empty if bool(empty.any()) else None
    group.bias = bias
    return group


def _allowed(layout: BlockLayout, tile_mask_ids: torch.Tensor, key_columns: torch.Tensor) -> torch.Tensor:
    """bool ``[G, block_q, L]``: which (query row, key) pairs of a partial bucket are allowed."""
    g, slots = tile_mask_ids.shape
    bq, bk = layout.block_q, layout.block_k
    tiles = _unpack_bits(layout.masks[tile_mask_ids.clamp(min=0)])  # [G, T, bq, bk]
    tiles |= (tile_mask_ids == -1)[:, :, None, None]  # full tiles
    rows = tiles.permute(0, 2, 1, 3).reshape(g, bq, slots * bk)
    index = key_columns.clamp(min=0)[:, None, :].expand(g, bq, key_columns.shape[1])
    return rows.gather(2, index) & (key_columns >= 0)[:, None, :]


def _partial_bias(layout: BlockLayout, tile_mask_ids: torch.Tensor, key_columns: torch.Tensor) -> torch.Tensor:
    """float32 ``[G, block_q, L]``: 0 where allowed, -1e30 where masked."""
    return torch.where(_allowed(layout, tile_mask_ids, key_columns), 0.0, _MASKED)


def _chunk_bias(layout: BlockLayout, group: _Group, blocks: slice) -> torch.Tensor | None:
    """What a chunk adds to its scores: ``[G, block_q, L]`` (partial tiles: the mask, plus the
    pooled keys' log sizes), ``[G, 1, L]`` (pooled keys only) or None."""
    if not group.has_partial:
        return None if group.key_bias is None else group.key_bias[blocks]
    if group.bias is not None:
        return group.bias[blocks]
    bias = _partial_bias(layout, group.tile_mask_ids[blocks], group.key_columns[blocks])
    return bias if group.key_bias is None else bias.add_(group.key_bias[blocks])


def _chunks(rows: int, group: _Group, block_q: int) -> Iterator[tuple[slice, slice]]:
    """(row slice, query-block slice) pairs whose score tile fits in ``_CHUNK_SCORES``."""
    per_block = block_q * group.num_keys
    if rows * per_block <= _CHUNK_SCORES:
        row_step, block_step = rows, max(1, _CHUNK_SCORES // (rows * per_block))
    else:  # very long key lists or many heads: split the batch-head rows too
        row_step, block_step = max(1, _CHUNK_SCORES // per_block), 1
    for g0 in range(0, group.num_blocks, block_step):
        for r0 in range(0, rows, row_step):
            yield slice(r0, min(r0 + row_step, rows)), slice(g0, min(g0 + block_step, group.num_blocks))


class _Workspace:
    """Reusable buffers, so each chunk writes into memory that is already mapped."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        numel = math.prod(shape)
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(numel, dtype=self.dtype)
            self._buffers[name] = buf
        return buf[:numel].view(shape)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # float64 is computed as such (exact gradient checks in tests); everything else in float32.
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class _Rows:
    """Head-major float32 work buffers ``[H * B, length, D]`` and their per head-layout views.

    Head-major rows make the rows of one head contiguous, so per-head layouts gather from
    contiguous memory; a shared layout simply treats all ``H * B`` rows alike.
    """

    def __init__(self, batch: int, heads: int, shared: bool, dtype: torch.dtype) -> None:
        self.batch, self.heads, self.shared, self.dtype = batch, heads, shared, dtype

    @property
    def rows(self) -> int:
        return self.batch * self.heads if self.shared else self.batch

    def load(self, x: torch.Tensor, length: int, scale: float = 1.0, zero_tail: bool = True) -> torch.Tensor:
        """``[B, H, N, D]`` -> ``[H * B, length, D]`` compute dtype (rows past N zeroed if asked)."""
        b, h, n, d = x.shape
        out = torch.empty(h * b, length, d, dtype=self.dtype)
        dst = out.view(h, b, length, d)[:, :, :n]
        dst.copy_(x.transpose(0, 1))
        if scale != 1.0:
            dst.mul_(scale)
        if zero_tail:
            out[:, n:].zero_()
        return out

    def store(self, x: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
        """``[H * B, length, ...]`` -> ``[B, H, n, ...]`` in ``dtype``, contiguous."""
        tail = x.shape[2:]
        view = x.view(self.heads, self.batch, x.shape[1], *tail)[:, :, :n].transpose(0, 1)
        # .to() returns the view itself when the dtype already matches, whatever memory_format
        # says; the custom op promises contiguous outputs.
        return view.to(dtype=dtype).contiguous()

    def __call__(self, x: torch.Tensor, h: int, block: int | None = None) -> torch.Tensor:
        """Rows of head-layout ``h``: ``[R, length, ...]`` or ``[R, length / block, block, ...]``."""
        rows = x if self.shared else x.view(self.heads, self.batch, *x.shape[1:])[h]
        if block is None:
            return rows
        return rows.view(rows.shape[0], -1, block, *rows.shape[2:])


def _gather_keys(kv: torch.Tensor, group: _Group, rs: slice, gs: slice) -> torch.Tensor:
    """K (or V) rows a chunk needs: ``[R, L, D]`` for shared keys, else ``[R, G, L, D]``."""
    if group.key_slice is not None:
        return kv[rs, group.key_slice]
    if group.shared:
        return kv[rs].index_select(1, group.keys[0])
    keys = group.keys[gs]
    return kv[rs].index_select(1, keys.reshape(-1)).view(rs.stop - rs.start, keys.shape[0], keys.shape[1], -1)


def _scatter_keys(dst: torch.Tensor, src: torch.Tensor, group: _Group, rs: slice, gs: slice) -> None:
    """Accumulate per-key gradients ``src`` (shape as :func:`_gather_keys`) into ``dst`` rows."""
    if group.key_slice is not None:
        dst[rs, group.key_slice] += src
    elif group.shared:
        dst[rs].index_add_(1, group.keys[0], src)
    else:
        dst[rs].index_add_(1, group.keys[gs].reshape(-1), src.reshape(src.shape[0], -1, src.shape[-1]))


def _fold(x: torch.Tensor, shared: bool) -> torch.Tensor:
    """``[R, G, rows, X]`` -> ``[R, G * rows, X]`` for shared-key buckets (one bigger matmul)."""
    return x.view(x.shape[0], -1, x.shape[-1]) if shared else x


def _probabilities(
    q_c: torch.Tensor, k_c: torch.Tensor, group: _Group, bias: torch.Tensor | None,
    scores: torch.Tensor, probs: torch.Tensor, want_max: bool,
) -> torch.Tensor | None:
    """softmax(q_c @ k_c^T + bias) into ``probs`` ``[R, G, bq, L]``; the score row max if asked."""
    torch.matmul(_fold(q_c, group.shared), k_c.transpose(-1, -2), out=_fold(scores, group.shared))
    if bias is not None:
        scores.add_(bias)
    row_max = scores.amax(-1) if want_max else None
    torch.ops.aten._softmax.out(scores, -1, False, out=probs)
    return row_max


# ----------------------------------------------------------------------------------- execution
@dataclass(frozen=True)
class _Task:
    """One chunk: rows ``rows`` of head-layout ``head``, query blocks ``blocks`` of ``group``."""

    head: int
    group: _Group
    rows: slice
    blocks: slice


def _tasks(plan: _Plan, rows_per_head: int, block_q: int) -> list[_Task]:
    return [
        _Task(h, group, rs, gs)
        for h, groups in enumerate(plan.heads)
        for group in groups
        for rs, gs in _chunks(rows_per_head, group, block_q)
    ]


class _Pool:
    """Single-threaded PyTorch workers that each run whole chunks.

    Running every small op of a chunk with OpenMP on all cores costs one fork/join barrier per op;
    whole chunks per core have no barriers, keep a chunk in one core's cache, and degrade
    gracefully when other processes compete for the cores (a barrier waits for the slowest,
    possibly descheduled, thread). Ops release the GIL, so the workers run in parallel.
    """

    def __init__(self) -> None:
        self._executor: ThreadPoolExecutor | None = None
        self._size = 0
        self._pid = -1
        self._lock = threading.Lock()

    @staticmethod
    def _init_worker(barrier: threading.Barrier) -> None:
        torch.get_num_threads()  # PyTorch's per-thread lazy thread-count init must run first...
        torch.set_num_threads(1)  # ...so this sticks: intra-op parallelism off in this worker
        barrier.wait()

    def executor(self, size: int) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None or self._size != size or self._pid != os.getpid():
                if self._executor is not None and self._pid == os.getpid():
                    self._executor.shutdown(wait=True)
                previous = torch.get_num_threads()
                barrier = threading.Barrier(size)
                executor = ThreadPoolExecutor(size, thread_name_prefix="diffattn-cpu")
                # Start every worker now (each blocks on the barrier until all exist), then undo
                # the process-wide side effect of their set_num_threads(1) on PyTorch's default.
                for future in [executor.submit(self._init_worker, barrier) for _ in range(size)]:
                    future.result()
                torch.set_num_threads(previous)
                self._executor, self._size, self._pid = executor, size, os.getpid()
            return self._executor


_POOL = _Pool()


def _run(tasks: list[_Task], fn: Callable[[_Task, _Workspace], None], dtype: torch.dtype, threads: int) -> None:
    """Run ``fn(task, workspace)`` for every task, spread over ``threads`` workers."""
    workers = min(threads, len(tasks))
    if workers <= 1:
        ws = _Workspace(dtype)
        for task in tasks:
            fn(task, ws)
        return
    executor = _POOL.executor(threads)
    counter = itertools.count()  # next() is atomic under the GIL: dynamic load balancing

    def loop() -> None:
        ws = _Workspace(dtype)
        while (i := next(counter)) < len(tasks):
            fn(tasks[i], ws)

    futures = [executor.submit(loop) for _ in range(workers)]
    for future in futures:
        future.result()


def _load_keys(rows: _Rows, bank: _KeyBank, x: torch.Tensor) -> torch.Tensor:
    """K or V as gather rows ``[H * B, bank.rows, D]``: raw keys, the zero row, the pooled means."""
    out = rows.load(x, bank.rows)
    bank.fill(out)
    return out


def _forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout, scale: float, need_lse: bool,
    threads: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``out [B, H, N, D]`` (dtype of q) and float32 ``lse [B, H, N]`` (or None); chunks run on
    ``threads`` workers."""
    batch, heads, n, dim = q.shape
    bq = layout.block_q
    plan = _plan(layout)
    rows = _Rows(batch, heads, layout.num_heads == 1, _compute_dtype(q))
    q_len = layout.num_q_blocks * bq
    qp = rows.load(q, q_len, scale)
    kp, vp = _load_keys(rows, plan.bank, k), _load_keys(rows, plan.bank, v)
    out = torch.empty_like(qp)
    lse = torch.full(qp.shape[:2], float("-inf"), dtype=qp.dtype) if need_lse else None
    views = []
    for h in range(len(plan.heads)):
        ov = rows(out, h, bq)
        ov.index_fill_(1, plan.unvisited[h], 0.0)
        views.append((rows(qp, h, bq), rows(kp, h), rows(vp, h), ov, rows(lse, h, bq) if need_lse else None))

    def task_fn(task: _Task, ws: _Workspace) -> None:
        qv, kv, vv, ov, lv = views[task.head]
        group, rs, gs = task.group, task.rows, task.blocks
        qb = group.q_blocks[gs]
        nr, nb, length = rs.stop - rs.start, qb.numel(), group.num_keys
        q_c = qv[rs].index_select(1, qb)  # [R, G, bq, D]
        k_c, v_c = _gather_keys(kv, group, rs, gs), _gather_keys(vv, group, rs, gs)
        scores = ws.get("s", (nr, nb, bq, length))
        probs = ws.get("p", (nr, nb, bq, length))
        row_max = _probabilities(q_c, k_c, group, _chunk_bias(layout, group, gs), scores, probs, need_lse)
        o_c = ws.get("o", (nr, nb, bq, dim))
        torch.matmul(_fold(probs, group.shared), v_c, out=_fold(o_c, group.shared))
        empty = group.empty_rows[gs] if group.empty_rows is not None else None
        if empty is not None:
            o_c.masked_fill_(empty[:, :, None], 0.0)
        ov[rs].index_copy_(1, qb, o_c)
        if lv is not None:
            # lse = max + log(sum exp(s - max)), and the largest probability is exp(0) / sum:
            # lse = max - log(max prob), with no extra exp pass.
            l_c = row_max.sub_(probs.amax(-1).log_())
            if empty is not None:
                l_c.masked_fill_(empty, float("-inf"))
            lv[rs].index_copy_(1, qb, l_c)

    _run(_tasks(plan, rows.rows, bq), task_fn, qp.dtype, threads)
    lse_dtype = torch.float64 if qp.dtype == torch.float64 else torch.float32
    out_bhnd = rows.store(out, n, q.dtype)
    return out_bhnd, (rows.store(lse[..., None], n, lse_dtype)[..., 0] if lse is not None else None)


def _backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    grad_out: torch.Tensor,
    grad_lse: torch.Tensor | None,
    layout: BlockLayout,
    scale: float,
    threads: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``dq, dk, dv`` ``[B, H, N, D]`` in the inputs' dtypes, recomputing the probabilities;
    chunks run on ``threads`` workers."""
    batch, heads, n, dim = q.shape
    bq = layout.block_q
    plan = _plan(layout)
    rows = _Rows(batch, heads, layout.num_heads == 1, _compute_dtype(q))
    q_len = layout.num_q_blocks * bq
    qp = rows.load(q, q_len, scale)
    kp, vp = _load_keys(rows, plan.bank, k), _load_keys(rows, plan.bank, v)
    dop = rows.load(grad_out, q_len)
    # delta_i = sum_j P_ij dP_ij = dO_i . O_i. A gradient on lse_i adds P_ij * dlse_i to dS_ij,
    # which folds into the same per-row term: dS = P * (dP - (delta - dlse)).
    delta = (dop * rows.load(out, q_len)).sum(-1)
    if grad_lse is not None:
        delta -= rows.load(grad_lse[..., None], q_len)[..., 0]
    dq = torch.zeros_like(qp)
    views = [(rows(qp, h, bq), rows(kp, h), rows(vp, h), rows(dop, h, bq), rows(dq, h, bq), rows(delta, h, bq))
             for h in range(len(plan.heads))]
    # dK and dV are scattered from many chunks: one accumulator pair per worker thread, summed at
    # the end, so workers never add into the same rows concurrently.
    accumulators: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def task_fn(task: _Task, ws: _Workspace) -> None:
        qv, kv, vv, dov, dqv, deltav = views[task.head]
        acc = accumulators.get(threading.get_ident())
        if acc is None:
            acc = accumulators[threading.get_ident()] = (torch.zeros_like(kp), torch.zeros_like(vp))
        dkv, dvv = rows(acc[0], task.head), rows(acc[1], task.head)
        group, rs, gs = task.group, task.rows, task.blocks
        qb = group.q_blocks[gs]
        nr, nb, length = rs.stop - rs.start, qb.numel(), group.num_keys
        shared = group.shared
        q_c = qv[rs].index_select(1, qb)
        k_c, v_c = _gather_keys(kv, group, rs, gs), _gather_keys(vv, group, rs, gs)
        do_c = dov[rs].index_select(1, qb)
        delta_c = deltav[rs].index_select(1, qb)
        empty = group.empty_rows[gs] if group.empty_rows is not None else None
        if empty is not None:
            # Empty rows output a constant 0: nothing flows back through them.
            do_c.masked_fill_(empty[:, :, None], 0.0)
            delta_c.masked_fill_(empty, 0.0)
        scores = ws.get("s", (nr, nb, bq, length))
        probs = ws.get("p", (nr, nb, bq, length))
        _probabilities(q_c, k_c, group, _chunk_bias(layout, group, gs), scores, probs, False)
        # dV += P^T dO
        _scatter_keys(dvv, torch.matmul(_fold(probs, shared).transpose(-1, -2), _fold(do_c, shared)), group, rs, gs)
        # dS = P * (dO V^T - delta), in the score buffer
        ds = scores
        torch.matmul(_fold(do_c, shared), v_c.transpose(-1, -2), out=_fold(ds, shared))
        ds.sub_(delta_c[..., None]).mul_(probs)
        dq_c = ws.get("o", (nr, nb, bq, dim))
        torch.matmul(_fold(ds, shared), k_c, out=_fold(dq_c, shared))
        dqv[rs].index_copy_(1, qb, dq_c)
        # dK += dS^T (scale q); q_c is already scaled
        _scatter_keys(dkv, torch.matmul(_fold(ds, shared).transpose(-1, -2), _fold(q_c, shared)), group, rs, gs)

    _run(_tasks(plan, rows.rows, bq), task_fn, qp.dtype, threads)
    parts = list(accumulators.values())
    if parts:
        dk, dv = parts[0]
        for extra_k, extra_v in parts[1:]:
            dk += extra_k
            dv += extra_v
    else:  # nothing visited at all
        dk, dv = torch.zeros_like(kp), torch.zeros_like(vp)
    plan.bank.spread(dk)
    plan.bank.spread(dv)
    dq.mul_(scale)
    return rows.store(dq, n, q.dtype), rows.store(dk, n, k.dtype), rows.store(dv, n, v.dtype)


def _small_call(q: torch.Tensor) -> bool:
    """Whether the call's plan build (a dynamic pattern such as PSA builds one per call) and its
    whole-tensor operations (loads, pooled key means, stores) run on one intra-op thread: below
    :data:`_SMALL_CALL_ELEMENTS` their OpenMP regions cost more than they save (at N = 16,384,
    4 heads, a PSA plan build took 56 ms on one thread and 38 ms on two on an idle machine). The
    chunks still run on every worker of :class:`_Pool`."""
    return q.numel() <= _SMALL_CALL_ELEMENTS


def kernel_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout, scale: float, want_lse: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The custom op's forward on this backend (kernel order, validated inputs): ``out, lse``."""
    threads = torch.get_num_threads()
    with one_cpu_thread(when=_small_call(q)):
        return _forward(q, k, v, layout, scale, want_lse, threads)


def kernel_backward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    grad_out: torch.Tensor, grad_lse: torch.Tensor | None, layout: BlockLayout, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """The custom op's backward on this backend: ``dq, dk, dv`` (recomputes, ``lse`` unused)."""
    threads = torch.get_num_threads()
    with one_cpu_thread(when=_small_call(q)):
        return _backward(q, k, v, out, grad_out, grad_lse, layout, scale, threads)


def cpu_block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout,
    scale: float,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact block-sparse attention on CPU tensors already in kernel token order (differentiable).

    No argument checking: call :func:`diffattn.kernels.block_sparse_attention`, which validates
    the inputs and applies the layout's permutation.

    Args:
        q, k, v: ``[B, H, N, D]`` CPU tensors (float16, bfloat16 or float32; float64 is also
            accepted and computed in float64, for gradient checks), kernel order.
        layout: CPU :class:`BlockLayout` with ``num_tokens == N`` and 1 or ``H`` heads.
        scale: score scale.
        return_lse: also return float32 ``lse [B, H, N]`` (``-inf`` on empty rows).

    Returns:
        ``out [B, H, N, D]`` in ``q.dtype`` (and ``lse``). Computation is in float32 (float64
        for float64 inputs).

    Example:
        >>> from diffattn import Neighborhood, VideoGrid
        >>> layout = Neighborhood(kernel_size=(1, 3, 3)).layout(VideoGrid(2, 8, 8), block_size=32)
        >>> q = k = v = torch.randn(1, 2, 128, 64)
        >>> cpu_block_sparse_attention(q, k, v, layout, 0.125).shape
        torch.Size([1, 2, 128, 64])
    """
    out, lse = attention_op(q, k, v, layout, scale, return_lse, "cpu")
    return (out, lse) if return_lse else out
