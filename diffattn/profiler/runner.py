"""``diffattn.profile``: run a pipeline dense and with a preset, same seed, and compare."""

from __future__ import annotations

import math
import os
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass, replace
from typing import Any, Callable

import numpy as np
import torch

from ..adapters import apply, find_adapter, remove
from ..adapters.base import INSTALLED_ATTRIBUTE, ModelAdapter
from ..errors import UserError
from ..patterns import Pattern
from ..processors.config import SparsityConfig
from ..processors.presets import load_preset, preset_layout
from .metrics import amdahl_bound, as_unit_float, predicted_speedup, psnr, ssim
from .report import ProfileReport
from .timing import AttentionCall, AttentionTimer, Clock

#: Call arguments the profiler sets itself (the same for both runs by construction).
RESERVED_ARGUMENTS = ("generator", "output_type", "return_dict")


@dataclass
class _Run:
    seconds: float
    calls: list[AttentionCall]
    frames: np.ndarray | None
    fallbacks: dict[str, int]

    @property
    def attention_seconds(self) -> float:
        return sum(call.seconds for call in self.calls)


def _check_count(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")
    return value


def resolve_preset(preset: Any, family: str) -> tuple[str, SparsityConfig]:
    """``(name, config)`` for anything :func:`diffattn.apply` accepts: a preset name of ``family``,
    a YAML path, a :class:`SparsityConfig` or a bare pattern (the objects are named ``"custom"``)."""
    if isinstance(preset, SparsityConfig):
        return "custom", preset
    if isinstance(preset, Pattern):
        return "custom", SparsityConfig(pattern=preset)
    if isinstance(preset, (str, os.PathLike)):
        loaded = load_preset(preset, family=family)
        return loaded.name, loaded.config
    raise ValueError(
        f"preset must be a preset name, a YAML path, a SparsityConfig or a Pattern; got {type(preset).__name__}"
    )


def _execution_device(pipe: Any) -> torch.device:
    # Under model CPU offload the modules sit on the CPU between calls; diffusers knows where they run.
    device = getattr(pipe, "_execution_device", None) or getattr(pipe, "device", None)
    return torch.device(device) if device is not None else torch.device("cpu")


def _frames(output: Any) -> np.ndarray:
    """The first video (or the images) of a pipeline output, as float ``[F, H, W, C]`` in [0, 1]."""
    frames = output.frames[0] if hasattr(output, "frames") else output.images
    if isinstance(frames, list):
        frames = np.stack([np.asarray(frame) for frame in frames])
    return as_unit_float(frames, "pipeline output")


def _states(adapter: ModelAdapter, pipe: Any) -> list:
    return [
        getattr(t, INSTALLED_ATTRIBUTE).state for _, t in adapter.transformers(pipe) if hasattr(t, INSTALLED_ATTRIBUTE)
    ]


def _run_once(pipe: Any, adapter: ModelAdapter, config: SparsityConfig, timer: AttentionTimer, seed: int,
              call_kwargs: dict, keep_frames: bool) -> _Run:
    apply(pipe, config)
    timer.reset()
    states = _states(adapter, pipe)
    timer.attach(states)
    clock = timer.clock
    try:
        generator = torch.Generator(device="cpu").manual_seed(seed)
        clock.synchronize()  # nothing queued before the run is billed to it
        mark = clock.start()
        output = pipe(**call_kwargs, generator=generator, output_type="np")
        span = clock.stop(mark)
        calls = timer.finish()  # the one synchronisation of the run
        seconds = clock.seconds(span)
        fallbacks = dict(sum((state.fallbacks for state in states), Counter()))
    finally:
        timer.detach()
    return _Run(seconds, calls, _frames(output) if keep_frames else None, fallbacks)


def profile(
    pipe: Any,
    preset: str | os.PathLike | SparsityConfig | Pattern,
    *,
    seed: int = 0,
    warmup: int = 1,
    repeats: int = 1,
    log: Callable[[str], None] | None = None,
    **call_kwargs: Any,
) -> ProfileReport:
    """Run ``pipe(**call_kwargs)`` dense and with ``preset``, with the same seed, and compare.

    The dense baseline is what a user runs without diffattn: every self-attention call through the
    stock diffusers processor (diffattn's processors are installed with every layer kept dense, so
    the same timing hook sees the calls); the other run applies ``preset``. Both go through
    :func:`diffattn.apply`. Every run gets a fresh CPU
    ``torch.Generator`` seeded with ``seed`` and ``output_type="np"``. ``warmup`` untimed rounds
    (a dense and a preset run each) come first, then ``repeats`` timed rounds; the report holds
    medians. Wall time uses CUDA events and one synchronisation on a GPU, ``time.perf_counter`` on
    the CPU; attention time is the core attention op of the sparsifiable self-attention layers
    (see :class:`ProfileReport` for every field). Afterwards the pipeline's processors are
    restored: stock, or the configuration that was applied before the call.

    Args:
        pipe: a diffusers pipeline of a supported family.
        preset: a preset name of the pipeline's family, a YAML path, a :class:`SparsityConfig` or a
            pattern.
        seed: seed of every run's generator.
        warmup: untimed rounds first (>= 0; the first run builds layouts and warms caches).
        repeats: timed rounds (>= 1).
        log: called with a line per run (None: quiet).
        **call_kwargs: the pipeline call (prompt or prompt_embeds, num_frames, height, width,
            num_inference_steps, guidance_scale, ...); not generator, output_type or return_dict.

    Example:
        >>> import diffattn, math
        >>> from diffattn.pipelines.embedded import load_embedded_pipeline
        >>> pipe = load_embedded_pipeline()   # the shipped offline model; any supported pipeline works
        >>> tiny = dict(prompt="a red circle moves left", num_frames=3, height=32, width=32, num_inference_steps=2)
        >>> report = diffattn.profile(pipe, "radial", seed=1, warmup=0, **tiny)
        >>> report.e2e_speedup > 0, report.amdahl_bound >= 1, report.psnr > 20   # 3 frames: Radial is dense
        (True, True, True)
    """
    _check_count("warmup", warmup, 0)
    _check_count("repeats", repeats, 1)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer; got {seed!r}")
    reserved = sorted(set(call_kwargs) & set(RESERVED_ARGUMENTS))
    if reserved:
        raise ValueError(f"profile sets {', '.join(RESERVED_ARGUMENTS)} itself (use seed=); got {', '.join(reserved)}")
    adapter = find_adapter(pipe)
    if adapter.family in ("sd", "sdxl"):  # densities come from the latent grid, a UNet has one per level
        raise UserError(f"diffattn.profile does not cover the {adapter.family} (UNet) family yet: its layers run at "
                        "several resolutions and AgentSD is not a layout; use scripts/bench_agent.py --part unet")
    name, config = resolve_preset(preset, adapter.family)
    # Every layer kept dense: the stock processor (PyTorch SDPA) runs every call, as without diffattn.
    dense_config = replace(load_preset("dense", family=adapter.family).config, dense_layers=("*",))
    previous = _states(adapter, pipe)
    previous_config = previous[0].config if previous else None
    timer = AttentionTimer(_execution_device(pipe))
    # The runs' progress bars would interleave with the log; they are restored afterwards.
    saved_bar = getattr(pipe, "_progress_bar_config", None)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)

    runs: dict[str, list[_Run]] = {"dense": [], "sparse": []}
    try:
        for round_index in range(warmup + repeats):
            timed = round_index >= warmup
            for kind, kind_config in (("dense", dense_config), ("sparse", config)):
                run = _run_once(pipe, adapter, kind_config, timer, seed, call_kwargs,
                                keep_frames=timed and not runs[kind])
                if log is not None:
                    what = (f"timed {round_index - warmup + 1}/{repeats}" if timed
                            else f"warm-up {round_index + 1}/{warmup}")
                    label = "dense baseline" if kind == "dense" else f"preset {name}"
                    log(f"{label} run ({what}): {run.seconds:.3f} s, attention {run.attention_seconds:.3f} s")
                if timed:
                    runs[kind].append(run)
    finally:
        remove(pipe)
        if previous_config is not None:
            apply(pipe, previous_config)
        if hasattr(pipe, "set_progress_bar_config"):
            if saved_bar is None:
                vars(pipe).pop("_progress_bar_config", None)
            else:
                pipe._progress_bar_config = saved_bar
    return _build_report(pipe, adapter.family, name, config, seed, warmup, repeats, timer.clock, runs)


def _layout_densities(calls: list[AttentionCall]) -> tuple[list[tuple[float, float]], int | None]:
    """``(density, tile density)`` per call (1 for calls kept dense, the layout's for sparse ones),
    and the bytes the distinct layouts of the sparse calls hold (None without sparse calls)."""
    cache: dict[tuple[int, Any], tuple[float, float]] = {}
    nbytes = 0
    result = []
    for call in calls:
        if not call.sparse or call.grid is None:
            result.append((1.0, 1.0))
            continue
        if call.plan is not None:  # a dynamic pattern: this call's own plan (not cached)
            result.append((call.plan["density"], call.plan["tile_density"]))
            continue
        key = (id(call.config), call.grid)
        if key not in cache:
            layout = preset_layout(call.config, call.grid)
            cache[key] = (float(layout.density), float(layout.tile_density))
            nbytes += layout.nbytes
        result.append(cache[key])
    return result, (nbytes if cache else None)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _ratio(numerator: float, denominator: float) -> float:
    if denominator > 0:
        return numerator / denominator
    return math.inf if numerator > 0 else math.nan


def _build_report(pipe: Any, family: str, name: str, config: SparsityConfig, seed: int, warmup: int, repeats: int,
                  clock: Clock, runs: dict[str, list[_Run]]) -> ProfileReport:
    dense_runs, sparse_runs = runs["dense"], runs["sparse"]
    median = statistics.median
    dense_seconds = median(r.seconds for r in dense_runs)
    sparse_seconds = median(r.seconds for r in sparse_runs)
    dense_attention = median(r.attention_seconds for r in dense_runs)
    sparse_attention = median(r.attention_seconds for r in sparse_runs)
    share = min(max(_ratio(dense_attention, dense_seconds), 0.0), 1.0) if dense_seconds > 0 else 0.0
    attention_speedup = _ratio(dense_attention, sparse_attention)

    # Density of the preset run (every timed run makes the same calls; the first is representative).
    calls = sparse_runs[0].calls
    densities, layout_nbytes = _layout_densities(calls)
    per_layer: dict[int, list[float]] = defaultdict(list)
    for call, (density, _) in zip(calls, densities):
        per_layer[call.layer].append(density)
    sparse_pairs = [pair for call, pair in zip(calls, densities) if call.sparse]
    overall = _mean([d for d, _ in densities])

    # Amdahl: weight each (step, layer) by the time the DENSE run spent there, and give it the
    # density the preset run ran it at (1 for calls kept dense).
    dense_time: dict[tuple, float] = defaultdict(float)
    for run in dense_runs:
        for call in run.calls:
            dense_time[(call.step, call.layer)] += call.seconds
    preset_calls: dict[tuple, list[tuple[bool, float]]] = defaultdict(list)
    for call, (density, _) in zip(calls, densities):
        preset_calls[(call.step, call.layer)].append((call.sparse, density))
    total = sum(dense_time.values())
    dense_part = sparse_part = sparse_weighted = 0.0
    for key, seconds in dense_time.items():
        entries = preset_calls.get(key) or [(False, 1.0)]
        sparse_entries = [d for sparse, d in entries if sparse]
        sparse_share = len(sparse_entries) / len(entries)
        dense_part += seconds * (1 - sparse_share)
        sparse_part += seconds * sparse_share
        if sparse_entries:
            sparse_weighted += seconds * sparse_share * (sum(sparse_entries) / len(sparse_entries))
    if total > 0:
        dense_fraction = dense_part / total
        weighted_density = sparse_weighted / sparse_part if sparse_part > 0 else 1.0
    else:  # no attention time measured: fall back to call counts
        dense_fraction = (len(calls) - len(sparse_pairs)) / len(calls) if calls else 1.0
        weighted_density = _mean([d for d, _ in sparse_pairs]) or 1.0
    bound = amdahl_bound(share, min(weighted_density, 1.0), min(max(dense_fraction, 0.0), 1.0))
    if math.isnan(attention_speedup):
        predicted = math.nan
    elif math.isinf(attention_speedup):
        predicted = math.inf if share >= 1.0 else 1.0 / (1.0 - share)
    else:
        predicted = predicted_speedup(share, attention_speedup)

    dense_frames, sparse_frames = dense_runs[0].frames, sparse_runs[0].frames
    frame_count, height, width = (sparse_frames.shape[-4], sparse_frames.shape[-3], sparse_frames.shape[-2]) \
        if sparse_frames.ndim >= 4 else (1, sparse_frames.shape[0], sparse_frames.shape[1])
    grid = next((call.grid for call in calls if call.grid is not None), None)
    scheduler = getattr(pipe, "scheduler", None)
    timesteps = getattr(scheduler, "timesteps", None)
    guidance = getattr(pipe, "_guidance_scale", None)
    transformer = find_adapter(pipe).transformers(pipe)[0][1]

    notes = []
    untimed = sum(1 for run in dense_runs + sparse_runs for call in run.calls if not call.timed) // len(dense_runs)
    if untimed:
        notes.append(f"{untimed} stock attention calls per round ran a diffusers attention backend other than "
                     "scaled_dot_product_attention: their core op was not timed, attention times are too low")
    # Baseline and kept-dense calls both run the stock processor: a large gap between them is noise.
    kept_dense = {(call.step, call.layer) for call in calls if not call.sparse}
    baseline = sum(c.seconds for run in dense_runs for c in run.calls if (c.step, c.layer) in kept_dense)
    stock = sum(c.seconds for run in sparse_runs for c in run.calls if not c.sparse)
    if baseline > 0 and stock > 0 and abs(baseline / stock - 1) > 0.25:
        notes.append(f"the calls kept dense took {stock / baseline:.2f}x their baseline time although both run the "
                     "stock processor: the timings are noisy (use more --repeats or a quieter machine)")
    if len(dense_runs[0].calls) != len(calls):
        notes.append(f"the dense run made {len(dense_runs[0].calls)} attention calls but the preset run {len(calls)}")
    if sparse_pairs and max(d for d, _ in sparse_pairs) >= 1.0 and name != "dense":
        notes.append("the preset's layout is dense at this size (density 1): use more frames or a larger size")
    if not calls:
        notes.append("no sparsifiable self-attention call ran: attention figures are empty")

    plans = _plan_summary(sparse_runs, calls)
    return ProfileReport(
        preset=name, family=family, pattern=repr(config.pattern), dense_steps=config.dense_steps,
        dense_last_steps=config.dense_last_steps, dense_layers=list(config.dense_layers), block_size=config.block_size,
        device=str(clock.device), dtype=str(getattr(transformer, "dtype", "")).removeprefix("torch."),
        num_frames=int(frame_count), height=int(height), width=int(width),
        num_inference_steps=int(len(timesteps)) if timesteps is not None else None,
        guidance_scale=float(guidance) if isinstance(guidance, (int, float)) else None,
        seed=seed, warmup=warmup, repeats=repeats,
        grid=None if grid is None else dict(frames=grid.frames, height=grid.height, width=grid.width,
                                            text_tokens=grid.text_tokens, num_tokens=grid.num_tokens),
        e2e_speedup=_ratio(dense_seconds, sparse_seconds), attention_share=share,
        attention_speedup=attention_speedup, predicted_e2e=predicted, amdahl_bound=bound,
        density=overall if overall is not None else 1.0,
        density_per_layer={layer: sum(v) / len(v) for layer, v in sorted(per_layer.items())},
        layout_density=_mean([d for d, _ in sparse_pairs]), tile_density=_mean([t for _, t in sparse_pairs]),
        layout_nbytes=layout_nbytes,
        dense_fraction=dense_fraction, attention_calls=len(calls), sparse_calls=len(sparse_pairs),
        dense_calls=len(calls) - len(sparse_pairs),
        psnr=psnr(dense_frames, sparse_frames), ssim=ssim(dense_frames, sparse_frames),
        dense_seconds=dense_seconds, sparse_seconds=sparse_seconds,
        dense_attention_seconds=dense_attention, sparse_attention_seconds=sparse_attention,
        timings=dict(dense_seconds=[r.seconds for r in dense_runs], sparse_seconds=[r.seconds for r in sparse_runs],
                     dense_attention_seconds=[r.attention_seconds for r in dense_runs],
                     sparse_attention_seconds=[r.attention_seconds for r in sparse_runs]),
        untimed_calls=untimed, fallbacks=sparse_runs[0].fallbacks, notes=notes, **plans,
    )


def _plan_summary(sparse_runs: list[_Run], calls: list[AttentionCall]) -> dict[str, Any]:
    """A dynamic pattern's report fields: ``level_shares`` (tiles per level over all planned
    calls, 0 = skipped), ``plan_seconds`` (median planning time per run) and ``plan_share`` (of
    the sparse calls' attention time); empty for static patterns."""
    planned = [call.plan for call in calls if call.plan is not None]
    if not planned:
        return {}
    tiles: Counter = Counter()
    for plan in planned:
        tiles.update(plan["level_tiles"])
    total = sum(tiles.values())
    plan_seconds = statistics.median(sum(call.plan_seconds for call in run.calls) for run in sparse_runs)
    sparse_seconds = statistics.median(sum(c.seconds for c in run.calls if c.sparse) for run in sparse_runs)
    return dict(level_shares={level: count / total for level, count in sorted(tiles.items())},
                plan_seconds=plan_seconds, plan_share=_ratio(plan_seconds, sparse_seconds))
