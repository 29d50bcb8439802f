"""``diffattn train-lora``: LoRA (or full) fine-tuning with sparse attention in forward and backward.

The default run is the shortest useful one: the embedded model trained at 65 frames (4x its
17-frame base length) on procedural clips under the ``radial`` preset::

    diffattn train-lora --preset radial --num-frames 65 --steps 200 --output runs/lora65
    diffattn generate --lora runs/lora65 --preset radial --num-frames 65 --prompt "a red circle" --output out.mp4

How it works:

* **Model and data**: ``--model`` (default: the embedded model) and ``--data`` (default: the
  embedded model's procedural clips; else a folder of captioned videos, see
  :mod:`diffattn.training.data`). Family rules (sizes, conditioning, loss) come from
  :mod:`diffattn.training.families`.
* **Sparse attention**: the preset is installed with :func:`diffattn.apply` and its scheduler
  link is cut, so every training forward runs the preset's sparse layers (its dense layers stay
  dense; ``dense_steps`` are an inference schedule and do not apply); the kernels' exact
  backward gives the gradients.
* **LoRA**: peft adapters of ``--rank``/``--alpha`` on the attention projections (``to_q``,
  ``to_k``, ``to_v``, ``to_out.0`` of self- and cross-attention), with ``--targets
  attention+ffn`` also on the feed-forward linears; ``--full-finetune`` trains every transformer
  weight instead (the baseline of the length-extension experiment).
* **accelerate**: ``--mixed-precision``, ``--grad-accum``, ``--gradient-checkpointing``; under
  ``accelerate launch`` (or torchrun) N processes train data-parallel (DDP).
* **Seeded batches**: a step's global batch (``--batch-size`` per process x processes) is drawn
  from ``(seed, step, micro-step)``; each process takes its slice. N processes give the loss curve
  of one process with the same global batch; a resumed run sees the batches it would have seen.
* **Checkpoints** (``OUTPUT/checkpoint``): the trainable weights and the optimizer state as
  safetensors plus JSON, every ``--save-every`` steps, at the end, and when the run is interrupted
  (Ctrl-C / SIGTERM), so ``--resume`` loses no step.
* **Output**: ``OUTPUT/pytorch_lora_weights.safetensors`` in diffusers' format (with the adapter's
  rank and alpha as metadata) that ``pipe.load_lora_weights(OUTPUT)`` and ``diffattn generate
  --lora OUTPUT`` load; with ``--full-finetune`` the whole pipeline (``save_pretrained``).
  ``OUTPUT/training.json`` records the options, the loss curve, seconds per step, peak memory and
  the preset's density at the training length. ``--validate-every K`` writes
  ``OUTPUT/validation/step-NNNNNN.gif`` every K steps.
"""

from __future__ import annotations

import json
import math
import resource
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .._io import atomic_write_text
from ..errors import UserError
from ..patterns._checks import check_choice, check_positive_int
from .checkpoint import load_checkpoint, save_checkpoint
from .objectives import noise_levels

ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TARGET_CHOICES = ("attention", "attention+ffn")
MIXED_PRECISION = ("no", "bf16", "fp16")
LORA_FILE = "pytorch_lora_weights.safetensors"
CHECKPOINT_DIR = "checkpoint"


@dataclass(kw_only=True)
class TrainLoraOptions:
    """Everything ``diffattn train-lora`` takes (see ``diffattn train-lora --help``).

    Example:
        >>> options = TrainLoraOptions(output="runs/lora")
        >>> options.preset, options.num_frames, options.rank, options.model is None
        ('radial', 65, 16, True)
    """

    output: str
    model: str | None = None
    data: str | None = None
    preset: str = "radial"
    num_frames: int = 65
    height: int | None = None
    width: int | None = None
    steps: int = 200
    stop_after: int | None = None
    batch_size: int = 1
    grad_accum: int = 1
    lr: float | None = None
    warmup: int = 10
    rank: int = 16
    alpha: float | None = None
    targets: str = "attention"
    full_finetune: bool = False
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    timestep_shift: float | None = None
    max_grad_norm: float = 1.0
    seed: int = 0
    save_every: int = 50
    resume: bool = False
    validate_every: int = 0
    validation_prompt: str = "a red circle moves right"
    validation_steps: int = 10
    cache_dir: str | None = None
    threads: int | None = None

    @property
    def learning_rate(self) -> float:
        """``lr``, or the default: 1e-3 for LoRA, 1e-4 for a full fine-tune."""
        return self.lr if self.lr is not None else (1e-4 if self.full_finetune else 1e-3)

    @property
    def lora_alpha(self) -> float:
        return float(self.alpha) if self.alpha is not None else float(self.rank)


@dataclass
class TrainResult:
    """What :func:`train_lora` did: the output folder, the per-step losses of this run (steps
    ``first_step + 1 ...``), median seconds per step, peak memory, the saved weights' path, and
    how many self-attention calls ran the sparse kernel (forward; each has its sparse backward)."""

    output: Path
    weights: Path | None
    first_step: int
    losses: list[float] = field(default_factory=list)
    seconds_per_step: float | None = None
    peak_memory_mb: float | None = None
    sparse_calls: int = 0


def check_options(options: TrainLoraOptions) -> None:
    """The cheap checks, before anything is loaded: UserError naming the flag and the value.

    Example:
        >>> check_options(TrainLoraOptions(output="out", rank=0))
        Traceback (most recent call last):
        diffattn.errors.UserError: --rank must be an int >= 1, got 0
    """
    for flag, value in (("--rank", options.rank), ("--steps", options.steps), ("--batch-size", options.batch_size),
                        ("--grad-accum", options.grad_accum), ("--num-frames", options.num_frames),
                        ("--save-every", options.save_every), ("--validation-steps", options.validation_steps)):
        check_positive_int(flag, value)
    for flag, value in (("--height", options.height), ("--width", options.width), ("--threads", options.threads)):
        if value is not None:
            check_positive_int(flag, value)
    for flag, value in (("--warmup", options.warmup), ("--validate-every", options.validate_every)):
        check_positive_int(flag, value, allow_zero=True)
    if options.stop_after is not None and not 1 <= options.stop_after <= options.steps:
        raise UserError(f"--stop-after must be in 1..--steps ({options.steps}); got {options.stop_after}")
    for flag, value in (("--lr", options.learning_rate), ("--alpha", options.lora_alpha),
                        ("--timestep-shift", options.timestep_shift), ("--max-grad-norm", options.max_grad_norm)):
        if flag == "--timestep-shift" and value is None:  # the family's default
            continue
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise UserError(f"{flag} must be a finite number > 0; got {value!r}")
    check_choice("--targets", options.targets, TARGET_CHOICES)
    check_choice("--mixed-precision", options.mixed_precision, MIXED_PRECISION)
    if options.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise UserError("--mixed-precision fp16 needs a CUDA device; on the CPU use bf16 or no")
    output = Path(options.output)
    if output.exists() and not output.is_dir():
        raise UserError(f"--output must be a folder; {str(output)!r} is a file")


def lora_targets(transformer: torch.nn.Module, targets: str) -> list[str]:
    """peft ``target_modules``: the attention projections, plus (``attention+ffn``) the full names
    of the linear layers inside the transformer's feed-forward blocks.

    Example:
        >>> from diffusers import WanTransformer3DModel
        >>> transformer = WanTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
        ...     out_channels=4, text_dim=8, freq_dim=8, ffn_dim=8, num_layers=1, rope_max_seq_len=8)
        >>> lora_targets(transformer, "attention+ffn")[4:]
        ['blocks.0.ffn.net.0.proj', 'blocks.0.ffn.net.2']
    """
    from diffusers.models.attention import FeedForward

    names = list(ATTENTION_TARGETS)
    if targets == "attention+ffn":
        for name, module in transformer.named_modules():
            if isinstance(module, FeedForward):
                names += [f"{name}.{child}" for child, sub in module.named_modules()
                          if isinstance(sub, torch.nn.Linear)]
    return names


def _sparsity_states(pipe: Any) -> list[Any]:
    from ..adapters import sparsity_state

    return [s for s in (sparsity_state(pipe, "transformer"), sparsity_state(pipe, "transformer_2")) if s is not None]


def _global_batch_rng(seed: int, step: int, micro: int) -> np.random.Generator:
    """The generator of one micro-step's global batch: the same on every process and every run."""
    return np.random.default_rng([seed, step, micro])


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process in MiB: the CUDA allocator's peak on a GPU, else the peak
    resident set size (``ru_maxrss``, the whole process: weights, activations, data).

    Example:
        >>> peak_memory_mb(torch.device("cpu")) > 0
        True
    """
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def _check_size(options: TrainLoraOptions, pipe: Any, family: Any) -> tuple[int, int]:
    default_h, default_w = family.default_size(pipe)
    height = options.height if options.height is not None else default_h
    width = options.width if options.width is not None else default_w
    family.check_size(pipe, options.num_frames, height, width)
    return height, width


def _load(options: TrainLoraOptions):
    """Load the model and the data, check everything (sizes, preset, data files) and encode the
    data cache: all of it before any training starts."""
    from ..processors.presets import load_preset, preset_density
    from ..runs import load_pipeline
    from .data import ProceduralData, VideoFolderData, read_metadata
    from .families import training_family

    if options.data is not None:
        read_metadata(options.data)  # a folder without captions fails before the model loads
    if options.model is None:
        load_preset(options.preset, family="wan")  # an unknown preset fails before the model loads
    pipe, _ = load_pipeline(options.model, torch.float32)
    family = training_family(pipe)
    height, width = _check_size(options, pipe, family)
    preset = load_preset(options.preset, family=family.preset_family)
    if preset.family not in (None, family.preset_family):
        raise UserError(f"--preset {options.preset!r} is a {preset.family} preset; this model needs a "
                        f"{family.preset_family} preset")
    if options.data is None:
        if family.name != "embedded":
            raise UserError(f"--data is required for {type(pipe).__name__}: procedural clips exist only for the "
                            f"embedded model")
        data: Any = ProceduralData(pipe, family, options.num_frames, height, width)
    else:
        data = VideoFolderData(options.data, pipe, family, options.num_frames, height, width,
                               model_id=str(options.model), cache_dir=options.cache_dir)
    sample = family.latent_shape(pipe, options.num_frames, height, width)
    grid = family.token_grid(pipe, sample)
    try:
        density = preset_density(preset.config, grid)
    except ValueError as error:
        raise UserError(f"--preset {preset.name!r} does not fit the token grid {grid.frames}x{grid.height}x"
                        f"{grid.width} of {options.num_frames} frames at {height}x{width}: {error}") from None
    return pipe, family, preset, data, (height, width), sample, grid, float(density)


def train_lora(options: TrainLoraOptions, log: Callable[[str], None] = print) -> TrainResult:
    """Run ``diffattn train-lora``; see the module docstring. Returns what it did.

    Example:
        >>> import tempfile
        >>> result = train_lora(TrainLoraOptions(output=tempfile.mkdtemp(), num_frames=5, height=32, width=32,
        ...                                      steps=2, preset="radial"), log=lambda line: None)  # doctest: +SKIP
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    from ..adapters import apply
    from .length import fit_rope

    check_options(options)
    if options.threads:
        torch.set_num_threads(options.threads)
    output = Path(options.output)
    pipe, family, preset, data, (height, width), latent_shape, grid, density = _load(options)
    from accelerate.state import AcceleratorState

    # accelerate keeps one AcceleratorState per process and refuses a second run's other precision;
    # the process group (PartialState) stays, so repeated runs in one process (tests, notebooks) work.
    AcceleratorState._reset_state()
    accelerator = Accelerator(mixed_precision=options.mixed_precision)
    main = accelerator.is_main_process
    world, rank = accelerator.num_processes, accelerator.process_index
    device = accelerator.device
    say = log if main else (lambda line: None)

    if isinstance(data, _folder_data_type()):
        if main:
            data.prepare(log=say)
        accelerator.wait_for_everyone()
        if not main:
            data.prepare()
    pipe.to(device)
    transformer = pipe.transformer
    fit_rope(transformer, (1, *latent_shape))
    transformer.requires_grad_(False)
    for name in ("text_encoder", "vae", "transformer_2"):
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False)
    lora_config = None
    if options.full_finetune:
        transformer.requires_grad_(True)
    else:
        try:
            from peft import LoraConfig
        except ImportError:
            raise UserError("LoRA training needs peft: pip install 'diffattn[train]' "
                            "(or use --full-finetune)") from None

        lora_config = LoraConfig(r=options.rank, lora_alpha=options.lora_alpha, init_lora_weights=True,
                                 target_modules=lora_targets(transformer, options.targets))
        torch.manual_seed(options.seed)  # the adapters' random init, the same on every process
        transformer.add_adapter(lora_config)
    if options.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()
    apply(pipe, preset.config)
    states = _sparsity_states(pipe)
    for state in states:
        state.scheduler = None  # no inference schedule in training: every call runs the preset's sparse layers

    named = [(n, p) for n, p in transformer.named_parameters() if p.requires_grad]
    parameters = [p for _, p in named]
    optimizer = torch.optim.AdamW(parameters, lr=options.learning_rate, weight_decay=0.0 if lora_config else 0.01)
    checkpoint_dir = output / CHECKPOINT_DIR
    start, history = 0, []
    if options.resume:
        info = load_checkpoint(checkpoint_dir, optimizer)
        if info is not None:
            saved = info["tensors"]["trainable"]
            missing = [n for n, _ in named if n not in saved]
            if missing or info.get("options", {}).get("full_finetune") != options.full_finetune:
                raise UserError(f"--resume: the checkpoint in {str(checkpoint_dir)!r} was made with other options "
                                f"(its weights do not match this run's: {missing[:3]})")
            with torch.no_grad():
                for n, p in named:
                    p.copy_(saved[n])
            start, history = int(info["step"]), list(info.get("losses", []))
    stop = options.stop_after if options.stop_after is not None else options.steps
    if start > stop:
        raise UserError(f"--resume: the checkpoint is at step {start}, past the requested stop at step {stop}")
    wrapped, optimizer = accelerator.prepare(transformer, optimizer)
    shift = options.timestep_shift if options.timestep_shift is not None else family.timestep_shift
    say(f"train-lora: {type(pipe).__name__} ({family.name}), {options.num_frames} frames at {height}x{width} = "
        f"{grid.frames}x{grid.height}x{grid.width} tokens, preset {preset.name} (density {density:.3f}), "
        f"{'full fine-tune' if lora_config is None else f'LoRA rank {options.rank} alpha {options.lora_alpha:g}'}, "
        f"{sum(p.numel() for p in parameters):,} trainable parameters, {world} process(es), steps {start}..{stop}")

    def save(step: int) -> None:
        if main:
            weights = {n: p for n, p in accelerator.unwrap_model(wrapped).named_parameters() if p.requires_grad}
            save_checkpoint(checkpoint_dir, step, {"trainable": weights}, optimizer,
                            {"options": asdict(options), "losses": history})

    step_seconds: list[float] = []
    losses_this_run: list[float] = []
    done = start
    interrupted = _InterruptFlag()
    progress = tqdm(range(start, stop), initial=start, total=stop, desc="train-lora", disable=not main)
    try:
        with interrupted:
            for step in progress:
                began = time.perf_counter()
                for group in optimizer.param_groups:
                    group["lr"] = options.learning_rate * min(1.0, (step + 1) / max(1, options.warmup))
                micro_losses = []
                for micro in range(options.grad_accum):
                    rng = _global_batch_rng(options.seed, step, micro)
                    keys = data.draw(rng, options.batch_size * world)
                    own = slice(rank * options.batch_size, (rank + 1) * options.batch_size)
                    clean, text = data.load(keys[own])
                    generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
                    noise = torch.randn((len(keys), *clean.shape[1:]), generator=generator)[own]
                    sigma = noise_levels(len(keys), shift, generator)[own]
                    text = {k: v.to(device) for k, v in text.items()}
                    sync = micro == options.grad_accum - 1
                    with _maybe_no_sync(accelerator, wrapped, sync):
                        with accelerator.autocast():
                            loss = family.loss(pipe, wrapped, clean.to(device), noise.to(device), sigma.to(device),
                                               text)
                        accelerator.backward(loss / options.grad_accum)
                    micro_losses.append(loss.detach())
                accelerator.clip_grad_norm_(parameters, options.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                value = float(accelerator.gather(torch.stack(micro_losses).mean()[None]).mean())
                done = step + 1
                history.append(value)
                losses_this_run.append(value)
                step_seconds.append(time.perf_counter() - began)
                progress.set_postfix(loss=f"{np.mean(history[-20:]):.4f}", s_step=f"{step_seconds[-1]:.2f}")
                if done % options.save_every == 0 and done < stop:
                    save(done)
                if options.validate_every and done % options.validate_every == 0 and main:
                    _validate(pipe, family, states, options, height, width,
                              output / "validation" / f"step-{done:06d}.gif")
                accelerator.wait_for_everyone()
                if interrupted.requested:
                    raise KeyboardInterrupt
    except KeyboardInterrupt:
        save(done)
        say(f"interrupted: checkpoint at step {done} in {checkpoint_dir}; continue with --resume")
        raise
    save(done)
    accelerator.wait_for_everyone()
    result = TrainResult(output=output, weights=None, first_step=start, losses=losses_this_run,
                         seconds_per_step=float(np.median(step_seconds[1:] or step_seconds)) if step_seconds else None,
                         peak_memory_mb=peak_memory_mb(device),
                         sparse_calls=sum(sum(state.sparse_calls.values()) for state in states))
    if main:
        unwrapped = accelerator.unwrap_model(wrapped)
        result.weights = _write_output(pipe, unwrapped, lora_config, output)
        atomic_write_text(output / "training.json", json.dumps({
            "options": asdict(options), "model": type(pipe).__name__, "family": family.name,
            "grid": [grid.frames, grid.height, grid.width], "preset": preset.name, "density": density,
            "processes": world, "timestep_shift": shift, "steps": done, "losses": history,
            "trainable_parameters": sum(p.numel() for p in parameters),
            "seconds_per_step_median": result.seconds_per_step, "peak_memory_mb": result.peak_memory_mb,
            "torch_threads": torch.get_num_threads(), "device": str(device),
            "sparse_attention_calls": result.sparse_calls,
        }, indent=1) + "\n")
        say(f"wrote {result.weights} after {done} steps")
    return result


def _folder_data_type():
    from .data import VideoFolderData

    return VideoFolderData


class _InterruptFlag:
    """Within ``with``: SIGTERM sets :attr:`requested` (checked after each step, which then saves
    and stops as Ctrl-C does) instead of killing the run mid-step."""

    requested = False

    def __enter__(self):
        self._previous = None
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handler)
        except ValueError:  # not the main thread: leave signals alone
            pass
        return self

    def _handler(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        return False


def _maybe_no_sync(accelerator: Any, model: Any, sync: bool):
    import contextlib

    return contextlib.nullcontext() if sync else accelerator.no_sync(model)


@torch.no_grad()
def _validate(pipe: Any, family: Any, states: list[Any], options: TrainLoraOptions, height: int, width: int,
              path: Path) -> None:
    """One seeded validation video at the training size, the preset's inference schedule on."""
    from .._io import to_uint8
    from ..runs import write_video

    transformer = pipe.transformer
    transformer.eval()
    for state in states:
        state.scheduler = pipe.scheduler
    try:
        frames = pipe(prompt=options.validation_prompt, num_frames=options.num_frames, height=height, width=width,
                      num_inference_steps=options.validation_steps, output_type="np",
                      generator=torch.Generator().manual_seed(options.seed), **family.call_kwargs(pipe)).frames[0]
        write_video(to_uint8(frames), path, fps=8)
    finally:
        for state in states:
            state.scheduler = None
        transformer.train()


def _write_output(pipe: Any, transformer: torch.nn.Module, lora_config: Any, output: Path) -> Path:
    """The LoRA in diffusers' format (or, for a full fine-tune, the whole pipeline)."""
    from ..adapters import remove

    output.mkdir(parents=True, exist_ok=True)
    if lora_config is None:
        remove(pipe)
        pipe.save_pretrained(str(output))
        return output
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(transformer)
    metadata = {k: (sorted(v) if isinstance(v, set) else v) for k, v in lora_config.to_dict().items()}
    type(pipe).save_lora_weights(str(output), transformer_lora_layers=state,
                                 transformer_lora_adapter_metadata=metadata)
    return output / LORA_FILE
