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

The defaults are the recipe of the shipped weights (``training.json`` next to them records the
run); options that were tried and not shipped are described, with their results, in
``research/embedded/README.md``.

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

from diffattn.pipelines.embedded import (  # noqa: E402
    EMBEDDED_DIR,
    EmbeddedModelConfig,
    EmbeddedVideoPipeline,
    build_components,
    encode_text,
)
from diffattn.pipelines.shapes import sample_batch  # noqa: E402
from diffattn.training.checkpoint import load_checkpoint as read_checkpoint  # noqa: E402
from diffattn.training.checkpoint import save_checkpoint as write_checkpoint  # noqa: E402
from diffattn.training.objectives import denoising_loss, noise_levels, noised  # noqa: E402


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
                   help="the loss is (x0_hat - x0) / max(sigma, this). 1 (the default) is the plain x0 error, "
                        "every noise level weighted alike; smaller values approach the velocity loss, which "
                        "weights near-clean steps up to 1/this**2 times more")
    for field, default in EmbeddedModelConfig.__dataclass_fields__.items():
        if isinstance(default.default, bool):  # --stochastic-sampling / --no-stochastic-sampling
            p.add_argument(f"--{field.replace('_', '-')}", action=argparse.BooleanOptionalAction,
                           default=default.default)
        else:
            p.add_argument(f"--{field.replace('_', '-')}", type=type(default.default), default=default.default)
    args = p.parse_args(argv)
    for name in ("steps", "batch_size", "num_frames", "size", "save_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")
    if args.stop_after is not None and not 1 <= args.stop_after <= args.steps:
        p.error(f"--stop-after must be in 1..--steps ({args.steps}); got {args.stop_after}")
    if args.size % 8:
        p.error(f"--size must be a multiple of 8 (the patch); got {args.size}")
    if args.timestep_shift <= 0:
        p.error(f"--timestep-shift must be > 0; got {args.timestep_shift}")
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


def save_checkpoint(folder: Path, step: int, models: dict[str, torch.nn.Module], ema: dict[str, torch.Tensor],
                    optimizer: torch.optim.Optimizer, losses: list[float], args: argparse.Namespace) -> None:
    weights = {f"{name}.{k}": v for name, model in models.items() for k, v in model.state_dict().items()}
    write_checkpoint(folder, step, {"weights": weights, "ema": ema}, optimizer,
                     {"args": vars(args), "recent_losses": losses[-100:]})


def load_checkpoint(folder: Path, models: dict[str, torch.nn.Module], ema: dict[str, torch.Tensor],
                    optimizer: torch.optim.Optimizer) -> int:
    """Restore weights, EMA and optimizer; return the number of steps already done (0 if none)."""
    info = read_checkpoint(folder, optimizer, groups=["weights", "ema"])
    if info is None:
        return 0
    weights = info["tensors"]["weights"]
    for name, model in models.items():
        prefix = f"{name}."
        model.load_state_dict({k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)})
    for key, value in info["tensors"]["ema"].items():
        ema[key].copy_(value)
    return int(info["step"])


def write_pipeline(components: dict, ema: dict[str, torch.Tensor], output: Path, provenance: dict) -> None:
    """save_pretrained the pipeline with the EMA weights into a temporary folder (plus
    ``training.json``: how it was made), then swap it in."""
    for name in ("transformer", "text_encoder"):
        model = components[name]
        model.load_state_dict({k[len(name) + 1:]: v for k, v in ema.items() if k.startswith(name + ".")})
    pipe = EmbeddedVideoPipeline(**components)
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


def drop_captions(rng: np.random.Generator, captions: list[str], share: float) -> list[str]:
    """Each caption replaced by the empty one with probability ``share`` (for classifier-free guidance)."""
    return ["" if rng.random() < share else c for c in captions]


def noisy_batch(videos: np.ndarray, shift: float, generator: torch.Generator
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """uint8 clips ``[B, F, H, W, 3]`` -> ``(clean, sigma [B], noisy)``, pixels in [-1, 1] as
    ``[B, 3, F, H, W]``, ``noisy = (1 - sigma) clean + sigma noise`` (noise drawn first, then sigma)."""
    clean = torch.from_numpy(videos).to(torch.float32).permute(0, 4, 1, 2, 3) / 127.5 - 1.0
    noise = torch.randn(clean.shape, generator=generator)
    sigma = noise_levels(clean.shape[0], shift, generator)
    return clean, sigma, noised(clean, noise, sigma)


def relative_to_repo(path: str) -> str:
    """``path`` relative to the repository when inside it (so a shipped ``training.json`` holds no
    machine path), else as given.

    Example:
        >>> relative_to_repo(str(REPO / "runs" / "embedded")), relative_to_repo("/elsewhere/model")
        ('runs/embedded', '/elsewhere/model')
    """
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return path


def main(argv: list[str] | None = None) -> int:
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    accelerator = Accelerator()
    config = EmbeddedModelConfig(**{f: getattr(args, f) for f in EmbeddedModelConfig.__dataclass_fields__})
    components = build_components(config, seed=args.seed)
    tokenizer, text_encoder, transformer = (
        components["tokenizer"], components["text_encoder"], components["transformer"]
    )
    models = {"transformer": transformer, "text_encoder": text_encoder}
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
        videos, captions, _ = sample_batch(rng, args.batch_size, args.num_frames, args.size)
        captions = drop_captions(rng, captions, args.caption_dropout)
        generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args)

        clean, sigma, noisy = noisy_batch(videos, shift, generator)
        dtype = components["transformer"].dtype  # the unwrapped model's
        prediction = transformer(noisy.to(device, dtype), (sigma * 1000).to(device),
                                 encode_text(tokenizer, text_encoder, captions, device), return_dict=False)[0]
        loss = denoising_loss(prediction.float(), clean.to(device), sigma.to(device), args.min_loss_sigma)
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
                log.write(json.dumps({"step": step + 1, "loss": value, "seconds": time.perf_counter() - began}) + "\n")
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
            "args": {**vars(args), "output": relative_to_repo(args.output),
                     "checkpoint_dir": relative_to_repo(args.checkpoint_dir)},
            "steps": stop, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "mean_loss_last_100": float(np.mean([e["loss"] for e in log[-100:]])) if log else None,
            "wall_seconds_last_run": time.perf_counter() - began,
        })
        accelerator.print(f"wrote {args.output} after {stop} steps "
                          f"({(time.perf_counter() - began) / 60:.1f} min this run)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
