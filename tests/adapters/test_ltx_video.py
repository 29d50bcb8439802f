"""LTX-Video adapter on a tiny random pipeline: stock equivalence, exact sparse calls, grid from the
forward's size arguments, warm-up, layers, resolutions, batch and CFG, LoRA, image-to-video,
remove()."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

from diffattn import Dense, Neighborhood, Radial, VideoGrid
from diffattn.adapters import DenseFallbackWarning, apply, find_adapter, remove, sparsity_state
from diffattn.adapters.ltx_video import LTXVideoAdapter
from diffattn.processors import LTXVideoSparseAttnProcessor, SparsityConfig, SparsityState

from .lora import add_and_save_random_lora, load_lora_around_apply
from .reference import masked_attention

# 9 frames -> (9 - 1) // 4 + 1 = 3 latent frames; 32 px / 4 (tiny VAE) / 1 (patch) = 8 tokens.
GRID = VideoGrid(3, 8, 8)


def tiny_ltx_vae():
    from diffusers import AutoencoderKLLTXVideo

    # Two spatio-temporal downsamplings: 4x spatial and 4x temporal compression, 8 latent channels.
    return AutoencoderKLLTXVideo(
        in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1), spatio_temporal_scaling=(True, True, False, False),
        decoder_spatio_temporal_scaling=(True, True, False, False), decoder_inject_noise=(False,) * 5,
        upsample_residual=(False,) * 4, upsample_factor=(1,) * 4, timestep_conditioning=False,
        patch_size=1, patch_size_t=1, encoder_causal=True, decoder_causal=False,
    )


def tiny_ltx_transformer(num_layers: int = 2):
    from diffusers import LTXVideoTransformer3DModel

    # inner dim 32: the rotary embedding's 32 % 6 = 2 padding channels are exercised too.
    return LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=16,
        cross_attention_dim=32, num_layers=num_layers, caption_channels=32,
    )


def tiny_ltx_pipeline(num_layers: int = 2, seed: int = 0, image_to_video: bool = False):
    from diffusers import FlowMatchEulerDiscreteScheduler, LTXImageToVideoPipeline, LTXPipeline

    torch.manual_seed(seed)
    vae = tiny_ltx_vae()
    transformer = tiny_ltx_transformer(num_layers)
    cls = LTXImageToVideoPipeline if image_to_video else LTXPipeline
    pipe = cls(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
               transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def ltx_call_kwargs(batch: int = 1, frames: int = 9, height: int = 32, width: int = 32, steps: int = 3,
                    seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    embeds = torch.randn(batch, 8, 32, generator=generator)
    negative = torch.randn(batch, 8, 32, generator=generator)
    mask = torch.ones(batch, 8, dtype=torch.long)
    mask[:, 6:] = 0  # padded prompt: the cross-attention mask is in play (and must stay stock)
    return dict(
        prompt_embeds=embeds, prompt_attention_mask=mask, negative_prompt_embeds=negative,
        negative_prompt_attention_mask=torch.ones(batch, 8, dtype=torch.long), num_frames=frames, height=height,
        width=width, num_inference_steps=steps, guidance_scale=3.0, output_type="latent",
        generator=torch.Generator().manual_seed(seed + 1),
    )



@pytest.fixture(scope="module")
def pipe():
    return tiny_ltx_pipeline()


@pytest.fixture(scope="module")
def stock_latents(pipe):
    remove(pipe)
    return pipe(**ltx_call_kwargs()).frames


def test_adapter_is_found_for_ltx_pipelines(pipe):
    assert isinstance(find_adapter(pipe), LTXVideoAdapter)


def test_dense_pattern_reproduces_the_stock_pipeline(pipe, stock_latents):
    apply(pipe, SparsityConfig(pattern=Dense(), block_size=32))
    try:
        latents = pipe(**ltx_call_kwargs()).frames
        assert sum(sparsity_state(pipe).sparse_calls.values()) == 3 * 2  # steps x layers (CFG batched)
    finally:
        remove(pipe)
    torch.testing.assert_close(latents, stock_latents, atol=1e-5, rtol=1e-5)


def test_sparse_calls_equal_masked_attention_and_remove_restores_stock(pipe, stock_latents, recorded):
    pattern = Neighborhood(kernel_size=(3, 3, 3))
    stock = dict(pipe.transformer.attn_processors)
    apply(pipe, pattern, block_size=32)
    latents = pipe(**ltx_call_kwargs()).frames
    assert not torch.allclose(latents, stock_latents)  # the pattern really changed something
    mask = pattern.token_mask(GRID)
    assert len(recorded) == 3 * 2  # steps x layers; LTX batches (uncond, cond) into one call
    for q, k, v, layout, out in recorded:
        assert q.shape[0] == 2 and layout.num_tokens == GRID.num_tokens
        torch.testing.assert_close(out.double(), masked_attention(q, k, v, mask), atol=1e-5, rtol=1e-5)
    remove(pipe)
    assert pipe.transformer.attn_processors == stock
    assert not pipe.transformer._forward_pre_hooks
    torch.testing.assert_close(pipe(**ltx_call_kwargs()).frames, stock_latents, atol=0, rtol=0)


def test_sparse_processor_matches_stock_math_with_rotary_and_a_full_mask():
    """One attn1 layer called directly: our q/k/v, norms and rotary path equals the stock processor
    when the pattern's mask is full (the kernel then computes plain softmax attention)."""
    torch.manual_seed(0)
    transformer = tiny_ltx_transformer(num_layers=1)
    attn = transformer.transformer_blocks[0].attn1
    stock = attn.processor
    grid = VideoGrid(2, 3, 5)  # 30 tokens: not a block multiple
    hidden = torch.randn(2, grid.num_tokens, 32)
    rotary = transformer.rope(hidden, grid.frames, grid.height, grid.width, (0.16, 4, 4))
    state = SparsityState(SparsityConfig(pattern=Dense(), block_size=32))
    state.begin_call(grid, None)
    ours = LTXVideoSparseAttnProcessor(stock, state, 0)
    expected = stock(attn, hidden, None, None, rotary)
    torch.testing.assert_close(ours(attn, hidden, None, None, rotary), expected, atol=1e-5, rtol=1e-5)
    assert state.sparse_calls[(None, 0)] == 1


def test_grid_comes_from_the_size_arguments_and_odd_calls_stay_dense():
    adapter = LTXVideoAdapter()
    transformer = tiny_ltx_transformer(num_layers=1)
    hidden = torch.zeros(1, 3 * 4 * 6, 8)
    assert adapter.grid_from_call(transformer, (), dict(hidden_states=hidden, num_frames=3, height=4, width=6)) \
        == VideoGrid(3, 4, 6)
    # Positional call (hidden_states, encoder_hidden_states, timestep, mask, num_frames, height, width).
    assert adapter.grid_from_call(transformer, (hidden, None, None, None, 3, 4, 6), {}) == VideoGrid(3, 4, 6)
    # Sizes that do not describe the sequence, missing sizes, explicit video_coords: no grid (dense).
    assert adapter.grid_from_call(transformer, (), dict(hidden_states=hidden, num_frames=3, height=4, width=4)) \
        is None
    assert adapter.grid_from_call(transformer, (), dict(hidden_states=hidden)) is None
    coords = torch.zeros(1, 3, hidden.shape[1])
    assert adapter.grid_from_call(
        transformer, (), dict(hidden_states=hidden, num_frames=3, height=4, width=6, video_coords=coords)
    ) is None


def test_a_call_without_a_grid_warns_once_and_matches_stock(pipe):
    """LTXConditionPipeline passes explicit video_coords: that call is dense, and the user hears so."""
    generator = torch.Generator().manual_seed(3)
    t, h, w = torch.meshgrid(torch.arange(GRID.frames), torch.arange(GRID.height), torch.arange(GRID.width),
                             indexing="ij")
    forward = dict(
        hidden_states=torch.randn(1, GRID.video_tokens, 8, generator=generator),
        encoder_hidden_states=torch.randn(1, 8, 32, generator=generator), timestep=torch.tensor([500]),
        encoder_attention_mask=torch.ones(1, 8), num_frames=GRID.frames, height=GRID.height, width=GRID.width,
        video_coords=torch.stack([t, h, w]).flatten(1)[None].float(), return_dict=False,
    )
    stock = pipe.transformer(**forward)[0]
    apply(pipe, Radial(block_size=32), block_size=32)
    try:
        with pytest.warns(DenseFallbackWarning, match="video_coords"):
            first = pipe.transformer(**forward)[0]
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            second = pipe.transformer(**forward)[0]
        assert not sparsity_state(pipe).sparse_calls
    finally:
        remove(pipe)
    torch.testing.assert_close(first, stock, atol=0, rtol=0)
    torch.testing.assert_close(second, stock, atol=0, rtol=0)


def test_a_pipeline_call_with_a_grid_does_not_warn(pipe):
    apply(pipe, Radial(block_size=32), block_size=32)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", DenseFallbackWarning)
            pipe(**ltx_call_kwargs(steps=2))
        assert sparsity_state(pipe).sparse_calls
    finally:
        remove(pipe)


def test_calls_without_a_grid_run_the_stock_path(pipe, stock_latents):
    """A forward whose sizes do not match its sequence publishes no grid: every layer is stock."""
    apply(pipe, Neighborhood(kernel_size=(1, 3, 3)), block_size=32)
    try:
        state = sparsity_state(pipe)
        state.begin_call(None, None)
        hidden = torch.randn(1, GRID.num_tokens, 32)
        attn = pipe.transformer.transformer_blocks[0].attn1
        rotary = pipe.transformer.rope(hidden, GRID.frames, GRID.height, GRID.width)
        expected = attn.processor.stock(attn, hidden, None, None, rotary)
        torch.testing.assert_close(attn.processor(attn, hidden, None, None, rotary), expected, atol=0, rtol=0)
        assert not state.sparse_calls
    finally:
        remove(pipe)


def test_dense_warm_up_steps_last_steps_and_layers_are_honoured(pipe):
    config = SparsityConfig(pattern=Radial(block_size=32), dense_steps=1, dense_last_steps=1, dense_layers=(-1,),
                            block_size=32)
    apply(pipe, config)
    try:
        pipe(**ltx_call_kwargs(steps=4))
        calls = sparsity_state(pipe).sparse_calls
    finally:
        remove(pipe)
    # 4 steps: step 0 (warm-up) and step 3 (last) dense; layer 1 (= -1) always dense; CFG batched: 1 call.
    assert dict(calls) == {(1, 0): 1, (2, 0): 1}


def test_dense_layers_by_name_filter(pipe):
    apply(pipe, SparsityConfig(pattern=Dense(), dense_layers=("transformer_blocks.0.*",), block_size=32))
    try:
        pipe(**ltx_call_kwargs(steps=2))
        layers = {layer for _, layer in sparsity_state(pipe).sparse_calls}
    finally:
        remove(pipe)
    assert layers == {1}


def test_two_resolutions_use_two_layouts(pipe, recorded):
    apply(pipe, SparsityConfig(pattern=Neighborhood(kernel_size=(3, 3, 3)), block_size=32))
    try:
        pipe(**ltx_call_kwargs(steps=1, height=32, width=32))
        pipe(**ltx_call_kwargs(steps=1, height=32, width=64, frames=13))  # the pipeline wants multiples of 32 px
    finally:
        remove(pipe)
    sizes = sorted({layout.num_tokens for *_, layout, _ in recorded})
    assert sizes == [3 * 8 * 8, 4 * 8 * 16]


def test_batch_of_two_prompts_with_cfg(pipe, recorded):
    pattern = Neighborhood(kernel_size=(1, 3, 3))
    apply(pipe, pattern, block_size=32)
    try:
        latents = pipe(**ltx_call_kwargs(batch=2, steps=2)).frames
    finally:
        remove(pipe)
    assert latents.shape[0] == 2 and torch.isfinite(latents).all()
    mask = pattern.token_mask(GRID)
    assert recorded and all(q.shape[0] == 4 for q, *_ in recorded)  # 2 prompts x (uncond, cond)
    for q, k, v, _, out in recorded:
        torch.testing.assert_close(out.double(), masked_attention(q, k, v, mask), atol=1e-5, rtol=1e-5)


def test_applying_twice_replaces_instead_of_stacking(pipe):
    apply(pipe, Dense(), block_size=32)
    apply(pipe, Radial(block_size=32), block_size=32)
    try:
        processor = pipe.transformer.transformer_blocks[0].attn1.processor
        assert type(processor.stock).__name__ == "LTXVideoAttnProcessor"  # wraps the stock one, not ours
        assert len(pipe.transformer._forward_pre_hooks) == 1
        assert isinstance(sparsity_state(pipe).config.pattern, Radial)
    finally:
        remove(pipe)


def test_cross_attention_keeps_its_stock_processor(pipe):
    stock = pipe.transformer.transformer_blocks[0].attn2.processor
    apply(pipe, Dense(), block_size=32)
    try:
        assert pipe.transformer.transformer_blocks[0].attn2.processor is stock
        processors = [pipe.transformer.transformer_blocks[i].attn1.processor for i in range(2)]
        assert processors[0] is not processors[1]  # per-layer objects, never one shared instance
        assert all(isinstance(p, LTXVideoSparseAttnProcessor) for p in processors)
    finally:
        remove(pipe)


def test_image_to_video_pipeline_is_sparsified_with_per_token_timesteps(recorded):
    """LTXImageToVideoPipeline passes a per-token timestep [B, N] (first frame clean); the grid and
    the step index must still be right."""
    pipe = tiny_ltx_pipeline(image_to_video=True)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    pattern = Neighborhood(kernel_size=(3, 3, 3))
    stock_latents = pipe(image=image, **ltx_call_kwargs(steps=2)).frames
    apply(pipe, SparsityConfig(pattern=pattern, dense_steps=1, block_size=32))
    try:
        latents = pipe(image=image, **ltx_call_kwargs(steps=2)).frames
        calls = dict(sparsity_state(pipe).sparse_calls)
    finally:
        remove(pipe)
    assert calls == {(1, 0): 1, (1, 1): 1}  # step 0 dense warm-up, step 1 sparse in both layers
    assert not torch.allclose(latents, stock_latents)
    mask = pattern.token_mask(GRID)
    for q, k, v, _, out in recorded:
        torch.testing.assert_close(out.double(), masked_attention(q, k, v, mask), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("order", ["lora_then_apply", "apply_then_lora"])
def test_lora_loaded_before_or_after_apply_is_used(order, tmp_path):
    reference = tiny_ltx_pipeline()
    lora_dir = add_and_save_random_lora(reference, tmp_path / "lora")
    expected = reference(**ltx_call_kwargs(steps=2)).frames  # stock processors + LoRA

    pipe = tiny_ltx_pipeline()
    without_lora = pipe(**ltx_call_kwargs(steps=2)).frames
    load_lora_around_apply(pipe, lora_dir, order)
    latents = pipe(**ltx_call_kwargs(steps=2)).frames
    assert sum(sparsity_state(pipe).sparse_calls.values()) > 0  # our processors ran
    assert not torch.allclose(latents, without_lora, atol=1e-4)
    torch.testing.assert_close(latents, expected, atol=1e-4, rtol=1e-4)


def test_torch_compile_fullgraph_matches_eager_with_one_graph_per_kind_of_step():
    """A compiled LTX transformer: the sparse calls are traced (no graph break), one graph for the
    dense warm-up step and one for the sparse steps, the eager latents and sparse-call counts."""
    pipe = tiny_ltx_pipeline()
    apply(pipe, SparsityConfig(pattern=Neighborhood(kernel_size=(3, 3, 3)), block_size=32, dense_steps=1))
    eager = pipe(**ltx_call_kwargs()).frames
    state = sparsity_state(pipe)
    eager_calls = dict(state.sparse_calls)
    assert eager_calls == {(step, layer): 1 for step in (1, 2) for layer in (0, 1)}
    state.sparse_calls.clear()
    torch._dynamo.reset()
    counters.clear()
    counter = CompileCounterWithBackend("aot_eager")
    try:
        pipe.transformer = torch.compile(pipe.transformer, backend=counter, fullgraph=True)
        torch.testing.assert_close(pipe(**ltx_call_kwargs()).frames, eager, atol=1e-5, rtol=1e-5)
        assert counter.frame_count == 2 and not sum(counters["graph_break"].values())
        assert dict(state.sparse_calls) == eager_calls
    finally:
        torch._dynamo.reset()
