"""Clocks and the attention timer the profiler attaches to a pipeline's :class:`SparsityState`.

On CUDA every measurement is a pair of CUDA events recorded on the current stream; nothing
synchronises per call: :meth:`Clock.seconds` is read once, after one ``torch.cuda.synchronize()``
at the end of a run. On the CPU a measurement is a ``time.perf_counter`` difference.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..patterns import VideoGrid
from ..processors.config import SparsityConfig
from ..processors.state import SparsityState

T = TypeVar("T")


class Clock:
    """Start/stop measurements on one device: CUDA events on a CUDA device, perf_counter elsewhere.

    Example:
        >>> clock = Clock(torch.device("cpu"))
        >>> mark = clock.start(); span = clock.stop(mark)
        >>> clock.synchronize(); clock.seconds(span) >= 0
        True
    """

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"

    def _event(self) -> Any:
        # On the current stream of the pipeline's device (not of whichever GPU is current).
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def start(self) -> Any:
        return self._event() if self.cuda else time.perf_counter()

    def stop(self, mark: Any) -> Any:
        """A span from ``mark`` to now (read it with :meth:`seconds` after :meth:`synchronize`)."""
        if self.cuda:
            return mark, self._event()
        return time.perf_counter() - mark

    def synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def seconds(self, span: Any) -> float:
        if self.cuda:
            start, end = span
            return start.elapsed_time(end) / 1000.0
        return float(span)


@dataclass
class AttentionCall:
    """One sparsifiable self-attention call of a run.

    Attributes:
        step: denoising step (None when the scheduler gives none).
        layer: transformer block index.
        sparse: True when the diffattn kernel ran it (``SparsityState.attend``), False when the
            schedule kept it dense and the stock processor ran it.
        grid: the latent token grid of the call.
        config: the :class:`SparsityConfig` in force (its layout gives a sparse call's density).
        spans: clock spans of the core attention op (one for a sparse call; one per
            ``scaled_dot_product_attention`` inside a stock call: none when the stock path used
            another attention backend, see :attr:`timed`).
        seconds: total core-op time, filled in by :meth:`AttentionTimer.finish`.
        plan_seconds: time a dynamic pattern (PSA) spent planning this call's layout (part of
            ``seconds``: planning runs inside the timed op).
        plan: a dynamic pattern's plan of this call, summarised by :meth:`AttentionTimer.finish`:
            ``density`` (effective: a level-p tile counts 1/p), ``tile_density`` and ``level_tiles``
            (``{level: tiles}`` over all heads, 0 = skipped); None for static patterns.
    """

    step: int | None
    layer: int
    sparse: bool
    grid: VideoGrid | None
    config: SparsityConfig
    spans: list
    seconds: float = 0.0
    plan_seconds: float = 0.0
    plan: Any = None

    @property
    def timed(self) -> bool:
        return bool(self.spans)


class _TimeSDPA(TorchFunctionMode):
    """Times ``torch.nn.functional.scaled_dot_product_attention`` inside one stock processor call.

    The stock processors reach their core op through diffusers' ``dispatch_attention_fn``, whose
    default ("native") backend calls SDPA, or call SDPA directly (CogVideoX's and Mochi's 2_0
    processors). Everything else passes through untouched; the mode is only active for the stock
    calls of dense steps and layers while a profiler is attached.
    """

    def __init__(self, clock: Clock, spans: list) -> None:
        super().__init__()
        self.clock, self.spans = clock, spans

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        mark = self.clock.start()
        out = func(*args, **kwargs)
        self.spans.append(self.clock.stop(mark))
        return out


class AttentionTimer:
    """The profiler's :class:`~diffattn.processors.state.AttentionObserver`: records and times
    every sparsifiable self-attention call of the transformers it is attached to.

    Only the core op is timed: for a sparse call the layout lookup and the
    ``block_sparse_attention`` kernel; for a stock call its ``scaled_dot_product_attention``.
    Projections, norms and rotary embeddings are not attention time.

    Example:
        >>> import diffattn
        >>> from diffattn.adapters import sparsity_state
        >>> from diffattn.pipelines.embedded import load_embedded_pipeline
        >>> pipe = diffattn.apply(load_embedded_pipeline(), "radial", dense_steps=0, dense_layers=())
        >>> timer = AttentionTimer(torch.device("cpu"))
        >>> timer.attach([sparsity_state(pipe)])   # the SparsityStates of the applied pipeline
        >>> _ = pipe("a red circle moves left", num_frames=3, height=32, width=32, num_inference_steps=1)
        >>> calls = timer.finish()        # synchronises once, fills AttentionCall.seconds
        >>> timer.detach()
        >>> len(calls) > 0, all(call.seconds >= 0 for call in calls)
        (True, True)
    """

    def __init__(self, device: torch.device) -> None:
        self.clock = Clock(device)
        self.calls: list[AttentionCall] = []
        self._states: list[SparsityState] = []
        self._depth = 0  # nested calls (joint attention around attend) count once

    def attach(self, states: list[SparsityState]) -> None:
        for state in states:
            state.observer = self
            state.plan_log = []  # a dynamic pattern's plans, collected per call by sparse_call
        self._states = list(states)

    def detach(self) -> None:
        for state in self._states:
            state.observer = None
            state.plan_log = None
        self._states = []

    def reset(self) -> None:
        self.calls = []

    def _record(self, state: SparsityState, layer_index: int, sparse: bool, spans: list) -> None:
        # A FreeSwim state's config may hold a placeholder pattern (window=None): its layout_config has the window.
        config = getattr(state, "layout_config", state.config)
        self.calls.append(AttentionCall(state.step, layer_index, sparse, state.grid, config, spans))

    def sparse_call(self, state: SparsityState, layer_index: int, attention: Callable[[], T]) -> T:
        if self._depth:
            return attention()
        self._depth += 1
        if state.plan_log:  # plans of calls that fell back afterwards belong to no call
            state.plan_log.clear()
        try:
            mark = self.clock.start()
            out = attention()
            span = self.clock.stop(mark)
        finally:
            self._depth -= 1
        self._record(state, layer_index, True, [span])
        if state.plan_log:
            call = self.calls[-1]
            call.plan_seconds = sum(seconds for seconds, _ in state.plan_log)
            call.plan = [layout for _, layout in state.plan_log]  # summarised by finish()
            state.plan_log.clear()
        return out

    def dense_call(self, state: SparsityState, layer_index: int, stock: Callable[[], T]) -> T:
        spans: list = []
        with _TimeSDPA(self.clock, spans):
            out = stock()
        self._record(state, layer_index, False, spans)
        return out

    def finish(self) -> list[AttentionCall]:
        """Synchronise once and turn every call's spans into seconds; returns the calls."""
        self.clock.synchronize()
        for call in self.calls:
            call.seconds = sum(self.clock.seconds(span) for span in call.spans)
            if isinstance(call.plan, list):
                call.plan = summarise_plans(call.plan)
        return self.calls


def summarise_plans(layouts: list) -> dict[str, Any]:
    """What the profiler keeps of a call's plan(s) (joint attention may plan more than one part):
    mean ``density`` (effective, a level-p tile counting 1/p) and ``tile_density``, and
    ``level_tiles`` ``{level: tiles}`` summed (0 = skipped tiles).

    Example:
        >>> import torch
        >>> from diffattn.patterns.pyramid import levels_to_layout
        >>> summarise_plans([levels_to_layout(torch.tensor([[[1, 0], [2, 8]]]), 64, 32, 32)])
        {'density': 0.40625, 'tile_density': 0.75, 'level_tiles': {0: 1, 1: 1, 2: 1, 8: 1}}
    """
    level_tiles: dict[int, int] = {}
    for layout in layouts:
        total = layout.num_heads * layout.num_q_blocks * layout.num_k_blocks
        counts = layout.tiles_per_level
        level_tiles[0] = level_tiles.get(0, 0) + total - sum(counts.values())
        for level, count in counts.items():
            level_tiles[level] = level_tiles.get(level, 0) + count
    return dict(
        density=sum(layout.effective_tile_density for layout in layouts) / len(layouts),
        tile_density=sum(layout.tile_density for layout in layouts) / len(layouts),
        level_tiles=dict(sorted(level_tiles.items())),
    )
