"""The embedded default model: a small pixel-space Wan transformer diffattn trains and ships.

Components (all diffusers/transformers classes, saved with ``save_pretrained`` as safetensors):

* ``tokenizer``: a ``tokenizers`` word-level tokenizer over the caption grammar's vocabulary
  (:data:`diffattn.pipelines.shapes.VOCABULARY`), wrapped as ``PreTrainedTokenizerFast``.
* ``text_encoder``: a 2-layer ``UMT5EncoderModel`` (the same family as Wan's text encoder) trained
  together with the transformer.
* ``transformer``: a ``WanTransformer3DModel`` working directly on pixels: ``in_channels=3`` and
  patch ``(1, 8, 8)``, so a 17-frame 64x64 clip is a 17x8x8 grid of 1088 tokens. There is no
  autoencoder: nothing to train besides the denoiser, decoding is exact (the detector sees the
  model's own pixels, not a VAE's blur), and every frame is a latent frame (no 1 + 4k rule).
  Because it is a stock Wan transformer, the Wan adapter and every Wan preset apply unchanged.
* ``scheduler``: ``FlowMatchEulerDiscreteScheduler`` (rectified flow, like Wan) with stochastic
  sampling: every step re-noises the clean estimate with fresh noise from the caller's generator.

The transformer predicts the clean clip ("x-prediction", ``prediction_type="sample"`` in
``model_index.json``) rather than the flow velocity ``noise - clean``: a patch holds 8x8x3 = 192
pixel values but the hidden state is 128 wide, so a velocity target (which carries the full-rank
noise) cannot pass through it, while clean clips of flat shapes lie on a low-dimensional manifold
that can (the argument of Li & He, "Back to Basics: Let Denoising Generative Models Denoise",
2025). The pipeline turns the prediction into the velocity the stock scheduler steps with:
``v = (x_t - x0_hat) / sigma``. How it is trained, how it scores and what was tried and not
shipped: ``docs/embedded-model.md``.

Example:
    >>> import torch
    >>> pipe = load_embedded_pipeline()                                # offline, ~8 MB
    >>> pipe.set_progress_bar_config(disable=True)
    >>> video = pipe("a red circle moves right", num_frames=3, num_inference_steps=2,
    ...              generator=torch.Generator().manual_seed(0)).frames[0]
    >>> video.shape                                                     # float [0, 1]
    (3, 64, 64, 3)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.loaders import WanLoraLoaderMixin
from diffusers.utils import BaseOutput

from ..errors import UserError
from .shapes import VOCABULARY

#: Where the shipped weights live (package data).
EMBEDDED_DIR = Path(__file__).resolve().parent / "embedded_model"
PIPELINE_CLASS_NAME = "EmbeddedVideoPipeline"
PATCH_PIXELS = 8
MAX_TEXT_TOKENS = 24
TEXT_DIM = 64
#: What the transformer's output means: the clean clip. Saved in ``model_index.json``; the only
#: value this pipeline takes (other parameterizations were tried and not shipped, see
#: ``docs/embedded-model.md``).
PREDICTION_TYPE = "sample"
#: Call defaults: the base length the model was trained at.
DEFAULT_CALL = dict(num_frames=17, height=64, width=64, num_inference_steps=25, guidance_scale=7.0)

PAD, UNK = "<pad>", "<unk>"


def build_tokenizer():
    """Word-level tokenizer over the caption grammar: lower-cased, split on whitespace and
    punctuation, unknown words -> ``<unk>``.

    Example:
        >>> tokenizer = build_tokenizer()
        >>> tokenizer.convert_ids_to_tokens(tokenizer("A red circle, moves LEFT").input_ids)
        ['a', 'red', 'circle', '<unk>', 'moves', 'left']
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: index for index, word in enumerate((PAD, UNK, *VOCABULARY))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token=PAD, unk_token=UNK, model_max_length=MAX_TEXT_TOKENS
    )


@dataclass(frozen=True)
class EmbeddedModelConfig:
    """Sizes and scheduler of the embedded model (the training script's defaults ship)."""

    num_layers: int = 6
    num_attention_heads: int = 4
    attention_head_dim: int = 32
    ffn_dim: int = 512
    text_layers: int = 2
    shift: float = 2.0
    #: Sampler: re-noise the clean estimate at each step (x_next = (1 - s') x0_hat + s' noise)
    #: instead of the deterministic Euler step. With an imperfect model the ODE drifts off the
    #: data at high noise and never recovers; fresh noise at each step lets the model correct it.
    stochastic_sampling: bool = True


def build_components(config: EmbeddedModelConfig = EmbeddedModelConfig(), seed: int = 0) -> dict[str, Any]:
    """Freshly initialised components (seeded; the global RNG is left as it was) for training:
    ``tokenizer``, ``text_encoder``, ``transformer`` and ``scheduler``.

    Example:
        >>> tiny = EmbeddedModelConfig(num_layers=1, num_attention_heads=2, attention_head_dim=24, ffn_dim=32)
        >>> components = build_components(tiny)
        >>> components["transformer"].config.in_channels, components["scheduler"].config.stochastic_sampling
        (3, True)
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = build_tokenizer()
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        text_encoder = UMT5EncoderModel(UMT5Config(
            vocab_size=len(tokenizer), d_model=TEXT_DIM, d_kv=16, d_ff=2 * TEXT_DIM, num_layers=config.text_layers,
            num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=MAX_TEXT_TOKENS,
            dropout_rate=0.0, feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=0, decoder_start_token_id=0,
        ))
        transformer = WanTransformer3DModel(
            patch_size=(1, PATCH_PIXELS, PATCH_PIXELS), num_attention_heads=config.num_attention_heads,
            attention_head_dim=config.attention_head_dim, in_channels=3, out_channels=3, text_dim=TEXT_DIM,
            freq_dim=64, ffn_dim=config.ffn_dim, num_layers=config.num_layers, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=256,
        )
    finally:
        torch.random.set_rng_state(state)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=config.shift, stochastic_sampling=config.stochastic_sampling)
    return dict(tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, scheduler=scheduler)


def check_prediction_type(prediction_type: str) -> str:
    """``prediction_type`` if this pipeline can sample with it (only :data:`PREDICTION_TYPE`),
    else :class:`~diffattn.errors.UserError` (e.g. a folder saved by an experiment).

    Example:
        >>> check_prediction_type("sample")
        'sample'
    """
    if prediction_type != PREDICTION_TYPE:
        raise UserError(f"prediction_type must be {PREDICTION_TYPE!r} (the transformer predicts the clean clip); "
                        f"got {prediction_type!r}")
    return prediction_type


@dataclass
class EmbeddedPipelineOutput(BaseOutput):
    """``frames``: float ``[B, F, H, W, 3]`` in [0, 1] (``output_type="np"``), a tensor of the
    same layout (``"pt"``), or lists of PIL images (``"pil"``)."""

    frames: Any


class EmbeddedVideoPipeline(DiffusionPipeline, WanLoraLoaderMixin):
    """Text-to-video with the embedded pixel-space Wan transformer (see the module docstring).
    LoRA weights (``diffattn train-lora``) load with ``load_lora_weights`` as for ``WanPipeline``."""

    model_cpu_offload_seq = "text_encoder->transformer"

    def __init__(self, tokenizer, text_encoder, transformer, scheduler, prediction_type: str = PREDICTION_TYPE) -> None:
        super().__init__()
        self.register_modules(tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer,
                              scheduler=scheduler)
        # Saved in model_index.json: what the transformer's output means.
        self.register_to_config(prediction_type=check_prediction_type(prediction_type))

    @property
    def patch_pixels(self) -> int:
        return int(self.transformer.config.patch_size[1])

    def check_inputs(self, num_frames: int, height: int, width: int) -> None:
        """UserError unless the transformer can take this size (any frame count; pixels a multiple of the patch)."""
        check_size(num_frames, height, width, self.patch_pixels)

    @torch.no_grad()
    def encode_prompt(self, prompt: str | list[str], device: torch.device | None = None,
                      max_sequence_length: int = MAX_TEXT_TOKENS) -> torch.Tensor:
        """``[B, max_sequence_length, TEXT_DIM]`` text embeddings, zero at padding (as Wan's pipeline does)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        return encode_text(self.tokenizer, self.text_encoder, prompts, device or self._execution_device,
                           max_sequence_length)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        num_frames: int = DEFAULT_CALL["num_frames"],
        height: int = DEFAULT_CALL["height"],
        width: int = DEFAULT_CALL["width"],
        num_inference_steps: int = DEFAULT_CALL["num_inference_steps"],
        guidance_scale: float = DEFAULT_CALL["guidance_scale"],
        num_videos_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        callback_on_step_end: Callable[[Any, int, Any, dict], dict] | None = None,
        max_sequence_length: int = MAX_TEXT_TOKENS,
    ):
        """Generate ``[B, F, H, W, 3]`` videos: all frames denoised together by the scheduler,
        with classifier-free guidance when ``guidance_scale > 1`` (empty negative caption by
        default). ``latents``: the start noise ``[B, 3, F, H, W]`` (pixels; default: drawn from
        ``generator``, which also seeds the stochastic sampler's fresh noise at every step)."""
        from diffusers.utils.torch_utils import randn_tensor

        self.check_inputs(num_frames, height, width)
        if output_type not in ("np", "pt", "pil"):
            raise UserError(f"output_type must be 'np', 'pt' or 'pil'; got {output_type!r}")
        device = self._execution_device
        dtype = self.transformer.dtype
        if prompt_embeds is None:
            if prompt is None:
                raise UserError("give prompt or prompt_embeds; got neither")
            prompt_embeds = self.encode_prompt(prompt, device, max_sequence_length)
        prompt_embeds = prompt_embeds.to(device=device, dtype=dtype).repeat_interleave(num_videos_per_prompt, 0)
        batch = prompt_embeds.shape[0]
        guided = guidance_scale > 1.0
        if guided:
            if negative_prompt_embeds is None:
                negatives = negative_prompt if negative_prompt is not None else ""
                negatives = [negatives] * batch if isinstance(negatives, str) else list(negatives)
                if len(negatives) * num_videos_per_prompt == batch and len(negatives) != batch:
                    negatives = [n for n in negatives for _ in range(num_videos_per_prompt)]
                if len(negatives) != batch:
                    raise UserError(f"negative_prompt has {len(negatives)} entries for {batch} videos; give one "
                                    f"string, or one per prompt or per video")
                negative_prompt_embeds = self.encode_prompt(negatives, device, prompt_embeds.shape[1])
            negative_prompt_embeds = negative_prompt_embeds.to(device=device, dtype=dtype)
            if negative_prompt_embeds.shape[0] != batch:
                negative_prompt_embeds = negative_prompt_embeds.expand(batch, -1, -1)

        shape = (batch, 3, num_frames, height, width)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        elif tuple(latents.shape) != shape:
            raise UserError(f"latents must have shape {shape}; got {tuple(latents.shape)}")
        latents = latents.to(device=device, dtype=torch.float32)

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        with self.progress_bar(total=num_inference_steps) as progress:
            for index, t in enumerate(self.scheduler.timesteps):
                model_input = latents.to(dtype)
                timestep = t.expand(batch)
                clean = self.transformer(model_input, timestep, prompt_embeds, return_dict=False)[0]
                if guided:
                    # Guidance is affine in the prediction, so guiding x0 or the velocity is the same.
                    unconditional = self.transformer(model_input, timestep, negative_prompt_embeds,
                                                     return_dict=False)[0]
                    clean = unconditional + guidance_scale * (clean - unconditional)
                # Clamping the clean estimate to the pixel range keeps strong guidance from
                # overshooting (static thresholding); sigma > 0 at every step taken.
                sigma = self.scheduler.sigmas[index].to(latents)
                velocity = (latents - clean.float().clamp(-1, 1)) / sigma
                # The generator seeds the fresh noise of a stochastic scheduler (unused by a deterministic one).
                latents = self.scheduler.step(velocity, t, latents, generator=generator, return_dict=False)[0]
                if callback_on_step_end is not None:
                    callback_on_step_end(self, index, t, {"latents": latents})
                progress.update()

        video = ((latents.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 4, 1)  # [B, F, H, W, 3]
        self.maybe_free_model_hooks()
        if output_type == "pt":
            frames: Any = video
        else:
            frames = video.cpu().numpy()
            if output_type == "pil":
                from PIL import Image

                frames = [[Image.fromarray((f * 255).round().astype(np.uint8)) for f in clip] for clip in frames]
        if not return_dict:
            return (frames,)
        return EmbeddedPipelineOutput(frames=frames)


def check_size(num_frames: int, height: int, width: int, patch: int = PATCH_PIXELS, cli_flags: bool = False) -> None:
    """UserError unless the embedded model takes this size: any frame count (pixel space, no
    temporal compression), height and width multiples of the patch. ``cli_flags`` names the CLI
    flags (``--num-frames``) in the message instead of the call arguments (``num_frames``).

    Example:
        >>> check_size(17, 64, 64)
        >>> check_size(17, 60, 64)
        Traceback (most recent call last):
        ...
        diffattn.errors.UserError: height must be a positive multiple of 8 pixels for the embedded model; got 60
    """
    def label(name: str) -> str:
        return f"--{name.replace('_', '-')}" if cli_flags else name

    if not isinstance(num_frames, int) or num_frames < 1:
        raise UserError(f"{label('num_frames')} must be a positive integer; got {num_frames!r}")
    for name, value in (("height", height), ("width", width)):
        if not isinstance(value, int) or value < patch or value % patch:
            raise UserError(f"{label(name)} must be a positive multiple of {patch} pixels for the embedded "
                            f"model; got {value!r}")


def latent_grid(num_frames: int, height: int, width: int, patch: int = PATCH_PIXELS):
    """The transformer's token grid for a call: one token per frame and patch of pixels.

    Example:
        >>> grid = latent_grid(17, 64, 64)
        >>> grid.frames, grid.height, grid.width
        (17, 8, 8)
    """
    from ..patterns import VideoGrid

    return VideoGrid(num_frames, height // patch, width // patch)


def fitting_preset(name_or_path: str, num_frames: int, height: int, width: int):
    """Load a Wan-family preset (name or YAML path) and check that its layout can be built on the
    embedded model's token grid for this call size; UserError naming the preset and the grid if not.

    Example:
        >>> fitting_preset("dense", 17, 64, 64).name
        'dense'
    """
    from ..processors.presets import load_preset, preset_density

    preset = load_preset(name_or_path, family="wan")
    grid = latent_grid(num_frames, height, width)
    try:
        preset_density(preset.config, grid)
    except ValueError as error:
        raise UserError(
            f"preset {preset.name!r} does not fit the latent grid {grid.frames}x{grid.height}x{grid.width} of "
            f"{num_frames} frames at {height}x{width}: {error}"
        ) from None
    return preset


def encode_text(tokenizer, text_encoder, prompts: list[str], device: torch.device,
                max_sequence_length: int = MAX_TEXT_TOKENS) -> torch.Tensor:
    """Tokenise and encode ``prompts``: ``[len(prompts), max_sequence_length, TEXT_DIM]``,
    zero at padding positions. Differentiable (the training script calls it with gradients on).

    Example:
        >>> pipe = load_embedded_pipeline()
        >>> encode_text(pipe.tokenizer, pipe.text_encoder, ["a red circle moves left"], torch.device("cpu")).shape
        torch.Size([1, 24, 64])
    """
    tokens = tokenizer(prompts, padding="max_length", max_length=max_sequence_length, truncation=True,
                       return_tensors="pt")
    ids = tokens.input_ids.to(device)
    mask = tokens.attention_mask.to(device)
    hidden = text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    return hidden * mask[..., None].to(hidden.dtype)


def is_embedded_folder(path: str | Path) -> bool:
    """Whether ``path`` holds a saved :class:`EmbeddedVideoPipeline` (by its model_index.json).

    Example:
        >>> is_embedded_folder(EMBEDDED_DIR), is_embedded_folder(EMBEDDED_DIR / "transformer")
        (True, False)
    """
    index = Path(path) / "model_index.json"
    if not index.is_file():
        return False
    try:
        return json.loads(index.read_text()).get("_class_name") == PIPELINE_CLASS_NAME
    except (OSError, ValueError):
        return False


def load_embedded_pipeline(path: str | Path | None = None, dtype: torch.dtype = torch.float32) -> EmbeddedVideoPipeline:
    """Load the shipped embedded model (or one saved by the training script at ``path``), offline.

    Raises:
        FileNotFoundError: no saved pipeline at ``path`` (for the default: the package was
            installed without its weights; run ``scripts/train_embedded_model.py``).

    Example:
        >>> load_embedded_pipeline().transformer.config.patch_size
        [1, 8, 8]
    """
    folder = Path(path) if path is not None else EMBEDDED_DIR
    if not is_embedded_folder(folder):
        raise FileNotFoundError(
            f"no embedded model at {str(folder)!r} (model_index.json with _class_name {PIPELINE_CLASS_NAME!r}); "
            f"train one with scripts/train_embedded_model.py"
        )
    pipe = EmbeddedVideoPipeline.from_pretrained(str(folder), local_files_only=True)
    pipe.set_progress_bar_config(disable=None)
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)
