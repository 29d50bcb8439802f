"""The processor template: what every family shares (construction the diffusers way, the stock
classes and attention op it relies on, the copied diffusers code, the fallback rules)."""

from __future__ import annotations

import importlib
import inspect
import textwrap
import warnings

import pytest
import torch

from diffattn import Dense, DenseFallbackWarning, Neighborhood, UserError
from diffattn.adapters import ADAPTERS, apply, remove, sparsity_state
from diffattn.processors import SparsityConfig, mochi
from diffattn.processors import state as state_module
from diffattn.processors.base import SparseAttnProcessor

from ..adapters.tiny_pipelines import tiny_wan_pipeline, wan_call_kwargs

FAMILIES = [adapter.processor_class for adapter in ADAPTERS]


def _stock_class(processor_class: type[SparseAttnProcessor], name: str) -> type:
    module = importlib.import_module(processor_class.default_stock.partition(":")[0])
    return getattr(module, name)


@pytest.mark.parametrize("processor_class", FAMILIES, ids=lambda c: c.__name__)
def test_every_family_is_constructible_without_arguments_and_names_real_stock_classes(processor_class):
    processor = processor_class()  # how diffusers re-creates processors (IP-Adapter load/unload)
    assert type(processor.stock).__name__ == processor_class.stock_classes[0] and processor.state is None
    for name in processor_class.stock_classes[1:]:
        _stock_class(processor_class, name)  # the other classes it accepts still exist
    stock_call = type(processor.stock).__call__
    # diffusers filters the keyword arguments it passes by the processor's signature: ours is the stock one.
    assert list(inspect.signature(processor.__call__).parameters) == list(inspect.signature(stock_call).parameters)[1:]
    if processor_class.attention_global:
        # The op we replace is really what the stock __call__ reaches its attention through.
        assert processor_class.attention_global in stock_call.__code__.co_names


def normalised(source: str) -> list[str]:
    lines = textwrap.dedent(source).splitlines()
    return [line.rstrip() for line in lines if line.strip() and not line.strip().startswith("#")]


def test_copied_diffusers_code_matches_the_installed_diffusers():
    """Mochi's rotary helper is a marked copy of the one inside diffusers' Mochi processor: a
    diffusers upgrade that changes it must fail here."""
    from diffusers.models.attention_processor import MochiAttnProcessor2_0

    ours = inspect.getsource(mochi.apply_rotary_emb)
    marker = "# Copied from diffusers.models.attention_processor.MochiAttnProcessor2_0.__call__.apply_rotary_emb"
    assert marker in inspect.getsource(mochi)
    stock = inspect.getsource(MochiAttnProcessor2_0.__call__)
    start = stock.rindex("\n", 0, stock.index("def apply_rotary_emb(")) + 1
    end = stock.index("query = apply_rotary_emb(", start)
    assert normalised(ours) == normalised(stock[start:end])


def test_the_stock_module_is_not_patched():
    from diffusers.models.transformers import transformer_wan

    original = transformer_wan.dispatch_attention_fn
    pipe = tiny_wan_pipeline()
    apply(pipe, Dense(), block_size=32)
    try:
        pipe(**wan_call_kwargs(steps=1))
        assert sparsity_state(pipe).sparse_calls
        assert transformer_wan.dispatch_attention_fn is original
        assert transformer_wan.WanAttnProcessor.__call__.__globals__["dispatch_attention_fn"] is original
    finally:
        remove(pipe)


@pytest.fixture(scope="module")
def wan():
    pipe = tiny_wan_pipeline()
    return pipe, pipe(**wan_call_kwargs(steps=2)).frames


@pytest.fixture
def refusing_kernel(monkeypatch):
    """The kernel refuses every input (as a GPU backend refuses an unsupported head dim)."""
    reason = "head_dim=8 is not supported by this backend"
    monkeypatch.setattr(state_module, "support_problems", lambda q, k, v, layout, backend: [reason])
    return reason


def test_a_refused_call_runs_stock_warns_once_and_is_counted(wan, refusing_kernel):
    pipe, expected = wan
    apply(pipe, Neighborhood(kernel_size=(1, 3, 3)), block_size=32)
    try:
        with pytest.warns(DenseFallbackWarning, match=refusing_kernel) as caught:
            latents = pipe(**wan_call_kwargs(steps=2)).frames
        state = sparsity_state(pipe)
        assert len([w for w in caught if issubclass(w.category, DenseFallbackWarning)]) == 1
        assert state.fallbacks == {refusing_kernel: 2 * 2 * 2}  # steps x (cond, uncond) x layers
        assert not state.sparse_calls
    finally:
        remove(pipe)
    torch.testing.assert_close(latents, expected, atol=0, rtol=0)


def test_on_unsupported_raise_names_the_reason(wan, refusing_kernel):
    pipe, _ = wan
    apply(pipe, SparsityConfig(pattern=Dense(), block_size=32, on_unsupported="raise"))
    try:
        with pytest.raises(UserError, match=refusing_kernel):
            pipe(**wan_call_kwargs(steps=1))
    finally:
        remove(pipe)


def test_dense_steps_and_layers_are_not_fallbacks(wan, refusing_kernel):
    pipe, expected = wan
    apply(pipe, SparsityConfig(pattern=Dense(), block_size=32, dense_steps=2))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", DenseFallbackWarning)
            latents = pipe(**wan_call_kwargs(steps=2)).frames
        assert not sparsity_state(pipe).fallbacks
    finally:
        remove(pipe)
    torch.testing.assert_close(latents, expected, atol=0, rtol=0)


def test_a_processor_without_state_runs_stock_with_a_warning():
    from diffusers import WanTransformer3DModel

    transformer = tiny_wan_pipeline().transformer
    assert isinstance(transformer, WanTransformer3DModel)
    attn = transformer.blocks[0].attn1
    hidden = torch.randn(1, 12, attn.inner_dim)
    processor = type(ADAPTERS[0].processor_class())()
    expected = attn.processor(attn, hidden)
    with pytest.warns(DenseFallbackWarning, match="no SparsityState"):
        got = processor(attn, hidden)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_the_profiler_reports_fallbacks(wan, refusing_kernel):
    import diffattn

    pipe, _ = wan
    call = {k: v for k, v in wan_call_kwargs(steps=2).items() if k not in ("generator", "output_type")}
    with pytest.warns(DenseFallbackWarning):
        report = diffattn.profile(pipe, SparsityConfig(pattern=Dense(), block_size=32), warmup=0, **call)
    assert report.fallbacks == {refusing_kernel: 2 * 2 * 2} and report.sparse_calls == 0
    assert f"calls that fell back to the stock dense attention: 8\n- 8 x {refusing_kernel}" in report.to_markdown()


def test_a_stock_processor_diffattn_does_not_reproduce_is_kept_with_a_warning(wan):
    """The whitelist holds for every family (here Wan): a stranger keeps its layer, dense, and says so."""
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    class StrangerProcessor(WanAttnProcessor):
        pass

    pipe, expected = wan
    stranger = StrangerProcessor()
    pipe.transformer.blocks[1].attn1.set_processor(stranger)
    try:
        with pytest.raises(UserError, match="StrangerProcessor"):
            apply(pipe, SparsityConfig(pattern=Dense(), block_size=32, on_unsupported="raise"))
        assert pipe.transformer.blocks[1].attn1.processor is stranger
        apply(pipe, Dense(), block_size=32)
        assert pipe.transformer.blocks[1].attn1.processor is stranger
        with pytest.warns(DenseFallbackWarning, match="StrangerProcessor"):
            latents = pipe(**wan_call_kwargs(steps=2)).frames
        state = sparsity_state(pipe)
        assert {layer for _, layer in state.sparse_calls} == {0}
        assert sum(state.fallbacks.values()) == 2 * 2  # steps x (cond, uncond)
        remove(pipe)
        assert pipe.transformer.blocks[1].attn1.processor is stranger
    finally:
        remove(pipe)
        pipe.transformer.blocks[1].attn1.set_processor(WanAttnProcessor())
    torch.testing.assert_close(latents, expected, atol=1e-5, rtol=1e-5)


def test_a_deep_copied_transformer_runs_its_own_processors(wan):
    import copy

    pipe, _ = wan
    apply(pipe, Dense(), block_size=32)
    try:
        pipe(**wan_call_kwargs(steps=1))  # builds the intercepted stock calls
        clone = copy.deepcopy(pipe.transformer)
        processor = clone.blocks[0].attn1.processor
        assert processor._intercepted is None and processor.state is not sparsity_state(pipe)
    finally:
        remove(pipe)
