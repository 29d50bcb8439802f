"""CogVideoX 1.0 and 1.5 (text-to-video, image-to-video, video-to-video, Fun-Control).

Token order: one joint self-attention per block over ``[text, video]``: the prompt's text tokens
first (226 for the released models), then the video tokens frame-major. There is no
cross-attention. The latent grid comes from ``hidden_states [B, F, C, H, W]``: spatial patches of
``config.patch_size`` (2) and, for CogVideoX 1.5, temporal patches of ``config.patch_size_t`` (2).
The 1.5 pipelines pad the latent frames to a multiple of ``patch_size_t`` before the transformer
sees them, so the transformer input always divides evenly; the padding frames are real tokens of
the sequence and are part of the grid.
"""

from __future__ import annotations

import torch

from ..patterns import VideoGrid
from ..processors.cogvideox import CogVideoXSparseAttnProcessor
from .base import ModelAdapter, call_argument


class CogVideoXAdapter(ModelAdapter):
    family = "cogvideox"
    processor_class = CogVideoXSparseAttnProcessor
    default_grid = (13, 30, 45, 226, "start")  # 480x720, 49 frames
    transformer_classes = ("CogVideoXTransformer3DModel",)

    def self_attention_layers(self, transformer: torch.nn.Module) -> list[tuple[str, int]]:
        return [(f"transformer_blocks.{i}.attn1", i) for i in range(len(transformer.transformer_blocks))]

    def grid_from_call(self, transformer: torch.nn.Module, args: tuple, kwargs: dict) -> VideoGrid:
        hidden_states = call_argument(args, kwargs, "hidden_states", 0)
        text = call_argument(args, kwargs, "encoder_hidden_states", 1)
        _, frames, _, height, width = hidden_states.shape
        p = transformer.config.patch_size
        p_t = transformer.config.patch_size_t or 1  # None for CogVideoX 1.0: one frame per token
        return VideoGrid(frames // p_t, height // p, width // p, text_tokens=text.shape[1], text_position="start")

    def timestep_from_call(self, args: tuple, kwargs: dict) -> torch.Tensor | None:
        return call_argument(args, kwargs, "timestep", 2, required=False)
