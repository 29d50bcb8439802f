"""Exact masked attention in plain dense PyTorch: the ground truth the kernels are tested against.

Everything is materialised (``[B, H, N, N]`` scores), so this is for tests, small grids and
``backend="reference"`` only. It computes in the input dtype on purpose: running it in float16
measures *PyTorch's own* rounding error, which the flash-attention numerics rule uses as the yard
stick for the kernels (kernel error <= 2x PyTorch's error in the same dtype).
"""

from __future__ import annotations

import math

import torch

from ..errors import UserError


def masked_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    scale: float | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention restricted to ``mask``, dense, in the dtype of ``q``.

    Args:
        q, k, v: ``[B, H, N, D]`` (same shape, dtype and device).
        mask: bool ``[N, N]`` (shared by all heads) or ``[H, N, N]``; True = query row may attend
            key column.
        scale: score scale, default ``1 / sqrt(D)``.
        return_lse: also return the log of the softmax denominator.

    Returns:
        ``out [B, H, N, D]`` (dtype of ``q``), and with ``return_lse`` also
        ``lse float32 [B, H, N]`` (natural log of ``sum_j exp(scale * q.k_j)`` over allowed keys).
        Rows without any allowed key give ``out = 0`` and ``lse = -inf``, never NaN (also in the
        gradients).

    Example:
        >>> q = k = v = torch.randn(1, 2, 16, 8)
        >>> mask = torch.ones(16, 16, dtype=torch.bool).tril()
        >>> masked_attention_reference(q, k, v, mask).shape
        torch.Size([1, 2, 16, 8])
    """
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise UserError(
            f"q, k, v must all have shape [B, H, N, D]; got q={tuple(q.shape)}, k={tuple(k.shape)}, v={tuple(v.shape)}"
        )
    _, heads, n, dim = q.shape
    if mask.dtype != torch.bool or mask.shape[-2:] != (n, n) or mask.dim() not in (2, 3):
        raise UserError(f"mask must be bool [N, N] or [H, N, N] with N={n}; got {mask.dtype} {tuple(mask.shape)}")
    if mask.dim() == 3 and mask.shape[0] not in (1, heads):
        raise UserError(f"mask has {mask.shape[0]} heads; q has H={heads} (allowed: 1 or {heads})")
    scale = 1.0 / math.sqrt(dim) if scale is None else float(scale)
    mask = mask.to(q.device)
    if mask.dim() == 3:
        mask = mask[None]  # [1, H, N, N] broadcasts against [B, H, N, N]

    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    has_key = mask.any(-1, keepdim=True)
    # Empty rows: softmax over all -inf is NaN; use 0 scores there so the softmax (and its
    # gradient) stays finite, then zero the probabilities.
    safe = torch.where(has_key, scores, torch.zeros((), dtype=scores.dtype, device=scores.device))
    probs = torch.softmax(safe, dim=-1)
    probs = torch.where(has_key, probs, torch.zeros((), dtype=probs.dtype, device=probs.device))
    out = torch.matmul(probs, v)
    if not return_lse:
        return out
    # logsumexp over an all -inf row has a NaN gradient: take it over the safe scores instead.
    lse = torch.logsumexp(safe.float(), dim=-1)
    lse = torch.where(has_key[..., 0], lse, torch.full((), float("-inf"), device=lse.device))
    return out, lse
