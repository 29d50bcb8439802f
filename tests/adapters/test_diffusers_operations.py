"""diffusers' own operations after (and before) diffattn: FLUX IP-Adapter load/unload, CogVideoX
fused QKV in both orders, set_attn_processor of a stock processor. Each either keeps sparse
attention or drops it with a DenseFallbackWarning; never a crash, never silently."""

from __future__ import annotations

import warnings

import pytest
import torch

import diffattn
from diffattn import Dense, DenseFallbackWarning
from diffattn.adapters import apply, remove, sparsity_state
from diffattn.processors import CogVideoXSparseAttnProcessor, FluxSparseAttnProcessor

from .tiny_cogvideox import cogvideox_call_kwargs, tiny_cogvideox_pipeline
from .tiny_flux import TEXT_DIM, flux_call_kwargs, tiny_flux_pipeline

CLIP_DIM = 8  # the tiny image encoder's embedding size (the adapter is built in code, no encoder)
IP_TOKENS = 4  # diffusers' IP-Adapter projection makes 4 image tokens per image


def ip_adapter_state_dict(transformer: torch.nn.Module, seed: int = 0) -> dict:
    """A random FLUX IP-Adapter in the layout ``load_ip_adapter`` takes (image projection plus one
    ``to_k_ip``/``to_v_ip`` pair per double-stream block), built offline."""
    generator = torch.Generator().manual_seed(seed)
    inner = transformer.inner_dim

    def weight(*shape):
        return torch.randn(*shape, generator=generator) * 0.2

    image_proj = {"proj.weight": weight(IP_TOKENS * TEXT_DIM, CLIP_DIM), "proj.bias": weight(IP_TOKENS * TEXT_DIM),
                  "norm.weight": torch.ones(TEXT_DIM), "norm.bias": torch.zeros(TEXT_DIM)}
    ip_adapter = {}
    for block in range(len(transformer.transformer_blocks)):
        for name in ("to_k_ip", "to_v_ip"):
            ip_adapter[f"{block}.{name}.weight"] = weight(inner, TEXT_DIM)
            ip_adapter[f"{block}.{name}.bias"] = weight(inner)
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


def load_ip_adapter(pipe) -> None:
    pipe.load_ip_adapter(ip_adapter_state_dict(pipe.transformer), weight_name="tiny.safetensors",
                         image_encoder_pretrained_model_name_or_path=None)


def ip_call_kwargs() -> dict:
    embeds = torch.randn(1, 1, CLIP_DIM, generator=torch.Generator().manual_seed(7))
    return dict(flux_call_kwargs(steps=2), ip_adapter_image_embeds=[embeds], negative_ip_adapter_image_embeds=[embeds])


def single_stream_processors(pipe) -> list:
    return [block.attn.processor for block in pipe.transformer.single_transformer_blocks]


@pytest.mark.parametrize("order", ["load_then_apply", "apply_then_load"])
def test_flux_ip_adapter_keeps_sparse_single_stream_blocks_and_warns_for_the_others(order):
    stock = tiny_flux_pipeline()
    load_ip_adapter(stock)
    expected = stock(**ip_call_kwargs()).images

    pipe = tiny_flux_pipeline()
    if order == "load_then_apply":
        load_ip_adapter(pipe)
        apply(pipe, Dense(), block_size=32)
    else:
        apply(pipe, Dense(), block_size=32)
        load_ip_adapter(pipe)  # re-creates the single-stream processors from their class, no arguments
    try:
        assert all(isinstance(p, FluxSparseAttnProcessor) for p in single_stream_processors(pipe))
        with pytest.warns(DenseFallbackWarning, match="FluxIPAdapterAttnProcessor") as caught:
            images = pipe(**ip_call_kwargs()).images
        assert len([w for w in caught if issubclass(w.category, DenseFallbackWarning)]) == 1
        state = sparsity_state(pipe)
        # 2 steps x 2 single-stream layers ran sparse; the double-stream layer ran the IP processor.
        assert sum(state.sparse_calls.values()) == 2 * 2
        assert sum(state.fallbacks.values()) == 2 * 1
    finally:
        remove(pipe)
    torch.testing.assert_close(images, expected, atol=1e-5, rtol=1e-5)


def test_flux_unload_ip_adapter_after_apply_keeps_sparse_where_it_can():
    expected = tiny_flux_pipeline()(**flux_call_kwargs(steps=2)).images
    pipe = tiny_flux_pipeline()
    apply(pipe, Dense(), block_size=32)
    load_ip_adapter(pipe)
    pipe.unload_ip_adapter()  # single-stream: our class re-created again; double-stream: stock FluxAttnProcessor
    try:
        with pytest.warns(DenseFallbackWarning, match="FluxAttnProcessor, not a diffattn one"):
            images = pipe(**flux_call_kwargs(steps=2)).images
        assert sum(sparsity_state(pipe).sparse_calls.values()) == 2 * 2
    finally:
        remove(pipe)
    assert not any(isinstance(p, FluxSparseAttnProcessor) for p in pipe.transformer.attn_processors.values())
    torch.testing.assert_close(images, expected, atol=1e-5, rtol=1e-5)


def test_cogvideox_fuse_then_apply_runs_sparse_with_the_fused_projections():
    stock = tiny_cogvideox_pipeline()
    stock.fuse_qkv_projections()
    expected = stock(**cogvideox_call_kwargs(steps=2)).frames
    pipe = tiny_cogvideox_pipeline()
    pipe.fuse_qkv_projections()
    apply(pipe, Dense(), block_size=32)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", DenseFallbackWarning)
            latents = pipe(**cogvideox_call_kwargs(steps=2)).frames
        assert sum(sparsity_state(pipe).sparse_calls.values()) == 2 * 2
    finally:
        remove(pipe)
    torch.testing.assert_close(latents, expected, atol=1e-5, rtol=1e-5)


def test_cogvideox_apply_then_fuse_warns_and_runs_stock_then_unfuse_is_sparse_again():
    stock = tiny_cogvideox_pipeline()
    expected = stock(**cogvideox_call_kwargs(steps=2)).frames
    pipe = tiny_cogvideox_pipeline()
    apply(pipe, Dense(), block_size=32)
    try:
        pipe.fuse_qkv_projections()  # replaces our processors with one stock fused processor
        with pytest.warns(DenseFallbackWarning, match="FusedCogVideoXAttnProcessor2_0"):
            fused = pipe(**cogvideox_call_kwargs(steps=2)).frames
        state = sparsity_state(pipe)
        assert not state.sparse_calls and sum(state.fallbacks.values()) == 2 * 2
        pipe.unfuse_qkv_projections()  # brings back the processors it replaced: ours
        assert all(isinstance(block.attn1.processor, CogVideoXSparseAttnProcessor)
                   for block in pipe.transformer.transformer_blocks)
        unfused = pipe(**cogvideox_call_kwargs(steps=2)).frames
        assert sum(state.sparse_calls.values()) == 2 * 2
    finally:
        remove(pipe)
    torch.testing.assert_close(fused, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(unfused, expected, atol=1e-5, rtol=1e-5)


def test_set_attn_processor_of_a_stock_processor_after_apply_warns_and_remove_keeps_it():
    from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0

    pipe = tiny_cogvideox_pipeline()
    expected = pipe(**cogvideox_call_kwargs(steps=2)).frames
    apply(pipe, Dense(), block_size=32)
    user_processor = CogVideoXAttnProcessor2_0()
    pipe.transformer.set_attn_processor(user_processor)
    with pytest.warns(DenseFallbackWarning, match="CogVideoXAttnProcessor2_0, not a diffattn one"):
        latents = pipe(**cogvideox_call_kwargs(steps=2)).frames
    remove(pipe)
    assert all(p is user_processor for p in pipe.transformer.attn_processors.values())
    torch.testing.assert_close(latents, expected, atol=0, rtol=0)


def test_sparse_processors_is_what_apply_installs():
    """The diffusers habit: set_attn_processor(sparse_processors(...)) gives apply's output."""
    config = diffattn.SparsityConfig(pattern=diffattn.Neighborhood(kernel_size=(1, 3, 3)), block_size=32,
                                     dense_steps=1)
    pipe = tiny_cogvideox_pipeline()
    apply(pipe, config)
    with_apply = pipe(**cogvideox_call_kwargs(steps=3)).frames
    applied_calls = dict(sparsity_state(pipe).sparse_calls)
    remove(pipe)
    stock = dict(pipe.transformer.attn_processors)

    pipe.transformer.set_attn_processor(diffattn.sparse_processors(pipe.transformer, config, scheduler=pipe.scheduler))
    by_hand = pipe(**cogvideox_call_kwargs(steps=3)).frames
    assert dict(sparsity_state(pipe).sparse_calls) == applied_calls == {(1, 0): 1, (1, 1): 1, (2, 0): 1, (2, 1): 1}
    diffattn.remove(pipe)
    assert pipe.transformer.attn_processors == stock
    assert not pipe.transformer._forward_pre_hooks
    torch.testing.assert_close(by_hand, with_apply, atol=0, rtol=0)


def test_sparse_processors_without_a_scheduler_runs_every_step_sparse():
    pipe = tiny_cogvideox_pipeline()
    config = diffattn.SparsityConfig(pattern=Dense(), block_size=32, dense_steps=1)
    pipe.transformer.set_attn_processor(diffattn.sparse_processors(pipe.transformer, config))
    try:
        pipe(**cogvideox_call_kwargs(steps=2))
        assert dict(sparsity_state(pipe).sparse_calls) == {(None, 0): 2, (None, 1): 2}
    finally:
        diffattn.remove(pipe.transformer)
    assert not any(isinstance(p, CogVideoXSparseAttnProcessor) for p in pipe.transformer.attn_processors.values())
