#!/usr/bin/env python3
"""Train diffattn's embedded default model (pixel-space Wan transformer + tiny text encoder).

Rectified-flow training (the objective of Wan and FlowMatchEulerDiscreteScheduler) on procedural
clips from :mod:`diffattn.pipelines.shapes`, generated on the fly: every step's batch, noise and
timesteps come from generators seeded by ``(seed, step, process)``, so a resumed run sees exactly
the batches an uninterrupted run would. accelerate handles devices and (with ``accelerate
launch``) data-parallel processes; nothing here is specific to one machine.

    python scripts/train_embedded_model.py                 # reproduces the shipped weights (2 CPU cores)
    python scripts/train_embedded_model.py --resume        # continue from the latest checkpoint
    python scripts/train_embedded_model.py --steps 5 --output /tmp/tiny   # smoke run

Checkpoints (``--checkpoint-dir``) are safetensors only (weights, EMA weights, optimizer moments)
plus a JSON file; nothing is pickled. The final pipeline (EMA weights) is written with
``save_pretrained`` to ``--output`` (by default the package's ``diffattn/pipelines/embedded_model``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from diffattn._io import atomic_path, atomic_write_text  # noqa: E402
from diffattn.pipelines.embedded import (  # noqa: E402
    EMBEDDED_DIR, EmbeddedModelConfig, EmbeddedVideoPipeline, build_components, check_prediction_type,
    clean_estimate_from_output, encode_text, is_embedded_folder, latent_grid, load_embedded_pipeline, model_timesteps,
    pyramid_frame_sigmas, shifted_sigmas, transformer_input,
)
from diffattn.pipelines.shapes import FRAMES_BEFORE_BOUNCE, MAX_RUN_UP_FRAMES, sample_batch  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", default=str(EMBEDDED_DIR), help="pipeline folder to write (save_pretrained)")
    p.add_argument("--checkpoint-dir", default=str(REPO / "runs" / "embedded"), help="checkpoints and loss log")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --checkpoint-dir")
    p.add_argument("--steps", type=int, default=4000, help="length of the learning-rate schedule")
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop (and write the pipeline) after this many steps of the --steps schedule")
    p.add_argument("--batch-size", type=int, default=4, help="clips per step and process")
    p.add_argument("--num-frames", type=int, default=17, help="clip length (the base length the model ships at)")
    p.add_argument("--short-frames", type=int, default=9,
                   help="clip length of the first --short-share of the steps: a 9-frame step costs about half "
                        "a 17-frame one, so the model sees more clips in the same time; the rest of the steps "
                        "train at --num-frames (RoPE positions simply extend in time)")
    p.add_argument("--short-share", type=float, default=0.0,
                   help="share of the --steps schedule trained at --short-frames, in [0, 1); 0 (the shipped "
                        "recipe) trains every step at --num-frames. 5600 steps at 0.75 (84 min) scored below "
                        "the shipped recipe: benchmarks/results/embedded-progressive-length-cpu-2026-12-02.json")
    p.add_argument("--size", type=int, default=64, help="frame height and width in pixels")
    p.add_argument("--lr", type=float, default=1.2e-3)
    p.add_argument("--warmup", type=int, default=100, help="linear warm-up steps")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--ema", type=float, default=0.998, help="EMA decay of the shipped weights")
    p.add_argument("--caption-dropout", type=float, default=0.1, help="share of empty captions (for CFG)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--timestep-shift", type=float, default=3.0,
                   help="shift of the training noise levels sigma = s*u / (1 + (s-1)*u), u uniform; above the "
                        "sampler's --shift, training sees more of the high noise levels where the layout and "
                        "motion of a clip are decided")
    p.add_argument("--min-loss-sigma", type=float, default=1.0,
                   help="x-prediction: the loss is (x0_hat - x0) / max(sigma, this). 1 (the default) is the "
                        "plain x0 error, every noise level weighted alike; smaller values approach the velocity "
                        "loss, which weights near-clean steps up to 1/this**2 times more")
    p.add_argument("--run-up-frames", type=int, default=FRAMES_BEFORE_BOUNCE,
                   help="training clips: frames every shape travels before its first bounce (it starts in the "
                        "part of the frame it moves away from, so where it is depends on its direction)")
    p.add_argument("--frame-noise-share", type=float, default=0.0,
                   help="share of the training clips whose frames get independent noise levels (Diffusion "
                        "Forcing, Chen et al. 2024) instead of one per clip: denoising a noisy frame next to "
                        "cleaner ones needs the motion the caption names, and the pipeline's frame_lag schedule "
                        "(earlier frames ahead of later ones; tune_embedded_sampler.py lag=) relies on it. "
                        "0 (the shipped recipe) gives every frame of a clip the same noise level; 0.5 scored "
                        "below it on the tuning captions (benchmarks/results/embedded-frame-noise-cpu-2026-12-03.json)")
    p.add_argument("--pyramid-share", type=float, default=0.0,
                   help="share of the training clips noised like a state of the pipeline's frame_lag sampler "
                        "(rolling / pyramid schedule: a random overall progress and a lag in [0.25, 0.75], "
                        "earlier frames cleaner than later ones), so the lagged sampler meets the states it was "
                        "trained on and a noisy frame next to clean earlier ones has to take its motion from "
                        "them or the caption. Drawn after --frame-noise-share; 0 (the shipped recipe) leaves it out")
    p.add_argument("--first-frame-share", type=float, default=0.0,
                   help="share of the training clips whose first frame is given clean (per-token timestep 0, "
                        "as Wan 2.2 TI2V conditions on its first frame) while the other frames share one noise "
                        "level; the given frame is left out of the loss. Where a shape starts is then known and "
                        "only the caption tells where it goes, so the direction word carries real weight. The "
                        "pipeline's first-frame sampler (frame 0 drawn alone, then the rest next to it) needs "
                        "it and --image-batch. Drawn after the other shares; 0 (the shipped recipe) leaves it out. "
                        "A 3000-step fine-tune of the shipped model at 0.7 did not teach the direction word "
                        "(benchmarks/results/embedded-first-frame-cpu-2026-12-04.json)")
    p.add_argument("--image-batch", type=int, default=0,
                   help="single first frames (1-frame clips of their own captions) trained per step next to the "
                        "clips, in a second forward; their loss is added to the clips' loss. The first-frame "
                        "sampler draws frame 0 this way. 0 leaves them out")
    p.add_argument("--init-from", default=None,
                   help="start from the transformer and text encoder of a saved embedded pipeline folder "
                        "(same sizes) instead of a fresh initialisation; ignored when --resume finds a checkpoint")
    p.add_argument("--motion-loss-weight", type=float, default=0.0,
                   help="x-prediction: weight of an extra loss on the error of frame-to-frame differences "
                        "(emphasises motion over appearance; 0, the shipped recipe, leaves it out)")
    for field, default in EmbeddedModelConfig.__dataclass_fields__.items():
        if isinstance(default.default, bool):  # --stochastic-sampling / --no-stochastic-sampling
            p.add_argument(f"--{field.replace('_', '-')}", action=argparse.BooleanOptionalAction, default=default.default)
        else:
            p.add_argument(f"--{field.replace('_', '-')}", type=type(default.default), default=default.default)
    args = p.parse_args(argv)
    for name in ("steps", "batch_size", "num_frames", "short_frames", "size", "save_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")
    if args.stop_after is not None and not 1 <= args.stop_after <= args.steps:
        p.error(f"--stop-after must be in 1..--steps ({args.steps}); got {args.stop_after}")
    if not 0.0 <= args.short_share < 1.0:
        p.error(f"--short-share must be in [0, 1), so the last steps train at --num-frames; got {args.short_share}")
    if args.size % 8:
        p.error(f"--size must be a multiple of 8 (the patch); got {args.size}")
    try:
        check_prediction_type(args.prediction_type)
    except ValueError as error:
        p.error(f"--prediction-type: {error}")
    if args.timestep_shift <= 0:
        p.error(f"--timestep-shift must be > 0; got {args.timestep_shift}")
    if not 0 <= args.run_up_frames <= MAX_RUN_UP_FRAMES:
        p.error(f"--run-up-frames must be in 0..{MAX_RUN_UP_FRAMES}; got {args.run_up_frames}")
    if not 0.0 <= args.frame_noise_share <= 1.0:
        p.error(f"--frame-noise-share must be in [0, 1]; got {args.frame_noise_share}")
    if not 0.0 <= args.pyramid_share <= 1.0 or args.frame_noise_share + args.pyramid_share > 1.0:
        p.error(f"--pyramid-share must be in [0, 1] and at most 1 - --frame-noise-share; got {args.pyramid_share}")
    if not 0.0 <= args.first_frame_share <= 1.0 - args.frame_noise_share - args.pyramid_share + 1e-9:
        p.error(f"--first-frame-share must be in [0, 1 - --frame-noise-share - --pyramid-share]; "
                f"got {args.first_frame_share}")
    if args.image_batch < 0:
        p.error(f"--image-batch must be >= 0; got {args.image_batch}")
    if args.init_from is not None and not is_embedded_folder(args.init_from):
        p.error(f"--init-from must be a saved embedded pipeline folder (model_index.json with _class_name "
                f"EmbeddedVideoPipeline); got {args.init_from!r}")
    if args.motion_loss_weight < 0:
        p.error(f"--motion-loss-weight must be >= 0; got {args.motion_loss_weight}")
    if not 0.0 < args.min_loss_sigma <= 1.0:
        p.error(f"--min-loss-sigma must be in (0, 1]; got {args.min_loss_sigma}")
    if not 0.0 <= args.caption_dropout < 1.0:
        p.error(f"--caption-dropout must be in [0, 1); got {args.caption_dropout}")
    return args


def learning_rate(step: int, args: argparse.Namespace) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def clip_frames(step: int, args: argparse.Namespace) -> int:
    """Clip length at ``step`` (0-based): ``--short-frames`` for the first ``--short-share`` of the
    ``--steps`` schedule, ``--num-frames`` after (a function of the step alone, so resuming is exact)."""
    return args.short_frames if step < args.short_share * args.steps else args.num_frames


#: Lags of the pyramid training states (--pyramid-share); the sampler's lag= is tuned inside this range.
PYRAMID_LAGS = (0.25, 0.75)


def frame_sigmas(batch: int, num_frames: int, shift: float, frame_noise_share: float,
                 generator: torch.Generator, pyramid_share: float = 0.0, first_frame_share: float = 0.0
                 ) -> torch.Tensor:
    """``[batch, num_frames]`` training noise levels: one shifted-uniform level per clip; for a
    ``frame_noise_share`` of the clips an independent level per frame instead; for a
    ``pyramid_share`` a pyramid state (:func:`pyramid_frame_sigmas` at uniform progress and a lag
    uniform in :data:`PYRAMID_LAGS`); for a ``first_frame_share`` one level per clip but frame 0
    clean (0). The shares are of all clips and exclusive. With all shares 0 this draws exactly what
    the shipped recipe drew (one ``rand(batch)``), so it still reproduces; each share draws only
    when above 0, in the order above, so adding a later share keeps the earlier shares' draws."""
    sigma = shifted_sigmas(torch.rand(batch, generator=generator), shift)[:, None].expand(batch, num_frames)
    sigma = sigma.contiguous()
    taken = torch.zeros(batch, dtype=torch.bool)  # clips already given a state other than one level
    if frame_noise_share > 0:  # the draws (and their order) of the recorded --frame-noise-share runs
        per_frame = shifted_sigmas(torch.rand(batch, num_frames, generator=generator), shift)
        taken = torch.rand(batch, generator=generator) < frame_noise_share
        sigma = torch.where(taken[:, None], per_frame, sigma)
    if pyramid_share > 0:
        low, high = PYRAMID_LAGS
        lag = low + (high - low) * torch.rand(batch, generator=generator)
        pyramid = pyramid_frame_sigmas(torch.rand(batch, generator=generator), num_frames, lag, shift)
        # among the clips not given per-frame levels, so that pyramid_share is a share of all clips
        chosen = (torch.rand(batch, generator=generator) * (1 - frame_noise_share) < pyramid_share) & ~taken
        sigma = torch.where(chosen[:, None], pyramid, sigma)
        taken |= chosen
    if first_frame_share > 0:
        left = 1 - frame_noise_share - pyramid_share
        chosen = (torch.rand(batch, generator=generator) * left < first_frame_share) & ~taken
        sigma[chosen, 0] = 0.0
    return sigma


# ---- checkpoints: safetensors + JSON, written atomically ------------------------------------------------

def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        # clone(): tied weights (the text encoder's shared embedding) must not share memory in safetensors
        save_file({k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}, str(tmp))


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Flatten an optimizer's state into safetensors-able tensors and a JSON-able remainder."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entry in state["state"].items():
        for name, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{name}"] = value
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    for key, value in meta["scalars"].items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(folder: Path, step: int, models: dict[str, torch.nn.Module], ema: dict[str, torch.Tensor],
                    optimizer: torch.optim.Optimizer, losses: list[float], args: argparse.Namespace) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    weights = {f"{name}.{k}": v for name, model in models.items() for k, v in model.state_dict().items()}
    _save_tensors(weights, folder / "weights.safetensors")
    _save_tensors(ema, folder / "ema.safetensors")
    tensors, meta = optimizer_tensors(optimizer)
    _save_tensors(tensors, folder / "optimizer.safetensors")
    # Written last: a checkpoint counts only once its JSON names the step all files belong to.
    atomic_write_text(folder / "checkpoint.json", json.dumps(
        {"step": step, "optimizer": meta, "args": vars(args), "recent_losses": losses[-100:]}, indent=1))


def load_checkpoint(folder: Path, models: dict[str, torch.nn.Module], ema: dict[str, torch.Tensor],
                    optimizer: torch.optim.Optimizer) -> int:
    """Restore weights, EMA and optimizer; return the number of steps already done (0 if none)."""
    from safetensors.torch import load_file

    info_path = folder / "checkpoint.json"
    if not info_path.is_file():
        return 0
    info = json.loads(info_path.read_text())
    weights = load_file(str(folder / "weights.safetensors"))
    for name, model in models.items():
        prefix = f"{name}."
        model.load_state_dict({k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)})
    for key, value in load_file(str(folder / "ema.safetensors")).items():
        ema[key].copy_(value)
    restore_optimizer(optimizer, load_file(str(folder / "optimizer.safetensors")), info["optimizer"])
    return int(info["step"])


def broadcast_sigma(sigma: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """``[B]`` or ``[B, F]`` noise levels as ``[B, 1, F or 1, 1, 1]``, broadcastable to ``[B, C, F, H, W]``."""
    if sigma.ndim == 1:
        return sigma.view(-1, 1, 1, 1, 1)
    if sigma.ndim == 2 and sigma.shape[1] == clean.shape[2]:
        return sigma.view(sigma.shape[0], 1, sigma.shape[1], 1, 1)
    raise ValueError(f"sigma must be [B] or [B, F={clean.shape[2]}]; got shape {tuple(sigma.shape)}")


def denoising_loss(prediction: torch.Tensor, clean: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor,
                   prediction_type: str, min_loss_sigma: float, motion_weight: float = 0.0) -> torch.Tensor:
    """Rectified-flow loss; ``sigma`` is ``[B]`` (one noise level per clip) or ``[B, F]`` (per frame).
    "flow": MSE to the velocity ``noise - clean``. "sample" and
    "sample_skip": the output is turned into the clean-clip estimate (for "sample_skip",
    ``x0_hat = c_skip x_t + c_out output``, :func:`clean_estimate_from_output`) and the loss is
    ``(x0_hat - x0) / max(sigma, min_loss_sigma)``: the velocity error (as JiT) for
    ``min_loss_sigma -> 0``, the plain x0 error at 1. The shipped model uses 1: with the velocity
    loss (0.25) near-clean steps, which this model already denoises well, got up to 16x the weight
    of the high noise levels where it fails (layout, colour and motion are decided there).
    ``motion_weight`` adds the same error on frame-to-frame differences, so an error that changes
    between frames (wrong motion) costs more than one that stays. Frames with sigma 0 (given clean)
    are left out of the loss."""
    if prediction_type == "flow":
        return torch.nn.functional.mse_loss(prediction, noise - clean)
    s = broadcast_sigma(sigma, clean)
    weight = s.clamp(min=min_loss_sigma)
    noisy = (1 - s) * clean + s * noise
    estimate = clean_estimate_from_output(prediction, noisy, s, prediction_type)
    error = (estimate - clean) / weight  # [B, C, F, H, W]
    if bool((s == 0).any()):
        # frames given clean (--first-frame-share) are conditioning, not something to denoise
        denoised = (s > 0).expand_as(error)
        loss = (error ** 2)[denoised].mean()
    else:  # (the shipped recipe's exact arithmetic)
        loss = torch.mean(error ** 2)
    if motion_weight > 0:
        loss = loss + motion_weight * torch.mean((error[:, :, 1:] - error[:, :, :-1]) ** 2)
    return loss


def write_pipeline(components: dict, ema: dict[str, torch.Tensor], output: Path, provenance: dict,
                   prediction_type: str, first_frame_sampling: bool = False) -> None:
    """save_pretrained the pipeline with the EMA weights into a temporary folder (plus
    ``training.json``: how it was made), then swap it in. ``first_frame_sampling`` makes the
    first-frame sampler the saved pipeline's default."""
    for name in ("transformer", "text_encoder"):
        model = components[name]
        model.load_state_dict({k[len(name) + 1:]: v for k, v in ema.items() if k.startswith(name + ".")})
    pipe = EmbeddedVideoPipeline(**components, prediction_type=prediction_type,
                                 first_frame_sampling=first_frame_sampling)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it 0700; the package folder must be readable
    try:
        pipe.save_pretrained(str(staging))
        (staging / "training.json").write_text(json.dumps(provenance, indent=1) + "\n")
        if output.exists():
            old = output.with_name(f".{output.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(output, old)
            os.replace(staging, output)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def init_from_pipeline(models: dict[str, torch.nn.Module], folder: Path) -> None:
    """Load the transformer and text encoder weights of a saved pipeline (``--init-from``);
    ValueError naming the folder when its sizes differ from the ones asked for."""
    saved = load_embedded_pipeline(folder)
    for name, model in models.items():
        try:
            model.load_state_dict(getattr(saved, name).state_dict())
        except RuntimeError as error:
            raise ValueError(f"--init-from {str(folder)!r}: its {name} does not match the model sizes asked "
                             f"for: {str(error).splitlines()[0]}") from None


def drop_captions(rng: np.random.Generator, captions: list[str], share: float) -> list[str]:
    """Each caption replaced by the empty one with probability ``share`` (for classifier-free guidance)."""
    return ["" if rng.random() < share else c for c in captions]


def noisy_batch(videos: np.ndarray, shift: float, generator: torch.Generator, args: argparse.Namespace,
                shares: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """uint8 clips ``[B, F, H, W, 3]`` -> ``(clean, noise, sigma [B, F], noisy, timestep)``, pixels in [-1, 1]
    as ``[B, 3, F, H, W]``. ``shares=False`` (the single-frame images) gives one level per clip."""
    clean = torch.from_numpy(videos).to(torch.float32).permute(0, 4, 1, 2, 3) / 127.5 - 1.0
    noise = torch.randn(clean.shape, generator=generator)
    if shares:
        sigma = frame_sigmas(clean.shape[0], clean.shape[2], shift, args.frame_noise_share, generator,
                             args.pyramid_share, args.first_frame_share)
    else:
        sigma = frame_sigmas(clean.shape[0], clean.shape[2], shift, 0.0, generator)
    s = broadcast_sigma(sigma, clean)
    noisy = (1 - s) * clean + s * noise
    if shares and (args.frame_noise_share > 0 or args.pyramid_share > 0 or args.first_frame_share > 0):
        timestep = model_timesteps(sigma, latent_grid(*clean.shape[2:]).tokens_per_frame)
    else:  # one level per clip: the scalar timestep path of the shipped recipe
        timestep = sigma[:, 0] * 1000
    return clean, noise, sigma, noisy, timestep


def main(argv: list[str] | None = None) -> int:
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    accelerator = Accelerator()
    config = EmbeddedModelConfig(**{f: getattr(args, f) for f in EmbeddedModelConfig.__dataclass_fields__})
    components = build_components(config, seed=args.seed)
    tokenizer, text_encoder, transformer = components["tokenizer"], components["text_encoder"], components["transformer"]
    models = {"transformer": transformer, "text_encoder": text_encoder}
    if args.init_from is not None:
        init_from_pipeline(models, Path(args.init_from))
    parameters = [p for model in models.values() for p in model.parameters()]
    decay = [p for p in parameters if p.ndim >= 2]
    no_decay = [p for p in parameters if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.99))
    ema = {f"{name}.{k}": v.detach().clone().float() for name, model in models.items()
           for k, v in model.state_dict().items()}
    checkpoints = Path(args.checkpoint_dir)
    start = load_checkpoint(checkpoints, models, ema, optimizer) if args.resume else 0
    stop = args.steps if args.stop_after is None else args.stop_after
    if start > stop:
        raise SystemExit(f"error: the checkpoint is at step {start}, past the requested stop at step {stop}")
    if start == stop:
        accelerator.print(f"checkpoint is at step {start}: writing the pipeline only")
    transformer, text_encoder, optimizer = accelerator.prepare(transformer, text_encoder, optimizer)
    device = accelerator.device
    ema = {key: value.to(device) for key, value in ema.items()}  # updated in place next to the weights
    shift = args.timestep_shift
    losses: list[float] = []
    log_path = checkpoints / "loss.jsonl"
    checkpoints.mkdir(parents=True, exist_ok=True)
    if not args.resume and log_path.exists():
        log_path.unlink()

    progress = tqdm(range(start, stop), initial=start, total=stop, desc="train",
                    disable=not accelerator.is_local_main_process)
    began = time.perf_counter()
    for step in progress:
        rng = np.random.default_rng([args.seed, step, accelerator.process_index])
        videos, captions, _ = sample_batch(rng, args.batch_size, clip_frames(step, args), args.size,
                                           run_up_frames=args.run_up_frames)
        captions = drop_captions(rng, captions, args.caption_dropout)
        generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args)

        def batch_loss(clips: np.ndarray, texts: list[str], shares: bool) -> torch.Tensor:
            clean, noise, sigma, noisy, timestep = noisy_batch(clips, shift, generator, args, shares)
            model_input = transformer_input(components["transformer"], noisy.to(device))  # the unwrapped model's config
            prediction = transformer(model_input, timestep.to(device), encode_text(tokenizer, text_encoder, texts, device),
                                     return_dict=False)[0]
            # no motion term for single frames (it has no frame pairs)
            return denoising_loss(prediction.float(), clean.to(device), noise.to(device), sigma.to(device),
                                  args.prediction_type, args.min_loss_sigma, args.motion_loss_weight if shares else 0.0)

        loss = batch_loss(videos, captions, shares=True)
        if args.image_batch > 0:  # drawn after everything above, so the clips are those of a run without
            images, image_captions, _ = sample_batch(rng, args.image_batch, 1, args.size, run_up_frames=args.run_up_frames)
            loss = loss + batch_loss(images, drop_captions(rng, image_captions, args.caption_dropout), shares=False)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        with torch.no_grad():
            rate = min(args.ema, (1 + step) / (10 + step))
            for name, model in models.items():
                for k, v in accelerator.unwrap_model(model).state_dict().items():
                    ema[f"{name}.{k}"].lerp_(v.float(), 1 - rate)
        value = float(accelerator.gather(loss.detach()).mean())
        losses.append(value)
        progress.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}", lr=f"{learning_rate(step, args):.1e}")
        if accelerator.is_main_process:
            with open(log_path, "a") as log:
                log.write(json.dumps({"step": step + 1, "frames": clip_frames(step, args), "loss": value,
                                     "seconds": time.perf_counter() - began}) + "\n")
            if (step + 1) % args.save_every == 0 or step + 1 == stop:
                save_checkpoint(checkpoints, step + 1, {n: accelerator.unwrap_model(m) for n, m in
                                                        (("transformer", transformer), ("text_encoder", text_encoder))},
                                ema, optimizer, losses, args)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        components["transformer"] = accelerator.unwrap_model(transformer)
        components["text_encoder"] = accelerator.unwrap_model(text_encoder)
        log = [json.loads(line) for line in log_path.read_text().splitlines()] if log_path.is_file() else []
        write_pipeline(components, ema, Path(args.output), {
            "command": "python scripts/train_embedded_model.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "args": vars(args), "steps": stop, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "mean_loss_last_100": float(np.mean([e["loss"] for e in log[-100:]])) if log else None,
            "wall_seconds_last_run": time.perf_counter() - began,
        }, args.prediction_type, first_frame_sampling=args.first_frame_share > 0 and args.image_batch > 0)
        accelerator.print(f"wrote {args.output} after {stop} steps "
                          f"({(time.perf_counter() - began) / 60:.1f} min this run)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
