"""A tiny randomly initialised embedded pipeline (2 layers) for fast tests; no files needed."""

import numpy as np
import torch

from diffattn.pipelines.embedded import EmbeddedModelConfig, EmbeddedVideoPipeline, build_components

TINY = EmbeddedModelConfig(num_layers=2, num_attention_heads=2, attention_head_dim=24, ffn_dim=64)


def tiny_embedded_pipeline(seed: int = 0) -> EmbeddedVideoPipeline:
    pipe = EmbeddedVideoPipeline(**build_components(TINY, seed=seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe: EmbeddedVideoPipeline, prompt: str = "a red circle moves left", frames: int = 3, size: int = 16,
        steps: int = 2, seed: int = 0, **kwargs) -> np.ndarray:
    """A short seeded generation: ``[1, frames, size, size, 3]`` in [0, 1]."""
    return pipe(prompt, num_frames=frames, height=size, width=size, num_inference_steps=steps,
                generator=torch.Generator().manual_seed(seed), **kwargs).frames
