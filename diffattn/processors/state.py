"""Per-transformer state that a forward pre-hook publishes and the processors read.

Wan, HunyuanVideo, LTX-Video and Mochi never pass ``attention_kwargs`` to their processors, so
the current denoising step and the latent grid reach the processors through this object: a plain
PyTorch forward pre-hook on the transformer (which keeps firing under ``enable_model_cpu_offload``)
writes them before every transformer call.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable, Protocol, TypeVar

import torch

from ..kernels import block_sparse_attention
from ..patterns import VideoGrid
from .config import SparsityConfig

T = TypeVar("T")


class AttentionObserver(Protocol):
    """A profiling hook on :attr:`SparsityState.observer` (installed by :mod:`diffattn.profiler`).

    It sees every *sparsifiable* self-attention call of the transformer: the ones that run sparse
    and the ones that the schedule keeps dense (dense warm-up/last steps, dense layers), and runs
    them itself so that it can time their core attention op. Cross-attention and calls that cannot
    be sparsified at all never reach it. Calls may nest (joint attention reports its whole sparse
    op and, inside it, the kernel call): only the outermost one is a call.

    Example:
        >>> class Count:
        ...     calls = 0
        ...     def sparse_call(self, state, layer_index, attention):
        ...         self.calls += 1
        ...         return attention()
        ...     def dense_call(self, state, layer_index, stock):
        ...         self.calls += 1
        ...         return stock()
        >>> state.observer = Count()
    """

    def sparse_call(self, state: "SparsityState", layer_index: int, attention: Callable[[], T]) -> T:
        """Run ``attention()``, exactly the sparse core op (layout lookup and kernel), and return its result."""
        ...

    def dense_call(self, state: "SparsityState", layer_index: int, stock: Callable[[], T]) -> T:
        """Run ``stock()``, the whole stock processor call (projections included), and return its result."""
        ...


class SparsityState:
    """What the processors of one transformer share: config, current step, current grid.

    Attributes:
        config: the :class:`SparsityConfig` in force.
        scheduler: the pipeline's scheduler (for the step index and the number of steps), or None.
        grid: the latent token grid of the current transformer call.
        step: index of the current denoising step, or None when unknown (then sparse, as after
            warm-up).
        num_steps: steps in the current run, or None when unknown.
        sparse_calls: ``Counter[(step, layer_index)]`` of calls that ran the sparse kernel.
        observer: an :class:`AttentionObserver` (the profiler's timing hook), or None. With None
            the processors pay one attribute check per call and nothing else.
    """

    def __init__(self, config: SparsityConfig, scheduler: Any = None) -> None:
        self.config = config
        self.scheduler = scheduler
        self.grid: VideoGrid | None = None
        self.step: int | None = None
        self.num_steps: int | None = None
        self.sparse_calls: Counter[tuple[int | None, int]] = Counter()
        self.dense_layer_indices: frozenset[int] = frozenset()
        self.observer: AttentionObserver | None = None
        # The layer whose current call dense_now() kept dense by the schedule, for run_dense():
        # only tracked while an observer is attached.
        self._scheduled_dense: int | None = None

    # torch.compile: begin_call, dense_now and attend (step/grid bookkeeping, layout cache, kernel
    # dispatch) run eagerly. Traced, they would specialise the graph on every step index and call
    # count (a recompile per step until the recompile limit) and break on the layouts' .item().
    @torch.compiler.disable
    def begin_call(self, grid: VideoGrid, timestep: torch.Tensor | float | None) -> None:
        """Called by the pre-hook before each transformer forward."""
        self.grid = grid
        self.step, self.num_steps = _current_step(self.scheduler, timestep)

    @torch.compiler.disable
    def dense_now(self, layer_index: int) -> bool:
        """Whether layer ``layer_index`` runs the stock (dense) path in the current call.

        The processors ask this only for self-attention calls, and route a call to the stock
        processor right after a True answer: that is how :meth:`take_scheduled_dense` knows which
        stock calls are sparsifiable ones kept dense by the schedule.
        """
        dense = self._dense_by_schedule(layer_index)
        if self.observer is not None:
            self._scheduled_dense = layer_index if dense and self.grid is not None else None
        return dense

    def _dense_by_schedule(self, layer_index: int) -> bool:
        cfg = self.config
        if self.grid is None or layer_index in self.dense_layer_indices:
            return True
        if self.step is not None:
            if self.step < cfg.dense_steps:
                return True
            if self.num_steps is not None and self.step >= self.num_steps - cfg.dense_last_steps:
                return True
        return False

    @torch.compiler.disable
    def sparse_now(self, layer_index: int, num_tokens: int) -> bool:
        """Whether a self-attention call over ``num_tokens`` tokens runs sparse: a sparse step and
        layer, and a published grid that is this very sequence (anything else stays stock)."""
        grid = self.grid
        return grid is not None and grid.num_tokens == num_tokens and not self.dense_now(layer_index)

    @torch.compiler.disable
    def attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        layer_index: int,
        *,
        grid: VideoGrid | None = None,
        return_lse: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Sparse attention for ``[B, N, H, D]`` tensors (diffusers' layout).

        Args:
            grid: the token grid of this sequence (default: the grid the pre-hook published).
            return_lse: also return the log-sum-exp ``[B, N, H]`` (float32) for merging.
        """
        grid = self.grid if grid is None else grid
        if grid is None:
            raise RuntimeError("SparsityState.attend called outside a transformer forward (no grid published)")
        if query.shape[1] != grid.num_tokens:
            raise ValueError(
                f"self-attention sequence has {query.shape[1]} tokens but the latent grid "
                f"{grid.frames}x{grid.height}x{grid.width} + {grid.text_tokens} text has {grid.num_tokens}"
            )
        cfg = self.config

        def attention() -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
            layout = cfg.pattern.layout(grid, block_size=cfg.block_size, tile_shape=cfg.tile_shape, device=query.device)
            return block_sparse_attention(
                query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), layout,
                backend=cfg.backend, return_lse=return_lse,
            )

        result = attention() if self.observer is None else self.observer.sparse_call(self, layer_index, attention)
        self.sparse_calls[(self.step, layer_index)] += 1
        if return_lse:
            out, lse = result
            return out.transpose(1, 2), lse.transpose(1, 2)
        return result.transpose(1, 2)

    @torch.compiler.disable
    def observe(self, layer_index: int, attention: Callable[[], T]) -> T:
        """Run ``attention()``, a sparse core op built around :meth:`attend` (joint attention's
        merged video/text parts), as one call of the observer (``attention()`` alone without one).

        Example:
            >>> out = state.observe(layer_index, lambda: split_attention(state, layer_index, q, k, v))
        """
        if self.observer is None:
            return attention()
        return self.observer.sparse_call(self, layer_index, attention)

    def take_scheduled_dense(self, layer_index: int) -> bool:
        """Whether the stock call about to run on ``layer_index`` is a sparsifiable self-attention
        call that :meth:`dense_now` kept dense (a dense step or layer); consumes that mark."""
        taken = self._scheduled_dense == layer_index
        self._scheduled_dense = None
        return taken

    @torch.compiler.disable
    def run_dense(self, layer_index: int, stock: Callable[..., T], args: tuple, kwargs: dict) -> T:
        """``stock(*args, **kwargs)`` for a call kept dense by the schedule, reported to the observer."""
        if self.observer is None:
            return stock(*args, **kwargs)
        return self.observer.dense_call(self, layer_index, lambda: stock(*args, **kwargs))


def _current_step(scheduler: Any, timestep: torch.Tensor | float | None) -> tuple[int | None, int | None]:
    """(step index, number of steps) from the scheduler, falling back to matching the timestep."""
    if scheduler is None:
        return None, None
    timesteps = getattr(scheduler, "timesteps", None)
    num_steps = int(len(timesteps)) if timesteps is not None else None
    step_index = getattr(scheduler, "step_index", None)
    if step_index is not None:
        return int(step_index), num_steps
    begin_index = getattr(scheduler, "begin_index", None)
    if begin_index is not None:
        return int(begin_index), num_steps
    if not num_steps or timestep is None:
        return None, num_steps
    # Before the scheduler's first step() its step_index is None: match the timestep instead.
    value = float(torch.as_tensor(timestep).flatten().float().max())
    distances = (timesteps.float().cpu() - value).abs()
    return int(distances.argmin()), num_steps
