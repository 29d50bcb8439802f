"""Per-transformer state that a forward pre-hook publishes and the processors read.

Wan, HunyuanVideo, LTX-Video and Mochi never pass ``attention_kwargs`` to their processors, so
the current denoising step and the latent grid reach the processors through this object: a plain
PyTorch forward pre-hook on the transformer (which keeps firing under ``enable_model_cpu_offload``)
writes them before every transformer call.

``torch.compile(transformer)`` traces the transformer's forward, not its hooks, so the work is
split in two:

* eager (the hooks, ``torch.compiler.disable``): :meth:`SparsityState.begin_call` reads the
  scheduler and publishes plain values (the grid, whether this step is a dense warm-up or last
  step, the pattern's layout for the grid, or why the pattern refuses it);
  :meth:`SparsityState.end_call` books what a compiled forward noted (its sparse calls, its
  fallbacks: counts, one :class:`~diffattn.errors.DenseFallbackWarning` per reason, or the
  ``on_unsupported="raise"`` error, raised after that forward). The profiler's observer calls and
  layouts of grids nobody published (joint attention's video part) also stay eager.
* traced (:meth:`SparsityState.dense_now`, :meth:`SparsityState.attend`, :meth:`SparsityState.fall_back`,
  :meth:`SparsityState.run_dense` without an observer): only reads the published values and calls
  :func:`~diffattn.kernels.block_sparse_attention`, a custom op. Nothing traced reads the step
  index or a counter, so a compiled transformer has one graph per kind of step (dense, sparse)
  and grid, shared by all its layers, with no graph break at the sparse call.
"""

from __future__ import annotations

import time
import warnings
from collections import Counter
from typing import Any, Callable, Iterable, Protocol, TypeVar

import torch

from ..errors import DenseFallbackWarning, UserError
from ..kernels import block_sparse_attention, support_problems
from ..patterns import VideoGrid
from .config import SparsityConfig

T = TypeVar("T")


class AttentionObserver(Protocol):
    """A profiling hook on :attr:`SparsityState.observer` (installed by :mod:`diffattn.profiler`).

    It sees every *sparsifiable* self-attention call of the transformer: the ones that run sparse,
    the ones that the schedule keeps dense (dense warm-up/last steps, dense layers) and the ones
    that fall back to the stock attention, and runs them itself so that it can time their core
    attention op. Cross-attention calls never reach it. Calls may nest (joint attention reports its whole sparse
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
        >>> from diffattn import Dense
        >>> state = SparsityState(SparsityConfig(pattern=Dense()))
        >>> state.observer = Count()
        >>> state.run_dense(0, lambda: "stock output"), state.observer.calls
        ('stock output', 1)
    """

    def sparse_call(self, state: "SparsityState", layer_index: int, attention: Callable[[], T]) -> T:
        """Run ``attention()``, exactly the sparse core op (layout lookup and kernel), and return its result."""
        ...

    def dense_call(self, state: "SparsityState", layer_index: int, stock: Callable[[], T]) -> T:
        """Run ``stock()``, the whole stock processor call (projections included), and return its result."""
        ...


class SparseUnsupported(Exception):
    """Raised by :meth:`SparsityState.attend` when this call cannot run sparse (the pattern refuses
    the grid, the kernel refuses the inputs); the processor catches it and runs the stock attention.

    Attributes:
        reason: one short line saying why (the key of :attr:`SparsityState.fallbacks`).
    """

    # No __init__ of its own: torch.compile traces raising and catching it only that way.
    @property
    def reason(self) -> str:
        return str(self.args[0])


class SparsityState:
    """What the processors of one transformer share: config, current step, current grid.

    Attributes:
        config: the :class:`SparsityConfig` in force.
        scheduler: the pipeline's scheduler (for the step index and the number of steps), or None.
        grid: the latent token grid of the current transformer call.
        step: index of the current denoising step, or None when unknown (then sparse, as after
            warm-up).
        num_steps: steps in the current run, or None when unknown.
        scheduled_dense: whether the schedule keeps the whole current call dense (a dense warm-up
            or last step; set by :meth:`begin_call`).
        sparse_calls: ``Counter[(step, layer_index)]`` of calls that ran the sparse kernel.
        fallbacks: ``Counter[reason]`` of sparsifiable self-attention calls that ran the stock
            attention because they could not run sparse (see :meth:`fall_back`). Calls kept dense
            by the schedule (dense steps and layers) and cross-attention calls are not fallbacks.
        label: who this state belongs to, for warnings and errors (e.g. ``"wan transformer"``).
        no_grid_reason: why the current transformer call published no grid (the pre-hook sets it).
        observer: an :class:`AttentionObserver` (the profiler's timing hook), or None. With None
            the processors pay one attribute check per call and nothing else.
    """

    def __init__(self, config: SparsityConfig, scheduler: Any = None, label: str = "transformer") -> None:
        self.config = config
        self.scheduler = scheduler
        self.label = label
        self.grid: VideoGrid | None = None
        self.no_grid_reason: str | None = None
        self.step: int | None = None
        self.num_steps: int | None = None
        self.sparse_calls: Counter[tuple[int | None, int]] = Counter()
        self.fallbacks: Counter[str] = Counter()
        self.dense_layer_indices: frozenset[int] = frozenset()
        self.observer: AttentionObserver | None = None
        self.scheduled_dense = False
        self._warned: set[str] = set()
        self._layout_grid: VideoGrid | None = None
        self._layout: Any = None
        self._layout_problem: str | None = None
        self._compiled_sparse_layers: list[int] = []
        #: ``(seconds, layout)`` of every plan of a dynamic pattern while a profiler keeps a list here.
        self.plan_log: list[tuple[float, Any]] | None = None
        self._compiled_fallbacks: list[str] = []

    # -- host side, eager under torch.compile (the transformer's hooks call these) -------------

    @torch.compiler.disable
    def begin_call(self, grid: VideoGrid | None, timestep: torch.Tensor | float | None,
                   no_grid_reason: str | None = None, device: torch.device | str | None = None) -> None:
        """Called by the pre-hook before each transformer forward (``grid`` None: this call has no
        token grid, ``no_grid_reason`` says why).

        Everything that depends on the step or the grid is worked out here, eagerly: the step,
        whether the schedule keeps this call dense (:attr:`scheduled_dense`), and the pattern's
        layout for the grid on ``device`` (or why the pattern refuses the grid). The processors
        only read these plain values, so a compiled transformer is traced once per kind of step
        (dense or sparse) and grid, never per step index.
        """
        self.grid = grid
        self.no_grid_reason = no_grid_reason if grid is None else None
        self.step, self.num_steps = _current_step(self.scheduler, timestep)
        self.scheduled_dense = self._dense_step()
        self._layout_grid, self._layout, self._layout_problem = None, None, None
        if grid is not None and not self.scheduled_dense:
            self._layout_grid = grid
            self._layout, self._layout_problem = self._layout_for(grid, device)
        # In place: compiled code appends to these very lists.
        self._compiled_sparse_layers.clear()
        self._compiled_fallbacks.clear()

    @torch.compiler.disable
    def end_call(self, sparse_layers: Iterable[int] = (), fallbacks: Iterable[str] = ()) -> None:
        """Called by the post-hook after each transformer forward: books what a compiled forward
        noted instead of booking it itself, as an eager forward books it while running.

        Args:
            sparse_layers: the layers whose self-attention ran the sparse kernel (each one call).
            fallbacks: the reasons of the calls that ran the stock attention (each one call),
                besides those :meth:`fall_back` noted here: counts, one warning per reason, or
                the ``on_unsupported="raise"`` error.

        Example:
            >>> from diffattn import Dense
            >>> state = SparsityState(SparsityConfig(pattern=Dense()))
            >>> state.end_call(sparse_layers=[0, 1])
            >>> state.sparse_calls
            Counter({(None, 0): 1, (None, 1): 1})
        """
        noted, noted_sparse = list(self._compiled_fallbacks), list(self._compiled_sparse_layers)
        self._compiled_fallbacks.clear()
        self._compiled_sparse_layers.clear()
        for layer_index in [*noted_sparse, *sparse_layers]:
            self.sparse_calls[(self.step, layer_index)] += 1
        for reason in [*noted, *fallbacks]:
            self._record_fallback(reason, 1)

    def _dense_step(self) -> bool:
        """Whether the current step is a dense warm-up or last step."""
        cfg = self.config
        if self.step is None:
            return False
        if self.step < cfg.dense_steps:
            return True
        last = self.num_steps - cfg.dense_last_steps if self.num_steps is not None else None
        return bool(cfg.dense_last_steps) and last is not None and self.step >= last

    @torch.compiler.disable
    def _layout_for(self, grid: VideoGrid, device: torch.device | str | None) -> tuple[Any, str | None]:
        """``(layout, None)``, or ``(None, why the pattern refuses the grid)``."""
        cfg = self.config
        if getattr(cfg.pattern, "dynamic", False):
            return None, None  # planned per call in attend()
        try:
            layout = cfg.pattern.layout(grid, block_size=cfg.block_size, tile_shape=cfg.tile_shape,
                                        device=device if device is not None else "cpu")
        except UserError as error:
            return None, f"the pattern does not fit the grid: {error}"
        return layout, None

    @torch.compiler.disable
    def _plan(self, q: torch.Tensor, k: torch.Tensor, grid: VideoGrid) -> Any:
        """A dynamic pattern's layout for this call (``[B, H, N, D]`` q and k); appended with its
        planning seconds to :attr:`plan_log` when a profiler set one."""
        cfg = self.config
        start = time.perf_counter()
        try:
            layout = cfg.pattern.plan(q, k, grid, block_size=cfg.block_size, tile_shape=cfg.tile_shape)
        except UserError as error:
            raise SparseUnsupported(f"the pattern does not fit the call: {error}") from None
        if self.plan_log is not None:
            if q.is_cuda:
                torch.cuda.synchronize(q.device)
            self.plan_log.append((time.perf_counter() - start, layout))
        return layout

    @torch.compiler.disable
    def _record_fallback(self, reason: str, calls: int) -> None:
        self.fallbacks[reason] += calls
        if self.config.on_unsupported == "raise":
            raise UserError(
                f"diffattn: a self-attention call of the {self.label} cannot run sparse: {reason} "
                "(SparsityConfig(on_unsupported='raise'); use on_unsupported='warn' to run such calls dense)"
            )
        if reason not in self._warned:
            self._warned.add(reason)
            warnings.warn(
                f"diffattn: self-attention calls of the {self.label} run the stock dense attention: {reason} "
                "(shown once per reason; SparsityState.fallbacks counts them)",
                DenseFallbackWarning, stacklevel=4,
            )

    # -- traced under torch.compile: reads only the values begin_call published ---------------

    def dense_now(self, layer_index: int) -> bool:
        """Whether the schedule keeps layer ``layer_index`` dense in the current call (a dense
        layer, a dense warm-up or last step). Such a call is not a fallback: no warning."""
        # Emptiness first: a transformer compiled block by block then never guards on layer_index.
        return self.scheduled_dense or (bool(self.dense_layer_indices) and layer_index in self.dense_layer_indices)

    def fall_back(self, reason: str, calls: int = 1) -> None:
        """Record that ``calls`` sparsifiable calls run the stock attention because of ``reason``.

        Issues one :class:`DenseFallbackWarning` per reason for this state (this installed
        transformer); with ``SparsityConfig(on_unsupported="raise")`` raises :class:`UserError`
        naming the reason instead. Under ``torch.compile`` the compiled code only notes the
        reason, and :meth:`end_call` (after the forward) counts, warns or raises.

        Example:
            >>> from diffattn import Dense
            >>> state = SparsityState(SparsityConfig(pattern=Dense()), label="wan transformer")
            >>> import warnings
            >>> with warnings.catch_warnings(record=True):
            ...     warnings.simplefilter("always")
            ...     state.fall_back("head dim 512")
            ...     state.fall_back("head dim 512")
            >>> state.fallbacks
            Counter({'head dim 512': 2})
        """
        if torch.compiler.is_compiling():  # the processors note their own (see end_call)
            self._compiled_fallbacks.extend([reason] * calls)
            return
        self._record_fallback(reason, calls)

    def attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        layer_index: int,
        *,
        grid: VideoGrid | None = None,
        return_lse: bool = False,
        processor: Any = None,
        heads: tuple[int, int] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Sparse attention for ``[B, N, H, D]`` tensors (diffusers' layout).

        The kernel runs here and nowhere else. Before it runs, every reason it could not is
        checked: the pattern refusing the grid, the kernel refusing the inputs
        (:func:`~diffattn.kernels.support_problems`); then :class:`SparseUnsupported` is raised
        (nothing computed yet) and the processor runs the stock attention.

        Args:
            grid: the token grid of this sequence (default: the grid the pre-hook published).
            return_lse: also return the log-sum-exp ``[B, N, H]`` (float32) for merging.
            processor: the :class:`~diffattn.processors.base.SparseAttnProcessor` calling, if
                any: under ``torch.compile`` the call is noted on it (see :meth:`end_call`).
            heads: ``(start, stop)``: the tensors hold only these heads of the model (a rank's heads
                under Ulysses context parallelism), so a per-head layout is cut to them.
        """
        grid = self.grid if grid is None else grid
        if grid is None:
            raise SparseUnsupported("no token grid was published for this call")
        if query.shape[1] != grid.num_tokens:
            raise SparseUnsupported(
                f"the self-attention sequence has {query.shape[1]} tokens but the latent grid "
                f"{grid.frames}x{grid.height}x{grid.width} + {grid.text_tokens} text has {grid.num_tokens}"
            )
        if grid is self._layout_grid:
            layout, problem = self._layout, self._layout_problem
        else:  # a grid begin_call did not publish (joint attention's video part): eager
            layout, problem = self._layout_for(grid, query.device)
        if problem is not None:
            raise SparseUnsupported(problem)
        if layout is None:  # a dynamic pattern (PSA): planned from this call's q and k, timed with the kernel
            return self.observe(layer_index, lambda: self._attend(query, key, value, layer_index, grid, None,
                                                                  return_lse, processor, heads))
        return self._attend(query, key, value, layer_index, grid, layout, return_lse, processor, heads)

    def _attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layer_index: int,
                grid: VideoGrid, layout: Any, return_lse: bool, processor: Any,
                heads: tuple[int, int] | None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        if layout is None:
            layout = self._plan(q, k, grid)  # the tensors hold only this rank's heads: no select_heads
        elif heads is not None:
            layout = layout.select_heads(*heads)
        problems = support_problems(q, k, v, layout, cfg.backend)
        if problems:
            raise SparseUnsupported("; ".join(problems))

        if self.observer is None:
            result = block_sparse_attention(q, k, v, layout, backend=cfg.backend, return_lse=return_lse)
        else:
            result = self._observed_kernel(layer_index, q, k, v, layout, return_lse)
        # Compiled, counting would guard the graph on the step and the count (a recompile per
        # call): the call is noted instead and end_call counts it. On the processor, not in a list
        # here: a list would grow within a forward, and a transformer compiled block by block
        # (compile_repeated_blocks) would be guarded on its length, one graph per layer.
        if not torch.compiler.is_compiling():
            self.sparse_calls[(self.step, layer_index)] += 1
        elif processor is not None:
            processor.compiled_sparse = True
        else:
            self._compiled_sparse_layers.append(layer_index)
        if return_lse:
            out, lse = result
            return out.transpose(1, 2), lse.transpose(1, 2)
        return result.transpose(1, 2)

    @torch.compiler.disable
    def _observed_kernel(self, layer_index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Any,
                         return_lse: bool) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The kernel call as one call of the observer (eager: the profiler times it)."""

        def attention() -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
            return block_sparse_attention(q, k, v, layout, backend=self.config.backend, return_lse=return_lse)

        return self.observer.sparse_call(self, layer_index, attention)

    @torch.compiler.disable
    def observe(self, layer_index: int, attention: Callable[[], T]) -> T:
        """Run ``attention()``, a sparse core op built around :meth:`attend` (joint attention's
        merged video/text parts), as one call of the observer (``attention()`` alone without one).

        Example:
            >>> from diffattn import Dense
            >>> state = SparsityState(SparsityConfig(pattern=Dense()))
            >>> state.observe(0, lambda: "merged output")   # no observer: just the call
            'merged output'
        """
        if self.observer is None:
            return attention()
        return self.observer.sparse_call(self, layer_index, attention)

    def run_dense(self, layer_index: int, dense: Callable[[], T]) -> T:
        """``dense()``: a sparsifiable call that runs the stock attention (kept dense by the schedule,
        or a fallback), reported to the observer when one is attached."""
        if self.observer is None:
            return dense()
        return self._observed_dense(layer_index, dense)

    @torch.compiler.disable
    def _observed_dense(self, layer_index: int, dense: Callable[[], T]) -> T:
        return self.observer.dense_call(self, layer_index, dense)


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
