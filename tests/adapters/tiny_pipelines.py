"""Tiny, randomly initialised diffusers pipelines built offline from configs (test fixtures)."""

from __future__ import annotations

import torch


def tiny_wan_pipeline(num_layers: int = 2, seed: int = 0):
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    torch.manual_seed(seed)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=32, ffn_dim=32, num_layers=num_layers, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=5.0)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=scheduler, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def wan_call_kwargs(batch: int = 1, frames: int = 9, height: int = 64, width: int = 64, steps: int = 3, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    embeds = torch.randn(batch, 8, 32, generator=generator)
    negative = torch.randn(batch, 8, 32, generator=generator)
    return dict(
        prompt_embeds=embeds, negative_prompt_embeds=negative, num_frames=frames, height=height, width=width,
        num_inference_steps=steps, guidance_scale=5.0, output_type="latent",
        generator=torch.Generator().manual_seed(seed + 1),
    )
