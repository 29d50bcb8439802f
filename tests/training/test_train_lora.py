"""``diffattn train-lora`` end to end on tiny pipelines (CPU, a few steps): the embedded model on
procedural clips, a Wan pipeline on a captioned video folder, resume = uninterrupted, the LoRA
loads with ``load_lora_weights`` and ``generate --lora``, and bad input fails before training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from diffattn.cli import main
from diffattn.errors import UserError
from diffattn.training import TrainLoraOptions, train_lora
from diffattn.training.lora import CHECKPOINT_DIR, LORA_FILE
from tests.threads import one_thread  # noqa: F401 (autouse fixture)
from tests.training.tiny import saved_tiny_embedded, saved_tiny_ltx, saved_tiny_wan, video_folder

QUIET = dict(log=lambda line: None)


@pytest.fixture(scope="module")
def embedded_dir(tmp_path_factory) -> Path:
    return saved_tiny_embedded(tmp_path_factory.mktemp("tiny-embedded"))


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory) -> Path:
    return saved_tiny_wan(tmp_path_factory.mktemp("tiny-wan"))


def embedded_options(model: Path, output: Path, **overrides) -> TrainLoraOptions:
    base = dict(output=str(output), model=str(model), preset="radial", num_frames=9, height=32, width=32,
                steps=3, rank=4, lr=1e-2, warmup=0, save_every=2)
    return TrainLoraOptions(**{**base, **overrides})


def test_embedded_lora_trains_sparse_and_loads_back(embedded_dir, tmp_path):
    from diffattn.pipelines.embedded import load_embedded_pipeline

    out = tmp_path / "lora"
    result = train_lora(embedded_options(embedded_dir, out, validate_every=3, validation_steps=1), **QUIET)
    assert len(result.losses) == 3 and all(np.isfinite(result.losses))
    assert result.sparse_calls > 0  # the preset's sparse layers ran (and so did their backward)
    assert (out / LORA_FILE).is_file() and (out / "validation" / "step-000003.gif").is_file()
    info = json.loads((out / "training.json").read_text())
    assert info["steps"] == 3 and info["preset"] == "radial" and info["sparse_attention_calls"] > 0

    weights = load_file(str(out / LORA_FILE))
    assert weights and all(key.startswith("transformer.") for key in weights)
    assert any("lora_B" in key and value.abs().max() > 0 for key, value in weights.items())  # trained, not init

    def one_call(pipe):
        pipe.set_progress_bar_config(disable=True)
        return pipe("a red circle moves left", num_frames=3, height=16, width=16, num_inference_steps=1,
                    generator=torch.Generator().manual_seed(0), output_type="pt").frames

    base = one_call(load_embedded_pipeline(embedded_dir))
    with_lora = load_embedded_pipeline(embedded_dir)
    with_lora.load_lora_weights(str(out))
    assert not torch.allclose(one_call(with_lora), base)

    # The CLI takes the folder (and the file) with --lora.
    video = tmp_path / "out.gif"
    assert main(["generate", "--model", str(embedded_dir), "--lora", str(out), "--num-frames", "3", "--height", "16",
                 "--width", "16", "--steps", "1", "--prompt", "a red circle", "--output", str(video)]) == 0
    assert video.is_file()


def test_resumed_run_equals_the_uninterrupted_one(embedded_dir, tmp_path):
    straight = train_lora(embedded_options(embedded_dir, tmp_path / "straight", steps=4), **QUIET)
    first = train_lora(embedded_options(embedded_dir, tmp_path / "resumed", steps=4, stop_after=2), **QUIET)
    assert (tmp_path / "resumed" / CHECKPOINT_DIR / "checkpoint.json").is_file()
    second = train_lora(embedded_options(embedded_dir, tmp_path / "resumed", steps=4, resume=True), **QUIET)
    assert second.first_step == 2
    assert first.losses + second.losses == straight.losses  # the same batches, bit for bit
    a, b = (load_file(str(tmp_path / name / LORA_FILE)) for name in ("straight", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_an_interrupted_run_saves_its_last_step_and_resumes_without_loss(embedded_dir, tmp_path, monkeypatch):
    from diffattn.training.families import TRAINING_FAMILIES

    straight = train_lora(embedded_options(embedded_dir, tmp_path / "straight", steps=4, save_every=10), **QUIET)
    family = TRAINING_FAMILIES["embedded"]
    calls = []

    def interrupted_loss(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # Ctrl-C during step 3: steps 1 and 2 are done
            raise KeyboardInterrupt
        return type(family).loss(family, *args, **kwargs)

    monkeypatch.setattr(family, "loss", interrupted_loss)
    with pytest.raises(KeyboardInterrupt):
        train_lora(embedded_options(embedded_dir, tmp_path / "resumed", steps=4, save_every=10), **QUIET)
    monkeypatch.undo()
    info = json.loads((tmp_path / "resumed" / CHECKPOINT_DIR / "checkpoint.json").read_text())
    assert info["step"] == 2  # saved on the interrupt, though --save-every is 10
    resumed = train_lora(embedded_options(embedded_dir, tmp_path / "resumed", steps=4, save_every=10, resume=True),
                         **QUIET)
    assert info["losses"] + resumed.losses == straight.losses


def test_the_script_wrapper_runs_the_command():
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, str(repo / "scripts" / "train_lora.py"), "--help"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "--gradient-checkpointing" in result.stdout


def test_full_finetune_ffn_targets_bf16_accumulation_and_checkpointing(embedded_dir, tmp_path):
    from diffattn.pipelines.embedded import load_embedded_pipeline

    ffn = train_lora(embedded_options(embedded_dir, tmp_path / "ffn", steps=1, targets="attention+ffn",
                                      mixed_precision="bf16", grad_accum=2, gradient_checkpointing=True), **QUIET)
    assert any(".ffn." in key for key in load_file(str(ffn.weights))) and np.isfinite(ffn.losses[0])
    full = train_lora(embedded_options(embedded_dir, tmp_path / "full", steps=1, full_finetune=True, preset="dense"),
                      **QUIET)
    tuned, base = load_embedded_pipeline(full.output), load_embedded_pipeline(embedded_dir)
    changed = [not torch.equal(p, q) for p, q in zip(tuned.transformer.parameters(), base.transformer.parameters())]
    assert any(changed)


def test_wan_video_folder_caches_once_and_trains(wan_dir, tmp_path):
    from diffusers import WanPipeline

    data = video_folder(tmp_path / "videos", frames=9, size=32)
    options = dict(output=str(tmp_path / "wan-lora"), model=str(wan_dir), data=str(data), preset="radial",
                   num_frames=5, height=32, width=32, steps=2, rank=4, warmup=0)
    result = train_lora(TrainLoraOptions(**options), **QUIET)
    assert len(result.losses) == 2 and all(np.isfinite(result.losses))
    cache = sorted((data / ".diffattn-cache").iterdir())
    assert len(cache) == 2
    stamps = [path.stat().st_mtime_ns for path in cache]
    train_lora(TrainLoraOptions(**{**options, "output": str(tmp_path / "again"), "steps": 1}), **QUIET)
    assert [path.stat().st_mtime_ns for path in sorted((data / ".diffattn-cache").iterdir())] == stamps  # reused

    pipe = WanPipeline.from_pretrained(str(wan_dir), local_files_only=True)
    pipe.load_lora_weights(str(tmp_path / "wan-lora"))
    assert any("lora" in name for name, _ in pipe.transformer.named_parameters())


def test_ltx_video_folder_trains_and_loads(tmp_path):
    from diffusers import LTXPipeline

    model = saved_tiny_ltx(tmp_path / "ltx")
    data = video_folder(tmp_path / "videos", frames=9, size=32)
    result = train_lora(TrainLoraOptions(output=str(tmp_path / "ltx-lora"), model=str(model), data=str(data),
                                         preset="radial", num_frames=9, height=32, width=32, steps=2, rank=4,
                                         warmup=0), **QUIET)
    assert len(result.losses) == 2 and all(np.isfinite(result.losses)) and result.sparse_calls > 0
    pipe = LTXPipeline.from_pretrained(str(model), local_files_only=True)
    pipe.load_lora_weights(str(tmp_path / "ltx-lora"))
    assert any("lora" in name for name, _ in pipe.transformer.named_parameters())


def cli_fails(args: list[str], capsys) -> str:
    assert main(["train-lora", *args]) == 2
    return capsys.readouterr().err


def test_bad_input_is_refused_before_training(embedded_dir, wan_dir, tmp_path, capsys):
    out = tmp_path / "never"
    common = ["--output", str(out), "--steps", "1"]
    no_captions = video_folder(tmp_path / "nocap", captions=False)
    assert "has no captions" in cli_fails([*common, "--model", str(wan_dir), "--data", str(no_captions),
                                           "--num-frames", "5", "--height", "32", "--width", "32"], capsys)

    broken = video_folder(tmp_path / "broken", count=1)
    (broken / "clip0.gif").write_bytes(b"not a video")
    err = cli_fails([*common, "--model", str(wan_dir), "--data", str(broken), "--num-frames", "5", "--height", "32",
                     "--width", "32"], capsys)
    assert "clip0.gif" in err and "could not be decoded" in err

    uncaptioned = video_folder(tmp_path / "extra")
    video_folder(tmp_path / "extra-src", count=3, captions=False)
    (tmp_path / "extra-src" / "clip2.gif").rename(uncaptioned / "stray.gif")
    assert "stray.gif" in cli_fails([*common, "--model", str(wan_dir), "--data", str(uncaptioned), "--num-frames",
                                     "5", "--height", "32", "--width", "32"], capsys)

    good = video_folder(tmp_path / "good")
    assert "1 + 4k" in cli_fails([*common, "--model", str(wan_dir), "--data", str(good), "--num-frames", "6",
                                  "--height", "32", "--width", "32"], capsys)
    assert "--rank must be an int >= 1, got 0" in cli_fails([*common, "--rank", "0"], capsys)
    assert "no-such-preset" in cli_fails([*common, "--preset", "no-such-preset"], capsys)
    assert "--data is required" in cli_fails([*common, "--model", str(wan_dir), "--num-frames", "5", "--height",
                                              "32", "--width", "32"], capsys)
    assert not out.exists()  # nothing was trained or written
    with pytest.raises(UserError, match="--num-frames"):
        train_lora(embedded_options(embedded_dir, out, num_frames=0), **QUIET)


def test_lora_flag_takes_a_file_or_a_train_lora_folder(tmp_path):
    from diffattn.runs import check_lora

    (tmp_path / LORA_FILE).write_bytes(b"")
    assert check_lora(str(tmp_path)) == tmp_path / LORA_FILE
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="has no pytorch_lora_weights.safetensors"):
        check_lora(str(empty))
