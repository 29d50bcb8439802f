"""HunyuanVideo adapter on a tiny random pipeline: stock equivalence (padded prompts, true CFG),
exact sparse calls in dual- and single-stream blocks, the token refiner left alone, warm-up and
dense layers, resolutions, batch, LoRA, fallbacks, remove()."""

from __future__ import annotations

import pytest
import torch

from diffattn import Dense, Neighborhood, Radial, VideoGrid
from diffattn.adapters import apply, find_adapter, remove, sparsity_state
from diffattn.adapters.hunyuan_video import HunyuanVideoAdapter
from diffattn.processors import HunyuanVideoSparseAttnProcessor, SparsityConfig, SparsityState

from .lora import JOINT_ATTENTION_TARGETS, add_and_save_random_lora, load_lora_around_apply
from .reference import masked_attention_bnhd
from .tiny_hunyuan_video import TEXT_TOKENS, hunyuan_video_call_kwargs, tiny_hunyuan_video_pipeline

# 9 frames -> 3 latent frames (VAE /4); 64 px -> 8 latent (VAE /8) -> 4 tokens (patch 2).
GRID = VideoGrid(3, 4, 4, text_tokens=TEXT_TOKENS, text_position="end")
VIDEO_GRID = VideoGrid(3, 4, 4)
LAYERS = 2  # one dual-stream block (index 0) and one single-stream block (index 1)



@pytest.fixture(scope="module")
def pipe():
    return tiny_hunyuan_video_pipeline()


@pytest.fixture(scope="module")
def stock_latents(pipe):
    remove(pipe)
    return pipe(**hunyuan_video_call_kwargs()).frames


def assert_joint_calls_exact(calls, pattern, grid=GRID):
    token_mask = pattern.token_mask(grid)
    for _, q, k, v, key_padding, out in calls:
        assert q.shape[1] == grid.num_tokens
        mask = token_mask[None].expand(q.shape[0], -1, -1)
        if key_padding is not None:
            mask = mask & key_padding[:, None, :]
        torch.testing.assert_close(out.double(), masked_attention_bnhd(q, k, v, mask), atol=1e-5, rtol=1e-5)


def test_dense_pattern_reproduces_the_stock_pipeline(pipe, stock_latents):
    apply(pipe, SparsityConfig(pattern=Dense(), block_size=32))
    try:
        latents = pipe(**hunyuan_video_call_kwargs()).frames
        calls = sparsity_state(pipe).sparse_calls
    finally:
        remove(pipe)
    # 3 steps x (prompt, true-CFG negative prompt) x 2 blocks, all through the sparse path.
    assert sum(calls.values()) == 3 * 2 * LAYERS
    torch.testing.assert_close(latents, stock_latents, atol=1e-5, rtol=1e-5)


def test_sparse_calls_equal_masked_attention_and_remove_restores_stock(pipe, stock_latents, joint_calls, recorded):
    pattern = Neighborhood(kernel_size=(3, 3, 3))
    stock = dict(pipe.transformer.attn_processors)
    apply(pipe, pattern, block_size=32)
    latents = pipe(**hunyuan_video_call_kwargs()).frames
    assert not torch.allclose(latents, stock_latents)  # the pattern really changed something
    assert len(joint_calls) == 3 * 2 * LAYERS
    assert {layer for layer, *_ in joint_calls} == {0, 1}
    # The prompt has 5 of 8 text tokens (padded: key-padding path), the negative prompt all 8 (layout path).
    paddings = [kp for *_, kp, _ in joint_calls]
    assert any(kp is not None and not bool(kp.all()) for kp in paddings)
    assert any(kp is None or bool(kp.all()) for kp in paddings)
    assert_joint_calls_exact(joint_calls, pattern)
    # The kernel itself computes exactly the pattern's mask: the full [video, text] grid on the
    # unpadded path, the video grid on the padded path (text is merged densely by LSE).
    masks = {GRID.num_tokens: pattern.token_mask(GRID), VIDEO_GRID.num_tokens: pattern.token_mask(VIDEO_GRID)}
    assert {layout.num_tokens for *_, layout, _ in recorded} == set(masks)
    for q, k, v, layout, out in recorded:
        expected = masked_attention_bnhd(*(x.transpose(1, 2) for x in (q, k, v)), masks[layout.num_tokens][None])
        torch.testing.assert_close(out.double(), expected.transpose(1, 2), atol=1e-5, rtol=1e-5)

    remove(pipe)
    assert pipe.transformer.attn_processors == stock
    assert not pipe.transformer._forward_pre_hooks
    torch.testing.assert_close(pipe(**hunyuan_video_call_kwargs()).frames, stock_latents, atol=0, rtol=0)


def test_token_refiner_keeps_its_stock_processor_and_layers_get_their_own(pipe):
    transformer = pipe.transformer
    refiner = transformer.context_embedder.token_refiner.refiner_blocks[0].attn.processor
    apply(pipe, Dense(), block_size=32)
    try:
        assert transformer.context_embedder.token_refiner.refiner_blocks[0].attn.processor is refiner
        dual = transformer.transformer_blocks[0].attn.processor
        single = transformer.single_transformer_blocks[0].attn.processor
        assert isinstance(dual, HunyuanVideoSparseAttnProcessor) and isinstance(single, HunyuanVideoSparseAttnProcessor)
        assert dual is not single and (dual.layer_index, single.layer_index) == (0, 1)
    finally:
        remove(pipe)


def test_adapter_layers_and_grid():
    adapter = HunyuanVideoAdapter()
    transformer = tiny_hunyuan_video_pipeline(num_layers=2, num_single_layers=3).transformer
    assert adapter.self_attention_layers(transformer) == [
        ("transformer_blocks.0.attn", 0), ("transformer_blocks.1.attn", 1),
        ("single_transformer_blocks.0.attn", 2), ("single_transformer_blocks.1.attn", 3),
        ("single_transformer_blocks.2.attn", 4),
    ]
    latents, text = torch.zeros(1, 4, 5, 6, 10), torch.zeros(1, 7, 32)
    expected = VideoGrid(5, 3, 5, text_tokens=7, text_position="end")
    call_kwargs = {"hidden_states": latents, "encoder_hidden_states": text}
    assert adapter.grid_from_call(transformer, (), call_kwargs) == expected
    assert adapter.grid_from_call(transformer, (latents, None, text), {}) == expected


def test_dense_warm_up_steps_last_steps_and_layers_are_honoured(pipe):
    config = SparsityConfig(pattern=Radial(block_size=32), dense_steps=1, dense_last_steps=1, dense_layers=(-1,),
                            block_size=32)
    apply(pipe, config)
    try:
        pipe(**hunyuan_video_call_kwargs(steps=4))
        calls = sparsity_state(pipe).sparse_calls
    finally:
        remove(pipe)
    # 4 steps: step 0 (warm-up) and 3 (last) dense; block 1 (= -1, the single-stream one) always
    # dense; true CFG: 2 transformer calls per step.
    assert dict(calls) == {(1, 0): 2, (2, 0): 2}


@pytest.mark.parametrize("pattern_name, sparse_layers", [("single_transformer_blocks.*", {0}),
                                                         ("transformer_blocks.*", {1})])
def test_dense_layers_by_name_filter(pipe, pattern_name, sparse_layers):
    apply(pipe, SparsityConfig(pattern=Dense(), dense_layers=(pattern_name,), block_size=32))
    try:
        pipe(**hunyuan_video_call_kwargs(steps=1, negative_valid=None))
        layers = {layer for _, layer in sparsity_state(pipe).sparse_calls}
    finally:
        remove(pipe)
    assert layers == sparse_layers


def test_two_resolutions_use_two_layouts(pipe, recorded):
    apply(pipe, SparsityConfig(pattern=Neighborhood(kernel_size=(3, 3, 3)), block_size=32))
    try:
        pipe(**hunyuan_video_call_kwargs(steps=1, valid=(8,), negative_valid=None, height=64, width=64))
        pipe(**hunyuan_video_call_kwargs(steps=1, valid=(8,), negative_valid=None, height=64, width=96))
    finally:
        remove(pipe)
    sizes = sorted({layout.num_tokens for *_, layout, _ in recorded})
    assert sizes == [3 * 4 * 4 + TEXT_TOKENS, 3 * 4 * 6 + TEXT_TOKENS]


def test_batch_of_two_prompts_with_true_cfg(pipe, joint_calls):
    pattern = Neighborhood(kernel_size=(1, 3, 3))
    apply(pipe, pattern, block_size=32)
    try:
        latents = pipe(**hunyuan_video_call_kwargs(valid=(5, 8), negative_valid=(3, 1), steps=2)).frames
    finally:
        remove(pipe)
    assert latents.shape[0] == 2 and torch.isfinite(latents).all()
    assert len(joint_calls) == 2 * 2 * LAYERS and all(q.shape[0] == 2 for _, q, *_ in joint_calls)
    valid_counts = {tuple(kp[:, GRID.video_tokens:].sum(1).tolist()) for *_, kp, _ in joint_calls}
    assert valid_counts == {(5, 8), (3, 1)}  # per-sample padding reaches the processor
    assert_joint_calls_exact(joint_calls, pattern)


def test_calls_it_cannot_sparsify_exactly_go_to_the_stock_processor():
    transformer = tiny_hunyuan_video_pipeline().transformer
    state = SparsityState(SparsityConfig(pattern=Neighborhood(kernel_size=(1, 3, 3)), block_size=32))
    state.grid = GRID
    torch.manual_seed(0)
    video = torch.randn(2, GRID.video_tokens, 32)
    text = torch.randn(2, TEXT_TOKENS, 32)
    for block in (transformer.transformer_blocks[0], transformer.single_transformer_blocks[0]):
        attn = block.attn
        processor = HunyuanVideoSparseAttnProcessor(attn.processor, state, 0)
        additive = torch.zeros(2, 1, 1, GRID.num_tokens)  # float mask: not a key padding
        per_query = torch.ones(2, 1, GRID.num_tokens, GRID.num_tokens, dtype=torch.bool)
        video_padding = torch.ones(2, 1, 1, GRID.num_tokens, dtype=torch.bool)
        video_padding[0, ..., 3] = False
        for mask in (additive, per_query, video_padding):
            got = processor(attn, video, text, mask)
            expected = attn.processor(attn, video, text, mask)
            for a, b in zip(got, expected):
                torch.testing.assert_close(a, b, atol=0, rtol=0)
        # A sequence that does not match the published grid is also left to the stock processor.
        got = processor(attn, video[:, :-16], text, None)
        expected = attn.processor(attn, video[:, :-16], text, None)
        torch.testing.assert_close(got[0], expected[0], atol=0, rtol=0)
    assert not state.sparse_calls


def test_applying_twice_replaces_instead_of_stacking(pipe):
    apply(pipe, Dense(), block_size=32)
    apply(pipe, Radial(block_size=32), block_size=32)
    try:
        processor = pipe.transformer.single_transformer_blocks[0].attn.processor
        assert type(processor.stock).__name__ == "HunyuanVideoAttnProcessor2_0"
        assert len(pipe.transformer._forward_pre_hooks) == 1
        assert isinstance(sparsity_state(pipe).config.pattern, Radial)
        assert isinstance(find_adapter(pipe), HunyuanVideoAdapter)
    finally:
        remove(pipe)


LORA_CALL = dict(steps=2, negative_valid=None)


@pytest.fixture(scope="module")
def lora_reference(tmp_path_factory):
    """A saved random LoRA, and the latents of the stock pipeline with and without it."""
    reference = tiny_hunyuan_video_pipeline()
    without_lora = reference(**hunyuan_video_call_kwargs(**LORA_CALL)).frames
    lora_dir = add_and_save_random_lora(reference, tmp_path_factory.mktemp("hunyuan_lora"), JOINT_ATTENTION_TARGETS)
    with_lora = reference(**hunyuan_video_call_kwargs(**LORA_CALL)).frames  # stock processors + LoRA
    return lora_dir, with_lora, without_lora


@pytest.mark.parametrize("order", ["lora_then_apply", "apply_then_lora"])
def test_lora_loaded_before_or_after_apply_is_used(order, lora_reference):
    lora_dir, expected, without_lora = lora_reference
    pipe = tiny_hunyuan_video_pipeline()
    load_lora_around_apply(pipe, lora_dir, order)
    latents = pipe(**hunyuan_video_call_kwargs(**LORA_CALL)).frames
    assert sum(sparsity_state(pipe).sparse_calls.values()) == 2 * LAYERS  # our processors ran
    assert not torch.allclose(latents, without_lora, atol=1e-4)
    torch.testing.assert_close(latents, expected, atol=1e-4, rtol=1e-4)


def test_torch_compile_with_padded_prompts_matches_eager_and_counts_each_sparse_call_once():
    """The padded prompt's key-padding split is data-dependent (graph breaks are allowed there):
    compiled latents and sparse-call counts equal the eager ones, whichever part ran traced."""
    pipe = tiny_hunyuan_video_pipeline()
    apply(pipe, SparsityConfig(pattern=Neighborhood(kernel_size=(3, 3, 3)), block_size=32, dense_steps=1))
    eager = pipe(**hunyuan_video_call_kwargs()).frames
    state = sparsity_state(pipe)
    eager_calls = dict(state.sparse_calls)
    assert sum(eager_calls.values()) > 0
    state.sparse_calls.clear()
    torch._dynamo.reset()
    try:
        pipe.transformer = torch.compile(pipe.transformer, backend="aot_eager")
        torch.testing.assert_close(pipe(**hunyuan_video_call_kwargs()).frames, eager, atol=1e-5, rtol=1e-5)
        assert dict(state.sparse_calls) == eager_calls
    finally:
        torch._dynamo.reset()
