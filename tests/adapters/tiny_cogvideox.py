"""Tiny, randomly initialised CogVideoX 1.0 / 1.5 pipelines built offline from configs (test fixtures)."""

from __future__ import annotations

import torch

#: Text tokens of the tiny models (the released ones use 226); deliberately not a block multiple.
TEXT_TOKENS = 10
TEXT_DIM = 32


def tiny_cogvideox_pipeline(version: str = "1.0", rotary: bool = True, num_layers: int = 2, seed: int = 0):
    """A CogVideoXPipeline with a tiny random transformer and VAE (no tokenizer / text encoder).

    Args:
        version: ``"1.0"`` (no temporal patching) or ``"1.5"`` (``patch_size_t=2``, rotary).
        rotary: CogVideoX 1.0 only: rotary (5B) or sinusoidal absolute (2B) positional embeddings.
    """
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXDDIMScheduler,
        CogVideoXDPMScheduler,
        CogVideoXPipeline,
        CogVideoXTransformer3DModel,
    )

    if version not in ("1.0", "1.5"):
        raise ValueError(f"version must be '1.0' or '1.5', got {version!r}")
    torch.manual_seed(seed)
    vae = AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        norm_num_groups=2, temporal_compression_ratio=4,
        down_block_types=("CogVideoXDownBlock3D",) * 4, up_block_types=("CogVideoXUpBlock3D",) * 4,
    )
    common = dict(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=32,
        text_embed_dim=TEXT_DIM, num_layers=num_layers, max_text_seq_length=TEXT_TOKENS,
        sample_width=32, sample_height=32, sample_frames=9, temporal_compression_ratio=4,
    )
    if version == "1.0":
        transformer = CogVideoXTransformer3DModel(**common, use_rotary_positional_embeddings=rotary)
        scheduler = CogVideoXDDIMScheduler(
            beta_schedule="scaled_linear", prediction_type="v_prediction", rescale_betas_zero_snr=True,
            timestep_spacing="trailing", snr_shift_scale=3.0,
        )
    else:
        transformer = CogVideoXTransformer3DModel(
            **common, patch_size_t=2, patch_bias=False, use_rotary_positional_embeddings=True,
        )
        scheduler = CogVideoXDPMScheduler(
            beta_schedule="scaled_linear", prediction_type="v_prediction", rescale_betas_zero_snr=True,
            timestep_spacing="trailing", snr_shift_scale=1.0,
        )
    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def cogvideox_call_kwargs(batch: int = 1, frames: int = 9, height: int = 64, width: int = 64, steps: int = 3,
                          seed: int = 0, guidance_scale: float = 6.0):
    generator = torch.Generator().manual_seed(seed)
    embeds = torch.randn(batch, TEXT_TOKENS, TEXT_DIM, generator=generator)
    negative = torch.randn(batch, TEXT_TOKENS, TEXT_DIM, generator=generator)
    return dict(
        prompt_embeds=embeds, negative_prompt_embeds=negative, num_frames=frames, height=height, width=width,
        num_inference_steps=steps, guidance_scale=guidance_scale, output_type="latent",
        generator=torch.Generator().manual_seed(seed + 1),
    )
