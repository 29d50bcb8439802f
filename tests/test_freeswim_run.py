"""FreeSwim's coarse-to-fine run (diffattn.freeswim_run) on tiny offline pipelines."""

from __future__ import annotations

import warnings

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

import diffattn
from diffattn import FreeSwim, UserError
from diffattn.adapters import sparsity_state
from diffattn.freeswim_run import _refine_scheduler, coarse_to_fine, is_above_native, native_size

from .adapters.tiny_pipelines import tiny_wan_pipeline, wan_call_kwargs
from .pipelines.tiny_embedded import tiny_embedded_pipeline
from .threads import one_thread  # noqa: F401 (autouse fixture)


def test_the_refine_scheduler_runs_the_last_strength_share_of_a_shift_9_schedule():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=2.0)
    refine = _refine_scheduler(scheduler, strength=0.7, flow_shift=9.0)
    reference = FlowMatchEulerDiscreteScheduler(shift=9.0)
    reference.set_timesteps(10)
    refine.set_timesteps(10)
    assert refine.config.shift == 9.0 and scheduler.config.shift == 2.0
    assert torch.equal(refine.timesteps, reference.timesteps[3:]) and torch.equal(refine.sigmas, reference.sigmas[3:])


def test_embedded_coarse_to_fine_refines_at_the_target_and_leaves_the_pipeline_as_found():
    pipe = tiny_embedded_pipeline()
    scheduler = pipe.scheduler
    config = FreeSwim(window=(2, 2), cache_steps=2)  # "trained" at 2 x 2 tokens = 16 x 16 pixels
    result = coarse_to_fine(pipe, config, height=32, width=24, prompt="a red circle moves left", num_frames=3,
                            num_inference_steps=4, generator=torch.Generator().manual_seed(0))
    assert result.frames.shape == (1, 3, 32, 24, 3) and result.base_size == (16, 16)
    # strength 0.7 of 4 steps: 3 refine steps, the guide on steps 0 and 2
    assert result.guide_steps == [0, 2] and result.cache_bytes > 0
    assert result.grid == diffattn.VideoGrid(3, 4, 3) and 0 < result.density <= 1
    assert pipe.scheduler is scheduler and sparsity_state(pipe) is None


def test_wan_coarse_to_fine_in_latent_space():
    pipe = tiny_wan_pipeline()
    call = wan_call_kwargs(frames=5, steps=3)
    generator = call.pop("generator")
    for key in ("height", "width", "output_type"):
        call.pop(key)
    config = FreeSwim(window=(2, 2), cache_steps=1)  # 2 x 2 tokens = 32 x 32 pixels
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", diffattn.DenseFallbackWarning)
        result = coarse_to_fine(pipe, config, height=64, width=48, generator=generator, output_type="latent", **call)
    assert result.frames.shape == (1, 16, 2, 8, 6) and torch.isfinite(result.frames).all()
    assert result.base_size == (32, 32) and result.guide_steps == [0, 1]


def test_a_target_below_the_native_size_is_a_user_error_naming_it():
    pipe = tiny_embedded_pipeline()
    assert native_size(pipe) == (64, 64) and not is_above_native(pipe, 64, 64)
    with pytest.raises(UserError, match="width 48 is below the model's native 64"):
        coarse_to_fine(pipe, height=128, width=48, prompt="x", num_frames=1, num_inference_steps=1)
    with pytest.raises(UserError, match="strength"):
        coarse_to_fine(pipe, height=128, width=128, strength=0.0)


def test_generate_with_the_freeswim_preset_above_the_native_size_runs_coarse_to_fine(tmp_path):
    from diffattn.runs import GenerateOptions, generate

    lines = []
    result = generate(GenerateOptions(output=str(tmp_path / "out.gif"), preset="freeswim", num_frames=2, height=72,
                                      width=64, steps=2), log=lines.append)
    assert (result.height, result.width, result.num_frames) == (72, 64, 2)
    assert result.grid == diffattn.VideoGrid(2, 9, 8) and any("FreeSwim coarse-to-fine: base 64x64" in x for x in lines)
    assert result.sparse_calls > 0


def test_the_cli_refuses_a_freeswim_target_below_the_native_size(tmp_path, capsys):
    from diffattn.cli import main

    code = main(["generate", "--preset", "freeswim", "--height", "32", "--num-frames", "1", "--steps", "1",
                 "--output", str(tmp_path / "out.gif")])
    assert code == 2 and "height 32 is below the model's native 64" in capsys.readouterr().err
