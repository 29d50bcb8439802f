"""LTX-Video (``LTXVideoTransformer3DModel``: ``LTXPipeline``, ``LTXImageToVideoPipeline``).

Token order: self-attention (``attn1``) sees only video tokens; text enters through
cross-attention (``attn2``), which is never sparsified. The pipeline packs the latents
``[B, C, F, H, W]`` into ``[B, F/p_t * H/p * W/p, C * p_t * p * p]`` (frame-major, then rows,
then columns), so the transformer cannot see the grid in ``hidden_states``; it comes from the
forward's ``num_frames``, ``height`` and ``width`` arguments.

Those three are what the transformer's rotary embedding builds its position grid from
(``arange(num_frames) x arange(height) x arange(width)``, flattened frame-major), i.e. they are
token counts *after* the patchify. The pipelines pass the VAE latent sizes, which are the same
thing because every LTX-Video checkpoint uses ``patch_size = patch_size_t = 1`` (with larger
patches the stock pipeline itself cannot run). The adapter therefore takes them as token counts
and checks them against the sequence length; when they do not describe the sequence, or when the
caller passes ``video_coords`` instead (``LTXConditionPipeline``: positions are explicit and
conditioning tokens may be appended, so the tokens need not form a grid), it publishes no grid
and that call stays dense (stock), never something different.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from ..patterns import VideoGrid
from ..processors.ltx_video import LTXVideoSparseAttnProcessor
from .base import ModelAdapter

# Positional order of ``LTXVideoTransformer3DModel.forward`` (after ``self``).
_FORWARD_ARGUMENTS = (
    "hidden_states", "encoder_hidden_states", "timestep", "encoder_attention_mask",
    "num_frames", "height", "width", "rope_interpolation_scale", "video_coords",
)


def _call_arguments(transformer: torch.nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The forward's arguments by name, whether passed positionally or by keyword."""
    try:
        names = tuple(inspect.signature(type(transformer).forward).parameters)[1:]
    except (TypeError, ValueError):  # a wrapped forward without a signature
        names = _FORWARD_ARGUMENTS
    named = dict(zip(names, args))
    named.update(kwargs)
    return named


class LTXVideoAdapter(ModelAdapter):
    family = "ltx_video"
    processor_class = LTXVideoSparseAttnProcessor
    default_grid = (16, 15, 22, 0, "end")  # 480x704, 121 frames
    transformer_attributes = ("transformer",)
    transformer_classes = ("LTXVideoTransformer3DModel",)
    no_grid_calls = ("explicit video_coords, as LTXConditionPipeline passes, or num_frames/height/width that do "
                     "not describe the sequence")

    def self_attention_layers(self, transformer: torch.nn.Module) -> list[tuple[str, int]]:
        return [(f"transformer_blocks.{i}.attn1", i) for i in range(len(transformer.transformer_blocks))]

    def grid_from_call(self, transformer: torch.nn.Module, args: tuple, kwargs: dict) -> VideoGrid | None:
        """The token grid, or None (the call stays dense) when the arguments do not give one."""
        named = _call_arguments(transformer, args, kwargs)
        if named.get("video_coords") is not None:
            return None
        hidden_states = named.get("hidden_states")
        sizes = [named.get(name) for name in ("num_frames", "height", "width")]
        if hidden_states is None or hidden_states.ndim != 3 or any(s is None for s in sizes):
            return None
        frames, height, width = (int(s) for s in sizes)
        if min(frames, height, width) < 1 or frames * height * width != hidden_states.shape[1]:
            return None
        return VideoGrid(frames, height, width)

    def timestep_from_call(self, args: tuple, kwargs: dict) -> torch.Tensor | None:
        if "timestep" in kwargs:
            return kwargs["timestep"]
        return args[2] if len(args) > 2 else None
