"""diffattn: sparse and efficient attention for diffusion video and image models.

Example:
    >>> import diffattn
    >>> from diffattn import VideoGrid, Radial, SparsityConfig
    >>> diffattn.apply(pipe, SparsityConfig(pattern=Radial(), dense_steps=12, dense_layers=(0,)))
    >>> report = diffattn.profile(pipe, "radial", prompt="a red ball")   # dense vs preset
"""

from .adapters import apply, remove, sparse_processors
from .errors import DenseFallbackWarning, UserError
from .kernels import block_sparse_attention
from .patterns import BlockLayout, Dense, Neighborhood, Pattern, Radial, VideoGrid
from .processors import SparsityConfig
from .profiler import ProfileReport, profile

__version__ = "0.1.0"

__all__ = [
    "BlockLayout",
    "Dense",
    "DenseFallbackWarning",
    "Neighborhood",
    "Pattern",
    "ProfileReport",
    "Radial",
    "SparsityConfig",
    "UserError",
    "VideoGrid",
    "__version__",
    "apply",
    "block_sparse_attention",
    "profile",
    "remove",
    "sparse_processors",
]
