"""``python -m diffattn.demo``: the patterns and kernels on a video-sized problem, offline on a CPU.

1. Builds the layouts of the shipped Wan presets (``configs/wan/``) for Wan2.1 480p
   (21 x 30 x 52 latent tokens), prints density, tile density and build time, and renders their
   pictures to ``--out``.
2. Runs ``block_sparse_attention`` on a smaller video (random q, k, v) for each preset and checks
   it against dense attention restricted to the same mask, with timings against dense SDPA.

The main job is ``diffattn generate`` / ``diffattn profile`` with the embedded model (README).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from .kernels import block_sparse_attention
from .patterns import VideoGrid
from .patterns.picture import save_layout_png
from .processors.presets import is_dynamic, list_presets


def _reference_rows(q, k, v, mask, rows):
    """float64 masked attention for a few query rows (a full reference would be N x N x float64)."""
    scores = (q[:, :, rows].double() @ k.double().transpose(-1, -2)) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~mask[rows], float("-inf"))
    return torch.nan_to_num(scores.softmax(-1)) @ v.double()


def _median_seconds(fn, repeats: int = 3) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffattn.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="out", help="folder for the layout pictures (default: out)")
    args = parser.parse_args(argv)

    # Static layouts only: a dynamic pattern (PSA) has no layout without a call's q and k.
    presets = [preset for preset in list_presets("wan") if not is_dynamic(preset.config)]
    wan = VideoGrid(21, 30, 52)
    print(f"Wan presets at 480p 81 frames: {wan.frames}x{wan.height}x{wan.width} = {wan.num_tokens} tokens")
    print(f"{'preset':28s} {'density':>8s} {'tile dens.':>10s} {'tiles':>8s} {'partial':>8s} {'build s':>8s}  picture")
    for preset in presets:
        name, cfg = preset.name, preset.config
        start = time.perf_counter()
        layout = cfg.pattern.layout(wan, block_size=cfg.block_size, tile_shape=cfg.tile_shape)
        seconds = time.perf_counter() - start
        path = save_layout_png(layout, Path(args.out) / f"{name}.png", wan)
        print(f"{name:28s} {layout.density:8.4f} {layout.tile_density:10.4f} {layout.num_visited_tiles:8d} "
              f"{layout.num_partial_tiles:8d} {seconds:8.3f}  {path}")

    grid = VideoGrid(16, 24, 40)
    heads, head_dim = 4, 64
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, heads, grid.num_tokens, head_dim) for _ in range(3))
    torch.set_grad_enabled(False)
    dense_s = _median_seconds(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), repeats=1)
    print(f"\nblock_sparse_attention on {grid.frames}x{grid.height}x{grid.width} = {grid.num_tokens} tokens, "
          f"{heads} heads x {head_dim}, fp32, CPU; dense SDPA {dense_s * 1e3:.1f} ms")
    print(f"{'preset':28s} {'tile dens.':>10s} {'max err':>9s} {'ms':>8s} {'vs SDPA':>8s}   "
          "(max err: 256 random rows vs float64)")
    worst = 0.0
    for preset in presets:
        name, cfg = preset.name, preset.config
        layout = cfg.pattern.layout(grid, block_size=cfg.block_size, tile_shape=cfg.tile_shape)
        out = block_sparse_attention(q, k, v, layout)
        rows = torch.randperm(grid.num_tokens)[:256]
        expected = _reference_rows(q, k, v, cfg.pattern.token_mask(grid), rows)
        error = (out[:, :, rows].double() - expected).abs().max().item()
        worst = max(worst, error)
        seconds = _median_seconds(lambda: block_sparse_attention(q, k, v, layout), repeats=1)
        print(f"{name:28s} {layout.tile_density:10.4f} {error:9.2e} {seconds * 1e3:8.1f} {dense_s / seconds:7.2f}x")
    if worst > 1e-4:
        print(f"error: block-sparse attention differs from the masked reference by {worst:.2e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
