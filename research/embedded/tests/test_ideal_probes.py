"""The ideal_* probes: the least-squares estimate at pure noise and its caption sensitivity."""

from __future__ import annotations

import numpy as np
import pytest

from research.embedded.ideal_probes import ideal_caption_sensitivity, ideal_pure_noise_estimate


def redness_centroid_x(frame: np.ndarray) -> float:
    """x centroid of how much redder than the other channels each pixel is (background greys ~0)."""
    weight = np.clip(frame[..., 0] - (frame[..., 1] + frame[..., 2]) / 2, 0, None)
    return float((weight.sum(0) * (np.arange(frame.shape[1]) + 0.5)).sum() / weight.sum())


def test_ideal_pure_noise_estimate_is_the_mean_clip_of_the_caption():
    left = ideal_pure_noise_estimate("red", "circle", "left", num_clips=200, num_frames=5)
    right = ideal_pure_noise_estimate("red", "circle", "right", num_clips=200, num_frames=5)
    assert left.shape == (5, 64, 64, 3) and left.min() >= -1 and left.max() <= 1
    assert np.array_equal(left, ideal_pure_noise_estimate("red", "circle", "left", num_clips=200, num_frames=5))
    # A shape that moves left starts with room to its left, so further right than one moving
    # right, and the mean of such clips drifts left over the first frames (no bounce before 5).
    assert redness_centroid_x(left[0]) > redness_centroid_x(right[0]) + 4
    assert redness_centroid_x(left[4]) < redness_centroid_x(left[0]) - 3
    assert redness_centroid_x(right[4]) > redness_centroid_x(right[0]) + 3
    # Only red pixels: the green channel never rises above the greys' level.
    assert (left[..., 1] < -1 + 2 * 130 / 255).all()


def test_ideal_caption_sensitivity_measures_what_each_word_is_worth():
    ideal = ideal_caption_sensitivity(num_clips=60, num_frames=5)
    assert ideal["mean_abs_change"]["direction"] > 0.005 and ideal["mean_abs_change"]["colour"] > 0.005
    assert 0 < ideal["mse_gain"]["direction"] < ideal["mean_abs_change"]["direction"]
    assert ideal["num_clips"] == 60


def test_ideal_pure_noise_estimate_refuses_unknown_words():
    with pytest.raises(ValueError, match="direction must be one of 'left', 'right', 'up', 'down'; got 'north'"):
        ideal_pure_noise_estimate("red", "circle", "north")
    with pytest.raises(ValueError, match="num_clips must be an int >= 1, got 0"):
        ideal_pure_noise_estimate("red", "circle", "left", num_clips=0)
