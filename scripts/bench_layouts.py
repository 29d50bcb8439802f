"""Layout build time on one CPU core for the reference video sizes.

Issue target: Wan2.1 480p (21x30x52 = 32,760 tokens) < 1 s, HunyuanVideo 720p
(33x45x80 + 256 text = 119,056 tokens) < 10 s, without an N x N mask. Each build starts from
cold caches; the median of ``--repeats`` builds is reported.

    python scripts/bench_layouts.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import datetime
import json
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

SHAPES = {
    "Wan2.1 480p 81f": (VideoGrid(21, 30, 52), 1.0),
    "HunyuanVideo 720p 129f": (VideoGrid(33, 45, 80, text_tokens=256), 10.0),
}
CASES = [
    ("Dense", Dense(), None),
    ("Radial", Radial(), None),
    ("Neighborhood (3,9,9)", Neighborhood(kernel_size=(3, 9, 9)), None),
    ("Neighborhood (3,9,9) tile (1,8,16)", Neighborhood(kernel_size=(3, 9, 9)), (1, 8, 16)),
    ("Neighborhood (None,15,15) FreeSwim", Neighborhood(kernel_size=(None, 15, 15)), (1, 8, 16)),
]


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
    for shape_name, (grid, target) in SHAPES.items():
        for case_name, pattern, tile_shape in CASES:
            times = []
            for _ in range(args.repeats):
                seconds, layout = cold_build(pattern, grid, tile_shape, args.block_size)
                times.append(seconds)
            row = dict(
                shape=shape_name, tokens=grid.num_tokens, pattern=case_name, tile_shape=tile_shape,
                seconds=statistics.median(times), target_seconds=target,
                density=layout.density, tile_density=layout.tile_density,
                tiles=layout.num_visited_tiles, partial_tiles=layout.num_partial_tiles,
            )
            row["meets_target"] = row["seconds"] < target
            rows.append(row)
            print(f"{shape_name:24s} {case_name:36s} {row['seconds']:7.3f} s  density {layout.density:.4f}  "
                  f"tile density {layout.tile_density:.4f}  {'ok' if row['meets_target'] else 'SLOW'}")
    date = datetime.date.today().isoformat()
    meta = dict(
        date=date, device=f"cpu ({platform.processor() or platform.machine()}), 1 thread",
        torch=torch.__version__, python=platform.python_version(), block_size=args.block_size,
        repeats=args.repeats,
    )
    out = Path(args.out)
    atomic_write_text(out / f"layout-build-cpu-{date}.json", json.dumps(dict(meta=meta, rows=rows), indent=2) + "\n")
    lines = [
        f"# Layout build time ({meta['device']}, torch {meta['torch']}, block {args.block_size}, {date})",
        "",
        "Cold caches, median of %d builds. Target: Wan 480p < 1 s, HunyuanVideo 720p < 10 s." % args.repeats,
        "",
        "| shape | tokens | pattern | seconds | density | tile density | tiles (partial) | target met |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['tokens']} | {r['pattern']} | {r['seconds']:.3f} | {r['density']:.4f} | "
            f"{r['tile_density']:.4f} | {r['tiles']} ({r['partial_tiles']}) | {'yes' if r['meets_target'] else 'NO'} |"
        )
    atomic_write_text(out / f"layout-build-cpu-{date}.md", "\n".join(lines) + "\n")
    return 0 if all(r["meets_target"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
