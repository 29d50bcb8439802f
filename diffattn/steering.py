"""Cross-attention steering: word weights, regions, exclusions and attention maps of chosen words.

:func:`steer` edits the attention of the video (or image) queries to the prompt's text tokens, in
the cross-attention of Wan, LTX-Video, the embedded model and the Stable Diffusion UNets (SD 1.x/2.x,
SDXL: ``attn2`` of every transformer block, at every resolution level) and in the text columns of
the joint attention of FLUX, HunyuanVideo, CogVideoX and Mochi (the math:
:mod:`diffattn.processors.steering`).

How words reach token positions (decided here, at call time): :func:`steer` swaps the pipeline's
class for a subclass of the same name that wraps ``__call__`` and ``encode_prompt`` (nothing of
the pipeline is copied or forked; :meth:`SteeringHandle.remove` puts the class back). Each call
reads the ``prompt`` actually passed and tokenizes it with the pipeline's own tokenizer (FLUX:
``tokenizer_2``, the T5 that makes its sequence; HunyuanVideo: its Llama prompt template, minus
the cropped template tokens; SD/SDXL: the CLIP ``tokenizer``, see below); every token whose
characters overlap the word or phrase (sub-word pieces included, all occurrences,
case-insensitive) is steered. The first ``encode_prompt``
result of the call (or the ``prompt_embeds`` passed) are the conditional embeddings: a
transformer batch row is steered only when its text embeddings equal one of them, so the
negative prompt and the unconditional CFG pass run unchanged. A pipeline called with
``prompt_embeds`` and no prompt can be steered by token position (int keys) only.

UNets (SD 1.x/2.x, SDXL): a UNet's cross-attention runs at several resolution levels, each a 2-D
grid (frames 1) of ``ceil(h/d) x ceil(w/d)`` tokens, ``h x w`` the latent grid and ``d`` the
level's downsampling. A mask is resized to the latent grid by area, then each level's token
takes the mean over the ``d x d`` latent tokens it covers (so a hard region is exact at a level
whose token borders follow the mask's). Captured maps are kept at the latent grid, ``[1, h, w]``:
each level's map is repeated over the latent tokens under each of its tokens, and all steered
layers are averaged (``layers=`` picks levels: the indices are the UNet adapter's, down blocks,
mid block, up blocks). SDXL's keys are the two CLIP encoders' embeddings concatenated along the
features, at the same token positions: words are resolved with ``tokenizer`` (``tokenizer_2``
when a pipeline has only that one, as the refiner), both the same CLIP BPE. A ``prompt_2`` other
than ``prompt`` is not tokenized: the second encoder's half of each key then holds its tokens.

Example:
    >>> import torch, diffattn
    >>> from diffattn.pipelines.embedded import load_embedded_pipeline
    >>> pipe = load_embedded_pipeline()
    >>> pipe.set_progress_bar_config(disable=True)
    >>> handle = diffattn.steer(pipe, regions={"red circle": (0.0, 0.0, 0.5, 1.0)}, capture=["red"])
    >>> video = pipe("a red circle moves right", num_frames=3, num_inference_steps=2).frames[0]
    >>> handle.maps["red"].shape                 # [frames, token rows, token columns]
    torch.Size([3, 8, 8])
    >>> handle.tokens["red circle"]              # positions in the prompt's tokens
    [1, 2]
    >>> _ = diffattn.remove(pipe)                # the stock pipeline again
"""

from __future__ import annotations

import inspect
import math
import re
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .adapters import find_adapter
from .adapters import remove as remove_sparse
from .adapters.base import ModelAdapter
from .errors import DenseFallbackWarning, UserError
from .patterns import VideoGrid
from .processors.agent import level_grid
from .processors.base import SparseAttnProcessor
from .processors.state import _current_step
from .processors.steering import HARD_BIAS, CallEdit, ColumnEdit, SteeredAttnProcessor, TextSteering, steered_processor

Key = str | int
Box = tuple[float, float, float, float]
#: Families whose text enters through cross-attention (``attn2``); the others attend jointly.
CROSS_ATTENTION_FAMILIES = ("wan", "ltx_video", "sd", "sdxl")
#: Families whose cross-attention runs at several resolution levels (UNets; 2-D, frames 1).
LEVEL_FAMILIES = ("sd", "sdxl")
_HANDLE_ATTRIBUTE = "_diffattn_steering"


# -- user input -----------------------------------------------------------------------------------


def box_mask(box: Sequence[float], height: int, width: int, name: str = "box") -> torch.Tensor:
    """A bool ``[height, width]`` mask of a box ``(x0, y0, x1, y1)`` given as fractions of the frame.

    Example:
        >>> box_mask((0.0, 0.0, 0.5, 1.0), 2, 4).int().tolist()
        [[1, 1, 0, 0], [1, 1, 0, 0]]
    """
    x0, y0, x1, y1 = check_box(box, name)
    rows = (torch.arange(height) + 0.5) / height
    cols = (torch.arange(width) + 0.5) / width
    return ((rows >= y0) & (rows < y1))[:, None] & ((cols >= x0) & (cols < x1))[None, :]


def check_box(box: Any, name: str = "box") -> Box:
    """``box`` as four floats ``0 <= x0 < x1 <= 1``, ``0 <= y0 < y1 <= 1``, or :class:`UserError`.

    Example:
        >>> check_box([0, 0.25, 1, 0.75])
        (0.0, 0.25, 1.0, 0.75)
    """
    try:
        values = tuple(float(v) for v in (box.split(",") if isinstance(box, str) else box))
    except (TypeError, ValueError):
        values = ()
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        raise UserError(f"{name} must be four numbers x0,y0,x1,y1 (fractions of the frame); got {box!r}")
    x0, y0, x1, y1 = values
    if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
        raise UserError(f"{name} must satisfy 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1 (fractions of the frame); "
                        f"got {box!r}")
    return values  # type: ignore[return-value]


def _check_key(key: Any, argument: str) -> Key:
    if isinstance(key, bool) or not isinstance(key, (str, int)) or (isinstance(key, str) and not key.strip()):
        raise UserError(f"{argument} keys must be words or phrases of the prompt (str) or token positions (int >= 0); "
                        f"got {key!r}")
    if isinstance(key, int) and key < 0:
        raise UserError(f"{argument}: a token position must be >= 0; got {key}")
    return key.strip() if isinstance(key, str) else key


def _check_mask(mask: Any, argument: str) -> torch.Tensor | Box:
    """A float ``[F, H, W]`` mask in [0, 1] on the CPU, or a checked box."""
    if isinstance(mask, (tuple, list)) and len(mask) == 4 and all(isinstance(v, (int, float)) for v in mask):
        return check_box(mask, argument)
    if isinstance(mask, np.ndarray):
        mask = torch.from_numpy(np.ascontiguousarray(mask))
    if not isinstance(mask, torch.Tensor):
        raise UserError(f"{argument} must be a mask (torch or numpy [H, W] or [F, H, W], bool or float in [0, 1]) or "
                        f"a box (x0, y0, x1, y1) in fractions of the frame; got {type(mask).__name__}")
    if mask.ndim not in (2, 3) or mask.numel() == 0:
        raise UserError(f"{argument} must have shape [H, W] or [F, H, W] (pixels at the output size); "
                        f"got {tuple(mask.shape)}")
    mask = mask.detach().to("cpu", torch.float32)
    if not bool(torch.isfinite(mask).all()) or float(mask.min()) < 0 or float(mask.max()) > 1:
        raise UserError(f"{argument} values must lie in [0, 1] (bool or float); got min {float(mask.min()):g}, "
                        f"max {float(mask.max()):g}")
    return mask if mask.ndim == 3 else mask[None]


def _check_factor(value: Any, argument: str) -> float:
    try:
        factor = float(value)
    except (TypeError, ValueError):
        factor = float("nan")
    if not (math.isfinite(factor) and factor >= 0):
        raise UserError(f"{argument} must be a finite factor >= 0; got {value!r}")
    return factor


@dataclass(frozen=True)
class SteeringSpec:
    """The checked arguments of :func:`steer` (see there)."""

    token_weights: dict[Key, float]
    regions: dict[Key, torch.Tensor | Box]
    exclude: dict[Key, torch.Tensor | Box]
    capture: tuple[Key, ...]
    steps: tuple[float, float]
    layers: frozenset[int] | None
    strength: float
    decay: bool
    normalize: bool

    @property
    def keys(self) -> list[Key]:
        """Every word, phrase and position named, in order, once."""
        return list(dict.fromkeys([*self.token_weights, *self.regions, *self.exclude, *self.capture]))


def check_spec(token_weights: Mapping | None, regions: Mapping | None, exclude: Mapping | None,
               capture: Iterable | None, steps: Sequence[float], layers: Iterable[int] | None, strength: float,
               decay: bool, normalize: bool) -> SteeringSpec:
    """Check :func:`steer`'s arguments (:class:`UserError` naming the argument and the value)."""
    def mapping(value: Any, name: str) -> dict:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise UserError(f"{name} must be a dict {{word: ...}}; got {type(value).__name__}")
        return dict(value)

    weights = {_check_key(k, "token_weights"): _check_factor(v, f"token_weights[{k!r}]")
               for k, v in mapping(token_weights, "token_weights").items()}
    region_masks = {_check_key(k, "regions"): _check_mask(v, f"regions[{k!r}]")
                    for k, v in mapping(regions, "regions").items()}
    excluded = {_check_key(k, "exclude"): _check_mask(v, f"exclude[{k!r}]")
                for k, v in mapping(exclude, "exclude").items()}
    if isinstance(capture, (str, int)):
        capture = [capture]
    captured = tuple(dict.fromkeys(_check_key(k, "capture") for k in (capture or ())))
    try:
        start, stop = (float(s) for s in steps)
    except (TypeError, ValueError):
        start, stop = float("nan"), float("nan")
    if not (0 <= start < stop <= 1):
        raise UserError(f"steps must be (start, stop) fractions of the denoising with 0 <= start < stop <= 1; "
                        f"got {steps!r}")
    strength = float(strength) if isinstance(strength, (int, float)) else float("nan")
    if not strength > 0:  # NaN too
        raise UserError(f"strength must be a positive number (math.inf: hard regions); got {strength!r}")
    chosen = None
    if layers is not None:
        chosen = frozenset(layers)
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in chosen):
            raise UserError(f"layers must be block indices (int >= 0) or None (all); got {sorted(chosen, key=str)!r}")
    spec = SteeringSpec(weights, region_masks, excluded, captured, (start, stop), chosen, strength, bool(decay),
                        bool(normalize))
    if not spec.keys:
        raise UserError("steer needs at least one of token_weights, regions, exclude or capture")
    return spec


# -- words -> token positions ---------------------------------------------------------------------


def _tokenizer(pipe: Any) -> Any:
    """The tokenizer that makes the transformer's text sequence (FLUX: the T5 one; SDXL: the first
    CLIP one, or the second where it is the only one: same BPE, same token positions)."""
    names = ("tokenizer",)
    if type(pipe).__name__.startswith("Flux"):
        names = ("tokenizer_2", "tokenizer")
    elif type(pipe).__name__.startswith("StableDiffusionXL"):
        names = ("tokenizer", "tokenizer_2")
    for name in names:
        tokenizer = getattr(pipe, name, None)
        if tokenizer is not None:
            return tokenizer
    return None


def _templated(pipe: Any, tokenizer: Any, prompt: str, call: Mapping[str, Any]) -> tuple[str, int, int]:
    """``(text the tokenizer sees, where the prompt starts in it, leading tokens the pipeline drops)``:
    HunyuanVideo wraps the prompt in its Llama template and crops the template's tokens."""
    if type(pipe).__name__.startswith("HunyuanVideo"):
        template = call.get("prompt_template")
        if template is None:
            from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

            template = DEFAULT_PROMPT_TEMPLATE
        crop = template.get("crop_start")
        if crop is None:  # as the pipeline counts it: the template's tokens less <|eot_id|> and "{}"
            crop = len(tokenizer(template["template"]).input_ids) - 2
        return template["template"].format(prompt), template["template"].index("{}"), int(crop)
    return prompt, 0, 0


def resolve_tokens(tokenizer: Any, prompt: str, key: Key, offset: int = 0, dropped: int = 0,
                   text: str | None = None) -> list[int]:
    """Positions of ``key``'s tokens in ``tokenizer(text)`` (``text`` defaults to the prompt,
    which starts at ``offset`` in it), minus ``dropped`` leading tokens; an int key is a position.
    A word or phrase not in the prompt is a :class:`UserError` naming it and the prompt's tokens.

    Example:
        >>> from diffattn.pipelines.embedded import build_tokenizer
        >>> resolve_tokens(build_tokenizer(), "a red circle moves right", "Red Circle")
        [1, 2]
    """
    if isinstance(key, int):
        return [key]
    text = prompt if text is None else text
    spans = [(offset + m.start(), offset + m.end())
             for m in re.finditer(r"(?<!\w)" + re.escape(key) + r"(?!\w)", prompt, flags=re.IGNORECASE)]
    try:
        encoding = tokenizer(text, return_offsets_mapping=True)
    except NotImplementedError as error:  # transformers 4's Python ("slow") tokenizers
        raise UserError(f"{type(tokenizer).__name__} gives no character offsets, needed to find {key!r} in the "
                        "prompt: give the pipeline the fast tokenizer (transformers' *TokenizerFast, or transformers "
                        ">= 5) or steer token positions (int keys)") from error
    positions = [i - dropped for i, (a, b) in enumerate(encoding["offset_mapping"])
                 if b > a and i >= dropped and any(a < end and b > start for start, end in spans)]
    if not positions:
        tokens = tokenizer.convert_ids_to_tokens(encoding["input_ids"])[dropped:]
        raise UserError(f"steering word {key!r} is not in the prompt {prompt!r}; the prompt's tokens are {tokens}")
    return positions


# -- the handle and its hooks ---------------------------------------------------------------------


@dataclass
class _PipelineCall:
    """What one pipeline call passed: its prompts (None with prompt_embeds only), the conditional
    embeddings (from the call or the first encode_prompt), each prompt's token positions."""

    prompts: list[str] | None
    cond: torch.Tensor | None
    positions: list[dict[Key, list[int]]]


@dataclass
class SteeringHandle:
    """What :func:`steer` installed; :meth:`remove` restores the stock pipeline.

    Attributes:
        tokens: ``{word: token positions}`` in the last call's (first) prompt.
        step_maps: ``{word: [map per denoising step]}``, each ``[F, h, w]`` (latent frames and
            token rows/columns; UNets: ``[1, h, w]`` at the latent grid): the attention mass of the
            word's tokens per video query, averaged over heads, steered layers and conditional
            rows, from the last call.
        maps: ``{word: [F, h, w]}``, ``step_maps`` averaged over the steps.
        video_maps: ``{word: [rows, F, h, w]}``: the maps of each conditional row (video) of the
            last call, averaged over the steps.
    """

    pipe: Any = field(repr=False)
    spec: SteeringSpec = field(repr=False)
    tokens: dict[Key, list[int]] = field(default_factory=dict)
    step_maps: dict[Key, list[torch.Tensor]] = field(default_factory=dict)
    video_maps: dict[Key, torch.Tensor] = field(default_factory=dict)
    _stock_class: type | None = None
    _hooks: list[Any] = field(default_factory=list)
    _layers: list[tuple[torch.nn.Module, str, int, TextSteering]] = field(default_factory=list)
    _call: _PipelineCall | None = None
    _sums: dict[int, list] = field(default_factory=dict)
    _warned: set[str] = field(default_factory=set)
    _grid: tuple[int, int, int] = (1, 1, 1)
    _step: int = -1

    @property
    def maps(self) -> dict[Key, torch.Tensor]:
        return {word: torch.stack(steps).mean(0) for word, steps in self.step_maps.items() if steps}

    def remove(self) -> None:
        """Restore the pipeline's class, its processors and remove the hooks (idempotent)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        for module, attribute, _, steering in self._layers:
            processor = getattr(module, attribute)
            if isinstance(processor, SteeredAttnProcessor) and processor.steering is steering:
                _set_processor(module, attribute, processor.stock)
            elif isinstance(processor, SparseAttnProcessor) and processor.text_steering is steering:
                processor.text_steering = None
        self._layers.clear()
        if self._stock_class is not None and type(self.pipe).__dict__.get(_HANDLE_ATTRIBUTE) is self:
            self.pipe.__class__ = self._stock_class
        self._stock_class = None

    def __enter__(self) -> "SteeringHandle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    # -- called by the hooks ------------------------------------------------------------------

    def _begin_pipeline_call(self, call: Mapping[str, Any]) -> None:
        prompt, embeds = call.get("prompt"), call.get("prompt_embeds")
        prompts = [prompt] if isinstance(prompt, str) else (list(prompt) if prompt is not None else None)
        words = [k for k in self.spec.keys if isinstance(k, str)]
        if prompts is None and words:
            raise UserError(f"steering by words ({', '.join(map(repr, words))}) needs the prompt, but the pipeline "
                            "was called with prompt_embeds and no prompt; steer token positions (int keys) instead")
        positions: list[dict[Key, list[int]]] = []
        if prompts is not None:
            tokenizer = _tokenizer(self.pipe)
            if tokenizer is None and words:
                raise UserError(f"{type(self.pipe).__name__} has no tokenizer to find {words[0]!r} in the prompt; "
                                "steer token positions (int keys) instead")
            for text in prompts:
                templated, offset, dropped = _templated(self.pipe, tokenizer, text, call)
                positions.append({key: resolve_tokens(tokenizer, text, key, offset, dropped, templated)
                                  if isinstance(key, str) else [key] for key in self.spec.keys})
        else:
            positions.append({key: [key] for key in self.spec.keys})
        self._call = _PipelineCall(prompts, embeds if isinstance(embeds, torch.Tensor) else None, positions)
        self.tokens = dict(positions[0])
        self._sums.clear()
        self.step_maps, self.video_maps = {}, {}

    def _encoded(self, output: Any) -> None:
        call = self._call
        if call is None or call.cond is not None:
            return
        first = output if isinstance(output, torch.Tensor) else next(
            (o for o in output if isinstance(o, torch.Tensor)), None) if isinstance(output, (tuple, list)) else None
        call.cond = first

    def _row_prompts(self, text: torch.Tensor) -> torch.Tensor:
        """The prompt index of each batch row of ``text`` ``[B, S, C]`` (-1: not conditional)."""
        call = self._call
        rows = torch.full((text.shape[0],), -1, dtype=torch.long)
        if call is None or call.cond is None or call.cond.shape[1:] != text.shape[1:]:
            return rows
        cond = call.cond.to(device=text.device, dtype=text.dtype)
        per_prompt = max(1, cond.shape[0] // len(call.positions))
        for b in range(text.shape[0]):
            for r in range(cond.shape[0]):
                if torch.equal(text[b], cond[r]):
                    rows[b] = min(r // per_prompt, len(call.positions) - 1)
                    break
        return rows

    def _warn(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            warnings.warn(f"diffattn.steer: {message}", DenseFallbackWarning, stacklevel=4)

    def _plan(self, adapter: ModelAdapter, transformer: torch.nn.Module, args: tuple, kwargs: dict) -> CallEdit | None:
        """The :class:`CallEdit` of one transformer forward, or None (the forward runs stock)."""
        if self._call is None:
            return None
        named = _forward_arguments(transformer, args, kwargs)
        text = named.get("encoder_hidden_states")
        grid = adapter.grid_from_call(transformer, args, kwargs)
        if grid is None or not isinstance(text, torch.Tensor):
            self._warn("a transformer call without a token grid or text runs unsteered "
                       f"({adapter.no_grid_calls or 'unexpected inputs'})")
            return None
        rows = self._row_prompts(text)
        if not bool((rows >= 0).any()):
            return None
        spec = self.spec
        step, steps = _current_step(getattr(self.pipe, "scheduler", None), named.get("timestep"))
        progress = step / steps if step is not None and steps else 0.0
        start, stop = spec.steps
        editing = start <= progress < stop
        strength = spec.strength * ((1 - (progress - start) / (stop - start)) if spec.decay else 1.0)
        edit = _column_edit(spec, self._call.positions, rows, text.shape[1], grid, editing, strength,
                            self._step_key(step))
        if edit.is_neutral():
            return None
        self._grid = (grid.frames, grid.height, grid.width)
        self._step = self._step_key(step)
        position = "cross" if adapter.family in CROSS_ATTENTION_FAMILIES else grid.text_position
        levels = _level_edits(spec, edit, grid, strength) if adapter.family in LEVEL_FAMILIES else None
        return CallEdit(edit, position, text.shape[1], grid.frames * grid.height * grid.width, spec.layers,
                        capture_rows=rows >= 0, level_edit=levels)

    def _step_key(self, step: int | None) -> int:
        return -1 if step is None else step

    def _sink(self, layer_index: int, maps: torch.Tensor) -> None:
        """Accumulate the maps ``[rows, Nq, W]`` of one layer of the current step (a UNet level's
        ``Nq`` queries repeated up to the latent grid)."""
        total = self._sums.setdefault(self._step, [0.0, 0, self._grid])
        total[0] = total[0] + _to_latent_grid(maps.detach().float().cpu(), VideoGrid(*self._grid))
        total[1] += 1

    def _finish_maps(self) -> None:
        captured = self.spec.capture
        self.step_maps = {word: [] for word in captured}
        self.video_maps = {word: [] for word in captured}
        for _, (summed, layers, (frames, height, width)) in sorted(self._sums.items()):
            mean = summed / layers  # [rows, Nv, W]
            for w, word in enumerate(captured):
                self.video_maps[word].append(mean[..., w].reshape(-1, frames, height, width))
                self.step_maps[word].append(self.video_maps[word][-1].mean(0))
        self.video_maps = {word: torch.stack(steps).mean(0) for word, steps in self.video_maps.items() if steps}


def _forward_arguments(transformer: torch.nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    try:
        return dict(inspect.signature(type(transformer).forward).bind(transformer, *args, **kwargs).arguments)
    except TypeError:
        return dict(kwargs)


def _grid_mask(mask: torch.Tensor | Box, frames: int, height: int, width: int, name: str) -> torch.Tensor:
    """A pixel mask ``[F, H, W]`` (or a box) as the fraction of each token it covers, ``[frames*height*width]``."""
    if isinstance(mask, tuple):
        mask = box_mask(mask, height * 8, width * 8, name).float()[None]
    _, pixel_h, pixel_w = mask.shape
    if abs(pixel_h / pixel_w - height / width) > (height / width) / min(height, width):
        raise UserError(f"{name} has shape {tuple(mask.shape)} but the output is {height}x{width} tokens (aspect "
                        f"{height}:{width}); give the mask at the output size in pixels")
    pooled = F.adaptive_avg_pool3d(mask[None, None], (frames, height, width))
    return pooled.flatten()


def _column_edit(spec: SteeringSpec, positions: list[dict[Key, list[int]]], rows: torch.Tensor, text_tokens: int,
                 grid: Any, editing: bool, strength: float, step: int) -> ColumnEdit:
    """The :class:`ColumnEdit` of one forward: ``rows[b]`` is row b's prompt index (-1: untouched)."""
    batch = rows.shape[0]

    def indicator(key: Key) -> torch.Tensor:
        out = torch.zeros(batch, text_tokens)
        for b, p in enumerate(rows.tolist()):
            if p >= 0:
                kept = [i for i in positions[p][key] if i < text_tokens]
                if not kept:
                    raise UserError(f"{key!r} sits at token positions {positions[p][key]}, past the {text_tokens} text "
                                    "tokens the pipeline kept (the prompt was truncated)")
                out[b, kept] = 1
        return out

    value_scale, queries, keys = None, [], []
    if editing:
        for key, factor in spec.token_weights.items():
            if factor == 1:
                continue
            where = indicator(key)
            if spec.normalize:
                keys.append(where * math.log(max(factor, 1e-30)))
            else:
                value_scale = torch.ones(batch, text_tokens) if value_scale is None else value_scale
                value_scale = torch.where(where > 0, value_scale * factor, value_scale)
        keys += [indicator(key) for masks in (spec.regions, spec.exclude) for key in masks]
        queries = _query_factors(spec, grid, strength)
    capture = torch.stack([indicator(key) for key in spec.capture], -1) if spec.capture else None
    return ColumnEdit(
        query_factors=torch.stack(queries, -1)[None] if queries else None,
        key_factors=torch.stack(keys, -1) if keys else None,
        value_scale=value_scale,
        capture=capture,
    )


def _query_factors(spec: SteeringSpec, grid: Any, strength: float, downsample: int = 1) -> list[torch.Tensor]:
    """The query factors ``u`` (``[tokens]`` per rank, in :func:`_column_edit`'s key order: the
    ``normalize`` weights, the regions, the exclusions) at the forward's token grid, or at its
    UNet level downsampled ``downsample`` times (each level token: the mean of its latent tokens)."""
    frames, height, width = grid.frames, grid.height, grid.width
    tokens = frames * -(-height // downsample) * -(-width // downsample)
    out = [torch.ones(tokens) for factor in spec.token_weights.values() if spec.normalize and factor != 1]
    hard = math.isinf(strength)
    for masks, favour in ((spec.regions, True), (spec.exclude, False)):
        for key, mask in masks.items():
            inside = _grid_mask(mask, frames, height, width, f"{'regions' if favour else 'exclude'}[{key!r}]")
            if downsample > 1:
                inside = F.avg_pool2d(inside.reshape(frames, height, width), downsample, ceil_mode=True).flatten()
            if hard:
                bias = -HARD_BIAS * ((inside < 0.5) if favour else (inside >= 0.5)).float()
            else:
                bias = strength * (2 * inside - 1) if favour else -strength * inside
            out.append(bias)
    return out


def _level_edits(spec: SteeringSpec, edit: ColumnEdit, grid: Any,
                 strength: float) -> Callable[[int], ColumnEdit | None]:
    """``edit`` for a UNet level's cross-attention with ``queries`` tokens (None: no level of
    ``grid`` has that many); the query factors are made once per level and forward."""
    made: dict[int, ColumnEdit | None] = {}

    def at_level(queries: int) -> ColumnEdit | None:
        if queries not in made:
            found = level_grid(VideoGrid(1, grid.height, grid.width), queries) if grid.frames == 1 else None
            if found is None or edit.query_factors is None:
                made[queries] = None if found is None else edit
            else:
                factors = _query_factors(spec, grid, strength, found[0])
                made[queries] = replace(edit, query_factors=torch.stack(factors, -1)[None])
        return made[queries]

    return at_level


def _to_latent_grid(maps: torch.Tensor, grid: VideoGrid) -> torch.Tensor:
    """Maps ``[rows, Nq, W]`` of a UNet level (``Nq`` tokens) repeated over the latent tokens under
    each level token, ``[rows, grid.video_tokens, W]``; maps at the grid pass unchanged."""
    if maps.shape[1] == grid.video_tokens:
        return maps
    found = level_grid(grid, maps.shape[1]) if grid.frames == 1 else None
    if found is None:
        raise RuntimeError(f"captured maps of {maps.shape[1]} queries on the token grid {grid}")  # op checked it
    downsample, level = found
    rows = torch.arange(grid.height) // downsample
    cols = torch.arange(grid.width) // downsample
    per_level = maps.reshape(maps.shape[0], level.height, level.width, maps.shape[-1])
    return per_level[:, rows][:, :, cols].reshape(maps.shape[0], grid.video_tokens, maps.shape[-1])


def _text_layers(adapter: ModelAdapter, transformer: torch.nn.Module) -> list[tuple[str, int]]:
    """``[(attention module name, block index)]`` of the layers where text meets video."""
    if adapter.family in CROSS_ATTENTION_FAMILIES:
        return [(name.replace("attn1", "attn2"), index) for name, index in adapter.self_attention_layers(transformer)]
    return adapter.self_attention_layers(transformer)


def _set_processor(module: torch.nn.Module, attribute: str, processor: Any) -> None:
    # Plain assignment: diffusers' set_processor also works, but Mochi's modules may lack it.
    setattr(module, attribute, processor)


def _attach(layers: list[tuple[torch.nn.Module, str, int, TextSteering]]) -> None:
    """Before each forward: make every steered layer's processor edit its text columns, whatever
    was installed since (diffattn.apply's sparse processor, or a stock one)."""
    for module, attribute, index, steering in layers:
        processor = getattr(module, attribute)
        if isinstance(processor, SparseAttnProcessor):
            processor.text_steering = steering
        elif not (isinstance(processor, SteeredAttnProcessor) and processor.steering is steering):
            _set_processor(module, attribute, steered_processor(processor, steering, index))


def steer(
    pipe: Any,
    token_weights: Mapping[Key, float] | None = None,
    regions: Mapping[Key, Any] | None = None,
    exclude: Mapping[Key, Any] | None = None,
    capture: Iterable[Key] | Key | None = None,
    steps: Sequence[float] = (0.0, 1.0),
    layers: Iterable[int] | None = None,
    strength: float = 3.0,
    decay: bool = True,
    normalize: bool = False,
) -> SteeringHandle:
    """Steer a pipeline's text attention (see the module docstring); returns a :class:`SteeringHandle`.

    Args:
        pipe: a diffusers pipeline of a supported family (Wan, LTX-Video, the embedded model,
            FLUX, HunyuanVideo, CogVideoX, Mochi, SD 1.x/2.x and SDXL), with or without
            :func:`diffattn.apply`.
        token_weights: ``{word: c}``: the attention probability of the word's tokens times ``c``
            (Prompt-to-Prompt: rows are not renormalised; ``normalize=True`` adds ``log c`` to
            the logits instead, i.e. the softmax renormalises).
        regions: ``{phrase: mask}``: the phrase's tokens get ``+strength`` on the logits of video
            tokens inside the mask and ``-strength`` outside (``strength=math.inf``: hard, zero
            attention outside, unchanged inside). A mask is ``[H, W]`` or ``[F, H, W]`` in pixels
            at the output size (bool or float in [0, 1], torch or numpy), resized to each call's
            token grid; or a box ``(x0, y0, x1, y1)`` in fractions of the frame.
        exclude: ``{phrase: mask}``: ``-strength`` inside the mask (hard: zero attention inside).
        capture: words whose attention maps are recorded (``handle.maps``, ``handle.step_maps``).
        steps: ``(start, stop)`` fractions of the denoising steps during which weights, regions
            and exclusions act (captures are recorded at every step).
        layers: block indices of the layers to edit (None: all where text meets video).
        strength: the region/exclusion logit bias.
        decay: the bias falls linearly from ``strength`` at ``start`` towards 0 at ``stop``.
        normalize: see ``token_weights``.

    Steering again replaces the previous steering (never stacks); ``handle.remove()`` or
    :func:`remove` restores the stock pipeline. Nothing is computed at ``steer`` time; words are
    found in each call's prompt (:class:`UserError` naming the word and the prompt's tokens).

    Example:
        >>> import diffattn
        >>> from diffattn.pipelines.embedded import load_embedded_pipeline
        >>> pipe = load_embedded_pipeline()
        >>> handle = diffattn.steer(pipe, token_weights={"red": 2.0})
        >>> type(pipe.transformer.blocks[0].attn2.processor).__name__   # attached at the first call
        'WanAttnProcessor'
        >>> handle.remove()
    """
    spec = check_spec(token_weights, regions, exclude, capture, steps, layers, strength, decay, normalize)
    adapter = find_adapter(pipe)
    unsteer(pipe)
    handle = SteeringHandle(pipe, spec)
    for _, transformer in adapter.transformers(pipe):
        steering = TextSteering(sink=handle._sink, warn=handle._warn)
        text_layers = _text_layers(adapter, transformer)
        known = {index for _, index in text_layers}
        if spec.layers is not None and not spec.layers <= known:
            raise UserError(f"layers {sorted(spec.layers - known)} do not exist; the {adapter.family} transformer's "
                            f"steerable layers are 0..{max(known)}")
        for name, index in text_layers:
            handle._layers.append((transformer.get_submodule(name), "processor", index, steering))
        mine = [entry for entry in handle._layers if entry[3] is steering]

        def begin(module: torch.nn.Module, args: tuple, kwargs: dict, steering=steering, mine=mine) -> None:
            steering.call = handle._plan(adapter, module, args, kwargs)
            _attach(mine)

        def end(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any, steering=steering) -> None:
            steering.call = None

        handle._hooks.append(transformer.register_forward_pre_hook(begin, with_kwargs=True))
        handle._hooks.append(transformer.register_forward_hook(end, with_kwargs=True))
    handle._stock_class = type(pipe)
    pipe.__class__ = _steered_class(type(pipe), handle)
    return handle


def _steered_class(stock: type, handle: SteeringHandle) -> type:
    """A subclass of ``stock`` with the same name whose ``__call__`` and ``encode_prompt`` tell
    ``handle`` the prompt and the conditional embeddings of each call."""
    signature = inspect.signature(stock.__call__)

    def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        handle._begin_pipeline_call(bound.arguments)
        try:
            return stock.__call__(self, *args, **kwargs)
        finally:
            handle._finish_maps()
            handle._call = None

    def encode_prompt(self: Any, *args: Any, **kwargs: Any) -> Any:
        output = stock.encode_prompt(self, *args, **kwargs)
        handle._encoded(output)
        return output

    members = {"__call__": __call__, "__module__": stock.__module__, "__qualname__": stock.__qualname__,
               "__doc__": stock.__doc__, _HANDLE_ATTRIBUTE: handle}
    if hasattr(stock, "encode_prompt"):
        members["encode_prompt"] = encode_prompt
    return type(stock.__name__, (stock,), members)


def unsteer(pipe: Any) -> Any:
    """Remove :func:`steer`'s steering from ``pipe`` (sparse attention stays); returns ``pipe``."""
    handle = type(pipe).__dict__.get(_HANDLE_ATTRIBUTE)
    if isinstance(handle, SteeringHandle):
        handle.remove()
    return pipe


def remove(pipe: Any) -> Any:
    """Restore the stock pipeline: remove steering (:func:`steer`) and sparse attention
    (:func:`diffattn.apply`); returns ``pipe``. A transformer is also accepted (sparse only).

    Example:
        >>> import diffattn
        >>> from diffattn.pipelines.embedded import load_embedded_pipeline
        >>> pipe = load_embedded_pipeline()
        >>> stock_class = type(pipe)
        >>> _ = diffattn.steer(pipe, capture=["red"])
        >>> type(diffattn.remove(pipe)) is stock_class
        True
    """
    return remove_sparse(unsteer(pipe))


# -- heat maps ------------------------------------------------------------------------------------


def heatmap_video(word_map: torch.Tensor, video: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """A captured map ``[F, h, w]`` over a uint8 video ``[T, H, W, 3]``: the map resized to the
    video (trilinear), scaled by its maximum, coloured black-red-yellow and blended in.

    Example:
        >>> heat = heatmap_video(torch.rand(2, 4, 4), np.zeros((3, 16, 16, 3), np.uint8))
        >>> heat.shape, heat.dtype
        ((3, 16, 16, 3), dtype('uint8'))
    """
    frames, height, width = video.shape[:3]
    resized = F.interpolate(word_map.float()[None, None], size=(frames, height, width), mode="trilinear",
                            align_corners=False)[0, 0]
    level = (resized / resized.max().clamp_min(1e-12)).clamp(0, 1).numpy()[..., None]
    colour = np.concatenate([np.clip(2 * level, 0, 1), np.clip(2 * level - 1, 0, 1), np.zeros_like(level)], -1)
    blended = (1 - alpha) * video.astype(np.float32) / 255 + alpha * colour
    return (np.clip(blended, 0, 1) * 255).round().astype(np.uint8)


def heatmap_sheet(word_map: torch.Tensor, video: np.ndarray, columns: int = 8) -> np.ndarray:
    """A contact sheet (uint8 ``[2 H, k W, 3]``): up to ``columns`` evenly spaced frames of the
    video above the same frames with the map blended in (:func:`heatmap_video`).

    Example:
        >>> heatmap_sheet(torch.rand(5, 2, 2), np.zeros((5, 8, 8, 3), np.uint8), columns=3).shape
        (16, 24, 3)
    """
    heat = heatmap_video(word_map, video)
    picks = np.unique(np.linspace(0, len(video) - 1, min(columns, len(video))).round().astype(int))
    return np.concatenate([np.concatenate(list(video[picks]), 1), np.concatenate(list(heat[picks]), 1)], 0)


__all__ = ["SteeringHandle", "box_mask", "check_box", "heatmap_sheet", "heatmap_video", "remove", "resolve_tokens",
           "steer", "unsteer"]
