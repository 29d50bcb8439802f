"""Wan adapter on a tiny random pipeline: stock equivalence, exact sparse calls, warm-up, layers,
resolutions, batch and CFG, LoRA, remove()."""

from __future__ import annotations

import pytest
import torch

from diffattn import Dense, Neighborhood, Radial, VideoGrid
from diffattn.adapters import apply, remove, sparsity_state
from diffattn.processors import SparsityConfig

from .lora import add_and_save_random_lora, load_lora_around_apply
from .reference import masked_attention
from .tiny_pipelines import tiny_wan_pipeline, wan_call_kwargs


@pytest.fixture(scope="module")
def pipe():
    return tiny_wan_pipeline()


@pytest.fixture(scope="module")
def stock_latents(pipe):
    remove(pipe)
    return pipe(**wan_call_kwargs()).frames


def test_dense_pattern_reproduces_the_stock_pipeline(pipe, stock_latents):
    apply(pipe, SparsityConfig(pattern=Dense(), block_size=32))
    try:
        latents = pipe(**wan_call_kwargs()).frames
    finally:
        remove(pipe)
    torch.testing.assert_close(latents, stock_latents, atol=1e-5, rtol=1e-5)


def test_sparse_calls_equal_masked_attention_and_remove_restores_stock(pipe, stock_latents, recorded):
    pattern = Neighborhood(kernel_size=(3, 3, 3))
    stock = dict(pipe.transformer.attn_processors)
    apply(pipe, pattern, block_size=32)
    latents = pipe(**wan_call_kwargs()).frames
    assert not torch.allclose(latents, stock_latents)  # the pattern really changed something
    grid = VideoGrid(3, 4, 4)  # 9 frames -> 3 latent frames; 64 px / 8 (VAE) / 2 (patch) = 4
    mask = pattern.token_mask(grid)
    assert len(recorded) == 3 * 2 * 2  # steps x (cond, uncond) x layers
    for q, k, v, layout, out in recorded:
        assert layout.num_tokens == grid.num_tokens
        torch.testing.assert_close(out.double(), masked_attention(q, k, v, mask), atol=1e-5, rtol=1e-5)
    remove(pipe)
    assert pipe.transformer.attn_processors == stock
    assert not pipe.transformer._forward_pre_hooks
    torch.testing.assert_close(pipe(**wan_call_kwargs()).frames, stock_latents, atol=0, rtol=0)


def test_dense_warm_up_steps_last_steps_and_layers_are_honoured(pipe):
    config = SparsityConfig(pattern=Radial(block_size=32), dense_steps=1, dense_last_steps=1, dense_layers=(-1,),
                            block_size=32)
    apply(pipe, config)
    try:
        pipe(**wan_call_kwargs(steps=4))
        calls = sparsity_state(pipe).sparse_calls
    finally:
        remove(pipe)
    # 4 steps: step 0 (warm-up) and step 3 (last) dense; layer 1 (= -1) always dense; CFG: 2 calls.
    assert dict(calls) == {(1, 0): 2, (2, 0): 2}


def test_dense_layers_by_name_filter(pipe):
    apply(pipe, SparsityConfig(pattern=Dense(), dense_layers=("blocks.0.*",), block_size=32))
    try:
        pipe(**wan_call_kwargs(steps=2))
        layers = {layer for _, layer in sparsity_state(pipe).sparse_calls}
    finally:
        remove(pipe)
    assert layers == {1}


def test_two_resolutions_use_two_layouts(pipe, recorded):
    apply(pipe, SparsityConfig(pattern=Neighborhood(kernel_size=(3, 3, 3)), block_size=32))
    try:
        pipe(**wan_call_kwargs(steps=1, height=64, width=64))
        pipe(**wan_call_kwargs(steps=1, height=64, width=96))
    finally:
        remove(pipe)
    sizes = sorted({layout.num_tokens for *_, layout, _ in recorded})
    assert sizes == [3 * 4 * 4, 3 * 4 * 6]


def test_batch_of_two_prompts_with_cfg(pipe, recorded):
    pattern = Neighborhood(kernel_size=(1, 3, 3))
    apply(pipe, pattern, block_size=32)
    try:
        latents = pipe(**wan_call_kwargs(batch=2, steps=2)).frames
    finally:
        remove(pipe)
    assert latents.shape[0] == 2 and torch.isfinite(latents).all()
    mask = pattern.token_mask(VideoGrid(3, 4, 4))
    assert all(q.shape[0] == 2 for q, *_ in recorded)
    for q, k, v, _, out in recorded:
        torch.testing.assert_close(out.double(), masked_attention(q, k, v, mask), atol=1e-5, rtol=1e-5)


def test_applying_twice_replaces_instead_of_stacking(pipe):
    apply(pipe, Dense(), block_size=32)
    apply(pipe, Radial(block_size=32), block_size=32)
    try:
        processor = pipe.transformer.blocks[0].attn1.processor
        assert type(processor.stock).__name__ == "WanAttnProcessor"  # wraps the stock one, not ours
        assert len(pipe.transformer._forward_pre_hooks) == 1
        assert isinstance(sparsity_state(pipe).config.pattern, Radial)
    finally:
        remove(pipe)


def test_cross_attention_keeps_its_stock_processor(pipe):
    stock = pipe.transformer.blocks[0].attn2.processor
    apply(pipe, Dense(), block_size=32)
    try:
        assert pipe.transformer.blocks[0].attn2.processor is stock
        processors = [pipe.transformer.blocks[i].attn1.processor for i in range(2)]
        assert processors[0] is not processors[1]  # per-layer objects, never one shared instance
    finally:
        remove(pipe)


@pytest.mark.parametrize("order", ["lora_then_apply", "apply_then_lora"])
def test_lora_loaded_before_or_after_apply_is_used(order, tmp_path):
    reference = tiny_wan_pipeline()
    lora_dir = add_and_save_random_lora(reference, tmp_path / "lora")
    expected = reference(**wan_call_kwargs(steps=2)).frames  # stock processors + LoRA

    pipe = tiny_wan_pipeline()
    without_lora = pipe(**wan_call_kwargs(steps=2)).frames
    load_lora_around_apply(pipe, lora_dir, order)
    latents = pipe(**wan_call_kwargs(steps=2)).frames
    assert sum(sparsity_state(pipe).sparse_calls.values()) > 0  # our processors ran
    assert not torch.allclose(latents, without_lora, atol=1e-4)
    torch.testing.assert_close(latents, expected, atol=1e-4, rtol=1e-4)



def test_unsupported_pipeline_lists_supported_families():
    class NotAPipeline:
        transformer = torch.nn.Linear(2, 2)

    with pytest.raises(ValueError, match="supported model families: wan"):
        apply(NotAPipeline(), Dense())


def test_bad_config_values_raise_value_error(pipe):
    with pytest.raises(ValueError, match="dense_steps"):
        SparsityConfig(pattern=Dense(), dense_steps=-1)
    with pytest.raises(ValueError, match="pattern"):
        SparsityConfig(pattern="radial")
    with pytest.raises(ValueError, match="backend"):
        SparsityConfig(pattern=Dense(), backend="cuda")
    with pytest.raises(ValueError, match="unknown SparsityConfig field"):
        apply(pipe, Dense(), dense_step=3)
    with pytest.raises(ValueError, match="out of range"):
        apply(pipe, SparsityConfig(pattern=Dense(), dense_layers=(5,)))
    assert not hasattr(pipe.transformer, "_diffattn_installed")
