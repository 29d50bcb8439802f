"""Radial attention: the spatiotemporal energy-decay mask (Radial Attention, Li et al. 2025).

Attention energy in video diffusion models decays with the distance between frames, and spatially
it concentrates around the same position. The pattern keeps a spatial band whose width halves
each time the frame distance doubles, so the work per query grows with log(frames), and
O(n log n) in total.

For query frame ``i``, key frame ``j``, ``d = |i - j|``, ``tpf = height * width`` and in-frame
positions ``s_q, s_k`` (raster index inside the frame):

* ``d <= dense_frame_distance`` (default 1): allowed (the near-diagonal frames are dense);
* ``j < sink_frames`` (default 1): allowed (the first frame is an attention sink);
* otherwise ``band = 2**bitlen(tpf) / 2**bitlen(d) * decay``. If ``band >= block_size`` the pair is
  allowed when ``|s_q - s_k| <= band``. Once ``band`` falls below one block, the band stays one
  block wide and only every ``floor(block_size / band)``-th frame distance is kept (temporal
  subsampling): allowed when ``d % floor(block_size / band) == 0`` and
  ``|s_q - s_k| <= block_size``.

The pattern is *defined at block granularity*: video tokens are cut into blocks of
``block_size`` (over the video index, so text tokens before the video do not shift them), and a
block pair is allowed when the rule above allows any token pair inside it. The token mask is that
block-quantized mask; text tokens are dense.

**Small calls.** Radial never refuses a grid: a call with at most ``dense_frame_distance + 1``
frames (a 1-frame image, a 2-frame preview) is dense, and so is any video that fits in one block;
a ``sink_frames`` or ``dense_frame_distance`` beyond the frame count means every frame.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from ..errors import UserError
from ._checks import check_block_size, check_positive_int
from .base import Pattern
from .grid import VideoGrid, VideoOrder


def _bit_length(x: torch.Tensor) -> torch.Tensor:
    """int64 bit length of non-negative integers (bitlen(0) = 0)."""
    out = torch.zeros_like(x)
    value = x.clone()
    while bool((value > 0).any()):
        out += (value > 0).long()
        value >>= 1
    return out


@dataclass(frozen=True)
class Radial(Pattern):
    """Radial (energy-decay) attention.

    Args:
        decay: multiplies the spatial band; < 1 is sparser, > 1 denser (the paper's
            ``decay_factor``). Must be > 0.
        sink_frames: leading frames every query attends in full (0 disables the sink).
        dense_frame_distance: frame distances up to this are dense (>= 0).
        block_size: quantisation block in video tokens; use the kernel's block size.

    Example:
        >>> from diffattn import VideoGrid
        >>> Radial(decay=1.0).layout(VideoGrid(21, 30, 52)).density
        0.54...
    """

    decay: float = 1.0
    sink_frames: int = 1
    dense_frame_distance: int = 1
    block_size: int = 128

    supports_permutation = False

    def __post_init__(self) -> None:
        if isinstance(self.decay, bool) or not isinstance(self.decay, (int, float)) or not 0 < self.decay < math.inf:
            raise UserError(
                f"Radial.decay must be a finite number > 0, got {self.decay!r} ({type(self.decay).__name__})"
            )
        object.__setattr__(self, "decay", float(self.decay))
        for name in ("sink_frames", "dense_frame_distance"):
            object.__setattr__(self, name, check_positive_int(f"Radial.{name}", getattr(self, name), allow_zero=True))
        check_block_size("Radial.block_size", self.block_size, (32, 64, 128, 256))

    # ---------------------------------------------------------------- the unquantised rule
    def band(self, grid: VideoGrid, distance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Half-width (tokens) and kept-flag of the spatial band for frame distances ``>= 2``.

        Returns ``(half_width float64, kept bool)`` with the shape of ``distance``.
        """
        distance = distance.long()
        top = float(2 ** int(grid.tokens_per_frame).bit_length())
        width = top / (2.0 ** _bit_length(distance).double()) * self.decay
        narrow = width < self.block_size
        split = torch.floor(self.block_size / width.clamp(min=1e-9)).clamp(min=1).long()
        kept = ~narrow | (distance % split == 0)
        return torch.where(narrow, torch.full_like(width, float(self.block_size)), width), kept

    def block_mask(self, grid: VideoGrid) -> torch.Tensor:
        """bool ``[Mb, Mb]``: allowed video-block pairs, ``Mb = ceil(video_tokens / block_size)``."""
        return _block_mask(self, grid)

    # ---------------------------------------------------------------- Pattern interface
    def video_factors(self, grid: VideoGrid) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(torch.arange(grid.video_tokens) // self.block_size, self.block_mask(grid))]

    def video_prefix_pair_counts(
        self, grid: VideoGrid, order: VideoOrder, q_prefix: torch.Tensor, k_prefix: torch.Tensor
    ) -> torch.Tensor:
        # P(x, y) = r(x)^T B c(y), where r(x)[a] = tokens of video block a among the first x.
        blocks = self.block_mask(grid).double()
        starts = torch.arange(blocks.shape[0]) * self.block_size
        lengths = (starts + self.block_size).clamp(max=grid.video_tokens) - starts
        rows = (q_prefix[:, None] - starts[None, :]).clamp(min=0).minimum(lengths[None, :]).double()
        cols = (k_prefix[:, None] - starts[None, :]).clamp(min=0).minimum(lengths[None, :]).double()
        return rows @ blocks @ cols.T


@lru_cache(maxsize=32)
def _block_mask(pattern: Radial, grid: VideoGrid) -> torch.Tensor:
    """Quantise the rule to blocks through block-and-frame segments (no token-level mask).

    A segment is the intersection of one block and one frame: a contiguous range of in-frame
    positions. A block pair is allowed if any of its segment pairs has an allowed token pair,
    which for a band rule is: interval distance between the two position ranges <= half-width.
    """
    bs, tpf, total = pattern.block_size, grid.tokens_per_frame, grid.video_tokens
    cuts = torch.cat([torch.arange(0, total, bs), torch.arange(0, total, tpf), torch.tensor([total])])
    cuts = torch.unique(cuts)  # sorted
    seg_start, seg_end = cuts[:-1], cuts[1:] - 1  # inclusive ends
    frame = seg_start // tpf
    lo, hi = seg_start - frame * tpf, seg_end - frame * tpf
    block = seg_start // bs
    num_blocks = -(-total // bs)

    distance = (frame[:, None] - frame[None, :]).abs()
    gap = torch.maximum(lo[None, :] - hi[:, None], lo[:, None] - hi[None, :]).clamp(min=0)
    half_width, kept = pattern.band(grid, distance)
    allowed = (
        # Clamped to the frame count: a huge setting means "all frames" and must fit in int64.
        (distance <= min(pattern.dense_frame_distance, grid.frames))
        | (frame[None, :] < min(pattern.sink_frames, grid.frames))
        | (kept & (gap.double() <= half_width))
    )
    flat = torch.zeros(num_blocks * num_blocks, dtype=torch.int64)
    pair_index = (block[:, None] * num_blocks + block[None, :]).flatten()
    flat.index_add_(0, pair_index, allowed.flatten().long())
    return (flat > 0).view(num_blocks, num_blocks)
