"""``diffattn eval-embedded``: generate from held-out captions and score them with the detector.

Held-out clips come from a seed stream the training script never draws from (training uses
``default_rng([seed, step, process])``; evaluation ``default_rng([EVAL_SEED, index])``). Note that
the 72 one-shape captions are all seen in training; two- and three-shape combinations mostly not.

The evaluation is :func:`evaluate_embedded` (what ``diffattn eval-embedded`` reports); two probes,
:func:`denoising_profile` and :func:`caption_sensitivity`, diagnose a model on the tuning stream
(``diffattn eval-embedded --probes``).

Example:
    >>> from diffattn.pipelines.embedded import load_embedded_pipeline
    >>> pipe = load_embedded_pipeline()
    >>> pipe.set_progress_bar_config(disable=True)
    >>> report, videos = evaluate_embedded(pipe, num_captions=1, num_frames=3, num_inference_steps=2)
    >>> 0.0 <= report["adherence"] <= 1.0, videos[0].shape
    (True, (3, 64, 64, 3))
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import numpy as np
import torch

from .._io import to_uint8
from ..errors import UserError
from ..patterns._checks import check_given_positive_ints, check_positive_int
from .embedded import DEFAULT_CALL
from .shape_detector import MAX_COLOUR_DISTANCE, score_video
from .shapes import (
    COLOURS,
    DIRECTIONS,
    FRAMES_BEFORE_BOUNCE,
    SHAPES,
    ClipSpec,
    caption,
    render_clip,
    sample_clip,
)

EVAL_SEED = 20261122
#: A second held-out stream for choosing recipes and settings, so that the reported numbers
#: (EVAL_SEED) are not tuned on.
TUNING_SEED = EVAL_SEED + 1
#: The headline numbers of a report, for comparing runs.
SUMMARY_KEYS = ("adherence", "motion_deviation_px", "adherence_by_check", "objects_fully_correct",
                "still_share", "spurious_per_video")
#: The issue's targets at the base length.
TARGET_ADHERENCE = 0.8
TARGET_DEVIATION_PX = 2.0


def held_out_specs(count: int, seed: int = EVAL_SEED):
    """``count`` clip specs from a held-out seed stream (disjoint from training's): ``EVAL_SEED``
    for reported numbers, ``TUNING_SEED`` for choosing settings.

    Example:
        >>> [len(spec.shapes) for spec in held_out_specs(3)]
        [1, 3, 1]
    """
    return [sample_clip(np.random.default_rng([seed, index])) for index in range(count)]


def evaluate_embedded(
    pipe: Any,
    num_captions: int = 32,
    num_frames: int = 17,
    size: int = 64,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    seed: int = 0,
    batch_size: int = 8,
    log: Callable[[str], None] | None = None,
    caption_seed: int = EVAL_SEED,
) -> tuple[dict[str, Any], list[np.ndarray]]:
    """Generate one video per held-out caption and score adherence and motion.

    Returns ``(report, videos)``: the uint8 ``[F, H, W, 3]`` videos and a JSON-able report:
    ``adherence`` (share of caption checks passed: each named shape present, of the right shape,
    starting in the right direction), ``adherence_by_check``,
    ``objects_fully_correct``, ``motion_deviation_px`` (mean over found shapes of the distance of
    their centroids from a constant-velocity-with-bounces fit), ``still_share`` (of the named
    shapes found, the share that do not move: slower than the detector's ``MIN_SPEED``, so their
    direction check fails whatever the caption says), ``spurious_per_video``, the same
    scores of the detector on the ground-truth renders of the same captions (its own error
    floor), ``targets_met``, settings, timings and per-video details. ``caption_seed`` picks the
    held-out stream: :data:`EVAL_SEED` for reported numbers, :data:`TUNING_SEED` for tuning.
    """
    check_positive_int("num_captions", num_captions)
    check_positive_int("batch_size", batch_size)
    specs = held_out_specs(num_captions, caption_seed)
    captions = [caption(spec) for spec in specs]
    call: dict[str, Any] = dict(num_frames=num_frames, height=size, width=size, output_type="np")
    if num_inference_steps is not None:
        call["num_inference_steps"] = num_inference_steps
    if guidance_scale is not None:
        call["guidance_scale"] = guidance_scale
    videos = []
    start = time.perf_counter()
    for first in range(0, num_captions, batch_size):
        batch = captions[first:first + batch_size]
        generators = [torch.Generator().manual_seed(seed + first + i) for i in range(len(batch))]
        frames = pipe(prompt=batch, generator=generators, **call).frames
        videos.extend(to_uint8(v) for v in frames)
        if log is not None:
            log(f"generated {len(videos)}/{num_captions}")
    seconds = time.perf_counter() - start

    scores = [score_video(video, spec) for video, spec in zip(videos, specs)]
    truth = [score_video(render_clip(spec, num_frames, size), spec) for spec in specs]

    def all_deviations(items) -> list[float]:
        return [d for s in items for d in s.deviations.values()]

    def summary(items) -> dict[str, float]:
        deviations = all_deviations(items)
        return {"adherence": float(np.mean([s.adherence for s in items])),
                "motion_deviation_px": float(np.mean(deviations)) if deviations else float("nan")}

    by_check = {kind: float(np.mean([ok for s in scores for name, ok in s.checks.items() if name.endswith(kind)]))
                for kind in ("present", "shape", "direction")}
    objects = [all(s.checks[f"{shape.colour} {kind}"] for kind in ("present", "shape", "direction"))
               for s, spec in zip(scores, specs) for shape in spec.shapes]
    found_directions = [s.detected[shape.colour]["direction"] for s, spec in zip(scores, specs)
                        for shape in spec.shapes if shape.colour in s.detected]
    deviations = all_deviations(scores)
    result = summary(scores)
    return {
        **result,
        "targets": {"adherence": TARGET_ADHERENCE, "motion_deviation_px": TARGET_DEVIATION_PX},
        "targets_met": bool(result["adherence"] >= TARGET_ADHERENCE
                            and result["motion_deviation_px"] <= TARGET_DEVIATION_PX),
        "adherence_by_check": by_check,
        "objects_fully_correct": float(np.mean(objects)),
        "still_share": float(np.mean([d == "still" for d in found_directions])) if found_directions else float("nan"),
        "motion_deviation_px_median": float(np.median(deviations)) if deviations else float("nan"),
        "spurious_per_video": float(np.mean([len(s.spurious) for s in scores])),
        "ground_truth": summary(truth),
        "num_captions": num_captions,
        "num_frames": num_frames,
        "height": size,
        "width": size,
        "num_inference_steps": call.get("num_inference_steps", DEFAULT_CALL["num_inference_steps"]),
        "guidance_scale": call.get("guidance_scale", DEFAULT_CALL["guidance_scale"]),
        "seed": seed,
        "caption_seed": caption_seed,
        "generation_seconds": seconds,
        "videos": [{"caption": text, "adherence": s.adherence, "checks": s.checks, "detected": s.detected,
                    "spurious": s.spurious} for text, s in zip(captions, scores)],
    }, videos


def check_sigmas(sigmas: tuple[float, ...]) -> None:
    """UserError unless ``sigmas`` is a non-empty sequence of noise levels in (0, 1].

    Example:
        >>> check_sigmas((0.5, 1.0))
    """
    if not sigmas or not all(0.0 < sigma <= 1.0 for sigma in sigmas):
        raise UserError(f"sigmas must be non-empty and in (0, 1]; got {sigmas!r}")


def clean_estimate(pipe: Any, noisy: torch.Tensor, sigma: float, text: torch.Tensor) -> torch.Tensor:
    """One conditional transformer call (no guidance): the clean-clip estimate ``[B, 3, F, H, W]``
    in [-1, 1] for ``noisy`` (``[B, 3, F, H, W]``) at noise level ``sigma``, with text embeddings
    ``text`` ``[B, L, TEXT_DIM]``; the transformer predicts the clean clip.

    Example:
        >>> from diffattn.pipelines.embedded import load_embedded_pipeline
        >>> pipe = load_embedded_pipeline()
        >>> clean_estimate(pipe, torch.zeros(1, 3, 2, 16, 16), 0.5, pipe.encode_prompt("a red circle moves up")).shape
        torch.Size([1, 3, 2, 16, 16])
    """
    dtype = pipe.transformer.dtype
    timestep = torch.full((noisy.shape[0],), sigma * pipe.scheduler.config.num_train_timesteps, device=noisy.device)
    output = pipe.transformer(noisy.to(dtype), timestep, text.to(dtype), return_dict=False)[0].float()
    return output.clamp(-1, 1)


#: Noise levels of the one-step denoising profile (rectified flow: x_t = (1 - sigma) x0 + sigma noise).
PROFILE_SIGMAS = (0.05, 0.2, 0.4, 0.6, 0.8, 0.95)


@torch.no_grad()
def denoising_profile(
    pipe: Any,
    num_captions: int = 16,
    num_frames: int = 17,
    size: int = 64,
    sigmas: tuple[float, ...] = PROFILE_SIGMAS,
    seed: int = 0,
    batch_size: int = 8,
    caption_seed: int = TUNING_SEED,
) -> dict[str, Any]:
    """Where along the noise axis the model fails: the true clips of held-out captions, noised to
    each ``sigma`` and denoised in one conditional model call (no guidance, no sampler), scored by
    the detector like generated videos.

    A model that scores well here at low sigma but generates badly renders fine and fails where
    a clip's layout and motion are decided (high sigma) or drifts there while sampling.

    Returns ``{"sigmas", "adherence", "adherence_by_check": {"present"|"shape"|"direction": [...]},
    "x0_mse"}``, one entry per sigma (``x0_mse`` on the [-1, 1] pixel scale).

    Example:
        >>> from diffattn.pipelines.embedded import load_embedded_pipeline
        >>> profile = denoising_profile(load_embedded_pipeline(), num_captions=1, num_frames=3, sigmas=(0.2, 0.9))
        >>> profile["sigmas"], len(profile["adherence"])
        ([0.2, 0.9], 2)
    """
    check_sigmas(sigmas)
    specs = held_out_specs(num_captions, caption_seed)
    device = pipe._execution_device
    estimates: dict[float, list[np.ndarray]] = {sigma: [] for sigma in sigmas}
    squared_error = {sigma: 0.0 for sigma in sigmas}
    for first in range(0, num_captions, batch_size):
        batch = specs[first:first + batch_size]
        clips = np.stack([render_clip(spec, num_frames, size) for spec in batch])
        clean = torch.from_numpy(clips).float().permute(0, 4, 1, 2, 3).to(device) / 127.5 - 1.0  # [B, 3, F, H, W]
        text = pipe.encode_prompt([caption(spec) for spec in batch], device)
        noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(seed + first)).to(device)
        for sigma in sigmas:
            noisy = (1 - sigma) * clean + sigma * noise
            estimate = clean_estimate(pipe, noisy, sigma, text)
            squared_error[sigma] += float(((estimate - clean) ** 2).mean()) * len(batch)
            frames = ((estimate + 1) / 2).permute(0, 2, 3, 4, 1).cpu().numpy()
            estimates[sigma].extend(to_uint8(video) for video in frames)
    scores = {sigma: [score_video(video, spec) for video, spec in zip(estimates[sigma], specs)] for sigma in sigmas}

    def share(items, kind: str) -> float:
        return float(np.mean([ok for score in items for name, ok in score.checks.items() if name.endswith(kind)]))

    return {
        "sigmas": list(sigmas),
        "adherence": [float(np.mean([score.adherence for score in scores[sigma]])) for sigma in sigmas],
        "adherence_by_check": {kind: [share(scores[sigma], kind) for sigma in sigmas]
                               for kind in ("present", "shape", "direction")},
        "x0_mse": [squared_error[sigma] / num_captions for sigma in sigmas],
        "num_captions": num_captions,
        "caption_seed": caption_seed,
    }


#: Noise levels of the caption-sensitivity probe: pure noise (only the caption says anything) and
#: just below, where a model may already copy what it sees instead of reading the caption.
SENSITIVITY_SIGMAS = (1.0, 0.9)
#: Which word of the first named shape the probe swaps.
SWAPPED_WORDS = ("colour", "shape", "direction")
OPPOSITE = {name: next(other for other, (ox, oy) in DIRECTIONS.items() if (ox, oy) == (-dx, -dy))
            for name, (dx, dy) in DIRECTIONS.items()}


def swapped_specs(spec: ClipSpec) -> dict[str, ClipSpec]:
    """``spec`` with one word of its first shape's phrase changed, per kind of word: the colour to
    the first palette colour the clip does not use, the shape to the next one, the direction to
    its opposite. Geometry (start, size, speed) stays, so only the caption differs.

    Example:
        >>> spec = held_out_specs(1)[0]
        >>> caption(spec), caption(swapped_specs(spec)["direction"])
        ('a red square moves up', 'a red square moves down')
    """
    first = spec.shapes[0]
    used = {shape.colour for shape in spec.shapes}
    changes = {"colour": dict(colour=next(c for c in COLOURS if c not in used)),
               "shape": dict(shape=SHAPES[(SHAPES.index(first.shape) + 1) % len(SHAPES)]),
               "direction": dict(direction=OPPOSITE[first.direction])}
    return {kind: dataclasses.replace(spec, shapes=(dataclasses.replace(first, **change), *spec.shapes[1:]))
            for kind, change in changes.items()}


def colour_centroids(video: torch.Tensor, colour: str) -> torch.Tensor:
    """``[F, 2]`` (x, y) pixel centroids of how much each pixel of ``video`` ``[3, F, H, W]`` (in
    [-1, 1]) looks like palette ``colour``: weight 1 at the colour, falling linearly to 0 at the
    detector's colour tolerance, so blurry estimates count too and grey backgrounds do not.

    Example:
        >>> video = torch.full((3, 2, 16, 16), -1.0)                    # black, 2 frames
        >>> video[:, :, 4:8, 4:8] = (torch.tensor([220.0, 50.0, 50.0]) / 127.5 - 1).view(3, 1, 1, 1)
        >>> colour_centroids(video, "red")                              # a red 4x4 square at pixels 4..7
        tensor([[6., 6.],
                [6., 6.]])
    """
    rgb = (video.float() + 1) * 127.5
    target = torch.tensor(COLOURS[colour], dtype=torch.float32, device=video.device).view(3, 1, 1, 1)
    weight = (1 - torch.linalg.vector_norm(rgb - target, dim=0) / MAX_COLOUR_DISTANCE).clamp(min=0)  # [F, H, W]
    height, width = weight.shape[1:]
    ys = torch.arange(height, dtype=torch.float32, device=video.device) + 0.5
    xs = torch.arange(width, dtype=torch.float32, device=video.device) + 0.5
    # A frame with less than one pixel's worth of the colour has no centroid (NaN), not (0, 0).
    mass = weight.sum((1, 2))
    mass = torch.where(mass >= 1.0, mass, torch.full_like(mass, float("nan")))
    return torch.stack([(weight.sum(1) * xs).sum(-1) / mass, (weight.sum(2) * ys).sum(-1) / mass], dim=1)


@torch.no_grad()
def caption_sensitivity(
    pipe: Any,
    num_captions: int = 16,
    num_frames: int = 17,
    size: int = 64,
    sigmas: tuple[float, ...] = SENSITIVITY_SIGMAS,
    seed: int = 0,
    batch_size: int = 8,
    caption_seed: int = TUNING_SEED,
) -> dict[str, Any]:
    """Does the model read each kind of caption word? The clean-clip estimate of one conditional
    call on the same noisy input, with the true caption and with one word of the first shape's
    phrase swapped (:func:`swapped_specs`).

    Returns, per sigma: ``mean_abs_change`` of the estimate per swapped word kind (pixel scale
    [-1, 1]; 0 = the word is ignored), and ``direction_following_px_per_frame``: how much faster
    the first shape's colour mass moves along its captioned direction over the first
    ``FRAMES_BEFORE_BOUNCE`` frames with the true caption than with the opposite direction, halved
    -- about the shapes' speed (1 to 2.5 px/frame) for a model that follows the direction word,
    0 for one that ignores it; NaN where no estimate holds the shape's colour within the
    detector's tolerance (a blurry mean prediction at sigma 1 often does not). At sigma 1 the
    input is pure noise, so a model can only get layout and motion from the caption.

    Example:
        >>> from diffattn.pipelines.embedded import load_embedded_pipeline
        >>> probe = caption_sensitivity(load_embedded_pipeline(), num_captions=1, num_frames=3)
        >>> sorted(probe["mean_abs_change"])
        ['colour', 'direction', 'shape']
    """
    check_sigmas(sigmas)
    specs = held_out_specs(num_captions, caption_seed)
    device = pipe._execution_device
    frames = min(num_frames, FRAMES_BEFORE_BOUNCE + 1)
    change = {sigma: {kind: 0.0 for kind in SWAPPED_WORDS} for sigma in sigmas}
    following = {sigma: [] for sigma in sigmas}
    for first in range(0, num_captions, batch_size):
        batch = specs[first:first + batch_size]
        variants = {"true": batch, **{kind: [swapped_specs(spec)[kind] for spec in batch] for kind in SWAPPED_WORDS}}
        texts = {
            kind: pipe.encode_prompt([caption(spec) for spec in items], device) for kind, items in variants.items()
        }
        noise = torch.randn(
            (len(batch), 3, num_frames, size, size), generator=torch.Generator().manual_seed(seed + first)
        ).to(device)
        clean = torch.from_numpy(np.stack([render_clip(spec, num_frames, size) for spec in batch]))
        clean = clean.float().permute(0, 4, 1, 2, 3).to(device) / 127.5 - 1.0
        for sigma in sigmas:
            noisy = (1 - sigma) * clean + sigma * noise
            estimates = {kind: clean_estimate(pipe, noisy, sigma, text) for kind, text in texts.items()}
            for kind in SWAPPED_WORDS:
                change[sigma][kind] += float((estimates[kind] - estimates["true"]).abs().mean()) * len(batch)
            for index, spec in enumerate(batch):
                shape_spec = spec.shapes[0]
                unit = torch.tensor(DIRECTIONS[shape_spec.direction], dtype=torch.float32, device=device)
                speeds = []
                for kind in ("true", "direction"):
                    track = colour_centroids(estimates[kind][index, :, :frames], shape_spec.colour)
                    speeds.append(float(((track[-1] - track[0]) / max(1, frames - 1)) @ unit))
                following[sigma].append((speeds[0] - speeds[1]) / 2)

    def mean_of_found(values: list[float]) -> float:
        found = [value for value in values if value == value]
        return float(np.mean(found)) if found else float("nan")

    return {
        "sigmas": list(sigmas),
        "mean_abs_change": {kind: [change[sigma][kind] / num_captions for sigma in sigmas] for kind in SWAPPED_WORDS},
        "direction_following_px_per_frame": [mean_of_found(following[sigma]) for sigma in sigmas],
        "num_captions": num_captions,
        "caption_seed": caption_seed,
    }


def contact_sheet(videos: list[np.ndarray], frames: tuple[int, ...] = (0, 8, 16), rows: int = 8) -> np.ndarray:
    """``uint8 [rows*H, len(frames)*W, 3]``: the given frames (clamped to each video's length) of
    the first ``rows`` videos, one video per row.

    Example:
        >>> contact_sheet([np.zeros((17, 64, 64, 3), np.uint8)] * 2).shape
        (128, 192, 3)
    """
    lines = []
    for video in videos[:rows]:
        lines.append(np.concatenate([video[min(f, len(video) - 1)] for f in frames], axis=1))
    return np.concatenate(lines, axis=0)


def write_report(report: dict[str, Any], videos: list[np.ndarray], path: str) -> list[str]:
    """Write the JSON report atomically, and a PNG contact sheet of ``videos`` (uint8
    ``[F, H, W, 3]`` each) beside it; returns the paths.

    Example:
        >>> import tempfile
        >>> video = np.zeros((3, 64, 64, 3), np.uint8)
        >>> paths = write_report({"adherence": 0.5}, [video], f"{tempfile.mkdtemp()}/r.json")
        >>> [path.rsplit(".", 1)[1] for path in paths]
        ['json', 'png']
    """
    import json
    from pathlib import Path

    from PIL import Image

    from .._io import atomic_path, atomic_write_text

    target = Path(path)
    atomic_write_text(target, json.dumps(nan_to_null(report), indent=1, allow_nan=False) + "\n")
    sheet = target.with_suffix(".png")
    with atomic_path(sheet) as tmp:
        Image.fromarray(contact_sheet(videos)).save(tmp, format="PNG")
    return [str(target), str(sheet)]


def nan_to_null(value: Any) -> Any:
    """``value`` with every NaN (no shape found to measure) replaced by None: JSON has no NaN.

    Example:
        >>> nan_to_null({"deviation": [1.0, float("nan")]})
        {'deviation': [1.0, None]}
    """
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: nan_to_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [nan_to_null(v) for v in value]
    return value


def run_evaluation(report_path: str, model: str | None = None, preset: str = "dense", num_captions: int = 32,
                   num_frames: int = 17, size: int = 64, num_inference_steps: int | None = None,
                   guidance_scale: float | None = None, seed: int = 0, batch_size: int = 8,
                   log: Callable[[str], None] | None = None, probes: bool = False
                   ) -> tuple[dict[str, Any], list[str]]:
    """``diffattn eval-embedded``: check the arguments, load the model, apply ``preset``, evaluate
    and write the report (JSON + PNG contact sheet); returns ``(report, written paths)``. Bad
    arguments raise UserError before any work. ``probes`` adds the :func:`denoising_profile` and
    :func:`caption_sensitivity` diagnostics (on the tuning stream) to the report.

    Example:
        >>> import tempfile
        >>> folder = tempfile.mkdtemp()
        >>> report, paths = run_evaluation(f"{folder}/eval.json", num_captions=1, num_frames=3, num_inference_steps=2)
        >>> [path.rsplit(".", 1)[1] for path in paths], "denoising_profile" in report
        (['json', 'png'], False)
    """
    from pathlib import Path

    from ..adapters import apply
    from .embedded import check_size, fitting_preset, load_embedded_pipeline

    if Path(report_path).suffix.lower() != ".json":
        raise UserError(f"--report must be a .json path; got {report_path!r}")
    check_given_positive_ints({"--num-captions": num_captions, "--batch-size": batch_size,
                               "--steps": num_inference_steps})
    check_size(num_frames, size, size, cli_flags=True)
    loaded = fitting_preset(preset, num_frames, size, size)
    try:
        pipe = load_embedded_pipeline(model)
    except FileNotFoundError as error:
        raise UserError(str(error)) from None
    apply(pipe, loaded.config)
    report, videos = evaluate_embedded(pipe, num_captions, num_frames, size, num_inference_steps, guidance_scale,
                                       seed, batch_size, log)
    if probes:  # on the tuning stream: diagnostics, not reported scores
        report["denoising_profile"] = denoising_profile(pipe, num_captions, num_frames, size, seed=seed,
                                                        batch_size=batch_size)
        report["caption_sensitivity"] = caption_sensitivity(pipe, num_captions, num_frames, size, seed=seed,
                                                            batch_size=batch_size)
    report["model"] = model or "embedded (shipped)"
    report["preset"] = loaded.name
    report["device"] = "cpu"
    report["torch_threads"] = torch.get_num_threads()
    return report, write_report(report, videos, report_path)
