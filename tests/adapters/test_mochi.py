"""Mochi adapter on a tiny random pipeline: stock equivalence (padded prompts, batched CFG), the
stock processor's per-sample prompt handling reproduced exactly (including masks with holes),
exact sparse calls, install/remove by direct assignment, warm-up and dense layers, resolutions,
batch, LoRA, fallbacks."""

from __future__ import annotations

import pytest
import torch

from diffattn import Dense, Neighborhood, Radial, VideoGrid
from diffattn.adapters import apply, find_adapter, remove, sparsity_state
from diffattn.adapters.mochi import MochiAdapter
from diffattn.processors import MochiSparseAttnProcessor, SparsityConfig, SparsityState
from diffattn.processors import base as base_module

from .lora import JOINT_ATTENTION_TARGETS, add_and_save_random_lora, load_lora_around_apply
from .reference import masked_attention_bnhd
from .tiny_mochi import TEXT_TOKENS, mochi_call_kwargs, tiny_mochi_pipeline

# 13 frames -> 3 latent frames (VAE /6); 64 px -> 8 latent (VAE /8) -> 4 tokens (patch 2).
GRID = VideoGrid(3, 4, 4, text_tokens=TEXT_TOKENS, text_position="end")
VIDEO_GRID = VideoGrid(3, 4, 4)
LAYERS = 2



def processors(transformer):
    """``{module name: processor}``: Mochi has no ``attn_processors``."""
    return {name: module.processor for name, module in transformer.named_modules() if hasattr(module, "processor")}


@pytest.fixture(scope="module")
def pipe():
    return tiny_mochi_pipeline()


@pytest.fixture(scope="module")
def stock_latents(pipe):
    remove(pipe)
    return pipe(**mochi_call_kwargs()).frames


def assert_joint_calls_exact(calls, pattern, grid=GRID):
    token_mask = pattern.token_mask(grid)
    for _, q, k, v, key_padding, out in calls:
        assert q.shape[1] == grid.num_tokens and key_padding is not None
        mask = token_mask[None] & key_padding[:, None, :]
        torch.testing.assert_close(out.double(), masked_attention_bnhd(q, k, v, mask), atol=1e-5, rtol=1e-5)


def test_dense_pattern_reproduces_the_stock_pipeline(pipe, stock_latents):
    apply(pipe, SparsityConfig(pattern=Dense(), block_size=32))
    try:
        latents = pipe(**mochi_call_kwargs()).frames
        calls = sparsity_state(pipe).sparse_calls
    finally:
        remove(pipe)
    assert sum(calls.values()) == 3 * LAYERS  # 3 steps, batched CFG: one call per step and block
    torch.testing.assert_close(latents, stock_latents, atol=1e-5, rtol=1e-5)


def test_sparse_calls_equal_masked_attention_and_remove_restores_stock(pipe, stock_latents, joint_calls, recorded):
    pattern = Neighborhood(kernel_size=(3, 3, 3))
    stock = processors(pipe.transformer)
    assert not hasattr(pipe.transformer, "set_attn_processor")  # the direct-assignment install path
    apply(pipe, pattern, block_size=32)
    installed = processors(pipe.transformer)
    assert all(isinstance(p, MochiSparseAttnProcessor) for p in installed.values())
    assert installed["transformer_blocks.0.attn1"] is not installed["transformer_blocks.1.attn1"]
    latents = pipe(**mochi_call_kwargs()).frames
    assert not torch.allclose(latents, stock_latents)  # the pattern really changed something
    assert len(joint_calls) == 3 * LAYERS
    # Batched CFG [negative (8 of 8 valid), prompt (5 of 8)]: per-sample padding reaches joint_attention.
    assert {tuple(kp[:, GRID.video_tokens:].sum(1).tolist()) for *_, kp, _ in joint_calls} == {(8, 5)}
    assert_joint_calls_exact(joint_calls, pattern)
    video_mask = pattern.token_mask(VIDEO_GRID)
    for q, k, v, layout, out in recorded:
        assert layout.num_tokens == VIDEO_GRID.num_tokens
        expected = masked_attention_bnhd(*(x.transpose(1, 2) for x in (q, k, v)), video_mask[None])
        torch.testing.assert_close(out.double(), expected.transpose(1, 2), atol=1e-5, rtol=1e-5)

    remove(pipe)
    restored = processors(pipe.transformer)
    assert restored.keys() == stock.keys() and all(restored[name] is stock[name] for name in stock)
    assert not pipe.transformer._forward_pre_hooks and not hasattr(pipe.transformer, "_diffattn_installed")
    torch.testing.assert_close(pipe(**mochi_call_kwargs()).frames, stock_latents, atol=0, rtol=0)


def test_unpadded_prompts_use_the_layout_with_dense_text(pipe, recorded):
    pattern = Neighborhood(kernel_size=(3, 3, 3))
    remove(pipe)
    stock = pipe(**mochi_call_kwargs(valid=(8,), negative_valid=(8,), steps=2)).frames
    apply(pipe, SparsityConfig(pattern=Dense(), block_size=32))
    try:
        dense = pipe(**mochi_call_kwargs(valid=(8,), negative_valid=(8,), steps=2)).frames
        recorded.clear()
        apply(pipe, pattern, block_size=32)
        pipe(**mochi_call_kwargs(valid=(8,), negative_valid=(8,), steps=2))
    finally:
        remove(pipe)
    torch.testing.assert_close(dense, stock, atol=1e-5, rtol=1e-5)
    mask = pattern.token_mask(GRID)
    assert recorded and all(layout.num_tokens == GRID.num_tokens for *_, layout, _ in recorded)
    for q, k, v, layout, out in recorded:
        expected = masked_attention_bnhd(*(x.transpose(1, 2) for x in (q, k, v)), mask[None])
        torch.testing.assert_close(out.double(), expected.transpose(1, 2), atol=1e-5, rtol=1e-5)


def stock_style_reference(query, key, value, valid, video_tokens, pattern, grid):
    """The stock processor's per-sample prompt handling, written out independently: attend over
    ``[video, valid text]`` restricted to the pattern, then list the valid text outputs first and
    zero-fill the rest."""
    outputs = []
    token_mask = pattern.token_mask(grid)
    for b in range(query.shape[0]):
        keep = torch.cat([torch.arange(video_tokens), video_tokens + torch.nonzero(valid[b]).flatten()])
        sub = lambda x: x[b : b + 1, keep]  # noqa: E731
        out = masked_attention_bnhd(sub(query), sub(key), sub(value), token_mask[keep][:, keep][None])[0]
        padded = torch.zeros(query.shape[1], *out.shape[1:], dtype=out.dtype)
        padded[: out.shape[0]] = out
        outputs.append(padded)
    return torch.stack(outputs)


@pytest.mark.parametrize("pattern", [Dense(), Neighborhood(kernel_size=(1, 3, 3))], ids=repr)
def test_prompt_masks_with_holes_are_handled_like_the_stock_processor(pattern, monkeypatch):
    transformer = tiny_mochi_pipeline(num_layers=2).transformer
    state = SparsityState(SparsityConfig(pattern=pattern, block_size=32))
    state.grid = GRID
    torch.manual_seed(0)
    video = torch.randn(3, GRID.video_tokens, 32)
    text = torch.randn(3, TEXT_TOKENS, 16)
    mask = torch.tensor([[1, 0, 1, 1, 0, 0, 1, 0], [0, 0, 0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    freqs = torch.randn(GRID.video_tokens, 2, 8)
    rotary = (freqs.cos(), freqs.sin())
    captured = []
    original = base_module.joint_attention

    def capture(state, layer_index, q, k, v, key_padding=None, **kwargs):
        captured.append((q, k, v))
        return original(state, layer_index, q, k, v, key_padding=key_padding, **kwargs)

    monkeypatch.setattr(base_module, "joint_attention", capture)
    for index, block in enumerate(transformer.transformer_blocks):  # block 1 has no to_add_out
        attn = block.attn1
        processor = MochiSparseAttnProcessor(attn.processor, state, index)
        got_video, got_text = processor(attn, video, text, mask, image_rotary_emb=rotary)
        if isinstance(pattern, Dense):
            want_video, want_text = attn.processor(attn, video, text, mask, image_rotary_emb=rotary)
            torch.testing.assert_close(got_video, want_video, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got_text, want_text, atol=1e-5, rtol=1e-5)
        # Attention itself against the independent reference, before the output projections.
        q, k, v = captured[-1]
        expected = stock_style_reference(q, k, v, mask != 0, GRID.video_tokens, pattern, GRID).flatten(2, 3).float()
        want_video = attn.to_out[0](expected[:, : GRID.video_tokens])
        want_text = expected[:, GRID.video_tokens :]
        if hasattr(attn, "to_add_out"):
            want_text = attn.to_add_out(want_text)
        torch.testing.assert_close(got_video, want_video, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got_text, want_text, atol=1e-5, rtol=1e-5)
    assert sum(state.sparse_calls.values()) == 2


def test_dense_warm_up_steps_last_steps_and_layers_are_honoured(pipe):
    config = SparsityConfig(pattern=Radial(block_size=32), dense_steps=1, dense_last_steps=1, dense_layers=(-1,),
                            block_size=32)
    apply(pipe, config)
    try:
        pipe(**mochi_call_kwargs(steps=4))
        calls = sparsity_state(pipe).sparse_calls
    finally:
        remove(pipe)
    # 4 steps: step 0 (warm-up) and 3 (last) dense; block 1 (= -1) always dense; batched CFG: 1 call.
    assert dict(calls) == {(1, 0): 1, (2, 0): 1}


def test_dense_layers_by_name_filter(pipe):
    apply(pipe, SparsityConfig(pattern=Dense(), dense_layers=("transformer_blocks.0.*",), block_size=32))
    try:
        pipe(**mochi_call_kwargs(steps=2))
        layers = {layer for _, layer in sparsity_state(pipe).sparse_calls}
    finally:
        remove(pipe)
    assert layers == {1}


def test_two_resolutions_use_two_layouts(pipe, recorded):
    apply(pipe, SparsityConfig(pattern=Neighborhood(kernel_size=(3, 3, 3)), block_size=32))
    try:
        pipe(**mochi_call_kwargs(steps=2, valid=(8,), negative_valid=None, height=64, width=64))
        pipe(**mochi_call_kwargs(steps=2, valid=(8,), negative_valid=None, height=64, width=96))
    finally:
        remove(pipe)
    sizes = sorted({layout.num_tokens for *_, layout, _ in recorded})
    assert sizes == [3 * 4 * 4 + TEXT_TOKENS, 3 * 4 * 6 + TEXT_TOKENS]


def test_batch_of_two_prompts_with_cfg(pipe, joint_calls):
    pattern = Neighborhood(kernel_size=(1, 3, 3))
    apply(pipe, pattern, block_size=32)
    try:
        latents = pipe(**mochi_call_kwargs(valid=(5, 8), negative_valid=(3, 1), steps=2)).frames
    finally:
        remove(pipe)
    assert latents.shape[0] == 2 and torch.isfinite(latents).all()
    assert len(joint_calls) == 2 * LAYERS and all(q.shape[0] == 4 for _, q, *_ in joint_calls)
    assert {tuple(kp[:, GRID.video_tokens:].sum(1).tolist()) for *_, kp, _ in joint_calls} == {(3, 1, 5, 8)}
    assert_joint_calls_exact(joint_calls, pattern)


def test_calls_it_cannot_sparsify_exactly_go_to_the_stock_processor():
    transformer = tiny_mochi_pipeline().transformer
    attn = transformer.transformer_blocks[0].attn1
    state = SparsityState(SparsityConfig(pattern=Neighborhood(kernel_size=(1, 3, 3)), block_size=32))
    processor = MochiSparseAttnProcessor(attn.processor, state, 0)
    torch.manual_seed(0)
    video = torch.randn(2, GRID.video_tokens, 32)
    text = torch.randn(2, TEXT_TOKENS, 16)
    mask = torch.ones(2, TEXT_TOKENS, dtype=torch.long)
    # Outside a transformer forward (no grid published) and with a sequence that does not match the grid.
    for v in (video, video[:, :-16]):
        got = processor(attn, v, text, mask)
        want = attn.processor(attn, v, text, mask)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
        state.grid = GRID
    assert not state.sparse_calls


def test_applying_twice_replaces_instead_of_stacking(pipe):
    apply(pipe, Dense(), block_size=32)
    apply(pipe, Radial(block_size=32), block_size=32)
    try:
        processor = pipe.transformer.transformer_blocks[0].attn1.processor
        assert type(processor.stock).__name__ == "MochiAttnProcessor2_0"
        assert len(pipe.transformer._forward_pre_hooks) == 1
        assert isinstance(sparsity_state(pipe).config.pattern, Radial)
        assert isinstance(find_adapter(pipe), MochiAdapter)
    finally:
        remove(pipe)


def test_adapter_grid_from_call():
    adapter = MochiAdapter()
    transformer = tiny_mochi_pipeline().transformer
    latents, text = torch.zeros(1, 4, 5, 6, 10), torch.zeros(1, 7, 32)
    expected = VideoGrid(5, 3, 5, text_tokens=7, text_position="end")  # Mochi patchifies space only
    call_kwargs = {"hidden_states": latents, "encoder_hidden_states": text}
    assert adapter.grid_from_call(transformer, (), call_kwargs) == expected
    assert adapter.grid_from_call(transformer, (latents, text), {}) == expected


LORA_CALL = dict(steps=2)


@pytest.fixture(scope="module")
def lora_reference(tmp_path_factory):
    """A saved random LoRA, and the latents of the stock pipeline with and without it."""
    reference = tiny_mochi_pipeline()
    without_lora = reference(**mochi_call_kwargs(**LORA_CALL)).frames
    lora_dir = add_and_save_random_lora(reference, tmp_path_factory.mktemp("mochi_lora"), JOINT_ATTENTION_TARGETS)
    with_lora = reference(**mochi_call_kwargs(**LORA_CALL)).frames  # stock processors + LoRA
    return lora_dir, with_lora, without_lora


@pytest.mark.parametrize("order", ["lora_then_apply", "apply_then_lora"])
def test_lora_loaded_before_or_after_apply_is_used(order, lora_reference):
    lora_dir, expected, without_lora = lora_reference
    pipe = tiny_mochi_pipeline()
    load_lora_around_apply(pipe, lora_dir, order)
    latents = pipe(**mochi_call_kwargs(**LORA_CALL)).frames
    assert sum(sparsity_state(pipe).sparse_calls.values()) == 2 * LAYERS  # our processors ran
    assert not torch.allclose(latents, without_lora, atol=1e-4)
    torch.testing.assert_close(latents, expected, atol=1e-4, rtol=1e-4)
    remove(pipe)
    assert all(type(p).__name__ == "MochiAttnProcessor2_0" for p in processors(pipe.transformer).values())
