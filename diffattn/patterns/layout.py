"""BlockLayout: the compressed, kernel-ready form of an attention pattern.

The ``N x N`` (query, key) plane is cut into tiles of ``block_q x block_k`` tokens. A layout lists,
for every query block, the key blocks the kernel must visit, sorted ascending. A visited tile is
either *full* (every in-range pair allowed: no element mask is read) or *partial* (it carries a
packed bit mask). Tiles that are not listed are skipped entirely.

Layouts are shared by all heads (leading dimension 1) or per head (leading dimension H), and can
carry a token permutation: the kernel then works on ``x[..., permutation, :]`` and the output is
scattered back. Everything here is plain tensors so that Triton kernels, the CPU path and later
users (PSA's per-tile pooling level, ring attention) read the same structure.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from ..errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    from .base import Pattern
    from .grid import VideoGrid

# Partial-tile masks are packed 32 keys to an int32 word: bit ``b`` of word ``w`` in row ``r`` says
# whether query ``r`` of the tile may attend key ``32 * w + b`` of the tile.
MASK_WORD_BITS = 32
#: Pooling levels a tile may have (``BlockLayout.kv_levels``): 1 = the raw keys, p = means of groups of p.
POOL_LEVELS = (1, 2, 4, 8)
# Partial tiles whose masks are built at once (bounds peak memory at ~chunk * block_q * block_k / 8 bytes).
_MASK_CHUNK_TILES = 2048


@dataclass(frozen=True, eq=False)
class BlockLayout:
    """Which ``block_q x block_k`` tiles of the attention matrix a kernel visits, and how.

    Attributes:
        num_tokens: sequence length ``N`` (queries and keys).
        block_q: query tokens per tile row.
        block_k: key tokens per tile column (a multiple of 32).
        kv_counts: int32 ``[Hl, Mq]``: visited key blocks per query block (``Hl`` is 1 for a
            layout shared by all heads, else the number of heads; ``Mq = ceil(N / block_q)``).
        kv_indices: int32 ``[Hl, Mq, max_kv]``: visited key-block indices, ascending; entries
            past ``kv_counts`` are 0 and must not be read.
        kv_mask_ids: int32 ``[Hl, Mq, max_kv]``: ``-1`` for a full tile, else the row of
            ``masks`` that holds the tile's element mask (tiles with equal masks share a row).
        masks: int32 ``[U, block_q, block_k // 32]``: the distinct packed element masks of the
            partial tiles, each stored once. Bits for query or key positions ``>= N`` are 0.
        permutation: int64 ``[N]`` or None: the kernel's token ``p`` is the caller's token
            ``permutation[p]`` (tile-major reordering of the video tokens).
        allowed_pairs: allowed (query, key) pairs per head-layout, as Python ints.
        kv_levels: int32 ``[Hl, Mq, max_kv]`` or None (every tile level 1): the pooling level of
            each visited tile (1, 2, 4 or 8; PSA plans). A level-``p`` tile attends to the means of
            consecutive groups of ``p`` keys and values of its key block (kernel token order; the
            sequence's last group may be shorter, size ``c``), each group's logit plus ``log(p)``
            (``log(c)``). Entries past ``kv_counts`` are 1 and must not be read. Pooled tiles
            (level > 1) are always full tiles (``kv_mask_ids == -1``); validated on construction
            (:meth:`level_problems`). See :attr:`effective_tile_density`, :attr:`is_pooled`.

    A tile is *full* when every pair inside it with both indices ``< N`` is allowed: kernels must
    still mask keys ``>= N`` in the last key block.

    Example:
        >>> from diffattn import VideoGrid, Neighborhood
        >>> layout = Neighborhood(kernel_size=(3, 5, 5)).layout(VideoGrid(4, 8, 8), block_size=64)
        >>> layout.kv_counts.shape, round(layout.density, 3)
        (torch.Size([1, 4]), 0.293)
    """

    num_tokens: int
    block_q: int
    block_k: int
    kv_counts: torch.Tensor
    kv_indices: torch.Tensor
    kv_mask_ids: torch.Tensor
    masks: torch.Tensor
    permutation: torch.Tensor | None = None
    allowed_pairs: tuple[int, ...] = field(default=())
    kv_levels: torch.Tensor | None = None

    def __post_init__(self) -> None:
        problems = self.level_problems()
        if problems:
            raise UserError("invalid BlockLayout.kv_levels: " + "; ".join(problems))

    def with_levels(self, kv_levels: torch.Tensor | None) -> "BlockLayout":
        """The same tiles with pooling levels ``kv_levels`` (int32, shape of ``kv_indices``; validated).

        Example:
            >>> from diffattn import Dense, VideoGrid
            >>> layout = Dense().layout(VideoGrid(1, 4, 16), block_size=32)
            >>> layout.with_levels(torch.full_like(layout.kv_indices, 4)).tiles_per_level
            {4: 4}
        """
        return dataclasses.replace(self, kv_levels=kv_levels)

    def level_problems(self) -> list[str]:
        """Why ``kv_levels`` is invalid (``[]`` when it is fine, or None).

        Checked: int32 with the shape of ``kv_indices``; each visited tile's level in
        :data:`POOL_LEVELS`; a pooled tile (level > 1) is a full tile (no element mask);
        ``block_k`` a multiple of the largest level used. Values are not read on the meta device.

        Example:
            >>> from diffattn import Dense, VideoGrid
            >>> layout = Dense().layout(VideoGrid(1, 4, 16), block_size=32)
            >>> layout.with_levels(torch.full_like(layout.kv_indices, 3))  # doctest: +ELLIPSIS
            Traceback (most recent call last):
            ...
            diffattn.errors.UserError: invalid BlockLayout.kv_levels: ...level 3 at ...; allowed: 1, 2, 4, 8
        """
        levels = self.kv_levels
        if levels is None:
            return []
        if not isinstance(levels, torch.Tensor):
            return [f"kv_levels must be an int32 tensor or None, got {type(levels).__name__}"]
        problems = []
        if levels.dtype != torch.int32:
            problems.append(f"kv_levels must be int32, got {levels.dtype}")
        if tuple(levels.shape) != tuple(self.kv_indices.shape):
            problems.append(
                f"kv_levels has shape {tuple(levels.shape)}, kv_indices has {tuple(self.kv_indices.shape)}; "
                "they must match"
            )
        if problems or levels.device.type == "meta" or torch.compiler.is_compiling():
            return problems
        valid = self._valid_slots()
        allowed = torch.tensor(POOL_LEVELS, dtype=levels.dtype, device=levels.device)
        bad = valid & ~torch.isin(levels, allowed)
        if bool(bad.any()):
            h, qb, slot = (int(i) for i in bad.nonzero()[0])
            problems.append(
                f"kv_levels holds level {int(levels[h, qb, slot])} at (head {h}, query block {qb}, slot {slot}); "
                f"allowed: {', '.join(map(str, POOL_LEVELS))}"
            )
            return problems
        pooled = valid & (levels > 1)
        masked = pooled & (self.kv_mask_ids.to(levels.device) >= 0)
        if bool(masked.any()):
            h, qb, slot = (int(i) for i in masked.nonzero()[0])
            problems.append(
                f"the tile at (head {h}, query block {qb}, slot {slot}) has level {int(levels[h, qb, slot])} and an "
                f"element mask (kv_mask_ids={int(self.kv_mask_ids[h, qb, slot])}); pooled tiles must be full (-1)"
            )
        top = int(levels[pooled].max()) if bool(pooled.any()) else 1
        if self.block_k % top:
            problems.append(f"block_k={self.block_k} is not a multiple of the pooling level {top}")
        return problems

    # ----------------------------------------------------------------- shape and statistics
    @property
    def num_heads(self) -> int:
        """1 for a layout shared by all heads, else the number of heads it describes."""
        return int(self.kv_counts.shape[0])

    @property
    def num_q_blocks(self) -> int:
        return int(self.kv_counts.shape[1])

    @property
    def num_k_blocks(self) -> int:
        return math.ceil(self.num_tokens / self.block_k)

    @property
    def max_kv_blocks(self) -> int:
        return int(self.kv_indices.shape[2])

    @property
    def device(self) -> torch.device:
        return self.kv_counts.device

    @property
    def density(self) -> float:
        """Fraction of the ``N * N`` (query, key) pairs that are allowed (mean over heads)."""
        return sum(self.allowed_pairs) / (len(self.allowed_pairs) * self.num_tokens**2)

    @cached_property
    def visited_pairs(self) -> int:
        """(query, key) pairs inside visited tiles, clipped to ``N`` (mean over heads).

        This is what a block-sparse kernel computes; ``visited_pairs / N**2 >= density``, the gap
        being the masked-out part of partial tiles.
        """
        rows = _block_lengths(self.num_tokens, self.block_q).to(torch.int64)
        cols = _block_lengths(self.num_tokens, self.block_k).to(torch.int64)
        valid = self._valid_slots()
        col_len = cols.to(self.device)[self.kv_indices.long()] * valid
        total = (col_len.sum(-1) * rows.to(self.device)[None, :]).sum()
        return int(total) // self.num_heads

    def _valid_slots(self) -> torch.Tensor:
        """bool ``[Hl, Mq, max_kv]``: which slots of ``kv_indices`` / ``kv_mask_ids`` hold a tile."""
        slots = torch.arange(self.max_kv_blocks, device=self.device)
        return slots[None, None, :] < self.kv_counts[..., None]

    @cached_property
    def is_pooled(self) -> bool:
        """Whether some visited tile has a pooling level above 1 (``kv_levels``)."""
        if self.kv_levels is None:
            return False
        return bool(((self.kv_levels > 1) & self._valid_slots()).any())

    def _slot_levels(self) -> torch.Tensor:
        """int64 ``[Hl, Mq, max_kv]``: each slot's level (1 where ``kv_levels`` is None)."""
        if self.kv_levels is None:
            return torch.ones(self.kv_indices.shape, dtype=torch.int64, device=self.device)
        return self.kv_levels.to(self.device, torch.int64)

    @cached_property
    def tiles_per_level(self) -> dict[int, int]:
        """Visited tiles per pooling level, all heads together (``{1: count}`` for a static layout).

        Example:
            >>> from diffattn import Dense, VideoGrid
            >>> Dense().layout(VideoGrid(1, 4, 16), block_size=32).tiles_per_level
            {1: 4}
        """
        levels = self._slot_levels()[self._valid_slots()]
        values, counts = torch.unique(levels, return_counts=True)
        return {int(v): int(c) for v, c in zip(values.tolist(), counts.tolist())}

    @cached_property
    def effective_tile_density(self) -> float:
        """:attr:`tile_density` with a level-``p`` tile counting ``1 / p`` of its area.

        What a pooled kernel pays for: a level-``p`` tile scores one pooled key per ``p`` keys.
        The ideal speedup over dense attention is ``1 / effective_tile_density``. Equal to
        :attr:`tile_density` for a static layout.

        Example:
            >>> from diffattn import Dense, VideoGrid
            >>> layout = Dense().layout(VideoGrid(1, 4, 16), block_size=32)
            >>> halved = layout.with_levels(torch.full_like(layout.kv_indices, 2))
            >>> layout.effective_tile_density, halved.effective_tile_density
            (1.0, 0.5)
        """
        rows = _block_lengths(self.num_tokens, self.block_q).to(torch.float64).to(self.device)
        cols = _block_lengths(self.num_tokens, self.block_k).to(torch.float64).to(self.device)
        col_len = cols[self.kv_indices.long()] * self._valid_slots() / self._slot_levels()
        total = (col_len.sum(-1) * rows[None, :]).sum()
        return float(total) / self.num_heads / self.num_tokens**2

    @property
    def tile_density(self) -> float:
        """Fraction of ``N * N`` inside visited tiles (what the kernel pays for)."""
        return self.visited_pairs / self.num_tokens**2

    @property
    def num_partial_tiles(self) -> int:
        """Visited tiles that carry an element mask (all heads)."""
        valid = self._valid_slots()
        return int(((self.kv_mask_ids >= 0) & valid).sum())

    @property
    def num_masks(self) -> int:
        """Distinct packed masks stored (``<= num_partial_tiles``: equal masks are stored once)."""
        return int(self.masks.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes of every tensor the layout holds (tile lists, masks, permutation).

        The ``transposed`` view that backward kernels derive on first use is not counted (about
        the size of ``kv_indices`` and ``kv_mask_ids`` again).

        Example:
            >>> from diffattn import Neighborhood, VideoGrid
            >>> layout = Neighborhood(kernel_size=(1, 3, 3)).layout(VideoGrid(2, 8, 8), block_size=32)
            >>> tensors = (layout.kv_counts, layout.kv_indices, layout.kv_mask_ids, layout.masks)
            >>> layout.nbytes == sum(t.nbytes for t in tensors)
            True
        """
        tensors = [self.kv_counts, self.kv_indices, self.kv_mask_ids, self.masks]
        tensors += [t for t in (self.permutation, self.kv_levels) if t is not None]
        return sum(int(t.nbytes) for t in tensors)

    @property
    def num_visited_tiles(self) -> int:
        return int(self.kv_counts.sum())

    def __repr__(self) -> str:
        pooled = ""
        if self.is_pooled:
            pooled = (f"tiles_per_level={self.tiles_per_level}, "
                      f"effective_tile_density={self.effective_tile_density:.4f}, ")
        return (
            f"BlockLayout(N={self.num_tokens}, block=({self.block_q}, {self.block_k}), heads={self.num_heads}, "
            f"tiles={self.num_visited_tiles} ({self.num_partial_tiles} partial, {self.num_masks} masks), "
            f"density={self.density:.4f}, "
            f"tile_density={self.tile_density:.4f}, {pooled}permuted={self.permutation is not None}, "
            f"device={self.device})"
        )

    # ----------------------------------------------------------------- derived views
    @cached_property
    def transposed(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The same tiles listed per key block, for backward kernels (dK, dV).

        Returns:
            ``(q_counts [Hl, Mk], q_indices [Hl, Mk, max_q], q_mask_ids [Hl, Mk, max_q])``,
            int32, query-block indices ascending, mask ids into the same ``masks`` table.
        """
        heads, num_q = self.num_heads, self.num_q_blocks
        num_k = self.num_k_blocks
        valid = self._valid_slots()
        head_idx, q_idx, slot_idx = valid.nonzero(as_tuple=True)
        k_idx = self.kv_indices[head_idx, q_idx, slot_idx].long()
        mask_id = self.kv_mask_ids[head_idx, q_idx, slot_idx]
        # Sort by (head, key block, query block): stable sort on the composite key.
        order = torch.argsort((head_idx * num_k + k_idx) * num_q + q_idx)
        head_idx, q_idx, k_idx, mask_id = head_idx[order], q_idx[order], k_idx[order], mask_id[order]
        q_counts = torch.zeros(heads, num_k, dtype=torch.int64, device=self.device)
        q_counts.index_put_((head_idx, k_idx), torch.ones_like(k_idx), accumulate=True)
        max_q = int(q_counts.max()) if q_counts.numel() else 0
        starts = torch.cumsum(q_counts.flatten(), 0) - q_counts.flatten()
        slot = torch.arange(head_idx.numel(), device=self.device) - starts[head_idx * num_k + k_idx]
        q_indices = torch.zeros(heads, num_k, max(max_q, 1), dtype=torch.int32, device=self.device)
        q_mask_ids = torch.full_like(q_indices, -1)
        q_indices[head_idx, k_idx, slot] = q_idx.to(torch.int32)
        q_mask_ids[head_idx, k_idx, slot] = mask_id
        return q_counts.to(torch.int32), q_indices, q_mask_ids

    def tile_masks(self, mask_ids: torch.Tensor) -> torch.Tensor:
        """Unpack the element masks of tiles: bool ``[*mask_ids.shape, block_q, block_k]``.

        ``mask_ids`` of ``-1`` (full tiles) give all-True masks (before clipping to ``N``).
        """
        flat = mask_ids.reshape(-1).long()
        words = self.masks[flat.clamp(min=0)] if self.masks.shape[0] else torch.zeros(
            flat.numel(), self.block_q, self.block_k // MASK_WORD_BITS, dtype=torch.int32, device=self.device
        )
        bits = torch.arange(MASK_WORD_BITS, device=self.device, dtype=torch.int32)
        unpacked = ((words[..., None] >> bits) & 1).bool().reshape(flat.numel(), self.block_q, self.block_k)
        unpacked |= (flat < 0)[:, None, None]
        return unpacked.reshape(*mask_ids.shape, self.block_q, self.block_k)

    def token_mask(self) -> torch.Tensor:
        """Expand to a dense bool mask in the caller's token order (tests and small grids only).

        For a pooled layout (:attr:`is_pooled`) this is the *visited-tile* mask: a pooled tile
        marks all its pairs, although the kernels attend to group means there, not to the raw
        keys. It is then not an attention mask: ``backend="reference"`` runs pooled layouts with
        :func:`diffattn.kernels.reference.pooled_attention_reference` instead.

        Returns:
            ``[N, N]`` for a shared layout, ``[H, N, N]`` for a per-head layout.
        """
        n, bq, bk = self.num_tokens, self.block_q, self.block_k
        num_q, num_k = self.num_q_blocks, self.num_k_blocks
        dense = torch.zeros(self.num_heads, num_q * bq, num_k * bk, dtype=torch.bool, device=self.device)
        valid = self._valid_slots()
        head_idx, q_idx, slot_idx = valid.nonzero(as_tuple=True)
        k_idx = self.kv_indices[head_idx, q_idx, slot_idx].long()
        tiles = self.tile_masks(self.kv_mask_ids[head_idx, q_idx, slot_idx])
        view = dense.view(self.num_heads, num_q, bq, num_k, bk).permute(0, 1, 3, 2, 4)
        view[head_idx, q_idx, k_idx] = tiles
        dense = dense[:, :n, :n]
        if self.permutation is not None:
            inverse = torch.empty_like(self.permutation)
            inverse[self.permutation] = torch.arange(n, device=self.device)
            dense = dense[:, inverse][:, :, inverse]
        return dense[0] if self.num_heads == 1 else dense

    # ----------------------------------------------------------------- transforms
    def to(self, device: torch.device | str) -> "BlockLayout":
        device = torch.device(device)
        if device == self.device:
            return self
        return BlockLayout(
            num_tokens=self.num_tokens,
            block_q=self.block_q,
            block_k=self.block_k,
            kv_counts=self.kv_counts.to(device),
            kv_indices=self.kv_indices.to(device),
            kv_mask_ids=self.kv_mask_ids.to(device),
            masks=self.masks.to(device),
            permutation=None if self.permutation is None else self.permutation.to(device),
            allowed_pairs=self.allowed_pairs,
            kv_levels=None if self.kv_levels is None else self.kv_levels.to(device),
        )

    def select_heads(self, start: int, stop: int) -> "BlockLayout":
        """The layout of heads ``start..stop-1`` (a shared layout is returned as is).

        Context parallelism (Ulysses) gives each rank a contiguous range of heads; a per-head
        layout is cut to that range. The packed masks are kept whole: the mask ids stay valid.

        Example:
            >>> from diffattn import Dense, Neighborhood, VideoGrid
            >>> grid = VideoGrid(2, 8, 8)
            >>> both = BlockLayout.stack([Dense().layout(grid, block_size=32),
            ...                           Neighborhood(kernel_size=(1, 3, 3)).layout(grid, block_size=32)])
            >>> both.select_heads(1, 2).num_heads, round(both.select_heads(1, 2).density, 3)
            (1, 0.07)
        """
        if self.num_heads == 1:
            return self
        if not 0 <= start < stop <= self.num_heads:
            raise UserError(f"head range {start}..{stop} must lie within the layout's {self.num_heads} heads")
        return BlockLayout(
            num_tokens=self.num_tokens,
            block_q=self.block_q,
            block_k=self.block_k,
            kv_counts=self.kv_counts[start:stop],
            kv_indices=self.kv_indices[start:stop],
            kv_mask_ids=self.kv_mask_ids[start:stop],
            masks=self.masks,
            permutation=self.permutation,
            allowed_pairs=self.allowed_pairs[start:stop],
            kv_levels=None if self.kv_levels is None else self.kv_levels[start:stop],
        )

    def permute_tokens(self, x: torch.Tensor, dim: int = -2) -> torch.Tensor:
        """Caller's order -> kernel order along ``dim`` (identity without a permutation)."""
        if self.permutation is None:
            return x
        return x.index_select(dim, self.permutation.to(x.device))

    def unpermute_tokens(self, x: torch.Tensor, dim: int = -2) -> torch.Tensor:
        """Kernel order -> caller's order along ``dim``."""
        if self.permutation is None:
            return x
        out = torch.empty_like(x)
        out.index_copy_(dim, self.permutation.to(x.device), x)
        return out

    @classmethod
    def stack(cls, layouts: Sequence["BlockLayout"]) -> "BlockLayout":
        """Combine single-head layouts (same N, block sizes and permutation) into a per-head one.

        ``kv_levels`` is carried: if some layouts have levels and others None, the latter get
        all-1 levels; None only when every layout has None.

        Example:
            >>> from diffattn import Dense, Neighborhood, VideoGrid
            >>> grid = VideoGrid(2, 8, 8)
            >>> dense_layout = Dense().layout(grid, block_size=32)
            >>> local_layout = Neighborhood(kernel_size=(1, 3, 3)).layout(grid, block_size=32)
            >>> BlockLayout.stack([dense_layout, local_layout]).num_heads  # head 0, head 1
            2
        """
        if not layouts:
            raise UserError("layouts must be a non-empty sequence of BlockLayout, got an empty one")
        first = layouts[0]
        for i, lay in enumerate(layouts):
            if not isinstance(lay, BlockLayout):
                raise UserError(f"layouts[{i}] must be a BlockLayout, got {type(lay).__name__}")
            same = (lay.num_tokens, lay.block_q, lay.block_k) == (first.num_tokens, first.block_q, first.block_k)
            if not same:
                raise UserError(
                    f"layouts[{i}] has (N, block_q, block_k) = {(lay.num_tokens, lay.block_q, lay.block_k)}, "
                    f"layouts[0] has {(first.num_tokens, first.block_q, first.block_k)}; they must match"
                )
            if (lay.permutation is None) != (first.permutation is None) or (
                lay.permutation is not None and not torch.equal(lay.permutation, first.permutation.to(lay.device))
            ):
                raise UserError(f"layouts[{i}] has a different token permutation than layouts[0]")
        device = first.device
        max_kv = max(lay.max_kv_blocks for lay in layouts)
        counts, indices, mask_ids, masks, allowed, levels = [], [], [], [], [], []
        any_levels = any(lay.kv_levels is not None for lay in layouts)
        offset = 0
        for lay in layouts:
            pad = max_kv - lay.max_kv_blocks
            counts.append(lay.kv_counts.to(device))
            indices.append(torch.nn.functional.pad(lay.kv_indices.to(device), (0, pad)))
            ids = lay.kv_mask_ids.to(device)
            ids = torch.where(ids >= 0, ids + offset, ids)
            mask_ids.append(torch.nn.functional.pad(ids, (0, pad), value=-1))
            masks.append(lay.masks.to(device))
            offset += lay.num_masks
            allowed.extend(lay.allowed_pairs)
            if any_levels:
                lev = lay.kv_levels if lay.kv_levels is not None else torch.ones_like(lay.kv_indices)
                levels.append(torch.nn.functional.pad(lev.to(device, torch.int32), (0, pad), value=1))
        return cls(
            num_tokens=first.num_tokens,
            block_q=first.block_q,
            block_k=first.block_k,
            kv_counts=torch.cat(counts),
            kv_indices=torch.cat(indices),
            kv_mask_ids=torch.cat(mask_ids),
            masks=torch.cat(masks),
            permutation=first.permutation,
            allowed_pairs=tuple(allowed),
            kv_levels=torch.cat(levels) if any_levels else None,
        )


# --------------------------------------------------------------------------------------------
# Building a layout from a pattern without materialising N x N.
# --------------------------------------------------------------------------------------------


def _block_lengths(n: int, block: int) -> torch.Tensor:
    starts = torch.arange(0, n, block)
    return (starts + block).clamp(max=n) - starts


def _split_prefixes(grid: "VideoGrid", prefix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence prefix lengths -> (video tokens in the prefix, text tokens in the prefix)."""
    if grid.text_position == "end":
        video = prefix.clamp(max=grid.video_tokens)
        return video, prefix - video
    text = prefix.clamp(max=grid.text_tokens)
    return prefix - text, text


def pack_tile_masks(dense: torch.Tensor) -> torch.Tensor:
    """bool ``[P, bq, bk]`` -> int32 ``[P, bq, bk // 32]`` (bit b of word w = key 32w + b)."""
    packed = np.packbits(dense.cpu().numpy(), axis=-1, bitorder="little")  # uint8 [P, bq, bk/8]
    packed = np.ascontiguousarray(packed).view("<i4")
    return torch.from_numpy(packed.copy())


def build_block_layout(
    pattern: "Pattern",
    grid: "VideoGrid",
    block_q: int,
    block_k: int,
    tile_shape: tuple[int, int, int] | None,
) -> BlockLayout:
    """Build a pattern's layout on the CPU in O(tiles + partial-tile area), never O(N^2).

    Tile classification uses exact pair counts: ``count(tile) = P(x1, y1) - P(x0, y1) - P(x1, y0) +
    P(x0, y0)`` where ``P(x, y)`` counts allowed pairs among the first ``x`` queries and first
    ``y`` keys (in kernel order). Text tokens are dense, so ``P`` is the pattern's video-video
    prefix count plus closed-form text terms. A tile is full when its count equals its area and
    empty when the count is 0; only partial tiles evaluate the pattern per element.
    """
    from .grid import VideoOrder

    n = grid.num_tokens
    order = VideoOrder(grid, tile_shape)
    q_bounds = torch.cat([torch.arange(0, n, block_q), torch.tensor([n])])
    k_bounds = torch.cat([torch.arange(0, n, block_k), torch.tensor([n])])
    qv, qt = _split_prefixes(grid, q_bounds)
    kv, kt = _split_prefixes(grid, k_bounds)
    video_pairs = pattern.video_prefix_pair_counts(grid, order, qv, kv).to(torch.float64)
    prefix = (video_pairs + qt[:, None].double() * k_bounds[None, :].double()
              + qv[:, None].double() * kt[None, :].double())
    counts = prefix[1:, 1:] - prefix[:-1, 1:] - prefix[1:, :-1] + prefix[:-1, :-1]
    area = (q_bounds[1:] - q_bounds[:-1])[:, None].double() * (k_bounds[1:] - k_bounds[:-1])[None, :].double()
    counts = counts.round()
    visited = counts > 0
    full = counts == area

    # Per query block: the visited key blocks, ascending (row-major nonzero is already sorted).
    kv_counts = visited.sum(1)
    max_kv = max(int(kv_counts.max()), 1)
    q_idx, k_idx = visited.nonzero(as_tuple=True)
    row_start = torch.cumsum(kv_counts, 0) - kv_counts
    slot = torch.arange(q_idx.numel()) - row_start[q_idx]
    num_q = q_bounds.numel() - 1
    kv_indices = torch.zeros(1, num_q, max_kv, dtype=torch.int32)
    kv_mask_ids = torch.full((1, num_q, max_kv), -1, dtype=torch.int32)
    kv_indices[0, q_idx, slot] = k_idx.to(torch.int32)
    is_partial = ~full[q_idx, k_idx]
    partial_q, partial_k = q_idx[is_partial], k_idx[is_partial]

    # Kernel position -> caller's token index.
    permutation = None
    if tile_shape is not None:
        permutation = torch.arange(n)
        off = grid.video_offset
        permutation[off : off + grid.video_tokens] = order.raster_index() + off
    tile_mask_ids, masks = _shared_partial_masks(pattern, grid, permutation, partial_q, partial_k, block_q, block_k)
    kv_mask_ids[0, q_idx[is_partial], slot[is_partial]] = tile_mask_ids
    return BlockLayout(
        num_tokens=n,
        block_q=block_q,
        block_k=block_k,
        kv_counts=kv_counts.to(torch.int32)[None],
        kv_indices=kv_indices,
        kv_mask_ids=kv_mask_ids,
        masks=masks,
        permutation=permutation,
        allowed_pairs=(int(counts.sum()),),
    )


def _shared_partial_masks(
    pattern: "Pattern",
    grid: "VideoGrid",
    permutation: torch.Tensor | None,
    tile_q: torch.Tensor,
    tile_k: torch.Tensor,
    block_q: int,
    block_k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct packed masks of the partial tiles, and each tile's row among them.

    Returns ``(mask_ids int32 [P], masks int32 [U, block_q, block_k // 32])``, ``U <= P``.

    A tile's mask is a function of what its query block and its key block hold (per token: text,
    padding, or the pattern's feature values). Tiles are first grouped by that pair of block
    *signatures* and one mask is built per group (a 3-D window repeats the same few block
    contents all over the video); the built masks are then merged by content (the same cut of a
    window in other places). A factor that allows every pair of a tile (e.g. the frame axis of a
    tile well inside the temporal window) is left out of that tile's signatures, so tiles cut
    alike by the other factors share one group. The per-tile mask tensor is never built: peak
    memory is one chunk of masks plus the distinct ones.
    """
    num_tiles = tile_q.numel()
    words = block_k // MASK_WORD_BITS
    if num_tiles == 0:
        return torch.zeros(0, dtype=torch.int32), torch.zeros(0, block_q, words, dtype=torch.int32)
    factors = _constraining_factors(pattern, grid)
    q_video = _kernel_video_index(grid, permutation, block_q)
    k_video = _kernel_video_index(grid, permutation, block_k)
    # Bit f of `idle`: factor f allows every (video query, video key) pair of the tile.
    idle = torch.zeros(num_tiles, dtype=torch.int64)
    for bit, (feature, table) in enumerate(factors):
        idle |= _factor_allows_whole_tile(feature, table, q_video, k_video, tile_q, tile_k).long() << bit
    pair = torch.zeros(num_tiles, dtype=torch.int64)
    for subset in torch.unique(idle).tolist():
        used = [f for bit, f in enumerate(factors) if not subset >> bit & 1]
        q_signature = _block_signatures(q_video, used, block_q)
        k_signature = _block_signatures(k_video, used, block_k)
        chosen = idle == subset
        pair[chosen] = ((subset << 20 | q_signature[tile_q[chosen]]) << 20) | k_signature[tile_k[chosen]]
    groups, group_of_tile = torch.unique(pair, return_inverse=True)
    # One tile per group builds the group's mask (any member would do: they are all equal).
    representative = torch.empty(groups.numel(), dtype=torch.int64).scatter_(
        0, group_of_tile, torch.arange(num_tiles)
    )
    distinct: dict[bytes, int] = {}
    kept: list[np.ndarray] = []
    mask_of_group = torch.empty(groups.numel(), dtype=torch.int32)
    chunks = _partial_tile_masks(
        grid, factors, permutation, tile_q[representative], tile_k[representative], block_q, block_k
    )
    for start, chunk in chunks:
        for offset, mask in enumerate(chunk.numpy()):
            key = mask.tobytes()
            mask_id = distinct.get(key)
            if mask_id is None:
                mask_id = distinct[key] = len(kept)
                kept.append(mask)
            mask_of_group[start + offset] = mask_id
    masks = torch.from_numpy(np.stack(kept))
    return mask_of_group[group_of_tile], masks


def _constraining_factors(pattern: "Pattern", grid: "VideoGrid") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The pattern's factors minus those whose table is all True (e.g. a full-axis window): they
    constrain nothing."""
    return [(feature, table) for feature, table in pattern.video_factors(grid) if not bool(table.all())]


def _kernel_video_index(grid: "VideoGrid", permutation: torch.Tensor | None, block: int) -> torch.Tensor:
    """int64 ``[ceil(N / block), block]``: raster video index of each kernel position, ``-1`` for
    a text token and ``-2`` for padding past ``N``."""
    n = grid.num_tokens
    positions = torch.arange(-(-n // block) * block)
    token = positions.clamp(max=n - 1)
    video = grid.video_index_of(permutation[token] if permutation is not None else token)
    return torch.where(positions < n, video, torch.full_like(video, -2)).view(-1, block)


def _block_signatures(
    video: torch.Tensor, factors: list[tuple[torch.Tensor, torch.Tensor]], block: int
) -> torch.Tensor:
    """int64 ``[blocks]``: equal ids for blocks (rows of :func:`_kernel_video_index`) whose tokens
    are, one by one, of the same kind (video, text or padding) with the same values of ``factors``."""
    kind = video.clamp(min=-2, max=0)  # 0 video, -1 text, -2 padding
    columns = [kind] + [torch.where(video >= 0, feature[video.clamp(min=0)], 0) for feature, _ in factors]
    per_block = torch.stack(columns, -1).view(video.shape[0], -1)
    return torch.unique(per_block, dim=0, return_inverse=True)[1]


def _factor_allows_whole_tile(
    feature: torch.Tensor,
    table: torch.Tensor,
    q_video: torch.Tensor,
    k_video: torch.Tensor,
    tile_q: torch.Tensor,
    tile_k: torch.Tensor,
) -> torch.Tensor:
    """bool ``[P]``: whether ``table`` allows every pair of feature values of the tile's video
    queries and video keys (computed per distinct pair of block value sets)."""
    values = table.shape[0]

    def value_sets(video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        present = torch.zeros(video.shape[0], values + 1, dtype=torch.bool)
        present.scatter_(1, torch.where(video >= 0, feature[video.clamp(min=0)], values), True)
        sets, set_of_block = torch.unique(present[:, :values], dim=0, return_inverse=True)
        return sets.double(), set_of_block

    q_sets, q_set_of_block = value_sets(q_video)
    k_sets, k_set_of_block = value_sets(k_video)
    pair = q_set_of_block[tile_q] * k_sets.shape[0] + k_set_of_block[tile_k]
    pairs, pair_of_tile = torch.unique(pair, return_inverse=True)
    # Refused (query value, key value) pairs of a tile: q_set^T (~table) k_set.
    refused_per_key = q_sets @ (~table).double()  # [Sq, values]
    refused = (refused_per_key[pairs // k_sets.shape[0]] * k_sets[pairs % k_sets.shape[0]]).sum(1)
    return (refused == 0)[pair_of_tile]


def _partial_tile_masks(
    grid: "VideoGrid",
    factors: list[tuple[torch.Tensor, torch.Tensor]],
    permutation: torch.Tensor | None,
    tile_q: torch.Tensor,
    tile_k: torch.Tensor,
    block_q: int,
    block_k: int,
):
    """Packed element masks of tiles, built word-wise from the pattern's factors, yielded as
    ``(first tile, int32 [chunk, block_q, block_k // 32])`` chunks.

    For each factor ``(feature, table)``, each key block ``kb`` and each feature value ``c``, the
    bits ``table[c, feature[key j of kb]]`` are packed once into ``block_k / 32`` words. A tile row
    is then the AND of one such word vector per factor, picked by the query's feature values:
    work per partial tile is ``block_q * block_k / 32`` word operations, not ``block_q * block_k``
    element look-ups.
    """
    n = grid.num_tokens
    num_tiles = tile_q.numel()
    words = block_k // MASK_WORD_BITS
    to_token = (lambda pos: permutation[pos]) if permutation is not None else (lambda pos: pos)

    # Key side: the distinct key blocks of the tiles.
    key_blocks, tile_key_slot = torch.unique(tile_k, return_inverse=True)
    k_pos = key_blocks[:, None] * block_k + torch.arange(block_k)  # [K', bk]
    k_in = k_pos < n
    k_vid = grid.video_index_of(to_token(k_pos.clamp(max=n - 1)))
    k_text = (k_vid < 0) & k_in

    # Per factor: [K' * L, words] packed key bits for every (key block, query feature value).
    packed_factors = []
    for feature, table in factors:
        k_feature = feature[k_vid.clamp(min=0)]  # [K', bk]
        per_value = torch.empty(key_blocks.numel(), table.shape[0], words, dtype=torch.int32)
        step = max(1, (1 << 24) // (table.shape[0] * block_k))
        for start in range(0, key_blocks.numel(), step):
            bits = table[:, k_feature[start : start + step]].permute(1, 0, 2)  # [kc, L, bk]
            bits = bits | k_text[start : start + step, None, :]
            per_value[start : start + step] = pack_tile_masks(bits)
        packed_factors.append((feature, table.shape[0], per_value.view(-1, words)))
    key_in_range = pack_tile_masks(k_in[:, None, :])[:, 0]  # [K', words]

    for start in range(0, num_tiles, _MASK_CHUNK_TILES):
        stop = min(start + _MASK_CHUNK_TILES, num_tiles)
        # Query side: the rows of this chunk's tiles.
        q_pos = tile_q[start:stop, None] * block_q + torch.arange(block_q)  # [c, bq]
        q_in = q_pos < n
        q_vid = grid.video_index_of(to_token(q_pos.clamp(max=n - 1)))
        q_text = q_vid < 0
        slot = tile_key_slot[start:stop]
        chunk = key_in_range[slot][:, None, :].expand(-1, block_q, -1).clone()
        for feature, num_values, per_value in packed_factors:
            flat = (slot[:, None] * num_values + feature[q_vid.clamp(min=0)]).reshape(-1)
            rows = per_value.index_select(0, flat).view(stop - start, block_q, words)
            rows.masked_fill_(q_text[:, :, None], -1)  # text queries attend every key
            chunk &= rows
        chunk.masked_fill_(~q_in[:, :, None], 0)
        yield start, chunk
