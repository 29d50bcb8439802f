"""diffusers attention processors that run diffattn's kernels (no model-family knowledge beyond
each processor's own attention module)."""

from .base import SparseAttnProcessor
from .cogvideox import CogVideoXSparseAttnProcessor
from .config import SparsityConfig
from .flux import FluxSparseAttnProcessor
from .hunyuan_video import HunyuanVideoSparseAttnProcessor
from .ltx_video import LTXVideoSparseAttnProcessor
from .mochi import MochiSparseAttnProcessor
from .state import SparseUnsupported, SparsityState
from .unet import UNetSparseAttnProcessor
from .wan import WanSparseAttnProcessor

__all__ = [
    "CogVideoXSparseAttnProcessor", "FluxSparseAttnProcessor", "HunyuanVideoSparseAttnProcessor",
    "LTXVideoSparseAttnProcessor", "MochiSparseAttnProcessor", "SparseAttnProcessor", "SparseUnsupported",
    "SparsityConfig", "SparsityState", "UNetSparseAttnProcessor", "WanSparseAttnProcessor",
]
