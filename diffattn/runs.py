"""Running a diffusers pipeline from user options: checks, loading, the call, the video file.

``diffattn generate``, ``diffattn profile`` (:mod:`diffattn.profiler.command`) and
``diffattn eval-embedded`` share this module: :func:`prepare_run` checks the options, loads the
pipeline (the embedded default model or a local diffusers folder, plus a LoRA) and builds the
``pipe(**call)`` arguments; :func:`generate` is the whole ``diffattn generate`` command. It sits
above the adapters, the presets and the embedded model, and below the profiler command and the
CLI. Bad inputs (options, missing files and folders) raise :class:`~diffattn.errors.UserError`,
checked before any heavy work where possible; the CLI prints the message and exits 2.

Example:
    >>> options = RunOptions(preset="radial", num_frames=9)
    >>> default_model_call(options)[0]["num_frames"]
    9
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ._io import atomic_path, to_uint8
from .errors import UserError, error_message
from .patterns._checks import check_given_positive_ints, check_positive_int
from .pipelines import embedded as default_model

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
VIDEO_SUFFIXES = (".mp4", ".gif")


@dataclass(kw_only=True)
class RunOptions:
    """The model, prompt and size options ``diffattn generate`` and ``diffattn profile`` share;
    None means the model's default.

    Example:
        >>> options = RunOptions(preset="radial", num_frames=33, steps=4)
        >>> options.model is None, options.device  # the embedded default model, on the CPU
        (True, 'cpu')
    """

    model: str | None = None
    preset: str = "dense"
    prompt: str = ""
    negative_prompt: str = ""
    num_frames: int | None = None
    height: int | None = None
    width: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    cpu_offload: bool = False
    lora: str | None = None
    ulysses_degree: int = 1


@dataclass(kw_only=True)
class GenerateOptions(RunOptions):
    """Everything ``diffattn generate`` takes: :class:`RunOptions` plus the video output.

    Example:
        >>> GenerateOptions(output="out.mp4", preset="radial-fast", prompt="a red ball").fps
        16
    """

    output: str
    fps: int = 16
    #: Steering flags (see :func:`steering_arguments`): ``WORD=FACTOR``, ``PHRASE=x0,y0,x1,y1``
    #: (twice) and ``WORD``, each repeatable.
    weights: tuple[str, ...] = ()
    regions: tuple[str, ...] = ()
    excludes: tuple[str, ...] = ()
    captures: tuple[str, ...] = ()
    steer_strength: float = 3.0


@dataclass
class PreparedRun:
    """A loaded pipeline, on its device, with the preset it asked for and its call arguments.

    Attributes:
        pipe: the diffusers pipeline (no sparsity applied yet).
        preset: the :class:`~diffattn.processors.presets.Preset` of ``RunOptions.preset``.
        family: the pipeline's model family.
        call: ``pipe(**call)`` keyword arguments: sizes, steps, guidance and the prompt (without
            generator and output type).
        device, dtype: where and in which precision it runs.
        is_default: whether it is the built-in default model.
    """

    pipe: Any
    preset: Any
    family: str
    call: dict
    device: torch.device
    dtype: torch.dtype
    is_default: bool


@dataclass
class GenerateResult:
    """What :func:`generate` wrote and how: the video file, its size, the wall time of the
    denoising, the preset and, when the pipeline ran through an adapter, the token grid, the
    layout density and how many attention calls ran sparse."""

    path: Path
    num_frames: int
    height: int
    width: int
    seconds: float
    preset: str
    family: str
    density: float | None
    grid: object | None
    sparse_calls: int = 0
    maps: tuple[Path, ...] = ()


def check_output(path: str | os.PathLike, suffixes: tuple[str, ...] = VIDEO_SUFFIXES, flag: str = "--output") -> Path:
    """``path`` as a Path; UserError unless it ends in one of ``suffixes`` and its directory exists
    (or can be made) and is writable. ``flag`` names the option in the message. Nothing is created.

    Example:
        >>> check_output("out/report.json", (".json",), "--report")
        PosixPath('out/report.json')
    """
    path = Path(path)
    if path.suffix.lower() not in suffixes:
        raise UserError(f"{flag} must end in {' or '.join(suffixes)}; got {str(path)!r}")
    if path.is_dir():
        raise UserError(f"{flag} {str(path)!r} is a directory")
    ancestor = path.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {flag} {str(path)!r}: {str(ancestor)!r} is not a writable directory")
    return path


def check_device(device: str, cpu_offload: bool) -> torch.device:
    """``device`` as a torch.device; UserError unless it names a device this machine has (and, with
    ``cpu_offload``, an accelerator to offload to).

    Example:
        >>> check_device("cpu", cpu_offload=False)
        device(type='cpu')
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {device!r} is not a torch device (cpu, cuda, cuda:1, mps, ...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device} but no CUDA GPU is available")
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise UserError(f"--device {device} but MPS is not available")
    if cpu_offload and dev.type == "cpu":
        raise UserError("--cpu-offload moves models between the CPU and an accelerator: give --device cuda")
    return dev


def check_ulysses(degree: int, cpu_offload: bool) -> None:
    """UserError unless ``--ulysses-degree`` can run here: a positive degree and, above 1, a
    ``torchrun`` launch with that many processes and no ``--cpu-offload`` (checked before any
    heavy work; :func:`ulysses_device` then joins the process group).

    Example:
        >>> check_ulysses(1, cpu_offload=False)   # one process: nothing to check
    """
    if check_positive_int("--ulysses-degree", degree) == 1:
        return
    world_size = os.environ.get("WORLD_SIZE")
    if world_size != str(degree):
        raise UserError(
            f"--ulysses-degree {degree} runs one process per rank: launch with `torchrun --nproc-per-node {degree} "
            f"-m diffattn.cli ...` (WORLD_SIZE is {world_size!r}, it must be {degree})"
        )
    if cpu_offload:
        raise UserError("--cpu-offload and --ulysses-degree cannot be combined (each rank holds the whole model)")


def ulysses_device(degree: int, device: torch.device) -> torch.device:
    """Join the ``torchrun`` process group for ``--ulysses-degree`` (checked by :func:`check_ulysses`)
    and return this rank's device (``cuda:LOCAL_RANK`` for a CUDA device); ``device`` itself for
    degree 1.

    Example:
        >>> ulysses_device(1, torch.device("cpu"))
        device(type='cpu')
    """
    if degree == 1:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def check_ulysses_model(pipe: Any, adapter: Any, degree: int) -> None:
    """UserError unless the loaded pipeline runs sparse under Ulysses with ``degree`` ranks: a
    family whose processors have a Ulysses path, and a head count the degree divides.

    Example:
        >>> check_ulysses_model(pipe=None, adapter=None, degree=1)   # one process: nothing to check
    """
    if degree == 1:
        return
    if not adapter.processor_class.ulysses:
        from .adapters import ADAPTERS

        supported = ", ".join(a.family for a in ADAPTERS if a.processor_class.ulysses)
        raise UserError(f"--ulysses-degree needs a model family with diffusers context parallelism "
                        f"({supported}); this pipeline is {adapter.family!r}")
    for attribute, transformer in adapter.transformers(pipe):
        heads = getattr(transformer.config, "num_attention_heads", degree)
        if heads % degree:
            raise UserError(f"--ulysses-degree {degree} must divide the {heads} attention heads of {attribute}")


def enable_ulysses(pipe: Any, adapter: Any, degree: int) -> None:
    """``transformer.enable_parallelism(ContextParallelConfig(ulysses_degree=degree))`` on each of the
    pipeline's transformers (after :func:`ulysses_device` joined the process group and
    :func:`check_ulysses_model` checked the model); nothing for degree 1.

    Example:
        >>> enable_ulysses(pipe=None, adapter=None, degree=1)   # one process: nothing to do
    """
    if degree == 1:
        return
    from diffusers import ContextParallelConfig

    for _, transformer in adapter.transformers(pipe):
        transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=degree))


def process_rank() -> int:
    """This process's rank in the ``torchrun`` process group (0 without one).

    Example:
        >>> process_rank(), is_main_rank()   # one process: the main one
        (0, True)
    """
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def is_main_rank() -> bool:
    """Whether this process writes files and prints results (rank 0, or no process group)."""
    return process_rank() == 0


def check_lora(path: str | None) -> Path | None:
    """``path`` as a Path (None stays None); UserError unless it is an existing ``.safetensors``
    file (pickled weights are never loaded) or a folder holding ``pytorch_lora_weights.safetensors``
    (what ``diffattn train-lora`` and diffusers' ``save_lora_weights`` write).

    Example:
        >>> check_lora(None) is None
        True
        >>> check_lora("no/such/weights.safetensors")
        Traceback (most recent call last):
        diffattn.errors.UserError: --lora file 'no/such/weights.safetensors' does not exist
    """
    if path is None:
        return None
    lora = Path(path)
    if lora.is_dir():
        lora = lora / "pytorch_lora_weights.safetensors"
        if not lora.is_file():
            raise UserError(f"--lora folder {str(path)!r} has no pytorch_lora_weights.safetensors")
    if lora.suffix.lower() != ".safetensors":
        raise UserError(f"--lora must be a .safetensors file or a folder holding pytorch_lora_weights.safetensors "
                        f"(pickled weights are never loaded); got {str(lora)!r}")
    if not lora.is_file():
        raise UserError(f"--lora file {str(lora)!r} does not exist")
    return lora


def load_pipeline(model: str | None, dtype: torch.dtype):
    """``(pipe, is_default)``: the shipped embedded model for None, else a local diffusers folder
    (a folder saved by ``scripts/train_embedded_model.py`` loads as the embedded pipeline class).

    A missing or unloadable folder is a UserError; nothing is downloaded.

    Example:
        >>> pipe, is_default = load_pipeline(None, torch.float32)
        >>> type(pipe).__name__, is_default
        ('EmbeddedVideoPipeline', True)
    """
    if model is None:
        try:
            return default_model.load_embedded_pipeline(dtype=dtype), True
        except FileNotFoundError as error:
            raise UserError(f"the default model is missing from this installation: {error}") from None
    if not os.path.isdir(model):
        if os.path.exists(model):
            raise UserError(f"--model {model!r} is a file; give a local diffusers pipeline folder")
        raise UserError(
            f"--model {model!r} is not a local folder; hub ids are not supported (no network): "
            f"download the pipeline yourself and pass its folder"
        )
    from diffusers import DiffusionPipeline

    try:
        if default_model.is_embedded_folder(model):
            pipe = default_model.load_embedded_pipeline(model, dtype=dtype)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # newer diffusers renamed torch_dtype to dtype
                pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=dtype, local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as error:
        # A broken or foreign folder: diffusers' own message says which file or key is wrong.
        raise UserError(f"--model {model!r} is not a loadable diffusers pipeline folder: "
                        f"{error_message(error)}") from None
    return pipe, False


def write_video(frames: np.ndarray, path: str | os.PathLike, fps: int = 16) -> Path:
    """Write ``uint8 [F, H, W, 3]`` frames as .mp4 (imageio-ffmpeg) or .gif, atomically: a temp
    file beside ``path`` renamed over it, so a failure leaves no partial file.

    Example:
        >>> import tempfile
        >>> frames = np.zeros((3, 16, 16, 3), dtype=np.uint8)
        >>> path = write_video(frames, Path(tempfile.mkdtemp()) / "black.gif", fps=8)
        >>> path.name, path.stat().st_size > 0
        ('black.gif', True)
    """
    import imageio.v2 as imageio

    path = Path(path)
    with atomic_path(path) as tmp:
        if path.suffix.lower() == ".gif":
            imageio.mimsave(tmp, list(frames), format="GIF", duration=1000.0 / fps, loop=0)
        else:
            with imageio.get_writer(tmp, format="FFMPEG", fps=fps, codec="libx264", quality=8,
                                    macro_block_size=1, ffmpeg_log_level="error") as writer:
                for frame in frames:
                    writer.append_data(frame)
    return path


# --- The default model: the embedded model diffattn trains and ships ---------------------------
# Everything specific to it is in default_model_call (and the default branch of load_pipeline):
# its call defaults, its size rule and the preset's fit to its token grid.
def default_model_call(options: RunOptions) -> tuple[dict, Any]:
    """``(call, preset)`` for the default model, checked before the model is loaded: its call
    defaults overridden by the options, its size rule, the preset's fit to the latent grid, and
    the prompts.

    Example:
        >>> call, preset = default_model_call(RunOptions(num_frames=9))
        >>> call["num_frames"], preset.name
        (9, 'dense')
    """
    call = dict(default_model.DEFAULT_CALL)
    call.update(_size_arguments(options))
    default_model.check_size(call["num_frames"], call["height"], call["width"], cli_flags=True)
    preset = default_model.fitting_preset(options.preset, call["num_frames"], call["height"], call["width"])
    call["prompt"] = options.prompt
    call["negative_prompt"] = options.negative_prompt
    return call, preset
# --------------------------------------------------------------------------------------------------


def _size_arguments(options: RunOptions) -> dict:
    """The pipeline call arguments the options set (None = leave the model's default)."""
    given = {"num_frames": options.num_frames, "height": options.height, "width": options.width,
             "num_inference_steps": options.steps, "guidance_scale": options.guidance_scale}
    return {key: value for key, value in given.items() if value is not None}


def prepare_run(options: RunOptions) -> PreparedRun:
    """Check the options, load the pipeline (and LoRA), put it on its device and build the call.

    Cheap checks (dtype, device, LoRA file, sizes, and for the default model the preset and the
    size rule) come before the model is loaded. No sparsity is applied.

    Example:
        >>> from diffattn import apply
        >>> run = prepare_run(RunOptions(preset="radial", num_frames=5, height=32, width=32, steps=1))
        >>> pipe = apply(run.pipe, run.preset.config)
        >>> frames = pipe(**run.call, generator=torch.Generator().manual_seed(0), output_type="np").frames[0]
        >>> run.family, frames.shape
        ('wan', (5, 32, 32, 3))
    """
    from .adapters import find_adapter
    from .processors.presets import load_preset

    if options.dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}; got {options.dtype!r}")
    dtype = DTYPES[options.dtype]
    device = check_device(options.device, options.cpu_offload)
    check_ulysses(options.ulysses_degree, options.cpu_offload)
    lora = check_lora(options.lora)
    check_given_positive_ints({"--steps": options.steps, "--num-frames": options.num_frames,
                               "--height": options.height, "--width": options.width})

    preset = None
    if options.model is None:
        call, preset = default_model_call(options)  # fail fast, before building the model
    device = ulysses_device(options.ulysses_degree, device)
    pipe, is_default = load_pipeline(options.model, dtype)
    adapter = find_adapter(pipe)
    check_ulysses_model(pipe, adapter, options.ulysses_degree)
    family = adapter.family
    if not is_default:
        call = _size_arguments(options)
        call["prompt"] = options.prompt
        if options.negative_prompt:
            call["negative_prompt"] = options.negative_prompt
        preset = load_preset(options.preset, family=family)
        embedded = isinstance(pipe, default_model.EmbeddedVideoPipeline)  # pixel space: any frame count
        if family == "wan" and not embedded and "num_frames" in call and (call["num_frames"] - 1) % 4:
            raise UserError(
                f"--num-frames must be 1 + 4k (1, 5, 9, 13, 17, ...) for a Wan model; got {call['num_frames']}")
    if lora is not None:
        if not hasattr(pipe, "load_lora_weights"):
            raise UserError(f"{type(pipe).__name__} does not support LoRA weights")
        try:
            pipe.load_lora_weights(str(lora))
        except (OSError, ValueError, KeyError, RuntimeError) as error:
            raise UserError(f"--lora {str(lora)!r} could not be loaded: {error_message(error)}") from None
    from .training.length import install_rope_fit

    for name in ("transformer", "transformer_2"):  # Wan's RoPE tables grow for videos longer than built for
        if isinstance(getattr(pipe, name, None), torch.nn.Module):
            install_rope_fit(getattr(pipe, name))
    if options.cpu_offload:
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    enable_ulysses(pipe, adapter, options.ulysses_degree)
    call = {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in call.items()}
    return PreparedRun(pipe=pipe, preset=preset, family=family, call=call, device=device, dtype=dtype,
                       is_default=is_default)


def _freeswim_coarse_to_fine(run: PreparedRun, generator: torch.Generator):
    """FreeSwim's coarse-to-fine result when the preset is FreeSwim and the size is above the
    model's native one, else None (the plain call)."""
    from .freeswim_run import coarse_to_fine, is_above_native
    from .processors.freeswim import FreeSwim

    config, call = run.preset.config, dict(run.call)
    height, width = call.pop("height", None), call.pop("width", None)
    if not isinstance(config, FreeSwim) or height is None or width is None:
        return None
    if not is_above_native(run.pipe, height, width, config):
        return None
    return coarse_to_fine(run.pipe, config, height=height, width=width, generator=generator, **call)


def _split_flag(value: str, flag: str, what: str) -> tuple[str, str]:
    word, sep, rest = value.rpartition("=")
    if not sep or not word.strip() or not rest.strip():
        raise UserError(f"{flag} must be {what}; got {value!r}")
    return word.strip(), rest.strip()


def steering_arguments(options: GenerateOptions) -> dict | None:
    """The keyword arguments of :func:`diffattn.steer` the steering flags ask for (None: no
    steering), checked before any model is loaded (:class:`UserError` naming the flag).

    Example:
        >>> options = GenerateOptions(output="v.mp4", weights=("red=2",), regions=("red circle=0,0,0.5,1",),
        ...                           captures=("red",))
        >>> arguments = steering_arguments(options)
        >>> arguments["token_weights"], arguments["regions"], arguments["capture"]
        ({'red': 2.0}, {'red circle': (0.0, 0.0, 0.5, 1.0)}, ['red'])
    """
    from .steering import check_box, check_spec

    if not (options.weights or options.regions or options.excludes or options.captures):
        return None
    weights = {}
    for value in options.weights:
        word, factor = _split_flag(value, "--weight", "WORD=FACTOR (e.g. red=2.0)")
        try:
            weights[word] = float(factor)
        except ValueError:
            raise UserError(f"--weight {value!r}: FACTOR must be a number; got {factor!r}") from None
    boxes = {}
    for flag, values in (("--region", options.regions), ("--exclude", options.excludes)):
        boxes[flag] = {}
        for value in values:
            phrase, box = _split_flag(value, flag, "PHRASE=x0,y0,x1,y1 (fractions of the frame)")
            boxes[flag][phrase] = check_box(box, f"{flag} {value!r}: the box")
    arguments = dict(token_weights=weights, regions=boxes["--region"], exclude=boxes["--exclude"],
                     capture=list(options.captures), strength=options.steer_strength)
    check_spec(**arguments, steps=(0.0, 1.0), layers=None, decay=True, normalize=False)
    return arguments


def write_maps(handle: Any, frames: np.ndarray, output: Path, fps: int) -> tuple[Path, ...]:
    """Write each captured word's map next to the video: ``<stem>.<word>.png`` (frames above
    heat maps) and ``<stem>.<word><suffix>`` (the heat-map video); returns the paths."""
    import re

    from PIL import Image

    from .steering import heatmap_sheet, heatmap_video

    written = []
    for word, word_map in handle.maps.items():
        name = re.sub(r"[^\w-]+", "_", str(word)).strip("_") or "word"
        sheet = output.with_name(f"{output.stem}.{name}.png")
        with atomic_path(sheet) as tmp:
            Image.fromarray(heatmap_sheet(word_map, frames)).save(tmp, format="PNG")
        video = output.with_name(f"{output.stem}.{name}{output.suffix}")
        write_video(heatmap_video(word_map, frames), video, fps=fps)
        written += [sheet, video]
    return tuple(written)


def generate(options: GenerateOptions, log: Callable[[str], None] = print) -> GenerateResult:
    """Run one generation; see ``diffattn generate --help``.

    Example:
        >>> import tempfile
        >>> output = Path(tempfile.mkdtemp()) / "out.gif"
        >>> result = generate(GenerateOptions(output=str(output), preset="radial-fast", num_frames=5, height=32,
        ...                                   width=32, steps=1))
        >>> result.path == output, result.num_frames, result.preset
        (True, 5, 'radial-fast')
    """
    from .adapters import apply, sparsity_state
    from .processors.freeswim import FreeSwim
    from .processors.presets import preset_density

    output = check_output(options.output)
    check_given_positive_ints({"--fps": options.fps})
    steering = steering_arguments(options)
    run = prepare_run(options)
    pipe, preset = run.pipe, run.preset
    if steering is not None and isinstance(preset.config, FreeSwim):
        raise UserError(
            f"the steering flags (--weight/--region/--exclude/--capture) do not compose with the FreeSwim preset "
            f"{preset.name!r}: FreeSwim owns the cross-attention layers; drop one of them"
        )
    generator = torch.Generator(device="cpu").manual_seed(options.seed)
    start = time.perf_counter()
    # FreeSwim above the native size: base pass, upscale, refine (diffattn.freeswim_run).
    freeswim = _freeswim_coarse_to_fine(run, generator)
    handle = None
    if freeswim is None:
        apply(pipe, preset.config)
        if steering is not None:
            from .steering import steer

            handle = steer(pipe, **steering)
        result = pipe(**run.call, generator=generator, output_type="np")
    else:
        result = freeswim
        log(f"FreeSwim coarse-to-fine: base {freeswim.base_size[0]}x{freeswim.base_size[1]}, window "
            f"{freeswim.window}, guide steps {freeswim.guide_steps}, cache {freeswim.cache_bytes / 2**20:.2f} MiB")
    frames = to_uint8(result.frames[0] if hasattr(result, "frames") else result.images)
    seconds = time.perf_counter() - start
    maps: tuple[Path, ...] = ()
    if is_main_rank():  # under --ulysses-degree every rank has the whole video
        write_video(frames, output, fps=options.fps)
        if handle is not None:
            maps = write_maps(handle, frames, output, options.fps)

    state = sparsity_state(pipe)
    grid = state.grid if state is not None else None
    density = preset_density(preset.config, grid) if grid is not None else None
    if freeswim is not None:
        grid, density = freeswim.grid, freeswim.density
    return GenerateResult(
        path=output, num_frames=frames.shape[0], height=frames.shape[1], width=frames.shape[2], seconds=seconds,
        preset=preset.name, family=run.family, density=density, grid=grid,
        sparse_calls=freeswim.sparse_calls if freeswim is not None else
        sum(state.sparse_calls.values()) if state is not None else 0,
        maps=maps,
    )
