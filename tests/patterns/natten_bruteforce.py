"""An independent, loop-by-loop statement of NATTEN's neighborhood rules (test reference only).

Written from NATTEN's documented semantics as "window start" arithmetic, deliberately unlike the
vectorised leader/centre clamp in ``diffattn.patterns.neighborhood``.
"""

from __future__ import annotations

import itertools

import torch


def axis_neighbors(x: int, length: int, kernel: int | None, stride: int, dilation: int, causal: bool) -> set[int]:
    """Coordinates on one axis that query coordinate ``x`` attends."""
    if kernel is None:
        return set(range(0, x + 1)) if causal else set(range(length))
    group = x % dilation
    members = list(range(group, length, dilation))  # the dilation group, in order
    pos = members.index(x)
    size = len(members)
    first_of_run = (pos // stride) * stride
    if causal:
        leader = min(first_of_run + stride - 1, size - 1)
        lo = max(0, leader - kernel + 1)
        return {members[i] for i in range(lo, pos + 1)}
    leader = min(first_of_run + stride // 2, size - 1)
    start = leader - kernel // 2
    start = max(0, min(start, size - kernel))
    return {members[i] for i in range(start, start + kernel)}


def natten_token_mask(shape, kernel_size, stride, dilation, causal, text_tokens=0, text_position="end") -> torch.Tensor:
    """bool [N, N] of na3d over ``shape`` = (T, H, W), text tokens dense."""
    T, H, W = shape
    coords = list(itertools.product(range(T), range(H), range(W)))
    index = {c: i for i, c in enumerate(coords)}
    video = len(coords)
    mask = torch.zeros(video, video, dtype=torch.bool)
    for qi, q in enumerate(coords):
        per_axis = [
            axis_neighbors(q[a], shape[a], kernel_size[a], stride[a], dilation[a], causal[a]) for a in range(3)
        ]
        for kc in itertools.product(*per_axis):
            mask[qi, index[kc]] = True
    n = video + text_tokens
    full = torch.ones(n, n, dtype=torch.bool)
    off = text_tokens if text_position == "start" else 0
    full[off : off + video, off : off + video] = mask
    return full


def fit_axis(length: int, kernel: int | None, stride: int, dilation: int) -> tuple[int | None, int, int]:
    """diffattn's documented rule for a window that does not fit, stated as a search: the kernel
    shrinks to the axis, then the dilation steps down until NATTEN accepts the window."""
    if kernel is None:
        return None, stride, dilation
    while kernel > length:
        kernel -= 1
    while kernel * dilation > length:
        dilation -= 1
    return kernel, min(stride, kernel), dilation
