"""The embedded pipeline: tokenizer, save/load round trip, generation, the Wan adapter, training."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import diffattn
from diffattn.adapters import sparsity_state
from diffattn.patterns import Neighborhood
from diffattn.pipelines.embedded import (
    EMBEDDED_DIR, PIXEL_MEAN, PIXEL_STD, EmbeddedVideoPipeline, build_components, build_tokenizer,
    clean_estimate_from_output, is_embedded_folder, load_embedded_pipeline,
)
from diffattn.pipelines.shapes import VOCABULARY

from ..scripts import load_script
from .tiny_embedded import TINY, run
from .tiny_embedded import tiny_embedded_pipeline as tiny_pipeline

REPO = Path(__file__).resolve().parents[2]

def test_tokenizer_knows_the_grammar_and_nothing_else():
    tokenizer = build_tokenizer()
    ids = tokenizer("A Red circle, moves LEFT").input_ids
    words = tokenizer.convert_ids_to_tokens(ids)
    assert words == ["a", "red", "circle", "<unk>", "moves", "left"]
    assert len(tokenizer) == len(VOCABULARY) + 2
    assert tokenizer.convert_ids_to_tokens(tokenizer("a magenta blob").input_ids) == ["a", "<unk>", "<unk>"]


def test_generation_is_finite_shaped_and_seeded():
    pipe = tiny_pipeline()
    video = run(pipe, frames=5, size=24)
    assert video.shape == (1, 5, 24, 24, 3) and np.isfinite(video).all()
    assert video.min() >= 0 and video.max() <= 1
    assert np.array_equal(video, run(pipe, frames=5, size=24))
    assert not np.array_equal(video, run(pipe, frames=5, size=24, seed=1))
    batch = pipe(["a red circle moves left", "a blue square moves up"], num_frames=2, height=16, width=16,
                 num_inference_steps=1, output_type="pt").frames
    assert batch.shape == (2, 2, 16, 16, 3)


def test_skip_sampler_matches_the_sample_sampler_on_a_reexpressed_transformer():
    """A transformer whose output means x0 ("sample") and the same transformer re-expressed as a
    skip residual ("sample_skip") must give the same video: the sampler decodes the residual."""
    prediction_type = "sample_skip"
    components = build_components(TINY)
    reference = EmbeddedVideoPipeline(**components)
    reference.set_progress_bar_config(disable=True)
    expected = run(reference, frames=2, steps=3)
    forward = components["transformer"].forward

    def reexpressed(hidden_states, timestep, *args, **kwargs):
        x0 = forward(hidden_states, timestep, *args, **kwargs)[0]
        sigma = (timestep / 1000).view(-1, 1, 1, 1, 1)
        zero = clean_estimate_from_output(torch.zeros_like(x0), hidden_states, sigma, prediction_type)
        unit = clean_estimate_from_output(torch.ones_like(x0), hidden_states, sigma, prediction_type) - zero
        return ((x0 - zero) / unit,)

    other = EmbeddedVideoPipeline(**components, prediction_type=prediction_type)
    other.set_progress_bar_config(disable=True)
    other.transformer.forward = reexpressed
    video = run(other, frames=2, steps=3)
    assert np.isfinite(video).all() and video.shape == expected.shape
    assert np.allclose(video, expected, atol=1e-4)


def test_prompt_changes_the_output():
    pipe = tiny_pipeline()
    assert not np.allclose(run(pipe, "a red circle moves left"), run(pipe, "a blue square moves down"))


def plain(config) -> dict:
    """A config as JSON-comparable data (tuples and lists alike), bookkeeping keys dropped."""
    items = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    drop = ("_use_default_values", "_name_or_path", "transformers_version", "architectures", "dtype", "torch_dtype")
    return json.loads(json.dumps({k: v for k, v in items.items() if k not in drop}, sort_keys=True, default=list))


def test_save_load_round_trip_is_identical(tmp_path):
    pipe = tiny_pipeline(seed=3)
    pipe.save_pretrained(tmp_path)
    assert is_embedded_folder(tmp_path)
    assert not list(tmp_path.rglob("*.bin")) and not list(tmp_path.rglob("*.pt"))  # safetensors only
    loaded = load_embedded_pipeline(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    for name in ("transformer", "text_encoder"):
        saved, restored = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert saved.keys() == restored.keys()
        assert all(torch.equal(saved[k], restored[k]) for k in saved), name  # bit for bit
        assert plain(getattr(pipe, name).config) == plain(getattr(loaded, name).config)
    assert pipe.tokenizer.get_vocab() == loaded.tokenizer.get_vocab()
    # Same weights, but freshly loaded tensors may take other BLAS code paths: ~1e-7 apart.
    np.testing.assert_allclose(run(pipe), run(loaded), atol=1e-5)


def oracle(pipe, prediction_type: str, clean: torch.Tensor, noise: torch.Tensor, monkeypatch) -> list[float]:
    """Make the transformer an oracle that knows the clean clip and the noise it was drawn from;
    return the timesteps it was called with."""
    seen: list[float] = []

    def forward(hidden_states, timestep, encoder_hidden_states, return_dict=True):
        seen.append(float(timestep[0]))
        return (clean.expand_as(hidden_states) if prediction_type == "sample" else (noise - clean).expand_as(hidden_states),)

    monkeypatch.setattr(pipe.transformer, "forward", forward)
    return seen


# A velocity oracle knows only the initial noise, so it is exact on the deterministic path alone.
@pytest.mark.parametrize("prediction_type, stochastic", [("sample", False), ("sample", True), ("flow", False)])
def test_sampler_reaches_the_clean_clip_the_model_predicts(prediction_type, stochastic, monkeypatch):
    """Independent of training: on the straight path x_t = (1 - s) x0 + s noise, a model that
    predicts x0 exactly (or the velocity noise - x0 exactly) must land on x0 whatever the steps;
    re-noising between steps (stochastic sampling) must not move the end point of an exact x0 model."""
    config = dataclasses.replace(TINY, stochastic_sampling=stochastic)
    pipe = EmbeddedVideoPipeline(**build_components(config), prediction_type=prediction_type)
    pipe.set_progress_bar_config(disable=True)
    clean = torch.rand(1, 3, 2, 16, 16) * 1.6 - 0.8
    noise = torch.randn(1, 3, 2, 16, 16, generator=torch.Generator().manual_seed(0))
    timesteps = oracle(pipe, prediction_type, clean, noise, monkeypatch)
    video = pipe("a red circle moves left", num_frames=2, height=16, width=16, num_inference_steps=5,
                 latents=noise, output_type="pt").frames
    np.testing.assert_allclose(video.numpy(), ((clean + 1) / 2).permute(0, 2, 3, 4, 1).numpy(), atol=1e-5)
    assert len(timesteps) == 2 * 5 and timesteps[0] == 1000.0  # CFG: two forwards per step, from pure noise


def test_stochastic_sampling_draws_its_noise_from_the_callers_generator():
    """Same start latents: a deterministic sampler ignores the generator, the stochastic one (the
    default) follows it, so a seed still fixes the video."""
    latents = torch.randn(1, 3, 2, 16, 16, generator=torch.Generator().manual_seed(5))
    for stochastic in (True, False):
        pipe = EmbeddedVideoPipeline(**build_components(dataclasses.replace(TINY, stochastic_sampling=stochastic)))
        pipe.set_progress_bar_config(disable=True)
        assert pipe.scheduler.config.stochastic_sampling is stochastic
        videos = [run(pipe, frames=2, steps=3, seed=seed, latents=latents.clone()) for seed in (0, 0, 1)]
        assert np.array_equal(videos[0], videos[1])
        assert np.array_equal(videos[0], videos[2]) is not stochastic
    assert build_components(TINY)["scheduler"].config.stochastic_sampling is True


def test_prediction_type_is_checked_and_saved(tmp_path):
    with pytest.raises(ValueError, match="prediction_type must be one of \\('sample', 'flow', 'sample_skip'\\); "
                                         "got 'epsilon'"):
        EmbeddedVideoPipeline(**build_components(TINY), prediction_type="epsilon")
    with pytest.raises(ValueError, match="got 'epsilon'"):
        clean_estimate_from_output(torch.zeros(1), torch.zeros(1), 0.5, "epsilon")
    for kind in ("flow", "sample_skip"):
        EmbeddedVideoPipeline(**build_components(TINY), prediction_type=kind).save_pretrained(tmp_path / kind)
        assert json.loads((tmp_path / kind / "model_index.json").read_text())["prediction_type"] == kind
        assert load_embedded_pipeline(tmp_path / kind).config.prediction_type == kind


@pytest.mark.parametrize("sigma", [0.02, 0.3, 0.7, 0.98])
def test_skip_parameterization_is_the_least_squares_estimate_plus_a_unit_variance_residual(sigma):
    """Independent reference: on Gaussian data with the pixel statistics, regress x0 on x_t by least
    squares. With output 0, "sample_skip" must give that regression; the residual it leaves to the
    network, divided by c_out, must have unit variance at every noise level."""
    g = torch.Generator().manual_seed(0)
    clean = PIXEL_MEAN + PIXEL_STD * torch.randn(400_000, generator=g, dtype=torch.float64)
    noisy = (1 - sigma) * clean + sigma * torch.randn(400_000, generator=g, dtype=torch.float64)
    design = torch.stack([noisy, torch.ones_like(noisy)], dim=1)
    fit = torch.linalg.lstsq(design, clean[:, None]).solution[:, 0]  # slope, intercept
    baseline = clean_estimate_from_output(torch.zeros_like(noisy), noisy, sigma, "sample_skip")
    assert torch.allclose(baseline, design @ fit, atol=5e-3)
    c_out = clean_estimate_from_output(torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64),
                                       sigma, "sample_skip") - clean_estimate_from_output(
        torch.zeros(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64), sigma, "sample_skip")
    target = (clean - baseline) / c_out
    assert float(target.std()) == pytest.approx(1.0, abs=0.01)
    assert float(target.mean()) == pytest.approx(0.0, abs=0.01)


def test_skip_parameterization_at_the_ends_of_the_noise_range():
    noisy, output = torch.randn(5, generator=torch.Generator().manual_seed(1)), torch.randn(5)
    # sigma 1: nothing to keep from the input; sigma -> 0: the input is the answer.
    assert torch.allclose(clean_estimate_from_output(output, noisy, 1.0, "sample_skip"), PIXEL_MEAN + PIXEL_STD * output)
    assert torch.allclose(clean_estimate_from_output(output, noisy, 1e-6, "sample_skip"), noisy, atol=1e-4)
    sigma = torch.tensor([0.2, 0.9]).view(2, 1)  # per-clip sigmas broadcast like [B, 1, 1, 1, 1]
    both = clean_estimate_from_output(output.expand(2, 5), noisy.expand(2, 5), sigma, "sample_skip")
    for row, value in enumerate((0.2, 0.9)):
        assert torch.allclose(both[row], clean_estimate_from_output(output, noisy, value, "sample_skip"))


def test_training_loss_is_the_clipped_velocity_error():
    train = load_script("train_embedded_model")
    clean, noise = torch.zeros(2, 3, 1, 2, 2), torch.ones(2, 3, 1, 2, 2)
    sigma = torch.tensor([0.1, 0.5])
    off_by_one = clean + 1.0
    # Per clip the squared x0 error is 1, divided by max(sigma, 0.25)^2: 16 and 4 -> mean 10.
    assert float(train.denoising_loss(off_by_one, clean, noise, sigma, "sample", 0.25)) == pytest.approx(10.0)
    assert float(train.denoising_loss(clean, clean, noise, sigma, "sample", 0.25)) == 0.0
    assert float(train.denoising_loss(noise - clean, clean, noise, sigma, "flow", 0.25)) == 0.0
    assert float(train.denoising_loss(clean, clean, noise, sigma, "flow", 0.25)) == pytest.approx(1.0)


def test_skip_training_loss_is_the_x0_error_of_the_skip_estimate():
    train = load_script("train_embedded_model")
    g = torch.Generator().manual_seed(2)
    clean, noise = torch.randn(2, 3, 2, 4, 4, generator=g) * 0.3, torch.randn(2, 3, 2, 4, 4, generator=g)
    sigma = torch.tensor([0.3, 0.8])
    s = sigma.view(-1, 1, 1, 1, 1)
    noisy = (1 - s) * clean + s * noise
    zero = clean_estimate_from_output(torch.zeros_like(clean), noisy, s, "sample_skip")
    unit = clean_estimate_from_output(torch.ones_like(clean), noisy, s, "sample_skip") - zero  # c_out
    exact = (clean - zero) / unit  # the output that reproduces the clean clip
    assert float(train.denoising_loss(exact, clean, noise, sigma, "sample_skip", 1.0)) == pytest.approx(0.0, abs=1e-10)
    # An output error of e costs (c_out * e)^2 in x0: the network's share shrinks with the noise.
    loss = float(train.denoising_loss(exact + 1.0, clean, noise, sigma, "sample_skip", 1.0))
    assert loss == pytest.approx(float((unit ** 2).mean()), rel=1e-5)
    assert float(unit[0].mean()) < float(unit[1].mean())


def test_motion_loss_counts_only_errors_that_change_between_frames():
    train = load_script("train_embedded_model")
    clean, noise, sigma = torch.zeros(1, 3, 4, 2, 2), torch.ones(1, 3, 4, 2, 2), torch.tensor([1.0])
    constant_error = clean + 0.5  # the same error in every frame: nothing for the motion term
    assert float(train.denoising_loss(constant_error, clean, noise, sigma, "sample", 1.0, 3.0)) == pytest.approx(0.25)
    flicker = clean.clone()
    flicker[:, :, 1::2] = 1.0  # error 0, 1, 0, 1: squared error 0.5 per pixel, every frame difference 1
    assert float(train.denoising_loss(flicker, clean, noise, sigma, "sample", 1.0)) == pytest.approx(0.5)
    assert float(train.denoising_loss(flicker, clean, noise, sigma, "sample", 1.0, 3.0)) == pytest.approx(0.5 + 3.0)


def test_training_flags_parse_and_bad_ones_are_refused(capsys):
    train = load_script("train_embedded_model")
    defaults = train.parse_args([])
    assert defaults.stochastic_sampling is True and defaults.timestep_shift > defaults.shift
    assert train.parse_args(["--no-stochastic-sampling"]).stochastic_sampling is False
    assert {train.clip_frames(step, defaults) for step in range(defaults.steps)} == {17}  # the shipped recipe
    progressive = train.parse_args(["--steps", "5600", "--short-share", "0.75", "--short-frames", "9"])
    lengths = [train.clip_frames(step, progressive) for step in range(progressive.steps)]
    assert lengths[0] == 9 and lengths[-1] == 17 and lengths.count(9) == 4200
    assert lengths == sorted(lengths)  # one switch, short clips first
    for flags, message in ((["--timestep-shift", "0"], "--timestep-shift must be > 0; got 0.0"),
                           (["--min-loss-sigma", "1.5"], "--min-loss-sigma must be in (0, 1]; got 1.5"),
                           (["--motion-loss-weight", "-1"], "--motion-loss-weight must be >= 0; got -1.0"),
                           (["--size", "60"], "--size must be a multiple of 8"),
                           (["--short-share", "1"], "--short-share must be in [0, 1)"),
                           (["--short-frames", "0"], "--short-frames must be >= 1; got 0"),
                           (["--run-up-frames", "19"], "--run-up-frames must be in 0..18; got 19"),
                           (["--prediction-type", "v"], "--prediction-type: prediction_type must be one of")):
        with pytest.raises(SystemExit) as exit_info:
            train.parse_args(flags)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_bad_sizes_are_refused():
    pipe = tiny_pipeline()
    with pytest.raises(ValueError, match="height must be a positive multiple of 8"):
        run(pipe, size=20)
    with pytest.raises(ValueError, match="num_frames"):
        run(pipe, frames=0)
    with pytest.raises(FileNotFoundError, match="no embedded model"):
        load_embedded_pipeline(REPO / "configs")


def test_wan_adapter_applies_unchanged():
    pipe = tiny_pipeline()
    stock = run(pipe, frames=4, size=32)
    diffattn.apply(pipe, "dense")  # every layer kept dense: the stock processors, exactly
    assert np.array_equal(run(pipe, frames=4, size=32), stock)
    diffattn.remove(pipe)
    # 4 frames of 4x4 tokens: a 1x3x3 window is really sparse here.
    diffattn.apply(pipe, diffattn.SparsityConfig(pattern=Neighborhood(kernel_size=(1, 3, 3)), block_size=32))
    sparse = run(pipe, frames=4, size=32)
    state = sparsity_state(pipe)
    assert sum(state.sparse_calls.values()) == 2 * 2 * 2  # steps x CFG forwards x layers
    assert np.isfinite(sparse).all() and not np.array_equal(sparse, stock)
    diffattn.remove(pipe)
    assert np.array_equal(run(pipe, frames=4, size=32), stock)


@pytest.mark.skipif(not is_embedded_folder(EMBEDDED_DIR), reason="the shipped weights are not in this checkout")
def test_shipped_model_loads_offline_and_is_small():
    size = sum(f.stat().st_size for f in EMBEDDED_DIR.rglob("*") if f.is_file())
    assert size <= 30 * 2**20
    pipe = load_embedded_pipeline()
    pipe.set_progress_bar_config(disable=True)
    assert pipe.transformer.config.patch_size == (1, 8, 8) or list(pipe.transformer.config.patch_size) == [1, 8, 8]
    assert pipe.config.prediction_type == "sample"
    video = run(pipe, frames=3, size=64, steps=2)
    assert video.shape == (1, 3, 64, 64, 3) and np.isfinite(video).all()


def test_training_smoke_run_resumes_exactly(tmp_path):
    train = load_script("train_embedded_model")
    # Step 0 trains on 2-frame clips (--short-share 0.25 of either schedule), the rest on 3-frame ones.
    common = ["--batch-size", "2", "--num-frames", "3", "--short-frames", "2", "--short-share", "0.25",
              "--size", "16", "--num-layers", "1",
              "--num-attention-heads", "2", "--attention-head-dim", "24", "--ffn-dim", "32", "--save-every", "2",
              "--warmup", "2"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train.main([*common, "--steps", "4", "--output", str(straight / "pipe"),
                       "--checkpoint-dir", str(straight / "ck")]) == 0
    assert train.main([*common, "--steps", "2", "--output", str(resumed / "pipe"),
                       "--checkpoint-dir", str(resumed / "ck")]) == 0
    # Continue the 2-step run to 4 steps: same schedule needs the same --steps, so rewrite it.
    info = json.loads((resumed / "ck" / "checkpoint.json").read_text())
    assert info["step"] == 2
    assert train.main([*common, "--steps", "4", "--output", str(resumed / "pipe"),
                       "--checkpoint-dir", str(resumed / "ck"), "--resume"]) == 0
    log = lambda folder: [json.loads(line) for line in (folder / "ck" / "loss.jsonl").read_text().splitlines()]
    assert [entry["frames"] for entry in log(straight)] == [2, 3, 3, 3]
    # steps 3 and 4 see the same batches, weights and moments
    assert [entry["loss"] for entry in log(straight)[2:]] == [entry["loss"] for entry in log(resumed)[2:]]
    a, b = load_embedded_pipeline(straight / "pipe"), load_embedded_pipeline(resumed / "pipe")
    for (name, p), (_, q) in zip(a.transformer.named_parameters(), b.transformer.named_parameters()):
        assert torch.equal(p, q), name
