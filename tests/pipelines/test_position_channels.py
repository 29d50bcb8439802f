"""Position channels: x, y and frame-index inputs next to the pixels of the embedded transformer."""

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import diffattn
from diffattn.adapters import sparsity_state
from diffattn.patterns import Neighborhood
from diffattn.pipelines.embedded import (
    POSITION_CHANNELS, EmbeddedVideoPipeline, build_components, load_embedded_pipeline, position_channels,
    transformer_input,
)
from diffattn.pipelines.eval_embedded import clean_estimate

from ..scripts import load_script
from .tiny_embedded import TINY, run

POSITIONED = dataclasses.replace(TINY, position_channels=True)


def positioned_pipeline(seed: int = 0) -> EmbeddedVideoPipeline:
    pipe = EmbeddedVideoPipeline(**build_components(POSITIONED, seed=seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def recorded_inputs(pipe) -> list[torch.Tensor]:
    """Record what the transformer is called with, passing the call through."""
    seen: list[torch.Tensor] = []
    forward = pipe.transformer.forward

    def recording(hidden_states, *args, **kwargs):
        seen.append(hidden_states.detach().clone())
        return forward(hidden_states, *args, **kwargs)

    pipe.transformer.forward = recording
    return seen


@pytest.mark.parametrize("frames, height, width", [(17, 8, 16), (5, 24, 8), (20, 8, 8)])
def test_position_channels_are_pixel_centres_and_the_frame_index(frames, height, width):
    coords = position_channels(2, frames, height, width)
    assert coords.shape == (2, 3, frames, height, width)
    for f in range(frames):
        for i in range(height):
            for j in range(width):
                # Pixel centre (j + 0.5, i + 0.5) of a width x height frame mapped to [-1, 1];
                # frames 0 and 16 (the base length) at -1 and 1, one step of 1/8 per frame.
                expected = ((2 * j + 1) / width - 1, (2 * i + 1) / height - 1, f / 8 - 1)
                np.testing.assert_allclose(coords[1, :, f, i, j].numpy(), expected, atol=1e-6)
    assert torch.equal(coords[0], coords[1])


def test_a_plain_transformer_gets_the_pixels_alone():
    transformer = build_components(TINY)["transformer"]
    assert transformer.config.in_channels == 3
    noisy = torch.randn(2, 3, 3, 16, 16)
    assert torch.equal(transformer_input(transformer, noisy), noisy)


def test_a_positioned_transformer_gets_pixels_then_coordinates():
    transformer = build_components(POSITIONED)["transformer"]
    assert (transformer.config.in_channels, transformer.config.out_channels) == (3 + POSITION_CHANNELS, 3)
    noisy = torch.randn(2, 3, 4, 16, 24)
    model_input = transformer_input(transformer, noisy)
    assert model_input.shape == (2, 6, 4, 16, 24)
    assert torch.equal(model_input[:, :3], noisy)
    assert torch.equal(model_input[:, 3:], position_channels(2, 4, 16, 24))


def test_other_channel_counts_are_refused():
    odd = SimpleNamespace(config=SimpleNamespace(in_channels=5, out_channels=3), dtype=torch.float32)
    with pytest.raises(ValueError, match="plus 0 or 3 position channels; got in_channels=5"):
        transformer_input(odd, torch.zeros(1, 3, 1, 8, 8))


def test_the_pipeline_feeds_the_coordinates_and_round_trips(tmp_path):
    pipe = positioned_pipeline(seed=2)
    seen = recorded_inputs(pipe)
    video = run(pipe, frames=3, size=16, steps=2)
    assert video.shape == (1, 3, 16, 16, 3) and np.isfinite(video).all()
    assert len(seen) == 2 * 2  # steps x CFG forwards
    for model_input in seen:
        assert model_input.shape == (1, 6, 3, 16, 16)
        assert torch.equal(model_input[:, 3:], position_channels(1, 3, 16, 16))
    pipe.save_pretrained(tmp_path)
    loaded = load_embedded_pipeline(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.transformer.config.in_channels == 6
    np.testing.assert_allclose(run(loaded, frames=3, size=16), video, atol=1e-5)
    # The one-step estimate of the evaluation calls the transformer the same way.
    text = loaded.encode_prompt(["a red circle moves left"])
    estimate = clean_estimate(loaded, torch.randn(1, 3, 3, 16, 16), 0.5, text)
    assert estimate.shape == (1, 3, 3, 16, 16) and estimate.abs().max() <= 1


def test_the_coordinates_change_what_the_model_predicts():
    # The coordinates reach the network: the same pixels with the frame ramp reversed (frame 0
    # labelled as the last) give another prediction.
    pipe = positioned_pipeline(seed=1)
    transformer = pipe.transformer
    noisy = torch.randn(1, 3, 4, 16, 16)
    text = pipe.encode_prompt(["a blue square moves up"])
    timestep = torch.tensor([500.0])
    with torch.no_grad():
        right = transformer(transformer_input(transformer, noisy), timestep, text, return_dict=False)[0]
        shifted = torch.cat([noisy, position_channels(1, 4, 16, 16).flip(2)], dim=1)
        wrong = transformer(shifted, timestep, text, return_dict=False)[0]
    assert right.shape == (1, 3, 4, 16, 16)
    assert not torch.allclose(right, wrong, atol=1e-4)


def test_wan_adapter_applies_to_a_positioned_model():
    pipe = positioned_pipeline()
    stock = run(pipe, frames=4, size=32)
    diffattn.apply(pipe, diffattn.SparsityConfig(pattern=Neighborhood(kernel_size=(1, 3, 3)), block_size=32))
    sparse = run(pipe, frames=4, size=32)
    assert sum(sparsity_state(pipe).sparse_calls.values()) == 2 * 2 * 2  # steps x CFG forwards x layers
    assert np.isfinite(sparse).all() and not np.array_equal(sparse, stock)
    diffattn.remove(pipe)
    assert np.array_equal(run(pipe, frames=4, size=32), stock)


def test_training_with_position_channels_writes_a_positioned_pipeline(tmp_path):
    train = load_script("train_embedded_model")
    assert train.parse_args([]).position_channels is False  # the shipped recipe
    assert train.main(["--position-channels", "--steps", "2", "--batch-size", "1", "--num-frames", "3",
                       "--size", "16", "--num-layers", "1", "--num-attention-heads", "2",
                       "--attention-head-dim", "24", "--ffn-dim", "32", "--output", str(tmp_path / "pipe"),
                       "--checkpoint-dir", str(tmp_path / "ck")]) == 0
    pipe = load_embedded_pipeline(tmp_path / "pipe")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.transformer.config.in_channels == 6
    assert np.isfinite(run(pipe, frames=3, size=16)).all()
