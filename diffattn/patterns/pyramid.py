"""PyramidSparse (PSA): a dynamic pattern that plans pooled KV levels per call from q and k.

Binary block masks drop whole key blocks. Pyramid Sparse Attention (Li et al. 2025, "PSA:
Pyramid Sparse Attention for Efficient Video Understanding and Generation") keeps the most
important key blocks of each query block at full resolution, the next ones average-pooled 2x, 4x
or 8x, and skips only the least important. Which block gets which level depends on the call's
queries and keys, so the pattern has no static layout: :meth:`PyramidSparse.plan` builds a
:class:`~diffattn.patterns.layout.BlockLayout` with ``kv_levels`` for each call.

Importance estimate (deterministic). ``estimate="mean"`` (default): the mean query and the mean
key of every block (kernel token order), their dot product scaled like attention
(``D ** -0.5``), softmax over the key blocks of each query block, averaged over the batch. This
is the attention of the block-mean query to block-mean keys: it ranks a key block by how much the
block's *average* query attends its *average* key. The reference implementation
(ziplab/Pyramid-Sparse-Attention) instead samples a random quarter of each block's tokens, takes
for each sampled query the largest logit over each key block's sampled keys, normalises it
against the query's largest logit (``exp(max_block - max_row)``), keeps the largest value over the
block's sampled queries and normalises each row to sum 1: a max-of-sampled estimate that reacts
to single sharp query/key pairs, but changes from call to call with the random sample.
``estimate="sampled-max"`` is that estimate with a fixed sample (every 4th token of every block),
so plans stay deterministic; ``benchmarks/results/psa-estimate-cpu-2026-12-07.md`` compares both
on the embedded model's activations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

import torch

from .._threads import one_cpu_thread
from ..errors import UserError
from ._checks import check_block_size, check_choice, is_finite_number
from .base import Pattern
from .grid import VideoGrid, VideoOrder, check_tile_shape, clip_tile_shape
from .layout import POOL_LEVELS, BlockLayout

#: The pooling levels a kernel runs (a level-p tile attends to means of p consecutive keys).
PYRAMID_LEVELS = POOL_LEVELS
#: How shares are read: fractions of the key blocks ("topk") or of the importance mass ("mass").
PYRAMID_MODES = ("topk", "mass")
#: The importance estimates :meth:`PyramidSparse.plan` offers (see the module docstring).
PYRAMID_ESTIMATES = ("mean", "sampled-max")
#: ``estimate="sampled-max"`` keeps every this-many-th token of each block.
SAMPLE_STRIDE = 4
# Shares are compared with this slack so that 0.1 + 0.2 + 0.7 counts as summing to 1.
_SHARE_SLACK = 1e-9
# Sampled query rows handled at once by the sampled-max estimate (bounds the [B, H, rows, Nk/4] logits).
_SAMPLED_ROWS = 1024

_DYNAMIC = (
    "PyramidSparse is dynamic: which key blocks each query block visits, and at which pooling level, "
    "depends on the queries and keys of each call, so it has no static {what}. Use "
    "layout = pattern.plan(q, k, grid, block_size=...) (SparsityConfig(pattern=PyramidSparse(...)) plans every "
    "call by itself)"
)


@dataclass(frozen=True)
class PyramidSparse(Pattern):
    """Pyramid Sparse Attention: per query block and head, key blocks ranked by importance get
    level 1, 2, 4 or 8 (full, 2x/4x/8x average-pooled), the rest are skipped.

    Args:
        levels: ``{level: share}`` for levels 1, 2, 4, 8 (a missing level has share 0). In
            ``"topk"`` mode a share is a fraction of the key blocks: after ranking, the first
            ``ceil(M * s1)`` blocks get level 1, the next up to ``ceil(M * (s1 + s2))`` level 2,
            and so on (``M`` key blocks). In ``"mass"`` mode the cumulative shares bound the
            importance mass: a block gets the first level ``p`` whose cumulative share exceeds the
            mass of the blocks ranked before it. Shares summing to 1 visit every block.
        mode: ``"topk"`` or ``"mass"``.
        min_full: level 1 keeps at least ``ceil(M * min_full)`` blocks (both modes). In
            ``"topk"`` mode a later level's bound never falls below it (the raised level 1 eats
            into the next levels, the visited total stays ``ceil(M * sum)``); in ``"mass"`` mode
            the blocks after the forced ones keep their mass-based levels.
        estimate: ``"mean"`` (block-mean q and k) or ``"sampled-max"`` (the reference's
            max-of-sampled estimate with a fixed sample); see the module docstring.

    Text tokens (joint attention) stay dense: a query block holding a text token visits every key
    block at level 1, and a key block holding a text token is visited at level 1 by every query
    block. Plans are per head and deterministic (the same q and k give the same plan); the
    importance of a batch is the mean over its elements.

    The pattern has no static layout or token mask: :meth:`layout` and :meth:`token_mask` raise
    :class:`UserError` pointing at :meth:`plan`.

    Example:
        >>> import torch
        >>> from diffattn import PyramidSparse, VideoGrid
        >>> grid = VideoGrid(4, 8, 8)
        >>> q, k = torch.randn(2, 1, 3, 256, 32).unbind(0)
        >>> layout = PyramidSparse(levels={1: 0.25, 8: 0.25}, min_full=0).plan(q, k, grid, block_size=32)
        >>> layout.kv_counts.tolist()[0]     # 25 % full + 25 % at level 8 of the 8 key blocks
        [4, 4, 4, 4, 4, 4, 4, 4]
        >>> sorted(set(layout.kv_levels.flatten().tolist()))
        [1, 8]
    """

    levels: Any = field(default_factory=lambda: {1: 0.10, 2: 0.05, 4: 0.0, 8: 0.20})
    mode: str = "topk"
    min_full: float = 0.06
    estimate: str = "mean"

    #: Plans depend on each call's q and k (processors call :meth:`plan` per call).
    dynamic: ClassVar[bool] = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "levels", _check_levels(self.levels))
        check_choice("PyramidSparse.mode", self.mode, PYRAMID_MODES)
        check_choice("PyramidSparse.estimate", self.estimate, PYRAMID_ESTIMATES)
        if not (is_finite_number(self.min_full) and 0 <= self.min_full <= 1):
            raise UserError(f"PyramidSparse.min_full must be a number in [0, 1]; got {self.min_full!r}")
        if sum(share for _, share in self.levels) <= 0 and self.min_full <= 0:
            raise UserError(
                f"PyramidSparse.levels={dict(self.levels)} with min_full={self.min_full} visits no key block; "
                "give some level a share > 0 or min_full > 0"
            )

    # ------------------------------------------------------------------ shares
    @property
    def shares(self) -> dict[int, float]:
        """``{level: share}`` for all four levels (0 for the levels not given)."""
        return dict(self.levels)

    @property
    def nominal_density(self) -> float:
        """Effective density the shares stand for in ``"topk"`` mode without text tokens: the
        level-``p`` share counting ``1/p`` (level 1 raised to ``min_full``). In ``"mass"`` mode the
        visited blocks depend on the data: this is then only the ``"topk"`` reading of the shares.

        Example:
            >>> round(PyramidSparse().nominal_density, 4)    # 0.10 + 0.05/2 + 0.20/8
            0.15
        """
        shares = self._bounds(1.0)
        previous, total = 0.0, 0.0
        for level, bound in zip(PYRAMID_LEVELS, shares):
            total += (bound - previous) / level
            previous = bound
        return total

    def _bounds(self, num_blocks: float) -> list[float]:
        """Cumulative rank bounds per level (``"topk"`` reading): ranks ``< bounds[i]`` get at most
        level ``PYRAMID_LEVELS[i]``."""
        bounds, cumulative = [], 0.0
        for _, share in self.levels:
            cumulative += share
            bounds.append(cumulative * num_blocks)
        bounds[0] = max(bounds[0], self.min_full * num_blocks)
        for i in range(1, len(bounds)):
            bounds[i] = max(bounds[i], bounds[i - 1])
        return bounds

    # ------------------------------------------------------------------ no static form
    def video_factors(self, grid: VideoGrid) -> list[tuple[torch.Tensor, torch.Tensor]]:
        raise UserError(_DYNAMIC.format(what="element rule"))

    def video_prefix_pair_counts(
        self, grid: VideoGrid, order: VideoOrder, q_prefix: torch.Tensor, k_prefix: torch.Tensor
    ) -> torch.Tensor:
        raise UserError(_DYNAMIC.format(what="pair counts"))

    def token_mask(self, grid: VideoGrid) -> torch.Tensor:
        """Refused: the pattern's mask depends on q and k (raises :class:`UserError`; use :meth:`plan`)."""
        raise UserError(_DYNAMIC.format(what="token mask"))

    def layout(self, grid: VideoGrid, block_size: int = 128, **_: Any) -> BlockLayout:
        """Refused: the pattern's layout depends on q and k (raises :class:`UserError`; use :meth:`plan`)."""
        raise UserError(_DYNAMIC.format(what="layout"))

    # ------------------------------------------------------------------ the plan
    def plan(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        grid: VideoGrid,
        block_size: int = 128,
        *,
        block_q: int | None = None,
        block_k: int | None = None,
        tile_shape: tuple[int, int, int] | None = None,
    ) -> BlockLayout:
        """The :class:`BlockLayout` (per head, with ``kv_levels``) for one attention call.

        Args:
            q, k: ``[B, H, N, D]`` queries and keys of the call, in the caller's token order
                (``grid``'s order); only read, never differentiated.
            grid: the token grid (``grid.num_tokens == N``).
            block_size: tile size for queries and keys unless ``block_q``/``block_k`` are given.
            block_q, block_k: query rows / key columns per tile, as in :meth:`Pattern.layout`.
            tile_shape: ``(t, h, w)`` tile-major permutation of the video tokens (blocks then
                hold 3-D tiles), or None.

        Returns:
            A per-head layout (``num_heads == H``): every visited tile full (no element mask),
            ``kv_levels [H, Mq, max_kv]`` in 1/2/4/8, ``allowed_pairs`` the pairs inside visited
            tiles (``layout.effective_tile_density`` is the cost with pooling).

        Raises:
            UserError: q or k not ``[B, H, N, D]`` tensors of the same length, ``N`` not
                ``grid.num_tokens``, a bad block size or tile shape.

        Example:
            >>> import torch
            >>> from diffattn import PyramidSparse, VideoGrid
            >>> q = k = torch.randn(1, 2, 4 * 64, 16)
            >>> layout = PyramidSparse(levels={1: 1.0}).plan(q, k, VideoGrid(4, 8, 8), block_size=64)
            >>> layout.num_heads, layout.density, int(layout.kv_levels.max())
            (2, 1.0, 1)
        """
        self.validate_grid(grid)
        n = _check_qk(q, k, grid)
        q_name = "block_size" if block_q is None else "block_q"
        k_name = "block_size (as block_k)" if block_k is None else "block_k"
        block_q = check_block_size(q_name, block_size if block_q is None else block_q)
        block_k = check_block_size(k_name, block_size if block_k is None else block_k, (32, 64, 128, 256))
        tile_shape = check_tile_shape(tile_shape)
        permutation = None
        if tile_shape is not None:
            order = VideoOrder(grid, clip_tile_shape(tile_shape, grid))
            permutation = torch.arange(n)
            permutation[grid.video_offset : grid.video_offset + grid.video_tokens] = (
                order.raster_index() + grid.video_offset
            )
        # One thread: a plan is a few dozen operations on small tensors (see one_cpu_thread).
        with torch.no_grad(), one_cpu_thread(q.device):
            q_kernel = q.detach() if permutation is None else q.detach()[:, :, permutation.to(q.device)]
            k_kernel = k.detach() if permutation is None else k.detach()[:, :, permutation.to(k.device)]
            importance = block_importance(q_kernel, k_kernel, block_q, block_k, self.estimate)
            text_q, text_k = _text_blocks(grid, permutation, block_q), _text_blocks(grid, permutation, block_k)
            levels = assign_levels(importance, self, text_q.to(q.device), text_k.to(q.device))
            return levels_to_layout(levels, n, block_q, block_k, permutation)


def _check_levels(levels: Any) -> tuple[tuple[int, float], ...]:
    """``{level: share}`` -> ``((1, s1), (2, s2), (4, s4), (8, s8))``, else :class:`UserError`."""
    if isinstance(levels, tuple) and all(isinstance(item, tuple) for item in levels):
        levels = dict(levels)
    if not isinstance(levels, Mapping):
        raise UserError(
            f"PyramidSparse.levels must be a mapping {{level: share}} with levels in 1, 2, 4, 8; got {levels!r}"
        )
    for level, share in levels.items():
        if isinstance(level, bool) or level not in PYRAMID_LEVELS:
            raise UserError(f"PyramidSparse.levels has level {level!r}; allowed levels: 1, 2, 4, 8")
        if not is_finite_number(share) or share < 0:
            raise UserError(f"PyramidSparse.levels[{level}] must be a finite share >= 0; got {share!r}")
    total = sum(levels.values())
    if total > 1 + _SHARE_SLACK:
        raise UserError(
            f"PyramidSparse.levels shares sum to {total:g} > 1 ({dict(levels)}); they must sum to at most 1"
        )
    return tuple((level, float(levels.get(level, 0.0))) for level in PYRAMID_LEVELS)


def _check_qk(q: Any, k: Any, grid: VideoGrid) -> int:
    for name, x in (("q", q), ("k", k)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise UserError(f"PyramidSparse.plan: {name} must be a float tensor [B, H, N, D]; got {shape}")
    if q.shape[2] != k.shape[2]:
        raise UserError(
            f"PyramidSparse.plan: q and k must have the same length N; got q with N={q.shape[2]} and k with "
            f"N={k.shape[2]}"
        )
    if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise UserError(
            f"PyramidSparse.plan: q and k must have the same [B, H, _, D]; got q={tuple(q.shape)}, k={tuple(k.shape)}"
        )
    if q.shape[2] != grid.num_tokens:
        raise UserError(
            f"PyramidSparse.plan: q has N={q.shape[2]} tokens but grid {grid.frames}x{grid.height}x{grid.width} + "
            f"{grid.text_tokens} text has {grid.num_tokens}; plan for the grid of these tokens"
        )
    if q.shape[2] == 0:
        raise UserError("PyramidSparse.plan: q and k have no tokens (N=0)")
    return int(q.shape[2])


def _block_means(x: torch.Tensor, block: int) -> torch.Tensor:
    """``[B, H, N, D]`` -> float32 ``[B, H, ceil(N / block), D]``: mean over each block's tokens
    (the last block's mean over the tokens it has)."""
    b, h, n, d = x.shape
    whole = n // block
    # Views and float32 accumulation: no padded or converted copy of q or k.
    parts = [x[:, :, : whole * block].reshape(b, h, whole, block, d).sum(3, dtype=torch.float32) / block]
    if n % block:
        parts.append(x[:, :, whole * block :].sum(2, keepdim=True, dtype=torch.float32) / (n % block))
    return torch.cat(parts, 2) if len(parts) > 1 else parts[0]


def block_importance(
    q: torch.Tensor, k: torch.Tensor, block_q: int, block_k: int, estimate: str = "mean"
) -> torch.Tensor:
    """float32 ``[H, Mq, Mk]``: each query block's importance distribution over the key blocks
    (rows sum to 1), averaged over the batch; q and k in kernel token order.

    Args:
        q, k: ``[B, H, N, D]``.
        estimate: ``"mean"`` (softmax of scaled block-mean logits) or ``"sampled-max"`` (every
            4th token of each block; per sampled query the largest logit over each key block's
            sampled keys, ``exp`` relative to the query's largest; max over the block's sampled
            queries; rows normalised).

    Example:
        >>> import torch
        >>> q = k = torch.randn(1, 2, 96, 16)
        >>> imp = block_importance(q, k, 32, 32)
        >>> imp.shape, bool(torch.allclose(imp.sum(-1), torch.ones(2, 3)))
        (torch.Size([2, 3, 3]), True)
    """
    scale = q.shape[-1] ** -0.5
    if estimate == "mean":
        logits = _block_means(q, block_q) @ _block_means(k, block_k).transpose(-1, -2) * scale
        return logits.softmax(-1).mean(0)
    check_choice("estimate", estimate, PYRAMID_ESTIMATES)
    return _sampled_max_importance(q, k, block_q, block_k, scale)


def _sampled_max_importance(q: torch.Tensor, k: torch.Tensor, block_q: int, block_k: int, scale: float) -> torch.Tensor:
    n = q.shape[2]
    num_q, num_k = -(-n // block_q), -(-n // block_k)
    q_pos = torch.arange(0, n, SAMPLE_STRIDE, device=q.device)
    k_pos = torch.arange(0, n, SAMPLE_STRIDE, device=k.device)
    # Positions 0, 4, 8, ... of the sequence are positions 0, 4, ... of every block (block sizes are
    # multiples of 4), so each block keeps its own quarter of tokens.
    k_sampled = k[:, :, k_pos].float()
    k_block = k_pos // block_k
    q_block = q_pos // block_q
    out = torch.zeros(q.shape[0], q.shape[1], num_q, num_k, device=q.device)
    for start in range(0, q_pos.numel(), _SAMPLED_ROWS):
        rows = q_pos[start : start + _SAMPLED_ROWS]
        logits = q[:, :, rows].float() @ k_sampled.transpose(-1, -2) * scale  # [B, H, r, Nk/4]
        per_block = torch.full((*logits.shape[:3], num_k), -math.inf, device=q.device)
        per_block.scatter_reduce_(-1, k_block.expand_as(logits), logits, reduce="amax")
        relative = (per_block - per_block.amax(-1, keepdim=True)).exp()
        index = q_block[start : start + _SAMPLED_ROWS][None, None, :, None].expand_as(relative)
        out.scatter_reduce_(2, index, relative, reduce="amax")
    out = out / out.sum(-1, keepdim=True)
    return out.mean(0)


def _text_blocks(grid: VideoGrid, permutation: torch.Tensor | None, block: int) -> torch.Tensor:
    """bool ``[ceil(N / block)]``: blocks (kernel order) holding at least one text token."""
    n = grid.num_tokens
    tokens = permutation if permutation is not None else torch.arange(n)
    is_text = grid.video_index_of(tokens) < 0
    padded = torch.nn.functional.pad(is_text, (0, -(-n // block) * block - n))
    return padded.view(-1, block).any(1)


def assign_levels(
    importance: torch.Tensor, pattern: PyramidSparse, text_q: torch.Tensor, text_k: torch.Tensor
) -> torch.Tensor:
    """int32 ``[H, Mq, Mk]``: the level of every (query block, key block) tile, 0 = skipped.

    Ranks each row's key blocks by ``importance`` (descending; ties by block index) and cuts the
    ranking by ``pattern``'s shares (see :class:`PyramidSparse`); text rows and columns are level 1.

    Example:
        >>> import torch
        >>> imp = torch.tensor([[[0.1, 0.4, 0.2, 0.3]]])
        >>> no_text = torch.zeros(4, dtype=torch.bool)
        >>> assign_levels(imp, PyramidSparse(levels={1: 0.25, 2: 0.25}, min_full=0), no_text[:1], no_text).tolist()
        [[[0, 1, 0, 2]]]
    """
    heads, num_q, num_k = importance.shape
    order = torch.sort(importance, dim=-1, descending=True, stable=True)
    ranked_levels = torch.zeros(heads, num_q, num_k, dtype=torch.int32, device=importance.device)
    ranks = torch.arange(num_k, device=importance.device)
    minimum_full = math.ceil(pattern.min_full * num_k - _SHARE_SLACK)
    if pattern.mode == "topk":
        # Rank r gets the first level whose cumulative bound exceeds it.
        bounds = [math.ceil(b - _SHARE_SLACK) for b in pattern._bounds(num_k)]
        assigned = torch.zeros(num_k, dtype=torch.int32, device=importance.device)
        for level, bound in reversed(list(zip(PYRAMID_LEVELS, bounds))):
            assigned = torch.where(ranks < bound, level, assigned)
        ranked_levels[:] = assigned
    else:
        # A block gets the first level whose cumulative share exceeds the mass ranked before it.
        mass_before = torch.cumsum(order.values.double(), -1) - order.values.double()
        cumulative = 0.0
        bounds = []
        for _, share in pattern.levels:
            cumulative += share
            bounds.append(cumulative)
        for level, bound in reversed(list(zip(PYRAMID_LEVELS, bounds))):
            if bound <= 0:
                continue
            # Shares summing to 1 keep every block, whatever rounding leaves of the mass.
            inside = mass_before < bound if bound < 1 - _SHARE_SLACK else torch.ones_like(mass_before, dtype=torch.bool)
            ranked_levels = torch.where(inside, level, ranked_levels)
        # Forcing a prefix of the ranking to level 1 keeps levels non-decreasing along it.
        ranked_levels = torch.where((ranks < minimum_full)[None, None, :], 1, ranked_levels)
    levels = torch.empty_like(ranked_levels).scatter_(-1, order.indices, ranked_levels)
    levels[:, text_q, :] = 1
    levels[:, :, text_k] = 1
    return levels


def levels_to_layout(
    levels: torch.Tensor, num_tokens: int, block_q: int, block_k: int, permutation: torch.Tensor | None = None
) -> BlockLayout:
    """int ``[H, Mq, Mk]`` tile levels (0 = skipped) -> a per-head :class:`BlockLayout` of full
    tiles with ``kv_levels`` (visited key blocks ascending, as the kernels read them).

    Example:
        >>> import torch
        >>> layout = levels_to_layout(torch.tensor([[[1, 0, 8], [0, 2, 0]]]), 96, 64, 32)
        >>> layout.kv_indices.tolist(), layout.kv_levels.tolist()
        ([[[0, 2], [1, 0]]], [[[1, 8], [2, 1]]])
    """
    levels = levels.to(torch.int32)
    heads, num_q, num_k = levels.shape
    visited = levels > 0
    kv_counts = visited.sum(-1).to(torch.int32)
    max_kv = max(int(kv_counts.max()), 1)
    # Visited blocks first, each group in ascending block order (a stable sort on "not visited").
    order = torch.sort((~visited).to(torch.int8), dim=-1, stable=True).indices[..., :max_kv]
    slot_used = torch.arange(max_kv, device=levels.device)[None, None, :] < kv_counts[..., None]
    kv_indices = torch.where(slot_used, order, torch.zeros_like(order)).to(torch.int32)
    kv_levels = torch.where(slot_used, levels.gather(-1, order), torch.ones_like(order, dtype=torch.int32))
    rows = (torch.arange(num_q) * block_q).clamp(max=num_tokens)
    rows = ((rows + block_q).clamp(max=num_tokens) - rows).to(levels.device, torch.int64)
    cols = (torch.arange(num_k) * block_k).clamp(max=num_tokens)
    cols = ((cols + block_k).clamp(max=num_tokens) - cols).to(levels.device, torch.int64)
    pairs = (visited.to(torch.int64) * rows[None, :, None] * cols[None, None, :]).sum((1, 2))
    return BlockLayout(
        num_tokens=num_tokens,
        block_q=block_q,
        block_k=block_k,
        kv_counts=kv_counts,
        kv_indices=kv_indices,
        kv_mask_ids=torch.full_like(kv_indices, -1),
        masks=torch.zeros(0, block_q, block_k // 32, dtype=torch.int32, device=levels.device),
        permutation=None if permutation is None else permutation.to(levels.device),
        allowed_pairs=tuple(int(p) for p in pairs.tolist()),
        kv_levels=kv_levels.to(torch.int32),
    )


def tile_levels(layout: BlockLayout) -> torch.Tensor:
    """int32 ``[Hl, Mq, Mk]``: the level of every tile of ``layout`` (0 = not visited; a layout
    without ``kv_levels`` has level 1 on every visited tile).

    Example:
        >>> import torch
        >>> tile_levels(levels_to_layout(torch.tensor([[[0, 2, 8]]]), 96, 32, 32)).tolist()
        [[[0, 2, 8]]]
    """
    valid = layout._valid_slots()
    head, row, slot = valid.nonzero(as_tuple=True)
    dense = torch.zeros(layout.num_heads, layout.num_q_blocks, layout.num_k_blocks, dtype=torch.int32,
                        device=layout.device)
    values = (layout.kv_levels[head, row, slot] if layout.kv_levels is not None
              else torch.ones_like(head, dtype=torch.int32))
    dense[head, row, layout.kv_indices[head, row, slot].long()] = values
    return dense


def level_shares(layout: BlockLayout) -> dict[int, float]:
    """Share of all (head, query block, key block) tiles at each level, 0 = skipped.

    Example:
        >>> import torch
        >>> level_shares(levels_to_layout(torch.tensor([[[1, 0, 8, 8]]]), 128, 64, 32))
        {0: 0.25, 1: 0.25, 2: 0.0, 4: 0.0, 8: 0.5}
    """
    total = layout.num_heads * layout.num_q_blocks * layout.num_k_blocks
    counts = layout.tiles_per_level
    shares = {level: counts.get(level, 0) / total for level in PYRAMID_LEVELS}
    return {0: 1.0 - sum(shares.values()), **shares}
