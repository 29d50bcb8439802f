"""Dense: every token attends every token. The baseline every sparse pattern is measured against."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Pattern
from .grid import VideoGrid, VideoOrder


@dataclass(frozen=True)
class Dense(Pattern):
    """Full attention, expressed as a pattern so it runs through the same kernels and layouts.

    Example:
        >>> Dense().layout(VideoGrid(4, 8, 8), block_size=64).density
        1.0
    """

    def video_factors(self, grid: VideoGrid) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return []

    def video_prefix_pair_counts(
        self, grid: VideoGrid, order: VideoOrder, q_prefix: torch.Tensor, k_prefix: torch.Tensor
    ) -> torch.Tensor:
        return q_prefix.double()[:, None] * k_prefix.double()[None, :]
