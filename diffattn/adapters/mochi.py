"""Mochi 1 (``MochiTransformer3DModel``).

Token order: each block's ``attn1`` is one joint self-attention over ``[video, text]``: the video
tokens frame-major (the transformer patchifies each frame, then flattens frames), then the T5
prompt tokens. The stock processor drops each sample's padded prompt tokens; the sparse processor
reproduces that with a key-padding mask. There is no cross-attention.

The latent grid comes from ``hidden_states [B, C, F, H, W]``: Mochi patchifies space only
(``config.patch_size`` = 2), one token per latent frame; the text tokens from
``encoder_hidden_states [B, L, C]``.

Mochi's transformer has no ``set_attn_processor``/``attn_processors``: ``install`` assigns each
``module.processor`` directly and ``remove`` assigns the stock objects back.
"""

from __future__ import annotations

import torch

from ..patterns import VideoGrid
from ..processors.mochi import MochiSparseAttnProcessor
from .base import ModelAdapter, call_argument


class MochiAdapter(ModelAdapter):
    family = "mochi"
    processor_class = MochiSparseAttnProcessor
    default_grid = (28, 30, 53, 256, "end")  # 480x848, 163 frames
    transformer_classes = ("MochiTransformer3DModel",)

    def self_attention_layers(self, transformer: torch.nn.Module) -> list[tuple[str, int]]:
        return [(f"transformer_blocks.{i}.attn1", i) for i in range(len(transformer.transformer_blocks))]

    def grid_from_call(self, transformer: torch.nn.Module, args: tuple, kwargs: dict) -> VideoGrid:
        hidden_states = call_argument(args, kwargs, "hidden_states", 0)
        text = call_argument(args, kwargs, "encoder_hidden_states", 1)
        _, _, frames, height, width = hidden_states.shape
        p = transformer.config.patch_size
        return VideoGrid(frames, height // p, width // p, text_tokens=text.shape[1], text_position="end")

    def timestep_from_call(self, args: tuple, kwargs: dict) -> torch.Tensor | None:
        return call_argument(args, kwargs, "timestep", 2, required=False)
