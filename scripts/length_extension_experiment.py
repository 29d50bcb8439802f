#!/usr/bin/env python3
"""Length extension of the embedded model, L = 17 frames -> 4L = 65 frames (64x64): the Radial
Attention claim (LoRA + radial attention extends the length, cheaper than full fine-tuning)
reproduced end to end with ``diffattn train-lora``.

Variants (same steps, data, seeds): (a) dense, no tuning; (b) radial, no tuning; (c) radial +
LoRA; (d) dense + LoRA; (e) dense full fine-tune. Each training run is a ``diffattn train-lora``
subprocess (its peak memory is its own); the evaluation then loads each variant in this process:
held-out denoising loss at 4L (and at L), the shape detector's adherence and motion deviation at
4L (few captions, few steps), and the generation time at 4L.

    python scripts/length_extension_experiment.py                       # the committed run
    python scripts/length_extension_experiment.py --steps 2 --num-frames 9 --captions 1 --out /tmp/x  # smoke

Writes ``--out`` (.json, .md and .png beside it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from diffattn._io import atomic_write, atomic_write_text  # noqa: E402

VARIANTS = {
    "a": dict(label="dense, no tuning", preset="dense", train=None),
    "b": dict(label="radial, no tuning", preset="radial", train=None),
    "c": dict(label="radial + LoRA", preset="radial", train="lora"),
    "d": dict(label="dense + LoRA", preset="dense", train="lora"),
    "e": dict(label="dense, full fine-tune", preset="dense", train="full"),
}
RADIAL_DENSE_SHARE = 12 / 50  # the radial preset keeps its first 12 of 50 steps dense: the same share here


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(REPO / "benchmarks/results/length-extension-cpu-2026-12-07.json"))
    p.add_argument("--work", default=str(REPO / "runs/length-extension"), help="training outputs")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--num-frames", type=int, default=65, help="4L")
    p.add_argument("--base-frames", type=int, default=17, help="L")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--lora-lr", type=float, default=1e-3)
    p.add_argument("--full-lr", type=float, default=1e-4)
    p.add_argument("--heldout-clips", type=int, default=2)
    p.add_argument("--captions", type=int, default=2, help="held-out captions for the detector")
    p.add_argument("--sample-steps", type=int, default=6)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", default="abcde")
    p.add_argument("--timing-only", type=int, default=0, metavar="STEPS",
                   help="only re-time the training variants: STEPS steps each, round-robin, twice, added to --out "
                        "(the training runs share the CPU with whatever else runs; this pass runs them back to back)")
    return p.parse_args(argv)


def train(key: str, args: argparse.Namespace, steps: int | None = None, output: Path | None = None) -> dict:
    spec = VARIANTS[key]
    steps = steps or args.steps
    output = output or Path(args.work) / key
    command = [sys.executable, "-m", "diffattn.cli", "train-lora", "--preset", spec["preset"],
               "--num-frames", str(args.num_frames), "--steps", str(steps), "--output", str(output),
               "--seed", str(args.seed), "--save-every", str(steps), "--threads", str(args.threads),
               "--rank", str(args.rank)]
    full = spec["train"] == "full"
    command += ["--full-finetune", "--lr", str(args.full_lr)] if full else ["--lr", str(args.lora_lr)]
    began = time.perf_counter()
    subprocess.run(command, check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    info = json.loads((output / "training.json").read_text())
    return {"output": str(output), "wall_seconds": time.perf_counter() - began,
            "seconds_per_step": info["seconds_per_step_median"], "peak_memory_mb": info["peak_memory_mb"],
            "trainable_parameters": info["trainable_parameters"], "final_loss_mean_last_10": float(
                np.mean(info["losses"][-10:])), "losses": info["losses"], "density": info["density"]}


def load_variant(key: str, args: argparse.Namespace):
    from diffattn.pipelines.embedded import load_embedded_pipeline

    spec = VARIANTS[key]
    output = Path(args.work) / key
    if spec["train"] == "full":
        pipe = load_embedded_pipeline(output)
    else:
        pipe = load_embedded_pipeline()
        if spec["train"] == "lora":
            pipe.load_lora_weights(str(output))
            pipe.fuse_lora()  # deployed LoRAs are fused: inference costs what the base model costs
    pipe.set_progress_bar_config(disable=True)
    return pipe


def evaluate(key: str, args: argparse.Namespace) -> dict:
    import diffattn
    from diffattn.pipelines.eval_embedded import evaluate_embedded
    from diffattn.training.evaluate import heldout_denoising_loss

    spec = VARIANTS[key]
    result = {}
    for frames, name in ((args.num_frames, "heldout_loss_4L"), (args.base_frames, "heldout_loss_L")):
        pipe = load_variant(key, args)  # fresh scheduler: the held-out calls run the preset's sparse layers
        diffattn.apply(pipe, spec["preset"])
        result[name] = heldout_denoising_loss(pipe, frames, num_clips=args.heldout_clips, seed=args.seed)
    pipe = load_variant(key, args)
    dense_steps = round(RADIAL_DENSE_SHARE * args.sample_steps)
    diffattn.apply(pipe, spec["preset"], **({"dense_steps": dense_steps} if spec["preset"] == "radial" else {}))
    report, _ = evaluate_embedded(pipe, num_captions=args.captions, num_frames=args.num_frames,
                                  num_inference_steps=args.sample_steps, batch_size=args.captions, seed=args.seed)
    result.update(adherence=report["adherence"], motion_deviation_px=report["motion_deviation_px"],
                  inference_seconds_per_video=report["generation_seconds"] / args.captions,
                  ground_truth=report["ground_truth"])
    return result


def markdown(results: dict, args: argparse.Namespace, meta: dict) -> str:
    lines = [f"# Length extension of the embedded model, {args.base_frames} -> {args.num_frames} frames (64x64), CPU",
             "",
             f"{args.steps} training steps of 1 procedural clip at {args.num_frames} frames per variant, seed "
             f"{args.seed}; LoRA rank {args.rank} on the attention projections (lr {args.lora_lr:g}), full "
             f"fine-tune lr {args.full_lr:g}; held-out loss: the x0 loss on {args.heldout_clips} held-out clips x "
             f"5 noise levels; detector: {args.captions} held-out captions, {args.sample_steps} sampling steps, "
             f"guidance 7 (radial: first {round(RADIAL_DENSE_SHARE * args.sample_steps)} steps dense). "
             f"{meta['threads']} torch threads on a 2-core machine shared with other jobs: timings are noisy. "
             f"Total wall {meta['wall_seconds'] / 60:.1f} min.",
             "",
             "| variant | held-out loss 4L | held-out loss L | adherence 4L | motion dev. 4L (px) | train s/step "
             "(in run) | train s/step (timing pass) | peak mem (MiB) | trainable params | inference s/video 4L |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for key, r in results.items():
        t = r.get("training") or {}

        def fmt(value, spec):
            return "-" if value is None or (isinstance(value, float) and np.isnan(value)) else format(value, spec)
        lines.append(f"| ({key}) {VARIANTS[key]['label']} | {fmt(r['heldout_loss_4L']['loss'], '.4f')} | "
                     f"{fmt(r['heldout_loss_L']['loss'], '.4f')} | {fmt(r['adherence'], '.2f')} | "
                     f"{fmt(r['motion_deviation_px'], '.2f')} | {fmt(t.get('seconds_per_step'), '.2f')} | "
                     f"{fmt(t.get('seconds_per_step_timing_pass'), '.2f')} | "
                     f"{fmt(t.get('peak_memory_mb'), '.0f')} | {fmt(t.get('trainable_parameters'), ',')} | "
                     f"{fmt(r['inference_seconds_per_video'], '.1f')} |")
    lines += ["", "Targets: " + "; ".join(meta["targets"]), ""]
    return "\n".join(lines)


def targets(results: dict) -> list[str]:
    if not {"c", "e"} <= set(results):
        return ["(c) or (e) missing"]
    c, e = results["c"], results["e"]
    gap = c["heldout_loss_4L"]["loss"] / e["heldout_loss_4L"]["loss"] - 1
    which = "seconds_per_step_timing_pass" if "seconds_per_step_timing_pass" in c["training"] else "seconds_per_step"
    speed = e["training"][which] / c["training"][which]
    return [f"(c) held-out loss {100 * gap:+.1f} % vs (e) (target within 5 %: {'met' if gap <= 0.05 else 'NOT met'})",
            f"(c) {speed:.2f}x cheaper per step than (e) ({which}; target >= 3x: {'met' if speed >= 3 else 'NOT met'})"]


def chart(results: dict) -> bytes:
    """Two bar groups drawn with PIL: held-out loss at 4L and training seconds per step."""
    import io

    from PIL import Image, ImageDraw

    image = Image.new("RGB", (720, 300), "white")
    draw = ImageDraw.Draw(image)
    panels = [("held-out loss at 4L", {k: r["heldout_loss_4L"]["loss"] for k, r in results.items()}),
              ("training s/step", {k: (r.get("training") or {}).get(
                  "seconds_per_step_timing_pass", (r.get("training") or {}).get("seconds_per_step"))
                  for k, r in results.items()})]
    for index, (title, values) in enumerate(panels):
        x0 = 20 + index * 360
        draw.text((x0, 8), title, fill="black")
        known = [v for v in values.values() if v]
        top = max(known) if known else 1.0
        for slot, (key, value) in enumerate(values.items()):
            x = x0 + 10 + slot * 64
            if value:
                height = 220 * value / top
                draw.rectangle([x, 260 - height, x + 44, 260], fill=(70, 110, 180) if "radial" in VARIANTS[key]["label"]
                               else (200, 120, 60))
                draw.text((x, 246 - height), f"{value:.3g}", fill="black")
            draw.text((x + 14, 266), f"({key})", fill="black")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def timing_pass(args: argparse.Namespace) -> int:
    """Re-time the training variants back to back (round-robin, two rounds) and add the medians
    to the existing report."""
    out = Path(args.out)
    report = json.loads(out.read_text())
    trained = [key for key in args.variants if VARIANTS[key]["train"]]
    times: dict[str, list[float]] = {key: [] for key in trained}
    for round_index in range(2):
        for key in trained:
            info = train(key, args, steps=args.timing_only, output=Path(args.work) / f"timing-{key}-{round_index}")
            times[key].append(info["seconds_per_step"])
    for key in trained:
        report["variants"][key]["training"]["seconds_per_step_timing_pass"] = float(np.median(times[key]))
        report["variants"][key]["training"]["timing_pass_runs"] = times[key]
    report["timing_pass"] = {"steps_per_run": args.timing_only, "rounds": 2, "order": "round-robin " + "".join(trained)}
    report["targets"] = targets({k: v for k, v in report["variants"].items()})
    atomic_write_text(out, json.dumps(report, indent=1) + "\n")
    text = markdown(report["variants"], argparse.Namespace(**report["settings"]), report)
    atomic_write_text(out.with_suffix(".md"), text)
    png = chart(report["variants"])
    atomic_write(out.with_suffix(".png"), lambda handle: handle.write(png))
    print(text)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.timing_only:
        return timing_pass(args)
    began = time.perf_counter()
    results: dict = {}
    for key in args.variants:
        if VARIANTS[key]["train"] is not None:
            print(f"training ({key}) {VARIANTS[key]['label']}", file=sys.stderr, flush=True)
            results.setdefault(key, {})["training"] = train(key, args)
    for key in args.variants:
        print(f"evaluating ({key}) {VARIANTS[key]['label']}", file=sys.stderr, flush=True)
        started = time.perf_counter()
        results.setdefault(key, {}).update(evaluate(key, args))
        results[key]["evaluation_wall_seconds"] = time.perf_counter() - started
        results[key]["label"] = VARIANTS[key]["label"]
    results = {key: results[key] for key in args.variants}
    meta = {"wall_seconds": time.perf_counter() - began, "threads": args.threads, "targets": targets(results),
            "device": "cpu", "date": "2026-12-07", "torch": torch.__version__,
            "command": "python scripts/length_extension_experiment.py " + " ".join(argv or sys.argv[1:])}
    out = Path(args.out)
    atomic_write_text(out, json.dumps({"settings": vars(args), **meta, "variants": results}, indent=1) + "\n")
    atomic_write_text(out.with_suffix(".md"), markdown(results, args, meta))
    png = chart(results)
    atomic_write(out.with_suffix(".png"), lambda handle: handle.write(png))
    print(markdown(results, args, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
