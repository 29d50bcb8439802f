"""Fidelity and speedup arithmetic of the profiler: PSNR, SSIM, the Amdahl bound.

Everything here is plain numpy/torch math on finished numbers and frames, so it is tested against
independent computations without running a model.

Images and videos are channel-last, as the pipelines return them with ``output_type="np"``:
``[H, W]`` (one grey image), ``[H, W, C]`` (one image) or ``[F, H, W, C]`` (a video; any further
leading axes count as more frames). ``uint8`` data is divided by 255; float data must already be
in ``[0, 1]``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

#: SSIM constants of Wang et al. (2004): Gaussian window, its sigma, and K1, K2 of C1, C2.
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def as_unit_float(video: Any, name: str = "video") -> np.ndarray:
    """``video`` (numpy array, torch tensor or list of frames) as float64 in ``[0, 1]``.

    Example:
        >>> float(as_unit_float(np.full((2, 2), 255, np.uint8)).max())
        1.0
    """
    if isinstance(video, torch.Tensor):
        video = video.detach().float().cpu().numpy()
    array = np.asarray(video)
    if array.dtype == np.uint8:
        return array.astype(np.float64) / 255.0
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise ValueError(f"{name} must be uint8 or float data in [0, 1]; got dtype {array.dtype}")
    array = array.astype(np.float64)
    if array.size and (not np.isfinite(array).all() or array.min() < -1e-6 or array.max() > 1 + 1e-6):
        low, high = float(np.nanmin(array)), float(np.nanmax(array))
        raise ValueError(f"{name} must be uint8, or float in [0, 1]; got float values in [{low:g}, {high:g}]")
    return np.clip(array, 0.0, 1.0)


def _pair(a: Any, b: Any) -> tuple[np.ndarray, np.ndarray]:
    x, y = as_unit_float(a, "a"), as_unit_float(b, "b")
    if x.shape != y.shape:
        raise ValueError(f"a and b must have the same shape; got {x.shape} and {y.shape}")
    if x.ndim < 2 or x.size == 0:
        raise ValueError(f"a and b must be non-empty images [H, W(, C)] or videos [F, H, W, C]; got shape {x.shape}")
    return x, y


def psnr(a: Any, b: Any) -> float:
    """Peak signal-to-noise ratio in dB of ``b`` against ``a`` (peak 1 on ``[0, 1]`` data).

    The mean squared error is pooled over the whole video (all frames, pixels and channels), so
    the result is ``inf`` exactly when the two videos are identical.

    Example:
        >>> a = np.zeros((2, 8, 8, 3), np.uint8)
        >>> round(psnr(a, a + 1), 2)          # every value off by 1/255: 20*log10(255)
        48.13
    """
    x, y = _pair(a, b)
    mse = float(np.mean((x - y) ** 2))
    return math.inf if mse == 0.0 else 10.0 * math.log10(1.0 / mse)


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
    """Normalised 1-D Gaussian weights of length ``size`` (the SSIM window is its outer product)."""
    offsets = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    weights = np.exp(-(offsets**2) / (2.0 * sigma**2))
    return weights / weights.sum()


def _planes(x: np.ndarray) -> np.ndarray:
    """``[P, H, W]``: one plane per (frame, channel)."""
    if x.ndim == 2:
        return x[None]
    planes = np.moveaxis(x.reshape(-1, *x.shape[-3:]), -1, 1)  # [F, C, H, W]
    return planes.reshape(-1, *x.shape[-3:-1])


def ssim(a: Any, b: Any) -> float:
    """Structural similarity of ``b`` against ``a``: mean over frames of the per-frame SSIM.

    Per frame and channel, on ``[0, 1]`` data: local means, variances and covariance under an
    11x11 Gaussian window (sigma 1.5), ``C1 = (0.01)^2``, ``C2 = (0.03)^2``, the SSIM map over the
    positions where the window fits ("valid", as in Wang et al.'s reference code), averaged; then
    averaged over channels and frames. Frames smaller than 11 pixels use the largest odd window
    that fits. Identical inputs give exactly 1.

    Example:
        >>> a = np.random.default_rng(0).random((2, 16, 16, 3))
        >>> ssim(a, a)
        1.0
    """
    x, y = _pair(a, b)
    if np.array_equal(x, y):
        return 1.0  # exactly, not 1 - rounding
    px, py = torch.from_numpy(_planes(x))[:, None], torch.from_numpy(_planes(y))[:, None]
    height, width = px.shape[-2:]
    size = min(SSIM_WINDOW, height, width)
    size -= 1 - size % 2  # odd, so the window has a centre
    g = torch.from_numpy(gaussian_window(size))

    def blur(z: torch.Tensor) -> torch.Tensor:
        # Separable Gaussian filter, valid positions only.
        z = torch.nn.functional.conv2d(z, g.view(1, 1, 1, -1))
        return torch.nn.functional.conv2d(z, g.view(1, 1, -1, 1))

    c1, c2 = SSIM_K1**2, SSIM_K2**2
    mu_x, mu_y = blur(px), blur(py)
    var_x = blur(px * px) - mu_x**2
    var_y = blur(py * py) - mu_y**2
    cov = blur(px * py) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    # Mean per plane, then over planes: frames and channels all have the same number of positions.
    return float(ssim_map.mean(dim=(1, 2, 3)).mean())


def _check_fraction(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1]; got {value!r}")
    return float(value)


def amdahl_bound(attention_share: float, density: float, dense_fraction: float = 0.0) -> float:
    """End-to-end speedup if attention ran at its ideal ``1 / density`` on the sparse calls.

    ``1 / ((1 - s) + s * (f_dense + f_sparse * density))`` with ``s = attention_share`` (share of
    the dense run's time in attention), ``f_dense = dense_fraction`` (share of that attention time
    in calls that stay dense: warm-up steps, dense layers; they run at 1x) and
    ``f_sparse = 1 - f_dense``.

    Example:
        >>> amdahl_bound(0.5, 0.25)                     # 1 / (0.5 + 0.5 * 0.25)
        1.6
    """
    s = _check_fraction("attention_share", attention_share)
    d = _check_fraction("density", density)
    f_dense = _check_fraction("dense_fraction", dense_fraction)
    remaining = (1.0 - s) + s * (f_dense + (1.0 - f_dense) * d)
    return math.inf if remaining == 0.0 else 1.0 / remaining


def predicted_speedup(attention_share: float, attention_speedup: float) -> float:
    """End-to-end speedup that the measured attention speedup alone implies (Amdahl's law):
    ``1 / ((1 - s) + s / attention_speedup)``.

    Example:
        >>> predicted_speedup(0.5, 4.0)                 # 1 / (0.5 + 0.125)
        1.6
    """
    s = _check_fraction("attention_share", attention_share)
    if (isinstance(attention_speedup, bool) or not isinstance(attention_speedup, (int, float))
            or not attention_speedup > 0):
        raise ValueError(f"attention_speedup must be a number > 0; got {attention_speedup!r}")
    remaining = (1.0 - s) + s / attention_speedup
    return math.inf if remaining == 0.0 else 1.0 / remaining
