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

from typing import Any

import torch

from ..patterns import VideoGrid
from ..processors.cogvideox import CogVideoXSparseAttnProcessor
from ..processors.state import SparsityState
from .base import ModelAdapter, call_argument

# Stock processors whose computation CogVideoXSparseAttnProcessor reproduces (name -> fused QKV).
_SUPPORTED_STOCK = {"CogVideoXAttnProcessor2_0": False, "FusedCogVideoXAttnProcessor2_0": True}


class CogVideoXAdapter(ModelAdapter):
    family = "cogvideox"
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

    def make_processor(self, stock: Any, state: SparsityState, layer_index: int) -> Any:
        fused = _SUPPORTED_STOCK.get(type(stock).__name__)
        if fused is None:
            # A processor we do not reproduce (e.g. a third-party one): keep it, the layer stays dense.
            return stock
        return CogVideoXSparseAttnProcessor(stock, state, layer_index, fused=fused)
