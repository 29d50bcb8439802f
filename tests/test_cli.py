"""The ``diffattn`` console entry point, run as a subprocess (what users run)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import imageio.v2 as imageio
import pytest
import torch

import diffattn.profiler.command
import diffattn.runs
from diffattn import Dense, VideoGrid, block_sparse_attention
from diffattn.cli import main
from diffattn.processors.presets import families
from diffattn.profiler import ProfileReport

REPO = Path(__file__).resolve().parents[1]
SCRIPT = Path(sys.executable).parent / "diffattn"


def run(*args: str, cwd: Path | None = None, script: bool = False,
        env: dict | None = None) -> subprocess.CompletedProcess:
    command = [str(SCRIPT)] if script and SCRIPT.is_file() else [sys.executable, "-m", "diffattn.cli"]
    return subprocess.run(command + list(args), capture_output=True, text=True, cwd=cwd or REPO, timeout=300, env=env)


def count_frames(path: Path) -> int:
    with imageio.get_reader(path) as reader:
        return sum(1 for _ in reader)


def test_generate_writes_video_with_requested_frames(tmp_path):
    out = tmp_path / "sub" / "video.mp4"
    result = run("generate", "--num-frames", "9", "--height", "64", "--width", "64", "--steps", "2",
                 "--prompt", "a red circle moves left", "--output", str(out), script=True)
    assert result.returncode == 0, result.stderr
    assert count_frames(out) == 9
    assert "preset wan/dense" in result.stdout and "layout density 1.0000" in result.stdout
    assert [p.name for p in out.parent.iterdir()] == ["video.mp4"]  # no temp file left behind


def test_generate_gif_with_sparse_preset(tmp_path):
    out = tmp_path / "video.gif"
    result = run("generate", "--preset", "radial-fast", "--num-frames", "5", "--height", "64", "--width", "64",
                 "--steps", "2", "--output", str(out))
    assert result.returncode == 0, result.stderr
    assert count_frames(out) == 5
    assert "preset wan/radial-fast" in result.stdout


def test_presets_lists_every_family():
    result = run("presets", script=True)
    assert result.returncode == 0, result.stderr
    for family in families():
        assert f"{family}  (density at" in result.stdout
    assert "radial-fast" in result.stdout and "Radial attention" in result.stdout


def test_mask_writes_png(tmp_path):
    out = tmp_path / "mask.png"
    result = run("mask", "--preset", "radial", "--family", "wan", "--frames", "8", "--height", "16",
                 "--width", "16", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "density" in result.stdout


BAD_INPUTS = [
    ({"--preset": "no-such-preset"}, "unknown preset"),
    ({"--num-frames": "0"}, "--num-frames must be an int >= 1, got 0"),
    ({"--output": "{file}/video.mp4"}, "not a writable directory"),
    ({"--lora": "{tmp}/weights.bin"}, ".safetensors"),
    ({"--lora": "{tmp}/missing.safetensors"}, "does not exist"),
    ({"--model": "someone/some-model"}, "hub ids are not supported"),
    ({"--model": "{tmp}"}, "is not a loadable diffusers pipeline folder"),  # a folder without model_index.json
    ({"--height": "70"}, "--height must be a positive multiple of 8"),
]


def test_generate_bad_inputs_exit_2_without_output(tmp_path):
    # All cases run concurrently (each process spends most of its time importing torch).
    started = []
    for index, (override, message) in enumerate(BAD_INPUTS):
        case = tmp_path / f"case{index}"
        case.mkdir()
        blocker = case / "a-file"
        blocker.write_text("x")
        (case / "weights.bin").write_bytes(b"\0")
        options = {"--num-frames": "5", "--height": "64", "--width": "64", "--steps": "1",
                   "--output": str(case / "out.mp4")}
        options.update({k: v.format(file=blocker, tmp=case) for k, v in override.items()})
        command = [sys.executable, "-m", "diffattn.cli", "generate", *[x for item in options.items() for x in item]]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
        started.append((override, message, case, process))
    for override, message, case, process in started:
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 2, (override, stderr)
        errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and message in errors[0], (override, stderr)
        assert "Traceback" not in stderr, (override, stderr)
        assert sorted(p.name for p in case.iterdir()) == ["a-file", "weights.bin"], override  # no output, no temp file


def test_bench_forwards_to_kernel_benchmark(tmp_path):
    # From outside the repository: the benchmark is package code, not a script of a checkout.
    result = run("bench", "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "--shapes" in result.stdout and "usage: diffattn bench" in result.stdout


def refused_kernel_call(options=None) -> None:
    """A sparse call the kernel refuses for several reasons (dtype and shapes): its UserError
    message is a headline and one line per reason."""
    layout = Dense().layout(VideoGrid(1, 4, 8), block_size=32)
    q = torch.randn(1, 2, 32, 16, dtype=torch.float64)
    block_sparse_attention(q, q, q[..., :8], layout, backend="cpu")


def test_multi_line_user_error_is_printed_whole_with_exit_2(tmp_path, capsys, monkeypatch):
    with pytest.raises(ValueError) as refusal:
        refused_kernel_call()
    message = str(refusal.value)
    assert len(message.splitlines()) > 3
    # As if the refusal came from the middle of a generation.
    monkeypatch.setattr(diffattn.runs, "generate", refused_kernel_call)
    code = main(["generate", "--output", str(tmp_path / "out.mp4")])
    assert code == 2
    assert capsys.readouterr().err == f"error: {message}\n"


@pytest.mark.parametrize("bug", [ValueError("bug: a plain ValueError"), OSError("bug: an OSError"),
                                 RuntimeError("bug: a RuntimeError")])
def test_internal_errors_propagate(tmp_path, monkeypatch, capsys, bug):
    # Only UserError is the user's fault; anything else raised below the CLI is a bug in diffattn
    # and must reach Python's handler with its traceback, not become a tidy "error:" line.
    def broken(options):
        raise bug

    monkeypatch.setattr(diffattn.profiler.command, "prepare_run", broken)
    with pytest.raises(type(bug), match="bug: "):
        main(["profile", "--report", str(tmp_path / "report.json")])
    assert "error:" not in capsys.readouterr().err


def test_internal_error_through_the_interpreter_gives_traceback_and_exit_1(tmp_path):
    code = ("import sys, diffattn.profiler.command\n"
            "def broken(options):\n"
            "    raise ValueError('bug: not the user\\'s fault')\n"
            "diffattn.profiler.command.prepare_run = broken\n"
            "from diffattn.cli import main\n"
            "sys.exit(main())\n")
    result = subprocess.run([sys.executable, "-c", code, "profile", "--report", str(tmp_path / "r.json")],
                            capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 1, result.stderr
    assert "Traceback" in result.stderr and "ValueError: bug: not the user's fault" in result.stderr
    assert "error: " not in result.stderr


# The tiny model's ops are far too small for intra-op threads; on a busy machine their spin-waits
# make every run many times slower (and noisier), so the profile runs use one thread.
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}
PROFILE_SIZE = ("--num-frames", "5", "--height", "32", "--width", "32", "--steps", "2")
PROFILE_KEYS = {"e2e_speedup", "attention_share", "attention_speedup", "density", "density_per_layer",
                "amdahl_bound", "predicted_e2e", "psnr", "ssim", "device", "dtype", "preset", "family",
                "timings", "tile_density", "grid", "num_frames", "height", "width"}


def test_profile_dense_preset_writes_json_markdown_and_chart(tmp_path):
    report = tmp_path / "reports" / "dense.json"
    result = run("profile", *PROFILE_SIZE, "--warmup", "1", "--repeats", "3", "--report", str(report),
                 script=True, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr
    data = json.loads(report.read_text())
    assert PROFILE_KEYS <= set(data) == {f.name for f in dataclasses.fields(ProfileReport)}
    assert (data["preset"], data["family"], data["device"], data["num_frames"]) == ("dense", "wan", "cpu", 5)
    assert data["psnr"] == "inf" and data["ssim"] == 1.0 and data["density"] == 1.0
    assert 0.5 < data["e2e_speedup"] < 2.0  # same work twice: 1 up to timing noise
    assert len(data["timings"]["dense_seconds"]) == 3
    markdown = report.with_suffix(".md").read_text()
    assert "| end-to-end speedup |" in markdown and "inf dB (identical frames)" in markdown
    assert markdown in result.stdout  # the printed table is the Markdown file
    assert report.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in report.parent.iterdir()) == ["dense.json", "dense.md", "dense.png"]


def test_profile_with_a_yaml_preset_reports_sparsity(tmp_path):
    preset = tmp_path / "window.yaml"
    preset.write_text("description: tiny window\npattern:\n  type: neighborhood\n  kernel_size: [1, 3, 3]\n"
                      "block_size: 32\n")
    report = tmp_path / "window.json"
    result = run("profile", "--preset", str(preset), "--num-frames", "2", "--height", "32", "--width", "32",
                 "--steps", "2", "--warmup", "0", "--report", str(report), env=ONE_THREAD)
    assert result.returncode == 0, result.stderr
    data = json.loads(report.read_text())
    assert data["preset"] == "window" and data["grid"]["num_tokens"] == 32
    # 2 steps x 2 forwards (CFG) x 6 layers of the embedded model
    assert data["density"] < 1 and data["sparse_calls"] == data["attention_calls"] == 24
    assert isinstance(data["psnr"], float) and data["ssim"] < 1
    assert "| PSNR vs dense |" in result.stdout and "wrote " in result.stdout


PROFILE_BAD_INPUTS = [
    ({"--report": "{tmp}/report.txt"}, "--report must end in .json"),
    ({"--report": "{file}/report.json"}, "not a writable directory"),
    ({"--warmup": "-1"}, "--warmup must be an integer >= 0; got -1"),
    ({"--repeats": "0"}, "--repeats must be an integer >= 1; got 0"),
    ({"--preset": "no-such-preset"}, "unknown preset"),
]


@pytest.mark.parametrize("override, message", PROFILE_BAD_INPUTS)
def test_profile_bad_inputs_exit_2_without_report(tmp_path, capsys, override, message):
    # In process (main() is the console entry point's function): each case fails before any model
    # is built, so a subprocess per case would only add its imports; the test below goes through
    # the real console script once.
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    options = {"--num-frames": "5", "--height": "32", "--width": "32", "--steps": "1",
               "--report": str(tmp_path / "report.json")}
    options.update({k: v.format(file=blocker, tmp=tmp_path) for k, v in override.items()})
    code = main(["profile", *[x for item in options.items() for x in item]])
    stderr = capsys.readouterr().err
    assert code == 2, (override, stderr)
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], (override, stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"], override  # no report, no temp file


def test_profile_bad_input_through_the_console_script(tmp_path):
    report = tmp_path / "report.json"
    result = run("profile", "--width", "70", "--report", str(report), script=True)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "multiple of 8" in errors[0] and "Traceback" not in result.stderr
    assert not report.exists() and list(tmp_path.iterdir()) == []


def test_eval_embedded_writes_report_and_contact_sheet(tmp_path):
    report = tmp_path / "eval.json"
    result = run("eval-embedded", "--num-captions", "2", "--num-frames", "5", "--steps", "2", "--batch-size", "2",
                 "--probes", "--report", str(report), script=True, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr
    data = json.loads(report.read_text())
    for key in ("adherence", "motion_deviation_px", "adherence_by_check", "ground_truth", "targets_met", "videos"):
        assert key in data
    assert 0.0 <= data["adherence"] <= 1.0 and len(data["videos"]) == 2
    assert data["ground_truth"]["adherence"] == 1.0  # the detector itself on the true clips
    assert report.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "adherence" in result.stdout and "targets" in result.stdout
    profile = data["denoising_profile"]
    assert len(profile["adherence"]) == len(profile["sigmas"]) == len(profile["x0_mse"])
    assert profile["num_captions"] == 2
    assert "adherence by noise level: 0.05:" in result.stdout
    probe = data["caption_sensitivity"]
    assert set(probe["mean_abs_change"]) == {"colour", "shape", "direction"}
    assert len(probe["direction_following_px_per_frame"]) == len(probe["sigmas"])
    assert "caption words read at sigma 1, 0.9: estimate change colour" in result.stdout


@pytest.mark.parametrize("override, message", [
    ({"--report": "{tmp}/eval.txt"}, "--report must be a .json path"),
    ({"--size": "70"}, "--height must be a positive multiple of 8"),
    ({"--num-captions": "0"}, "--num-captions must be an int >= 1, got 0"),
    ({"--model": "{tmp}"}, "no embedded model"),
    ({"--preset": "no-such-preset"}, "unknown preset"),
])
def test_eval_embedded_bad_inputs_exit_2(tmp_path, capsys, override, message):
    options = {"--report": str(tmp_path / "eval.json")}
    options.update({k: v.format(tmp=tmp_path) for k, v in override.items()})
    code = main(["eval-embedded", *[x for item in options.items() for x in item]])
    stderr = capsys.readouterr().err
    assert code == 2, (override, stderr)
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], (override, stderr)
    assert list(tmp_path.iterdir()) == [], override
