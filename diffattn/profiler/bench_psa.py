"""Pyramid Sparse Attention numbers (issue 25 item 5): kernel speed, planning cost, importance
estimates and fidelity on the embedded model. ``scripts/bench_psa.py`` is the thin wrapper.

Parts, each written to ``<out>-<part>.json`` and ``.md``:

* ``kernel``: at N = 16,384 (16x32x32, 4 heads x 64, fp32, the CPU path's target shape of
  :mod:`diffattn.profiler.bench_kernels`): dense SDPA, the PSA plan and the PSA block-sparse call
  (``backend="cpu"``) for each share setting; the achieved speedup against its ideal ``1 /
  effective tile density`` (a level-p tile counting 1/p), and planning time as a share of the call.
* ``estimate``: the embedded model's real queries and keys (recorded during a dense-equivalent
  PSA run): how much of the true attention mass per (query block, key block) the blocks chosen by
  each importance estimate (``"mean"``, ``"sampled-max"``) capture, against the oracle choice.
* ``fidelity``: ``diffattn.profile`` on the embedded model with the same seeds, PSNR/SSIM against
  dense for the ``psa`` preset and for Radial at the nearest effective density (same schedule).
* ``matched``: the same with PSA's shares raised to Radial's density on that grid.
* ``small``: at the embedded model's size (N = 2,112, batch 2, 4 heads x 32, q/k/v laid out as the
  processors pass them): dense SDPA against plan + PSA call (a fresh plan every call, as in a
  pipeline), alone and next to a busy neighbour process (``--compete``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .._io import atomic_path
from ..kernels import block_sparse_attention
from ..patterns import PyramidSparse, Radial, VideoGrid
from ..patterns.pyramid import block_importance
from ..processors.config import SparsityConfig

DATE = "2026-12-07"
#: The share settings benchmarked: the issue's default (the ``psa`` preset) and ``psa-fast``'s.
SETTINGS = {
    "psa (default)": PyramidSparse(),
    "psa-fast": PyramidSparse(levels={1: 0.05, 2: 0.05, 4: 0.05, 8: 0.10}, min_full=0.04),
}
#: The embedded model's call for the estimate and fidelity parts (the size of the committed
#: ``profile-cpu-embedded-radial`` run: 33 frames = 33x8x8 = 2,112 tokens).
EMBEDDED_CALL = dict(prompt="a red circle moves left", num_frames=33, height=64, width=64, num_inference_steps=25)
#: Radial decays tried to match PSA's effective density.
RADIAL_DECAYS = (1.0, 0.75, 0.5, 0.35, 0.25, 0.15)


# ------------------------------------------------------------------------------------ kernel
def kernel_rows(grid: VideoGrid = VideoGrid(16, 32, 32), heads: int = 4, head_dim: int = 64,
                repeats: int = 3, block_size: int = 128, threads: tuple[int, ...] = (2,)) -> list[dict[str, Any]]:
    """One row per torch thread count and share setting: dense SDPA, plan and sparse-call seconds
    (medians, all with that many threads), speedups (medians of per-repeat ratios), and the
    machine's load average.

    Example:
        >>> rows = kernel_rows(VideoGrid(2, 8, 8), heads=1, head_dim=16, repeats=1, block_size=32)
        >>> sorted(rows[0])[:4], rows[0]["ideal_speedup"] > 1
        (['achieved_over_ideal', 'block_size', 'dense_sdpa_s', 'effective_tile_density'], True)
    """
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, grid.num_tokens, head_dim, generator=gen) for _ in range(3))
    rows = []
    saved = torch.get_num_threads()
    try:
        for count in threads:
            torch.set_num_threads(count)
            rows += _kernel_rows_now(grid, q, k, v, repeats, block_size)
    finally:
        torch.set_num_threads(saved)
    return rows


def _kernel_rows_now(grid: VideoGrid, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, repeats: int,
                     block_size: int) -> list[dict[str, Any]]:
    """Dense, plan and sparse timed in turn in every repeat (the machine's load drifts: ratios of
    neighbouring measurements are steadier than ratios of separate medians)."""
    rows = []
    heads, head_dim = q.shape[1], q.shape[3]

    def dense() -> Any:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    with torch.no_grad():
        for name, pattern in SETTINGS.items():
            layout = pattern.plan(q, k, grid, block_size=block_size)
            steps = {"dense": dense, "plan": lambda: pattern.plan(q, k, grid, block_size=block_size),
                     "sparse": lambda: block_sparse_attention(q, k, v, layout, backend="cpu")}
            times: dict[str, list[float]] = {key: [] for key in steps}
            for step in steps.values():
                step()  # warm-up
            for _ in range(repeats):
                for key, step in steps.items():
                    start = time.perf_counter()
                    step()
                    times[key].append(time.perf_counter() - start)
            median = {key: statistics.median(values) for key, values in times.items()}
            ratio = statistics.median(d / s for d, s in zip(times["dense"], times["sparse"]))
            plan_share = statistics.median(p / s for p, s in zip(times["plan"], times["sparse"]))
            ideal = 1.0 / layout.effective_tile_density
            rows.append(dict(
                setting=name, threads=torch.get_num_threads(), load_average=round(os.getloadavg()[0], 1),
                pattern=repr(pattern), tokens=grid.num_tokens, heads=heads, head_dim=head_dim,
                block_size=block_size, tiles_per_level=layout.tiles_per_level,
                effective_tile_density=layout.effective_tile_density, tile_density=layout.tile_density,
                dense_sdpa_s=median["dense"], plan_s=median["plan"], sparse_s=median["sparse"], speedup=ratio,
                speedup_with_plan=statistics.median(
                    d / (s + p) for d, s, p in zip(times["dense"], times["sparse"], times["plan"])),
                ideal_speedup=ideal, achieved_over_ideal=ratio / ideal, plan_share=plan_share,
            ))
    return rows


# ------------------------------------------------------------------------------------ small calls
#: The busy neighbour of ``small_rows(compete=True)``: dense SDPA on two threads until killed.
_NEIGHBOUR = ("import torch; torch.set_num_threads(2); a = torch.randn(2, 4, 2112, 32)\n"
              "while True: torch.nn.functional.scaled_dot_product_attention(a, a, a)")


def small_rows(grid: VideoGrid = VideoGrid(33, 8, 8), batch: int = 2, heads: int = 4, head_dim: int = 32,
               block_sizes: tuple[int, ...] = (64, 128), threads: tuple[int, ...] = (1, 2), repeats: int = 15,
               compete: bool = False) -> list[dict[str, Any]]:
    """One row per thread count and block size: dense SDPA, the plan alone and plan + PSA call
    (``psa`` shares, a new plan each call as in a pipeline) in milliseconds (medians, timed in
    turn), and dense / (plan + call). ``compete`` runs :data:`_NEIGHBOUR` in another process meanwhile.

    Example:
        >>> rows = small_rows(VideoGrid(2, 8, 8), batch=1, heads=1, head_dim=16, block_sizes=(32,),
        ...                   threads=(1,), repeats=1)
        >>> rows[0]["psa_ms"] > 0, rows[0]["competing_process"]
        (True, False)
    """
    gen = torch.Generator().manual_seed(0)
    # [B, N, H, D] transposed to [B, H, N, D]: the strided views the processors hand the kernel.
    q, k, v = (torch.randn(batch, grid.num_tokens, heads, head_dim, generator=gen).transpose(1, 2)
               for _ in range(3))
    pattern = SETTINGS["psa (default)"]
    neighbour = subprocess.Popen([sys.executable, "-c", _NEIGHBOUR]) if compete else None
    saved = torch.get_num_threads()
    rows = []
    try:
        for count in threads:
            torch.set_num_threads(count)
            for block in block_sizes:
                steps = {
                    "dense": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v),
                    "plan": lambda: pattern.plan(q, k, grid, block_size=block),
                    "psa": lambda: block_sparse_attention(q, k, v, pattern.plan(q, k, grid, block_size=block),
                                                          backend="cpu"),
                }
                times = _timed_in_turn(steps, repeats)
                rows.append(dict(
                    threads=count, competing_process=compete, load_average=round(os.getloadavg()[0], 1),
                    tokens=grid.num_tokens, batch=batch, heads=heads, head_dim=head_dim, block_size=block,
                    dense_sdpa_ms=1e3 * statistics.median(times["dense"]),
                    plan_ms=1e3 * statistics.median(times["plan"]),
                    psa_ms=1e3 * statistics.median(times["psa"]),
                    speedup=statistics.median(d / s for d, s in zip(times["dense"], times["psa"])),
                ))
    finally:
        torch.set_num_threads(saved)
        if neighbour is not None:
            neighbour.kill()
            neighbour.wait()
    return rows


def _timed_in_turn(steps: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
    """Seconds of each step per repeat, the steps timed one after the other (after a warm-up)."""
    times: dict[str, list[float]] = {key: [] for key in steps}
    with torch.no_grad():
        for step in steps.values():
            step()
        for _ in range(repeats):
            for key, step in steps.items():
                start = time.perf_counter()
                step()
                times[key].append(time.perf_counter() - start)
    return times


# ------------------------------------------------------------------------------------ estimates
@dataclass(frozen=True)
class _RecordingPyramid(PyramidSparse):
    """A PyramidSparse that keeps the q and k of every ``keep_every``-th plan (module list)."""

    keep_every: int = 1

    def plan(self, q: torch.Tensor, k: torch.Tensor, grid: VideoGrid, block_size: int = 128, **kwargs: Any):
        _RECORDED_CALLS[0] += 1
        if _RECORDED_CALLS[0] % self.keep_every == 0:
            _RECORDED.append((q.detach().clone(), k.detach().clone()))
        return super().plan(q, k, grid, block_size, **kwargs)


_RECORDED: list[tuple[torch.Tensor, torch.Tensor]] = []
_RECORDED_CALLS = [0]


def record_embedded_qk(keep_every: int = 10, call: dict | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The embedded model's self-attention q and k (``[B, H, N, D]``, kernel inputs after norms and
    rotary embedding) of every ``keep_every``-th call of a run whose plans visit every block at
    level 1 (the run equals dense attention)."""
    from ..adapters import apply, remove
    from ..pipelines.embedded import load_embedded_pipeline

    pipe = load_embedded_pipeline()
    pipe.set_progress_bar_config(disable=True)
    _RECORDED.clear()
    _RECORDED_CALLS[0] = 0
    pattern = _RecordingPyramid(levels={1: 1.0}, min_full=0, keep_every=keep_every)
    apply(pipe, SparsityConfig(pattern=pattern, block_size=128))
    try:
        pipe(**(call or EMBEDDED_CALL), generator=torch.Generator().manual_seed(0), output_type="np")
    finally:
        remove(pipe)
    recorded = list(_RECORDED)
    _RECORDED.clear()
    return recorded


def true_block_mass(q: torch.Tensor, k: torch.Tensor, block: int) -> torch.Tensor:
    """float64 ``[H, Mq, Mk]``: per query block, the mean over its queries (and the batch) of the
    attention probability each key block receives (rows sum to 1)."""
    b, h, n, d = q.shape
    probs = (q.double() @ k.double().transpose(-1, -2) * d**-0.5).softmax(-1)
    blocks = -(-n // block)
    pad = blocks * block - n
    probs = torch.nn.functional.pad(probs, (0, pad, 0, pad))
    per_key_block = probs.view(b, h, blocks * block, blocks, block).sum(-1)
    counts = torch.full((blocks,), float(block), dtype=torch.float64)
    counts[-1] = n - (blocks - 1) * block
    per_tile = per_key_block.view(b, h, blocks, block, blocks).sum(3) / counts[:, None]
    return per_tile.mean(0)


def selection_scores(estimate: torch.Tensor, truth: torch.Tensor, share: float) -> dict[str, float]:
    """For each row, the ``ceil(share * Mk)`` top blocks by ``estimate``: the true mass they hold
    over the mass of the true top blocks (``mass_ratio``), and the overlap with them (``recall``).

    Example:
        >>> truth = torch.tensor([[[0.6, 0.3, 0.1]]], dtype=torch.float64)
        >>> selection_scores(torch.tensor([[[0.2, 0.5, 0.3]]]), truth, 0.3)
        {'mass_ratio': 0.5, 'recall': 0.0}
    """
    count = max(1, math.ceil(share * truth.shape[-1] - 1e-9))
    chosen = estimate.topk(count, dim=-1).indices
    best = truth.topk(count, dim=-1).indices
    captured = truth.gather(-1, chosen).sum(-1)
    oracle = truth.gather(-1, best).sum(-1)
    overlap = (chosen[..., :, None] == best[..., None, :]).any(-1).double().mean(-1)
    return dict(mass_ratio=float((captured / oracle).mean()), recall=float(overlap.mean()))


def estimate_rows(recorded: list[tuple[torch.Tensor, torch.Tensor]], block_sizes=(64, 128),
                  shares=(0.10, 0.35)) -> list[dict[str, Any]]:
    """Mean :func:`selection_scores` over the recorded calls, per block size, share and estimate."""
    rows = []
    for block in block_sizes:
        truths = [true_block_mass(q, k, block) for q, k in recorded]
        for estimate in ("mean", "sampled-max"):
            seconds = []
            scores: dict[float, list[dict[str, float]]] = {share: [] for share in shares}
            for (q, k), truth in zip(recorded, truths):
                start = time.perf_counter()
                guess = block_importance(q, k, block, block, estimate)
                seconds.append(time.perf_counter() - start)
                for share in shares:
                    scores[share].append(selection_scores(guess, truth, share))
            for share in shares:
                rows.append(dict(
                    block_size=block, estimate=estimate, share=share, calls=len(recorded),
                    key_blocks=truths[0].shape[-1],
                    mass_ratio=statistics.mean(s["mass_ratio"] for s in scores[share]),
                    recall=statistics.mean(s["recall"] for s in scores[share]),
                    estimate_ms=1e3 * statistics.median(seconds),
                ))
    return rows


# ------------------------------------------------------------------------------------ fidelity
def matching_radial(grid: VideoGrid, density: float, block_size: int = 128) -> tuple[Radial, float]:
    """The Radial (decay from :data:`RADIAL_DECAYS`) whose layout density is nearest ``density``."""
    candidates = [(Radial(decay=decay), Radial(decay=decay).layout(grid, block_size=block_size).density)
                  for decay in RADIAL_DECAYS]
    return min(candidates, key=lambda item: abs(item[1] - density))


def fidelity_rows(seeds=(0, 1), dense_steps: int = 6, call: dict | None = None,
                  log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """``diffattn.profile`` rows for the ``psa`` preset and the Radial of the nearest effective
    density, same seeds and schedule (``dense_steps`` warm-up steps, first block dense)."""
    from ..pipelines.embedded import latent_grid, load_embedded_pipeline
    from ..processors.presets import load_preset
    from .runner import profile

    call = dict(call or EMBEDDED_CALL)
    pipe = load_embedded_pipeline()
    grid = latent_grid(call["num_frames"], call["height"], call["width"])
    psa = load_preset("psa", family="wan").config.with_overrides(dense_steps=dense_steps)
    rows = []
    radial = None
    for seed in seeds:
        report = profile(pipe, psa, seed=seed, warmup=0, **call)
        rows.append(_fidelity_row("psa", report, seed))
        log(f"psa seed {seed}: PSNR {report.psnr:.2f} dB, SSIM {report.ssim:.4f}, "
            f"effective density {report.layout_density:.3f}")
        if radial is None:  # matched once, to the first run's mean effective density of the sparse calls
            pattern, _ = matching_radial(grid, report.layout_density, psa.block_size)
            radial = psa.with_overrides(pattern=pattern)
        report = profile(pipe, radial, seed=seed, warmup=0, **call)
        rows.append(_fidelity_row(f"radial (decay {radial.pattern.decay:g})", report, seed))
        log(f"radial seed {seed}: PSNR {report.psnr:.2f} dB, SSIM {report.ssim:.4f}, "
            f"density {report.layout_density:.3f}")
    return rows


#: PSA shares whose effective density at 17 key blocks (33x8x8 tokens, block 128) is Radial's 0.227
#: there: 3 full, 1 at level 2, 3 at level 8 -> (3 + 1/2 + 3/8) / 17 = 0.228. Radial cannot come down
#: to PSA's default 0.17 on that grid (two frames per block: its density is 0.227 for every decay).
MATCHED_TO_RADIAL = PyramidSparse(levels={1: 0.17, 2: 0.06, 8: 0.17})


def matched_rows(seeds=(0, 1), dense_steps: int = 6, call: dict | None = None,
                 log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """:func:`fidelity_rows`' comparison the other way round: PSA with shares raised to Radial's
    density (:data:`MATCHED_TO_RADIAL`), same seeds and schedule."""
    from ..pipelines.embedded import load_embedded_pipeline
    from ..processors.presets import load_preset
    from .runner import profile

    pipe = load_embedded_pipeline()
    config = load_preset("psa", family="wan").config.with_overrides(dense_steps=dense_steps,
                                                                    pattern=MATCHED_TO_RADIAL)
    rows = []
    for seed in seeds:
        report = profile(pipe, config, seed=seed, warmup=0, **(call or EMBEDDED_CALL))
        rows.append(_fidelity_row("psa, shares {1: 0.17, 2: 0.06, 8: 0.17}", report, seed))
        log(f"matched psa seed {seed}: PSNR {report.psnr:.2f} dB, SSIM {report.ssim:.4f}, "
            f"effective density {report.layout_density:.3f}")
    return rows


def _fidelity_row(name: str, report: Any, seed: int) -> dict[str, Any]:
    return dict(
        preset=name, seed=seed, pattern=report.pattern, dense_steps=report.dense_steps, grid=report.grid,
        effective_density=report.layout_density, tile_density=report.tile_density, psnr=report.psnr,
        ssim=report.ssim, attention_speedup=report.attention_speedup, e2e_speedup=report.e2e_speedup,
        level_shares=report.level_shares, plan_share=report.plan_share,
    )


# ------------------------------------------------------------------------------------ output
def _table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> list[str]:
    lines = ["| " + " | ".join(title for title, _, _ in columns) + " |",
             "| " + " | ".join("---" for _ in columns) + " |"]
    for row in rows:
        lines.append("| " + " | ".join(format(row[key], spec) if spec else str(row[key])
                                       for _, key, spec in columns) + " |")
    return lines


MARKDOWN_COLUMNS: dict[str, list[tuple[str, str, str]]] = {
    "kernel": [("threads", "threads", ""), ("load avg", "load_average", ""), ("setting", "setting", ""),
               ("tiles per level", "tiles_per_level", ""),
               ("effective density", "effective_tile_density", ".4f"), ("dense SDPA s", "dense_sdpa_s", ".3f"),
               ("PSA call s", "sparse_s", ".3f"), ("plan s", "plan_s", ".4f"), ("speedup", "speedup", ".2f"),
               ("ideal", "ideal_speedup", ".2f"), ("achieved / ideal", "achieved_over_ideal", ".2f"),
               ("with plan", "speedup_with_plan", ".2f"), ("plan / call", "plan_share", ".3f")],
    "small": [("threads", "threads", ""), ("neighbour", "competing_process", ""), ("load avg", "load_average", ""),
              ("block", "block_size", ""), ("dense SDPA ms", "dense_sdpa_ms", ".1f"), ("plan ms", "plan_ms", ".2f"),
              ("plan + PSA call ms", "psa_ms", ".1f"), ("speedup", "speedup", ".2f")],
    "estimate": [("block", "block_size", ""), ("estimate", "estimate", ""), ("share", "share", ".2f"),
                 ("key blocks", "key_blocks", ""), ("true mass / oracle", "mass_ratio", ".4f"),
                 ("recall of true top", "recall", ".4f"), ("estimate ms", "estimate_ms", ".1f")],
    "matched": [("preset", "preset", ""), ("seed", "seed", ""), ("effective density", "effective_density", ".3f"),
                ("PSNR dB", "psnr", ".2f"), ("SSIM", "ssim", ".4f"),
                ("attention speedup", "attention_speedup", ".2f")],
    "fidelity": [("preset", "preset", ""), ("seed", "seed", ""), ("effective density", "effective_density", ".3f"),
                 ("PSNR dB", "psnr", ".2f"), ("SSIM", "ssim", ".4f"),
                 ("attention speedup", "attention_speedup", ".2f")],
}


def write(part: str, rows: list[dict[str, Any]], out: str, seconds: float, notes: str) -> list[Path]:
    """``<out>-<part>-cpu-<DATE>.json`` and ``.md`` (``small-compete`` is laid out as ``small``)."""
    base = Path(f"{out}-{part}-cpu-{DATE}")
    meta = dict(part=part, date=DATE, device="cpu", torch_threads=torch.get_num_threads(),
                wall_seconds=round(seconds, 1), notes=notes)
    with atomic_path(base.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps(dict(meta=meta, rows=rows), indent=2, default=str) + "\n")
    lines = [f"**PSA {part}, cpu, {DATE}** ({torch.get_num_threads()} threads, {seconds:.0f} s)", "", notes, "",
             *_table(rows, MARKDOWN_COLUMNS[part.removesuffix("-compete")])]
    with atomic_path(base.with_suffix(".md")) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return [base.with_suffix(".json"), base.with_suffix(".md")]


NOTES = {
    "kernel": ("Random q, k, v (fp32, B=1, 4 heads x 64), N=16,384 (16x32x32), block 128. Dense, plan and PSA "
               "call timed in turn each repeat; times are medians, ratios medians of per-repeat ratios. "
               "speedup = dense SDPA / PSA block-sparse call (backend cpu, the plan given); "
               "ideal = 1 / effective tile density (a level-p "
               "tile counts 1/p); 'with plan' adds the planning time; plan / call = planning time over the call. Each "
               "thread count times everything with that many torch threads. The development machine (2 cores) is "
               "shared: 'load avg' is its 1-minute load when the row was measured; above 2, threads wait for "
               "cores. The planner always runs with one thread (PyramidSparse.plan; with two it took 460 ms "
               "instead of 17 ms at load 5)."),
    "small": ("Random q, k, v (fp32) at the embedded model's call size: N=2,112 (33x8x8), batch 2 (guidance), "
              "4 heads x 32, laid out [B, N, H, D] and transposed as the processors pass them; psa shares. "
              "Dense SDPA, plan alone, and plan + PSA call (backend cpu; a fresh plan each call, as in a pipeline) "
              "timed in turn; medians. speedup = median of per-repeat dense / (plan + call). 'neighbour': another "
              "process ran dense SDPA on two threads meanwhile (the shared 2-core machine's usual state)."),
    "estimate": ("The embedded model's self-attention q and k (every 10th call of a 33-frame 64x64, 25-step run, "
                 "2,112 tokens, 4 heads x 32). For each query block the top ceil(share x key blocks) blocks by each "
                 "estimate; 'true mass / oracle': the exact attention mass they hold over that of the exact top "
                 "blocks; recall: overlap with the exact top blocks. 'mean' = softmax of block-mean logits (the "
                 "default); 'sampled-max' = the reference's max-of-sampled estimate with a fixed sample (every 4th "
                 "token)."),
    "fidelity": ("diffattn.profile on the embedded model (33 frames 64x64, 25 steps, guidance 7): PSNR/SSIM of "
                 "each preset's video against the dense run with the same seed. Same schedule for both: first 6 "
                 "steps and block 0 dense, block 128. Radial's decay chosen so its density is nearest PSA's "
                 "measured effective density (a level-p tile counting 1/p)."),
    "matched": ("As psa-fidelity, with PSA's shares raised to Radial's density on this grid (Radial is 0.227 for "
                "every decay at 33x8x8 tokens and block 128: two frames per block); same seeds and schedule."),
}


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="kernel,estimate,fidelity",
                        help="comma-separated: kernel, small, estimate, fidelity, matched "
                             "(default: kernel, estimate, fidelity)")
    parser.add_argument("--out", default="benchmarks/results/psa", help="path prefix of the result files")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of the kernel part (median)")
    parser.add_argument("--seeds", default="0,1", help="seeds of the fidelity part")
    parser.add_argument("--compete", action="store_true", help="small part: time next to a busy neighbour process")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    for part in [p.strip() for p in args.parts.split(",") if p.strip()]:
        start = time.perf_counter()
        if part == "kernel":
            rows = kernel_rows(repeats=args.repeats, threads=(1, 2))
        elif part == "small":
            rows = small_rows(compete=args.compete)
        elif part == "estimate":
            rows = estimate_rows(record_embedded_qk())
        elif part == "fidelity":
            rows = fidelity_rows(seeds=tuple(int(s) for s in args.seeds.split(",")))
        elif part == "matched":
            rows = matched_rows(seeds=tuple(int(s) for s in args.seeds.split(",")))
        else:
            parser.error(f"--parts: unknown part {part!r}; allowed: kernel, small, estimate, fidelity, matched")
        name = "small-compete" if part == "small" and args.compete else part
        paths = write(name, rows, args.out, time.perf_counter() - start, NOTES[part])
        print(*[str(p) for p in paths], sep="\n")
    return 0
