"""The detector against ground truth: it must recover the trajectories it was drawn from, and it
must fail videos that do not match their caption."""

import dataclasses

import numpy as np
import pytest

from diffattn.pipelines.shape_detector import fit_motion, score_video, track_colours
from diffattn.pipelines.shapes import BASE_FRAMES, COLOURS, caption, render_clip, sample_clip, true_centroids


def specs(count: int, seed: int):
    return [sample_clip(np.random.default_rng([seed, i])) for i in range(count)]


@pytest.mark.parametrize("spec", specs(24, seed=11), ids=lambda s: caption(s).replace(" ", "_")[:40])
def test_ground_truth_clips_score_perfectly(spec):
    video = render_clip(spec, BASE_FRAMES)
    score = score_video(video, spec)
    assert score.adherence == 1.0, score.checks
    assert score.motion_deviation_px < 0.5
    assert score.spurious == []
    tracks = track_colours(video)
    truth = true_centroids(spec, BASE_FRAMES)
    for shape, expected in zip(spec.shapes, truth):
        measured = tracks[shape.colour].centroids
        assert np.abs(measured - expected).max() < 0.6  # pixel rasterisation error only


def test_fit_recovers_velocity_through_bounces_on_a_long_clip():
    spec = specs(1, seed=4)[0]
    frames, size = 60, 96
    video = render_clip(spec, frames, size)
    tracks = track_colours(video)
    for shape in spec.shapes:
        fit = fit_motion(tracks[shape.colour], size)
        assert fit.deviation_px < 0.5
        assert abs(np.abs(fit.velocity).max() - shape.speed * size / 64) < 0.1
        assert fit.direction(size) == shape.direction


def test_wrong_caption_fails_the_right_checks():
    spec = specs(1, seed=5)[0]
    video = render_clip(spec, BASE_FRAMES)
    first = spec.shapes[0]
    other_shape = {"circle": "square", "square": "triangle", "triangle": "circle"}[first.shape]
    other_direction = {"left": "right", "right": "left", "up": "down", "down": "up"}[first.direction]
    wrong = dataclasses.replace(spec, shapes=(dataclasses.replace(first, shape=other_shape, direction=other_direction),
                                              *spec.shapes[1:]))
    score = score_video(video, wrong)
    assert score.checks[f"{first.colour} present"]
    assert not score.checks[f"{first.colour} shape"] and not score.checks[f"{first.colour} direction"]
    absent = next(c for c in COLOURS if c not in {s.colour for s in spec.shapes})
    missing = dataclasses.replace(spec, shapes=(dataclasses.replace(first, colour=absent),))
    assert score_video(video, missing).adherence == 0.0
    assert first.colour in score_video(video, missing).spurious


def test_jittering_motion_is_measured():
    """Shapes that jump around are far from constant velocity: the deviation must say so."""
    spec = specs(1, seed=6)[0]
    rng = np.random.default_rng(0)
    frames = []
    for f in range(BASE_FRAMES):
        moved = dataclasses.replace(spec, shapes=tuple(
            dataclasses.replace(s, x=s.x + rng.uniform(-5, 5), y=s.y + rng.uniform(-5, 5)) for s in spec.shapes))
        frames.append(render_clip(moved, f + 1)[f])
    score = score_video(np.stack(frames), spec)
    assert score.motion_deviation_px > 2.0


def test_noise_video_finds_nothing():
    video = np.random.default_rng(0).integers(0, 256, size=(BASE_FRAMES, 64, 64, 3), dtype=np.uint8)
    spec = specs(1, seed=7)[0]
    score = score_video(video, spec)
    assert score.adherence < 0.5


def test_bad_video_shape():
    with pytest.raises(ValueError, match="video must be"):
        track_colours(np.zeros((4, 64, 64), dtype=np.uint8))
