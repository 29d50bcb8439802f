"""FLUX.1 (dev, schnell and the pipelines built on ``FluxTransformer2DModel``).

Token order: every block, double-stream and single-stream, attends over ``[text, image]``: the
T5 text tokens first (``txt_ids``), then the packed image tokens row-major (``img_ids``). The
grid is 2-D: ``VideoGrid(frames=1, height, width)`` in packed tokens (latent size / 2 after the
2x2 packing), read from ``img_ids``, whose rows are ``(0, row, column)`` in raster order. When the
image ids are not one raster grid (FLUX Kontext appends a reference image, for example) no grid
is published and every layer runs its stock processor for that call.

Layer indices follow execution order: double-stream blocks ``0..num_layers-1``, then the
single-stream blocks.
"""

from __future__ import annotations

import torch

from ..patterns import VideoGrid
from ..processors.flux import FluxSparseAttnProcessor
from .base import ModelAdapter, call_argument


class FluxAdapter(ModelAdapter):
    family = "flux"
    processor_class = FluxSparseAttnProcessor
    default_grid = (1, 64, 64, 512, "start")  # 1024x1024 image
    transformer_classes = ("FluxTransformer2DModel",)
    no_grid_calls = "image ids that are not one raster grid, e.g. FLUX Kontext's appended reference image"

    def self_attention_layers(self, transformer: torch.nn.Module) -> list[tuple[str, int]]:
        double = len(transformer.transformer_blocks)
        layers = [(f"transformer_blocks.{i}.attn", i) for i in range(double)]
        single = len(transformer.single_transformer_blocks)
        layers += [(f"single_transformer_blocks.{i}.attn", double + i) for i in range(single)]
        return layers

    def grid_from_call(self, transformer: torch.nn.Module, args: tuple, kwargs: dict) -> VideoGrid | None:
        hidden_states = call_argument(args, kwargs, "hidden_states", 0, required=False)
        text = call_argument(args, kwargs, "encoder_hidden_states", 1, required=False)
        img_ids = call_argument(args, kwargs, "img_ids", 4, required=False)
        if hidden_states is None or text is None or img_ids is None:
            return None
        shape = image_grid_shape(img_ids, hidden_states.shape[1])
        if shape is None:
            return None
        return VideoGrid(1, shape[0], shape[1], text_tokens=text.shape[1], text_position="start")

    def timestep_from_call(self, args: tuple, kwargs: dict) -> torch.Tensor | None:
        return call_argument(args, kwargs, "timestep", 3, required=False)


def image_grid_shape(img_ids: torch.Tensor, image_tokens: int) -> tuple[int, int] | None:
    """``(height, width)`` in packed tokens if ``img_ids`` is one raster grid of ``image_tokens``.

    The pipelines build ``img_ids[r * width + c] = (0, r, c)`` (possibly offset); anything else
    (several images, a non-raster order, a mismatch with the sequence length) gives None.
    """
    if img_ids.ndim == 3:  # deprecated batched ids: the transformer itself uses the first row
        img_ids = img_ids[0]
    if img_ids.ndim != 2 or img_ids.shape[-1] != 3 or img_ids.shape[0] != image_tokens or image_tokens == 0:
        return None
    ids = img_ids.detach().to("cpu", torch.float64)
    rows, cols = ids[:, 1] - ids[0, 1], ids[:, 2] - ids[0, 2]
    height = int(rows[-1].item()) + 1
    if height <= 0 or image_tokens % height:
        return None
    width = image_tokens // height
    expected_rows = torch.arange(height, dtype=torch.float64).repeat_interleave(width)
    expected_cols = torch.arange(width, dtype=torch.float64).repeat(height)
    one_image = bool((ids[:, 0] == ids[0, 0]).all())
    if not (one_image and torch.equal(rows, expected_rows) and torch.equal(cols, expected_cols)):
        return None
    return height, width
