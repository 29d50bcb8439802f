"""PSNR, SSIM and the Amdahl arithmetic against independent computations (no model runs)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from diffattn.profiler.metrics import amdahl_bound, predicted_speedup, psnr, ssim

C1, C2 = 0.01**2, 0.03**2


def direct_ssim_plane(x: np.ndarray, y: np.ndarray, size: int = 11, sigma: float = 1.5) -> float:
    """SSIM of one plane straight from the definition: a weighted sum per window position."""
    offsets = np.arange(size) - (size - 1) / 2
    g = np.exp(-(offsets**2) / (2 * sigma**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    values = []
    for i in range(x.shape[0] - size + 1):
        for j in range(x.shape[1] - size + 1):
            a, b = x[i : i + size, j : j + size], y[i : i + size, j : j + size]
            mu_a, mu_b = (w * a).sum(), (w * b).sum()
            var_a, var_b = (w * (a - mu_a) ** 2).sum(), (w * (b - mu_b) ** 2).sum()
            cov = (w * (a - mu_a) * (b - mu_b)).sum()
            values.append(((2 * mu_a * mu_b + C1) * (2 * cov + C2)) / ((mu_a**2 + mu_b**2 + C1) * (var_a + var_b + C2)))
    return float(np.mean(values))


def test_psnr_of_a_constant_offset():
    video = np.random.default_rng(0).integers(0, 250, size=(3, 16, 16, 3), dtype=np.uint8)
    for k in (1, 2, 5):
        assert psnr(video, video + k) == pytest.approx(20 * math.log10(255 / k), abs=1e-9)
    floats = np.full((2, 8, 8, 3), 0.5)
    assert psnr(floats, floats + 0.1) == pytest.approx(20.0, abs=1e-9)  # mse 0.01


def test_psnr_pools_the_error_over_the_whole_video():
    a = np.zeros((2, 4, 4, 3))
    b = a.copy()
    b[1] = 0.2  # half the values off by 0.2: mse = 0.02
    assert psnr(a, b) == pytest.approx(10 * math.log10(1 / 0.02), abs=1e-9)


def test_psnr_identical_is_inf_also_across_dtypes():
    video = np.random.default_rng(1).integers(0, 256, size=(2, 8, 8, 3), dtype=np.uint8)
    assert psnr(video, video) == math.inf
    assert psnr(video, video.astype(np.float64) / 255) == math.inf


@pytest.mark.parametrize("a, b, message", [
    (np.zeros((2, 8, 8, 3)), np.zeros((2, 8, 9, 3)), "same shape"),
    (np.zeros((8, 8, 3)), np.full((8, 8, 3), 2.0), "[0, 1]"),
    (np.zeros(8), np.zeros(8), "images"),
])
def test_metrics_reject_bad_inputs(a, b, message):
    for metric in (psnr, ssim):
        with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
            metric(a, b)


def test_ssim_of_identical_videos_is_one():
    video = np.random.default_rng(2).random((3, 16, 16, 3))
    assert ssim(video, video) == 1.0
    as_uint8 = (video * 255).round().astype(np.uint8)
    assert ssim(as_uint8, as_uint8.astype(np.float64) / 255) == 1.0


def test_ssim_of_a_brightness_shift_on_a_flat_image_matches_the_closed_form():
    # Flat image a and a + c: variances and covariance are 0, so SSIM = luminance term only.
    a, c = 0.3, 0.2
    x = np.full((16, 16, 3), a)
    expected = (2 * a * (a + c) + C1) / (a**2 + (a + c) ** 2 + C1)
    assert ssim(x, x + c) == pytest.approx(expected, abs=1e-9)


def test_ssim_of_a_brightness_shifted_texture_matches_the_direct_formula():
    x = 0.2 + 0.5 * np.random.default_rng(3).random((14, 13))
    y = x + 0.1
    assert ssim(x, y) == pytest.approx(direct_ssim_plane(x, y), abs=1e-10)
    noisy = np.clip(x + 0.05 * np.random.default_rng(4).standard_normal(x.shape), 0, 1)
    assert ssim(x, noisy) == pytest.approx(direct_ssim_plane(x, noisy), abs=1e-10)


def test_ssim_averages_channels_and_frames_and_shrinks_the_window_for_small_frames():
    rng = np.random.default_rng(5)
    video = rng.random((2, 12, 12, 3)) * 0.8
    changed = video.copy()
    changed[1, :, :, 2] += 0.1
    plane = direct_ssim_plane(video[1, :, :, 2], changed[1, :, :, 2])
    assert ssim(video, changed) == pytest.approx((5 + plane) / 6, abs=1e-10)  # 6 planes, 5 identical
    small = rng.random((8, 9)) * 0.8
    assert ssim(small, small + 0.1) == pytest.approx(direct_ssim_plane(small, small + 0.1, size=7), abs=1e-10)


def test_amdahl_bound_against_the_formula():
    assert amdahl_bound(0.5, 0.25) == pytest.approx(1 / (0.5 + 0.5 * 0.25))
    assert amdahl_bound(0.5, 0.25, dense_fraction=0.2) == pytest.approx(1 / (0.5 + 0.5 * (0.2 + 0.8 * 0.25)))
    assert amdahl_bound(1.0, 0.5) == pytest.approx(2.0)
    assert amdahl_bound(0.0, 0.1) == 1.0
    assert amdahl_bound(0.7, 1.0) == pytest.approx(1.0)
    assert amdahl_bound(0.8, 0.1, dense_fraction=1.0) == pytest.approx(1.0)  # everything stays dense
    assert amdahl_bound(1.0, 0.0) == math.inf


def test_predicted_speedup_against_the_formula():
    assert predicted_speedup(0.5, 4.0) == pytest.approx(1 / (0.5 + 0.125))
    assert predicted_speedup(0.3, 1.0) == pytest.approx(1.0)
    assert predicted_speedup(0.6, 0.5) == pytest.approx(1 / (0.4 + 1.2))  # slower attention: < 1


@pytest.mark.parametrize("call", [
    lambda: amdahl_bound(1.5, 0.5), lambda: amdahl_bound(0.5, -0.1), lambda: amdahl_bound(0.5, 0.5, 2.0),
    lambda: predicted_speedup(0.5, 0.0), lambda: predicted_speedup(-0.1, 2.0), lambda: amdahl_bound(True, 0.5),
])
def test_speedup_math_rejects_values_out_of_range(call):
    with pytest.raises(ValueError, match="must be"):
        call()
