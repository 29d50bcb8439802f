"""Kernel benchmark: block-sparse attention vs dense SDPA, FlexAttention and our own dense kernel.

For every shape and pattern (Dense, Radial, Neighborhood raster, Neighborhood tile-major) it times
``diffattn.kernels.block_sparse_attention`` with the backend :func:`kernel_backend` names for the
device (Triton on CUDA, the PyTorch CPU path on CPU), forward and forward+backward, and reports

* effective TFLOP/s = 4 * B * H * D * allowed pairs / time (allowed pairs = density * N^2;
  forward+backward counts 3.5x the forward FLOPs, the flash-attention convention),
* speedup vs the best dense ``scaled_dot_product_attention`` backend (math / efficient / flash /
  cudnn on CUDA, the default on CPU),
* speedup vs ``torch.compile``d FlexAttention with the same mask (a BlockMask built from the
  layout; compile time excluded; no backward on CPU),
* speedup vs our own dense kernel (the Dense layout through the same backend),
* ratio to ideal = speedup vs SDPA / (1 / tile_density): tile density is what a block-sparse
  kernel pays for (``layout.tile_density``), ``1 / density`` is listed too.

Methods are timed in interleaved rounds (one run of each per round, after warm-up; CUDA events
with synchronisation on GPU, ``perf_counter`` on CPU): times are medians, speedups are medians of
the per-round ratios, so a machine whose load drifts still gives paired comparisons. Results go to
``<out>/<device-name>-<YYYY-MM-DD>.json`` and ``.md``.

    diffattn bench --device cpu --shapes small       (= python scripts/bench_kernels.py ...)
    diffattn bench --device cuda --shapes reference

Example:
    >>> shape = SMALL_SHAPES[0]
    >>> [name for name, _, _ in patterns_for(shape)][:2], kernel_backend(torch.device("cpu"))
    (['Dense', 'Radial'], 'cpu')
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from .._io import atomic_write_text
from ..errors import UserError
from ..kernels import block_sparse_attention
from ..kernels.backends import resolve_backend
from ..patterns import BlockLayout, Dense, Neighborhood, Pattern, Radial, VideoGrid


@dataclass(frozen=True)
class Shape:
    """One benchmarked attention problem: a token grid, heads x head_dim, batch, and the
    Neighborhood window that suits the grid."""

    name: str
    grid: VideoGrid
    heads: int
    head_dim: int
    neighborhood: tuple[int, int, int]  # Neighborhood kernel_size for this grid
    batch: int = 1


# DESIGN.md reference shapes (batch 1).
REFERENCE_SHAPES = [
    Shape("Wan2.1-1.3B 480p 81f", VideoGrid(21, 30, 52), 12, 128, (3, 9, 9)),
    Shape("Wan2.1-14B 720p 81f", VideoGrid(21, 45, 80), 40, 128, (3, 9, 9)),
    Shape("HunyuanVideo 720p 129f", VideoGrid(33, 45, 80, text_tokens=256), 24, 128, (3, 9, 9)),
    Shape("CogVideoX-5B 480p 49f", VideoGrid(13, 30, 45, text_tokens=226, text_position="start"), 48, 64, (3, 9, 9)),
]
# CPU-sized shapes; the last one is the CPU path's performance target (N = 16,384, 4 heads x 64).
SMALL_SHAPES = [
    Shape("small 8x16x16", VideoGrid(8, 16, 16), 4, 64, (3, 7, 7)),
    Shape("small 8x16x32 + 77 text, D=128", VideoGrid(8, 16, 32, text_tokens=77), 2, 128, (3, 7, 11)),
    Shape("target 16x32x32 (N=16384)", VideoGrid(16, 32, 32), 4, 64, (3, 11, 11)),
    # Same N, long and small-framed, so that Radial's all-full-tile layout has density ~0.11.
    Shape("target 128x8x16 (N=16384)", VideoGrid(128, 8, 16), 4, 64, (5, 5, 9)),
]
BLOCK = 128
TILE = (1, 8, 16)  # tile-major permutation: 128 tokens per tile
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Skip SDPA's math backend when its [B, H, N, N] score tensor would exceed this many bytes.
MATH_SDPA_MAX_BYTES = 8 << 30


def kernel_backend(device: torch.device) -> str:
    """The ``block_sparse_attention`` backend the benchmark times on ``device``: the one
    ``backend="auto"`` picks there (:data:`diffattn.kernels.backends.AUTO_RULE`), as a user gets it.

    Example:
        >>> kernel_backend(torch.device("cuda", 0))
        'triton'
    """
    backend, problems = resolve_backend("auto", device)
    if backend is None:
        raise UserError(f"--device {device.type!r} has no benchmarked kernel: {'; '.join(problems)}")
    return backend


def patterns_for(shape: Shape) -> list[tuple[str, Pattern, tuple[int, int, int] | None]]:
    kt, kh, kw = shape.neighborhood
    return [
        ("Dense", Dense(), None),
        ("Radial", Radial(decay=1.0, block_size=BLOCK), None),
        (f"Neighborhood {shape.neighborhood}", Neighborhood(kernel_size=(kt, kh, kw)), None),
        (f"Neighborhood {shape.neighborhood} tile {TILE}", Neighborhood(kernel_size=(kt, kh, kw)), TILE),
    ]


# ------------------------------------------------------------------------------------- timing
class Timer:
    """Interleaved timing of several methods: one run of each per round, after warm-up.

    Machines running other work (shared CI runners, a laptop) drift by seconds; timing each method
    in its own block would compare methods measured at different load. Round-robin rounds give
    paired samples, and speedups are the median of the per-round ratios.
    """

    def __init__(self, device: torch.device, warmup: int, repeats: int) -> None:
        self.device, self.warmup, self.repeats = device, warmup, repeats

    def once(self, fn: Callable[[], object]) -> float:
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    def rounds(self, fns: dict[str, Callable[[], object]]) -> dict[str, list[float]]:
        """Seconds per round for every method; a method that fails (e.g. OOM) is dropped."""
        alive = dict(fns)
        for name, fn in list(alive.items()):
            try:
                for _ in range(self.warmup):
                    fn()
            except Exception as exc:  # a backend that does not support the shape or runs out of memory
                print(f"      {name} skipped: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}", flush=True)
                del alive[name]
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
        times: dict[str, list[float]] = {name: [] for name in alive}
        for _ in range(self.repeats):
            for name, fn in alive.items():
                times[name].append(self.once(fn))
        return times


def inference(fn: Callable[[], object]) -> Callable[[], object]:
    """Forward timings run without autograd (nothing saved for a backward), for every method."""

    def run() -> object:
        with torch.no_grad():
            return fn()

    return run


def fwd_bwd(fn: Callable[..., torch.Tensor], q, k, v, grad) -> Callable[[], None]:
    def run() -> None:
        for x in (q, k, v):
            x.grad = None
        fn(q, k, v).backward(grad)

    return run


def paired_speedup(base: list[float] | None, ours: list[float] | None) -> float | None:
    """Median over rounds of base_time / our_time (None if either is missing)."""
    if not base or not ours:
        return None
    return statistics.median(b / o for b, o in zip(base, ours))


# ------------------------------------------------------------------------------------- baselines
def sdpa_backends(device: torch.device, shape: Shape) -> list[tuple[str, object]]:
    """(name, SDPBackend or None for the default) pairs worth trying on this device."""
    if device.type != "cuda":
        return [("default", None)]
    from torch.nn.attention import SDPBackend

    n = shape.grid.num_tokens
    names = [("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION)]
    if hasattr(SDPBackend, "CUDNN_ATTENTION"):
        names.append(("cudnn", SDPBackend.CUDNN_ATTENTION))
    if shape.batch * shape.heads * n * n * 4 <= MATH_SDPA_MAX_BYTES:
        names.append(("math", SDPBackend.MATH))
    return names


def sdpa_call(backend: object) -> Callable[..., torch.Tensor]:
    def call(q, k, v):
        if backend is None:
            return F.scaled_dot_product_attention(q, k, v)
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v)

    return call


def best_sdpa(timer: Timer, device, shape, q, k, v, grad, backward: bool) -> dict[str, tuple[str, Callable]]:
    """The fastest dense SDPA backend for forward and for forward+backward (a short pre-pass)."""
    backends = sdpa_backends(device, shape)
    if len(backends) == 1:
        name, backend = backends[0]
        return {"fwd": (name, sdpa_call(backend)), "fwd_bwd": (name, sdpa_call(backend))}
    best: dict[str, tuple[str, Callable]] = {}
    quick = Timer(device, warmup=2, repeats=3)
    for tag in ("fwd", "fwd_bwd") if backward else ("fwd",):
        fns = {
            name: inference(lambda c=sdpa_call(b): c(q, k, v)) if tag == "fwd" else fwd_bwd(sdpa_call(b), q, k, v, grad)
            for name, b in backends
        }
        print(f"    choosing the best SDPA backend ({tag}) among {', '.join(fns)} ...", flush=True)
        times = quick.rounds(fns)
        if times:
            name = min(times, key=lambda n: statistics.median(times[n]))
            best[tag] = (name, sdpa_call(dict(backends)[name]))
        gc.collect()
    return best


def flex_block_mask(layout: BlockLayout, device: torch.device):
    """A FlexAttention BlockMask (kernel token order) equivalent to ``layout`` (shared by heads).

    Full tiles go to the full-block lists (no mask_mod call); partial tiles read the layout's
    packed bits through a dense [Mq, Mk] table of mask ids, so nothing N x N is materialised.
    """
    from torch.nn.attention.flex_attention import BlockMask

    if layout.num_heads != 1:
        raise UserError(f"flex_block_mask handles layouts shared by all heads; got num_heads={layout.num_heads}")
    lay = layout.to(device)
    num_q, num_k, bq, bk = lay.num_q_blocks, lay.num_k_blocks, lay.block_q, lay.block_k
    slots = torch.arange(lay.max_kv_blocks, device=device)
    valid = slots[None, :] < lay.kv_counts[0, :, None]
    mask_ids = lay.kv_mask_ids[0]
    indices = lay.kv_indices[0].long()
    # -2: tile not visited (mask_mod must say False there too: the unfused path and some
    # compiled paths evaluate it outside the listed blocks), -1: full tile, else the mask id.
    table = torch.full((num_q, num_k), -2, dtype=torch.int32, device=device)
    rows = torch.arange(num_q, device=device)[:, None].expand_as(indices)
    table[rows[valid], indices[valid]] = mask_ids[valid]
    masks = lay.masks if lay.masks.shape[0] else torch.zeros(1, bq, bk // 32, dtype=torch.int32, device=device)

    def lists(selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        count = selected.sum(-1).to(torch.int32)
        order = torch.sort((~selected).to(torch.uint8), dim=-1, stable=True).indices
        idx = torch.gather(indices, -1, order).to(torch.int32)
        idx = F.pad(idx, (0, num_k - idx.shape[-1]))  # BlockMask wants Mk columns
        return count[None, None].contiguous(), idx[None, None].contiguous()

    part_n, part_i = lists(valid & (mask_ids >= 0))
    full_n, full_i = lists(valid & (mask_ids < 0))

    def mask_mod(b, h, q_idx, kv_idx):
        mid = table[q_idx // bq, kv_idx // bk]
        word = masks[mid.clamp(min=0), q_idx % bq, (kv_idx % bk) // 32]
        return (mid == -1) | ((mid >= 0) & (((word >> (kv_idx % 32)) & 1) > 0))

    n = lay.num_tokens
    return BlockMask.from_kv_blocks(part_n, part_i, full_n, full_i, BLOCK_SIZE=(bq, bk), mask_mod=mask_mod,
                                    seq_lengths=(n, n))


_COMPILED_FLEX = None
# FlexAttention tiles for a retry when Inductor's defaults do not fit in shared memory; 64 divides
# the BlockMask's 128-token blocks, as FlexAttention requires.
FLEX_SMALL_TILES = {"BLOCK_M": 64, "BLOCK_N": 64, "num_stages": 2}


def compiled_flex():
    global _COMPILED_FLEX
    if _COMPILED_FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention

        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=False)
    return _COMPILED_FLEX


def flex_method(row: dict, layout: BlockLayout, q, k, v, device) -> Callable[..., torch.Tensor] | None:
    """Compiled FlexAttention with the layout's mask, permutation included as in ours; compiles it
    now (compile time recorded, excluded from timings) and checks it against our output."""
    try:
        block_mask = flex_block_mask(layout, device)
        flex = compiled_flex()

        # Inductor's default tiles can ask for more shared memory than the GPU has (seen on an H100
        # with torch 2.11, D=128 bf16: 256 KiB asked, 227 KiB there); then retry with smaller tiles.
        for options in (None, FLEX_SMALL_TILES):
            def call(a, b, c, options=options):
                a, b, c = (layout.permute_tokens(x) for x in (a, b, c))
                return layout.unpermute_tokens(flex(a, b, c, block_mask=block_mask, kernel_options=options))

            print(f"    flex compile (kernel_options={options}) ...", flush=True)
            t0 = time.perf_counter()
            try:
                with torch.no_grad():
                    check = call(q.detach(), k.detach(), v.detach())
            except Exception as exc:  # noqa: BLE001 - the next option may compile
                if options is FLEX_SMALL_TILES or device.type != "cuda":
                    raise
                print(f"      default tiles failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}", flush=True)
                continue
            with torch.no_grad():
                mine = block_sparse_attention(q.detach(), k.detach(), v.detach(), layout,
                                              backend=kernel_backend(device))
            row["flex_compile_s"] = time.perf_counter() - t0
            row["flex_kernel_options"] = options
            row["max_abs_diff_vs_flex"] = (check.float() - mine.float()).abs().max().item()
            return call
        return None
    except Exception as exc:  # FlexAttention missing or unable to compile here
        print(f"      flex unavailable: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}", flush=True)
        return None


# ------------------------------------------------------------------------------------- main loop
def bench_shape(shape: Shape, args, device: torch.device, dtype: torch.dtype, timer: Timer) -> list[dict]:
    grid, n = shape.grid, shape.grid.num_tokens
    print(f"\n== {shape.name}: N={n}, B={shape.batch}, H={shape.heads}, D={shape.head_dim}, {args.dtype}", flush=True)
    gen = torch.Generator().manual_seed(0)
    make = lambda: torch.randn(shape.batch, shape.heads, n, shape.head_dim, generator=gen).to(device, dtype)  # noqa: E731
    q, k, v = (make().requires_grad_(args.backward) for _ in range(3))
    # Forward timings use detached inputs (CPU FlexAttention refuses inputs that require grad).
    qd, kd, vd = q.detach(), k.detach(), v.detach()
    grad = make()
    dense_flops = 4 * shape.batch * shape.heads * shape.head_dim * n * n
    sdpa = best_sdpa(timer, device, shape, q, k, v, grad, args.backward)
    rows: list[dict] = []
    own_dense: dict[str, float] = {}
    for pattern_name, pattern, tile_shape in patterns_for(shape):
        layout = pattern.layout(grid, block_size=BLOCK, tile_shape=tile_shape, device=device)
        print(f"  {pattern_name}: {layout}", flush=True)
        row = dict(
            shape=shape.name, tokens=n, batch=shape.batch, heads=shape.heads, head_dim=shape.head_dim,
            pattern=pattern_name, block=BLOCK, tile_shape=tile_shape,
            density=layout.density, tile_density=layout.tile_density,
            ideal_speedup=1.0 / layout.tile_density, ideal_speedup_exact_density=1.0 / layout.density,
        )
        if device.type == "cpu":
            from ..kernels.cpu import computed_pairs

            row["cpu_computed_density"] = computed_pairs(layout) / n**2
        backend = kernel_backend(device)
        ours = lambda a, b, c, lay=layout: block_sparse_attention(a, b, c, lay, backend=backend)  # noqa: E731
        flex = flex_method(row, layout, q, k, v, device) if args.flex else None
        flops = dense_flops * layout.density
        for tag, flop_factor in [("fwd", 1.0)] + ([("fwd_bwd", 3.5)] if args.backward else []):
            if tag == "fwd":
                fns = {"ours": inference(lambda: ours(qd, kd, vd))}
                if "fwd" in sdpa:
                    fns["sdpa"] = inference(lambda c=sdpa["fwd"][1]: c(qd, kd, vd))
                if flex is not None:
                    fns["flex"] = inference(lambda: flex(qd, kd, vd))
            else:
                fns = {"ours": fwd_bwd(ours, q, k, v, grad)}
                if "fwd_bwd" in sdpa:
                    fns["sdpa"] = fwd_bwd(sdpa["fwd_bwd"][1], q, k, v, grad)
                if flex is not None and device.type != "cpu":
                    fns["flex"] = fwd_bwd(flex, q, k, v, grad)
            print(f"    {tag}: {', '.join(fns)} ...", flush=True)
            times = timer.rounds(fns)
            mine = times.get("ours")
            med = lambda name: statistics.median(times[name]) * 1e3 if times.get(name) else None  # noqa: E731
            row[f"{tag}_ms"], row[f"{tag}_min_ms"] = med("ours"), (min(mine) * 1e3 if mine else None)
            row[f"{tag}_sdpa_ms"], row[f"{tag}_sdpa_backend"] = med("sdpa"), sdpa.get(tag, (None,))[0]
            row[f"{tag}_flex_ms"] = med("flex")
            if not mine:
                continue
            row[f"{tag}_tflops"] = flop_factor * flops / statistics.median(mine) / 1e12
            row[f"{tag}_speedup_vs_sdpa"] = paired_speedup(times.get("sdpa"), mine)
            row[f"{tag}_speedup_vs_flex"] = paired_speedup(times.get("flex"), mine)
            if row[f"{tag}_speedup_vs_sdpa"] is not None:
                row[f"{tag}_ratio_to_ideal"] = row[f"{tag}_speedup_vs_sdpa"] / row["ideal_speedup"]
            if pattern_name == "Dense":
                own_dense[tag] = statistics.median(mine)
            if tag in own_dense:  # unpaired: our dense kernel is timed in the Dense row
                row[f"{tag}_speedup_vs_own_dense"] = own_dense[tag] / statistics.median(mine)
        if args.backward and device.type == "cpu" and flex is not None:
            row["flex_fwd_bwd_note"] = "n/a: FlexAttention backward is not implemented on CPU"
        rows.append(row)
        gc.collect()
    return rows


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def load_average() -> str:
    """1-minute load average (context for CPU timings on a shared machine), or n/a."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except (AttributeError, OSError):
        return "n/a"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def fmt(x: object, spec: str = ".2f") -> str:
    if x is None:
        return "n/a"
    return format(x, spec) if isinstance(x, (int, float)) else str(x)


def flex_fallbacks(rows: list[dict]) -> dict[str, list[str]]:
    """Non-default FlexAttention kernel options -> the 'shape / pattern' rows that used them."""
    used: dict[str, list[str]] = {}
    for r in rows:
        if r.get("flex_kernel_options"):
            used.setdefault(str(r["flex_kernel_options"]), []).append(f"{r['shape']} / {r['pattern']}")
    return used


def _table_row(cells: list[object]) -> str:
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def _table_head(columns: list[str]) -> list[str]:
    """A Markdown table's header and alignment lines: the first two columns left, numbers right."""
    return [_table_row(columns), _table_row(["---", "---"] + ["---:"] * (len(columns) - 2))]


def markdown(meta: dict, rows: list[dict]) -> str:
    """The Markdown report of a run: what was measured and how, then the forward, forward+backward
    and baseline tables (one row per shape and pattern)."""
    lines = [
        f"# Kernel benchmark: {meta['device']} ({meta['date']})",
        "",
        f"torch {meta['torch']}, triton {meta['triton']}, dtype {meta['dtype']}, backend `{meta['backend']}`, "
        f"block {meta['block']}, {meta['threads']}. {meta['repeats']} interleaved rounds after {meta['warmup']} "
        f"warm-up ({meta['timing']}): times are medians, speedups vs SDPA and Flex are medians of the per-round "
        "ratios (paired samples; 'vs own dense' is unpaired, from the Dense row). Effective TFLOP/s = "
        "4·B·H·D·(density·N²)/time (fwd+bwd: ×3.5). Ideal speedup = 1 / tile_density (the tiles a block-sparse "
        "kernel visits); ratio = speedup vs SDPA / ideal. FlexAttention: `torch.compile`d, same mask as a "
        "BlockMask built from the layout, compile excluded. Forward timings run under `torch.no_grad()`.",
        "",
        *[f"FlexAttention ran with `kernel_options={options}` for: {', '.join(names)} (its default tiles did not "
          "compile here), which makes it slower than with tiles that fit: read 'vs Flex' accordingly.\n"
          for options, names in flex_fallbacks(rows).items()],
        f"Load average (1 min) before / after: {meta['load_before']} / {meta['load_after']}.",
        "",
        "Shapes: " + "; ".join(f"{s['name']}: grid {s['grid']}, N={s['tokens']}, B={s['batch']}, H={s['heads']}, "
                               f"D={s['head_dim']}" for s in meta["shapes"]),
        "",
        "## Forward",
        "",
        *_table_head(["shape", "pattern", "density", "tile density", "ms", "TFLOP/s", "vs SDPA", "vs Flex",
                      "vs own dense", "ideal", "ratio to ideal"]),
    ]
    for r in rows:
        lines.append(_table_row([
            r["shape"], r["pattern"], f"{r['density']:.4f}", f"{r['tile_density']:.4f}", fmt(r.get("fwd_ms"), ".1f"),
            fmt(r.get("fwd_tflops"), ".3f"), f"{fmt(r.get('fwd_speedup_vs_sdpa'))}x",
            f"{fmt(r.get('fwd_speedup_vs_flex'))}x", f"{fmt(r.get('fwd_speedup_vs_own_dense'))}x",
            f"{r['ideal_speedup']:.2f}x", fmt(r.get("fwd_ratio_to_ideal")),
        ]))
    if any("fwd_bwd_ms" in r for r in rows):
        lines += ["", "## Forward + backward", "", *_table_head(
            ["shape", "pattern", "ms", "TFLOP/s", "vs SDPA", "vs Flex", "vs own dense", "ratio to ideal"])]
        for r in rows:
            flex = r.get("fwd_bwd_speedup_vs_flex")
            flex_text = "n/a (no CPU backward)" if r.get("flex_fwd_bwd_note") else f"{fmt(flex)}x"
            lines.append(_table_row([
                r["shape"], r["pattern"], fmt(r.get("fwd_bwd_ms"), ".1f"), fmt(r.get("fwd_bwd_tflops"), ".3f"),
                f"{fmt(r.get('fwd_bwd_speedup_vs_sdpa'))}x", flex_text,
                f"{fmt(r.get('fwd_bwd_speedup_vs_own_dense'))}x", fmt(r.get("fwd_bwd_ratio_to_ideal")),
            ]))
    lines += ["", "## Baselines (ms)", "", *_table_head(
        ["shape", "pattern", "SDPA fwd (backend)", "SDPA fwd+bwd (backend)", "Flex fwd", "Flex fwd+bwd",
         "max abs diff vs Flex"])]
    for r in rows:
        lines.append(_table_row([
            r["shape"], r["pattern"], f"{fmt(r.get('fwd_sdpa_ms'), '.1f')} ({r.get('fwd_sdpa_backend')})",
            f"{fmt(r.get('fwd_bwd_sdpa_ms'), '.1f')} ({r.get('fwd_bwd_sdpa_backend')})",
            fmt(r.get("fwd_flex_ms"), ".1f"), fmt(r.get("fwd_bwd_flex_ms"), ".1f"),
            fmt(r.get("max_abs_diff_vs_flex"), ".2e"),
        ]))
    if meta.get("notes"):
        lines += ["", "## Notes", ""] + [f"* {note}" for note in meta["notes"]]
    return "\n".join(lines) + "\n"


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The benchmark's options (``diffattn bench --help``); ``prog`` names the command in the help.

    Example:
        >>> build_parser("diffattn bench").parse_args(["--device", "cpu", "--no-flex"]).flex
        False
    """
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", choices=("small", "reference"), default=None,
                        help="small (CPU sizes, default on cpu) or reference (DESIGN.md model shapes, default on cuda)")
    parser.add_argument("--out", default="benchmarks/results",
                        help="folder for the .json and .md reports, relative to the current folder "
                             "(default benchmarks/results)")
    parser.add_argument("--backward", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--flex", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default: fp32 on cpu, bf16 on cuda")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds; default: 5 on cpu, 20 on cuda")
    parser.add_argument("--warmup", type=int, default=None, help="default: 1 on cpu, 5 on cuda")
    parser.add_argument("--only", default=None, help="regex: run only the shapes whose name matches")
    parser.add_argument("--note", action="append", default=[], help="free-text note for the report (repeatable)")
    return parser


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Run the benchmark with command-line arguments ``argv`` (default ``sys.argv[1:]``) and write
    its JSON and Markdown reports; returns the exit code. See the module docstring."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")
    device = torch.device(args.device)
    args.shapes = args.shapes or ("reference" if device.type == "cuda" else "small")
    args.dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    repeats = args.repeats or (20 if device.type == "cuda" else 5)
    warmup = args.warmup if args.warmup is not None else (5 if device.type == "cuda" else 1)
    dtype = DTYPES[args.dtype]
    shapes = REFERENCE_SHAPES if args.shapes == "reference" else SMALL_SHAPES
    if args.only:
        shapes = [s for s in shapes if re.search(args.only, s.name)]
    timer = Timer(device, warmup, repeats)

    load_before = load_average()
    rows = []
    for shape in shapes:
        rows.extend(bench_shape(shape, args, device, dtype, timer))

    triton_version = "n/a"
    if device.type == "cuda":
        try:
            import triton

            triton_version = triton.__version__
        except Exception:  # noqa: BLE001 - the report just says it is missing
            triton_version = "not importable"
    name = device_name(device)
    date = datetime.date.today().isoformat()
    meta = dict(
        device=name if device.type == "cuda"
        else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        date=date, torch=torch.__version__, triton=triton_version, python=platform.python_version(),
        dtype=args.dtype, backend=kernel_backend(device), block=BLOCK,
        threads=f"{torch.get_num_threads()} threads" if device.type == "cpu" else "GPU",
        repeats=repeats, warmup=warmup,
        timing="CUDA events + synchronize" if device.type == "cuda" else "time.perf_counter",
        backward=args.backward, flex=args.flex,
        shapes=[dict(name=s.name, grid=[s.grid.frames, s.grid.height, s.grid.width, s.grid.text_tokens,
                                        s.grid.text_position],
                     tokens=s.grid.num_tokens, batch=s.batch, heads=s.heads, head_dim=s.head_dim) for s in shapes],
        notes=args.note, load_before=load_before, load_after=load_average(),
    )
    out_dir = Path(args.out)
    stem = f"{slug(name)}-{date}"
    atomic_write_text(out_dir / f"{stem}.json", json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    atomic_write_text(out_dir / f"{stem}.md", markdown(meta, rows))
    print(f"\nwrote {out_dir / stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
