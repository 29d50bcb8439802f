"""FLUX adapter on a tiny random pipeline: stock equivalence, exact sparse calls and processor
outputs in double- and single-stream blocks, the 2-D grid from img_ids, warm-up, layers,
resolutions, batch and true CFG, LoRA, remove()."""

from __future__ import annotations

import pytest
import torch

from diffattn import Dense, Neighborhood, Radial, VideoGrid
from diffattn.adapters import DenseFallbackWarning, apply, find_adapter, remove, sparsity_state
from diffattn.adapters.flux import FluxAdapter, image_grid_shape
from diffattn.processors import FluxSparseAttnProcessor, SparsityConfig

from .lora import JOINT_ATTENTION_TARGETS, add_and_save_random_lora, load_lora_around_apply
from .reference import masked_attention
from .tiny_flux import TEXT_TOKENS, flux_call_kwargs, tiny_flux_pipeline

PATTERN = Neighborhood(kernel_size=(1, 3, 3))
LAYERS = 3  # 1 double-stream + 2 single-stream blocks



def image_grid(height: int = 128, width: int = 96) -> VideoGrid:
    # pixels / 8 (VAE) / 2 (2x2 packing) tokens per axis
    return VideoGrid(1, height // 16, width // 16, text_tokens=TEXT_TOKENS, text_position="start")


def latent_ids(height: int, width: int, first: float = 0.0) -> torch.Tensor:
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    return torch.stack([torch.full_like(rows, 0) + first, rows, cols], -1).reshape(-1, 3).float()


@pytest.fixture(scope="module")
def pipe():
    return tiny_flux_pipeline()


@pytest.fixture(scope="module")
def stock_latents(pipe):
    remove(pipe)
    return pipe(**flux_call_kwargs()).images


def test_dense_pattern_reproduces_the_stock_pipeline(pipe, stock_latents):
    apply(pipe, SparsityConfig(pattern=Dense(), block_size=32))
    try:
        latents = pipe(**flux_call_kwargs()).images
        assert sum(sparsity_state(pipe).sparse_calls.values()) == 3 * LAYERS  # really our path, every block
    finally:
        remove(pipe)
    torch.testing.assert_close(latents, stock_latents, atol=1e-5, rtol=1e-5)


def test_sparse_calls_equal_masked_attention_and_remove_restores_stock(pipe, stock_latents, recorded):
    stock = dict(pipe.transformer.attn_processors)
    apply(pipe, PATTERN, block_size=32)
    latents = pipe(**flux_call_kwargs()).images
    assert not torch.allclose(latents, stock_latents)  # the pattern really changed something
    grid = image_grid()
    assert sparsity_state(pipe).grid == grid
    mask = PATTERN.token_mask(grid)
    assert len(recorded) == 3 * LAYERS  # steps x (double + single blocks)
    for q, k, v, layout, out in recorded:
        assert layout.num_tokens == grid.num_tokens
        torch.testing.assert_close(out.double(), masked_attention(q, k, v, mask), atol=1e-5, rtol=1e-5)
    remove(pipe)
    assert pipe.transformer.attn_processors == stock
    assert not pipe.transformer._forward_pre_hooks
    torch.testing.assert_close(pipe(**flux_call_kwargs()).images, stock_latents, atol=0, rtol=0)


def test_sparse_processor_equals_stock_processor_with_the_pattern_mask(pipe):
    """End to end per layer, double- and single-stream: the whole sparse processor (both streams'
    projections and norms, [text, image] order, rotary) equals the stock processor given the
    pattern's token mask as attention mask."""
    inputs, outputs = {}, {}

    def keep_inputs(module, args, kwargs):
        inputs[module] = dict(kwargs)

    def keep_outputs(module, args, kwargs, output):
        outputs[module] = output

    transformer = pipe.transformer
    attns = [b.attn for b in transformer.transformer_blocks] + [b.attn for b in transformer.single_transformer_blocks]
    apply(pipe, PATTERN, block_size=32)
    handles = [a.register_forward_pre_hook(keep_inputs, with_kwargs=True) for a in attns]
    handles += [a.register_forward_hook(keep_outputs, with_kwargs=True) for a in attns]
    try:
        pipe(**flux_call_kwargs(steps=1))
    finally:
        for handle in handles:
            handle.remove()
    mask = PATTERN.token_mask(sparsity_state(pipe).grid)
    remove(pipe)
    for attn in attns:
        kwargs = inputs[attn]
        expected = attn.processor(
            attn, kwargs["hidden_states"], kwargs.get("encoder_hidden_states"), mask, kwargs["image_rotary_emb"]
        )
        unmasked = attn.processor(
            attn, kwargs["hidden_states"], kwargs.get("encoder_hidden_states"), None, kwargs["image_rotary_emb"]
        )
        got = outputs[attn]
        if isinstance(got, torch.Tensor):  # single-stream blocks return one tensor
            got, expected, unmasked = (got,), (expected,), (unmasked,)
        assert len(got) == len(expected) == (2 if attn.added_kv_proj_dim is not None else 1)
        for a, b, c in zip(got, expected, unmasked):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(got[0], unmasked[0], atol=1e-4)  # the mask matters at these sizes


def test_image_grid_comes_from_img_ids():
    assert image_grid_shape(latent_ids(8, 6), 48) == (8, 6)
    assert image_grid_shape(latent_ids(1, 5), 5) == (1, 5)
    assert image_grid_shape(latent_ids(8, 6)[None], 48) == (8, 6)  # deprecated batched ids
    assert image_grid_shape(latent_ids(8, 6) + torch.tensor([0.0, 3.0, 2.0]), 48) == (8, 6)  # offset positions
    assert image_grid_shape(latent_ids(8, 6), 47) is None  # does not match the sequence
    assert image_grid_shape(latent_ids(6, 8).flip(0), 48) is None  # not raster order
    kontext = torch.cat([latent_ids(4, 6), latent_ids(4, 6, first=1.0)])  # generated + reference image
    assert image_grid_shape(kontext, 48) is None
    # FLUX.1 at 1024x1024: 64x64 packed tokens.
    adapter = FluxAdapter()
    grid = adapter.grid_from_call(None, (), {"hidden_states": torch.empty(1, 4096, 1),
                                             "encoder_hidden_states": torch.empty(1, 512, 1),
                                             "img_ids": latent_ids(64, 64)})
    assert grid == VideoGrid(1, 64, 64, text_tokens=512, text_position="start")


def test_multi_image_ids_run_every_layer_stock(pipe):
    """Kontext-style inputs (a reference image appended to the sequence) are not one grid: no
    layer is sparsified and the output equals the stock transformer's."""
    transformer = pipe.transformer
    generator = torch.Generator().manual_seed(3)
    inputs = dict(
        hidden_states=torch.randn(1, 48, 16, generator=generator),
        encoder_hidden_states=torch.randn(1, TEXT_TOKENS, 32, generator=generator),
        pooled_projections=torch.randn(1, 16, generator=generator),
        timestep=torch.tensor([0.5]), guidance=torch.tensor([3.5]),
        img_ids=torch.cat([latent_ids(4, 6), latent_ids(4, 6, first=1.0)]), txt_ids=torch.zeros(TEXT_TOKENS, 3),
        return_dict=False,
    )
    with torch.no_grad():
        expected = transformer(**inputs)[0]
        apply(pipe, PATTERN, block_size=32)
        try:
            with pytest.warns(DenseFallbackWarning, match="Kontext"):
                got = transformer(**inputs)[0]
            assert sparsity_state(pipe).grid is None and not sparsity_state(pipe).sparse_calls
        finally:
            remove(pipe)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_dense_warm_up_steps_last_steps_and_layers_are_honoured(pipe):
    config = SparsityConfig(pattern=Radial(block_size=32), dense_steps=1, dense_last_steps=1, dense_layers=(-1,),
                            block_size=32)
    apply(pipe, config)
    try:
        pipe(**flux_call_kwargs(steps=4))
        calls = sparsity_state(pipe).sparse_calls
    finally:
        remove(pipe)
    # 4 steps: step 0 (warm-up) and step 3 (last) dense; layer 2 (= -1, the last single block) dense.
    assert dict(calls) == {(1, 0): 1, (1, 1): 1, (2, 0): 1, (2, 1): 1}


def test_dense_layers_by_name_filter(pipe):
    apply(pipe, SparsityConfig(pattern=Dense(), dense_layers=("single_transformer_blocks.*",), block_size=32))
    try:
        pipe(**flux_call_kwargs(steps=2))
        layers = {layer for _, layer in sparsity_state(pipe).sparse_calls}
    finally:
        remove(pipe)
    assert layers == {0}  # only the double-stream block


def test_two_resolutions_use_two_layouts(pipe, recorded):
    apply(pipe, SparsityConfig(pattern=PATTERN, block_size=32))
    try:
        pipe(**flux_call_kwargs(steps=1, height=128, width=96))
        pipe(**flux_call_kwargs(steps=1, height=64, width=112))
    finally:
        remove(pipe)
    sizes = sorted({layout.num_tokens for *_, layout, _ in recorded})
    assert sizes == [4 * 7 + TEXT_TOKENS, 8 * 6 + TEXT_TOKENS]


def test_batch_of_two_prompts_with_true_cfg(pipe, recorded):
    apply(pipe, PATTERN, block_size=32)
    try:
        latents = pipe(**flux_call_kwargs(batch=2, steps=2, true_cfg_scale=2.0)).images
        calls = sparsity_state(pipe).sparse_calls
    finally:
        remove(pipe)
    assert latents.shape[0] == 2 and torch.isfinite(latents).all()
    assert dict(calls) == {(step, layer): 2 for step in range(2) for layer in range(LAYERS)}  # cond + uncond
    mask = PATTERN.token_mask(image_grid())
    assert all(q.shape[0] == 2 for q, *_ in recorded)
    for q, k, v, _, out in recorded:
        torch.testing.assert_close(out.double(), masked_attention(q, k, v, mask), atol=1e-5, rtol=1e-5)


def test_applying_twice_replaces_instead_of_stacking(pipe):
    assert type(find_adapter(pipe)).__name__ == "FluxAdapter"
    apply(pipe, Dense(), block_size=32)
    apply(pipe, Radial(block_size=32), block_size=32)
    try:
        transformer = pipe.transformer
        processors = [transformer.transformer_blocks[0].attn.processor] + [
            b.attn.processor for b in transformer.single_transformer_blocks
        ]
        assert all(isinstance(p, FluxSparseAttnProcessor) for p in processors)
        assert type(processors[0].stock).__name__ == "FluxAttnProcessor"  # wraps the stock one, not ours
        assert len({id(p) for p in processors}) == LAYERS  # per-layer objects, never one shared instance
        assert [p.layer_index for p in processors] == [0, 1, 2]
        assert len(transformer._forward_pre_hooks) == 1
        assert isinstance(sparsity_state(pipe).config.pattern, Radial)
    finally:
        remove(pipe)


def test_unknown_stock_processor_is_kept_and_masked_calls_fall_back(pipe):
    stranger = object()
    assert FluxAdapter().make_processor(stranger, None, 0) is stranger
    apply(pipe, PATTERN, block_size=32)
    try:
        attn = pipe.transformer.single_transformer_blocks[0].attn
        state = sparsity_state(pipe)
        state.begin_call(VideoGrid(1, 2, 2, text_tokens=3, text_position="start"), None)
        hidden = torch.randn(1, 7, 32)
        mask = torch.ones(7, 7, dtype=torch.bool)
        got, want = attn.processor(attn, hidden, None, mask), attn.processor.stock(attn, hidden, None, mask)
        torch.testing.assert_close(got, want, atol=0, rtol=0)
        attn.processor(attn, torch.randn(1, 9, 32))  # not the published grid's length
        assert not state.sparse_calls
    finally:
        remove(pipe)


@pytest.mark.parametrize("order", ["lora_then_apply", "apply_then_lora"])
def test_lora_loaded_before_or_after_apply_is_used(order, tmp_path):
    reference = tiny_flux_pipeline()
    lora_dir = add_and_save_random_lora(reference, tmp_path / "lora", JOINT_ATTENTION_TARGETS)
    expected = reference(**flux_call_kwargs(steps=2)).images  # stock processors + LoRA
    def half_scale():  # LoRA scale passed through the call (fresh generator each time)
        return dict(flux_call_kwargs(steps=2), joint_attention_kwargs={"scale": 0.5})

    half = reference(**half_scale()).images

    pipe = tiny_flux_pipeline()
    without_lora = pipe(**flux_call_kwargs(steps=2)).images
    load_lora_around_apply(pipe, lora_dir, order)
    latents = pipe(**flux_call_kwargs(steps=2)).images
    assert sum(sparsity_state(pipe).sparse_calls.values()) == 2 * LAYERS  # our processors ran
    assert not torch.allclose(latents, without_lora, atol=1e-4)
    torch.testing.assert_close(latents, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(pipe(**half_scale()).images, half, atol=1e-4, rtol=1e-4)
