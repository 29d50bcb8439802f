"""PSA in pipelines (issue 25 item 4): the psa presets of every family, per-call plans, step-based
warm-up, the profiler's level shares and planning time."""

import pytest
import torch

from diffattn import PyramidSparse, SparsityConfig, UserError, VideoGrid
from diffattn.adapters import apply, remove, sparsity_state
from diffattn.processors.presets import load_preset, preset_density, preset_layout

from .test_presets_fit import _pipeline_and_sizes

# The independent reference backend (dense masked attention over pooled keys); test_presets_fit runs the psa
# presets on the default backend (the CPU path), which tests/kernels compares with the reference.
REFERENCE = dict(backend="reference")
# The video families ship psa presets (the SD/SDXL UNet families do not).
VIDEO_FAMILIES = ["cogvideox", "flux", "hunyuan_video", "ltx_video", "mochi", "wan"]


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
@pytest.mark.parametrize("name", ["psa", "psa-fast"])
def test_psa_presets_load_for_every_family(family, name):
    preset = load_preset(name, family=family)
    pattern = preset.config.pattern
    assert isinstance(pattern, PyramidSparse) and pattern.mode == "topk"
    assert preset.config.dense_steps > 0 and preset.config.dense_layers == (0,)
    expected = {"psa": 0.15, "psa-fast": 0.10}[name]
    assert abs(preset_density(preset.config, VideoGrid(21, 30, 52)) - expected) < 1e-9
    with pytest.raises(UserError, match=r"plan\(q, k"):
        preset_layout(preset.config, VideoGrid(2, 4, 4))


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_psa_runs_sparse_on_every_family_with_pooled_tiles(family):
    pipe, (small, large) = _pipeline_and_sizes(family)
    apply(pipe, "psa", dense_steps=0, dense_layers=(), block_size=32, **REFERENCE)
    state = sparsity_state(pipe)
    state.plan_log = []  # keep every plan (what the profiler does)
    try:
        output = pipe(**large)[0]
        assert torch.isfinite(torch.as_tensor(output)).all()
        assert sum(state.sparse_calls.values()) > 0 and not state.fallbacks
        layouts = [layout for _, layout in state.plan_log]
        # One plan per sparse call (joint attention with padded text plans its video part), per head.
        assert len(layouts) >= sum(state.sparse_calls.values())
        assert all(layout.kv_levels is not None and layout.num_heads > 1 for layout in layouts)
        assert any(layout.is_pooled for layout in layouts)
    finally:
        remove(pipe)


def test_all_full_plans_reproduce_the_stock_pipeline():
    # Every block at level 1 is dense attention: the output must be the stock pipeline's.
    pipe, (_, large) = _pipeline_and_sizes("wan")
    stock = pipe(**large)[0]
    pattern = PyramidSparse(levels={1: 1.0}, min_full=0)
    apply(pipe, SparsityConfig(pattern=pattern, block_size=32, **REFERENCE))
    try:
        _, (_, again) = _pipeline_and_sizes("wan")
        sparse = pipe(**again)[0]
        assert sum(sparsity_state(pipe).sparse_calls.values()) > 0
        assert torch.allclose(torch.as_tensor(sparse), torch.as_tensor(stock), atol=1e-4)
    finally:
        remove(pipe)


def test_warm_up_follows_the_denoising_step_not_a_call_counter():
    from ..adapters.tiny_pipelines import tiny_wan_pipeline, wan_call_kwargs

    pipe = tiny_wan_pipeline()
    # Guidance 5: two transformer calls per step; a call counter would end the warm-up after step 0.
    apply(pipe, "psa", dense_steps=2, dense_layers=(), **REFERENCE)
    try:
        pipe(**wan_call_kwargs(steps=4, frames=9, height=64, width=64))
        steps = {step for step, _ in sparsity_state(pipe).sparse_calls}
        assert steps == {2, 3}
    finally:
        remove(pipe)


def test_profiler_reports_level_shares_and_planning_time():
    import diffattn
    from diffattn.pipelines.embedded import load_embedded_pipeline

    pipe = load_embedded_pipeline()
    config = load_preset("psa", family="wan").config.with_overrides(dense_steps=0, dense_layers=(), block_size=32,
                                                                     **REFERENCE)
    report = diffattn.profile(pipe, config, warmup=0, prompt="a red circle moves left", num_frames=5, height=32,
                              width=32, num_inference_steps=1)
    shares = report.level_shares
    assert set(shares) <= {0, 1, 2, 4, 8} and abs(sum(shares.values()) - 1) < 1e-9 and shares[1] > 0
    assert report.plan_seconds > 0 and 0 < report.plan_share < 1
    # For planned calls the layout density is the effective one (a level-p tile counts 1/p).
    assert report.layout_density < report.tile_density
    markdown = report.to_markdown()
    assert "tiles per pooling level" in markdown and "planning time per run" in markdown
