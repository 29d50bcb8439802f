"""Noise levels and losses of rectified-flow training (the objective of Wan, HunyuanVideo, LTX-Video,
Mochi, FLUX and the embedded model): ``x_t = (1 - sigma) x0 + sigma noise``."""

from __future__ import annotations

import torch


def noise_levels(batch: int, shift: float, generator: torch.Generator) -> torch.Tensor:
    """``[batch]`` training noise levels: uniform ``u`` warped by the timestep shift,
    ``sigma = shift u / (1 + (shift - 1) u)`` (more high noise levels for ``shift > 1``).

    Example:
        >>> sigma = noise_levels(4, 3.0, torch.Generator().manual_seed(0))
        >>> sigma.shape, bool(((0 <= sigma) & (sigma <= 1)).all())
        (torch.Size([4]), True)
    """
    u = torch.rand(batch, generator=generator)
    return shift * u / (1 + (shift - 1) * u)


def denoising_loss(prediction: torch.Tensor, clean: torch.Tensor, sigma: torch.Tensor,
                   min_loss_sigma: float) -> torch.Tensor:
    """Rectified-flow loss of a clean-clip prediction ``[B, C, F, H, W]`` at noise levels ``sigma``
    ``[B]``: the mean of ``((x0_hat - x0) / max(sigma, min_loss_sigma))^2``, the velocity error
    (as JiT) for ``min_loss_sigma -> 0``, the plain x0 error at 1. The shipped embedded model uses
    1: with the velocity loss (0.25) near-clean steps, which that model already denoises well, got
    up to 16x the weight of the high noise levels where it fails (layout, colour and motion are
    decided there).

    Example:
        >>> clean = torch.zeros(2, 3, 1, 2, 2)
        >>> float(denoising_loss(clean + 1, clean, torch.tensor([0.1, 0.5]), 0.25))   # (16 + 4) / 2
        10.0
    """
    weight = sigma.view(-1, *([1] * (clean.ndim - 1))).clamp(min=min_loss_sigma)
    return torch.mean(((prediction - clean) / weight) ** 2)


def noised(clean: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``(1 - sigma) clean + sigma noise`` with ``sigma [B]`` broadcast over the other dimensions.

    Example:
        >>> noised(torch.zeros(2, 3), torch.ones(2, 3), torch.tensor([0.25, 1.0]))[:, 0].tolist()
        [0.25, 1.0]
    """
    s = sigma.view(-1, *([1] * (clean.ndim - 1))).to(clean)
    return (1 - s) * clean + s * noise
