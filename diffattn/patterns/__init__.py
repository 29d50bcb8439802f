"""Sparsity patterns over a video's latent token grid, and their kernel-ready block layouts.

Torch only: nothing here imports Triton or diffusers.
"""

from .base import Pattern, clear_layout_cache
from .dense import Dense
from .grid import VideoGrid, VideoOrder
from .layout import BlockLayout
from .neighborhood import Neighborhood, natten_axis_table
from .pyramid import PyramidSparse
from .radial import Radial

__all__ = [
    "BlockLayout",
    "Dense",
    "Neighborhood",
    "Pattern",
    "PyramidSparse",
    "Radial",
    "VideoGrid",
    "VideoOrder",
    "clear_layout_cache",
    "natten_axis_table",
]
