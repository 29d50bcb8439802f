"""Issue 24 item 1: every shipped preset of every family runs at every size its pipeline accepts.

Pattern level: each preset's layout on a 1-frame 1x1 grid (with the family's text tokens) and a
small odd grid equals the pattern's token mask; on the family's default (largest) grid, a few
random rows equal an independent reference (NATTEN brute force with the documented fitting
rule, the token-level Radial rule). End to end: each preset, made sparse from the first step,
runs on the family's tiny offline pipeline at a 1-frame (or smallest) size and a larger one.
"""

import random

import pytest
import torch

from diffattn import AgentSD, VideoGrid
from diffattn.adapters import ADAPTERS, apply, remove, sparsity_state
from diffattn.adapters import family_default_grid as default_grid
from diffattn.processors.presets import families, is_dynamic, list_presets, preset_layout

from ..patterns.reference_rows import layout_rows_in_caller_order, reference_rows

FAMILIES = sorted({adapter.family for adapter in ADAPTERS})
PRESETS = [(family, preset.name) for family in FAMILIES for preset in list_presets(family)]
# Agent presets are an op, not a block layout (their layout refuses): only the end-to-end test runs them.
# Dynamic presets (PSA) have no layout without a call's q and k: tests/processors/test_psa_presets.py runs them.
LAYOUT_PRESETS = [(family, preset.name) for family in FAMILIES for preset in list_presets(family)
                  if not isinstance(preset.config.pattern, AgentSD) and not is_dynamic(preset.config)]


def _preset(family, name):
    return next(p for p in list_presets(family) if p.name == name)


def test_every_family_is_covered():
    assert FAMILIES == families() and len(PRESETS) >= 5 * len(FAMILIES)


@pytest.mark.parametrize("family, name", LAYOUT_PRESETS, ids=lambda x: str(x))
def test_preset_layout_fits_the_smallest_grids(family, name):
    config = _preset(family, name).config
    big = default_grid(family)
    for shape in [(1, 1, 1), (1, 3, 5), (2, 1, 7)]:
        grid = VideoGrid(*shape, text_tokens=big.text_tokens, text_position=big.text_position)
        layout = preset_layout(config, grid)
        assert torch.equal(layout.token_mask(), config.pattern.token_mask(grid)), shape
        tokens = list(range(grid.num_tokens))
        assert torch.equal(layout.token_mask(), reference_rows(config.pattern, grid, tokens)), shape


@pytest.mark.parametrize("family, name", LAYOUT_PRESETS, ids=lambda x: str(x))
def test_preset_layout_at_the_default_grid_matches_the_reference_on_random_rows(family, name):
    config = _preset(family, name).config
    grid = default_grid(family)
    layout = preset_layout(config, grid)
    rng = random.Random(f"{family}/{name}")
    tokens = [0, grid.num_tokens - 1] + rng.sample(range(grid.num_tokens), 3)
    assert torch.equal(layout_rows_in_caller_order(layout, tokens), reference_rows(config.pattern, grid, tokens))


def _pipeline_and_sizes(family):
    """The tiny pipeline of ``family`` and call arguments for its smallest and a larger size."""
    from ..adapters import (
        test_ltx_video,
        tiny_cogvideox,
        tiny_flux,
        tiny_hunyuan_video,
        tiny_mochi,
        tiny_pipelines,
        tiny_unet,
    )

    small, large = dict(frames=1, height=16, width=16), dict(frames=13, height=96, width=80)
    one_step, no_negative = dict(steps=1), dict(negative_valid=None)
    # family: (pipeline builder, call builder, smallest size, larger size, other call arguments)
    table = {
        "wan": (tiny_pipelines.tiny_wan_pipeline, tiny_pipelines.wan_call_kwargs, small, large, one_step),
        "hunyuan_video": (tiny_hunyuan_video.tiny_hunyuan_video_pipeline, tiny_hunyuan_video.hunyuan_video_call_kwargs,
                          small, large, dict(steps=1, **no_negative)),
        "cogvideox": (tiny_cogvideox.tiny_cogvideox_pipeline, tiny_cogvideox.cogvideox_call_kwargs,
                      small, large, one_step),
        "mochi": (tiny_mochi.tiny_mochi_pipeline, tiny_mochi.mochi_call_kwargs,
                  small, large, dict(steps=2, **no_negative)),
        "ltx_video": (test_ltx_video.tiny_ltx_pipeline, test_ltx_video.ltx_call_kwargs,
                      dict(frames=1, height=32, width=32), dict(frames=9, height=64, width=64), one_step),
        "flux": (tiny_flux.tiny_flux_pipeline, tiny_flux.flux_call_kwargs,
                 dict(height=16, width=16), dict(height=160, width=96), one_step),
        "sd": (tiny_unet.tiny_sd_pipeline, tiny_unet.unet_call_kwargs, dict(size=8), dict(size=64), one_step),
        "sdxl": (tiny_unet.tiny_sdxl_pipeline, lambda **kw: tiny_unet.unet_call_kwargs(xl=True, **kw),
                 dict(size=16), dict(size=64), one_step),
    }
    build, make, first, second, common = table[family]
    return build(), [make(**first, **common), make(**second, **common)]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_preset_runs_end_to_end_at_the_smallest_and_a_larger_size(family):
    pipe, sizes = _pipeline_and_sizes(family)
    try:
        for preset in list_presets(family):
            # Sparse from the first step in every layer (the dense preset stays the stock path).
            overrides = {} if preset.name == "dense" else dict(dense_steps=0, dense_layers=())
            apply(pipe, preset.name, **overrides)
            for kwargs in sizes:
                output = pipe(**kwargs)[0]
                assert torch.isfinite(torch.as_tensor(output)).all(), (preset.name, kwargs["height"])
                if preset.name != "dense":
                    assert sum(sparsity_state(pipe).sparse_calls.values()) > 0, preset.name
            remove(pipe)
    finally:
        remove(pipe)
