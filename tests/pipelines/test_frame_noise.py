"""Per-frame noise levels: training draws (Diffusion Forcing), per-token timesteps, the lagged sampler."""

import dataclasses

import numpy as np
import pytest
import torch

from diffattn.pipelines.embedded import (
    EmbeddedVideoPipeline, build_components, lagged_frame_sigmas, model_timesteps, pyramid_frame_sigmas,
)

from ..scripts import load_script
from .tiny_embedded import TINY


def test_per_token_timesteps_are_frame_major():
    """Without transformer blocks a token's output depends only on its own timestep (the output
    norm's shift and scale), so frame f of a per-frame call must equal frame f of a plain call at
    frame f's level: an independent check of the token order model_timesteps assumes."""
    transformer = build_components(dataclasses.replace(TINY, num_layers=0))["transformer"].eval()
    noisy = torch.randn(2, 3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    text = torch.randn(2, 24, 64, generator=torch.Generator().manual_seed(1))
    levels = torch.tensor([[0.9, 0.5, 0.1], [0.2, 0.7, 1.0]])
    with torch.no_grad():
        per_frame = transformer(noisy, model_timesteps(levels, tokens_per_frame=4), text, return_dict=False)[0]
        for b in range(2):
            for f in range(3):
                plain = transformer(noisy[b:b + 1], levels[b, f:f + 1] * 1000, text[b:b + 1], return_dict=False)[0]
                torch.testing.assert_close(per_frame[b, :, f], plain[0, :, f])
    with pytest.raises(ValueError, match=r"frame_sigmas must be \[B, F\]"):
        model_timesteps(torch.ones(3), 4)


def test_full_model_with_equal_levels_matches_the_scalar_timestep():
    transformer = build_components(TINY)["transformer"].eval()
    noisy = torch.randn(1, 3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    text = torch.randn(1, 24, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = transformer(noisy, torch.tensor([400.0]), text, return_dict=False)[0]
        per_token = transformer(noisy, model_timesteps(torch.full((1, 3), 0.4), 4), text, return_dict=False)[0]
    torch.testing.assert_close(per_token, plain, rtol=1e-5, atol=1e-5)


def test_training_noise_levels_per_clip_and_per_frame():
    train = load_script("train_embedded_model")
    # share 0 draws what the shipped recipe drew: one shifted uniform per clip, nothing more
    used = torch.Generator().manual_seed(7)
    drawn = train.frame_sigmas(4, 5, 3.0, 0.0, used)
    generator = torch.Generator().manual_seed(7)
    expected = 3.0 * (u := torch.rand(4, generator=generator)) / (1 + 2.0 * u)
    torch.testing.assert_close(drawn, expected[:, None].expand(4, 5))
    assert torch.equal(torch.rand(3, generator=used), torch.rand(3, generator=generator))  # same stream after
    per_frame = train.frame_sigmas(400, 17, 3.0, 1.0, torch.Generator().manual_seed(0))
    assert per_frame.shape == (400, 17) and 0 < float(per_frame.min()) and float(per_frame.max()) <= 1
    assert bool((per_frame.std(dim=1) > 0.05).all())  # every clip's frames differ
    mixed = train.frame_sigmas(400, 17, 3.0, 0.5, torch.Generator().manual_seed(0))
    varying = float((mixed.std(dim=1) > 0).float().mean())
    assert 0.4 < varying < 0.6


def test_pyramid_states_are_the_lagged_samplers_rows():
    # the training states at progress k / steps are exactly the rows the sampler steps through
    steps, frames, lag = 8, 6, 0.4
    progress = torch.arange(steps + 1) / steps
    torch.testing.assert_close(pyramid_frame_sigmas(progress, frames, torch.tensor(lag), 2.0),
                               lagged_frame_sigmas(steps, frames, lag, 2.0))
    # per-row lags: with lag 0.5 at half progress the first frame is clean, the last pure noise
    # and the middle one half way (shift 1: no warping), whatever the other row's lag
    rows = pyramid_frame_sigmas(torch.tensor([0.5, 0.5]), 3, torch.tensor([0.5, 0.0]), 1.0)
    torch.testing.assert_close(rows, torch.tensor([[0.0, 0.5, 1.0], [0.5, 0.5, 0.5]]))


def test_pyramid_training_share_draws_ramps_and_keeps_the_frame_noise_draws():
    train = load_script("train_embedded_model")
    drawn = train.frame_sigmas(2000, 17, 3.0, 0.0, torch.Generator().manual_seed(0), pyramid_share=0.35)
    ramps = drawn[:, 0] != drawn[:, -1]
    assert 0.31 < float(ramps.float().mean()) < 0.39
    assert bool((drawn[ramps][:, 1:] >= drawn[ramps][:, :-1]).all())  # earlier frames never noisier
    assert bool((drawn[~ramps] == drawn[~ramps][:, :1]).all())  # the rest: one level per clip
    # --frame-noise-share keeps its recorded draws when a pyramid share is added after it
    alone = train.frame_sigmas(300, 17, 3.0, 0.4, torch.Generator().manual_seed(3))
    both = train.frame_sigmas(300, 17, 3.0, 0.4, torch.Generator().manual_seed(3), pyramid_share=0.3)
    varying_alone = alone.std(dim=1) > 0
    torch.testing.assert_close(both[varying_alone], alone[varying_alone])
    extra = (both.std(dim=1) > 0) & ~varying_alone
    assert 0.2 < float(extra.float().mean()) < 0.4 and bool((both[extra][:, 1:] >= both[extra][:, :-1]).all())


def test_loss_with_constant_frame_levels_equals_the_per_clip_loss():
    train = load_script("train_embedded_model")
    generator = torch.Generator().manual_seed(0)
    clean, noise, prediction = (torch.randn(2, 3, 4, 8, 8, generator=generator) for _ in range(3))
    sigma = torch.tensor([0.3, 0.8])
    for kind in ("sample", "sample_skip"):
        per_clip = train.denoising_loss(prediction, clean, noise, sigma, kind, 0.25, 1.0)
        per_frame = train.denoising_loss(prediction, clean, noise, sigma[:, None].expand(2, 4), kind, 0.25, 1.0)
        torch.testing.assert_close(per_frame, per_clip)
    # and per-frame levels weight each frame by its own level: an error only in frame 0 at
    # sigma 0.5 with min_loss_sigma 0.25 costs (1 / 0.5)^2 / 4 frames
    levels = torch.tensor([[0.5, 0.25, 0.25, 0.25]])
    off = clean[:1].clone()
    off[:, :, 0] += 1.0
    loss = train.denoising_loss(off, clean[:1], noise[:1], levels, "sample", 0.25)
    assert float(loss) == pytest.approx(4.0 / 4)
    with pytest.raises(ValueError, match=r"sigma must be \[B\] or \[B, F=4\]"):
        train.broadcast_sigma(torch.ones(2, 3), clean)


@pytest.mark.parametrize("lag", [0.0, 0.3, 0.6])
def test_lagged_schedule_runs_frames_in_order(lag):
    steps, frames = 10, 5
    schedule = lagged_frame_sigmas(steps, frames, lag, shift=2.0)
    assert schedule.shape == (steps + 1, frames)
    assert torch.equal(schedule[0], torch.ones(frames)) and torch.equal(schedule[-1], torch.zeros(frames))
    assert bool((schedule[1:] <= schedule[:-1]).all())  # noise only goes down
    assert bool((schedule[:, 1:] >= schedule[:, :-1]).all())  # later frames never ahead of earlier ones
    if lag == 0:
        assert bool((schedule == schedule[:, :1]).all())
    else:
        assert float(schedule[5, 0]) < float(schedule[5, -1])
        # the first frame is clean after 1 - lag of the steps, the last starts after lag of them
        assert float(schedule[int(np.ceil((1 - lag) * steps)), 0]) == 0.0
        assert float(schedule[int(np.floor(lag * steps)), -1]) == 1.0


def per_frame_oracle(pipe, clean, noise, monkeypatch):
    """An exact x0 model that records the per-token timesteps it is called with."""
    seen = []

    def forward(hidden_states, timestep, encoder_hidden_states, return_dict=True):
        seen.append(timestep.clone())
        return (clean.expand_as(hidden_states),)

    monkeypatch.setattr(pipe.transformer, "forward", forward)
    return seen


@pytest.mark.parametrize("stochastic", [True, False])
def test_lagged_sampler_reaches_the_clean_clip_and_runs_early_frames_ahead(stochastic, monkeypatch):
    pipe = EmbeddedVideoPipeline(**build_components(dataclasses.replace(TINY, stochastic_sampling=stochastic)))
    pipe.set_progress_bar_config(disable=True)
    clean = torch.rand(1, 3, 4, 16, 16) * 1.6 - 0.8
    noise = torch.randn(1, 3, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    seen = per_frame_oracle(pipe, clean, noise, monkeypatch)
    video = pipe("a red circle moves left", num_frames=4, height=16, width=16, num_inference_steps=6,
                 latents=noise, output_type="pt", frame_lag=0.5, guidance_scale=1.0,
                 generator=torch.Generator().manual_seed(1)).frames
    np.testing.assert_allclose(video.numpy(), ((clean + 1) / 2).permute(0, 2, 3, 4, 1).numpy(), atol=1e-5)
    assert len(seen) == 6 and all(t.shape == (1, 4 * 4) for t in seen)
    assert float(seen[0].min()) == 1000.0  # from pure noise
    per_frame = torch.stack([t.view(4, 4)[:, 0] for t in seen])  # [steps, frames]
    assert bool((per_frame[:, 0] <= per_frame[:, -1]).all()) and float(per_frame[2, 0]) < float(per_frame[2, -1])


@pytest.mark.parametrize("lag", [1.0, -0.1, "0.5"])
def test_bad_frame_lag_is_refused(lag):
    pipe = EmbeddedVideoPipeline(**build_components(TINY))
    with pytest.raises(ValueError, match=r"frame_lag must be a number in \[0, 1\)"):
        pipe("a red circle moves left", num_frames=2, height=16, width=16, num_inference_steps=1, frame_lag=lag)


def test_frame_noise_training_runs_and_refuses_bad_shares(tmp_path, capsys):
    train = load_script("train_embedded_model")
    assert train.parse_args([]).frame_noise_share == 0.0  # the shipped recipe
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(["--frame-noise-share", "1.5"])
    assert exit_info.value.code == 2 and "--frame-noise-share must be in [0, 1]; got 1.5" in capsys.readouterr().err
    common = ["--batch-size", "2", "--num-frames", "3", "--size", "16", "--num-layers", "1", "--num-attention-heads",
              "2", "--attention-head-dim", "24", "--ffn-dim", "32", "--steps", "2", "--warmup", "1"]
    losses = {}
    for share in ("0", "1"):
        folder = tmp_path / share
        assert train.main([*common, "--frame-noise-share", share, "--output", str(folder / "pipe"),
                           "--checkpoint-dir", str(folder / "ck")]) == 0
        losses[share] = (folder / "ck" / "loss.jsonl").read_text()
    assert losses["0"] != losses["1"]  # per-frame levels change what is trained on
    for bad in (["--pyramid-share", "-0.1"], ["--frame-noise-share", "0.7", "--pyramid-share", "0.5"]):
        with pytest.raises(SystemExit) as exit_info:
            train.parse_args(bad)
        assert exit_info.value.code == 2 and "--pyramid-share must be in [0, 1]" in capsys.readouterr().err
    folder = tmp_path / "pyramid"
    assert train.main([*common, "--pyramid-share", "1", "--output", str(folder / "pipe"),
                       "--checkpoint-dir", str(folder / "ck")]) == 0
    assert (folder / "ck" / "loss.jsonl").read_text() not in (losses["0"], losses["1"])
