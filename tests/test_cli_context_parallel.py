"""``torchrun --nproc-per-node 2 -m diffattn.cli generate|profile ... --ulysses-degree 2`` on the CPU.

diffusers refuses context parallelism on a machine without an accelerator; the two ranks here get
a test-only ``sitecustomize`` (written into the test's temporary folder and put first on
``PYTHONPATH``) that stands in for ``torch.accelerator.device_count`` and
``torch._C._get_accelerator`` (one CPU device), so they run diffusers' Ulysses code over gloo. The
reference is the same command in one process.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest

from diffattn.cli import main

REPO = Path(__file__).resolve().parents[1]

SHIM = """\
import torch
torch.accelerator.device_count = lambda: 1
torch._C._get_accelerator = lambda: torch.device("cpu")
"""

# Sparse from the first step and in every layer, so that the run really exercises the kernel.
PRESET = """\
description: neighbourhood (3, 3, 3), sparse from the first step (test preset)
pattern:
  type: neighborhood
  kernel_size: [3, 3, 3]
dense_steps: 0
dense_layers: []
block_size: 32
"""

SIZE = ["--num-frames", "9", "--height", "32", "--width", "32", "--steps", "3", "--prompt", "a red circle moves left"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    (tmp_path / "shim").mkdir(exist_ok=True)
    (tmp_path / "shim" / "sitecustomize.py").write_text(SHIM)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "shim"), str(REPO)])}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(_free_port()), "-m", "diffattn.cli", *args, "--ulysses-degree", "2"]
    return subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300, env=env)


@pytest.fixture
def preset(tmp_path):
    path = tmp_path / "sparse.yaml"
    path.write_text(PRESET)
    return str(path)


def test_generate_under_ulysses_matches_one_process(tmp_path, preset, capsys):
    result = torchrun(tmp_path, "generate", "--preset", preset, *SIZE, "--output", str(tmp_path / "cp.gif"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert main(["generate", "--preset", preset, *SIZE, "--output", str(tmp_path / "one.gif")]) == 0
    one = capsys.readouterr().out
    # Rank 0 alone prints and writes; 3 steps x 2 CFG passes x 6 blocks of the embedded model, all sparse.
    lines = [line for line in result.stdout.splitlines() if line.startswith("wrote")]
    assert len(lines) == 1 and "36 sparse attention calls" in lines[0] and "36 sparse attention calls" in one
    frames_cp = iio.imread(tmp_path / "cp.gif").astype(int)
    frames_one = iio.imread(tmp_path / "one.gif").astype(int)
    assert frames_cp.shape == frames_one.shape and np.abs(frames_cp - frames_one).max() <= 1
    assert "DenseFallbackWarning" not in result.stderr


def test_profile_under_ulysses_reports_each_rank(tmp_path, preset):
    report = tmp_path / "report.json"
    result = torchrun(tmp_path, "profile", "--preset", preset, *SIZE, "--warmup", "0", "--report", str(report))
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = sorted(re.findall(r"rank (\d)/2: attention [\d.]+ s dense, [\d.]+ s sparse", result.stderr))
    assert ranks == ["0", "1"]
    assert report.is_file() and result.stdout.count("wrote ") == 1


def test_ulysses_degree_without_torchrun_is_a_clear_error(tmp_path, capsys):
    assert main(["generate", *SIZE, "--output", str(tmp_path / "out.gif"), "--ulysses-degree", "2"]) == 2
    message = capsys.readouterr().err
    assert "torchrun --nproc-per-node 2" in message and "WORLD_SIZE" in message
