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
from ..patterns.layout import BlockLayout


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


def pooled_keys(x: torch.Tensor, level: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Means of consecutive groups of ``level`` rows along dim -2, and each group's size.

    Args:
        x: ``[..., N, D]``.
        level: group size ``p``; the last group holds ``c = N - p * (ceil(N / p) - 1)`` rows.

    Returns:
        ``(means [..., ceil(N / p), D]`` in ``x.dtype``, ``sizes`` int64 ``[ceil(N / p)]``).

    Example:
        >>> means, sizes = pooled_keys(torch.arange(5.0)[:, None], 2)
        >>> means[:, 0].tolist(), sizes.tolist()
        ([0.5, 2.5, 4.0], [2, 2, 1])
    """
    n = x.shape[-2]
    groups = -(-n // level)
    padded = torch.nn.functional.pad(x, (0, 0, 0, groups * level - n))
    sizes = (torch.arange(groups, device=x.device) * level + level).clamp(max=n) - torch.arange(
        groups, device=x.device
    ) * level
    sums = padded.unflatten(-2, (groups, level)).sum(-2)
    return sums / sizes[:, None].to(x.dtype), sizes


def _pooled_key_masks(layout: BlockLayout) -> dict[int, torch.Tensor]:
    """Per level present: bool ``[Hl, N, keys of that level]``, kernel order; which query may
    attend which raw key (level 1) or which pooled key (level p: ``ceil(N / p)`` group means)."""
    n, bq, bk = layout.num_tokens, layout.block_q, layout.block_k
    num_q, num_k, heads = layout.num_q_blocks, layout.num_k_blocks, layout.num_heads
    valid = layout._valid_slots()
    levels = layout._slot_levels()
    out = {}
    for level in sorted(set(levels[valid].tolist())):
        head, qb, slot = (valid & (levels == level)).nonzero(as_tuple=True)
        kb = layout.kv_indices[head, qb, slot].long()
        width = bk // level
        dense = torch.zeros(heads, num_q, bq, num_k, width, dtype=torch.bool, device=layout.device)
        if level == 1:
            tiles = layout.tile_masks(layout.kv_mask_ids[head, qb, slot])  # [T, bq, bk]
        else:  # pooled tiles are full tiles: every query row, every group of the block
            tiles = torch.ones(head.numel(), bq, width, dtype=torch.bool, device=layout.device)
        dense.permute(0, 1, 3, 2, 4)[head, qb, kb] = tiles
        out[level] = dense.view(heads, num_q * bq, num_k * width)[:, :n, : -(-n // level)]
    return out


def pooled_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout,
    scale: float | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Dense statement of attention over a layout with pooling levels (``layout.kv_levels``).

    In kernel token order (``layout.permutation`` applied to q, k, v), every query row attends a
    list of keys: the raw keys of its level-1 tiles (their element masks applied) and, for each
    pooled tile of level ``p``, the ``block_k / p`` group means of its key block's keys and
    values, each with logit ``scale * q . mean(k) + log(c)`` (``c`` the group size). The key
    set of all rows is materialised (``[B, H, N, N + sum_p ceil(N / p)]``), masked per row, and
    one softmax runs over it, in the dtype of ``q`` (as :func:`masked_attention_reference`, so it
    is the plain-PyTorch yard stick in low precision too). Gradients flow through autograd,
    including through the means.

    Args:
        q, k, v: ``[B, H, N, D]`` in the caller's token order.
        layout: a :class:`BlockLayout` with ``num_tokens == N`` (levels optional: all 1 gives
            exactly :func:`masked_attention_reference` with ``layout.token_mask()``).
        scale: score scale, default ``1 / sqrt(D)``.
        return_lse: also return ``lse float32 [B, H, N]``.

    Returns:
        ``out [B, H, N, D]`` in the caller's order (and ``lse``; ``-inf`` and 0 on empty rows).

    Example:
        >>> from diffattn import Dense, VideoGrid
        >>> layout = Dense().layout(VideoGrid(1, 4, 16), block_size=32)
        >>> pooled = layout.with_levels(torch.full_like(layout.kv_indices, 2))
        >>> q = torch.randn(1, 1, 64, 8)
        >>> k = v = torch.randn(1, 1, 32, 8).repeat_interleave(2, dim=2)  # pairs of equal keys
        >>> torch.allclose(pooled_attention_reference(q, k, v, pooled),
        ...                pooled_attention_reference(q, k, v, layout), atol=1e-5)
        True
    """
    dim = q.shape[-1]
    scale = 1.0 / math.sqrt(dim) if scale is None else float(scale)
    layout = layout.to(q.device)
    qk, kk, vk = (layout.permute_tokens(x) for x in (q, k, v))
    keys, values, biases, masks = [], [], [], []
    for level, mask in _pooled_key_masks(layout).items():
        if level == 1:
            keys.append(kk), values.append(vk)
            biases.append(torch.zeros(kk.shape[-2], dtype=q.dtype, device=q.device))
        else:
            pooled_k, sizes = pooled_keys(kk, level)
            keys.append(pooled_k), values.append(pooled_keys(vk, level)[0])
            biases.append(sizes.to(q.dtype).log())
        masks.append(mask)
    if not keys:  # nothing visited at all
        out = qk * 0 + kk * 0 + vk * 0
        lse = torch.full(q.shape[:-1], float("-inf"), device=q.device)
        return (out, lse) if return_lse else out
    all_k, all_v, bias, mask = torch.cat(keys, -2), torch.cat(values, -2), torch.cat(biases), torch.cat(masks, -1)
    if mask.shape[0] == 1:
        mask = mask[0]
    scores = torch.matmul(qk, all_k.transpose(-1, -2)) * scale + bias
    scores = scores.masked_fill(~mask, float("-inf"))
    has_key = mask.any(-1, keepdim=True)
    safe = torch.where(has_key, scores, torch.zeros((), dtype=scores.dtype, device=scores.device))
    probs = torch.where(has_key, torch.softmax(safe, dim=-1), torch.zeros((), dtype=q.dtype, device=q.device))
    out = layout.unpermute_tokens(torch.matmul(probs, all_v))
    if not return_lse:
        return out
    lse = torch.logsumexp(safe.float(), dim=-1)
    lse = torch.where(has_key[..., 0], lse, torch.full((), float("-inf"), device=lse.device))
    return out, layout.unpermute_tokens(lse, dim=-1)


def add_pooled_grad(raw: torch.Tensor, pooled: torch.Tensor, level: int) -> None:
    """``raw += d(means)/d(raw)^T pooled``: each key of a group of ``c`` gets its mean's gradient / c.

    The backward of :func:`pooled_keys`, in place. ``raw``: ``[..., N, D]``; ``pooled``:
    ``[..., ceil(N / level), D]`` (same leading dims and dtype).

    Example:
        >>> raw = torch.zeros(5, 1)
        >>> add_pooled_grad(raw, torch.tensor([[2.0], [4.0], [3.0]]), 2)
        >>> raw[:, 0].tolist()
        [1.0, 1.0, 2.0, 2.0, 3.0]
    """
    n = raw.shape[-2]
    _, sizes = pooled_keys(raw[..., :0, :].new_zeros(n, 1), level)
    per_key = pooled / sizes.to(pooled.dtype)[:, None]
    raw += per_key.repeat_interleave(level, dim=-2)[..., :n, :]
