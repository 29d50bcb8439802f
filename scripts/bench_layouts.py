"""Layout build time and memory on one CPU core for the reference video sizes.

Issue targets: Wan2.1 480p (21x30x52 = 32,760 tokens) < 1 s, HunyuanVideo 720p
(33x45x80 + 256 text = 119,056 tokens) < 10 s, without an N x N mask; every layout < 64 MiB
(``layout.nbytes``; issue 24: the HunyuanVideo FreeSwim window layout held 1.1 GB of masks).
Each build starts from cold caches; the median of ``--repeats`` builds is reported. The FreeSwim
rows use the shipped ``freeswim-window`` preset of the family (window, tile shape, block size).

    python scripts/bench_layouts.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffattn import Dense, Neighborhood, Radial, VideoGrid  # noqa: E402
from diffattn._io import atomic_write_text  # noqa: E402
from diffattn.patterns import clear_layout_cache  # noqa: E402
from diffattn.patterns.neighborhood import _axis_tables  # noqa: E402
from diffattn.patterns.radial import _block_mask  # noqa: E402
from diffattn.processors.presets import load_preset  # noqa: E402

# name -> (grid, build-time target in seconds, model family of its presets)
SHAPES = {
    "Wan2.1 480p 81f": (VideoGrid(21, 30, 52), 1.0, "wan"),
    "HunyuanVideo 720p 129f": (VideoGrid(33, 45, 80, text_tokens=256), 10.0, "hunyuan_video"),
}
CASES = [
    ("Dense", Dense(), None),
    ("Radial", Radial(), None),
    ("Neighborhood (3,9,9)", Neighborhood(kernel_size=(3, 9, 9)), None),
    ("Neighborhood (3,9,9) tile (1,8,16)", Neighborhood(kernel_size=(3, 9, 9)), (1, 8, 16)),
    ("Neighborhood (None,15,15) FreeSwim", Neighborhood(kernel_size=(None, 15, 15)), (1, 8, 16)),
]
MAX_BYTES = 64 * 2**20


def cases_for(family: str) -> list[tuple[str, object, tuple[int, int, int] | None]]:
    """The fixed cases plus the family's shipped FreeSwim window preset."""
    config = load_preset("freeswim-window", family=family).config
    kernel = ",".join("None" if k is None else str(k) for k in config.pattern.kernel_size)
    return CASES + [(f"FreeSwim window ({kernel}) {family} preset", config.pattern, config.tile_shape)]


def cpu_model() -> str:
    """The CPU's model name (Linux), else the machine type."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cold_build(pattern, grid, tile_shape, block_size):
    clear_layout_cache()
    _axis_tables.cache_clear()
    _block_mask.cache_clear()
    start = time.perf_counter()
    layout = pattern.layout(grid, block_size=block_size, tile_shape=tile_shape)
    return time.perf_counter() - start, layout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--block-size", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for shape_name, (grid, target, family) in SHAPES.items():
        for case_name, pattern, tile_shape in cases_for(family):
            times = []
            for _ in range(args.repeats):
                seconds, layout = cold_build(pattern, grid, tile_shape, args.block_size)
                times.append(seconds)
            row = dict(
                shape=shape_name, grid=list(grid.shape), tokens=grid.num_tokens, pattern=case_name,
                tile_shape=tile_shape, block_size=args.block_size, seconds=statistics.median(times),
                all_seconds=times, target_seconds=target, density=layout.density,
                tile_density=layout.tile_density, tiles=layout.num_visited_tiles,
                partial_tiles=layout.num_partial_tiles, unique_masks=layout.num_masks, nbytes=layout.nbytes,
            )
            row["meets_target"] = row["seconds"] < target and layout.nbytes < MAX_BYTES
            rows.append(row)
            print(f"{shape_name:24s} {case_name:46s} {row['seconds']:7.3f} s  {layout.nbytes / 2**20:8.2f} MiB  "
                  f"density {layout.density:.4f}  tile density {layout.tile_density:.4f}  "
                  f"{layout.num_partial_tiles} partial / {layout.num_masks} masks  "
                  f"{'ok' if row['meets_target'] else 'MISSED'}")
    date = datetime.date.today().isoformat()
    meta = dict(
        date=date, device=f"cpu ({cpu_model()}), 1 thread", cpu_count=os.cpu_count(),
        torch=torch.__version__, python=platform.python_version(), block_size=args.block_size,
        repeats=args.repeats,
    )
    out = Path(args.out)
    atomic_write_text(out / f"layout-build-cpu-{date}.json", json.dumps(dict(meta=meta, rows=rows), indent=2) + "\n")
    lines = [
        f"# Layout build time and memory ({meta['device']}, torch {meta['torch']}, block {args.block_size}, {date})",
        "",
        f"Cold caches, median of {args.repeats} builds. Targets: Wan 480p < 1 s, HunyuanVideo 720p < 10 s, "
        "every layout < 64 MiB (`layout.nbytes`). Partial tiles share one stored mask when their masks are equal.",
        "",
        "| shape | grid (t, h, w) | tokens | pattern | tile | seconds | MiB | tiles (partial) | unique masks "
        "| density | tile density | target met |",
        "| --- | --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        tile = "x".join(map(str, r["tile_shape"])) if r["tile_shape"] else "raster"
        lines.append(
            f"| {r['shape']} | {'x'.join(map(str, r['grid']))} | {r['tokens']} | {r['pattern']} | {tile} | "
            f"{r['seconds']:.3f} | {r['nbytes'] / 2**20:.2f} | {r['tiles']} ({r['partial_tiles']}) | "
            f"{r['unique_masks']} | {r['density']:.4f} | {r['tile_density']:.4f} | "
            f"{'yes' if r['meets_target'] else 'NO'} |"
        )
    atomic_write_text(out / f"layout-build-cpu-{date}.md", "\n".join(lines) + "\n")
    return 0 if all(r["meets_target"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
