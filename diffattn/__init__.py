"""diffattn: sparse and efficient attention for diffusion video and image models.

Example:
    >>> import diffattn
    >>> from diffattn import Radial, SparsityConfig
    >>> from diffattn.pipelines.embedded import load_embedded_pipeline
    >>> pipe = load_embedded_pipeline()   # offline; any Wan, HunyuanVideo, CogVideoX, Mochi, LTX or FLUX pipeline
    >>> _ = diffattn.apply(pipe, SparsityConfig(pattern=Radial(), dense_steps=1, dense_layers=(0,)))
    >>> video = pipe("a red circle moves left", num_frames=3, height=32, width=32, num_inference_steps=2).frames[0]
    >>> video.shape
    (3, 32, 32, 3)
    >>> _ = diffattn.remove(pipe)         # the stock processors, exactly
"""

from .adapters import apply, sparse_processors
from .errors import DenseFallbackWarning, UserError
from .kernels import agent_attention, block_sparse_attention
from .patterns import BlockLayout, Dense, Neighborhood, Pattern, PyramidSparse, Radial, VideoGrid
from .processors import SparsityConfig
from .processors.agent import AgentSD
from .processors.freeswim import FreeSwim
from .profiler import ProfileReport, profile
from .steering import SteeringHandle, remove, steer

__version__ = "0.1.0"

__all__ = [
    "AgentSD",
    "BlockLayout",
    "Dense",
    "DenseFallbackWarning",
    "FreeSwim",
    "Neighborhood",
    "Pattern",
    "ProfileReport",
    "PyramidSparse",
    "Radial",
    "SparsityConfig",
    "SteeringHandle",
    "UserError",
    "VideoGrid",
    "__version__",
    "agent_attention",
    "apply",
    "block_sparse_attention",
    "profile",
    "remove",
    "sparse_processors",
    "steer",
]
