"""The temporary default model: a small, RANDOMLY INITIALISED Wan-architecture pipeline.

It is built offline from a config (no download) so that ``diffattn generate`` runs anywhere on a
CPU. Its weights are random, so it produces noise; it stands in until the embedded trained default
model lands (see DESIGN.md). It has no text encoder: prompts become deterministic pseudo-random
embeddings derived from the prompt text (:func:`prompt_embeddings`).
"""

from __future__ import annotations

import hashlib

import torch

#: Width of the default transformer's text embeddings.
TEXT_DIM = 32
#: Tokens per derived prompt embedding.
TEXT_TOKENS = 16
#: Spatial size of one latent token in pixels (VAE 8x, patch 2x) and the temporal VAE factor.
PIXELS_PER_TOKEN = 16
FRAMES_PER_LATENT = 4
#: Call defaults for the default model (small, so a CPU run takes seconds).
DEFAULT_CALL = dict(num_frames=17, height=128, width=128, num_inference_steps=20, guidance_scale=5.0)


def default_pipeline(seed: int = 0):
    """A small random WanPipeline (2 blocks, 2 heads of 32) built from a config; no network."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        vae = AutoencoderKLWan(
            base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
        )
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=16, out_channels=16,
            text_dim=TEXT_DIM, freq_dim=32, ffn_dim=128, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=64,
        )
    finally:
        torch.random.set_rng_state(state)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=5.0)
    return WanPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=scheduler, transformer=transformer)


def prompt_embeddings(text: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[1, TEXT_TOKENS, TEXT_DIM]`` embeddings drawn from a generator seeded by the SHA-256 of
    ``text``: the same prompt always gives the same embeddings (there is no text encoder)."""
    seed = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little") & ((1 << 63) - 1)
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(1, TEXT_TOKENS, TEXT_DIM, generator=generator).to(dtype)


def check_call(num_frames: int, height: int, width: int) -> None:
    """ValueError unless the default model accepts this size."""
    if num_frames < 1 or (num_frames - 1) % FRAMES_PER_LATENT:
        raise ValueError(f"--num-frames must be 1 + 4k (1, 5, 9, 13, 17, ...) for a Wan model; got {num_frames}")
    for name, value in (("--height", height), ("--width", width)):
        if value < PIXELS_PER_TOKEN or value % PIXELS_PER_TOKEN:
            raise ValueError(f"{name} must be a positive multiple of {PIXELS_PER_TOKEN} for the default model; got {value}")


def latent_grid(num_frames: int, height: int, width: int):
    """The transformer's token grid for a call of the default model."""
    from ..patterns import VideoGrid

    return VideoGrid((num_frames - 1) // FRAMES_PER_LATENT + 1, height // PIXELS_PER_TOKEN, width // PIXELS_PER_TOKEN)
