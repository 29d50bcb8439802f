"""A tiny, randomly initialised Mochi pipeline built offline from configs (test fixture).

No text encoder or tokenizer: prompts go in as ``prompt_embeds`` (T5 hidden states) with their
``prompt_attention_mask``. No VAE either (Mochi's VAE needs 32-channel group norms, far from tiny):
the tests ask for ``output_type="latent"``.
"""

from __future__ import annotations

import torch

TEXT_TOKENS = 8
TEXT_DIM = 32


def tiny_mochi_pipeline(num_layers: int = 2, seed: int = 0, in_channels: int = 4):
    from diffusers import FlowMatchEulerDiscreteScheduler, MochiPipeline, MochiTransformer3DModel

    torch.manual_seed(seed)
    transformer = MochiTransformer3DModel(
        patch_size=2, num_attention_heads=2, attention_head_dim=16, num_layers=num_layers, pooled_projection_dim=16,
        in_channels=in_channels, text_embed_dim=TEXT_DIM, time_embed_dim=4, max_sequence_length=TEXT_TOKENS,
    )
    # Mochi initialises its rotary frequencies to 0 (rotation = identity); random ones exercise the rotary.
    with torch.no_grad():
        transformer.pos_frequencies.normal_(std=0.1)
    pipe = MochiPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def prompt_mask(valid: list[int]) -> torch.Tensor:
    """``[B, TEXT_TOKENS]`` int mask with ``valid[b]`` leading ones (as the T5 tokenizer pads)."""
    mask = torch.zeros(len(valid), TEXT_TOKENS, dtype=torch.long)
    for row, count in enumerate(valid):
        mask[row, :count] = 1
    return mask


def mochi_call_kwargs(
    valid: tuple[int, ...] = (5,),
    negative_valid: tuple[int, ...] | None = (8,),
    frames: int = 13,
    height: int = 64,
    width: int = 64,
    steps: int = 3,
    seed: int = 0,
):
    """Call arguments for one prompt per entry of ``valid`` (its count of unpadded text tokens).

    With ``negative_valid`` the pipeline runs batched CFG: one transformer call per step on
    ``[negative prompts, prompts]``; None runs without guidance. 13 frames -> 3 latent frames,
    64 px -> 8 latent -> 4 tokens per side. Mochi's sigma schedule needs ``steps >= 2``.
    """
    generator = torch.Generator().manual_seed(seed)
    batch = len(valid)
    kwargs = dict(
        prompt_embeds=torch.randn(batch, TEXT_TOKENS, TEXT_DIM, generator=generator),
        prompt_attention_mask=prompt_mask(list(valid)),
        num_frames=frames, height=height, width=width, num_inference_steps=steps, output_type="latent",
        generator=torch.Generator().manual_seed(seed + 1),
    )
    if negative_valid is None:
        kwargs.update(guidance_scale=1.0)
    else:
        kwargs.update(
            negative_prompt_embeds=torch.randn(batch, TEXT_TOKENS, TEXT_DIM, generator=generator),
            negative_prompt_attention_mask=prompt_mask(list(negative_valid)),
            guidance_scale=4.5,
        )
    return kwargs
