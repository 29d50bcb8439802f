"""FreeSwim: video above a model's training resolution, without training (Wan family).

Three parts, all processors and hooks around the stock diffusers model:

* **window**: each self-attention query sees a spatial window of the training latent size on
  every frame, shifted inward at the borders (``Neighborhood(kernel_size=(None, kh, kw))``, run by
  the block-sparse kernel);
* **log-length scale**: both branches' self-attention softmax scale is
  ``sqrt(log_{n_train}(n_target) / d)`` with ``n_train = kh * kw`` window tokens and
  ``n_target = H * W`` tokens per frame (applied as a factor on the queries; 1 when the window
  covers the frame);
* **guide branch**: the conditional transformer call runs a batch ``[window, full]``; in every
  block's cross-attention the output (before ``to_out``) is computed from the full branch's
  queries and used for both, and cached; on the conditional calls between guide steps the cached
  output replaces the window branch's cross-attention. The unconditional call runs the window
  branch only. The transformer hooks that build the batch and keep its window half live in
  :mod:`diffattn.adapters.freeswim`.

:class:`FreeSwim` is a :class:`~diffattn.processors.config.SparsityConfig` (its ``pattern`` is the
window), so presets, ``diffattn.apply`` and the processor template take it as they take any config.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, fields
from typing import Any, Callable

import torch

from ..errors import DenseFallbackWarning, UserError
from ..patterns import Dense, Neighborhood, VideoGrid
from ..patterns._checks import check_positive_int
from .base import _with_global
from .config import SparsityConfig
from .state import SparsityState
from .wan import WanSparseAttnProcessor

#: The softmax rescalings FreeSwim knows (None: the model's own ``1/sqrt(d)``).
SCALES = ("log-length", None)

#: Roles of one transformer call (set by the adapter's pre-hook, read by the processors).
PLAIN = "plain"      # not under FreeSwim's dual path: window branch only, own cross-attention
GUIDE = "guide"      # conditional guide step: batch [window, full], cross-attention cached
CACHED = "cached"    # conditional step between guides: window branch, cached cross-attention
UNCOND = "uncond"    # unconditional call: window branch only, own cross-attention


@dataclass(frozen=True, init=False)
class FreeSwim(SparsityConfig):
    """FreeSwim's configuration; ``diffattn.apply(pipe, FreeSwim(...))`` installs it.

    Args:
        window: ``(height, width)`` of the spatial window in latent tokens, or None for the
            model's native latent size (see :func:`diffattn.adapters.freeswim.native_window`).
            A window at least as large as a call's frame covers it (that call is dense, noted once).
        cache_steps: guide steps are ``range(0, steps, cache_steps)``; the conditional calls in
            between reuse the cached cross-attention outputs (1: the guide runs every step).
        scale: ``"log-length"`` (both branches' softmax scale ``sqrt(log_{n_train}(n_target)/d)``)
            or None (the model's own scale).
        offload_cache: keep the cached cross-attention outputs on the CPU (moved to the model's
            device when used): for large videos.
        **sparsity: the :class:`SparsityConfig` fields (``block_size``, ``tile_shape``,
            ``backend``, ``dense_steps``, ...) of the window branch; ``pattern`` is the window
            (a Dense placeholder while ``window`` is None: the adapter resolves it). Steps and
            layers the schedule keeps dense (``dense_steps``, ``dense_layers``) run the stock
            self-attention in both branches (no window, no rescale); the guide still runs.

    Example:
        >>> config = FreeSwim(window=(8, 8), cache_steps=5)
        >>> config.pattern.kernel_size
        (None, 8, 8)
        >>> FreeSwim(cache_steps=0)
        Traceback (most recent call last):
        ...
        diffattn.errors.UserError: FreeSwim.cache_steps must be an int >= 1, got 0
    """

    window: tuple[int, int] | None = None
    cache_steps: int = 2
    scale: str | None = "log-length"
    offload_cache: bool = False

    def __init__(self, window: tuple[int, int] | None = None, cache_steps: int = 2, scale: str | None = "log-length",
                 offload_cache: bool = False, *, pattern: Any = None, **sparsity: Any) -> None:
        # ``pattern`` is accepted (dataclasses.replace passes every field) and always re-derived from window.
        del pattern
        inherited = {f.name: f for f in fields(SparsityConfig) if f.name != "pattern"}
        unknown = sorted(set(sparsity) - set(inherited))
        if unknown:
            allowed = ", ".join(["window", "cache_steps", "scale", "offload_cache", *sorted(inherited)])
            raise UserError(f"unknown FreeSwim argument(s) {', '.join(unknown)}; allowed: {allowed}")
        for name, field in inherited.items():
            object.__setattr__(self, name, sparsity.get(name, field.default))
        object.__setattr__(self, "window", check_window(window))
        check_positive_int("FreeSwim.cache_steps", cache_steps)
        object.__setattr__(self, "cache_steps", cache_steps)
        if scale not in SCALES:
            raise UserError(f"FreeSwim.scale must be 'log-length' or None; got {scale!r}")
        object.__setattr__(self, "scale", scale)
        if not isinstance(offload_cache, bool):
            raise UserError(f"FreeSwim.offload_cache must be True or False; got {offload_cache!r}")
        object.__setattr__(self, "offload_cache", offload_cache)
        object.__setattr__(self, "pattern", window_pattern(self.window) if self.window is not None else Dense())
        self.__post_init__()


def check_window(window: Any) -> tuple[int, int] | None:
    """``window`` as a ``(height, width)`` tuple of positive ints, None kept; else :class:`UserError`."""
    if window is None:
        return None
    if (not isinstance(window, (tuple, list)) or len(window) != 2
            or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in window)):
        raise UserError(f"FreeSwim.window must be None or (height, width) in latent tokens, two ints >= 1; "
                        f"got {window!r}")
    return tuple(window)


def window_pattern(window: tuple[int, int]) -> Neighborhood:
    """The inward spatial window over all frames: ``Neighborhood(kernel_size=(None, h, w))``."""
    return Neighborhood(kernel_size=(None, *window))


def log_length_factor(window: tuple[int, int], grid: VideoGrid) -> float:
    """The factor on the queries that turns the model's ``1/sqrt(d)`` into FreeSwim's
    ``sqrt(log_{n_train}(n_target) / d)``: ``sqrt(log(n_target) / log(n_train))``, with
    ``n_train`` the window's tokens and ``n_target`` a frame's (clipped to the frame); 1 when the
    window covers the frame or holds a single token (no logarithm base).

    Example:
        >>> round(log_length_factor((30, 52), VideoGrid(21, 60, 104)), 4)   # 480p -> 960p: 4x tokens
        1.0902
        >>> log_length_factor((8, 8), VideoGrid(17, 8, 8))
        1.0
    """
    n_target = grid.height * grid.width
    n_train = min(window[0], grid.height) * min(window[1], grid.width)
    if n_train <= 1 or n_target <= n_train:
        return 1.0
    return math.sqrt(math.log(n_target) / math.log(n_train))


class FreeSwimState(SparsityState):
    """The :class:`SparsityState` of a FreeSwim transformer: the window, the current call's role
    and the guide branch's cross-attention cache (freed by :meth:`close`, i.e. ``diffattn.remove``).

    Attributes:
        role: what the current transformer call is (``"plain"``, ``"guide"``, ``"cached"``,
            ``"uncond"``; set by the adapter's pre-hook).
        guide_steps: the steps whose conditional call ran the guide branch, in order.
        cache: ``{block index: [B, N, H, D] cross-attention output}`` of the last guide step.
    """

    def __init__(self, config: FreeSwim, scheduler: Any = None, label: str = "transformer",
                 window: tuple[int, int] | None = None) -> None:
        super().__init__(config, scheduler, label)
        #: The resolved window (``config.window``, or the model's native size for ``window=None``).
        self.window = check_window(window if window is not None else config.window)
        if self.window is None:
            raise UserError("FreeSwimState needs a window: FreeSwim(window=(h, w)) or the model's native size")
        self.window_pattern = window_pattern(self.window)
        #: ``config`` with the resolved window (what the window branch runs; the profiler's density).
        self.layout_config = config.with_overrides(window=self.window)
        self.role = PLAIN
        self.query_factor = 1.0
        self.guide_steps: list[int | None] = []
        self.cache: dict[int, torch.Tensor] = {}
        self.cache_key: tuple | None = None
        self.last_guide_step: int | None = None
        self.text_tokens: int | None = None
        self._noted_grids: set[tuple[int, int]] = set()

    @property
    def cache_bytes(self) -> int:
        """Bytes the cross-attention cache holds now (on the CPU with ``offload_cache=True``).

        Example:
            >>> state = FreeSwimState(FreeSwim(window=(4, 4)))
            >>> state.store(0, torch.zeros(1, 16, 2, 8))
            >>> state.cache_bytes
            1024
        """
        return sum(t.numel() * t.element_size() for t in self.cache.values())

    @property
    def dual(self) -> bool:
        """Whether the current call's batch is ``[window, full]``."""
        return self.role == GUIDE

    def begin_call(self, grid: VideoGrid | None, timestep: Any, no_grid_reason: str | None = None,
                   device: Any = None) -> None:
        super().begin_call(grid, timestep, no_grid_reason=no_grid_reason, device=device)
        self.query_factor = 1.0
        if grid is None:
            return
        if self.config.scale == "log-length":
            self.query_factor = log_length_factor(self.window, grid)
        frame = (grid.height, grid.width)
        if self.window[0] >= frame[0] and self.window[1] >= frame[1] and frame not in self._noted_grids:
            self._noted_grids.add(frame)
            warnings.warn(f"diffattn: the FreeSwim window {self.window} covers the {frame[0]}x{frame[1]} latent "
                          "frame: its self-attention is dense (FreeSwim is for sizes above the native one)",
                          DenseFallbackWarning, stacklevel=3)

    @torch.compiler.disable
    def _layout_for(self, grid: VideoGrid, device: Any) -> tuple[Any, str | None]:
        """The window's layout (``config.pattern`` is a placeholder while ``window=None``)."""
        cfg = self.config
        layout = self.window_pattern.layout(grid, block_size=cfg.block_size, tile_shape=cfg.tile_shape,
                                            device=device if device is not None else "cpu")
        return layout, None

    def store(self, layer_index: int, output: torch.Tensor) -> None:
        """Keep one block's guide cross-attention output (on the CPU with ``offload_cache``)."""
        self.cache[layer_index] = output.to("cpu") if self.config.offload_cache else output

    def cached(self, layer_index: int, like: torch.Tensor) -> torch.Tensor:
        """The cached output of block ``layer_index`` on ``like``'s device and dtype."""
        if layer_index not in self.cache:
            raise UserError(f"FreeSwim: block {layer_index} has no cached cross-attention output "
                            "(its processor was replaced since the last guide step?)")
        return self.cache[layer_index].to(device=like.device, dtype=like.dtype)

    def close(self) -> None:
        """Free the cache (``diffattn.remove`` calls it)."""
        self.cache.clear()
        self.cache_key, self.last_guide_step, self.role = None, None, PLAIN


class FreeSwimWanProcessor(WanSparseAttnProcessor):
    """One ``WanAttention`` layer under FreeSwim: self-attention (``attn1``) runs the window
    (the window half of a guide batch) and the full attention (its full half), both with the
    log-length scale; cross-attention (``attn2``) computes, caches or reuses the guide branch's
    output per :attr:`FreeSwimState.role`. Everything else is the stock ``WanAttnProcessor``.

    Example:
        >>> FreeSwimWanProcessor().stock_classes
        ('WanAttnProcessor',)
    """

    def __init__(self, stock: Any = None, state: FreeSwimState | None = None, layer_index: int = 0) -> None:
        super().__init__(stock, state, layer_index)
        self._cross_call: Callable[..., Any] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "_cross_call": None}

    def process(self, call: dict[str, Any]) -> Any:
        if self.is_self_attention(call) or not isinstance(self.state, FreeSwimState):
            return super().process(call)
        if self.state.role in (PLAIN, UNCOND):
            return self.stock(**call)
        if self._cross_call is None:
            self._cross_call = _with_global(type(self.stock).__call__, "dispatch_attention_fn", self._cross_op())
        return self._cross_call(self.stock, **call)

    def _stock_op(self) -> Callable[..., torch.Tensor]:
        return type(self.stock).__call__.__globals__["dispatch_attention_fn"]

    def _dense(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """The stock attention op on ``[B, N, H, D]`` tensors (what the full branch runs)."""
        return self._stock_op()(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                backend=self._attention_backend)

    def attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  key_padding: torch.Tensor | None = None, stock_op: Callable[[], torch.Tensor] | None = None,
                  parallel_config: Any = None) -> torch.Tensor:
        """Self-attention ``[B, N, H, D]``: the window branch through the template (kernel), the
        full half of a guide batch dense; queries scaled by the log-length factor first."""
        state = self.state
        if state.query_factor != 1.0:
            query = query * state.query_factor
            stock_op = None  # the stock closure holds the unscaled queries

        def dense_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Callable[[], torch.Tensor]:
            return lambda: self._dense(q, k, v)

        if not state.dual:
            return super().attention(query, key, value, key_padding, stock_op or dense_op(query, key, value),
                                     parallel_config)
        half = query.shape[0] // 2
        parts = [(query[:half], key[:half], value[:half]), (query[half:], key[half:], value[half:])]
        window = super().attention(*parts[0], None, dense_op(*parts[0]), parallel_config)
        full = state.run_dense(self.layer_index, dense_op(*parts[1]))
        return torch.cat([window, full])

    def _cross_op(self) -> Callable[..., torch.Tensor]:
        """The cross-attention op a guide or cached call's stock ``__call__`` sees."""
        original = self._stock_op()

        def cross(query, key, value, attn_mask=None, *args, **kwargs):  # [B, N, H, D]
            state = self.state
            if key.shape[1] != state.text_tokens:  # Wan I2V's image context: each branch its own
                return original(query, key, value, attn_mask, *args, **kwargs)
            if state.role == CACHED:
                return state.cached(self.layer_index, query)
            half = query.shape[0] // 2
            if isinstance(attn_mask, torch.Tensor) and attn_mask.shape[0] == query.shape[0]:
                attn_mask = attn_mask[half:]
            guide = original(query[half:], key[half:], value[half:], attn_mask, *args, **kwargs)
            state.store(self.layer_index, guide)
            return torch.cat([guide, guide])

        return cross
