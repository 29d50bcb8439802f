"""``python -m diffattn.patterns``: build a pattern's block layout for a grid, print its numbers
and render it to a PNG.

Example:
    python -m diffattn.patterns radial --frames 21 --height 30 --width 52 --out radial.png
    python -m diffattn.patterns neighborhood --kernel-size 3,9,9 --tile-shape 2,8,8 --out gna.png
"""

from __future__ import annotations

import argparse
import sys
import time

from ..errors import UserError
from . import Dense, Neighborhood, Radial, VideoGrid
from .picture import save_layout_png


def _triple(kind):
    def parse(text: str):
        parts = text.split(",")
        if len(parts) == 1:
            parts = parts * 3
        if len(parts) != 3:
            raise argparse.ArgumentTypeError(f"expected one value or t,h,w; got {text!r}")
        try:
            if kind is bool:
                return tuple({"1": True, "true": True, "0": False, "false": False}[p.strip().lower()] for p in parts)
            return tuple(None if p.strip().lower() in ("none", "full") else int(p) for p in parts)
        except (KeyError, ValueError):
            raise argparse.ArgumentTypeError(f"bad value {text!r}") from None

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m diffattn.patterns", description=__doc__.split("\n\n")[0])
    parser.add_argument("pattern", choices=["dense", "radial", "neighborhood"])
    parser.add_argument("--frames", type=int, default=21, help="latent frames (default 21: Wan 81 frames)")
    parser.add_argument("--height", type=int, default=30, help="latent tokens per column (default 30: 480p)")
    parser.add_argument("--width", type=int, default=52, help="latent tokens per row (default 52: 832 px)")
    parser.add_argument("--text-tokens", type=int, default=0)
    parser.add_argument("--text-position", default="end", choices=["end", "start"])
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--kernel-size", type=_triple(int), default=(3, 9, 9),
                        help="neighborhood: t,h,w ('none' = full axis)")
    parser.add_argument("--stride", type=_triple(int), default=(1, 1, 1))
    parser.add_argument("--dilation", type=_triple(int), default=(1, 1, 1))
    parser.add_argument("--causal", type=_triple(bool), default=(False, False, False))
    parser.add_argument("--strict", action="store_true",
                        help="neighborhood: refuse a window larger than the grid (NATTEN's rule) instead of fitting it")
    parser.add_argument("--tile-shape", type=_triple(int), default=None, help="tile-major token permutation t,h,w")
    parser.add_argument("--decay", type=float, default=1.0, help="radial: band multiplier")
    parser.add_argument("--sink-frames", type=int, default=1, help="radial: attention-sink frames")
    parser.add_argument("--out", default=None, help="PNG path for the picture (optional)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        grid = VideoGrid(args.frames, args.height, args.width, args.text_tokens, args.text_position)
        if args.pattern == "dense":
            pattern = Dense()
        elif args.pattern == "radial":
            pattern = Radial(decay=args.decay, sink_frames=args.sink_frames, block_size=args.block_size)
        else:
            pattern = Neighborhood(args.kernel_size, args.stride, args.dilation, args.causal, args.strict)
        start = time.perf_counter()
        layout = pattern.layout(grid, block_size=args.block_size, tile_shape=args.tile_shape)
        seconds = time.perf_counter() - start
        path = save_layout_png(layout, args.out, grid) if args.out else None
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"pattern      {pattern}")
    print(f"grid         {grid.frames}x{grid.height}x{grid.width} + {grid.text_tokens} text = {grid.num_tokens} tokens")
    print(f"density      {layout.density:.4f}  (allowed pairs / N^2)")
    print(f"tile density {layout.tile_density:.4f}  "
          f"(pairs inside visited {layout.block_q}x{layout.block_k} tiles / N^2)")
    print(f"tiles        {layout.num_visited_tiles} visited, {layout.num_partial_tiles} partial")
    print(f"masks        {layout.num_masks} distinct partial-tile masks")
    print(f"memory       {layout.nbytes / 2**20:.2f} MiB ({layout.nbytes} bytes: tile lists, masks, permutation)")
    print(f"built in     {seconds:.3f} s")
    if path:
        print(f"picture      {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
