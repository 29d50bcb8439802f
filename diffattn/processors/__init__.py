"""diffusers attention processors that run diffattn's kernels (no model-family knowledge beyond
each processor's own attention module)."""

from .config import SparsityConfig
from .state import SparsityState
from .wan import WanSparseAttnProcessor

__all__ = ["SparsityConfig", "SparsityState", "WanSparseAttnProcessor"]
