#!/usr/bin/env python3
"""Score sampler settings of an embedded model on the tuning captions (never the reported ones).

    python research/embedded/tune_sampler.py --out runs/sampler.json \\
        --setting guidance=5,sampler=stochastic --setting guidance=5,sampler=euler

A setting is comma-separated ``key=value`` pairs: ``guidance`` (classifier-free guidance scale),
``steps`` (denoising steps) and ``sampler`` (``stochastic``: the scheduler re-noises the clean
estimate at every step; ``euler``: the deterministic ODE step). Keys left out take the model's
defaults. Every setting generates the same captions (``TUNING_SEED``) from the same noise seeds.
The JSON is rewritten after every setting (a run cut short keeps what finished) and also holds the
model's one-step denoising profile, which no sampler setting changes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from diffattn._io import atomic_write_text  # noqa: E402

SAMPLERS = ("stochastic", "euler")
SETTING_KEYS = ("guidance", "steps", "sampler")


def parse_setting(text: str) -> dict:
    """``"guidance=5,sampler=euler"`` -> ``{"guidance": 5.0, "sampler": "euler"}``; ValueError naming the bad part."""
    setting: dict = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or key not in SETTING_KEYS:
            raise ValueError(f"setting part {part!r} must be key=value with key one of {SETTING_KEYS}")
        if key in setting:
            raise ValueError(f"setting {text!r} gives {key!r} twice")
        try:
            if key == "guidance":
                setting[key] = float(value)
            elif key == "steps":
                setting[key] = int(value)
                if setting[key] < 1:
                    raise ValueError
            elif value in SAMPLERS:
                setting[key] = value
            else:
                raise ValueError
        except ValueError:
            allowed = {"guidance": "a number", "steps": "a positive integer", "sampler": " or ".join(SAMPLERS)}[key]
            raise ValueError(f"setting {key}={value!r} must be {allowed}") from None
    return setting


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--setting", action="append", required=True, metavar="KEY=VALUE[,...]",
                   help="a sampler setting to score (repeatable); keys: " + ", ".join(SETTING_KEYS))
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--model", default=None, help="saved pipeline folder (default: the shipped model)")
    p.add_argument("--num-captions", type=int, default=24)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0, help="noise seed of the first video (video i uses seed + i)")
    args = p.parse_args(argv)
    for name in ("num_captions", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")
    try:
        args.settings = [(text, parse_setting(text)) for text in args.setting]
    except ValueError as error:
        p.error(f"--setting: {error}")
    return args


def main(argv: list[str] | None = None) -> int:
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler

    from diffattn.pipelines.embedded import DEFAULT_CALL, load_embedded_pipeline
    from diffattn.pipelines.eval_embedded import (
        SUMMARY_KEYS,
        TUNING_SEED,
        denoising_profile,
        evaluate_embedded,
        nan_to_null,
    )

    args = parse_args(argv)
    pipe = load_embedded_pipeline(args.model).to("cuda" if torch.cuda.is_available() else "cpu")
    pipe.set_progress_bar_config(disable=True)
    own = pipe.scheduler.config
    result: dict = {
        "description": "embedded model sampler settings scored on the tuning captions (TUNING_SEED)",
        "model": args.model or "embedded (shipped)", "num_captions": args.num_captions, "seed": args.seed,
        "device": str(pipe.device), "torch_threads": torch.get_num_threads(),
        "model_sampler": "stochastic" if own.get("stochastic_sampling") else "euler", "settings": [],
    }
    for text, setting in args.settings:
        sampler = setting.get("sampler", result["model_sampler"])
        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(own, stochastic_sampling=sampler == "stochastic")
        began = time.perf_counter()
        report, _ = evaluate_embedded(pipe, args.num_captions, guidance_scale=setting.get("guidance"),
                                      num_inference_steps=setting.get("steps"), seed=args.seed,
                                      batch_size=args.batch_size, caption_seed=TUNING_SEED)
        entry = {"setting": text, "guidance": report["guidance_scale"], "steps": report["num_inference_steps"],
                 "sampler": sampler, **{key: report[key] for key in SUMMARY_KEYS},
                 "seconds": round(time.perf_counter() - began, 1)}
        result["settings"].append(entry)
        print(f"{text}: adherence {entry['adherence']:.3f} {json.dumps(entry['adherence_by_check'])} "
              f"still {entry['still_share']:.2f} deviation {entry['motion_deviation_px']:.2f} px "
              f"({entry['seconds']:.0f} s)", flush=True)
        atomic_write_text(Path(args.out), json.dumps(nan_to_null(result), indent=1, allow_nan=False) + "\n")
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(own)
    result["denoising_profile"] = denoising_profile(pipe, args.num_captions, DEFAULT_CALL["num_frames"],
                                                    DEFAULT_CALL["height"], seed=args.seed,
                                                    batch_size=args.batch_size)
    atomic_write_text(Path(args.out), json.dumps(nan_to_null(result), indent=1, allow_nan=False) + "\n")
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
