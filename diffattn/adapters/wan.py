"""Wan 2.1 / 2.2 (T2V, I2V, and 2.2 A14B's two transformers).

Token order: self-attention sees only video tokens, frame-major; text enters through
cross-attention (``attn2``), which is never sparsified. The latent grid comes from
``hidden_states [B, C, F, H, W]`` divided by ``config.patch_size`` (1, 2, 2).
"""

from __future__ import annotations

import torch

from ..patterns import VideoGrid
from ..processors.wan import WanSparseAttnProcessor
from .base import ModelAdapter, call_argument


class WanAdapter(ModelAdapter):
    family = "wan"
    processor_class = WanSparseAttnProcessor
    default_grid = (21, 30, 52, 0, "end")  # Wan 2.1 480p, 81 frames
    transformer_attributes = ("transformer", "transformer_2")
    transformer_classes = ("WanTransformer3DModel",)

    def self_attention_layers(self, transformer: torch.nn.Module) -> list[tuple[str, int]]:
        return [(f"blocks.{i}.attn1", i) for i in range(len(transformer.blocks))]

    def grid_from_call(self, transformer: torch.nn.Module, args: tuple, kwargs: dict) -> VideoGrid:
        hidden_states = call_argument(args, kwargs, "hidden_states", 0)
        _, _, frames, height, width = hidden_states.shape
        p_t, p_h, p_w = transformer.config.patch_size
        return VideoGrid(frames // p_t, height // p_h, width // p_w)

    def timestep_from_call(self, args: tuple, kwargs: dict) -> torch.Tensor | None:
        return call_argument(args, kwargs, "timestep", 1, required=False)
