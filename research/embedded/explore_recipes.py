#!/usr/bin/env python3
"""Compare training recipes for the embedded model: train several variants at once, score each.

Every variant is ``scripts/train_embedded_model.py`` with its own flags, run as its own process
(all at once: meant for a machine with a GPU and spare CPU cores, where one tiny model leaves most
of the device idle). When a variant finishes, it is evaluated with
:func:`diffattn.pipelines.eval_embedded.evaluate_embedded` on the *tuning* caption stream
(``TUNING_SEED``, never the reported ``EVAL_SEED``) at each guidance scale, and the summary is
rewritten, so a run cut short still leaves the variants that finished.

    python research/embedded/explore_recipes.py --out runs/recipes --deadline-min 9 \\
        --variant base="--steps 2000 --batch-size 8 --lr 6e-4" \\
        --variant bs4lr="--steps 4000 --batch-size 4 --lr 1.2e-3"

Writes ``<out>/<name>.log`` (training output), ``<out>/<name>.json`` and ``.png`` (evaluation
report and contact sheet at the first guidance scale) and ``<out>/summary.json``. Training times
of variants that share one device are not speed measurements.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", action="append", required=True, metavar="NAME=FLAGS",
                   help="a training variant: name and train_embedded_model.py flags (repeatable)")
    p.add_argument("--out", required=True, help="folder for logs, models and reports")
    p.add_argument("--deadline-min", type=float, default=60.0, help="kill unfinished variants after this")
    p.add_argument("--threads", type=int, default=2, help="CPU threads per training process")
    p.add_argument("--num-captions", type=int, default=48)
    p.add_argument("--guidance", type=float, nargs="+", default=[3.0, 5.0])
    p.add_argument("--seed", type=int, default=1000, help="noise seed of the first evaluation video")
    args = p.parse_args(argv)
    variants = {}
    for item in args.variant:
        name, sep, flags = item.partition("=")
        if not sep or not name.replace("-", "").replace("_", "").isalnum():
            p.error(f"--variant must be NAME=FLAGS with a plain name; got {item!r}")
        if name in variants:
            p.error(f"--variant name {name!r} given twice")
        variants[name] = flags.split()
    args.variants = variants
    return args


def evaluate(model: Path, out: Path, name: str, args: argparse.Namespace) -> dict:
    import torch

    from diffattn.pipelines.embedded import load_embedded_pipeline
    from diffattn.pipelines.eval_embedded import SUMMARY_KEYS, TUNING_SEED, evaluate_embedded, write_report

    pipe = load_embedded_pipeline(model).to("cuda" if torch.cuda.is_available() else "cpu")
    scores = {}
    for index, guidance in enumerate(args.guidance):
        report, videos = evaluate_embedded(pipe, num_captions=args.num_captions, guidance_scale=guidance,
                                           seed=args.seed, batch_size=args.num_captions, caption_seed=TUNING_SEED)
        scores[str(guidance)] = {key: report[key] for key in SUMMARY_KEYS}
        if index == 0:
            write_report(report, videos, str(out / f"{name}.json"))
    return scores


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    running = {}
    for name, flags in args.variants.items():
        command = [sys.executable, str(REPO / "scripts" / "train_embedded_model.py"),
                   "--output", str(out / name / "model"), "--checkpoint-dir", str(out / name / "checkpoint"),
                   "--threads", str(args.threads), *flags]
        log = open(out / f"{name}.log", "w")
        running[name] = (subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env), time.time(), flags)
    deadline = time.time() + 60 * args.deadline_min
    summary: dict[str, dict] = {}
    while running and time.time() < deadline:
        for name, (process, began, flags) in list(running.items()):
            if process.poll() is None:
                continue
            del running[name]
            entry: dict = {"flags": " ".join(flags), "train_seconds": time.time() - began}
            if process.returncode == 0:
                entry["guidance"] = evaluate(out / name / "model", out, name, args)
            else:
                entry["error"] = f"training exited with {process.returncode} (see {name}.log)"
            summary[name] = entry
            print(name, json.dumps(entry), flush=True)
            (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        time.sleep(2)
    for name, (process, _, flags) in running.items():
        process.kill()
        summary[name] = {"flags": " ".join(flags), "error": "not finished before the deadline"}
        print(name, "not finished before the deadline", flush=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
