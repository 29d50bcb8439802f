"""FreeSwim (diffattn.FreeSwim): window, log-length scale, guide branch and its cache, on tiny pipelines.

The reference for the dual path is independent of diffattn: the stock diffusers transformer run
with its attention op replaced by plain SDPA over the brute-force token mask of the window, the
full branch's cross-attention copied to both halves, and the cache replayed by hand.
"""

from __future__ import annotations

import math
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import diffattn
from diffattn import FreeSwim, Neighborhood, UserError, VideoGrid
from diffattn.adapters import sparsity_state
from diffattn.processors.freeswim import log_length_factor

from ..adapters.tiny_pipelines import tiny_wan_pipeline, wan_call_kwargs
from ..pipelines.tiny_embedded import run as run_embedded
from ..pipelines.tiny_embedded import tiny_embedded_pipeline
from ..threads import one_thread  # noqa: F401 (autouse fixture)

QUIET = dict(category=diffattn.DenseFallbackWarning)


def _latents(pipe, **overrides):
    return pipe(**wan_call_kwargs(**overrides))[0]


@pytest.fixture(scope="module")
def wan():
    return tiny_wan_pipeline()


# -- exactness against the stock pipeline ---------------------------------------------------------


def test_a_covering_window_without_scale_and_guide_every_step_equals_the_stock_wan_pipeline(wan):
    stock = _latents(wan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", **QUIET)
        diffattn.apply(wan, FreeSwim(window=(64, 64), scale=None, cache_steps=1))
        try:
            freeswim = _latents(wan)
            state = sparsity_state(wan)
            assert state.guide_steps == [0, 1, 2] and sum(state.sparse_calls.values()) > 0
        finally:
            diffattn.remove(wan)
    torch.testing.assert_close(freeswim, stock, rtol=1e-4, atol=1e-5)


def test_the_embedded_pipeline_without_a_cache_context_is_named_by_call_order():
    pipe = tiny_embedded_pipeline()
    stock = run_embedded(pipe, size=32, steps=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", **QUIET)
        diffattn.apply(pipe, FreeSwim(window=(8, 8), scale=None, cache_steps=1))
        try:
            freeswim = run_embedded(pipe, size=32, steps=3)
            assert sparsity_state(pipe).guide_steps == [0, 1, 2]
        finally:
            diffattn.remove(pipe)
    torch.testing.assert_close(torch.as_tensor(freeswim), torch.as_tensor(stock), rtol=1e-4, atol=1e-5)


def test_remove_frees_the_cache_and_restores_the_stock_transformer(wan):
    transformer = wan.transformer
    processors = {k: type(v) for k, v in transformer.attn_processors.items()}
    stock = _latents(wan, steps=2)
    diffattn.apply(wan, FreeSwim(window=(2, 2), cache_steps=2))
    changed = _latents(wan, steps=2)
    state = sparsity_state(wan)
    assert state.cache_bytes > 0 and state.guide_steps == [0]
    diffattn.remove(wan)
    assert state.cache_bytes == 0 and not state.cache
    assert {k: type(v) for k, v in transformer.attn_processors.items()} == processors
    assert not transformer._forward_pre_hooks and not transformer._forward_hooks
    assert "forward" not in transformer.__dict__
    assert not (changed == stock).all()
    assert torch.equal(_latents(wan, steps=2), stock)


def test_offloaded_cache_lives_on_the_cpu_and_gives_the_same_output(wan):
    outputs = {}
    for offload in (False, True):
        diffattn.apply(wan, FreeSwim(window=(2, 2), cache_steps=3, offload_cache=offload))
        try:
            outputs[offload] = _latents(wan, steps=3)
            state = sparsity_state(wan)
            assert state.cache and all(t.device.type == "cpu" for t in state.cache.values())
            assert state.cache_bytes == sum(t.numel() * 4 for t in state.cache.values())
        finally:
            diffattn.remove(wan)
    assert torch.equal(outputs[False], outputs[True])


def test_guide_steps_are_every_cache_steps_th_step(wan):
    diffattn.apply(wan, "freeswim", window=(2, 2), cache_steps=2)
    try:
        _latents(wan, steps=5)
        assert sparsity_state(wan).guide_steps == [0, 2, 4]
        _latents(wan, steps=1)  # a new run never reuses the last run's cache, even at the same step
        _latents(wan, steps=1)
        assert sparsity_state(wan).guide_steps == [0, 2, 4, 0, 0]
    finally:
        diffattn.remove(wan)


# -- the dual path against an independent reference -------------------------------------------------


class ReferenceAttention:
    """Stands in for diffusers' ``dispatch_attention_fn`` inside the stock Wan processor: plain SDPA,
    the window by its brute-force token mask, the full branch's cross-attention used for both halves
    (``dual``) or the recorded cross-attention outputs replayed (``replay``)."""

    def __init__(self, mask: torch.Tensor, factor: float) -> None:
        self.mask, self.factor = mask, factor
        self.dual, self.replay, self.recorded = False, None, []

    def __call__(self, query, key, value, attn_mask=None, **kwargs):  # [B, N, H, D]
        def sdpa(q, k, v, mask=None):
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  attn_mask=mask).transpose(1, 2)

        half = query.shape[0] // 2 if self.dual else query.shape[0]
        if key.shape[1] == query.shape[1]:  # self-attention
            query = query * self.factor
            window = sdpa(query[:half], key[:half], value[:half], self.mask)
            return torch.cat([window, sdpa(query[half:], key[half:], value[half:])]) if self.dual else window
        if self.replay is not None:
            return self.replay.pop(0)
        if not self.dual:
            return sdpa(query, key, value)
        full = sdpa(query[half:], key[half:], value[half:])
        self.recorded.append(full)
        return torch.cat([full, full])


def _tiny_transformer():
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                 out_channels=4, text_dim=32, freq_dim=32, ffn_dim=32, num_layers=2,
                                 cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)


def test_guide_and_cached_steps_match_an_sdpa_reference_of_the_dual_path(monkeypatch):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.models.transformers import transformer_wan

    transformer = _tiny_transformer()
    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(4)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 2, 12, 16, generator=generator)  # grid 2 x 6 x 8
    cond, uncond = torch.randn(1, 5, 32, generator=generator), torch.randn(1, 5, 32, generator=generator)
    window, grid = (3, 4), VideoGrid(2, 6, 8)
    factor = math.sqrt(math.log(6 * 8) / math.log(3 * 4))  # sqrt(log_{n_train}(n_target)) * sqrt(d) / sqrt(d)
    assert factor == pytest.approx(log_length_factor(window, grid))

    def call(context, t, text):
        with transformer.cache_context(context):
            return transformer(x, scheduler.timesteps[t].expand(1), text, return_dict=False)[0]

    pipe = SimpleNamespace(transformer=transformer, scheduler=scheduler)
    diffattn.apply(pipe, FreeSwim(window=window, cache_steps=2, block_size=32))
    try:
        ours = [(call("cond", t, cond), call("uncond", t, uncond)) for t in (0, 1)]
        assert sparsity_state(pipe).guide_steps == [0]
    finally:
        diffattn.remove(pipe)

    reference = ReferenceAttention(Neighborhood(kernel_size=(None, *window)).token_mask(grid), factor)
    monkeypatch.setattr(transformer_wan, "dispatch_attention_fn", reference)
    twice = torch.cat([x, x])
    reference.dual = True
    guide = transformer(twice, scheduler.timesteps[0].expand(2), torch.cat([cond, cond]), return_dict=False)[0][:1]
    reference.dual = False
    uncond_0 = transformer(x, scheduler.timesteps[0].expand(1), uncond, return_dict=False)[0]
    reference.replay = list(reference.recorded)
    cached = transformer(x, scheduler.timesteps[1].expand(1), cond, return_dict=False)[0]
    reference.replay = None
    uncond_1 = transformer(x, scheduler.timesteps[1].expand(1), uncond, return_dict=False)[0]
    for got, want in zip([t for pair in ours for t in pair], [guide, uncond_0, cached, uncond_1]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# -- configuration and refusals ---------------------------------------------------------------------


@pytest.mark.parametrize("arguments, needle", [
    (dict(cache_steps=0), "cache_steps.*>= 1, got 0"),
    (dict(window=(0, 4)), r"window.*\(0, 4\)"),
    (dict(window=8), "window.*8"),
    (dict(scale="sqrt"), "scale.*'sqrt'"),
    (dict(offload_cache="yes"), "offload_cache.*'yes'"),
    (dict(windows=(2, 2)), "unknown FreeSwim argument.*windows"),
])
def test_bad_configurations_are_user_errors_naming_the_value(arguments, needle):
    with pytest.raises(UserError, match=needle):
        FreeSwim(**arguments)


def test_the_preset_is_a_freeswim_config_whose_window_resolves_to_the_native_size(wan):
    config = diffattn.processors.presets.load_preset("freeswim", family="wan").config
    assert isinstance(config, FreeSwim) and config.window is None and config.cache_steps == 2
    diffattn.apply(wan, "freeswim")
    try:
        assert sparsity_state(wan).window == (30, 52) and sparsity_state(wan).config == config
    finally:
        diffattn.remove(wan)
    embedded = tiny_embedded_pipeline()
    diffattn.apply(embedded, config)
    assert sparsity_state(embedded).window == (8, 8)
    diffattn.remove(embedded)


def test_a_covering_window_is_dense_with_a_note(wan):
    diffattn.apply(wan, FreeSwim(window=(30, 52)))
    try:
        with pytest.warns(diffattn.DenseFallbackWarning, match="covers the 4x4 latent frame"):
            _latents(wan, steps=1)
    finally:
        diffattn.remove(wan)


def test_joint_attention_families_are_refused_naming_the_supported_ones():
    from ..adapters.tiny_flux import tiny_flux_pipeline

    with pytest.raises(UserError, match="FreeSwim supports the model families wan.*joint attention"):
        diffattn.apply(tiny_flux_pipeline(), FreeSwim())


def test_sparse_processors_refuses_freeswim(wan):
    with pytest.raises(UserError, match=r"diffattn.apply\(pipe, FreeSwim"):
        diffattn.sparse_processors(wan.transformer, FreeSwim(window=(2, 2)))


def test_a_third_call_on_the_same_latents_is_refused():
    pipe = tiny_embedded_pipeline()
    diffattn.apply(pipe, FreeSwim(window=(2, 2)))
    x = torch.randn(1, 3, 1, 16, 16)
    text = torch.randn(1, 4, pipe.transformer.config.text_dim)
    try:
        pipe.transformer(x, torch.tensor([500.0]), text)
        pipe.transformer(x, torch.tensor([500.0]), text)
        with pytest.raises(UserError, match="third time on the same latents"):
            pipe.transformer(x, torch.tensor([500.0]), text)
    finally:
        diffattn.remove(pipe)


def test_another_cross_attention_processor_installed_after_freeswim_is_refused(wan):
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    diffattn.apply(wan, FreeSwim(window=(2, 2)))
    try:
        wan.transformer.blocks[0].attn2.set_processor(WanAttnProcessor())
        with pytest.raises(UserError, match="blocks.0.attn2 runs WanAttnProcessor.*do not compose"):
            _latents(wan, steps=1)
    finally:
        diffattn.remove(wan)


# -- Wan 2.2 A14B (two transformers) and image-to-video -----------------------------------------------


def _i2v_or_22(variant):
    from ..adapters import test_wan22_i2v as wan22

    if variant == "2.2-a14b-t2v":
        return wan22.tiny_wan22_pipeline(), wan22.call_kwargs()
    return wan22.tiny_wan_i2v_pipeline(variant), wan22.i2v_call_kwargs(variant)


@pytest.mark.parametrize("variant", ["2.2-a14b-t2v", "2.1", "2.2-ti2v"])
def test_a_covering_window_without_scale_equals_stock_on_wan22_and_image_to_video(variant):
    pipe, call = _i2v_or_22(variant)
    stock = pipe(**call)[0]
    pipe, call = _i2v_or_22(variant)  # fresh generators
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", **QUIET)
        diffattn.apply(pipe, FreeSwim(window=(64, 64), scale=None, cache_steps=1))
        try:
            freeswim = pipe(**call)[0]
        finally:
            diffattn.remove(pipe)
    torch.testing.assert_close(freeswim, stock, rtol=1e-4, atol=1e-5)


def test_each_wan22_transformer_keeps_its_own_guide_schedule_and_cache():
    from ..adapters import test_wan22_i2v as wan22

    pipe = wan22.tiny_wan22_pipeline()
    diffattn.apply(pipe, FreeSwim(window=(2, 2), cache_steps=2))
    try:
        pipe(**wan22.call_kwargs())  # steps 0-1 on transformer, 2-3 on transformer_2
        high, low = sparsity_state(pipe), sparsity_state(pipe, "transformer_2")
        assert high.guide_steps == [0] and low.guide_steps == [2]
        assert high.cache_bytes > 0 and low.cache_bytes > 0
    finally:
        diffattn.remove(pipe)
    assert high.cache_bytes == 0 and low.cache_bytes == 0


def test_the_profiler_sees_the_resolved_window_not_the_placeholder():
    from diffattn.profiler.timing import AttentionTimer

    pipe = tiny_embedded_pipeline()
    diffattn.apply(pipe, "freeswim")  # window None: the embedded model's 8 x 8 tokens
    timer = AttentionTimer(torch.device("cpu"))
    try:
        timer.attach([sparsity_state(pipe)])
        run_embedded(pipe, size=80, steps=1)
        calls = timer.finish()
    finally:
        timer.detach()
        diffattn.remove(pipe)
    assert calls and {call.config.pattern for call in calls} == {Neighborhood(kernel_size=(None, 8, 8))}
