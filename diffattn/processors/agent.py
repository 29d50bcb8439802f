"""Agent attention in pipelines: AgentSD for the Stable Diffusion UNets.

:class:`AgentSD` is a :class:`~diffattn.patterns.Pattern` value so that a
:class:`~diffattn.processors.SparsityConfig`, :func:`diffattn.apply` and YAML presets take it
like any pattern. It is not a block layout (agent attention is an op of its own,
:func:`diffattn.agent_attention`): asked for a layout it refuses, so a processor that does not
know it runs the stock attention with a :class:`~diffattn.errors.DenseFallbackWarning`.

* :class:`AgentSD`: the AgentSD algorithm (Han et al., "Agent Attention", reference code
  LeapLabTHU/Agent-Attention ``agentsd/``) for Stable Diffusion UNets. ToMe bipartite soft
  matching (the ``tomesd`` package's ``bipartite_soft_matching_random2d``, used as is) on the
  transformer block's input, one random destination per ``sy x sx`` cell, merges ``ratio`` of the
  tokens; a second merge of the same matching with ``agent_ratio`` gives the agent tokens,
  projected by the layer's ``to_q``. Agents are used only when ``(N - agent_r) * 2 < (N - r)``;
  otherwise the layer runs plain ToMe (softmax attention over the merged tokens). The output is
  unmerged back to the N tokens. The default schedule is the paper's.

Agents pooled over a video grid for the DiT families were measured and did not ship (12.6-15.1 dB
PSNR against dense on the embedded model, Radial 27.2 dB: benchmarks/results/agent-embedded-cpu-2026-12-07.md).
"""

from __future__ import annotations

import fnmatch
import weakref
from dataclasses import dataclass, fields, replace
from typing import Any, Callable, Mapping

import torch

from ..errors import UserError
from ..patterns import Pattern, VideoGrid
from ..patterns._checks import check_positive_int, is_finite_number

#: The AgentSD fields a per-step or per-layer override may change.
OVERRIDABLE = ("ratio", "agent_ratio", "sx", "sy", "max_downsample", "k_scale2", "shortcut", "use_rand")
#: The paper's schedule: from step 20 on, 2 x 2 cells and agent_ratio 0.5 (plain ToMe).
PAPER_STEPS: tuple[tuple[int, tuple[tuple[str, Any], ...]], ...] = (
    (20, (("agent_ratio", 0.5), ("sx", 2), ("sy", 2))),
)

_NOT_A_LAYOUT = ("is agent attention, not a block-sparse pattern: it runs only in processors that support it "
                 "(the UNet family)")


class _AgentPattern(Pattern):
    """A pattern that is an op, not a block layout: ``layout`` and ``token_mask`` refuse."""

    supports_permutation = False

    def video_factors(self, grid: VideoGrid) -> list[tuple[torch.Tensor, torch.Tensor]]:
        raise UserError(f"{type(self).__name__} {_NOT_A_LAYOUT}")

    def video_prefix_pair_counts(self, grid, order, q_prefix, k_prefix) -> torch.Tensor:
        raise UserError(f"{type(self).__name__} {_NOT_A_LAYOUT}")

    def validate_grid(self, grid: VideoGrid) -> None:
        raise UserError(f"{type(self).__name__} {_NOT_A_LAYOUT}")

    def pair_density(self, grid: VideoGrid, step: int | None = 0) -> float:
        """Score pairs the agent op computes on ``grid``'s tokens, as a fraction of ``N^2`` (what
        a layout's density is for the block-sparse patterns)."""
        raise NotImplementedError


def _check_open_unit(name: str, value: Any) -> float:
    if not (is_finite_number(value) and 0 < value < 1):
        raise UserError(f"{name} must be a number in the open interval (0, 1), got {value!r}")
    return float(value)


def _check_finite(name: str, value: Any) -> float:
    if not is_finite_number(value):
        raise UserError(f"{name} must be a finite real number, got {value!r}")
    return float(value)


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise UserError(f"{name} must be a bool, got {value!r} ({type(value).__name__})")
    return value


_FIELD_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "ratio": _check_open_unit,
    "agent_ratio": _check_open_unit,
    "sx": check_positive_int,
    "sy": check_positive_int,
    "max_downsample": check_positive_int,
    "k_scale2": _check_finite,
    "shortcut": _check_finite,
    "use_rand": _check_bool,
}


def _check_overrides(name: str, overrides: Any) -> tuple[tuple[str, Any], ...]:
    """One override mapping as sorted ``((field, checked value), ...)``."""
    if isinstance(overrides, Mapping):
        items = list(overrides.items())
    elif isinstance(overrides, (tuple, list)) and all(isinstance(i, (tuple, list)) and len(i) == 2 for i in overrides):
        items = [tuple(i) for i in overrides]
    else:
        raise UserError(f"{name} must be a mapping of AgentSD fields to values, got {overrides!r}")
    checked = []
    for field, value in items:
        if field not in OVERRIDABLE:
            raise UserError(f"{name} has unknown field {field!r}; allowed: {', '.join(OVERRIDABLE)}")
        checked.append((field, _FIELD_CHECKS[field](f"{name}.{field}", value)))
    return tuple(sorted(checked))


def _entries(name: str, value: Any) -> list[tuple[Any, Any]]:
    if isinstance(value, Mapping):
        return list(value.items())
    if isinstance(value, (tuple, list)) and all(isinstance(i, (tuple, list)) and len(i) == 2 for i in value):
        return [tuple(i) for i in value]
    raise UserError(f"{name} must be a mapping (or a tuple of (key, overrides) pairs), got {value!r}")


@dataclass(frozen=True)
class AgentSD(_AgentPattern):
    """AgentSD for Stable Diffusion UNets (``diffattn.apply(pipe, AgentSD())`` or the ``agent`` preset).

    Args:
        ratio: share of the tokens ToMe merges away, in (0, 1) (``r = int(N * ratio)``).
        agent_ratio: share merged away to make the agents, in (0, 1); the agent count is
            ``N - min(int(N * agent_ratio), N - cells)``, at least the number of ``sy x sx`` cells.
        sx, sy: the ToMe cell (one destination token per cell), in tokens.
        max_downsample: only layers whose token grid is downsampled at most this much from the
            latent grid run AgentSD (1: the highest resolution, as the paper); the others run the
            stock attention (by design, not a fallback).
        k_scale2, shortcut: the agent attention's second-score exponent and value shortcut (see
            :func:`diffattn.agent_attention`).
        use_rand: pick each cell's destination at random (ToMe's default; an odd batch, which
            cannot be a CFG pair, always uses the top-left token as ToMe does).
        seed: seed of the destination draws, re-seeded at every run's first step (deterministic
            runs); None forks the global torch RNG once, as the reference does.
        steps: per-step overrides ``{first_step: {field: value}}``, applied in step order to every
            step from ``first_step`` on (the step comes from the pipeline's scheduler). Default:
            the paper's ``{20: {sx: 2, sy: 2, agent_ratio: 0.5}}``.
        layers: per-layer overrides ``{layer: {field: value}}``; ``layer`` is a layer index or an
            ``fnmatch`` filter on the attention module name (``"up_blocks.3.*"``). Applied after
            the step overrides, so they win.

    Raises:
        UserError: a value outside what is allowed, naming the field.

    Example:
        >>> cfg = AgentSD()
        >>> cfg.settings(step=0).sx, cfg.settings(step=20).sx, cfg.settings(step=20).agent_ratio
        (4, 2, 0.5)
        >>> AgentSD(layers={"up_blocks.*": {"ratio": 0.3}}).settings(5, "up_blocks.3.attentions.0").ratio
        0.3
        >>> AgentSD(ratio=1.5)
        Traceback (most recent call last):
        diffattn.errors.UserError: AgentSD.ratio must be a number in the open interval (0, 1), got 1.5
    """

    ratio: float = 0.4
    agent_ratio: float = 0.95
    sx: int = 4
    sy: int = 4
    max_downsample: int = 1
    k_scale2: float = 0.3
    shortcut: float = 0.075
    use_rand: bool = True
    seed: int | None = 0
    steps: Any = PAPER_STEPS
    layers: Any = ()

    def __post_init__(self) -> None:
        for field in OVERRIDABLE:
            object.__setattr__(self, field, _FIELD_CHECKS[field](f"AgentSD.{field}", getattr(self, field)))
        if self.seed is not None:
            check_positive_int("AgentSD.seed", self.seed, allow_zero=True)
        steps = []
        for first, overrides in _entries("AgentSD.steps", self.steps):
            check_positive_int("AgentSD.steps key (first step)", first, allow_zero=True)
            steps.append((int(first), _check_overrides(f"AgentSD.steps[{first}]", overrides)))
        object.__setattr__(self, "steps", tuple(sorted(steps)))
        layers = []
        for key, overrides in _entries("AgentSD.layers", self.layers):
            if isinstance(key, bool) or not isinstance(key, (int, str)):
                raise UserError(f"AgentSD.layers keys must be layer indices (int) or name filters (str), got {key!r}")
            layers.append((key, _check_overrides(f"AgentSD.layers[{key!r}]", overrides)))
        object.__setattr__(self, "layers", tuple(layers))

    def settings(self, step: int | None = None, layer_name: str | None = None,
                 layer_index: int | None = None) -> "AgentSD":
        """The AgentSD values in force at ``step`` on one layer (overrides applied; None: unknown).

        Unknown step: only the base values and layer overrides apply.
        """
        changes: dict[str, Any] = {}
        if step is not None:
            for first, overrides in self.steps:
                if step >= first:
                    changes.update(overrides)
        for key, overrides in self.layers:
            hit = key == layer_index if isinstance(key, int) else (
                layer_name is not None and fnmatch.fnmatch(layer_name, key))
            if hit:
                changes.update(overrides)
        return replace(self, steps=(), layers=(), **changes) if changes or self.steps or self.layers else self

    def pair_density(self, grid: VideoGrid, step: int | None = 0) -> float:
        """On one UNet level ``grid`` at ``step``: ``2 M A / N^2`` with agents (M merged tokens, A
        agents), ``M^2 / N^2`` for plain ToMe, 1 when nothing is merged.

        Example:
            >>> grid = VideoGrid(1, 64, 64)       # 256 agents, 2458 merged tokens; then 2458 merged tokens
            >>> round(AgentSD().pair_density(grid), 4), round(AgentSD().pair_density(grid, step=20), 4)
            (0.075, 0.3601)
        """
        tokens = grid.height * grid.width
        counts = merge_counts(tokens, grid.height, grid.width, self.settings(step))
        if counts is None:
            return 1.0
        merged, agents = counts
        return round((2 * merged * agents if agents else merged * merged) / tokens**2, 12)


def run_agent_op(processor: Any, op: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Run an agent op of ``processor``'s layer as one sparse call (the profiler's observer times it)."""
    state = processor.state
    out = state.observe(processor.layer_index, op)
    if torch.compiler.is_compiling():
        processor.compiled_sparse = True
    else:
        state.sparse_calls[(state.step, processor.layer_index)] += 1
    return out


# -- AgentSD's token merging (tomesd) ---------------------------------------------------------


def _tomesd_matching() -> Callable[..., tuple[Callable, Callable]]:
    try:
        from tomesd.merge import bipartite_soft_matching_random2d
    except ImportError:
        raise UserError(
            "AgentSD needs the 'tomesd' package (its ToMe token matching): pip install 'diffattn[unet]' "
            "or pip install 'tomesd>=0.1.3'"
        ) from None
    return bipartite_soft_matching_random2d


@dataclass
class Merges:
    """One layer call's ToMe merging: ``merge``/``unmerge`` of ``[B, N, C]`` tensors and, when
    AgentSD uses agents, ``agent_merge`` (the same matching merging ``agent_r`` tokens)."""

    merge: Callable[[torch.Tensor], torch.Tensor]
    unmerge: Callable[[torch.Tensor], torch.Tensor]
    agent_merge: Callable[[torch.Tensor], torch.Tensor] | None
    merged_tokens: int
    num_agents: int


def merge_counts(tokens: int, height: int, width: int, settings: AgentSD) -> tuple[int, int] | None:
    """``(merged tokens M, agents A)`` of AgentSD on a ``height x width`` level (A = 0: plain
    ToMe), or None when nothing is merged. The reference's counts: ``r = int(N * ratio)`` and
    ``agent_r = int(N * agent_ratio)``, each at most the ``N - cells`` source tokens; agents only
    when ``(N - agent_r) * 2 < N - r``."""
    cells = (height // settings.sy) * (width // settings.sx)
    r = min(int(tokens * settings.ratio), tokens - cells)
    if cells == 0 or r <= 0:
        return None
    agent_r = min(int(tokens * settings.agent_ratio), tokens - cells)
    return tokens - r, (tokens - agent_r if (tokens - agent_r) * 2 < tokens - r else 0)


def tome_merges(metric: torch.Tensor, height: int, width: int, settings: AgentSD,
                generator: torch.Generator | None) -> Merges | None:
    """AgentSD's merges for one call whose tokens form a ``height x width`` raster grid.

    Args:
        metric: ``[B, N, C]``, the similarity metric (the transformer block's input).
        settings: the :meth:`AgentSD.settings` in force.
        generator: draws the cells' destinations (on ``metric``'s device); unused without
            ``use_rand`` or with an odd batch; None: each cell's top-left token.
    Returns:
        None when nothing is merged (``int(N * ratio) == 0``, or no whole ``sy x sx`` cell).
    """
    batch, tokens, _ = metric.shape
    counts = merge_counts(tokens, height, width, settings)
    if counts is None:
        return None
    merged, agents = counts
    r, agent_r = tokens - merged, tokens - agents
    no_rand = not settings.use_rand or batch % 2 == 1 or generator is None  # odd batch: no CFG pair (ToMe)
    matching = _tomesd_matching()
    draws = generator.get_state() if generator is not None and not no_rand else None
    merge, unmerge = matching(metric, width, height, settings.sx, settings.sy, r, no_rand=no_rand,
                              generator=generator)
    agent_merge = None
    if agents:
        if draws is not None:  # the same destinations: the second merge shares the first's matching
            generator.set_state(draws)
        agent_merge, _ = matching(metric, width, height, settings.sx, settings.sy, agent_r, no_rand=no_rand,
                                  generator=generator)
    return Merges(merge, unmerge, agent_merge, merged, agents)


class AgentRuntime:
    """The destination-drawing generator shared by one installation's layers.

    Re-seeded with ``AgentSD.seed`` at the first call and whenever a run starts again (step 0 after
    another step); with ``seed=None`` forked once from the global RNG (the reference's behaviour).
    """

    def __init__(self) -> None:
        self.generator: torch.Generator | None = None
        self._last_step: int | None = None

    def generator_for(self, device: torch.device, seed: int | None, step: int | None) -> torch.Generator:
        new_run = step == 0 and self._last_step not in (None, 0)
        self._last_step = step
        if self.generator is None or self.generator.device != device or (new_run and seed is not None):
            if seed is None:
                self.generator = torch.Generator(device=device)
                self.generator.set_state(torch.get_rng_state() if device.type == "cpu"
                                         else torch.cuda.get_rng_state(device))
            else:
                self.generator = torch.Generator(device=device).manual_seed(seed)
        return self.generator


_RUNTIMES: "weakref.WeakKeyDictionary[Any, AgentRuntime]" = weakref.WeakKeyDictionary()


def runtime_for(state: Any) -> AgentRuntime:
    """The :class:`AgentRuntime` of one installation (its :class:`SparsityState`)."""
    runtime = _RUNTIMES.get(state)
    if runtime is None:
        runtime = _RUNTIMES[state] = AgentRuntime()
    return runtime


def level_grid(latent: VideoGrid, tokens: int) -> tuple[int, VideoGrid] | None:
    """``(downsample, grid)`` of a UNet layer with ``tokens`` tokens, from the latent grid: the
    factor ``d`` with ``ceil(H/d) * ceil(W/d) == tokens`` (a UNet halves each axis per level,
    rounding up), or None when no power of two fits.

    Example:
        >>> level_grid(VideoGrid(1, 64, 48), 16 * 12)
        (4, VideoGrid(frames=1, height=16, width=12, text_tokens=0, text_position='end'))
    """
    downsample = 1
    while downsample <= max(latent.height, latent.width):
        height, width = -(-latent.height // downsample), -(-latent.width // downsample)
        if height * width == tokens:
            return downsample, VideoGrid(1, height, width)
        if height * width < tokens:
            return None
        downsample *= 2
    return None


AGENT_PATTERN_KEYS: dict[str, tuple[type[Pattern], tuple[str, ...]]] = {
    "agent": (AgentSD, tuple(f.name for f in fields(AgentSD))),
}


__all__ = [
    "AGENT_PATTERN_KEYS", "AgentRuntime", "AgentSD", "Merges", "level_grid", "run_agent_op", "runtime_for",
    "tome_merges",
]
