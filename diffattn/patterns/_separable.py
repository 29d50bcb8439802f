"""Shared machinery for patterns whose rule factorises over the axes (t, h, w).

If ``allowed((t, h, w), (t', h', w')) = A_t[t, t'] & A_h[h, h'] & A_w[w, w']``, the number of
allowed pairs between two axis-aligned boxes is the product of three per-axis rectangle sums, and
every prefix of a raster or tile-major order is a union of at most 6 boxes
(:meth:`VideoOrder.prefix_boxes`). Prefix pair counts therefore cost a few small matrix products
instead of an ``N x N`` mask.
"""

from __future__ import annotations

import torch

from .grid import VideoGrid, VideoOrder

# Bound on the [X*boxes, Y*boxes] float64 intermediates of one chunk (elements).
_CHUNK_ELEMENTS = 1 << 23


def _box_indicators(boxes: torch.Tensor, axis: int, length: int) -> torch.Tensor:
    """[X, B, 3, 2] boxes -> float64 [X*B, length] indicator of the box's range on ``axis``."""
    lo, hi = boxes[:, :, axis, 0].reshape(-1, 1), boxes[:, :, axis, 1].reshape(-1, 1)
    coord = torch.arange(length)[None, :]
    return ((coord >= lo) & (coord < hi)).double()


def separable_prefix_pair_counts(
    tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    grid: VideoGrid,
    order: VideoOrder,
    q_prefix: torch.Tensor,
    k_prefix: torch.Tensor,
) -> torch.Tensor:
    """float64 ``[X, Y]`` allowed pairs among prefixes, from per-axis tables."""
    q_boxes, k_boxes = order.prefix_boxes(q_prefix), order.prefix_boxes(k_prefix)
    q_boxes, k_boxes = _drop_empty_boxes(q_boxes), _drop_empty_boxes(k_boxes)
    num_qb, num_kb = q_boxes.shape[1], k_boxes.shape[1]
    # Per axis: [Y*Bk, L] indicators of the key boxes, pre-multiplied by the axis table.
    key_side = [
        tables[a].double() @ _box_indicators(k_boxes, a, grid.shape[a]).T for a in range(3)
    ]  # each [L, Y*Bk]
    out = torch.empty(q_prefix.numel(), k_prefix.numel(), dtype=torch.float64)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, num_qb * key_side[0].shape[1]))
    for start in range(0, q_prefix.numel(), chunk):
        part = q_boxes[start : start + chunk]
        prod = None
        for a in range(3):
            counts = _box_indicators(part, a, grid.shape[a]) @ key_side[a]  # [x*Bq, Y*Bk]
            prod = counts if prod is None else prod.mul_(counts)
        out[start : start + chunk] = prod.view(part.shape[0], num_qb, k_prefix.numel(), num_kb).sum((1, 3))
    return out


def _drop_empty_boxes(boxes: torch.Tensor) -> torch.Tensor:
    """Remove box slots that are empty for every prefix (e.g. 3 of the 6 in raster order)."""
    nonempty = ((boxes[..., 1] - boxes[..., 0]) > 0).all(-1).any(0)
    return boxes[:, nonempty] if bool(nonempty.any()) else boxes[:, :1]
