"""evaluate_embedded's bookkeeping, with stand-in pipelines instead of a trained model."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from diffattn.errors import UserError
from diffattn.pipelines.embedded import EMBEDDED_DIR, EmbeddedVideoPipeline, build_components, is_embedded_folder
from diffattn.pipelines.eval_embedded import (
    EVAL_SEED,
    SENSITIVITY_SIGMAS,
    TUNING_SEED,
    caption_sensitivity,
    colour_centroids,
    denoising_profile,
    evaluate_embedded,
    held_out_specs,
    run_evaluation,
    swapped_specs,
)
from diffattn.pipelines.shape_detector import score_video
from diffattn.pipelines.shapes import COLOURS, DIRECTIONS, SHAPES, caption, render_clip, true_centroids

from .tiny_embedded import TINY


class RenderingPipe:
    """Returns the true clip of each caption it is asked for (a perfect model), as floats in [0, 1]."""

    def __init__(self, specs) -> None:
        self.by_caption = {caption(spec): spec for spec in specs}
        self.prompts: list[str] = []

    def __call__(self, prompt, generator, num_frames, height, width, output_type, **_):
        self.prompts.extend(prompt)
        frames = [render_clip(self.by_caption[p], num_frames, height).astype(np.float32) / 255.0 for p in prompt]
        return SimpleNamespace(frames=frames)


@pytest.mark.parametrize("stream", [EVAL_SEED, TUNING_SEED])
def test_perfect_model_scores_like_ground_truth_on_the_chosen_stream(stream):
    specs = held_out_specs(6, stream)
    pipe = RenderingPipe(specs)
    report, videos = evaluate_embedded(pipe, num_captions=6, batch_size=4, caption_seed=stream)
    assert pipe.prompts == [caption(spec) for spec in specs]
    assert report["caption_seed"] == stream
    assert report["adherence"] == pytest.approx(report["ground_truth"]["adherence"])
    assert report["motion_deviation_px"] == pytest.approx(report["ground_truth"]["motion_deviation_px"])
    assert report["adherence"] > 0.9
    assert report["still_share"] == 0.0  # every training shape moves at >= 1 px per frame
    assert len(videos) == 6 and videos[0].dtype == np.uint8


class FrozenPipe(RenderingPipe):
    """A model that gets every shape right but never moves it: frame 0 of the true clip, repeated."""

    def __call__(self, prompt, generator, num_frames, height, width, output_type, **_):
        frames = super().__call__(prompt, generator, num_frames, height, width, output_type).frames
        return SimpleNamespace(frames=[np.repeat(clip[:1], num_frames, axis=0) for clip in frames])


def test_a_model_whose_shapes_stand_still_fails_every_direction_check():
    specs = held_out_specs(4)
    report, _ = evaluate_embedded(FrozenPipe(specs), num_captions=4, batch_size=4)
    assert report["adherence_by_check"]["present"] > 0.9
    assert report["still_share"] == 1.0
    assert report["adherence_by_check"]["direction"] == 0.0


def test_tuning_and_reported_streams_differ():
    assert [caption(s) for s in held_out_specs(8, EVAL_SEED)] != [caption(s) for s in held_out_specs(8, TUNING_SEED)]


def test_blank_model_fails_every_presence_check():
    def blank(prompt, num_frames, height, width, **_):
        return SimpleNamespace(frames=[np.full((num_frames, height, width, 3), 0.5, np.float32) for _ in prompt])

    report, _ = evaluate_embedded(blank, num_captions=3, batch_size=3)
    assert report["adherence_by_check"]["present"] == 0.0
    assert report["adherence"] == 0.0
    assert not report["targets_met"]


def oracle_pipeline(clean: torch.Tensor | None, monkeypatch) -> EmbeddedVideoPipeline:
    """A tiny pipeline whose transformer knows the true clips ``[B, 3, F, H, W]`` (in [-1, 1]);
    ``clean=None``: it predicts a flat grey clip."""
    pipe = EmbeddedVideoPipeline(**build_components(TINY))

    def forward(hidden_states, timestep, encoder_hidden_states, return_dict=True):
        return (torch.zeros_like(hidden_states) if clean is None else clean.to(hidden_states),)

    monkeypatch.setattr(pipe.transformer, "forward", forward)
    return pipe


def true_clips(count: int, frames: int, stream: int = TUNING_SEED) -> torch.Tensor:
    clips = np.stack([render_clip(spec, frames) for spec in held_out_specs(count, stream)])
    return torch.from_numpy(clips).float().permute(0, 4, 1, 2, 3) / 127.5 - 1.0


def test_denoising_profile_of_an_exact_model_is_the_detectors_own_score(monkeypatch):
    pipe = oracle_pipeline(true_clips(4, 9), monkeypatch)
    profile = denoising_profile(pipe, num_captions=4, num_frames=9, sigmas=(0.1, 0.9), batch_size=4)
    truth = np.mean([score_video(render_clip(spec, 9), spec).adherence for spec in held_out_specs(4, TUNING_SEED)])
    assert profile["sigmas"] == [0.1, 0.9] and profile["caption_seed"] == TUNING_SEED
    assert profile["adherence"] == pytest.approx([truth, truth]) and truth > 0.9
    assert max(profile["x0_mse"]) < 1e-6


def test_denoising_profile_of_a_blank_model_finds_nothing(monkeypatch):
    profile = denoising_profile(oracle_pipeline(None, monkeypatch), num_captions=3, num_frames=5,
                                sigmas=(0.5,), batch_size=2)
    assert profile["adherence"] == [0.0] and profile["adherence_by_check"]["present"] == [0.0]
    assert profile["x0_mse"][0] > 0.05
    with pytest.raises(ValueError, match=r"sigmas must be non-empty and in \(0, 1\]; got \(0.0,\)"):
        denoising_profile(oracle_pipeline(None, monkeypatch), num_captions=1, sigmas=(0.0,))


def test_swapped_specs_change_one_word_of_the_first_phrase_and_nothing_else():
    for spec in held_out_specs(12, TUNING_SEED):
        original = caption(spec).split()
        for kind, swapped in swapped_specs(spec).items():
            words = caption(swapped).split()
            differing = [i for i, (a, b) in enumerate(zip(original, words)) if a != b]
            assert len(words) == len(original) and len(differing) == 1, (kind, caption(spec), caption(swapped))
            assert differing[0] == {"colour": 1, "shape": 2, "direction": 4}[kind]
            assert words[differing[0]] in {"colour": COLOURS, "shape": SHAPES, "direction": DIRECTIONS}[kind]
            moved, kept = swapped.shapes[0], spec.shapes[0]
            assert (moved.x, moved.y, moved.radius, moved.speed) == (kept.x, kept.y, kept.radius, kept.speed)
            assert swapped.shapes[1:] == spec.shapes[1:] and swapped.background == spec.background
        new_colour = swapped_specs(spec)["colour"].shapes[0].colour
        assert new_colour not in {shape.colour for shape in spec.shapes}
        dx, dy = DIRECTIONS[spec.shapes[0].direction]
        assert DIRECTIONS[swapped_specs(spec)["direction"].shapes[0].direction] == (-dx, -dy)


def test_colour_centroids_track_a_rendered_shape_and_ignore_the_background():
    spec = held_out_specs(1, TUNING_SEED)[0]
    clip = torch.from_numpy(render_clip(spec, 6)).float().permute(3, 0, 1, 2) / 127.5 - 1.0
    first = spec.shapes[0]
    found = colour_centroids(clip, first.colour).numpy()
    expected = true_centroids(spec, 6)[0]
    assert np.abs(found - expected).max() < 0.6  # pixel-centre sampling of the shape's area


class CaptionRenderingTransformer:
    """Stands in for pipe.encode_prompt + pipe.transformer: returns the true clip of whatever
    caption it was given (a model that reads every word), or with ``text_blind`` the true clip of
    the unswapped caption whatever it is given (a model that draws well but ignores the words)."""

    def __init__(self, pipe, specs, text_blind: bool) -> None:
        self.by_caption = {caption(s): s for spec in specs for s in (spec, *swapped_specs(spec).values())}
        self.text_blind, self.prompts = text_blind, []
        self.config = pipe.transformer.config

    def encode_prompt(self, prompt, device):
        self.prompts.append(list(prompt))
        return torch.full((len(prompt), 1, 1), float(len(self.prompts) - 1))

    def forward(self, hidden_states, timestep, encoder_hidden_states, return_dict=True):
        prompts = self.prompts[int(encoder_hidden_states[0, 0, 0])]
        if self.text_blind:  # the batch's true captions were encoded first
            prompts = self.prompts[4 * (int(encoder_hidden_states[0, 0, 0]) // 4)]
        frames, size = hidden_states.shape[2], hidden_states.shape[-1]
        clips = np.stack([render_clip(self.by_caption[p], frames, size) for p in prompts])
        return (torch.from_numpy(clips).float().permute(0, 4, 1, 2, 3) / 127.5 - 1.0,)


@pytest.mark.parametrize("text_blind", [False, True])
def test_caption_sensitivity_tells_a_model_that_reads_words_from_one_that_does_not(text_blind, monkeypatch):
    pipe = EmbeddedVideoPipeline(**build_components(TINY))
    specs = held_out_specs(6, TUNING_SEED)
    stand_in = CaptionRenderingTransformer(pipe, specs, text_blind)
    monkeypatch.setattr(pipe, "encode_prompt", stand_in.encode_prompt)
    monkeypatch.setattr(pipe.transformer, "forward", stand_in.forward)
    probe = caption_sensitivity(pipe, num_captions=6, num_frames=9, batch_size=4)
    assert probe["sigmas"] == list(SENSITIVITY_SIGMAS) and probe["caption_seed"] == TUNING_SEED
    changes = probe["mean_abs_change"]
    following = probe["direction_following_px_per_frame"]
    if text_blind:
        assert all(value == 0.0 for values in changes.values() for value in values)
        assert following == [0.0] * len(SENSITIVITY_SIGMAS)
    else:
        assert all(value > 0.002 for values in changes.values() for value in values)
        # The opposite direction may meet a wall in the first frames: not the whole speed, but most of it.
        mean_speed = np.mean([spec.shapes[0].speed for spec in specs])
        assert all(0.5 * mean_speed < value <= mean_speed + 1e-4 for value in following), (following, mean_speed)
    with pytest.raises(ValueError, match=r"sigmas must be non-empty and in \(0, 1\]; got \(\)"):
        caption_sensitivity(pipe, num_captions=1, sigmas=())


def test_colour_centroids_are_nan_where_the_colour_is_absent():
    grey = torch.zeros(3, 2, 16, 16)
    assert torch.isnan(colour_centroids(grey, "red")).all()


@pytest.mark.skipif(not is_embedded_folder(EMBEDDED_DIR), reason="the shipped weights are not in this checkout")
def test_run_evaluation_runs_the_probes_only_when_asked(tmp_path):
    small = dict(num_captions=1, num_frames=3, num_inference_steps=2, batch_size=1)
    plain, paths = run_evaluation(str(tmp_path / "plain.json"), **small)
    assert "denoising_profile" not in plain and "caption_sensitivity" not in plain
    assert [Path(path).name for path in paths] == ["plain.json", "plain.png"]
    probed, _ = run_evaluation(str(tmp_path / "probed.json"), probes=True, **small)
    assert probed["denoising_profile"]["num_captions"] == 1
    assert set(probed["caption_sensitivity"]["mean_abs_change"]) == {"colour", "shape", "direction"}
    # The evaluation itself is the same with or without the probes.
    assert probed["videos"] == plain["videos"] and probed["adherence"] == plain["adherence"]


def test_run_evaluation_refuses_bad_arguments_before_any_work(tmp_path):
    with pytest.raises(UserError, match="--report must be a .json path; got"):
        run_evaluation(str(tmp_path / "eval.txt"))
    with pytest.raises(UserError, match="--num-captions must be an int >= 1, got 0"):
        run_evaluation(str(tmp_path / "eval.json"), num_captions=0)
    assert list(tmp_path.iterdir()) == []
