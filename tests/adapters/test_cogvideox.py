"""CogVideoX 1.0 (rotary and sinusoidal) and 1.5 adapters on tiny random pipelines: stock
equivalence, exact sparse calls and processor outputs, 1.5's frame padding, warm-up, layers,
resolutions, batch and CFG, fused QKV, LoRA, remove()."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from diffattn import Dense, Neighborhood, Radial, VideoGrid
from diffattn.adapters import apply, find_adapter, remove, sparsity_state
from diffattn.adapters.cogvideox import CogVideoXAdapter
from diffattn.processors import CogVideoXSparseAttnProcessor, SparsityConfig

from .lora import add_and_save_random_lora, load_lora_around_apply
from .reference import masked_attention
from .tiny_cogvideox import TEXT_TOKENS, cogvideox_call_kwargs, tiny_cogvideox_pipeline

VARIANTS = {"1.0-rotary": ("1.0", True), "1.0-sincos": ("1.0", False), "1.5": ("1.5", True)}
PATTERN = Neighborhood(kernel_size=(2, 3, 3))



def expected_grid(version: str, frames: int = 9, height: int = 64, width: int = 64) -> VideoGrid:
    """The token grid, computed from the pipeline arguments the way CogVideoX does."""
    latent_frames = (frames - 1) // 4 + 1
    if version == "1.5":
        latent_frames += latent_frames % 2  # the 1.5 pipeline pads to a multiple of patch_size_t = 2
        latent_frames //= 2
    return VideoGrid(latent_frames, height // 16, width // 16, text_tokens=TEXT_TOKENS, text_position="start")


@pytest.fixture(scope="module", params=list(VARIANTS), ids=list(VARIANTS))
def variant(request):
    version, rotary = VARIANTS[request.param]
    pipe = tiny_cogvideox_pipeline(version, rotary)
    stock = pipe(**cogvideox_call_kwargs(height=96)).frames
    return SimpleNamespace(version=version, rotary=rotary, pipe=pipe, stock=stock)


def test_dense_pattern_reproduces_the_stock_pipeline(variant):
    pipe = variant.pipe
    apply(pipe, SparsityConfig(pattern=Dense(), block_size=32))
    try:
        latents = pipe(**cogvideox_call_kwargs(height=96)).frames
        assert sum(sparsity_state(pipe).sparse_calls.values()) == 3 * 2  # steps x layers: really our path
    finally:
        remove(pipe)
    torch.testing.assert_close(latents, variant.stock, atol=1e-5, rtol=1e-5)


def test_sparse_calls_equal_masked_attention_and_remove_restores_stock(variant, recorded):
    pipe = variant.pipe
    stock = dict(pipe.transformer.attn_processors)
    apply(pipe, PATTERN, block_size=32)
    latents = pipe(**cogvideox_call_kwargs(height=96)).frames
    assert not torch.allclose(latents, variant.stock)  # the pattern really changed something
    grid = expected_grid(variant.version, height=96)
    assert sparsity_state(pipe).grid == grid
    mask = PATTERN.token_mask(grid)
    assert len(recorded) == 3 * 2  # steps x layers (CFG is batched into one call)
    for q, k, v, layout, out in recorded:
        assert q.shape[0] == 2 and layout.num_tokens == grid.num_tokens  # [uncond, cond]
        torch.testing.assert_close(out.double(), masked_attention(q, k, v, mask), atol=1e-5, rtol=1e-5)
    remove(pipe)
    assert pipe.transformer.attn_processors == stock
    assert not pipe.transformer._forward_pre_hooks
    torch.testing.assert_close(pipe(**cogvideox_call_kwargs(height=96)).frames, variant.stock, atol=0, rtol=0)


def test_sparse_processor_equals_stock_processor_with_the_pattern_mask(variant):
    """End to end per layer: the whole sparse processor (projections, norms, rotary on video tokens
    only, text first) equals the stock processor given the pattern's token mask as attention mask."""
    pipe = variant.pipe
    inputs, outputs = {}, {}

    def keep_inputs(module, args, kwargs):
        inputs[module] = (args, dict(kwargs))

    def keep_outputs(module, args, kwargs, output):
        outputs[module] = output

    apply(pipe, PATTERN, block_size=32)
    attns = [block.attn1 for block in pipe.transformer.transformer_blocks]
    handles = [a.register_forward_pre_hook(keep_inputs, with_kwargs=True) for a in attns]
    handles += [a.register_forward_hook(keep_outputs, with_kwargs=True) for a in attns]
    try:
        pipe(**cogvideox_call_kwargs(height=96, steps=1))
    finally:
        for handle in handles:
            handle.remove()
    grid = sparsity_state(pipe).grid
    remove(pipe)
    assert (inputs[attns[0]][1]["image_rotary_emb"] is not None) == variant.rotary
    for attn in attns:
        args, kwargs = inputs[attn]
        hidden, text = kwargs["hidden_states"], kwargs["encoder_hidden_states"]
        mask = PATTERN.token_mask(grid).expand(hidden.shape[0], -1, -1)
        expected = attn.processor(attn, hidden, text, attention_mask=mask, image_rotary_emb=kwargs["image_rotary_emb"])
        for got, want in zip(outputs[attn], expected):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("frames, token_frames", [(9, 2), (13, 2), (17, 3)])
def test_cogvideox_15_grid_counts_the_padding_frames(frames, token_frames):
    # 9 -> 3 latent frames, padded to 4 by the pipeline -> 2 token frames; 13 -> 4 -> 2; 17 -> 5 -> 6 -> 3.
    pipe = tiny_cogvideox_pipeline("1.5", num_layers=1)
    apply(pipe, Dense(), block_size=32)
    try:
        pipe(**cogvideox_call_kwargs(frames=frames, steps=1))
        grid = sparsity_state(pipe).grid
        assert sparsity_state(pipe).sparse_calls[(0, 0)] == 1
    finally:
        remove(pipe)
    assert grid == VideoGrid(token_frames, 4, 4, text_tokens=TEXT_TOKENS, text_position="start")


def test_grid_from_call_at_released_model_sizes():
    adapter = CogVideoXAdapter()
    v10 = SimpleNamespace(config=SimpleNamespace(patch_size=2, patch_size_t=None))
    v15 = SimpleNamespace(config=SimpleNamespace(patch_size=2, patch_size_t=2))
    text = torch.empty(2, 226, 1)
    # CogVideoX-5B, 49 frames at 480x720: 13 latent frames of 60x90.
    call = {"hidden_states": torch.empty(2, 13, 1, 60, 90), "encoder_hidden_states": text}
    grid = adapter.grid_from_call(v10, (), call)
    assert grid == VideoGrid(13, 30, 45, text_tokens=226, text_position="start")
    # CogVideoX1.5-5B, 81 frames at 768x1360: 21 latent frames padded to 22, 96x170 (positional call).
    grid = adapter.grid_from_call(v15, (torch.empty(1, 22, 1, 96, 170), text), {})
    assert grid == VideoGrid(11, 48, 85, text_tokens=226, text_position="start")


@pytest.mark.parametrize("variant", ["1.0-sincos", "1.5"], indirect=True)  # DDIM and DPM schedulers
def test_dense_warm_up_steps_last_steps_and_layers_are_honoured(variant):
    pipe = variant.pipe
    config = SparsityConfig(pattern=Radial(block_size=32), dense_steps=1, dense_last_steps=1, dense_layers=(-1,),
                            block_size=32)
    apply(pipe, config)
    try:
        pipe(**cogvideox_call_kwargs(steps=4))
        calls = sparsity_state(pipe).sparse_calls
    finally:
        remove(pipe)
    # 4 steps: step 0 (warm-up) and step 3 (last) dense; layer 1 (= -1) always dense; CFG batched: 1 call.
    assert dict(calls) == {(1, 0): 1, (2, 0): 1}


@pytest.mark.parametrize("variant", ["1.0-rotary"], indirect=True)
def test_dense_layers_by_name_filter(variant):
    pipe = variant.pipe
    apply(pipe, SparsityConfig(pattern=Dense(), dense_layers=("transformer_blocks.0.*",), block_size=32))
    try:
        pipe(**cogvideox_call_kwargs(steps=2))
        layers = {layer for _, layer in sparsity_state(pipe).sparse_calls}
    finally:
        remove(pipe)
    assert layers == {1}


@pytest.mark.parametrize("variant", ["1.0-rotary", "1.5"], indirect=True)
def test_two_resolutions_use_two_layouts(variant, recorded):
    pipe = variant.pipe
    apply(pipe, SparsityConfig(pattern=PATTERN, block_size=32))
    try:
        pipe(**cogvideox_call_kwargs(steps=1, height=64, width=64))
        pipe(**cogvideox_call_kwargs(steps=1, height=64, width=96))
    finally:
        remove(pipe)
    sizes = sorted({layout.num_tokens for *_, layout, _ in recorded})
    small, wide = expected_grid(variant.version), expected_grid(variant.version, width=96)
    assert sizes == [small.num_tokens, wide.num_tokens]


def test_batch_of_two_prompts_with_cfg(variant, recorded):
    pipe = variant.pipe
    pattern = Neighborhood(kernel_size=(1, 3, 3))
    apply(pipe, pattern, block_size=32)
    try:
        latents = pipe(**cogvideox_call_kwargs(batch=2, steps=2)).frames
    finally:
        remove(pipe)
    assert latents.shape[0] == 2 and torch.isfinite(latents).all()
    mask = pattern.token_mask(expected_grid(variant.version))
    assert len(recorded) == 2 * 2 and all(q.shape[0] == 4 for q, *_ in recorded)  # 2 prompts x (uncond, cond)
    for q, k, v, _, out in recorded:
        torch.testing.assert_close(out.double(), masked_attention(q, k, v, mask), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["1.5"], indirect=True)
def test_no_cfg_runs_batch_one(variant, recorded):
    pipe = variant.pipe
    apply(pipe, PATTERN, block_size=32)
    try:
        pipe(**cogvideox_call_kwargs(steps=1, guidance_scale=1.0))
    finally:
        remove(pipe)
    assert len(recorded) == 2 and all(q.shape[0] == 1 for q, *_ in recorded)


def test_applying_twice_replaces_instead_of_stacking():
    pipe = tiny_cogvideox_pipeline(num_layers=2)
    assert type(find_adapter(pipe)).__name__ == "CogVideoXAdapter"
    apply(pipe, Dense(), block_size=32)
    apply(pipe, Radial(block_size=32), block_size=32)
    try:
        processors = [block.attn1.processor for block in pipe.transformer.transformer_blocks]
        assert all(isinstance(p, CogVideoXSparseAttnProcessor) for p in processors)
        assert type(processors[0].stock).__name__ == "CogVideoXAttnProcessor2_0"  # wraps the stock one, not ours
        assert processors[0] is not processors[1]  # per-layer objects, never one shared instance
        assert len(pipe.transformer._forward_pre_hooks) == 1
        assert isinstance(sparsity_state(pipe).config.pattern, Radial)
    finally:
        remove(pipe)


def test_fused_qkv_projections_are_reproduced():
    pipe = tiny_cogvideox_pipeline()
    pipe.fuse_qkv_projections()
    expected = pipe(**cogvideox_call_kwargs(steps=2)).frames
    apply(pipe, Dense(), block_size=32)
    try:
        stock = pipe.transformer.transformer_blocks[0].attn1.processor.stock
        assert type(stock).__name__ == "FusedCogVideoXAttnProcessor2_0"
        latents = pipe(**cogvideox_call_kwargs(steps=2)).frames
        assert sum(sparsity_state(pipe).sparse_calls.values()) == 2 * 2
    finally:
        remove(pipe)
    assert type(pipe.transformer.transformer_blocks[0].attn1.processor).__name__ == "FusedCogVideoXAttnProcessor2_0"
    torch.testing.assert_close(latents, expected, atol=1e-5, rtol=1e-5)


def test_unknown_stock_processor_is_kept_and_calls_with_a_mask_fall_back():
    pipe = tiny_cogvideox_pipeline(num_layers=1)
    adapter = CogVideoXAdapter()
    stranger = object()
    assert adapter.make_processor(stranger, sparsity_state(pipe), 0) is stranger
    apply(pipe, PATTERN, block_size=32)
    try:
        attn = pipe.transformer.transformer_blocks[0].attn1
        state = sparsity_state(pipe)
        state.begin_call(VideoGrid(1, 2, 2, text_tokens=3, text_position="start"), None)
        hidden, text = torch.randn(1, 4, 32), torch.randn(1, 3, 32)
        mask = torch.ones(1, 7, 7, dtype=torch.bool)
        got = attn.processor(attn, hidden, text, attention_mask=mask)
        want = attn.processor.stock(attn, hidden, text, attention_mask=mask)
        assert not state.sparse_calls  # the masked call went to the stock processor
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
        # A sequence that does not match the published grid is not sparsified either.
        attn.processor(attn, torch.randn(1, 5, 32), text)
        assert not state.sparse_calls
    finally:
        remove(pipe)


@pytest.mark.parametrize("order", ["lora_then_apply", "apply_then_lora"])
def test_lora_loaded_before_or_after_apply_is_used(order, tmp_path):
    reference = tiny_cogvideox_pipeline("1.5")
    lora_dir = add_and_save_random_lora(reference, tmp_path / "lora")
    expected = reference(**cogvideox_call_kwargs(steps=2)).frames  # stock processors + LoRA
    def half_scale():  # LoRA scale passed through the call (fresh generator each time)
        return dict(cogvideox_call_kwargs(steps=2), attention_kwargs={"scale": 0.5})

    half = reference(**half_scale()).frames

    pipe = tiny_cogvideox_pipeline("1.5")
    without_lora = pipe(**cogvideox_call_kwargs(steps=2)).frames
    load_lora_around_apply(pipe, lora_dir, order)
    latents = pipe(**cogvideox_call_kwargs(steps=2)).frames
    assert sum(sparsity_state(pipe).sparse_calls.values()) > 0  # our processors ran
    assert not torch.allclose(latents, without_lora, atol=1e-4)
    torch.testing.assert_close(latents, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(pipe(**half_scale()).frames, half, atol=1e-4, rtol=1e-4)
