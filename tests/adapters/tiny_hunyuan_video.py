"""A tiny, randomly initialised HunyuanVideo pipeline built offline from configs (test fixture).

No text encoders or tokenizers: prompts go in as ``prompt_embeds`` (Llama hidden states),
``pooled_prompt_embeds`` (CLIP pooled output) and ``prompt_attention_mask`` (the padding of the
Llama prompt, valid tokens first as the tokenizer pads them).
"""

from __future__ import annotations

import torch

TEXT_TOKENS = 8
TEXT_DIM = 32
POOLED_DIM = 16


def tiny_hunyuan_video_pipeline(num_layers: int = 1, num_single_layers: int = 1, seed: int = 0):
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoPipeline,
        HunyuanVideoTransformer3DModel,
    )

    torch.manual_seed(seed)
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=num_layers,
        num_single_layers=num_single_layers, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1,
        text_embed_dim=TEXT_DIM, pooled_projection_dim=POOLED_DIM, rope_axes_dim=(4, 6, 6), guidance_embeds=True,
    )
    vae = AutoencoderKLHunyuanVideo(
        in_channels=3, out_channels=3, latent_channels=4, down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        norm_num_groups=4, spatial_compression_ratio=8, temporal_compression_ratio=4,
    )
    pipe = HunyuanVideoPipeline(
        text_encoder=None, tokenizer=None, transformer=transformer, vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=None, tokenizer_2=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def prompt_mask(valid: list[int]) -> torch.Tensor:
    """``[B, TEXT_TOKENS]`` float mask with ``valid[b]`` leading ones (as the tokenizer pads)."""
    mask = torch.zeros(len(valid), TEXT_TOKENS)
    for row, count in enumerate(valid):
        mask[row, :count] = 1
    return mask


def hunyuan_video_call_kwargs(
    valid: tuple[int, ...] = (5,),
    negative_valid: tuple[int, ...] | None = (8,),
    frames: int = 9,
    height: int = 64,
    width: int = 64,
    steps: int = 3,
    seed: int = 0,
):
    """Call arguments for one prompt per entry of ``valid`` (its count of unpadded text tokens).

    ``negative_valid`` adds negative prompts and true CFG (HunyuanVideo runs the negative prompt as
    a second transformer call per step); None runs without it.
    """
    generator = torch.Generator().manual_seed(seed)
    batch = len(valid)
    kwargs = dict(
        prompt_embeds=torch.randn(batch, TEXT_TOKENS, TEXT_DIM, generator=generator),
        pooled_prompt_embeds=torch.randn(batch, POOLED_DIM, generator=generator),
        prompt_attention_mask=prompt_mask(list(valid)),
        num_frames=frames, height=height, width=width, num_inference_steps=steps, guidance_scale=6.0,
        output_type="latent", generator=torch.Generator().manual_seed(seed + 1),
    )
    if negative_valid is not None:
        kwargs.update(
            negative_prompt_embeds=torch.randn(batch, TEXT_TOKENS, TEXT_DIM, generator=generator),
            negative_pooled_prompt_embeds=torch.randn(batch, POOLED_DIM, generator=generator),
            negative_prompt_attention_mask=prompt_mask(list(negative_valid)),
            true_cfg_scale=3.0,
        )
    return kwargs
