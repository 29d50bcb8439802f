"""A tiny, randomly initialised FLUX.1 pipeline built offline from configs (test fixture)."""

from __future__ import annotations

import torch

TEXT_TOKENS = 7  # T5 tokens of the tiny prompts (512 for FLUX.1-dev); deliberately not a block multiple
TEXT_DIM = 32
POOLED_DIM = 16


def tiny_flux_pipeline(num_layers: int = 1, num_single_layers: int = 2, guidance_embeds: bool = True, seed: int = 0):
    """A FluxPipeline with a tiny random transformer and VAE; no tokenizers or text encoders (prompts
    are passed as ``prompt_embeds`` and ``pooled_prompt_embeds``)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        norm_num_groups=2, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035,
    )
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=num_layers, num_single_layers=num_single_layers,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=TEXT_DIM,
        pooled_projection_dim=POOLED_DIM, guidance_embeds=guidance_embeds, axes_dims_rope=(4, 6, 6),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux_call_kwargs(batch: int = 1, height: int = 128, width: int = 96, steps: int = 3, seed: int = 0,
                     true_cfg_scale: float = 1.0):
    """Pipeline arguments; ``true_cfg_scale > 1`` adds negative embeddings (two transformer calls per step)."""
    generator = torch.Generator().manual_seed(seed)
    kwargs = dict(
        prompt_embeds=torch.randn(batch, TEXT_TOKENS, TEXT_DIM, generator=generator),
        pooled_prompt_embeds=torch.randn(batch, POOLED_DIM, generator=generator),
        height=height, width=width, num_inference_steps=steps, guidance_scale=3.5, output_type="latent",
        generator=torch.Generator().manual_seed(seed + 1),
    )
    if true_cfg_scale > 1:
        kwargs.update(
            negative_prompt_embeds=torch.randn(batch, TEXT_TOKENS, TEXT_DIM, generator=generator),
            negative_pooled_prompt_embeds=torch.randn(batch, POOLED_DIM, generator=generator),
            true_cfg_scale=true_cfg_scale,
        )
    return kwargs
