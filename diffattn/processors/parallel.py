"""Sparse attention under diffusers' context parallelism (Ulysses).

``transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=P))`` splits the
token sequence into ``P`` equal, contiguous shards (the model's ``_cp_plan``) and sets
``_parallel_config`` on every processor: a processor sees ``[B, N/P, H, D]``. diffattn's attention
op then does what diffusers' own Ulysses attention does, with the sparse kernel inside:

1. all-to-all to the full sequence and the rank's heads ``[B, N, H/P, D]`` (rank ``r`` of the
   Ulysses group holds heads ``r*H/P .. (r+1)*H/P - 1``);
2. the kernel with the layout of the *global* grid, a per-head layout cut to those heads;
3. all-to-all back to ``[B, N/P, H, D]``.

A sequence with text tokens (FLUX's ``[text, image]``) is split text and video apart: each rank's
shard is its share of the text followed by its share of the image (on the grid's text side), so
the gathered shards are put in the grid's order before the kernel and back after it
(:func:`gathered_order`).

The all-to-alls are diffusers' own ``SeqAllToAllDim`` (an autograd function over
``torch.distributed``'s functional all-to-all). The global grid needs no arithmetic on shard
shapes: the transformer's pre-hook is a plain PyTorch forward pre-hook, which runs before the
module's ``forward``; diffusers' context-parallel hooks replace ``forward`` itself (its
``HookRegistry``), so the pre-hook always sees the un-sharded input.

Ring attention (``ring_degree > 1``) and ``ulysses_anything`` (uneven shards) are not supported:
such calls fall back to diffusers' own (dense) context-parallel attention, with a
:class:`~diffattn.errors.DenseFallbackWarning` naming Ulysses as the supported mode (or a
:class:`~diffattn.errors.UserError` with ``on_unsupported="raise"``).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..patterns import VideoGrid
from .state import SparseUnsupported

#: The only context-parallel mode that runs sparse; fallback reasons name it.
SUPPORTED_MODE = "Ulysses (ContextParallelConfig(ulysses_degree=N), ring_degree=1) is the supported mode"


def context_parallel_problem(parallel_config: Any) -> str | None:
    """Why sparse attention cannot run under ``parallel_config`` (what diffusers' ``enable_parallelism``
    set on the processor), or None (no context parallelism, or plain Ulysses).

    Example:
        >>> from types import SimpleNamespace
        >>> ring = SimpleNamespace(context_parallel_config=SimpleNamespace(
        ...     ring_degree=2, ulysses_degree=1, ulysses_anything=False))
        >>> context_parallel_problem(None) is None, "Ulysses" in context_parallel_problem(ring)
        (True, True)
    """
    if parallel_config is None:
        return None
    cp = getattr(parallel_config, "context_parallel_config", None)
    if cp is None:
        return f"a parallel config without a context-parallel part ({type(parallel_config).__name__}); {SUPPORTED_MODE}"
    if cp.ring_degree > 1:
        return (f"ring attention (context parallelism with ring_degree={cp.ring_degree}) is not supported by "
                f"diffattn; {SUPPORTED_MODE}")
    if getattr(cp, "ulysses_anything", False):
        return f"context parallelism with ulysses_anything=True (uneven shards) is not supported; {SUPPORTED_MODE}"
    return None


def ulysses_degree(parallel_config: Any) -> int:
    """How many ranks share one sequence under ``parallel_config`` (1 without context parallelism).

    Example:
        >>> from types import SimpleNamespace
        >>> four = SimpleNamespace(context_parallel_config=SimpleNamespace(ulysses_degree=4))
        >>> ulysses_degree(None), ulysses_degree(four)
        (1, 4)
    """
    cp = getattr(parallel_config, "context_parallel_config", None)
    return 1 if cp is None else int(cp.ulysses_degree)


def gathered_order(grid: VideoGrid, degree: int) -> torch.Tensor | None:
    """Where each grid token sits in the gathered sequence (``degree`` shards one after the other,
    each its share of the text on the grid's text side, then its share of the video); None when
    the gathered sequence already is in grid order (no text tokens).

    Example:
        >>> order = gathered_order(VideoGrid(1, 2, 2, text_tokens=2, text_position="start"), degree=2)
        >>> order.tolist()   # shards [t0, v0, v1] and [t1, v2, v3] -> [t0, t1, v0, v1, v2, v3]
        [0, 3, 1, 2, 4, 5]
    """
    if not grid.text_tokens:
        return None
    if grid.text_tokens % degree or grid.video_tokens % degree:
        raise SparseUnsupported(
            f"{grid.text_tokens} text and {grid.video_tokens} video tokens do not split evenly over {degree} ranks"
        )
    text, video = grid.text_tokens // degree, grid.video_tokens // degree
    starts = torch.arange(degree)[:, None] * (text + video)
    text_first = grid.text_position == "start"
    text_index = (starts + (0 if text_first else video) + torch.arange(text)).flatten()
    video_index = (starts + (text if text_first else 0) + torch.arange(video)).flatten()
    return torch.cat([text_index, video_index] if text_first else [video_index, text_index])


def ulysses_attention(
    attend: Callable[..., torch.Tensor],
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    parallel_config: Any,
    grid: VideoGrid | None,
) -> torch.Tensor:
    """Ulysses attention over a sequence shard: ``attend(q, k, v, heads=(start, stop))`` on the full
    sequence and this rank's heads, between two all-to-alls.

    Args:
        attend: the sparse op on ``[B, N, H/P, D]`` tensors; ``heads`` is the range of global heads
            they hold (to cut a per-head layout). It raises
            :class:`~diffattn.processors.state.SparseUnsupported` before computing anything when it
            cannot run; every rank decides alike (same shapes, same grid).
        query, key, value: this rank's shard ``[B, N/P, H, D]``.
        parallel_config: diffusers' ``ParallelConfig`` with a Ulysses ``context_parallel_config``.
        grid: the global token grid (its text tokens say how the shards interleave).
    Returns:
        ``[B, N/P, H, D]``, this rank's shard of the output.

    Example:
        >>> # inside a processor's attention op, on each rank of a Ulysses group (needs the process group)
        >>> out = ulysses_attention(attend, query, key, value, parallel_config, grid)  # doctest: +SKIP
    """
    cp = parallel_config.context_parallel_config
    degree = ulysses_degree(parallel_config)
    heads = query.shape[2]
    if grid is None:
        raise SparseUnsupported("no token grid was published for this call")
    order = gathered_order(grid, degree)
    if heads % degree:
        raise SparseUnsupported(f"{heads} attention heads do not split evenly over ulysses_degree={degree}")
    try:
        from diffusers.models.attention_dispatch import SeqAllToAllDim
    except ImportError:  # pragma: no cover - another diffusers version
        raise SparseUnsupported("this diffusers version has no SeqAllToAllDim (Ulysses all-to-all)") from None
    group = cp._ulysses_mesh.get_group()
    local_heads = heads // degree
    start = cp._ulysses_local_rank * local_heads
    # [B, N/P, H, D] -> [B, N, H/P, D]: scatter the heads, gather the sequence.
    q, k, v = (SeqAllToAllDim.apply(group, x.contiguous(), 2, 1) for x in (query, key, value))
    if order is not None:
        order = order.to(q.device)
        q, k, v = (x.index_select(1, order) for x in (q, k, v))
    out = attend(q, k, v, heads=(start, start + local_heads))
    if order is not None:
        out = out.index_select(1, torch.argsort(order))
    return SeqAllToAllDim.apply(group, out.contiguous(), 1, 2)
