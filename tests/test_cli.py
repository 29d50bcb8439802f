"""The ``diffattn`` console entry point, run as a subprocess (what users run)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import imageio.v2 as imageio

from diffattn.processors.presets import families

REPO = Path(__file__).resolve().parents[1]
SCRIPT = Path(sys.executable).parent / "diffattn"


def run(*args: str, cwd: Path | None = None, script: bool = False) -> subprocess.CompletedProcess:
    command = [str(SCRIPT)] if script and SCRIPT.is_file() else [sys.executable, "-m", "diffattn.cli"]
    return subprocess.run(command + list(args), capture_output=True, text=True, cwd=cwd or REPO, timeout=300)


def count_frames(path: Path) -> int:
    with imageio.get_reader(path) as reader:
        return sum(1 for _ in reader)


def test_generate_writes_video_with_requested_frames(tmp_path):
    out = tmp_path / "sub" / "video.mp4"
    result = run("generate", "--num-frames", "9", "--height", "64", "--width", "64", "--steps", "2",
                 "--prompt", "a red ball", "--output", str(out), script=True)
    assert result.returncode == 0, result.stderr
    assert count_frames(out) == 9
    assert "preset wan/dense" in result.stdout and "layout density 1.0000" in result.stdout
    assert "RANDOMLY INITIALISED" in result.stderr
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
    ({"--num-frames": "10"}, "1 + 4k"),
    ({"--output": "{file}/video.mp4"}, "not a writable directory"),
    ({"--lora": "{tmp}/weights.bin"}, ".safetensors"),
    ({"--model": "someone/some-model"}, "hub ids are not supported"),
    ({"--height": "70"}, "multiple of 16"),
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


def test_bench_forwards_to_kernel_benchmark():
    result = run("bench", "--help")
    assert result.returncode == 0, result.stderr
    assert "--shapes" in result.stdout and "diffattn bench" in result.stdout
