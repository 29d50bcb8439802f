"""Per-transformer state that a forward pre-hook publishes and the processors read.

Wan, HunyuanVideo, LTX-Video and Mochi never pass ``attention_kwargs`` to their processors, so
the current denoising step and the latent grid reach the processors through this object: a plain
PyTorch forward pre-hook on the transformer (which keeps firing under ``enable_model_cpu_offload``)
writes them before every transformer call.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch

from ..kernels import block_sparse_attention
from ..patterns import VideoGrid
from .config import SparsityConfig


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
    """

    def __init__(self, config: SparsityConfig, scheduler: Any = None) -> None:
        self.config = config
        self.scheduler = scheduler
        self.grid: VideoGrid | None = None
        self.step: int | None = None
        self.num_steps: int | None = None
        self.sparse_calls: Counter[tuple[int | None, int]] = Counter()
        self.dense_layer_indices: frozenset[int] = frozenset()

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
        """Whether layer ``layer_index`` runs the stock (dense) path in the current call."""
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
        layout = cfg.pattern.layout(grid, block_size=cfg.block_size, tile_shape=cfg.tile_shape, device=query.device)
        result = block_sparse_attention(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), layout,
            backend=cfg.backend, return_lse=return_lse,
        )
        self.sparse_calls[(self.step, layer_index)] += 1
        if return_lse:
            out, lse = result
            return out.transpose(1, 2), lse.transpose(1, 2)
        return result.transpose(1, 2)


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
