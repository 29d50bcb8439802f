"""``diffattn train-lora`` for CogVideoX, HunyuanVideo and Mochi: each family's objective against
its diffusers scheduler (the noised input, the timestep and the target the scheduler's own
arithmetic implies), and end to end on tiny saved pipelines (CPU, two steps, sparse preset, the
LoRA loaded back with ``load_lora_weights``)."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from diffattn.training import TrainLoraOptions, train_lora
from diffattn.training.families import TRAINING_FAMILIES
from tests.threads import one_thread  # noqa: F401 (autouse fixture)
from tests.training.tiny import saved_tiny_cogvideox, saved_tiny_hunyuan_video, saved_tiny_mochi, video_folder

FAMILIES = {  # (saved tiny pipeline, pipeline class, frames the model takes)
    "cogvideox": (saved_tiny_cogvideox, "CogVideoXPipeline", 9),
    "cogvideox-1.5": (partial(saved_tiny_cogvideox, version="1.5"), "CogVideoXPipeline", 13),
    "hunyuan_video": (saved_tiny_hunyuan_video, "HunyuanVideoPipeline", 9),
    "mochi": (saved_tiny_mochi, "MochiPipeline", 7),
}
TEXT_INPUTS = {  # the transformer's text keyword arguments each family caches
    "cogvideox": {"encoder_hidden_states"},
    "hunyuan_video": {"encoder_hidden_states", "encoder_attention_mask", "pooled_projections"},
    "mochi": {"encoder_hidden_states", "encoder_attention_mask"},
}


class Recorder(torch.nn.Module):
    """Stands in for the transformer: records its inputs, returns ``answer(inputs)``."""

    def __init__(self, answer):
        super().__init__()
        self.answer, self.inputs = answer, {}

    def forward(self, **inputs):
        self.inputs = inputs
        return (self.answer(inputs),)


def pipe_with_transformer_config(**config):
    return SimpleNamespace(transformer=SimpleNamespace(config=SimpleNamespace(**config)))


def test_cogvideox_objective_is_its_schedulers_v_prediction():
    from tests.adapters.tiny_cogvideox import tiny_cogvideox_pipeline

    pipe = tiny_cogvideox_pipeline()
    scheduler = pipe.scheduler
    generator = torch.Generator().manual_seed(0)
    clean, noise = torch.randn(2, 4, 3, 4, 4, generator=generator), torch.randn(2, 4, 3, 4, 4, generator=generator)
    sigma = torch.tensor([0.25, 1.0])
    timesteps = torch.tensor([250, 999])  # round(sigma * 999)
    velocity = scheduler.get_velocity(clean, noise, timesteps).transpose(1, 2)  # diffusers' own v
    recorder = Recorder(lambda inputs: velocity)
    loss = TRAINING_FAMILIES["cogvideox"].loss(pipe, recorder, clean, noise, sigma,
                                               {"encoder_hidden_states": torch.zeros(2, 10, 32)})
    assert float(loss) < 1e-10
    assert torch.equal(recorder.inputs["timestep"], timesteps)
    assert torch.allclose(recorder.inputs["hidden_states"],
                          scheduler.add_noise(clean, noise, timesteps).transpose(1, 2), atol=1e-6)
    cos, sin = recorder.inputs["image_rotary_emb"]
    assert cos.shape[0] == 3 * 2 * 2  # one rotary row per video token of the 3 x 2 x 2 grid


@pytest.mark.parametrize("name", ["hunyuan_video", "mochi"])
def test_flow_objective_is_one_exact_euler_step_of_the_scheduler(name):
    """The target is the model output with which the family's scheduler, set to the single noise
    level sigma, steps from x_t straight to x0 (rectified flow is a straight line); the
    timestep is the one that scheduler hands the transformer. Mochi's scheduler inverts sigmas."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, invert_sigmas=name == "mochi")
    pipe = pipe_with_transformer_config(guidance_embeds=True)
    clean = torch.randn(1, 4, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(1, 4, 2, 4, 4, generator=torch.Generator().manual_seed(2))
    sigma = 0.3
    scheduler.set_timesteps(sigmas=[sigma])

    def exact_step(inputs):
        return (clean - inputs["hidden_states"]) / (scheduler.sigmas[1] - scheduler.sigmas[0])

    recorder = Recorder(exact_step)
    loss = TRAINING_FAMILIES[name].loss(pipe, recorder, clean, noise, torch.tensor([sigma]), {})
    assert float(loss) < 1e-10
    assert torch.allclose(recorder.inputs["timestep"], scheduler.timesteps[:1])
    if name == "hunyuan_video":
        assert recorder.inputs["guidance"].tolist() == [1000.0]  # embedded guidance 1, scaled as the pipeline does


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_trains_sparse_and_its_lora_loads_back(name, tmp_path):
    import diffusers

    build, pipeline_class, frames = FAMILIES[name]
    model = build(tmp_path / "model")
    data = video_folder(tmp_path / "videos", frames=frames, size=32)
    out = tmp_path / "lora"
    result = train_lora(TrainLoraOptions(output=str(out), model=str(model), data=str(data), preset="radial",
                                         num_frames=frames, height=32, width=32, steps=2, rank=4, warmup=0,
                                         validate_every=2, validation_steps=2), log=lambda line: None)
    assert len(result.losses) == 2 and all(np.isfinite(result.losses)) and result.sparse_calls > 0
    assert (out / "validation" / "step-000002.gif").is_file()  # the pipeline runs with the family's call kwargs
    weights = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert any(".to_q." in key for key in weights)
    assert any("lora_B" in key and value.abs().max() > 0 for key, value in weights.items())  # a step changed them
    pipe = getattr(diffusers, pipeline_class).from_pretrained(str(model), local_files_only=True)
    pipe.load_lora_weights(str(out))
    assert any("lora" in n for n, _ in pipe.transformer.named_parameters())
    cached = load_file(str(next((Path(data) / ".diffattn-cache").iterdir())))
    assert cached["clean"].shape[0] == pipe.transformer.config.in_channels  # [C, f, h, w] latents
    assert {key[len("text."):] for key in cached if key.startswith("text.")} == TEXT_INPUTS[name.split("-")[0]]
    if name.startswith("cogvideox"):
        assert json.loads((out / "training.json").read_text())["timestep_shift"] == 1.0  # uniform timesteps


def test_sizes_and_pipelines_the_families_cannot_take_are_refused_by_name():
    from diffusers import CogVideoXImageToVideoPipeline

    from diffattn.errors import UserError
    from diffattn.training.families import training_family
    from tests.adapters.tiny_cogvideox import tiny_cogvideox_pipeline

    family = TRAINING_FAMILIES["cogvideox"]
    v15 = tiny_cogvideox_pipeline(version="1.5")
    family.check_size(v15, 13, 32, 32)  # 4 latent frames: pairs for patch_size_t=2
    with pytest.raises(UserError, match="--num-frames 9 gives 3 latent frames.*multiple of 2: e.g. 13"):
        family.check_size(v15, 9, 32, 32)
    with pytest.raises(UserError, match="--height must be a positive multiple of 16 pixels for a CogVideoX"):
        family.check_size(v15, 13, 24, 32)
    with pytest.raises(UserError, match="--num-frames must be 1 \\+ 6k .* Mochi"):
        TRAINING_FAMILIES["mochi"].check_size(SimpleNamespace(vae_temporal_scale_factor=6, vae_spatial_scale_factor=8,
                                                              transformer=v15.transformer), 9, 32, 32)
    i2v = CogVideoXImageToVideoPipeline(**{name: getattr(v15, name) for name in
                                           ("tokenizer", "text_encoder", "vae", "transformer", "scheduler")})
    with pytest.raises(UserError, match="got CogVideoXImageToVideoPipeline.*conditioning"):
        training_family(i2v)
