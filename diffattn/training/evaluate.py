"""Held-out denoising loss: how well a (fine-tuned) embedded model denoises clips it never saw, at a
given length, with fixed noise and noise levels, so that runs can be compared number to number."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .objectives import denoising_loss, noised

#: Noise levels of the held-out loss: evenly spread, so every stage of sampling counts alike.
HELDOUT_SIGMAS = (0.1, 0.3, 0.5, 0.7, 0.9)


@torch.no_grad()
def heldout_denoising_loss(pipe: Any, num_frames: int, num_clips: int = 4, size: int = 64,
                           sigmas: tuple[float, ...] = HELDOUT_SIGMAS, seed: int = 0) -> dict[str, Any]:
    """The embedded model's x0 loss (its training loss) on ``num_clips`` held-out clips
    (:func:`~diffattn.pipelines.eval_embedded.held_out_specs`, a stream training never draws
    from) rendered at ``num_frames``, each noised to every level in ``sigmas`` with noise seeded
    by ``seed``; whatever sparsity is applied to ``pipe`` is in force. Returns the mean loss and
    the loss per noise level.

    Example:
        >>> from diffattn.pipelines.embedded import load_embedded_pipeline
        >>> result = heldout_denoising_loss(load_embedded_pipeline(), num_frames=3, num_clips=1, size=32)
        >>> sorted(result), 0 < result["loss"] < 1
        (['loss', 'loss_by_sigma', 'sigmas'], True)
    """
    from ..pipelines.embedded import encode_text
    from ..pipelines.eval_embedded import held_out_specs
    from ..pipelines.shapes import caption, render_clip

    specs = held_out_specs(num_clips)
    device = pipe.transformer.device
    videos = np.stack([render_clip(spec, num_frames, size) for spec in specs])
    clean = torch.from_numpy(videos).float().permute(0, 4, 1, 2, 3).to(device) / 127.5 - 1.0
    text = encode_text(pipe.tokenizer, pipe.text_encoder, [caption(spec) for spec in specs], device)
    generator = torch.Generator().manual_seed(seed)
    by_sigma = []
    for level in sigmas:
        noise = torch.randn(clean.shape, generator=generator).to(device)
        sigma = torch.full((len(specs),), float(level), device=device)
        prediction = pipe.transformer(noised(clean, noise, sigma), sigma * 1000, text, return_dict=False)[0]
        by_sigma.append(float(denoising_loss(prediction.float(), clean, sigma, 1.0)))
    return {"loss": float(np.mean(by_sigma)), "loss_by_sigma": by_sigma, "sigmas": list(sigmas)}
