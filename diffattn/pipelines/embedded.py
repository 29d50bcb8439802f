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
  (``position_channels``, off in the shipped model: ``in_channels=6`` with x, y and frame-index
  channels after the pixels, :func:`transformer_input`.)
* ``scheduler``: ``FlowMatchEulerDiscreteScheduler`` (rectified flow, like Wan).

The transformer predicts the clean clip (``prediction_type="sample"``, "x-prediction") rather
than the flow velocity ``noise - clean``: a patch holds 8x8x3 = 192 pixel values but the hidden
state is 128 wide, so a velocity target (which carries the full-rank noise) cannot pass through
it, while clean clips of flat shapes lie on a low-dimensional manifold that can (the argument of
Li & He, "Back to Basics: Let Denoising Generative Models Denoise", 2025). The pipeline turns the
prediction into the velocity the stock scheduler steps with: ``v = (x_t - x0_hat) / sigma``.

Example::

    >>> pipe = load_embedded_pipeline()                                # offline, ~8 MB
    >>> video = pipe("a red circle moves right", generator=torch.Generator().manual_seed(0)).frames[0]
    >>> video.shape                                                     # float [0, 1]
    (17, 64, 64, 3)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput

from .shapes import VOCABULARY

#: Where the shipped weights live (package data).
EMBEDDED_DIR = Path(__file__).resolve().parent / "embedded_model"
PIPELINE_CLASS_NAME = "EmbeddedVideoPipeline"
PATCH_PIXELS = 8
MAX_TEXT_TOKENS = 24
#: Input channels after the pixels of a transformer built with ``position_channels``: x, y, frame.
POSITION_CHANNELS = 3
TEXT_DIM = 64
#: What the transformer's output means: the clean clip ("sample"), the flow velocity ("flow"), or
#: the residual of a skip parameterization ("sample_skip", see :func:`clean_estimate_from_output`).
PREDICTION_TYPES = ("sample", "flow", "sample_skip")
#: Mean and standard deviation of the training clips' pixels in [-1, 1] (measured over 256 clips):
#: the data statistics of the "sample_skip" parameterization.
PIXEL_MEAN = -0.39
PIXEL_STD = 0.28
#: Call defaults: the base length the model was trained at.
DEFAULT_CALL = dict(num_frames=17, height=64, width=64, num_inference_steps=25, guidance_scale=7.0)

PAD, UNK = "<pad>", "<unk>"


def build_tokenizer():
    """Word-level tokenizer: lower-cased, split on whitespace and punctuation, unknown words -> <unk>."""
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
    """Sizes of the embedded model (the training script's defaults ship)."""

    num_layers: int = 6
    num_attention_heads: int = 4
    attention_head_dim: int = 32
    ffn_dim: int = 512
    text_layers: int = 2
    shift: float = 2.0
    prediction_type: str = "sample"
    #: Sampler: re-noise the clean estimate at each step (x_next = (1 - s') x0_hat + s' noise)
    #: instead of the deterministic Euler step. With an imperfect model the ODE drifts off the
    #: data at high noise and never recovers; fresh noise at each step lets the model correct it.
    stochastic_sampling: bool = True
    #: Give the transformer x, y and frame-index channels next to the pixels
    #: (:func:`transformer_input`). Wan's only positional signal is RoPE, which is relative: a
    #: token cannot tell where the walls are or which frame it is in, yet where a shape is in
    #: frame ``f`` is its start plus ``f`` times its captioned velocity, folded at the walls.
    position_channels: bool = False


def build_components(config: EmbeddedModelConfig = EmbeddedModelConfig(), seed: int = 0) -> dict[str, Any]:
    """Freshly initialised components (seeded) for training."""
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
            attention_head_dim=config.attention_head_dim,
            in_channels=3 + (POSITION_CHANNELS if config.position_channels else 0), out_channels=3, text_dim=TEXT_DIM,
            freq_dim=64, ffn_dim=config.ffn_dim, num_layers=config.num_layers, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=256,
        )
    finally:
        torch.random.set_rng_state(state)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=config.shift, stochastic_sampling=config.stochastic_sampling)
    return dict(tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, scheduler=scheduler)


def position_channels(batch: int, num_frames: int, height: int, width: int,
                      device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[batch, 3, num_frames, height, width]`` coordinates of every pixel: x and y of the pixel
    centre in [-1, 1] across the frame, and the frame index scaled so the base length
    (``DEFAULT_CALL["num_frames"]``) spans [-1, 1] (longer clips continue past 1 at the same rate).

    Example::

        >>> position_channels(1, 17, 64, 64)[0, 2, :, 0, 0][[0, 8, 16]]
        tensor([-1.,  0.,  1.])
    """
    frame_step = 2.0 / (DEFAULT_CALL["num_frames"] - 1)
    t = torch.arange(num_frames, device=device, dtype=torch.float32) * frame_step - 1.0
    y = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) * (2.0 / height) - 1.0
    x = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) * (2.0 / width) - 1.0
    grid = torch.stack([
        x.view(1, 1, -1).expand(num_frames, height, width),
        y.view(1, -1, 1).expand(num_frames, height, width),
        t.view(-1, 1, 1).expand(num_frames, height, width),
    ])
    return grid.to(dtype).unsqueeze(0).expand(batch, -1, -1, -1, -1)


def transformer_input(transformer: Any, noisy: torch.Tensor) -> torch.Tensor:
    """What the transformer takes for ``noisy`` pixels ``[B, 3, F, H, W]``: the pixels alone, or
    (a transformer with ``in_channels = 3 + POSITION_CHANNELS``) the pixels followed by
    :func:`position_channels`, in the transformer's dtype. The output keeps 3 channels, like Wan
    image-to-video's transformer takes its conditioning channels next to the latents."""
    extra = int(transformer.config.in_channels) - int(transformer.config.out_channels)
    dtype = transformer.dtype
    if extra == 0:
        return noisy.to(dtype)
    if extra != POSITION_CHANNELS:
        raise ValueError(f"the embedded transformer takes its {transformer.config.out_channels} output channels "
                         f"plus 0 or {POSITION_CHANNELS} position channels; got in_channels="
                         f"{transformer.config.in_channels}")
    batch, _, num_frames, height, width = noisy.shape
    coords = position_channels(batch, num_frames, height, width, noisy.device, dtype)
    return torch.cat([noisy.to(dtype), coords], dim=1)


def check_prediction_type(prediction_type: str) -> str:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}; got {prediction_type!r}")
    return prediction_type


def clean_estimate_from_output(output: torch.Tensor, noisy: torch.Tensor, sigma: torch.Tensor | float,
                               prediction_type: str) -> torch.Tensor:
    """The clean-clip estimate ``x0_hat`` (same shape as ``noisy``, ``[B, 3, F, H, W]``) that the
    transformer's ``output`` stands for, with ``noisy = (1 - sigma) x0 + sigma noise``.

    ``sigma`` is a float or a tensor broadcastable to ``noisy`` (e.g. ``[B, 1, 1, 1, 1]``).

    * ``"sample"``: the output is ``x0_hat``.
    * ``"flow"``: the output is the velocity ``noise - x0``, so ``x0_hat = noisy - sigma * output``.
    * ``"sample_skip"``: EDM's preconditioning (Karras et al. 2022) carried over to rectified flow,
      around the data mean ``m`` with data std ``s`` (:data:`PIXEL_MEAN`, :data:`PIXEL_STD`)::

          x0_hat = m + c_skip (noisy - (1 - sigma) m) + c_out output
          c_skip = (1 - sigma) s^2 / D,   c_out = sigma s / sqrt(D),   D = (1 - sigma)^2 s^2 + sigma^2

      ``c_skip`` is the least-squares linear estimate of ``x0`` from ``noisy``, so near sigma 0 the
      network only adds a small correction to its input (it cannot lose the edges it was given),
      and the target of ``output`` has unit variance at every noise level.

    Example::

        >>> x0 = clean_estimate_from_output(output, noisy, 0.3, "sample_skip")
    """
    if check_prediction_type(prediction_type) == "sample":
        return output
    if prediction_type == "flow":
        return noisy - sigma * output
    keep = 1 - sigma
    spread = keep**2 * PIXEL_STD**2 + sigma**2
    c_skip = keep * PIXEL_STD**2 / spread
    c_out = sigma * PIXEL_STD / spread**0.5
    return PIXEL_MEAN + c_skip * (noisy - keep * PIXEL_MEAN) + c_out * output


def model_timesteps(frame_sigmas: torch.Tensor, tokens_per_frame: int, num_train_timesteps: int = 1000) -> torch.Tensor:
    """Per-frame noise levels ``[B, F]`` as the transformer's per-token timesteps ``[B, F * tokens_per_frame]``.

    ``WanTransformer3DModel`` takes a ``[B, seq_len]`` timestep (Wan 2.2's per-token
    conditioning); its tokens are frame-major (patch embedding flattened over ``F, H', W'``), so
    every token of frame ``f`` gets frame ``f``'s level.

    Example::

        >>> model_timesteps(torch.tensor([[1.0, 0.5]]), tokens_per_frame=2)
        tensor([[1000., 1000.,  500.,  500.]])
    """
    if frame_sigmas.ndim != 2:
        raise ValueError(f"frame_sigmas must be [B, F]; got shape {tuple(frame_sigmas.shape)}")
    return frame_sigmas.repeat_interleave(tokens_per_frame, dim=1) * num_train_timesteps


def check_frame_lag(frame_lag: float) -> float:
    if not isinstance(frame_lag, (int, float)) or not 0.0 <= frame_lag < 1.0:
        raise ValueError(f"frame_lag must be a number in [0, 1) (0: every frame at the same noise level); "
                         f"got {frame_lag!r}")
    return float(frame_lag)


def shifted_sigmas(u: torch.Tensor, shift: float) -> torch.Tensor:
    """The scheduler's timestep shift ``sigma = shift u / (1 + (shift - 1) u)`` of uniform progress
    ``u`` in [0, 1]: training noise levels (``--timestep-shift``) and the lagged sampler's
    per-frame schedule (the model config's ``shift``)."""
    return shift * u / (1 + (shift - 1) * u)


def lagged_frame_sigmas(num_inference_steps: int, num_frames: int, frame_lag: float, shift: float) -> torch.Tensor:
    """``[num_inference_steps + 1, num_frames]`` noise levels of a schedule in which later frames
    trail earlier ones (the "pyramid" schedule of Diffusion Forcing, Chen et al. 2024).

    Overall progress runs ``k / num_inference_steps``; frame ``f`` starts denoising when it
    reaches ``frame_lag * f / (num_frames - 1)`` and is clean ``1 - frame_lag`` later, so the
    first frame is settled first and later frames are denoised next to cleaner earlier ones.
    Within its window a frame follows the sampler's shifted schedule (:func:`shifted_sigmas`).
    Every row ends at 0; the first is all 1. A model trained with per-frame noise levels
    (``--frame-noise-share``) is needed to make use of it.

    Example::

        >>> lagged_frame_sigmas(4, 3, 0.5, shift=1.0)[:, 0]     # the first frame runs ahead
        tensor([1.0000, 0.5000, 0.0000, 0.0000, 0.0000])
    """
    check_frame_lag(frame_lag)
    progress = torch.arange(num_inference_steps + 1, dtype=torch.float64) / num_inference_steps
    return pyramid_frame_sigmas(progress, num_frames, torch.tensor(frame_lag, dtype=torch.float64), shift)


def pyramid_frame_sigmas(progress: torch.Tensor, num_frames: int, frame_lag: torch.Tensor, shift: float
                         ) -> torch.Tensor:
    """``[N, num_frames]`` per-frame noise levels of the pyramid schedule at overall ``progress``
    ``[N]`` in [0, 1] with lag ``frame_lag`` (a scalar or ``[N]``, each in [0, 1)): the rows
    :func:`lagged_frame_sigmas` steps through, and the states ``--pyramid-share`` trains on.

    Example::

        >>> pyramid_frame_sigmas(torch.tensor([0.5]), 3, torch.tensor(0.5), shift=1.0)
        tensor([[0.0000, 0.5000, 1.0000]])
    """
    lag = frame_lag.to(torch.float64).reshape(-1, 1)
    start = lag * torch.arange(num_frames, dtype=torch.float64)[None, :] / max(1, num_frames - 1)
    remaining = 1.0 - ((progress.to(torch.float64)[:, None] - start) / (1.0 - lag)).clamp(0.0, 1.0)
    return shifted_sigmas(remaining, shift).float()


def first_frame_schedule(sigmas: torch.Tensor, num_frames: int) -> torch.Tensor:
    """``[len(sigmas), num_frames]`` per-frame noise levels of the first-frame sampler's second
    stage: frame 0 is already drawn (0 throughout), the others follow the scheduler's ``sigmas``
    (``[steps + 1]``, from 1 down to 0) together.

    Example::

        >>> first_frame_schedule(torch.tensor([1.0, 0.5, 0.0]), 3)
        tensor([[0.0000, 1.0000, 1.0000],
                [0.0000, 0.5000, 0.5000],
                [0.0000, 0.0000, 0.0000]])
    """
    if sigmas.ndim != 1 or num_frames < 2:
        raise ValueError(f"first_frame_schedule needs sigmas [steps + 1] and num_frames >= 2; got shape "
                         f"{tuple(sigmas.shape)} and num_frames={num_frames}")
    schedule = sigmas[:, None].expand(-1, num_frames).clone()
    schedule[:, 0] = 0.0
    return schedule


@dataclass
class EmbeddedPipelineOutput(BaseOutput):
    """``frames``: float ``[B, F, H, W, 3]`` in [0, 1] (``output_type="np"``), a tensor of the
    same layout (``"pt"``), or lists of PIL images (``"pil"``)."""

    frames: Any


class EmbeddedVideoPipeline(DiffusionPipeline):
    """Text-to-video with the embedded pixel-space Wan transformer (see the module docstring)."""

    model_cpu_offload_seq = "text_encoder->transformer"

    def __init__(self, tokenizer, text_encoder, transformer, scheduler, prediction_type: str = "sample",
                 first_frame_sampling: bool = False) -> None:
        super().__init__()
        self.register_modules(tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer,
                              scheduler=scheduler)
        # Saved in model_index.json, so a loaded pipeline knows what its transformer predicts and
        # which sampler it was trained for.
        self.register_to_config(prediction_type=check_prediction_type(prediction_type),
                                first_frame_sampling=bool(first_frame_sampling))

    @property
    def patch_pixels(self) -> int:
        return int(self.transformer.config.patch_size[1])

    def check_inputs(self, num_frames: int, height: int, width: int) -> None:
        """ValueError unless the transformer can take this size (any frame count; pixels a multiple of the patch)."""
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
        frame_lag: float = 0.0,
        first_frame: bool | None = None,
        image: torch.Tensor | np.ndarray | None = None,
    ):
        """Generate ``[B, F, H, W, 3]`` videos.

        Samplers: ``first_frame`` (default: the model's ``first_frame_sampling`` config) draws frame 0
        alone as a one-frame clip, then the other frames next to it, frame 0 held clean with
        per-token timestep 0 (:func:`first_frame_schedule`; for models trained with
        ``--first-frame-share`` and ``--image-batch``): where the shapes are is settled first, and
        where they go is then up to the caption. Otherwise ``frame_lag`` in [0, 1): 0 denoises all
        frames together with the scheduler; above 0 later frames trail earlier ones
        (:func:`lagged_frame_sigmas`), for models trained with per-frame noise levels.
        ``image`` (float ``[B, H, W, 3]`` or ``[H, W, 3]`` in [0, 1], the layout of ``frames``) gives
        frame 0 instead of drawing it (image-to-video; implies ``first_frame``).
        ``callback_on_step_end`` is called at every step of every stage."""
        from diffusers.utils.torch_utils import randn_tensor

        self.check_inputs(num_frames, height, width)
        frame_lag = check_frame_lag(frame_lag)
        if output_type not in ("np", "pt", "pil"):
            raise ValueError(f"output_type must be 'np', 'pt' or 'pil'; got {output_type!r}")
        device = self._execution_device
        dtype = self.transformer.dtype
        if prompt_embeds is None:
            if prompt is None:
                raise ValueError("give prompt or prompt_embeds")
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
                    raise ValueError(f"negative_prompt has {len(negatives)} entries for {batch} videos")
                negative_prompt_embeds = self.encode_prompt(negatives, device, prompt_embeds.shape[1])
            negative_prompt_embeds = negative_prompt_embeds.to(device=device, dtype=dtype)
            if negative_prompt_embeds.shape[0] != batch:
                negative_prompt_embeds = negative_prompt_embeds.expand(batch, -1, -1)

        shape = (batch, 3, num_frames, height, width)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}; got {tuple(latents.shape)}")
        latents = latents.to(device=device, dtype=torch.float32)

        def guided_prediction(noisy: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
            model_input = transformer_input(self.transformer, noisy)
            prediction = self.transformer(model_input, timestep, prompt_embeds, return_dict=False)[0]
            if guided:
                # Guidance is affine in the prediction, so guiding x0 or the velocity is the same.
                unconditional = self.transformer(model_input, timestep, negative_prompt_embeds, return_dict=False)[0]
                prediction = unconditional + guidance_scale * (prediction - unconditional)
            return prediction.float()

        if image is not None:
            if first_frame is False:
                raise ValueError("image gives frame 0 for the first-frame sampler; it cannot be used with first_frame=False")
            first_frame = True
            given = torch.as_tensor(image, dtype=torch.float32).to(device)
            if given.ndim == 3:
                given = given.unsqueeze(0).expand(batch, -1, -1, -1)
            if tuple(given.shape) != (batch, height, width, 3):
                raise ValueError(f"image must be [H, W, 3] or [{batch}, H, W, 3] with H={height}, W={width}, "
                                 f"values in [0, 1]; got shape {tuple(given.shape)}")
            given = (given * 2 - 1).permute(0, 3, 1, 2).unsqueeze(2)  # [B, 3, 1, H, W]
        if first_frame is None:
            first_frame = bool(self.config.get("first_frame_sampling", False))
        if first_frame and frame_lag > 0:
            raise ValueError(f"first_frame=True and frame_lag={frame_lag} are two different samplers; choose one")
        if first_frame:
            first = given if image is not None else self._sample(
                latents[:, :, :1], guided_prediction, num_inference_steps, generator, callback_on_step_end)
            if num_frames > 1:
                self.scheduler.set_timesteps(num_inference_steps, device=device)
                schedule = first_frame_schedule(self.scheduler.sigmas.to(torch.float32), num_frames)
                latents = self._sample_per_frame(torch.cat([first, latents[:, :, 1:]], dim=2), guided_prediction,
                                                 schedule, generator, callback_on_step_end)
            else:
                latents = first
        elif frame_lag > 0:
            schedule = lagged_frame_sigmas(num_inference_steps, num_frames, frame_lag, float(self.scheduler.config.shift))
            latents = self._sample_per_frame(latents, guided_prediction, schedule, generator, callback_on_step_end)
        else:
            latents = self._sample(latents, guided_prediction, num_inference_steps, generator, callback_on_step_end)

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

    def _sample(self, latents, guided_prediction, num_inference_steps, generator, callback_on_step_end):
        """All frames at one noise level: the stock scheduler's steps."""
        device, batch = latents.device, latents.shape[0]
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        with self.progress_bar(total=num_inference_steps) as progress:
            for index, t in enumerate(self.scheduler.timesteps):
                prediction = guided_prediction(latents, t.expand(batch))
                if self.config.prediction_type == "flow":
                    velocity = prediction
                else:
                    # Clamping the clean estimate to the pixel range keeps strong guidance from
                    # overshooting (static thresholding); sigma > 0 at every step taken.
                    sigma = self.scheduler.sigmas[index].to(latents)
                    clean = clean_estimate_from_output(prediction, latents, sigma, self.config.prediction_type)
                    velocity = (latents - clean.clamp(-1, 1)) / sigma
                # The generator seeds the fresh noise of a stochastic scheduler (unused by a deterministic one).
                latents = self.scheduler.step(velocity, t, latents, generator=generator, return_dict=False)[0]
                if callback_on_step_end is not None:
                    callback_on_step_end(self, index, t, {"latents": latents})
                progress.update()
        return latents

    def _sample_per_frame(self, latents, guided_prediction, schedule, generator, callback_on_step_end):
        """Per-frame noise levels ``schedule`` ``[steps + 1, F]`` (:func:`lagged_frame_sigmas`,
        :func:`first_frame_schedule`), stepped like the scheduler would: re-noising the clean
        estimate (stochastic sampling) or an Euler step; a frame whose level does not change in a
        step (not started yet, or already clean) is left as it is."""
        from diffusers.utils.torch_utils import randn_tensor

        batch, _, num_frames, height, width = latents.shape
        schedule = schedule.to(latents.device)
        num_inference_steps = schedule.shape[0] - 1
        tokens_per_frame = latent_grid(num_frames, height, width, self.patch_pixels).tokens_per_frame
        stochastic = bool(self.scheduler.config.get("stochastic_sampling", False))
        with self.progress_bar(total=num_inference_steps) as progress:
            for index in range(num_inference_steps):
                now, after = schedule[index], schedule[index + 1]
                timestep = model_timesteps(now.expand(batch, -1), tokens_per_frame,
                                           self.scheduler.config.num_train_timesteps)
                prediction = guided_prediction(latents, timestep)
                sigma, next_sigma = now.view(1, 1, -1, 1, 1), after.view(1, 1, -1, 1, 1)
                clean = clean_estimate_from_output(prediction, latents, sigma, self.config.prediction_type).clamp(-1, 1)
                if stochastic:
                    noise = randn_tensor(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
                    stepped = (1 - next_sigma) * clean + next_sigma * noise
                else:
                    stepped = latents + (next_sigma - sigma) * (latents - clean) / sigma.clamp(min=1e-6)
                latents = torch.where(next_sigma == sigma, latents, stepped)
                if callback_on_step_end is not None:
                    callback_on_step_end(self, index, timestep, {"latents": latents})
                progress.update()
        return latents


def check_size(num_frames: int, height: int, width: int, patch: int = PATCH_PIXELS, cli_flags: bool = False) -> None:
    """ValueError unless the embedded model takes this size: any frame count (pixel space, no
    temporal compression), height and width multiples of the patch. ``cli_flags`` names the CLI
    flags (``--num-frames``) in the message instead of the call arguments (``num_frames``)."""
    def label(name: str) -> str:
        return f"--{name.replace('_', '-')}" if cli_flags else name

    if not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"{label('num_frames')} must be a positive integer; got {num_frames!r}")
    for name, value in (("height", height), ("width", width)):
        if not isinstance(value, int) or value < patch or value % patch:
            raise ValueError(f"{label(name)} must be a positive multiple of {patch} pixels for the embedded "
                             f"model; got {value!r}")


def latent_grid(num_frames: int, height: int, width: int, patch: int = PATCH_PIXELS):
    """The transformer's token grid for a call: one token per frame and patch of pixels."""
    from ..patterns import VideoGrid

    return VideoGrid(num_frames, height // patch, width // patch)


def fitting_preset(name_or_path: str, num_frames: int, height: int, width: int):
    """Load a Wan-family preset (name or YAML path) and check that its layout can be built on the
    embedded model's token grid for this call size; ValueError naming the preset and the grid if not."""
    from ..processors.presets import load_preset, preset_layout

    preset = load_preset(name_or_path, family="wan")
    grid = latent_grid(num_frames, height, width)
    try:
        preset_layout(preset.config, grid)
    except ValueError as error:
        raise ValueError(
            f"preset {preset.name!r} does not fit the latent grid {grid.frames}x{grid.height}x{grid.width} of "
            f"{num_frames} frames at {height}x{width}: {error}"
        ) from None
    return preset


def encode_text(tokenizer, text_encoder, prompts: list[str], device: torch.device,
                max_sequence_length: int = MAX_TEXT_TOKENS) -> torch.Tensor:
    """Tokenise and encode ``prompts``; embeddings at padding positions are zero. Differentiable
    (the training script calls it with gradients on)."""
    tokens = tokenizer(prompts, padding="max_length", max_length=max_sequence_length, truncation=True,
                       return_tensors="pt")
    ids = tokens.input_ids.to(device)
    mask = tokens.attention_mask.to(device)
    hidden = text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    return hidden * mask[..., None].to(hidden.dtype)


def is_embedded_folder(path: str | Path) -> bool:
    """Whether ``path`` holds a saved :class:`EmbeddedVideoPipeline` (by its model_index.json)."""
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
