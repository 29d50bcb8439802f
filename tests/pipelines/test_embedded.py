"""The embedded pipeline: tokenizer, save/load round trip, generation, the Wan adapter, training."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import diffattn
from diffattn.adapters import sparsity_state
from diffattn.errors import UserError
from diffattn.patterns import Neighborhood
from diffattn.pipelines.embedded import (
    EMBEDDED_DIR,
    EmbeddedVideoPipeline,
    build_components,
    build_tokenizer,
    is_embedded_folder,
    load_embedded_pipeline,
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


def oracle(pipe, clean: torch.Tensor, monkeypatch) -> list[float]:
    """Make the transformer an oracle that knows the clean clip; return the timesteps it was called with."""
    seen: list[float] = []

    def forward(hidden_states, timestep, encoder_hidden_states, return_dict=True):
        seen.append(float(timestep[0]))
        return (clean.expand_as(hidden_states),)

    monkeypatch.setattr(pipe.transformer, "forward", forward)
    return seen


@pytest.mark.parametrize("stochastic", [False, True])
def test_sampler_reaches_the_clean_clip_the_model_predicts(stochastic, monkeypatch):
    """Independent of training: on the straight path x_t = (1 - s) x0 + s noise, a model that
    predicts x0 exactly must land on x0 whatever the steps; re-noising between steps (stochastic
    sampling) must not move the end point of an exact x0 model."""
    config = dataclasses.replace(TINY, stochastic_sampling=stochastic)
    pipe = EmbeddedVideoPipeline(**build_components(config))
    pipe.set_progress_bar_config(disable=True)
    clean = torch.rand(1, 3, 2, 16, 16) * 1.6 - 0.8
    noise = torch.randn(1, 3, 2, 16, 16, generator=torch.Generator().manual_seed(0))
    timesteps = oracle(pipe, clean, monkeypatch)
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
    with pytest.raises(UserError, match="prediction_type must be 'sample' \\(the transformer predicts the clean "
                                        "clip\\); got 'flow'"):
        EmbeddedVideoPipeline(**build_components(TINY), prediction_type="flow")
    EmbeddedVideoPipeline(**build_components(TINY)).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["prediction_type"] == "sample"
    # A folder saved with another parameterization (an experiment) is refused, not misread.
    index = json.loads((tmp_path / "model_index.json").read_text())
    (tmp_path / "model_index.json").write_text(json.dumps({**index, "prediction_type": "sample_skip"}))
    with pytest.raises(UserError, match="got 'sample_skip'"):
        load_embedded_pipeline(tmp_path)


def test_training_loss_is_the_clipped_x0_error():
    train = load_script("train_embedded_model")
    clean = torch.zeros(2, 3, 1, 2, 2)
    sigma = torch.tensor([0.1, 0.5])
    off_by_one = clean + 1.0
    # Per clip the squared x0 error is 1, divided by max(sigma, 0.25)^2: 16 and 4 -> mean 10.
    assert float(train.denoising_loss(off_by_one, clean, sigma, 0.25)) == pytest.approx(10.0)
    assert float(train.denoising_loss(clean, clean, sigma, 0.25)) == 0.0
    assert float(train.denoising_loss(off_by_one, clean, sigma, 1.0)) == pytest.approx(1.0)  # the shipped recipe


def test_training_noise_levels_are_the_shifted_uniform_draws():
    train = load_script("train_embedded_model")
    drawn = train.noise_levels(4, 3.0, torch.Generator().manual_seed(7))
    u = torch.rand(4, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(drawn, 3.0 * u / (1 + 2.0 * u))
    many = train.noise_levels(20000, 3.0, torch.Generator().manual_seed(0))
    # shift 3: sigma <= 0.5 exactly when u <= 1/4, so the shift puts three quarters of the levels above 0.5.
    assert float((many <= 0.5).float().mean()) == pytest.approx(1 / 4, abs=0.01)


def test_training_flags_parse_and_bad_ones_are_refused(capsys):
    train = load_script("train_embedded_model")
    defaults = train.parse_args([])
    assert defaults.stochastic_sampling is True and defaults.timestep_shift > defaults.shift
    assert train.parse_args(["--no-stochastic-sampling"]).stochastic_sampling is False
    for flags, message in ((["--timestep-shift", "0"], "--timestep-shift must be > 0; got 0.0"),
                           (["--min-loss-sigma", "1.5"], "--min-loss-sigma must be in (0, 1]; got 1.5"),
                           (["--size", "60"], "--size must be a multiple of 8"),
                           (["--num-frames", "0"], "--num-frames must be >= 1; got 0"),
                           (["--stop-after", "5", "--steps", "4"], "--stop-after must be in 1..--steps (4); got 5"),
                           (["--caption-dropout", "1"], "--caption-dropout must be in [0, 1); got 1.0")):
        with pytest.raises(SystemExit) as exit_info:
            train.parse_args(flags)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_the_default_training_command_is_the_shipped_recipe():
    """Every setting of the plain command equals the one recorded next to the shipped weights
    (paths and the resume bookkeeping of that run aside)."""
    train = load_script("train_embedded_model")
    recorded = json.loads((EMBEDDED_DIR / "training.json").read_text())["args"]
    defaults = vars(train.parse_args([]))
    bookkeeping = {"output", "checkpoint_dir", "resume", "threads", "stop_after"}
    assert {k: v for k, v in defaults.items() if k not in bookkeeping} == \
        {k: recorded[k] for k in defaults if k not in bookkeeping}
    assert recorded["prediction_type"] == "sample"  # the one parameterization the pipeline takes


#: Losses of the first two steps of ``python scripts/train_embedded_model.py`` (the shipped recipe),
#: one torch thread, recorded before the unshipped training options were removed (2026-12-07).
SHIPPED_RECIPE_FIRST_LOSSES = [0.5797533392906189, 0.7145611047744751]


def test_default_training_command_reproduces_its_first_losses(tmp_path):
    """The shipped recipe's data, noise, model initialisation and loss still give the recorded
    losses (bit-identical on the machine that recorded them; a tolerance far below any change of
    recipe covers other CPUs' float rounding)."""
    train = load_script("train_embedded_model")
    assert train.main(["--stop-after", "2", "--output", str(tmp_path / "pipe"),
                       "--checkpoint-dir", str(tmp_path / "ck")]) == 0
    losses = [json.loads(line)["loss"] for line in (tmp_path / "ck" / "loss.jsonl").read_text().splitlines()]
    np.testing.assert_allclose(losses, SHIPPED_RECIPE_FIRST_LOSSES, rtol=1e-5)
    provenance = json.loads((tmp_path / "pipe" / "training.json").read_text())
    assert provenance["args"]["output"] == str(tmp_path / "pipe")  # outside the repository: as given
    assert train.relative_to_repo(str(REPO / "runs" / "embedded")) == str(Path("runs") / "embedded")


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


#: A short seeded generation of the shipped weights (3 frames, 64x64, 2 steps, seed 0, one
#: thread), recorded before the unshipped samplers were removed (2026-12-07): per-frame means and
#: three pixels.
SHIPPED_FRAME_MEANS = [0.2352806180715561, 0.23605656623840332, 0.2337888479232788]
SHIPPED_PIXELS = {(0, 0, 0): [0.34184888005256653, 0.20122313499450684, 0.31942427158355713],
                  (2, 63, 63): [0.42361828684806824, 0.1051984429359436, 0.07190531492233276],
                  (1, 32, 32): [0.42184385657310486, 0.08925861120223999, 0.14149439334869385]}


@pytest.mark.skipif(not is_embedded_folder(EMBEDDED_DIR), reason="the shipped weights are not in this checkout")
def test_shipped_model_generates_what_it_generated():
    """The shipped weights and the pipeline's sampler are unchanged (bit-identical on the machine
    that recorded these numbers; the tolerance covers other CPUs' float rounding only)."""
    pipe = load_embedded_pipeline()
    pipe.set_progress_bar_config(disable=True)
    video = run(pipe, frames=3, size=64, steps=2)[0]
    np.testing.assert_allclose(video.mean(axis=(1, 2, 3)), SHIPPED_FRAME_MEANS, rtol=0, atol=1e-6)
    for (frame, y, x), rgb in SHIPPED_PIXELS.items():
        np.testing.assert_allclose(video[frame, y, x], rgb, rtol=0, atol=1e-5)


def test_training_smoke_run_resumes_exactly(tmp_path):
    train = load_script("train_embedded_model")
    common = ["--batch-size", "2", "--num-frames", "3", "--size", "16", "--num-layers", "1",
              "--num-attention-heads", "2", "--attention-head-dim", "24", "--ffn-dim", "32", "--save-every", "2",
              "--warmup", "2"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train.main([*common, "--steps", "4", "--output", str(straight / "pipe"),
                       "--checkpoint-dir", str(straight / "ck")]) == 0
    assert train.main([*common, "--steps", "4", "--stop-after", "2", "--output", str(resumed / "pipe"),
                       "--checkpoint-dir", str(resumed / "ck")]) == 0
    info = json.loads((resumed / "ck" / "checkpoint.json").read_text())
    assert info["step"] == 2
    assert train.main([*common, "--steps", "4", "--output", str(resumed / "pipe"),
                       "--checkpoint-dir", str(resumed / "ck"), "--resume"]) == 0

    def log(folder):
        return [json.loads(line) for line in (folder / "ck" / "loss.jsonl").read_text().splitlines()]

    assert [entry["step"] for entry in log(straight)] == [1, 2, 3, 4]
    # the same batches, weights and moments: the same losses, all four steps, and the same weights
    assert [entry["loss"] for entry in log(straight)] == [entry["loss"] for entry in log(resumed)]
    a, b = load_embedded_pipeline(straight / "pipe"), load_embedded_pipeline(resumed / "pipe")
    for (name, p), (_, q) in zip(a.transformer.named_parameters(), b.transformer.named_parameters()):
        assert torch.equal(p, q), name
