"""Steering demonstration on the embedded model: "a red circle moves right" with the region
"red circle" = left half of the frame (and, as a control, = right half), against the same seeds
unsteered.

Measures, over the seeds (the same start noise and sampler noise for both runs):

* ``left_share``: share of frames (with a red shape) whose red pixels' centroid lies in the left half;
* ``red_share``: share of videos with a red shape at all (the detector's colour mask, >= 12 px);
* ``psnr_background_db``: PSNR of the steered video against the unsteered one on the pixels that
  are red in neither (the part of the frame the steering is not about), and over whole videos;
* ``capture_only_psnr_db``: the unsteered run (which captures the maps) against a run without
  diffattn on the first ``--stock-seeds`` seeds (inf = capturing leaves the output unchanged);
* ``red_map_left_mass_share``: the share of the captured "red" map in the left half.

Writes ``benchmarks/results/steering-embedded-cpu-2026-12-07.json`` and a PNG: for two seeds,
the unsteered video and the two steered ones, each above its captured map of "red".

    PYTHONPATH=. python scripts/steering_demo.py            # a few minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import diffattn
from diffattn._io import to_uint8
from diffattn.pipelines.embedded import load_embedded_pipeline
from diffattn.pipelines.shape_detector import MIN_AREA, colour_labels
from diffattn.pipelines.shapes import COLOURS
from diffattn.profiler.metrics import psnr
from diffattn.steering import heatmap_video

PROMPT = "a red circle moves right"
RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def red_masks(videos: np.ndarray) -> np.ndarray:
    """bool ``[V, F, H, W]``: pixels the detector calls red."""
    red = list(COLOURS).index("red")
    return np.stack([colour_labels(video) == red for video in videos])


def placement(masks: np.ndarray) -> dict[str, float]:
    """Share of videos with a red shape, share of red frames whose centroid is in the left half."""
    videos, frames, height, width = masks.shape
    min_area = MIN_AREA * height * width / 64**2
    areas = masks.sum((2, 3))
    present = areas >= min_area
    columns = (np.arange(width) + 0.5)[None, None, None, :]
    centroid_x = (masks * columns).sum((2, 3)) / np.maximum(areas, 1)
    left = (centroid_x < width / 2) & present
    return {
        "red_share": float(present.any(1).mean()),
        "left_share": float(left.sum() / max(int(present.sum()), 1)),
        "red_frames": int(present.sum()),
    }


def background_psnr(a: np.ndarray, b: np.ndarray, masks_a: np.ndarray, masks_b: np.ndarray) -> float:
    keep = ~(masks_a | masks_b)
    diff = (a.astype(np.float64) - b.astype(np.float64)) / 255
    mse = float((diff**2)[keep].mean())
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


def finite(value):
    """``value`` with infinite floats as the string "inf" (JSON has no infinity)."""
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    return "inf" if isinstance(value, float) and math.isinf(value) else value


def generate(pipe, noise: torch.Tensor, args: argparse.Namespace) -> np.ndarray:
    out = pipe([PROMPT] * noise.shape[0], latents=noise, num_frames=args.num_frames, height=args.size,
               width=args.size, num_inference_steps=args.steps, generator=torch.Generator().manual_seed(args.seed),
               output_type="np").frames
    return np.stack([to_uint8(video) for video in out])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0, help="seed i's start noise comes from seed + i")
    parser.add_argument("--num-frames", type=int, default=5)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--stock-seeds", type=int, default=2, help="seeds also run without steering (capture check)")
    parser.add_argument("--strength", type=float, default=3.0)
    parser.add_argument("--until", type=float, default=1.0, help="steering acts on steps [0, until) (fraction)")
    parser.add_argument("--out", default=str(RESULTS / "steering-embedded-cpu-2026-12-07.json"))
    args = parser.parse_args()

    start = time.perf_counter()
    torch.set_num_threads(2)
    pipe = load_embedded_pipeline()
    pipe.set_progress_bar_config(disable=True)
    shape = (3, args.num_frames, args.size, args.size)
    noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(args.seed + i))
                         for i in range(args.seeds)])
    left_half, right_half = (0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)

    handle = diffattn.steer(pipe, capture=["red"])
    plain = generate(pipe, noise, args)
    plain_map = handle.video_maps["red"]
    diffattn.remove(pipe)
    # Is capturing free? The first seeds with and without it, in one batch size (the sampler's
    # fresh noise depends on the batch).
    few = noise[: args.stock_seeds]
    stock = generate(pipe, few, args)
    with diffattn.steer(pipe, capture=["red"]):
        few_captured = generate(pipe, few, args)
    steered, steered_maps = {}, {}
    for name, box in (("left", left_half), ("right", right_half)):
        handle = diffattn.steer(pipe, regions={"red circle": box}, capture=["red"], strength=args.strength,
                                steps=(0.0, args.until))
        steered[name] = generate(pipe, noise, args)
        steered_maps[name] = handle.video_maps["red"]
        diffattn.remove(pipe)
    seconds = time.perf_counter() - start

    plain_masks = red_masks(plain)
    report = {
        "what": "embedded model, region 'red circle' = left half of the frame vs no region (and, as a control, "
                "= right half), same seeds",
        "prompt": PROMPT,
        "settings": {"seeds": args.seeds, "num_frames": args.num_frames, "size": args.size, "steps": args.steps,
                     "guidance_scale": 7.0, "strength": args.strength, "steps_window": [0.0, args.until],
                     "decay": True},
        "unsteered": placement(plain_masks),
        "capture_only_psnr_db": psnr(stock, few_captured),
        "capture_only_psnr_seeds": args.stock_seeds,
    }
    for name, box in (("left", left_half), ("right", right_half)):
        masks = red_masks(steered[name])
        word_map = steered_maps[name]
        report[f"region_{name}_half"] = {
            "region": {"red circle": list(box)},
            **placement(masks),
            "psnr_background_db": background_psnr(plain, steered[name], plain_masks, masks),
            "psnr_whole_db": psnr(plain, steered[name]),
            "red_map_left_mass_share": float(word_map[..., : word_map.shape[-1] // 2].sum() / word_map.sum()),
        }
    report["unsteered"]["red_map_left_mass_share"] = float(
        plain_map[..., : plain_map.shape[-1] // 2].sum() / plain_map.sum())
    report.update({
        "device": "cpu",
        "machine": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "seconds": round(seconds, 1),
        "date": "2026-12-07",
        "script": "scripts/steering_demo.py",
    })
    out = Path(args.out)
    out.write_text(json.dumps(finite(report), indent=2) + "\n")

    # Picture: for 2 seeds, rows = each video (unsteered, region left, region right) above its 'red' map.
    picks = np.linspace(0, args.num_frames - 1, min(5, args.num_frames)).round().astype(int)
    rows = []
    for seed in range(min(2, args.seeds)):
        for videos, word_map in ((plain, plain_map), (steered["left"], steered_maps["left"]),
                                 (steered["right"], steered_maps["right"])):
            video = videos[seed]
            rows.append(np.concatenate(list(video[picks]), 1))
            rows.append(np.concatenate(list(heatmap_video(word_map[seed], video)[picks]), 1))
    Image.fromarray(np.concatenate(rows, 0)).quantize(colors=96).save(out.with_suffix(".png"), optimize=True)
    print(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
