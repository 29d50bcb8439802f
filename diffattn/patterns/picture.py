"""Render a block layout as a picture: what users look at to understand a preset."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .._io import atomic_write
from ..errors import UserError
from .grid import VideoGrid
from .layout import BlockLayout

_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.int64)
_EMPTY = np.array([255, 255, 255], dtype=np.float64)
_FULL = np.array([22, 52, 120], dtype=np.float64)
_FRAME_LINE = np.array([215, 215, 215], dtype=np.uint8)


def tile_fill(layout: BlockLayout, head: int = 0) -> torch.Tensor:
    """float64 ``[Mq, Mk]``: allowed fraction of each tile's in-range area (0 for skipped tiles)."""
    if isinstance(head, bool) or not isinstance(head, int) or not 0 <= head < layout.num_heads:
        raise UserError(f"head must be in [0, {layout.num_heads}), got {head!r}")
    n, bq, bk = layout.num_tokens, layout.block_q, layout.block_k
    fill = torch.zeros(layout.num_q_blocks, layout.num_k_blocks, dtype=torch.float64)
    counts = layout.kv_counts[head].cpu()
    slots = torch.arange(layout.max_kv_blocks)
    valid = slots[None, :] < counts[:, None]
    q_idx, slot_idx = valid.nonzero(as_tuple=True)
    k_idx = layout.kv_indices[head].cpu()[q_idx, slot_idx].long()
    mask_ids = layout.kv_mask_ids[head].cpu()[q_idx, slot_idx].long()
    rows = (torch.clamp(n - q_idx * bq, max=bq)).double()
    cols = (torch.clamp(n - k_idx * bk, max=bk)).double()
    allowed = rows * cols
    partial = mask_ids >= 0
    if partial.any():
        words = layout.masks.cpu()[mask_ids[partial]].numpy()
        bits = _POPCOUNT[words.view(np.uint8)].reshape(words.shape[0], -1).sum(1)
        allowed[partial] = torch.from_numpy(bits).double()
    fill[q_idx, k_idx] = allowed / (rows * cols)
    return fill


def layout_image(
    layout: BlockLayout, grid: VideoGrid | None = None, head: int = 0, max_pixels: int = 1024
) -> np.ndarray:
    """uint8 ``[rows, cols, 3]`` picture of a layout: one pixel per tile (averaged when there are
    more tiles than ``max_pixels``). Skipped tiles are white; a visited tile is at least 30 % dark
    (it costs a full tile of work) and darker the more of it is allowed. Light lines mark frame
    boundaries."""
    fill = tile_fill(layout, head)
    fill = torch.where(fill > 0, 0.3 + 0.7 * fill, fill)
    factor = max(1, -(-max(fill.shape) // max_pixels))
    if factor > 1:
        fill = torch.nn.functional.avg_pool2d(fill[None, None], factor, ceil_mode=True)[0, 0]
    f = fill.numpy()[..., None]
    image = (_EMPTY * (1 - f) + _FULL * f).round().astype(np.uint8)
    if grid is not None and layout.permutation is None and grid.frames > 1:
        starts = grid.video_offset + grid.tokens_per_frame * np.arange(1, grid.frames)
        q_lines = np.unique(starts // (layout.block_q * factor))
        k_lines = np.unique(starts // (layout.block_k * factor))
        empty = f[..., 0] == 0
        for r in q_lines[q_lines < image.shape[0]]:
            image[r][empty[r]] = _FRAME_LINE
        for c in k_lines[k_lines < image.shape[1]]:
            image[:, c][empty[:, c]] = _FRAME_LINE
    # Upscale tiny layouts so the picture is visible.
    scale = max(1, 256 // max(image.shape[:2]))
    return np.repeat(np.repeat(image, scale, 0), scale, 1)


def save_layout_png(
    layout: BlockLayout, path: str | os.PathLike, grid: VideoGrid | None = None, head: int = 0, max_pixels: int = 1024
) -> Path:
    """Write :func:`layout_image` to ``path`` as a PNG, atomically (temp file + rename).

    Example:
        >>> import tempfile
        >>> from diffattn import Radial, VideoGrid
        >>> grid = VideoGrid(21, 30, 52)
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     save_layout_png(Radial().layout(grid), f"{folder}/radial.png", grid).name
        'radial.png'
    """
    from PIL import Image

    path = Path(path)
    if path.suffix.lower() != ".png":
        raise UserError(f"path must end in .png, got {str(path)!r}")
    image = Image.fromarray(layout_image(layout, grid, head, max_pixels))
    return atomic_write(path, lambda handle: image.save(handle, format="PNG"))
