"""Independent attention references for the adapter tests (plain float64 PyTorch)."""

from __future__ import annotations

import torch


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B, H, N, D]`` softmax attention restricted to a bool ``[N, N]`` (or broadcastable) mask."""
    scores = (q.double() @ k.double().transpose(-1, -2)) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.nan_to_num(scores.softmax(-1)) @ v.double()


def masked_attention_bnhd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B, N, H, D]`` (diffusers' layout) attention with a per-sample bool ``[B, N, N]`` mask."""
    out = masked_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask[:, None])
    return out.transpose(1, 2)
