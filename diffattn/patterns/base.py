"""The interface every attention pattern implements, and the layout cache."""

from __future__ import annotations

import abc
from functools import lru_cache

import torch

from ..errors import UserError
from ._checks import check_block_size
from .grid import VideoGrid, VideoOrder, check_tile_shape, clip_tile_shape
from .layout import BlockLayout, build_block_layout

# A token mask is N x N booleans; beyond this it is a test-only tool that would eat the machine.
MAX_TOKEN_MASK_TOKENS = 24_576
# A layout build holds a few float64 numbers per tile of the N x N plane: beyond this many tiles
# (N = 1M tokens at block 128) it would exhaust memory instead of answering.
MAX_LAYOUT_TILES = 1 << 26
_LAYOUT_CACHE_SIZE = 64


class Pattern(abc.ABC):
    """A static sparsity pattern over the video tokens of a :class:`VideoGrid`.

    Subclasses are frozen dataclasses (hashable: layouts are cached by pattern value) that define
    which video token may attend which video token. Text tokens are always dense in both
    directions. Two methods define a pattern:

    * :meth:`video_factors`: the element rule as an AND of table look-ups,
      ``allowed(q, k) = all(table[feature[q], feature[k]] for feature, table in factors)``; it is
      the single source of truth (``token_mask`` and partial-tile masks both come from it).
    * :meth:`video_prefix_pair_counts`: the number of allowed pairs among the first ``x`` query
      and first ``y`` key video tokens of a token order, in closed form, so that layouts for
      100k-token videos are built without an ``N x N`` mask.
    """

    #: Whether :meth:`layout` accepts a ``tile_shape`` (tile-major token permutation).
    supports_permutation: bool = True

    @abc.abstractmethod
    def video_factors(self, grid: VideoGrid) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The element rule as ``[(feature int64 [V], table bool [L, L]), ...]``.

        ``feature`` maps a raster video index to a small integer (a coordinate, a block id);
        query ``q`` may attend key ``k`` iff ``table[feature[q], feature[k]]`` holds for every
        factor. No factor at all means dense.
        """

    def video_allowed(self, grid: VideoGrid, q_video: torch.Tensor, k_video: torch.Tensor) -> torch.Tensor:
        """Element rule: bool, the broadcast of ``q_video`` and ``k_video`` (raster video indices)."""
        allowed = torch.ones(torch.broadcast_shapes(q_video.shape, k_video.shape), dtype=torch.bool)
        for feature, table in self.video_factors(grid):
            allowed &= table[feature[q_video], feature[k_video]]
        return allowed

    @abc.abstractmethod
    def video_prefix_pair_counts(
        self, grid: VideoGrid, order: VideoOrder, q_prefix: torch.Tensor, k_prefix: torch.Tensor
    ) -> torch.Tensor:
        """float64 ``[X, Y]``: allowed (query, key) video pairs among the first ``q_prefix[i]``
        queries and first ``k_prefix[j]`` keys of ``order``."""

    def validate_grid(self, grid: VideoGrid) -> None:
        """Raise :class:`UserError` if the pattern cannot be applied to ``grid``."""
        if not isinstance(grid, VideoGrid):
            raise UserError(f"grid must be a VideoGrid, got {grid!r} ({type(grid).__name__})")

    # ---------------------------------------------------------------------------- public API
    def token_mask(self, grid: VideoGrid) -> torch.Tensor:
        """bool ``[N, N]``: True where query token (row) may attend key token (column).

        The reference definition of the pattern, for tests and small grids
        (N <= 24,576); kernels use :meth:`layout`.

        Example:
            >>> from diffattn import Neighborhood, VideoGrid
            >>> Neighborhood(kernel_size=(1, 3, 3)).token_mask(VideoGrid(2, 4, 4)).shape
            torch.Size([32, 32])
        """
        self.validate_grid(grid)
        n = grid.num_tokens
        if n > MAX_TOKEN_MASK_TOKENS:
            raise UserError(
                f"token_mask materialises N x N booleans and is for small grids; grid has N={n} > "
                f"{MAX_TOKEN_MASK_TOKENS} tokens. Use pattern.layout(grid) for real sizes."
            )
        video = grid.video_index_of(torch.arange(n))
        is_text = video < 0
        allowed = self.video_allowed(grid, video.clamp(min=0)[:, None], video.clamp(min=0)[None, :])
        return allowed | is_text[:, None] | is_text[None, :]

    def layout(
        self,
        grid: VideoGrid,
        block_size: int = 128,
        *,
        block_q: int | None = None,
        block_k: int | None = None,
        tile_shape: tuple[int, int, int] | None = None,
        device: torch.device | str = "cpu",
    ) -> BlockLayout:
        """The pattern's :class:`BlockLayout` for ``grid`` (cached by all arguments).

        Args:
            grid: the token grid.
            block_size: tile size for queries and keys unless ``block_q``/``block_k`` are given.
            block_q: query rows per tile (16, 32, 64, 128 or 256).
            block_k: key columns per tile (32, 64, 128 or 256).
            tile_shape: ``(t, h, w)`` tile for a tile-major permutation of the video tokens, so a
                3-D local window covers whole blocks (pick ``t*h*w == block_size``); None keeps
                the caller's order. A tile larger than the grid on an axis is clipped to it.
            device: where the layout's tensors live.

        Raises:
            UserError: a bad argument, naming it, its value and what is allowed; also a grid whose
                ``ceil(N / block_q) * ceil(N / block_k)`` tiles exceed ``MAX_LAYOUT_TILES``.

        Example:
            >>> from diffattn import Radial, VideoGrid
            >>> layout = Radial().layout(VideoGrid(21, 30, 52), block_size=128)
            >>> layout.density < 0.6
            True
        """
        self.validate_grid(grid)
        # Errors name the argument the bad value came from (and, for block_size, its role).
        q_name = "block_size" if block_q is None else "block_q"
        k_name = "block_size (as block_k)" if block_k is None else "block_k"
        block_q = check_block_size(q_name, block_size if block_q is None else block_q)
        block_k = check_block_size(k_name, block_size if block_k is None else block_k, (32, 64, 128, 256))
        tile_shape = check_tile_shape(tile_shape)
        if tile_shape is not None and not self.supports_permutation:
            raise UserError(
                f"tile_shape={tile_shape} is not supported by {type(self).__name__}: its blocks are already "
                "aligned to the token order; allowed: tile_shape=None"
            )
        if tile_shape is not None:
            tile_shape = clip_tile_shape(tile_shape, grid)
        n = grid.num_tokens
        tiles = -(-n // block_q) * -(-n // block_k)
        if tiles > MAX_LAYOUT_TILES:
            raise UserError(
                f"grid has N={n} tokens: {tiles} tiles of {block_q}x{block_k}, more than a layout can hold "
                f"({MAX_LAYOUT_TILES}); allowed: ceil(N/block_q)*ceil(N/block_k) <= {MAX_LAYOUT_TILES} "
                "(a larger block size, or a smaller grid)"
            )
        return _cached_layout(self, grid, block_q, block_k, tile_shape, _check_device(device))


def _check_device(device: object) -> str:
    """The canonical name of an available torch device, else :class:`UserError`."""
    try:
        name = torch.device(device)
        torch.empty(0, device=name)
    except (RuntimeError, TypeError, AssertionError) as error:  # torch's own "no such device" errors
        raise UserError(
            f"device must be an available torch device such as 'cpu' or 'cuda:0'; got {device!r} ({error})"
        ) from None
    return str(name)


@lru_cache(maxsize=_LAYOUT_CACHE_SIZE)
def _cached_layout(
    pattern: Pattern,
    grid: VideoGrid,
    block_q: int,
    block_k: int,
    tile_shape: tuple[int, int, int] | None,
    device: str,
) -> BlockLayout:
    if device != "cpu":
        return _cached_layout(pattern, grid, block_q, block_k, tile_shape, "cpu").to(device)
    return build_block_layout(pattern, grid, block_q, block_k, tile_shape)


def clear_layout_cache() -> None:
    """Drop every cached layout (e.g. to free GPU memory)."""
    _cached_layout.cache_clear()
