"""Generalized Neighborhood Attention (GNA) with NATTEN's exact per-axis semantics.

Each axis (t, h, w) is treated independently and the 3-D rule is the AND of the three:

* **dilation** ``d`` splits the axis into ``d`` interleaved groups (``x % d``); a query only sees
  keys of its own group, and inside a group coordinates are ``x // d``. Group ``g`` of an axis of
  length ``L`` has ``L // d + (g < L % d)`` positions.
* **stride** ``s`` partitions a group into runs of ``s`` queries that share one window, the window
  of the run's *leader*: the centre query (the right one of the two centres for even ``s``), or
  the last query of the run when the axis is causal; leaders are clamped to the group.
* **non-causal window**: ``kernel_size`` keys around the leader, ``k // 2`` to the left and
  ``k // 2`` (odd k) or ``k // 2 - 1`` (even k) to the right, shifted inward at the borders so
  every query sees exactly ``kernel_size`` keys.
* **causal window**: keys ``<=`` the query itself and ``> leader - kernel_size``; no shift, so the
  first queries see fewer keys.

``kernel_size`` equal to the axis length (or ``None``) means the whole axis. This is the mask of
``natten.na3d(q, k, v, kernel_size, stride, dilation, is_causal)``.

**Windows that do not fit.** NATTEN requires ``kernel_size * dilation <= length`` on every axis
and refuses anything else. diffattn instead fits the window to the axis, per axis, so a preset
runs at every resolution and length (a 1-frame call, a 64 px preview):

1. ``kernel = min(kernel_size, length)``: a window larger than its axis covers the whole axis
   (the call is dense along it);
2. ``dilation = min(dilation, length // kernel)``: the largest dilation that keeps every query's
   window inside the axis (each query still sees ``kernel`` keys, spread as wide as the axis
   allows; a full-axis kernel has dilation 1);
3. ``stride = min(stride, kernel)``.

The result is exactly NATTEN's mask with these fitted parameters (:meth:`Neighborhood.fitted`).
Axes that already fit are untouched. ``Neighborhood(..., strict=True)`` keeps NATTEN's refusal.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from ..errors import UserError
from ._checks import check_per_axis
from ._separable import separable_prefix_pair_counts
from .base import Pattern
from .grid import VideoGrid, VideoOrder

Triple = tuple[int, int, int]


def natten_axis_table(length: int, kernel_size: int | None, stride: int, dilation: int, causal: bool) -> torch.Tensor:
    """bool ``[length, length]``: NATTEN's 1-D neighborhood rule, query rows, key columns.

    Example:
        >>> natten_axis_table(5, 3, 1, 1, False).int()
        tensor([[1, 1, 1, 0, 0],
                [1, 1, 1, 0, 0],
                [0, 1, 1, 1, 0],
                [0, 0, 1, 1, 1],
                [0, 0, 1, 1, 1]], dtype=torch.int32)
    """
    q = torch.arange(length)[:, None]
    k = torch.arange(length)[None, :]
    if kernel_size is None:  # the whole axis
        return (k <= q) if causal else torch.ones(length, length, dtype=torch.bool)
    q_group, k_group = q % dilation, k % dilation
    q_in, k_in = q // dilation, k // dilation
    group_len = length // dilation + (q_group < length % dilation).long()
    if causal:
        leader = torch.minimum((q_in // stride) * stride + stride - 1, group_len - 1)
        inside = (k_in <= q_in) & (leader - k_in < kernel_size)
    else:
        left = kernel_size // 2
        right = kernel_size // 2 + kernel_size % 2 - 1
        leader = torch.minimum((q_in // stride) * stride + stride // 2, group_len - 1)
        centre = torch.maximum(torch.minimum(leader, group_len - 1 - right), torch.full_like(leader, left))
        inside = (k_in >= centre - left) & (k_in <= centre + right)
    return inside & (q_group == k_group)


@dataclass(frozen=True)
class Neighborhood(Pattern):
    """Neighborhood attention over the (t, h, w) token grid, as in ``natten.na3d``.

    Args:
        kernel_size: window per axis (int or ``(t, h, w)``); ``None`` on an axis = whole axis.
            NATTEN's rule is ``kernel_size * dilation <= axis length``; on an axis where it does
            not hold, the window is fitted to the axis (see :meth:`fitted`): a kernel at least
            the axis length covers the whole axis, and dilation shrinks until the window fits.
        stride: queries per shared window per axis (``1 <= stride <= kernel_size``).
        dilation: dilation per axis.
        causal: per-axis causal masking (keys at or before the query on that axis).
        strict: refuse (:class:`~diffattn.errors.UserError`) a grid on which the window does not
            fit, as NATTEN does, instead of fitting it.

    A FreeSwim inward window is ``Neighborhood(kernel_size=(None, kh, kw))``; 2-D images use
    ``frames=1`` (any kernel on t then means the single frame).

    Example:
        >>> from diffattn import VideoGrid
        >>> p = Neighborhood(kernel_size=(3, 7, 7))
        >>> p.layout(VideoGrid(8, 16, 16), block_size=64, tile_shape=(1, 8, 8)).density
        0.0717...
        >>> p.fitted(VideoGrid(1, 5, 16)).kernel_size  # a 1-frame call, 5 rows: dense on t and h
        (1, 5, 7)
    """

    kernel_size: int | Triple | tuple = 7
    stride: int | Triple = 1
    dilation: int | Triple = 1
    causal: bool | tuple[bool, bool, bool] = False
    strict: bool = False

    def __post_init__(self) -> None:
        kernel = check_per_axis("Neighborhood.kernel_size", self.kernel_size, int, allow_none=True)
        stride = check_per_axis("Neighborhood.stride", self.stride, int)
        dilation = check_per_axis("Neighborhood.dilation", self.dilation, int)
        causal = check_per_axis("Neighborhood.causal", self.causal, bool)
        for axis, k, s in zip("thw", kernel, stride):
            if k is not None and s > k:
                raise UserError(f"Neighborhood.stride[{axis}]={s} must be <= kernel_size[{axis}]={k}")
        if not isinstance(self.strict, bool):
            raise UserError(f"Neighborhood.strict must be a bool, got {self.strict!r} ({type(self.strict).__name__})")
        object.__setattr__(self, "kernel_size", kernel)
        object.__setattr__(self, "stride", stride)
        object.__setattr__(self, "dilation", dilation)
        object.__setattr__(self, "causal", causal)

    def validate_grid(self, grid: VideoGrid) -> None:
        super().validate_grid(grid)
        if not self.strict:
            return
        axes = ("t (frames)", "h (height)", "w (width)")
        for axis, k, d, size in zip(axes, self.kernel_size, self.dilation, grid.shape):
            if k is not None and k * d > size:
                raise UserError(
                    f"Neighborhood kernel_size*dilation on axis {axis} is {k}*{d}={k * d}, larger than the grid's "
                    f"{size} tokens; allowed with strict=True: kernel_size*dilation <= {size} (or kernel_size=None "
                    "for the whole axis; strict=False fits the window to the axis)"
                )

    def fitted(self, grid: VideoGrid) -> "Neighborhood":
        """The pattern NATTEN would run on ``grid``: each axis' window fitted to the axis.

        Per axis of length ``L`` with a kernel ``k`` (``None`` stays the whole axis):
        ``k' = min(k, L)``, ``dilation' = min(dilation, L // k')``, ``stride' = min(stride, k')``,
        so ``k' * dilation' <= L`` always holds. Equal to ``self`` when every axis fits.

        Example:
            >>> from diffattn import VideoGrid
            >>> Neighborhood(kernel_size=(3, 3, 9), dilation=(1, 4, 1)).fitted(VideoGrid(2, 10, 5))
            Neighborhood(kernel_size=(2, 3, 5), stride=(1, 1, 1), dilation=(1, 3, 1),
                         causal=(False, False, False), strict=False)
        """
        self.validate_grid(grid)
        kernels, strides, dilations = [], [], []
        for k, s, d, length in zip(self.kernel_size, self.stride, self.dilation, grid.shape):
            if k is None:
                kernels.append(None), strides.append(s), dilations.append(d)
                continue
            k = min(k, length)
            kernels.append(k), strides.append(min(s, k)), dilations.append(min(d, length // k))
        fitted = Neighborhood(tuple(kernels), tuple(strides), tuple(dilations), self.causal, self.strict)
        return self if fitted == self else fitted

    def axis_tables(self, grid: VideoGrid) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The per-axis rule tables for ``grid`` (bool ``[T, T]``, ``[H, H]``, ``[W, W]``), of the
        window fitted to the grid."""
        return _axis_tables(self.fitted(grid), grid.shape)

    def video_factors(self, grid: VideoGrid) -> list[tuple[torch.Tensor, torch.Tensor]]:
        coordinates = grid.coordinates(torch.arange(grid.video_tokens))
        return list(zip(coordinates, self.axis_tables(grid)))

    def video_prefix_pair_counts(
        self, grid: VideoGrid, order: VideoOrder, q_prefix: torch.Tensor, k_prefix: torch.Tensor
    ) -> torch.Tensor:
        return separable_prefix_pair_counts(self.axis_tables(grid), grid, order, q_prefix, k_prefix)


@lru_cache(maxsize=64)
def _axis_tables(pattern: Neighborhood, shape: Triple) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(  # type: ignore[return-value]
        natten_axis_table(size, k, s, d, c)
        for size, k, s, d, c in zip(shape, pattern.kernel_size, pattern.stride, pattern.dilation, pattern.causal)
    )
