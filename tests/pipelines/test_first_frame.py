"""First-frame training states and sampler: frame 0 given clean (per-token timestep 0), the rest denoised."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from diffattn.pipelines.embedded import EmbeddedVideoPipeline, build_components, first_frame_schedule

from ..scripts import load_script
from .tiny_embedded import TINY


def test_first_frame_states_clean_frame_zero_of_their_share_only():
    train = load_script("train_embedded_model")
    drawn = train.frame_sigmas(2000, 17, 3.0, 0.0, torch.Generator().manual_seed(0), first_frame_share=0.6)
    given = drawn[:, 0] == 0
    assert 0.56 < float(given.float().mean()) < 0.64
    # the rest of a first-frame clip shares one noise level; other clips keep one level throughout
    assert bool((drawn[given][:, 1:] == drawn[given][:, 1:2]).all()) and bool((drawn[given][:, 1] > 0).all())
    assert bool((drawn[~given] == drawn[~given][:, :1]).all())
    # added after per-frame levels, it keeps their draws and takes only clips they left alone
    alone = train.frame_sigmas(400, 17, 3.0, 0.4, torch.Generator().manual_seed(3))
    both = train.frame_sigmas(400, 17, 3.0, 0.4, torch.Generator().manual_seed(3), first_frame_share=0.6)
    varying = alone.std(dim=1) > 0
    torch.testing.assert_close(both[varying], alone[varying])
    assert bool((both[~varying][:, 0] == 0).all())  # 0.6 of all clips = every clip left (share 1 - 0.4)


def test_loss_leaves_the_given_frame_out():
    train = load_script("train_embedded_model")
    generator = torch.Generator().manual_seed(0)
    clean = torch.rand(2, 3, 4, 8, 8, generator=generator) * 2 - 1
    noise = torch.randn(2, 3, 4, 8, 8, generator=generator)
    levels = torch.tensor([[0.0, 0.5, 0.5, 0.5], [0.3, 0.3, 0.3, 0.3]])
    off = clean + 0.1
    wrong_given = off.clone()
    wrong_given[0, :, 0] += 5.0  # an error in the given frame costs nothing
    for kind in ("sample", "sample_skip"):
        reference = train.denoising_loss(off, clean, noise, levels, kind, 1.0)
        torch.testing.assert_close(train.denoising_loss(wrong_given, clean, noise, levels, kind, 1.0), reference)
    # and the mean runs over the denoised frames only: error 0.1 everywhere -> 0.01
    assert float(train.denoising_loss(off, clean, noise, levels, "sample", 1.0)) == pytest.approx(0.01, rel=1e-5)


def test_first_frame_schedule():
    sigmas = torch.tensor([1.0, 0.6, 0.2, 0.0])
    schedule = first_frame_schedule(sigmas, 3)
    assert torch.equal(schedule[:, 0], torch.zeros(4))
    assert torch.equal(schedule[:, 1], sigmas) and torch.equal(schedule[:, 2], sigmas)
    for bad in ((sigmas, 1), (sigmas[None], 3)):
        with pytest.raises(ValueError, match="first_frame_schedule needs"):
            first_frame_schedule(*bad)


def recording_oracle(pipe, clean, monkeypatch):
    """An exact x0 model (the clip ``clean``, cut to the frames asked for) recording its timesteps."""
    seen = []

    def forward(hidden_states, timestep, encoder_hidden_states, return_dict=True):
        seen.append((hidden_states.shape[2], timestep.clone()))
        return (clean[:, :, :hidden_states.shape[2]].expand_as(hidden_states),)

    monkeypatch.setattr(pipe.transformer, "forward", forward)
    return seen


@pytest.mark.parametrize("stochastic", [True, False])
def test_first_frame_sampler_draws_frame_zero_alone_then_the_rest_next_to_it(stochastic, monkeypatch):
    pipe = EmbeddedVideoPipeline(**build_components(dataclasses.replace(TINY, stochastic_sampling=stochastic)),
                                 first_frame_sampling=True)
    pipe.set_progress_bar_config(disable=True)
    clean = torch.rand(1, 3, 4, 16, 16, generator=torch.Generator().manual_seed(2)) * 1.6 - 0.8
    seen = recording_oracle(pipe, clean, monkeypatch)
    video = pipe("a red circle moves left", num_frames=4, height=16, width=16, num_inference_steps=5,
                 output_type="pt", guidance_scale=1.0, generator=torch.Generator().manual_seed(1)).frames
    np.testing.assert_allclose(video.numpy(), ((clean + 1) / 2).permute(0, 2, 3, 4, 1).numpy(), atol=1e-5)
    assert [frames for frames, _ in seen] == [1] * 5 + [4] * 5  # stage 1: one frame; stage 2: all
    for _, timestep in seen[5:]:  # 2 x 2 tokens per frame; frame 0 is given clean
        assert timestep.shape == (1, 16)
        assert torch.equal(timestep[0, :4], torch.zeros(4)) and bool((timestep[0, 4:] > 0).all())
    assert float(seen[5][1][0, 4]) == 1000.0  # the other frames start from pure noise


def test_image_to_video_keeps_the_given_first_frame(monkeypatch):
    pipe = EmbeddedVideoPipeline(**build_components(TINY))  # first_frame_sampling off: image turns it on
    pipe.set_progress_bar_config(disable=True)
    clean = torch.rand(2, 3, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 1.6 - 0.8
    seen = recording_oracle(pipe, clean, monkeypatch)
    image = np.random.default_rng(0).random((2, 16, 16, 3)).astype(np.float32)
    video = pipe(["a red circle moves left"] * 2, num_frames=3, height=16, width=16, num_inference_steps=3,
                 guidance_scale=1.0, image=image, generator=torch.Generator().manual_seed(1)).frames
    np.testing.assert_allclose(video[:, 0], image, atol=1e-6)  # frame 0 is the image, untouched
    np.testing.assert_allclose(video[:, 1:], ((clean[:, :, 1:] + 1) / 2).permute(0, 2, 3, 4, 1).numpy(), atol=1e-5)
    assert len(seen) == 3 and all(frames == 3 for frames, _ in seen)  # no stage 1


def test_bad_first_frame_requests_are_refused():
    pipe = EmbeddedVideoPipeline(**build_components(TINY))
    call = dict(num_frames=3, height=16, width=16, num_inference_steps=1)
    with pytest.raises(ValueError, match=r"image must be \[H, W, 3\] or \[1, H, W, 3\] with H=16, W=16"):
        pipe("a red circle moves left", image=np.zeros((8, 8, 3), np.float32), **call)
    with pytest.raises(ValueError, match="cannot be used with first_frame=False"):
        pipe("a red circle moves left", image=np.zeros((16, 16, 3), np.float32), first_frame=False, **call)
    with pytest.raises(ValueError, match="two different samplers"):
        pipe("a red circle moves left", first_frame=True, frame_lag=0.5, **call)


def test_first_frame_training_runs_initialises_from_a_pipeline_and_saves_the_sampler(tmp_path, capsys):
    train = load_script("train_embedded_model")
    args = train.parse_args([])
    assert (args.first_frame_share, args.image_batch, args.init_from) == (0.0, 0, None)  # the shipped recipe
    small = ["--batch-size", "2", "--num-frames", "3", "--size", "16", "--num-attention-heads", "2",
             "--attention-head-dim", "24", "--ffn-dim", "32", "--warmup", "1"]
    common = [*small, "--num-layers", "1"]
    base = tmp_path / "base"
    assert train.main([*common, "--steps", "1", "--output", str(base / "pipe"), "--checkpoint-dir", str(base / "ck")]) == 0
    assert json.loads((base / "pipe" / "model_index.json").read_text())["first_frame_sampling"] is False
    tuned = tmp_path / "tuned"
    assert train.main([*common, "--steps", "2", "--first-frame-share", "0.5", "--image-batch", "2",
                       "--init-from", str(base / "pipe"), "--output", str(tuned / "pipe"),
                       "--checkpoint-dir", str(tuned / "ck")]) == 0
    assert json.loads((tuned / "pipe" / "model_index.json").read_text())["first_frame_sampling"] is True
    # --init-from starts from the saved weights: a fresh start's first loss differs
    fresh = tmp_path / "fresh"
    assert train.main([*common, "--steps", "2", "--first-frame-share", "0.5", "--image-batch", "2",
                       "--output", str(fresh / "pipe"), "--checkpoint-dir", str(fresh / "ck")]) == 0
    first_loss = [json.loads((f / "ck" / "loss.jsonl").read_text().splitlines()[0])["loss"] for f in (tuned, fresh)]
    assert first_loss[0] != first_loss[1]
    capsys.readouterr()
    for bad, message in ((["--first-frame-share", "0.8", "--frame-noise-share", "0.5"], "--first-frame-share must be in"),
                         (["--image-batch", "-1"], "--image-batch must be >= 0; got -1"),
                         (["--init-from", str(tmp_path)], "--init-from must be a saved embedded pipeline folder")):
        with pytest.raises(SystemExit) as exit_info:
            train.parse_args(bad)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    bigger = tmp_path / "bigger"
    with pytest.raises(ValueError, match="its transformer does not match the model sizes"):
        train.main([*small, "--num-layers", "2", "--steps", "1", "--init-from", str(base / "pipe"),
                    "--output", str(bigger / "pipe"), "--checkpoint-dir", str(bigger / "ck")])
