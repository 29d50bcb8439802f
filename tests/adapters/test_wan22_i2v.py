"""Wan adapter on Wan 2.2 A14B-style pipelines (two transformers swapped at ``boundary_ratio``) and
on image-to-video pipelines (2.1 I2V with image cross-attention, 2.2 I2V A14B, 2.2 TI2V with
per-token timesteps): both transformers sparsified with their own state, the step index right
across the swap, the self-attention grid unchanged by I2V's extra conditioning channels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffattn import Dense, Neighborhood, VideoGrid
from diffattn.adapters import apply, remove, sparsity_state
from diffattn.processors import SparsityConfig, WanSparseAttnProcessor

from .reference import masked_attention

# 9 frames -> 3 latent frames; 64 px / 8 (VAE) / 2 (patch) = 4 tokens per side.
GRID = VideoGrid(3, 4, 4)
# shift=5, 4 steps: timesteps [1000, 909.7, 717.3, 24.4]; boundary 0.8 * 1000 = 800 puts steps 0-1
# on ``transformer`` (high noise) and steps 2-3 on ``transformer_2`` (low noise).
BOUNDARY = 0.8


def tiny_wan_vae():
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True])


def tiny_wan_transformer(in_channels: int = 16, image_dim: int | None = None):
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=in_channels,
        out_channels=16, text_dim=32, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32, image_dim=image_dim,
        added_kv_proj_dim=None if image_dim is None else 32,  # I2V: attn2 gets add_k_proj/add_v_proj
    )


def tiny_wan22_pipeline(seed: int = 0):
    """WanPipeline with two transformers (different weights) and a boundary, as Wan 2.2 A14B T2V."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    torch.manual_seed(seed)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=tiny_wan_vae(),
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0), transformer=tiny_wan_transformer(),
                       transformer_2=tiny_wan_transformer(), boundary_ratio=BOUNDARY)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_wan_i2v_pipeline(variant: str, seed: int = 0):
    """WanImageToVideoPipeline: ``"2.1"`` (CLIP image tokens into attn2, latents + mask + condition =
    36 input channels), ``"2.2-a14b"`` (two transformers, 36 channels, no image encoder) or
    ``"2.2-ti2v"`` (``expand_timesteps``: first frame blended in, per-token timesteps)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline

    torch.manual_seed(seed)
    kwargs: dict = dict(tokenizer=None, text_encoder=None, vae=tiny_wan_vae(),
                        scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0))
    if variant == "2.1":
        from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

        encoder = CLIPVisionModel(CLIPVisionConfig(hidden_size=24, intermediate_size=32, num_hidden_layers=2,
                                                   num_attention_heads=2, image_size=32, patch_size=8))
        processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        kwargs.update(image_encoder=encoder, image_processor=processor,
                      transformer=tiny_wan_transformer(in_channels=36, image_dim=24))
    elif variant == "2.2-a14b":
        kwargs.update(transformer=tiny_wan_transformer(in_channels=36),
                      transformer_2=tiny_wan_transformer(in_channels=36), boundary_ratio=BOUNDARY)
    elif variant == "2.2-ti2v":
        kwargs.update(transformer=tiny_wan_transformer(), expand_timesteps=True)
    else:
        raise ValueError(f"variant must be one of 2.1, 2.2-a14b, 2.2-ti2v; got {variant!r}")
    pipe = WanImageToVideoPipeline(**kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call_kwargs(batch: int = 1, steps: int = 4, text_tokens: int = 8, seed: int = 0, **extra):
    generator = torch.Generator().manual_seed(seed)
    return dict(
        prompt_embeds=torch.randn(batch, text_tokens, 32, generator=generator),
        negative_prompt_embeds=torch.randn(batch, text_tokens, 32, generator=generator),
        num_frames=9, height=64, width=64, num_inference_steps=steps, guidance_scale=5.0, output_type="latent",
        generator=torch.Generator().manual_seed(seed + 1), **extra,
    )


def conditioning_image(seed: int = 3):
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def i2v_call_kwargs(variant: str, steps: int = 2, **extra):
    # Wan 2.1 I2V's attn2 takes the last 512 context tokens as text (hard-coded in diffusers).
    return call_kwargs(steps=steps, text_tokens=512 if variant == "2.1" else 8, image=conditioning_image(), **extra)



@pytest.fixture(scope="module")
def wan22():
    return tiny_wan22_pipeline()


def steps_per_transformer(pipe, run) -> dict[str, list[int]]:
    """Which scheduler steps each transformer actually ran (a counting pre-hook, stock pipeline)."""
    seen: dict[str, list[int]] = {"transformer": [], "transformer_2": []}
    handles = [
        getattr(pipe, name).register_forward_pre_hook(
            lambda *_, name=name: seen[name].append(pipe.scheduler.step_index or 0))
        for name in seen
    ]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return {name: sorted(set(steps)) for name, steps in seen.items()}


def test_wan22_both_transformers_get_their_own_processors_and_state(wan22):
    stock = {name: dict(getattr(wan22, name).attn_processors) for name in ("transformer", "transformer_2")}
    apply(wan22, Neighborhood(kernel_size=(3, 3, 3)), block_size=32)
    try:
        first, second = sparsity_state(wan22, "transformer"), sparsity_state(wan22, "transformer_2")
        assert first is not None and second is not None and first is not second
        assert first.config == second.config and first.scheduler is second.scheduler is wan22.scheduler
        for name, state in (("transformer", first), ("transformer_2", second)):
            transformer = getattr(wan22, name)
            for i, block in enumerate(transformer.blocks):
                assert isinstance(block.attn1.processor, WanSparseAttnProcessor)
                assert block.attn1.processor.state is state  # each transformer's layers read its own state
                assert block.attn2.processor is stock[name][f"blocks.{i}.attn2.processor"]
    finally:
        remove(wan22)
    for name in stock:
        assert getattr(wan22, name).attn_processors == stock[name]
        assert not getattr(wan22, name)._forward_pre_hooks


def test_wan22_dense_pattern_reproduces_the_stock_pipeline_across_the_swap(wan22):
    stock = wan22(**call_kwargs()).frames
    assert steps_per_transformer(wan22, lambda: wan22(**call_kwargs(steps=4))) == \
        {"transformer": [0, 1], "transformer_2": [2, 3]}  # the swap really happens mid-run
    apply(wan22, SparsityConfig(pattern=Dense(), block_size=32))
    try:
        latents = wan22(**call_kwargs()).frames
        first = sparsity_state(wan22, "transformer").sparse_calls
        second = sparsity_state(wan22, "transformer_2").sparse_calls
    finally:
        remove(wan22)
    torch.testing.assert_close(latents, stock, atol=1e-5, rtol=1e-5)
    # Each transformer's state counts only its own calls, under the pipeline-wide step index.
    assert {step for step, _ in first} == {0, 1} and {step for step, _ in second} == {2, 3}


def test_wan22_step_index_stays_right_across_the_swap(wan22):
    config = SparsityConfig(pattern=Neighborhood(kernel_size=(1, 3, 3)), dense_steps=1, dense_last_steps=1,
                            block_size=32)
    apply(wan22, config)
    try:
        wan22(**call_kwargs(steps=4))
        first = dict(sparsity_state(wan22, "transformer").sparse_calls)
        second = dict(sparsity_state(wan22, "transformer_2").sparse_calls)
    finally:
        remove(wan22)
    # Step 0 (warm-up) and step 3 (last of the whole run, not of transformer_2's share) are dense;
    # (cond, uncond) = 2 calls per layer and step.
    assert first == {(1, 0): 2, (1, 1): 2}
    assert second == {(2, 0): 2, (2, 1): 2}


def test_wan22_sparse_calls_equal_masked_attention_in_both_transformers(wan22, recorded):
    pattern = Neighborhood(kernel_size=(3, 3, 3))
    apply(wan22, pattern, block_size=32)
    try:
        wan22(**call_kwargs(batch=2))
    finally:
        remove(wan22)
    assert len(recorded) == 4 * 2 * 2  # steps x (cond, uncond) x layers, over both transformers
    mask = pattern.token_mask(GRID)
    for q, k, v, layout, out in recorded:
        assert q.shape[0] == 2 and layout.num_tokens == GRID.num_tokens
        torch.testing.assert_close(out.double(), masked_attention(q, k, v, mask), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["2.1", "2.2-a14b", "2.2-ti2v"])
def test_image_to_video_dense_is_stock_and_sparse_calls_use_the_video_grid(variant, recorded):
    pipe = tiny_wan_i2v_pipeline(variant)
    stock = pipe(**i2v_call_kwargs(variant)).frames
    apply(pipe, SparsityConfig(pattern=Dense(), block_size=32))
    try:
        dense = pipe(**i2v_call_kwargs(variant)).frames
        if variant == "2.1":  # attn2 mixes in the CLIP image tokens (add_k_proj): never ours
            for block in pipe.transformer.blocks:
                assert block.attn2.add_k_proj is not None and not isinstance(block.attn2.processor,
                                                                             WanSparseAttnProcessor)
                assert block.attn1.add_k_proj is None and isinstance(block.attn1.processor, WanSparseAttnProcessor)
    finally:
        remove(pipe)
    torch.testing.assert_close(dense, stock, atol=1e-5, rtol=1e-5)
    # I2V concatenates mask + condition latents along channels (36 in) or blends the first frame
    # (TI2V): the self-attention sequence is still the F x H x W video grid, nothing more.
    assert recorded and all(layout.num_tokens == GRID.num_tokens for *_, layout, _ in recorded)

    recorded.clear()
    pattern = Neighborhood(kernel_size=(3, 3, 3))
    apply(pipe, SparsityConfig(pattern=pattern, dense_steps=1, block_size=32))
    try:
        sparse = pipe(**i2v_call_kwargs(variant)).frames
        steps = {name: {step for step, _ in sparsity_state(pipe, name).sparse_calls}
                 for name in ("transformer", "transformer_2") if sparsity_state(pipe, name) is not None}
    finally:
        remove(pipe)
    assert not torch.allclose(sparse, stock)
    # 2 steps, step 0 dense warm-up. A14B (boundary 800, timesteps [1000, 24.4]): step 1 on transformer_2.
    assert steps == ({"transformer": set(), "transformer_2": {1}} if variant == "2.2-a14b" else {"transformer": {1}})
    mask = pattern.token_mask(GRID)
    for q, k, v, _, out in recorded:
        torch.testing.assert_close(out.double(), masked_attention(q, k, v, mask), atol=1e-5, rtol=1e-5)


def test_first_and_last_frame_conditioning_keeps_the_grid(recorded):
    """FLF2V (``last_image``) conditions on a second image: still no extra frames in attn1."""
    pipe = tiny_wan_i2v_pipeline("2.2-a14b")
    apply(pipe, Dense(), block_size=32)
    try:
        pipe(**i2v_call_kwargs("2.2-a14b", last_image=conditioning_image(seed=4)))
    finally:
        remove(pipe)
    assert recorded and all(layout.num_tokens == GRID.num_tokens for *_, layout, _ in recorded)
