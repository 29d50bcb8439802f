"""FreeSwim's coarse-to-fine generation: a base pass at the model's native size, an upscale, and a
video-to-video refine at the target size under FreeSwim (strength 0.7, flow shift 9).

No pipeline is forked: the base pass is the stock pipeline; the refine pass is the same pipeline
called with the noised, upscaled latents as its start and a scheduler whose ``set_timesteps``
keeps only the last ``strength`` share of the schedule (a shifted copy of the pipeline's own,
swapped in for the refine and swapped back after).

It sits beside :mod:`diffattn.runs` (the CLI's ``generate --preset freeswim`` calls it) and uses
the adapters below it.
"""

from __future__ import annotations

import time
import types
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .adapters import apply, find_adapter, remove, sparsity_state
from .adapters.freeswim import check_family, native_window
from .errors import UserError
from .patterns import VideoGrid
from .processors.freeswim import FreeSwim
from .processors.presets import load_preset

#: The reference's refine settings.
STRENGTH = 0.7
FLOW_SHIFT = 9.0


@dataclass
class CoarseToFineResult:
    """What :func:`coarse_to_fine` made and measured.

    Attributes:
        frames: the refined video as the pipeline returned it for ``output_type``.
        base_size: ``(height, width)`` pixels of the base pass.
        window: FreeSwim's window in latent tokens; grid: the refine pass's token grid.
        density: the window layout's density on that grid.
        guide_steps: the refine steps whose conditional call ran the guide branch.
        sparse_calls: self-attention calls of the refine that ran the window kernel.
        cache_bytes: the guide cache's size after the refine (freed since).
        base_seconds, refine_seconds: wall time of the two passes.
    """

    frames: Any
    base_size: tuple[int, int]
    window: tuple[int, int]
    grid: VideoGrid | None
    density: float | None
    guide_steps: list[int | None] = field(default_factory=list)
    sparse_calls: int = 0
    cache_bytes: int = 0
    base_seconds: float = 0.0
    refine_seconds: float = 0.0


def pixels_per_token(pipe: Any) -> int:
    """Pixels per latent token along height and width (VAE factor times patch; the embedded
    model's patch in pixel space)."""
    if type(pipe).__name__ == "EmbeddedVideoPipeline":
        return pipe.patch_pixels
    return int(getattr(pipe, "vae_scale_factor_spatial", 8)) * int(pipe.transformer.config.patch_size[1])


def native_size(pipe: Any, config: FreeSwim | None = None) -> tuple[int, int]:
    """The native ``(height, width)`` in pixels: ``config.window`` (the training latent size it
    stands for) in pixels, or with ``window=None`` the model's (see
    :func:`~diffattn.adapters.freeswim.native_window`).

    Example:
        >>> from diffattn.pipelines.embedded import load_embedded_pipeline
        >>> native_size(load_embedded_pipeline())
        (64, 64)
    """
    adapter = find_adapter(pipe)
    check_family(adapter)
    window = config.window if config is not None else None
    tokens, pixels = window or native_window(pipe, adapter), pixels_per_token(pipe)
    return tokens[0] * pixels, tokens[1] * pixels


def is_above_native(pipe: Any, height: int, width: int, config: FreeSwim | None = None) -> bool:
    """Whether ``height x width`` pixels exceeds the native size on some axis (and is not below it on
    either: that is a :class:`UserError` naming the values)."""
    base = native_size(pipe, config)
    for name, value, native in (("height", height, base[0]), ("width", width, base[1])):
        if value < native:
            raise UserError(f"FreeSwim coarse-to-fine: {name} {value} is below the model's native {native} pixels "
                            f"(native size {base[0]}x{base[1]}); generate at or above it")
    return height > base[0] or width > base[1]


def coarse_to_fine(pipe: Any, config: FreeSwim | str = "freeswim", *, height: int, width: int,
                   generator: torch.Generator | list[torch.Generator] | None = None, output_type: str = "np",
                   strength: float = STRENGTH,
                   flow_shift: float | None = FLOW_SHIFT, base_size: tuple[int, int] | None = None,
                   **call: Any) -> CoarseToFineResult:
    """Generate above the native size: base pass at ``base_size`` (default: native, see
    :func:`native_size`), upscale the
    latents, refine at ``height x width`` under FreeSwim; the pipeline is left as it was found.

    Args:
        pipe: a pipeline of a family FreeSwim supports (``wan``: Wan 2.1/2.2, the embedded model).
        config: a :class:`FreeSwim` or a preset name/path of the family.
        height, width: target size in pixels, at least the native size on both axes.
        strength: the share of the schedule the refine runs (the upscaled video is noised to its start).
        flow_shift: the refine scheduler's ``shift`` where the scheduler has one (None: unchanged).
        **call: the rest of the pipeline call (``prompt``/``prompt_embeds``, ``num_frames``,
            ``num_inference_steps``, ``guidance_scale``, ...), the same for both passes.

    Example:
        >>> from diffattn.pipelines.embedded import load_embedded_pipeline
        >>> pipe = load_embedded_pipeline()
        >>> result = coarse_to_fine(pipe, height=80, width=64, prompt="a red circle", num_frames=3,
        ...                         num_inference_steps=2, generator=torch.Generator().manual_seed(0))
        >>> result.frames[0].shape, result.base_size, result.window
        ((3, 80, 64, 3), (64, 64), (8, 8))
    """
    if not isinstance(strength, (int, float)) or not 0.0 < strength <= 1.0:
        raise UserError(f"strength must be a number in (0, 1]; got {strength!r}")
    adapter = find_adapter(pipe)
    check_family(adapter)
    if isinstance(config, str):
        config = load_preset(config, family=adapter.family).config
    if not isinstance(config, FreeSwim):
        raise UserError(f"config must be a FreeSwim or a FreeSwim preset; got {type(config).__name__}")
    is_above_native(pipe, height, width, config)
    base = tuple(base_size) if base_size is not None else native_size(pipe, config)
    embedded = type(pipe).__name__ == "EmbeddedVideoPipeline"
    remove(pipe)  # the base pass is the stock model at its native size

    start = time.perf_counter()
    base_out = pipe(**call, height=base[0], width=base[1], generator=generator,
                    output_type="pt" if embedded else "latent").frames
    # The embedded model denoises pixels in [-1, 1], [B, 3, F, H, W]; its "pt" output is [B, F, H, W, 3] in [0, 1].
    latents = base_out.permute(0, 4, 1, 2, 3) * 2 - 1 if embedded else base_out
    scale = 1 if embedded else pixels_per_token(pipe) // pipe.transformer.config.patch_size[1]  # pixels per latent
    size = (latents.shape[2], height // scale, width // scale)
    upscaled = F.interpolate(latents.float(), size=size, mode="trilinear", align_corners=False)
    base_seconds = time.perf_counter() - start

    original = pipe.scheduler
    pipe.scheduler = _refine_scheduler(original, strength, flow_shift)
    start = time.perf_counter()
    try:
        apply(pipe, config)
        steps = call.get("num_inference_steps")
        pipe.scheduler.set_timesteps(steps if steps is not None else _default_steps(pipe))
        sigma = float(pipe.scheduler.sigmas[0])
        from diffusers.utils.torch_utils import randn_tensor  # a generator per video, as the pipelines take

        noise = randn_tensor(upscaled.shape, generator=generator, device=upscaled.device, dtype=torch.float32)
        start_latents = (1.0 - sigma) * upscaled + sigma * noise
        frames = pipe(**call, height=height, width=width, latents=start_latents, generator=generator,
                      output_type=output_type).frames
        refine_seconds = time.perf_counter() - start
        state = sparsity_state(pipe)
        grid = state.grid
        density = None if grid is None else state.window_pattern.layout(
            grid, block_size=config.block_size, tile_shape=config.tile_shape).density
        return CoarseToFineResult(frames=frames, base_size=base, window=state.window, grid=grid, density=density,
                                  guide_steps=list(state.guide_steps), cache_bytes=state.cache_bytes,
                                  sparse_calls=sum(state.sparse_calls.values()),
                                  base_seconds=base_seconds, refine_seconds=refine_seconds)
    finally:
        remove(pipe)
        pipe.scheduler = original


def _default_steps(pipe: Any) -> int:
    """The pipeline's default ``num_inference_steps``."""
    import inspect

    return inspect.signature(type(pipe).__call__).parameters["num_inference_steps"].default


def _refine_scheduler(scheduler: Any, strength: float, flow_shift: float | None) -> Any:
    """A copy of ``scheduler`` (``shift=flow_shift`` where it has one) whose ``set_timesteps`` keeps
    the last ``strength`` share of the steps, as diffusers' video-to-video pipelines do."""
    overrides = {"shift": flow_shift} if flow_shift is not None and "shift" in scheduler.config else {}
    refine = type(scheduler).from_config(scheduler.config, **overrides)
    full_set_timesteps = refine.set_timesteps

    def set_timesteps(self: Any, num_inference_steps: int | None = None, *args: Any, **kwargs: Any) -> None:
        full_set_timesteps(num_inference_steps, *args, **kwargs)
        steps = len(self.timesteps)
        first = steps - min(max(int(round(steps * strength)), 1), steps)
        self.timesteps = self.timesteps[first:]
        self.sigmas = self.sigmas[first:]

    refine.set_timesteps = types.MethodType(set_timesteps, refine)
    return refine
