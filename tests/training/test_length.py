"""Length extrapolation: Wan's RoPE tables grow exactly; the preset's density at 4x the frames."""

from __future__ import annotations

import pytest
import torch
from diffusers import WanTransformer3DModel

from diffattn import VideoGrid
from diffattn.processors.presets import load_preset
from diffattn.training.length import density_by_length, fit_rope, install_rope_fit
from tests.threads import one_thread  # noqa: F401 (autouse fixture)


def tiny_transformer(max_positions: int) -> WanTransformer3DModel:
    torch.manual_seed(0)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
                                 out_channels=4, text_dim=8, freq_dim=8, ffn_dim=8, num_layers=1,
                                 rope_max_seq_len=max_positions)


def call(transformer, frames: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(1, 4, frames, 4, 4, generator=generator)
    return transformer(hidden, torch.tensor([500]), torch.randn(1, 3, 8, generator=generator)).sample


def test_longer_rope_is_exact_where_the_old_one_reached_and_runs_beyond():
    short, grown = tiny_transformer(8), tiny_transformer(8)
    with pytest.raises(RuntimeError):
        call(short, 12)  # stock diffusers: 12 frames do not fit an 8-position table
    assert fit_rope(grown, (1, 4, 12, 4, 4)) and not fit_rope(grown, (1, 4, 12, 4, 4))
    assert torch.equal(call(grown, 8), call(short, 8))  # the old positions are unchanged
    built_long = tiny_transformer(12)
    built_long.load_state_dict(short.state_dict())
    assert torch.equal(call(grown, 12), call(built_long, 12))  # same as a model built with the longer table


def test_the_hook_grows_the_table_on_demand():
    transformer = tiny_transformer(8)
    handle = install_rope_fit(transformer)
    assert call(transformer, 12).shape == (1, 4, 12, 4, 4)
    handle.remove()


def test_radial_is_sparser_at_four_times_the_frames():
    config = load_preset("radial", family="wan").config
    density = density_by_length(config, {"L": VideoGrid(17, 8, 8), "4L": VideoGrid(65, 8, 8)})
    assert density["4L"] < 0.5 * density["L"] < 0.5
