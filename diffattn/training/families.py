"""What LoRA training needs to know about a model family: its size rules, how a clip becomes the
transformer's clean input (the VAE, or pixels for the embedded model), how a caption becomes its
text conditioning, and what the transformer predicts (the loss).

Training families: ``embedded`` (diffattn's pixel-space model: x-prediction, the plain x0 loss
of its own recipe), ``wan`` (Wan 2.1/2.2 single-transformer text-to-video) and ``ltx_video``
(LTX-Video text-to-video): rectified flow, the transformer predicts the velocity ``noise - x0``.
HunyuanVideo, CogVideoX, Mochi, image-to-video and two-expert pipelines are refused by name
(:func:`training_family`) until their conditioning is written here.
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
    #: The sparsity presets' family (``configs/<family>/``).
    preset_family: str = "wan"

    @abc.abstractmethod
    def check_size(self, pipe: Any, num_frames: int, height: int, width: int) -> None:
        """UserError naming the value unless the family can take clips of this size."""

    @abc.abstractmethod
    def default_size(self, pipe: Any) -> tuple[int, int]:
        """``(height, width)`` in pixels when the user gives none."""

    @abc.abstractmethod
    def encode_videos(self, pipe: Any, videos: np.ndarray) -> torch.Tensor:
        """uint8 clips ``[B, F, H, W, 3]`` -> the transformer's clean input ``[B, C, f, h, w]``
        (float32, CPU)."""

    @abc.abstractmethod
    def encode_captions(self, pipe: Any, captions: list[str]) -> dict[str, torch.Tensor]:
        """Captions -> the transformer's text keyword arguments, each ``[B, ...]`` (float32, CPU)."""

    @abc.abstractmethod
    def loss(self, pipe: Any, transformer: torch.nn.Module, clean: torch.Tensor, noise: torch.Tensor,
             sigma: torch.Tensor, text: dict[str, torch.Tensor]) -> torch.Tensor:
        """The denoising loss of one batch noised to ``sigma [B]`` (``transformer``: the pipeline's,
        possibly wrapped for DDP): scalar."""

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
        return tuple(int(p) for p in pipe.transformer.config.patch_size)

    def _compression(self, pipe: Any) -> tuple[int, int]:
        return int(getattr(pipe, "vae_scale_factor_temporal", 4)), int(getattr(pipe, "vae_scale_factor_spatial", 8))

    def _latent_channels(self, pipe: Any) -> int:
        return int(pipe.vae.config.z_dim)

    def _check_vae_size(self, pipe: Any, num_frames: int, height: int, width: int, family: str) -> None:
        temporal, spatial = self._compression(pipe)
        if num_frames < 1 or (num_frames - 1) % temporal:
            raise UserError(f"--num-frames must be 1 + {temporal}k (1, {1 + temporal}, {1 + 2 * temporal}, ...) "
                            f"for {family}; got {num_frames}")
        multiple = spatial * self._patch(pipe)[1]
        for flag, value in (("--height", height), ("--width", width)):
            if value < multiple or value % multiple:
                raise UserError(f"{flag} must be a positive multiple of {multiple} pixels for this {family} model "
                                f"(VAE x patch); got {value}")


def _pixels(videos: np.ndarray) -> torch.Tensor:
    """uint8 ``[B, F, H, W, 3]`` -> float ``[B, 3, F, H, W]`` in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(videos)).to(torch.float32).permute(0, 4, 1, 2, 3) / 127.5 - 1.0


class EmbeddedFamily(TrainingFamily):
    """diffattn's embedded model: pixels in, clean clip out (x-prediction), the plain x0 loss of
    ``scripts/train_embedded_model.py`` (``--min-loss-sigma 1``)."""

    name = "embedded"

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


class WanFamily(TrainingFamily):
    """Wan 2.1/2.2 text-to-video: the VAE's normalised latents (``(z - mean) / std``, the inverse
    of what ``WanPipeline`` decodes), UMT5 text embeddings, and the velocity ``noise - x0`` as the
    target (rectified flow, ``FlowMatchEulerDiscreteScheduler``)."""

    name = "wan"

    def check_size(self, pipe: Any, num_frames: int, height: int, width: int) -> None:
        self._check_vae_size(pipe, num_frames, height, width, "a Wan model")

    def default_size(self, pipe: Any) -> tuple[int, int]:
        return 480, 832

    def _latent_stats(self, pipe: Any) -> tuple[torch.Tensor, torch.Tensor]:
        config = pipe.vae.config
        shape = (1, config.z_dim, 1, 1, 1)
        return torch.tensor(config.latents_mean).view(shape), torch.tensor(config.latents_std).view(shape)

    @torch.no_grad()
    def encode_videos(self, pipe: Any, videos: np.ndarray) -> torch.Tensor:
        vae = pipe.vae
        pixels = _pixels(videos).to(vae.device, vae.dtype)
        latents = vae.encode(pixels).latent_dist.mode().float().cpu()
        mean, std = self._latent_stats(pipe)
        return (latents - mean) / std

    @torch.no_grad()
    def encode_captions(self, pipe: Any, captions: list[str]) -> dict[str, torch.Tensor]:
        if getattr(pipe, "text_encoder", None) is None or getattr(pipe, "tokenizer", None) is None:
            raise UserError("--model has no tokenizer/text_encoder: train-lora needs them to encode the captions")
        embeds, _ = pipe.encode_prompt(captions, do_classifier_free_guidance=False, device=pipe.text_encoder.device)
        return {"encoder_hidden_states": embeds.float().cpu()}

    def loss(self, pipe, transformer, clean, noise, sigma, text):
        prediction = transformer(noised(clean, noise, sigma), sigma * 1000, return_dict=False, **text)[0]
        return torch.mean((prediction.float() - (noise - clean)) ** 2)


class LTXVideoFamily(TrainingFamily):
    """LTX-Video text-to-video: the VAE's normalised latents (``LTXPipeline._normalize_latents``),
    packed into patch tokens for the transformer, T5 embeddings with their attention mask, and the
    velocity ``noise - x0`` as the target (rectified flow)."""

    name = "ltx_video"
    preset_family = "ltx_video"
    #: The pipeline's default frame rate: it sets the temporal RoPE scale, as at inference.
    frame_rate = 25

    def check_size(self, pipe: Any, num_frames: int, height: int, width: int) -> None:
        self._check_vae_size(pipe, num_frames, height, width, "an LTX-Video model")

    def default_size(self, pipe: Any) -> tuple[int, int]:
        return 480, 704

    def _patch(self, pipe: Any) -> tuple[int, int, int]:
        config = pipe.transformer.config
        return int(config.patch_size_t), int(config.patch_size), int(config.patch_size)

    def _compression(self, pipe: Any) -> tuple[int, int]:
        return int(pipe.vae_temporal_compression_ratio), int(pipe.vae_spatial_compression_ratio)

    def _latent_channels(self, pipe: Any) -> int:
        return int(pipe.vae.config.latent_channels)

    @torch.no_grad()
    def encode_videos(self, pipe: Any, videos: np.ndarray) -> torch.Tensor:
        vae = pipe.vae
        latents = vae.encode(_pixels(videos).to(vae.device, vae.dtype)).latent_dist.mode().float().cpu()
        mean, std = vae.latents_mean.cpu(), vae.latents_std.cpu()
        return pipe._normalize_latents(latents, mean, std, vae.config.scaling_factor)

    @torch.no_grad()
    def encode_captions(self, pipe: Any, captions: list[str]) -> dict[str, torch.Tensor]:
        if getattr(pipe, "text_encoder", None) is None or getattr(pipe, "tokenizer", None) is None:
            raise UserError("--model has no tokenizer/text_encoder: train-lora needs them to encode the captions")
        embeds, mask, _, _ = pipe.encode_prompt(captions, do_classifier_free_guidance=False,
                                                device=pipe.text_encoder.device)
        return {"encoder_hidden_states": embeds.float().cpu(), "encoder_attention_mask": mask.cpu()}

    def loss(self, pipe, transformer, clean, noise, sigma, text):
        p_t, p, _ = self._patch(pipe)
        temporal, spatial = self._compression(pipe)
        _, _, frames, height, width = clean.shape
        prediction = transformer(
            hidden_states=pipe._pack_latents(noised(clean, noise, sigma), p, p_t), timestep=sigma * 1000,
            num_frames=frames // p_t, height=height // p, width=width // p,
            rope_interpolation_scale=(temporal / self.frame_rate, spatial, spatial), return_dict=False, **text)[0]
        target = pipe._pack_latents(noise - clean, p, p_t)
        return torch.mean((prediction.float() - target) ** 2)


TRAINING_FAMILIES: dict[str, TrainingFamily] = {
    family.name: family for family in (EmbeddedFamily(), WanFamily(), LTXVideoFamily())}


def training_family(pipe: Any) -> TrainingFamily:
    """The training rules for ``pipe`` (the embedded pipeline, or a Wan text-to-video pipeline);
    UserError naming the pipeline class and the families that train otherwise.

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
    if family == "wan" and type(pipe).__name__ == "WanPipeline":
        if getattr(pipe, "transformer_2", None) is not None:
            raise UserError("train-lora does not train two-expert Wan 2.2 pipelines (transformer_2: each expert "
                            "owns a noise range); train a single-transformer Wan pipeline")
        return TRAINING_FAMILIES["wan"]
    if family == "ltx_video" and type(pipe).__name__ == "LTXPipeline":
        return TRAINING_FAMILIES["ltx_video"]
    raise UserError(f"train-lora trains the embedded model and the Wan and LTX-Video text-to-video pipelines "
                    f"(WanPipeline, LTXPipeline); "
                    f"got {type(pipe).__name__} (family {family!r}): its text conditioning and latent "
                    f"packing are not written for training yet")
