"""FreeSwim numbers on the CPU: the embedded model at 2x its training size, and Wan2.1 480p -> 1080p geometry.

Part 1 (``embedded``): the shipped embedded model (trained at 64 x 64, 8 x 8 tokens) generates at
128 x 128 (16 x 16 tokens) for the same held-out captions and seeds with: dense attention, the
window only (``Neighborhood(kernel_size=(None, 8, 8))``), FreeSwim with ``cache_steps`` 1, 2 and
5 (window + log-length scale + guide branch), and FreeSwim's coarse-to-fine run; plus dense at the
native 64 x 64 for reference. Per row: wall time, self-attention share (the profiler's
:class:`~diffattn.profiler.timing.AttentionTimer`: core attention ops over generation time; the
guide branch's dense half is attention time too), and repetition by the shape detector:
spurious colours per video (palette colours the caption does not name), duplicated colours per
video (a colour whose mask holds two or more shape-sized components in at least half of the
frames: the same object drawn twice), and caption adherence.

Part 2 (``geometry``): Wan2.1 1.3B at 480p (30 x 52 latent tokens, 21 frames) -> 1080p
(1088 x 1920 pixels: 68 x 120 tokens): the native-size window's layout (density, bytes, build
time) at 1080p, the log-length factor, and the guide cache's size (one cross-attention output
per block) in bf16 for the 1.3B (30 blocks, 12 x 128) and 14B (40 blocks, 40 x 128) models.

    # both parts, as committed:
    python scripts/bench_freeswim.py --captions 3 --frames 9 --steps 8 --out benchmarks/results
    python scripts/bench_freeswim.py --part geometry --out /tmp
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import diffattn  # noqa: E402
from diffattn import Dense, FreeSwim, Neighborhood, SparsityConfig, VideoGrid  # noqa: E402
from diffattn._io import atomic_write_text  # noqa: E402
from diffattn.adapters import sparsity_state  # noqa: E402
from diffattn.freeswim_run import coarse_to_fine  # noqa: E402
from diffattn.patterns import clear_layout_cache  # noqa: E402
from diffattn.pipelines.embedded import load_embedded_pipeline  # noqa: E402
from diffattn.pipelines.eval_embedded import held_out_specs  # noqa: E402
from diffattn.pipelines.shape_detector import BASE_SIZE, MIN_AREA, colour_labels, largest_component, score_video  # noqa: E402
from diffattn.pipelines.shapes import COLOURS, caption, render_clip  # noqa: E402
from diffattn.processors.freeswim import log_length_factor  # noqa: E402
from diffattn.profiler.timing import AttentionTimer  # noqa: E402
from diffattn.runs import to_uint8  # noqa: E402

DATE = "2026-12-07"
WINDOW = (8, 8)          # the embedded model's training size in tokens
BLOCK, TILE = 64, (1, 8, 8)


def duplicated_colours(video: np.ndarray) -> list[str]:
    """Palette colours drawn as two or more shape-sized components in at least half of the frames."""
    frames, height, width, _ = video.shape
    labels = colour_labels(video)
    min_area = MIN_AREA * height * width / BASE_SIZE**2
    duplicated = []
    for index, colour in enumerate(COLOURS):
        counts = []
        for f in range(frames):
            mask, count = labels[f] == index, 0
            while mask.sum() >= min_area:
                component = largest_component(mask)
                if component.sum() < min_area:
                    break
                count += 1
                mask &= ~component
            counts.append(count)
        if np.mean(np.asarray(counts) >= 2) >= 0.5:
            duplicated.append(colour)
    return duplicated


def embedded_rows(num_captions: int, frames: int, steps: int, size: int, log) -> list[dict]:
    pipe = load_embedded_pipeline()
    specs = held_out_specs(num_captions)
    prompts = [caption(spec) for spec in specs]
    window_only = SparsityConfig(pattern=Neighborhood(kernel_size=(None, *WINDOW)), block_size=BLOCK, tile_shape=TILE)
    dense = SparsityConfig(pattern=Dense(), dense_steps=10**6)  # every call stock, still timed by the profiler
    cases = [
        ("dense @64 (native)", dense, "plain", BASE_SIZE),
        ("dense", dense, "plain", size),
        ("window only", window_only, "plain", size),
        *[(f"FreeSwim cache {n}", FreeSwim(window=WINDOW, cache_steps=n, block_size=BLOCK, tile_shape=TILE), "plain",
           size) for n in (1, 2, 5)],
        ("FreeSwim cache 2 coarse-to-fine", FreeSwim(window=WINDOW, cache_steps=2, block_size=BLOCK, tile_shape=TILE),
         "coarse-to-fine", size),
    ]
    rows = []
    for name, config, mode, pixels in cases:
        generators = [torch.Generator().manual_seed(i) for i in range(num_captions)]
        call = dict(prompt=prompts, num_frames=frames, num_inference_steps=steps, generator=generators)
        timer = AttentionTimer(torch.device("cpu"))
        start = time.perf_counter()
        extra = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", diffattn.DenseFallbackWarning)
            if mode == "coarse-to-fine":
                result = coarse_to_fine(pipe, config, height=pixels, width=pixels, **call)
                videos = result.frames
                extra = dict(guide_steps=result.guide_steps, cache_bytes=result.cache_bytes,
                             base_seconds=round(result.base_seconds, 2), refine_seconds=round(result.refine_seconds, 2),
                             window_density=result.density)
            else:
                diffattn.apply(pipe, config)
                state = sparsity_state(pipe)
                timer.attach([state])
                videos = pipe(height=pixels, width=pixels, **call).frames
                timer.detach()
                if isinstance(config, FreeSwim):
                    extra = dict(guide_steps=list(state.guide_steps), cache_bytes=state.cache_bytes,
                                 query_factor=round(state.query_factor, 4))
                diffattn.remove(pipe)
        seconds = time.perf_counter() - start
        calls = timer.finish()
        attention = sum(c.seconds for c in calls)
        videos = [to_uint8(v) for v in videos]
        scores = [score_video(v, spec) for v, spec in zip(videos, specs)]
        duplicates = [duplicated_colours(v) for v in videos]
        row = dict(
            case=name, size=pixels, seconds=round(seconds, 2),
            attention_share=round(attention / seconds, 3) if calls else None,
            spurious_colours_per_video=float(np.mean([len(s.spurious) for s in scores])),
            duplicated_colours_per_video=float(np.mean([len(d) for d in duplicates])),
            adherence=round(float(np.mean([s.adherence for s in scores])), 3),
            per_video=[dict(caption=p, spurious=s.spurious, duplicated=d, adherence=s.adherence)
                       for p, s, d in zip(prompts, scores, duplicates)],
            **extra,
        )
        rows.append(row)
        log(f"{name}: {row['seconds']} s, attention share {row['attention_share']}, spurious "
            f"{row['spurious_colours_per_video']}, duplicated {row['duplicated_colours_per_video']}, "
            f"adherence {row['adherence']}")
    truth = [render_clip(spec, frames, size) for spec in specs]  # the detector's own floor on true renders
    rows.append(dict(case="ground-truth renders", size=size, seconds=0.0, attention_share=None,
                     spurious_colours_per_video=float(np.mean([len(score_video(v, s).spurious)
                                                               for v, s in zip(truth, specs)])),
                     duplicated_colours_per_video=float(np.mean([len(duplicated_colours(v)) for v in truth])),
                     adherence=round(float(np.mean([score_video(v, s).adherence for v, s in zip(truth, specs)])), 3)))
    return rows


def geometry_rows() -> list[dict]:
    native, target = VideoGrid(21, 30, 52), VideoGrid(21, 68, 120)
    rows = []
    for window in [(30, 52), (31, 53)]:  # the native grid, and the reference's odd window around it
        clear_layout_cache()
        start = time.perf_counter()
        layout = Neighborhood(kernel_size=(None, *window)).layout(target, block_size=128, tile_shape=(1, 8, 16))
        build = time.perf_counter() - start
        rows.append(dict(kind="window layout", window=list(window), grid=[21, 68, 120], tokens=target.num_tokens,
                         density=round(layout.density, 4), layout_bytes=layout.nbytes, build_seconds=round(build, 3),
                         log_length_factor=round(log_length_factor(window, target), 4)))
    for model, blocks, heads in (("Wan2.1 1.3B", 30, 12), ("Wan2.1 14B", 40, 40)):
        for grid in (native, target):
            per_block = grid.num_tokens * heads * 128 * 2  # one [1, N, H, 128] bf16 cross-attention output
            rows.append(dict(kind="guide cache (bf16, batch 1)", model=model,
                             grid=[grid.frames, grid.height, grid.width], tokens=grid.num_tokens,
                             bytes_per_block=per_block, cache_bytes=per_block * blocks))
    return rows


def markdown(meta: dict, embedded: list[dict], geometry: list[dict]) -> str:
    lines = [f"# FreeSwim on the CPU ({meta['date']})", "",
             f"Machine: {meta['machine']}, torch {meta['torch']}, {meta['threads']} threads; "
             f"script `scripts/bench_freeswim.py`, {meta['total_seconds']:.0f} s in all.", ""]
    if embedded:
        lines += [f"## Embedded model at 2x its training size ({meta['embedded']['size']} x {meta['embedded']['size']} "
                  f"pixels, {meta['embedded']['frames']} frames, {meta['embedded']['steps']} steps, "
                  f"{meta['embedded']['captions']} held-out captions, seeds 0..{meta['embedded']['captions'] - 1})", "",
                  "| case | size | time s | attention share | spurious colours / video | duplicated colours / video "
                  "| adherence | guide steps | cache |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |"]
        for r in embedded:
            cache = f"{r['cache_bytes'] / 2**20:.1f} MiB" if "cache_bytes" in r else ""
            share = "" if r["attention_share"] is None else f"{r['attention_share']:.3f}"
            lines.append(f"| {r['case']} | {r['size']} | {r['seconds']:.1f} | {share} | "
                         f"{r['spurious_colours_per_video']:.2f} | {r['duplicated_colours_per_video']:.2f} | "
                         f"{r['adherence']:.3f} | {r.get('guide_steps', '')} | {cache} |")
        lines.append("")
    if geometry:
        lines += ["## Wan2.1 480p -> 1080p geometry (21 x 68 x 120 = 171,360 tokens; block 128, tile (1, 8, 16))", "",
                  "| window | density | layout | build s | log-length factor |", "| --- | ---: | ---: | ---: | ---: |"]
        for r in (r for r in geometry if r["kind"] == "window layout"):
            lines.append(f"| {tuple(r['window'])} | {r['density']:.4f} | {r['layout_bytes'] / 2**20:.2f} MiB | "
                         f"{r['build_seconds']:.3f} | {r['log_length_factor']:.4f} |")
        lines += ["", "| guide cache (bf16, batch 1) | grid | per block | all blocks |", "| --- | --- | ---: | ---: |"]
        for r in (r for r in geometry if r["kind"].startswith("guide cache")):
            lines.append(f"| {r['model']} | {'x'.join(map(str, r['grid']))} | {r['bytes_per_block'] / 2**20:.0f} MiB | "
                         f"{r['cache_bytes'] / 2**30:.1f} GiB |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for freeswim-<part>-cpu-DATE.json/.md")
    parser.add_argument("--part", choices=("all", "embedded", "geometry"), default="all")
    parser.add_argument("--captions", type=int, default=4)
    parser.add_argument("--frames", type=int, default=9)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    embedded = embedded_rows(args.captions, args.frames, args.steps, args.size, print) \
        if args.part in ("all", "embedded") else []
    geometry = geometry_rows() if args.part in ("all", "geometry") else []
    meta = dict(date=DATE, machine=f"{platform.machine()} {platform.processor() or ''}".strip(),
                torch=torch.__version__, threads=torch.get_num_threads(), total_seconds=time.perf_counter() - start,
                written=datetime.datetime.now().isoformat(timespec="seconds"),
                embedded=dict(size=args.size, frames=args.frames, steps=args.steps, captions=args.captions,
                              window=list(WINDOW), block_size=BLOCK, tile_shape=list(TILE)))
    name = {"all": "freeswim-2x", "embedded": "freeswim-embedded", "geometry": "freeswim-geometry"}[args.part]
    out = Path(args.out) / f"{name}-cpu-{DATE}"
    atomic_write_text(out.with_suffix(".json"), json.dumps(dict(meta=meta, embedded=embedded, geometry=geometry),
                                                           indent=1) + "\n")
    atomic_write_text(out.with_suffix(".md"), markdown(meta, embedded, geometry))
    print(f"wrote {out}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
