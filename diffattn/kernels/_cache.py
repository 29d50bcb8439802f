"""Caches of per-layout derived data (CPU plans, Triton tile lists), keyed by the layout's tensors.

The custom op (:mod:`diffattn.kernels.op`) receives a layout as its tensors and rebuilds a
lightweight :class:`BlockLayout` around them on every call, so a cache keyed by the layout
*object* would miss every time. These caches key on the tensors themselves (address, shape,
strides, dtype, device) and drop an entry when the storage of ``kv_counts`` (or ``kv_levels``) is freed, so an
address reused by a later layout can never hit a stale entry, and a cached value (which must
not hold the layout's tensors) never keeps its layout alive.
"""

from __future__ import annotations

import threading
import weakref
from typing import Callable, Hashable, TypeVar

import torch

from ..patterns.layout import BlockLayout

T = TypeVar("T")
_LOCK = threading.RLock()


def _tensor_key(x: torch.Tensor) -> tuple:
    return (x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.dtype, str(x.device))


def layout_key(layout: BlockLayout) -> tuple:
    """What identifies a layout's kernel data: its tensors (not the Python object) and sizes.

    Example:
        >>> from diffattn import Dense, VideoGrid
        >>> layout = Dense().layout(VideoGrid(1, 4, 8), block_size=32)
        >>> layout_key(layout) == layout_key(layout.to("cpu"))
        True
    """
    tensors = (layout.kv_counts, layout.kv_indices, layout.kv_mask_ids, layout.masks)
    levels = None if layout.kv_levels is None else _tensor_key(layout.kv_levels)
    return (*(_tensor_key(x) for x in tensors), levels, layout.num_tokens, layout.block_q, layout.block_k)


def cached_per_layout(cache: dict, layout: BlockLayout, build: Callable[[], T], *extra: Hashable) -> T:
    """``cache[layout_key(layout), *extra]``, built by ``build()`` on a miss.

    ``build()`` runs under a lock (at most once per key); its result must not reference the
    layout's tensors (it would keep them, and so the entry, alive forever).

    Example:
        >>> from diffattn import Dense, VideoGrid
        >>> layout = Dense().layout(VideoGrid(1, 4, 8), block_size=32)
        >>> store = {}
        >>> cached_per_layout(store, layout, lambda: "plan") == cached_per_layout(store, layout, lambda: "other")
        True
    """
    key = (layout_key(layout), *extra)
    with _LOCK:
        if key in cache:
            return cache[key]
        value = build()
        cache[key] = value
        weakref.finalize(layout.kv_counts.untyped_storage(), cache.pop, key, None)
        if layout.kv_levels is not None:
            # Layouts that differ only by their levels share kv_counts (BlockLayout.with_levels):
            # a freed levels tensor's address may come back with other levels.
            weakref.finalize(layout.kv_levels.untyped_storage(), cache.pop, key, None)
        return value
