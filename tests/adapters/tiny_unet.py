"""Tiny, randomly initialised SD 1.5 and SDXL pipelines built offline from configs (test fixture).

No tokenizers or text encoders: prompts are passed as embeddings. The VAE is tiny too; the tests
ask for latents, so it never decodes.
"""

from __future__ import annotations

import torch

TEXT_TOKENS = 7  # 77 in SD; deliberately small
TEXT_DIM = 32
POOLED_DIM = 16
TIME_DIM = 8


def _tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                         layers_per_block=1, norm_num_groups=2, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2)


def tiny_unet(xl: bool = False, block_out_channels: tuple[int, ...] = (32, 64), layers_per_block: int = 1,
              heads: int = 2):
    """A UNet2DConditionModel with SD 1.5's block kinds (cross-attention down/up blocks over a last plain
    level), or SDXL's added ``text_time`` conditioning and plain first level with ``xl``."""
    from diffusers import UNet2DConditionModel

    levels = len(block_out_channels)
    if xl:
        down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1)
        up = ("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",)
        extra = dict(addition_embed_type="text_time", addition_time_embed_dim=TIME_DIM,
                     projection_class_embeddings_input_dim=6 * TIME_DIM + POOLED_DIM, transformer_layers_per_block=1)
    else:
        down = ("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",)
        up = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1)
        extra = {}
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, down_block_types=down, up_block_types=up,
        block_out_channels=block_out_channels, layers_per_block=layers_per_block, cross_attention_dim=TEXT_DIM,
        attention_head_dim=heads, norm_num_groups=8, **extra,
    )


def tiny_sd_pipeline(seed: int = 0, **unet_kwargs):
    """A StableDiffusionPipeline (SD 1.5 layout) with a tiny random UNet and VAE, Euler scheduler."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    torch.manual_seed(seed)
    pipe = StableDiffusionPipeline(vae=_tiny_vae(), text_encoder=None, tokenizer=None, unet=tiny_unet(**unet_kwargs),
                                   scheduler=EulerDiscreteScheduler(steps_offset=1), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl_pipeline(seed: int = 0, **unet_kwargs):
    """A StableDiffusionXLPipeline with a tiny random UNet (SDXL's added conditioning) and VAE."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    torch.manual_seed(seed)
    pipe = StableDiffusionXLPipeline(vae=_tiny_vae(), text_encoder=None, text_encoder_2=None, tokenizer=None,
                                     tokenizer_2=None, unet=tiny_unet(xl=True, **unet_kwargs),
                                     scheduler=EulerDiscreteScheduler(steps_offset=1))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def unet_call_kwargs(xl: bool = False, batch: int = 1, size: int = 32, steps: int = 3, seed: int = 0,
                     guidance_scale: float = 1.0):
    """Pipeline arguments for ``size x size`` pixels (``size / 2`` latents with the tiny VAE);
    ``guidance_scale > 1`` adds negative embeddings (classifier-free guidance, batch 2B)."""
    generator = torch.Generator().manual_seed(seed)
    kwargs = dict(prompt_embeds=torch.randn(batch, TEXT_TOKENS, TEXT_DIM, generator=generator), height=size,
                  width=size, num_inference_steps=steps, guidance_scale=guidance_scale, output_type="latent",
                  generator=torch.Generator().manual_seed(seed + 1))
    if guidance_scale > 1:
        kwargs["negative_prompt_embeds"] = torch.randn(batch, TEXT_TOKENS, TEXT_DIM, generator=generator)
    if xl:
        kwargs["pooled_prompt_embeds"] = torch.randn(batch, POOLED_DIM, generator=generator)
        if guidance_scale > 1:
            kwargs["negative_pooled_prompt_embeds"] = torch.randn(batch, POOLED_DIM, generator=generator)
    return kwargs
