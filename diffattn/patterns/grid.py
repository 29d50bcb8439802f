"""The latent token grid of a video (or image) and the orders its tokens can be laid out in.

A diffusion transformer sees a video as ``frames x height x width`` latent tokens (after the VAE
and the patchify), flattened frame-major, optionally with text tokens before or after them in the
same self-attention sequence. Every pattern and every block layout in diffattn is defined over a
:class:`VideoGrid`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..errors import UserError
from ._checks import check_choice, check_positive_int

TextPosition = Literal["end", "start"]
_TEXT_POSITIONS = ("end", "start")


@dataclass(frozen=True)
class VideoGrid:
    """Shape of the self-attention token sequence of one video.

    Args:
        frames: latent frames (1 for an image).
        height: latent tokens per column (after patchify).
        width: latent tokens per row (after patchify).
        text_tokens: text tokens that share the self-attention sequence (HunyuanVideo, CogVideoX,
            Mochi, FLUX); 0 when text only enters through cross-attention (Wan, LTX-Video).
        text_position: ``"end"`` (``[video, text]``) or ``"start"`` (``[text, video]``).

    The sequence has ``N = frames * height * width + text_tokens`` tokens; video token
    ``(t, h, w)`` sits at video index ``(t * height + h) * width + w``.

    Example:
        >>> grid = VideoGrid(frames=21, height=30, width=52)
        >>> grid.num_tokens
        32760
    """

    frames: int
    height: int
    width: int
    text_tokens: int = 0
    text_position: TextPosition = "end"

    def __post_init__(self) -> None:
        # Stored as plain ints so that equal grids hash equally (numpy integers are accepted).
        for name in ("frames", "height", "width"):
            object.__setattr__(self, name, check_positive_int(f"VideoGrid.{name}", getattr(self, name)))
        object.__setattr__(
            self, "text_tokens", check_positive_int("VideoGrid.text_tokens", self.text_tokens, allow_zero=True)
        )
        check_choice("VideoGrid.text_position", self.text_position, _TEXT_POSITIONS)

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(frames, height, width)``."""
        return (self.frames, self.height, self.width)

    @property
    def tokens_per_frame(self) -> int:
        return self.height * self.width

    @property
    def video_tokens(self) -> int:
        return self.frames * self.height * self.width

    @property
    def num_tokens(self) -> int:
        """Total sequence length ``N`` (video + text)."""
        return self.video_tokens + self.text_tokens

    @property
    def video_offset(self) -> int:
        """Sequence index of the first video token."""
        return self.text_tokens if self.text_position == "start" else 0

    def video_index_of(self, token_index: torch.Tensor) -> torch.Tensor:
        """Video index of each sequence index, ``-1`` for text tokens."""
        video = token_index - self.video_offset
        is_video = (video >= 0) & (video < self.video_tokens)
        return torch.where(is_video, video, torch.full_like(video, -1))

    def coordinates(self, video_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(t, h, w)`` of raster video indices."""
        t = torch.div(video_index, self.tokens_per_frame, rounding_mode="floor")
        rest = video_index % self.tokens_per_frame
        return t, torch.div(rest, self.width, rounding_mode="floor"), rest % self.width


def check_tile_shape(tile_shape: tuple[int, int, int] | None) -> tuple[int, int, int] | None:
    """Validate the tile shape of a tile-major token permutation."""
    if tile_shape is None:
        return None
    if not isinstance(tile_shape, (tuple, list)) or len(tile_shape) != 3:
        raise UserError(f"tile_shape must be a (t, h, w) tuple of 3 positive ints or None, got {tile_shape!r}")
    t, h, w = (check_positive_int(f"tile_shape[{axis}]", size) for axis, size in zip("thw", tile_shape))
    return (t, h, w)


def clip_tile_shape(tile_shape: tuple[int, int, int], grid: VideoGrid) -> tuple[int, int, int]:
    """``tile_shape`` clipped to ``grid`` per axis (the same tile-major order, smaller numbers).

    Example:
        >>> clip_tile_shape((1, 8, 16), VideoGrid(1, 4, 40))
        (1, 4, 16)
    """
    t, h, w = (min(size, length) for size, length in zip(tile_shape, grid.shape))
    return (t, h, w)


class VideoOrder:
    """The order in which a kernel sees the video tokens: raster (``t, h, w``) or tile-major.

    Tile-major order with tile shape ``(tt, th, tw)`` walks the tiles of the grid in raster order
    and the tokens inside each tile in raster order; tiles at the far borders are clipped when an
    axis is not a multiple of the tile. A 3-D local window then covers whole blocks instead of
    slivers of many rows. Raster order is tile-major order with tile ``(1, 1, width)``.
    """

    def __init__(self, grid: VideoGrid, tile_shape: tuple[int, int, int] | None = None) -> None:
        self.grid = grid
        self.is_raster = tile_shape is None
        tile = (1, 1, grid.width) if tile_shape is None else check_tile_shape(tile_shape)
        # A tile larger than the grid on an axis gives the same order as one the axis' length.
        self.tile_shape = clip_tile_shape(tile, grid)

    def raster_index(self) -> torch.Tensor:
        """int64 ``[V]``: raster video index of the token at each kernel video position."""
        grid = self.grid
        if self.is_raster:
            return torch.arange(grid.video_tokens)
        tt, th, tw = self.tile_shape
        t = torch.arange(grid.frames)
        h = torch.arange(grid.height)
        w = torch.arange(grid.width)
        # Sort key: tile coordinates first, then coordinates inside the tile.
        key_t = (t // tt, t % tt)
        key_h = (h // th, h % th)
        key_w = (w // tw, w % tw)
        T, H, W = grid.shape
        raster = (t[:, None, None] * H + h[None, :, None]) * W + w[None, None, :]
        n_ht, n_wt = -(-H // th), -(-W // tw)
        tile_id = (key_t[0][:, None, None] * n_ht + key_h[0][None, :, None]) * n_wt + key_w[0][None, None, :]
        inner = (key_t[1][:, None, None] * th + key_h[1][None, :, None]) * tw + key_w[1][None, None, :]
        sort_key = tile_id * (tt * th * tw) + inner
        return raster.flatten()[torch.argsort(sort_key.flatten(), stable=True)]

    def prefix_boxes(self, prefix_lengths: torch.Tensor) -> torch.Tensor:
        """Decompose prefixes of this order into disjoint axis-aligned boxes.

        The first ``x`` video tokens in this order form the union of at most 6 boxes (tiles before
        the current one: 3 boxes; the raster prefix inside the current tile: 3 boxes).

        Args:
            prefix_lengths: int64 ``[X]`` values in ``[0, V]``.
        Returns:
            int64 ``[X, 6, 3, 2]``: per prefix, per box, per axis (t, h, w), ``[lo, hi)``;
            empty boxes have ``lo == hi`` on some axis.
        """
        T, H, W = self.grid.shape
        tt, th, tw = self.tile_shape
        x = prefix_lengths.to(torch.int64)
        V = self.grid.video_tokens
        done = x >= V
        x = x.clamp(max=V - 1)
        # Locate the token at position x: its tile and its offset inside the (clipped) tile.
        # Tiles are laid out by tile-rows of frames; find the tile slab in t, then h, then w.
        slab_t = tt * H * W  # tokens in a full slab of tt frames (last slab may be shorter)
        a = torch.div(x, slab_t, rounding_mode="floor")
        t0 = a * tt
        len_t = (T - t0).clamp(max=tt)
        rem = x - a * slab_t
        slab_h = len_t * th * W
        b = torch.div(rem, slab_h, rounding_mode="floor")
        h0 = b * th
        len_h = (H - h0).clamp(max=th)
        rem = rem - b * slab_h
        tile_vol = len_t * len_h * tw
        c = torch.div(rem, tile_vol, rounding_mode="floor")
        w0 = c * tw
        len_w = (W - w0).clamp(max=tw)
        off = rem - c * tile_vol
        u = torch.div(off, len_h * len_w, rounding_mode="floor")
        off = off - u * len_h * len_w
        v = torch.div(off, len_w, rounding_mode="floor")
        r = off - v * len_w
        # A finished prefix (x == V) is everything: put it all in box 0.
        a_end = torch.where(done, torch.full_like(a, T), t0)
        zeros = torch.zeros_like(x)
        full_h, full_w = torch.full_like(x, H), torch.full_like(x, W)

        def box(tlo, thi, hlo, hhi, wlo, whi):
            return torch.stack(
                [torch.stack([tlo, thi], -1), torch.stack([hlo, hhi], -1), torch.stack([wlo, whi], -1)], -2
            )

        def unless_done(lo, hi):
            return lo, torch.where(done, lo, hi)

        te, he, we = t0 + len_t, h0 + len_h, w0 + len_w
        boxes = [
            box(zeros, a_end, zeros, full_h, zeros, full_w),
            box(*unless_done(t0, te), zeros, h0, zeros, full_w),
            box(*unless_done(t0, te), h0, he, zeros, w0),
            box(*unless_done(t0, t0 + u), h0, he, w0, we),
            box(*unless_done(t0 + u, t0 + u + 1), h0, h0 + v, w0, we),
            box(*unless_done(t0 + u, t0 + u + 1), h0 + v, h0 + v + 1, w0, w0 + r),
        ]
        return torch.stack(boxes, 1)
