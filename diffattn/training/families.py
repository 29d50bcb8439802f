"""What LoRA training needs to know about a model family: its size rules, how a clip becomes the
transformer's clean input (the VAE, or pixels for the embedded model), how a caption becomes its
text conditioning, and what the transformer predicts (the loss).

Training families (each the text-to-video pipeline named, one transformer):

* ``embedded``: diffattn's pixel-space model: x-prediction, the plain x0 loss of its own recipe.
* ``wan`` (``WanPipeline``), ``hunyuan_video`` (``HunyuanVideoPipeline``), ``ltx_video``
  (``LTXPipeline``): rectified flow, ``x_t = (1 - sigma) x0 + sigma noise`` at timestep
  ``1000 sigma``, the transformer predicts the velocity ``noise - x0``. HunyuanVideo also takes
  its CLIP pooled embedding and the embedded guidance (1: the data's conditional velocity).
* ``mochi`` (``MochiPipeline``): the same flow, in Mochi's reversed time (the scheduler's
  ``invert_sigmas``): timestep ``1000 (1 - sigma)``, target ``x0 - noise``.
* ``cogvideox`` (``CogVideoXPipeline``): DDPM-style discrete timesteps of its scheduler's
  ``alphas_cumprod`` (SNR shift and zero-terminal SNR included), ``x_t = sqrt(a) x0 +
  sqrt(1 - a) noise``, v-prediction ``sqrt(a) noise - sqrt(1 - a) x0``, latents ``[B, F, C, H, W]``
  and RoPE built from the clip's size as the pipeline builds it.

Image-to-video, video-to-video and two-expert pipelines are refused by name
(:func:`training_family`).
"""

from __future__ import annotations

import abc
from typing import Any

import numpy as np
import torch

from ..errors import UserError
from .objectives import denoising_loss, noised


class TrainingFamily(abc.ABC):
    """One model family's training rules (stateless; the pipeline is passed in)."""

    name: str = ""
    #: The text-to-video pipeline class this family trains.
    pipeline_class: str = ""
    #: The sparsity presets' family (``configs/<family>/``).
    preset_family: str = "wan"
    #: Default ``--timestep-shift``: the warp of the uniform training noise levels.
    timestep_shift: float = 3.0
    #: The pipeline components :meth:`encode_captions` needs.
    text_modules: tuple[str, ...] = ("tokenizer", "text_encoder")

    #: ``(height, width)`` in pixels when the user gives none (the released models' size).
    default_pixels: tuple[int, int] = (480, 832)
    #: How size errors name the model ("a Wan model").
    model_words: str = ""

    def check_size(self, pipe: Any, num_frames: int, height: int, width: int) -> None:
        """UserError naming the value unless the family can take clips of this size: ``1 + tk``
        frames and multiples of (VAE x patch) pixels."""
        temporal, spatial = self._compression(pipe)
        if num_frames < 1 or (num_frames - 1) % temporal:
            raise UserError(f"--num-frames must be 1 + {temporal}k (1, {1 + temporal}, {1 + 2 * temporal}, ...) "
                            f"for {self.model_words}; got {num_frames}")
        multiple = spatial * self._patch(pipe)[1]
        for flag, value in (("--height", height), ("--width", width)):
            if value < multiple or value % multiple:
                raise UserError(f"{flag} must be a positive multiple of {multiple} pixels for {self.model_words} "
                                f"(VAE x patch); got {value}")

    def default_size(self, pipe: Any) -> tuple[int, int]:
        """``(height, width)`` in pixels when the user gives none."""
        return self.default_pixels

    def call_kwargs(self, pipe: Any) -> dict[str, Any]:
        """Pipeline call arguments that make inference (validation videos) condition as training did."""
        return {}

    @abc.abstractmethod
    def encode_captions(self, pipe: Any, captions: list[str]) -> dict[str, torch.Tensor]:
        """Captions -> the transformer's text keyword arguments, each ``[B, ...]`` (float32, CPU)."""

    @abc.abstractmethod
    def loss(self, pipe: Any, transformer: torch.nn.Module, clean: torch.Tensor, noise: torch.Tensor,
             sigma: torch.Tensor, text: dict[str, torch.Tensor]) -> torch.Tensor:
        """The denoising loss of one batch noised to ``sigma [B]`` (``transformer``: the pipeline's,
        possibly wrapped for DDP): scalar."""

    @torch.no_grad()
    def encode_videos(self, pipe: Any, videos: np.ndarray) -> torch.Tensor:
        """uint8 clips ``[B, F, H, W, 3]`` -> the transformer's clean input ``[B, C, f, h, w]``
        (float32, CPU): the VAE's latents (its mode), normalised as the pipeline's decode expects."""
        vae = getattr(pipe, "vae", None)
        if vae is None:
            raise UserError(f"--model {type(pipe).__name__} has no vae: train-lora needs it to encode the videos")
        latents = vae.encode(_pixels(videos).to(vae.device, vae.dtype)).latent_dist.mode().float().cpu()
        return self._normalise(pipe, latents)

    def _normalise(self, pipe: Any, latents: torch.Tensor) -> torch.Tensor:
        return latents * pipe.vae.config.scaling_factor

    def _check_text_modules(self, pipe: Any) -> None:
        missing = [name for name in self.text_modules if getattr(pipe, name, None) is None]
        if missing:
            raise UserError(f"--model has no {'/'.join(missing)}: train-lora needs them to encode the captions")

    def latent_shape(self, pipe: Any, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """The clean input ``[C, f, h, w]`` of one clip: the VAE's latent grid."""
        temporal, spatial = self._compression(pipe)
        return (self._latent_channels(pipe), (num_frames - 1) // temporal + 1, height // spatial, width // spatial)

    def token_grid(self, pipe: Any, latent_shape: tuple[int, ...]):
        """The transformer's token grid for clean inputs of ``latent_shape`` ``[C, f, h, w]``."""
        from ..patterns import VideoGrid

        p_t, p_h, p_w = self._patch(pipe)
        _, frames, height, width = latent_shape
        return VideoGrid(frames // p_t, height // p_h, width // p_w)

    def _patch(self, pipe: Any) -> tuple[int, int, int]:
        """``(p_t, p_h, p_w)``: Wan's tuple, else ``patch_size`` with ``patch_size_t`` (or 1)."""
        config = pipe.transformer.config
        if isinstance(config.patch_size, (tuple, list)):
            return tuple(int(p) for p in config.patch_size)
        return int(getattr(config, "patch_size_t", None) or 1), int(config.patch_size), int(config.patch_size)

    def _compression(self, pipe: Any) -> tuple[int, int]:
        return int(getattr(pipe, "vae_scale_factor_temporal", 4)), int(getattr(pipe, "vae_scale_factor_spatial", 8))

    def _latent_channels(self, pipe: Any) -> int:
        return int(pipe.vae.config.latent_channels)



def _pixels(videos: np.ndarray) -> torch.Tensor:
    """uint8 ``[B, F, H, W, 3]`` -> float ``[B, 3, F, H, W]`` in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(videos)).to(torch.float32).permute(0, 4, 1, 2, 3) / 127.5 - 1.0


def _mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.mean((prediction.float() - target) ** 2)


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``[B]`` -> ``[B, 1, ...]`` broadcasting over ``like``'s other dimensions."""
    return values.view(-1, *([1] * (like.ndim - 1))).to(like)


def _config_stats(config: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE config's per-channel ``latents_mean`` and ``latents_std`` as ``[1, C, 1, 1, 1]``."""
    shape = (1, len(config.latents_mean), 1, 1, 1)
    return torch.tensor(config.latents_mean).view(shape), torch.tensor(config.latents_std).view(shape)


class EmbeddedFamily(TrainingFamily):
    """diffattn's embedded model: pixels in, clean clip out (x-prediction), the plain x0 loss of
    ``scripts/train_embedded_model.py`` (``--min-loss-sigma 1``)."""

    name = "embedded"
    pipeline_class = "EmbeddedVideoPipeline"

    def check_size(self, pipe: Any, num_frames: int, height: int, width: int) -> None:
        from ..pipelines.embedded import check_size

        check_size(num_frames, height, width, pipe.patch_pixels, cli_flags=True)

    def default_size(self, pipe: Any) -> tuple[int, int]:
        from ..pipelines.embedded import DEFAULT_CALL

        return DEFAULT_CALL["height"], DEFAULT_CALL["width"]

    def encode_videos(self, pipe: Any, videos: np.ndarray) -> torch.Tensor:
        return _pixels(videos)

    @torch.no_grad()
    def encode_captions(self, pipe: Any, captions: list[str]) -> dict[str, torch.Tensor]:
        from ..pipelines.embedded import encode_text

        device = pipe.text_encoder.device
        return {"encoder_hidden_states": encode_text(pipe.tokenizer, pipe.text_encoder, captions, device).float().cpu()}

    def latent_shape(self, pipe: Any, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        return (3, num_frames, height, width)

    def loss(self, pipe, transformer, clean, noise, sigma, text):
        prediction = transformer(noised(clean, noise, sigma), sigma * 1000, return_dict=False, **text)[0]
        return denoising_loss(prediction.float(), clean, sigma, 1.0)


class MaskedTextFamily(TrainingFamily):
    """Families whose ``encode_prompt`` returns T5 embeddings with their attention mask (LTX-Video,
    Mochi): both go to the transformer."""

    @torch.no_grad()
    def encode_captions(self, pipe: Any, captions: list[str]) -> dict[str, torch.Tensor]:
        self._check_text_modules(pipe)
        embeds, mask, _, _ = pipe.encode_prompt(captions, do_classifier_free_guidance=False,
                                                device=pipe.text_encoder.device)
        return {"encoder_hidden_states": embeds.float().cpu(), "encoder_attention_mask": mask.cpu()}


class RectifiedFlowFamily(TrainingFamily):
    """Rectified flow on ``[B, C, F, H, W]`` latents: the transformer gets ``x_t = (1 - sigma) x0 +
    sigma noise`` at timestep ``1000 sigma`` and predicts the velocity ``noise - x0``."""

    def loss(self, pipe, transformer, clean, noise, sigma, text):
        prediction = transformer(hidden_states=noised(clean, noise, sigma), timestep=self._timestep(sigma),
                                 return_dict=False, **text, **self._extra_inputs(pipe, clean))[0]
        return _mse(prediction, self._velocity(clean, noise))

    def _timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma * 1000

    def _velocity(self, clean: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return noise - clean

    def _extra_inputs(self, pipe: Any, clean: torch.Tensor) -> dict[str, Any]:
        return {}


class WanFamily(RectifiedFlowFamily):
    """Wan 2.1/2.2 text-to-video: the VAE's normalised latents (``(z - mean) / std``, the inverse
    of what ``WanPipeline`` decodes), UMT5 text embeddings, rectified flow
    (``FlowMatchEulerDiscreteScheduler``)."""

    name = "wan"
    pipeline_class = "WanPipeline"

    model_words = "a Wan model"
    default_pixels = (480, 832)

    def _latent_channels(self, pipe: Any) -> int:
        return int(pipe.vae.config.z_dim)

    def _normalise(self, pipe: Any, latents: torch.Tensor) -> torch.Tensor:
        mean, std = _config_stats(pipe.vae.config)
        return (latents - mean) / std

    @torch.no_grad()
    def encode_captions(self, pipe: Any, captions: list[str]) -> dict[str, torch.Tensor]:
        self._check_text_modules(pipe)
        embeds, _ = pipe.encode_prompt(captions, do_classifier_free_guidance=False, device=pipe.text_encoder.device)
        return {"encoder_hidden_states": embeds.float().cpu()}


class HunyuanVideoFamily(RectifiedFlowFamily):
    """HunyuanVideo text-to-video: latents times the VAE's scaling factor, the Llama prompt
    embeddings with their mask and the CLIP pooled embedding (``encode_prompt``), rectified flow.
    The guidance-distilled transformer gets the embedded guidance 1 (times 1000, as the pipeline
    scales it): the data's velocity is the plain conditional one, which guidance 1 asks for."""

    name = "hunyuan_video"
    pipeline_class = "HunyuanVideoPipeline"
    preset_family = "hunyuan_video"
    text_modules = ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2")
    guidance = 1.0

    model_words = "a HunyuanVideo model"
    default_pixels = (720, 1280)

    @torch.no_grad()
    def encode_captions(self, pipe: Any, captions: list[str]) -> dict[str, torch.Tensor]:
        self._check_text_modules(pipe)
        embeds, pooled, mask = pipe.encode_prompt(captions, device=pipe.text_encoder.device)
        return {"encoder_hidden_states": embeds.float().cpu(), "encoder_attention_mask": mask.cpu(),
                "pooled_projections": pooled.float().cpu()}

    def _extra_inputs(self, pipe: Any, clean: torch.Tensor) -> dict[str, Any]:
        if not pipe.transformer.config.guidance_embeds:
            return {}
        return {"guidance": torch.full((clean.shape[0],), self.guidance * 1000.0, device=clean.device)}


class MochiFamily(MaskedTextFamily, RectifiedFlowFamily):
    """Mochi text-to-video: the VAE's normalised latents (``(z - mean) scaling / std``, the inverse
    of ``MochiPipeline``'s decode), T5 embeddings with their mask, rectified flow in Mochi's
    reversed time (its scheduler's ``invert_sigmas``): timestep ``1000 (1 - sigma)``, the
    transformer predicts ``x0 - noise``."""

    name = "mochi"
    pipeline_class = "MochiPipeline"
    preset_family = "mochi"

    model_words = "a Mochi model"
    default_pixels = (480, 848)

    def _compression(self, pipe: Any) -> tuple[int, int]:
        return int(pipe.vae_temporal_scale_factor), int(pipe.vae_spatial_scale_factor)

    def _normalise(self, pipe: Any, latents: torch.Tensor) -> torch.Tensor:
        mean, std = _config_stats(pipe.vae.config)
        return (latents - mean) * pipe.vae.config.scaling_factor / std

    def _timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        return (1 - sigma) * 1000

    def _velocity(self, clean: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return clean - noise


class LTXVideoFamily(MaskedTextFamily):
    """LTX-Video text-to-video: the VAE's normalised latents (``LTXPipeline._normalize_latents``),
    packed into patch tokens for the transformer, T5 embeddings with their attention mask, and the
    velocity ``noise - x0`` as the target (rectified flow)."""

    name = "ltx_video"
    pipeline_class = "LTXPipeline"
    preset_family = "ltx_video"
    #: The pipeline's default frame rate: it sets the temporal RoPE scale, as at inference.
    frame_rate = 25

    model_words = "an LTX-Video model"
    default_pixels = (480, 704)

    def _compression(self, pipe: Any) -> tuple[int, int]:
        return int(pipe.vae_temporal_compression_ratio), int(pipe.vae_spatial_compression_ratio)

    def _normalise(self, pipe: Any, latents: torch.Tensor) -> torch.Tensor:
        vae = pipe.vae
        return pipe._normalize_latents(latents, vae.latents_mean.cpu(), vae.latents_std.cpu(),
                                       vae.config.scaling_factor)

    def loss(self, pipe, transformer, clean, noise, sigma, text):
        p_t, p, _ = self._patch(pipe)
        temporal, spatial = self._compression(pipe)
        _, _, frames, height, width = clean.shape
        prediction = transformer(
            hidden_states=pipe._pack_latents(noised(clean, noise, sigma), p, p_t), timestep=sigma * 1000,
            num_frames=frames // p_t, height=height // p, width=width // p,
            rope_interpolation_scale=(temporal / self.frame_rate, spatial, spatial), return_dict=False, **text)[0]
        return _mse(prediction, pipe._pack_latents(noise - clean, p, p_t))


class CogVideoXFamily(TrainingFamily):
    """CogVideoX 1.0/1.5 text-to-video: latents times the VAE's scaling factor (stored ``[B, C, F,
    H, W]``, the transformer takes ``[B, F, C, H, W]``), T5 embeddings padded to the
    transformer's ``max_text_seq_length``, and the scheduler's DDPM convention: the noise level
    ``sigma`` in [0, 1] picks the discrete timestep ``round(sigma (T - 1))``, ``x_t = sqrt(a) x0 +
    sqrt(1 - a) noise`` with ``a = alphas_cumprod[t]``, the target the velocity ``sqrt(a) noise -
    sqrt(1 - a) x0`` (``prediction_type="v_prediction"``; ``"epsilon"``: the noise). RoPE comes from
    the clip's size (``_prepare_rotary_positional_embeddings``), as in the pipeline. The default
    timestep shift is 1 (uniform timesteps, CogVideoX's recipe: its schedule already shifts the SNR).
    """

    name = "cogvideox"
    pipeline_class = "CogVideoXPipeline"
    preset_family = "cogvideox"
    timestep_shift = 1.0
    predictions = ("v_prediction", "epsilon")
    model_words = "a CogVideoX model"
    default_pixels = (480, 720)

    def check_size(self, pipe: Any, num_frames: int, height: int, width: int) -> None:
        super().check_size(pipe, num_frames, height, width)
        p_t, temporal = self._patch(pipe)[0], self._compression(pipe)[0]
        latent_frames = (num_frames - 1) // temporal + 1
        if latent_frames % p_t:
            raise UserError(f"--num-frames {num_frames} gives {latent_frames} latent frames; this CogVideoX model "
                            f"(patch_size_t={p_t}) needs a multiple of {p_t}: e.g. {num_frames + temporal}")
        prediction = pipe.scheduler.config.prediction_type
        if prediction not in self.predictions or not hasattr(pipe.scheduler, "alphas_cumprod"):
            raise UserError(f"train-lora trains CogVideoX with a DDPM-style scheduler predicting one of "
                            f"{', '.join(self.predictions)}; got {type(pipe.scheduler).__name__} ({prediction!r})")

    def call_kwargs(self, pipe: Any) -> dict[str, Any]:
        # The pipeline pads prompts to 226 tokens, the released models' max_text_seq_length; the
        # transformer's own value is the one its (absolute) text positions are built for.
        return {"max_sequence_length": int(pipe.transformer.config.max_text_seq_length)}

    @torch.no_grad()
    def encode_captions(self, pipe: Any, captions: list[str]) -> dict[str, torch.Tensor]:
        self._check_text_modules(pipe)
        embeds, _ = pipe.encode_prompt(captions, do_classifier_free_guidance=False, device=pipe.text_encoder.device,
                                       **self.call_kwargs(pipe))
        return {"encoder_hidden_states": embeds.float().cpu()}

    def loss(self, pipe, transformer, clean, noise, sigma, text):
        scheduler = pipe.scheduler
        timestep = (sigma * (scheduler.config.num_train_timesteps - 1)).round().long()
        alpha = scheduler.alphas_cumprod.to(clean.device)[timestep]
        signal, spread = _per_sample(alpha.sqrt(), clean), _per_sample((1 - alpha).sqrt(), clean)
        _, _, frames, height, width = clean.shape
        rotary = None
        if pipe.transformer.config.use_rotary_positional_embeddings:
            spatial = self._compression(pipe)[1]
            rotary = pipe._prepare_rotary_positional_embeddings(height * spatial, width * spatial, frames, clean.device)
        prediction = transformer(hidden_states=(signal * clean + spread * noise).transpose(1, 2),
                                 timestep=timestep, image_rotary_emb=rotary, return_dict=False, **text)[0]
        target = signal * noise - spread * clean if scheduler.config.prediction_type == "v_prediction" else noise
        return _mse(prediction, target.transpose(1, 2))


TRAINING_FAMILIES: dict[str, TrainingFamily] = {
    family.name: family for family in (EmbeddedFamily(), WanFamily(), LTXVideoFamily(), CogVideoXFamily(),
                                       HunyuanVideoFamily(), MochiFamily())}


def training_family(pipe: Any) -> TrainingFamily:
    """The training rules for ``pipe`` (the embedded pipeline, or one of the text-to-video
    pipelines of :data:`TRAINING_FAMILIES`); UserError naming the pipeline class and the ones that
    train otherwise.

    Example:
        >>> from diffattn.pipelines.embedded import load_embedded_pipeline
        >>> training_family(load_embedded_pipeline()).name
        'embedded'
    """
    from ..adapters import find_adapter
    from ..pipelines.embedded import EmbeddedVideoPipeline

    if isinstance(pipe, EmbeddedVideoPipeline):
        return TRAINING_FAMILIES["embedded"]
    family = find_adapter(pipe).family
    trained = TRAINING_FAMILIES.get(family)
    if trained is not None and type(pipe).__name__ == trained.pipeline_class:
        if getattr(pipe, "transformer_2", None) is not None:
            raise UserError("train-lora does not train two-expert Wan 2.2 pipelines (transformer_2: each expert "
                            "owns a noise range); train a single-transformer Wan pipeline")
        return trained
    classes = ", ".join(f.pipeline_class for f in TRAINING_FAMILIES.values() if f.name != "embedded")
    raise UserError(f"train-lora trains the embedded model and the text-to-video pipelines {classes}; "
                    f"got {type(pipe).__name__} (family {family!r}): its conditioning (image, video or a second "
                    f"expert) is not written for training yet")
