"""diffattn: sparse and efficient attention for diffusion video and image models."""

from .patterns import BlockLayout, Dense, Neighborhood, Pattern, Radial, VideoGrid

__version__ = "0.1.0"

__all__ = ["BlockLayout", "Dense", "Neighborhood", "Pattern", "Radial", "VideoGrid", "__version__"]
