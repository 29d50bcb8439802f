"""HunyuanVideo (text-to-video and the image-to-video variants on ``HunyuanVideoTransformer3DModel``).

Token order: every dual-stream block (``transformer_blocks.{i}.attn``) and every single-stream
block (``single_transformer_blocks.{j}.attn``) runs one joint self-attention over ``[video, text]``:
the video tokens frame-major, then the prompt's text tokens (256 for the released model, padded;
the transformer passes a boolean key-padding mask ``[B, 1, 1, N]`` for the padding). Block indices
count the dual-stream blocks first (0 .. num_layers - 1), then the single-stream blocks
(num_layers .. num_layers + num_single_layers - 1), so ``dense_layers=(-1,)`` is the last
single-stream block. The token refiner (``context_embedder.token_refiner.*.attn``) attends over
text only and keeps its stock processor.

The latent grid comes from ``hidden_states [B, C, F, H, W]`` divided by the patch sizes
``(config.patch_size_t, config.patch_size, config.patch_size)`` = (1, 2, 2); the number of text
tokens from ``encoder_hidden_states [B, L, C]``.
"""

from __future__ import annotations

import torch

from ..patterns import VideoGrid
from ..processors.hunyuan_video import HunyuanVideoSparseAttnProcessor
from .base import ModelAdapter, call_argument


class HunyuanVideoAdapter(ModelAdapter):
    family = "hunyuan_video"
    processor_class = HunyuanVideoSparseAttnProcessor
    default_grid = (33, 45, 80, 256, "end")  # 720x1280, 129 frames
    transformer_classes = ("HunyuanVideoTransformer3DModel",)

    def self_attention_layers(self, transformer: torch.nn.Module) -> list[tuple[str, int]]:
        dual = len(transformer.transformer_blocks)
        return [(f"transformer_blocks.{i}.attn", i) for i in range(dual)] + [
            (f"single_transformer_blocks.{j}.attn", dual + j) for j in range(len(transformer.single_transformer_blocks))
        ]

    def grid_from_call(self, transformer: torch.nn.Module, args: tuple, kwargs: dict) -> VideoGrid:
        hidden_states = call_argument(args, kwargs, "hidden_states", 0)
        text = call_argument(args, kwargs, "encoder_hidden_states", 2)
        _, _, frames, height, width = hidden_states.shape
        p, p_t = transformer.config.patch_size, transformer.config.patch_size_t
        return VideoGrid(frames // p_t, height // p, width // p, text_tokens=text.shape[1], text_position="end")

    def timestep_from_call(self, args: tuple, kwargs: dict) -> torch.Tensor | None:
        return call_argument(args, kwargs, "timestep", 1, required=False)
