"""Stable Diffusion UNets: SD 1.x/2.x (``StableDiffusionPipeline``) and SDXL
(``StableDiffusionXLPipeline``), both ``pipe.unet``, a ``UNet2DConditionModel``.

Token order: the self-attention (``attn1`` of each ``BasicTransformerBlock``) sees image tokens
only, row-major over its resolution level; the text reaches ``attn2`` (cross-attention, never
sparsified). The grid is 2-D: the pre-hook publishes the latent grid ``VideoGrid(1, H, W)`` from
the UNet's ``sample`` ``[B, C, H, W]``; a layer at downsampling ``d`` works on
``ceil(H/d) x ceil(W/d)`` tokens (see :class:`~diffattn.processors.unet.UNetSparseAttnProcessor`).

Layer indices follow execution order: the down blocks' layers, the mid block's, then the up
blocks'. Radial attention is a video pattern (its decay runs over frames): refused here.
AgentSD's matching metric, the block input, comes from one forward pre-hook per block.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import UserError
from ..patterns import Radial, VideoGrid
from ..processors.state import SparsityState
from ..processors.unet import UNetSparseAttnProcessor
from .base import ModelAdapter, call_argument

_STAGE_ORDER = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}


class StableDiffusionAdapter(ModelAdapter):
    """SD 1.x / 2.x UNets (no SDXL ``text_time`` added conditioning)."""

    family = "sd"
    processor_class = UNetSparseAttnProcessor
    default_grid = (1, 64, 64, 0, "end")  # 512 x 512 pixels
    transformer_attributes = ("unet",)
    transformer_classes = ("UNet2DConditionModel",)
    xl = False

    def matches(self, pipe: Any) -> bool:
        return any(type(unet).__name__ in self.transformer_classes and is_sdxl_unet(unet) == self.xl
                   for _, unet in self.transformers(pipe))

    def self_attention_layers(self, transformer: torch.nn.Module) -> list[tuple[str, int]]:
        names = [key.removesuffix(".processor") for key in transformer.attn_processors
                 if key.endswith(".attn1.processor") and ".transformer_blocks." in key]
        names.sort(key=lambda name: _STAGE_ORDER.get(name.split(".")[0], 3))  # stable: keeps block order
        return [(name, index) for index, name in enumerate(names)]

    def grid_from_call(self, transformer: torch.nn.Module, args: tuple, kwargs: dict) -> VideoGrid | None:
        sample = call_argument(args, kwargs, "sample", 0, required=False)
        if not isinstance(sample, torch.Tensor) or sample.ndim != 4:
            return None
        return VideoGrid(1, sample.shape[2], sample.shape[3])

    def timestep_from_call(self, args: tuple, kwargs: dict) -> torch.Tensor | None:
        return call_argument(args, kwargs, "timestep", 1, required=False)

    def make_processor(self, stock: Any, state: SparsityState | None, layer_index: int) -> Any:
        if state is not None and isinstance(state.config.pattern, Radial):
            raise UserError(
                f"pattern Radial does not apply to the {self.family} family: a UNet image has one frame and Radial "
                "decays over frames; use Neighborhood (2-D window), AgentSD or Dense"
            )
        return super().make_processor(stock, state, layer_index)

    def extra_hooks(self, transformer: torch.nn.Module, layers: list[tuple[str, int]],
                    state: SparsityState) -> list[torch.utils.hooks.RemovableHandle]:
        """One pre-hook per transformer block: hands the block's input (AgentSD's matching metric)
        and the layer's name to its ``attn1`` processor."""
        hooks = []
        for name, _ in layers:
            block = transformer.get_submodule(name.rsplit(".", 1)[0])
            attention = transformer.get_submodule(name)

            def capture(module: torch.nn.Module, args: tuple, kwargs: dict, attention=attention, name=name) -> None:
                processor = attention.processor
                if isinstance(processor, UNetSparseAttnProcessor) and processor.state is state:
                    processor.block_input = args[0] if args else kwargs.get("hidden_states")
                    processor.layer_name = name

            hooks.append(block.register_forward_pre_hook(torch.compiler.disable(capture), with_kwargs=True))
        return hooks


class StableDiffusionXLAdapter(StableDiffusionAdapter):
    """SDXL UNets (``addition_embed_type="text_time"``)."""

    family = "sdxl"
    default_grid = (1, 128, 128, 0, "end")  # 1024 x 1024 pixels
    xl = True


def is_sdxl_unet(unet: Any) -> bool:
    """Whether a ``UNet2DConditionModel`` is SDXL's (pooled text and time ids as added conditioning)."""
    return getattr(getattr(unet, "config", None), "addition_embed_type", None) == "text_time"
