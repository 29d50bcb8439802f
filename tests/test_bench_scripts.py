"""Bookkeeping of the kernel benchmark (diffattn.profiler.bench_kernels) that a GPU run depends on
(the timings need a device), and its two entry points: ``diffattn bench`` and the script wrapper."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from diffattn.kernels import block_sparse_attention
from diffattn.profiler import bench_kernels

REPO = Path(__file__).resolve().parents[1]


def test_flex_fallbacks_group_rows_by_non_default_options():
    small = bench_kernels.FLEX_SMALL_TILES
    rows = [
        {"shape": "S", "pattern": "Dense", "flex_kernel_options": small},
        {"shape": "S", "pattern": "Radial", "flex_kernel_options": None},
        {"shape": "T", "pattern": "Dense", "flex_kernel_options": small},
        {"shape": "T", "pattern": "Radial"},
    ]
    assert bench_kernels.flex_fallbacks(rows) == {str(small): ["S / Dense", "T / Dense"]}
    assert bench_kernels.flex_fallbacks(rows[1:2]) == {}


def test_committed_h100_report_says_flex_used_small_tiles():
    report = REPO / "benchmarks" / "results" / "nvidia-h100-80gb-hbm3-2026-11-22"
    data = json.loads(report.with_suffix(".json").read_text())
    markdown = bench_kernels.markdown(data["meta"], data["results"])
    assert markdown == report.with_suffix(".md").read_text()
    assert "kernel_options=" in markdown and "read 'vs Flex' accordingly" in markdown


def test_timed_backend_is_what_auto_dispatch_runs_on_cpu():
    # The benchmark names its backend explicitly (so a report says what it timed); on the CPU that
    # must be the kernel block_sparse_attention's "auto" picks, or the numbers would describe
    # something users never run.
    shape = bench_kernels.SMALL_SHAPES[0]
    layout = bench_kernels.patterns_for(shape)[1][1].layout(shape.grid, block_size=bench_kernels.BLOCK)
    q, k, v = (torch.randn(1, 2, shape.grid.num_tokens, 32, generator=torch.Generator().manual_seed(i))
               for i in range(3))
    backend = bench_kernels.kernel_backend(torch.device("cpu"))
    assert torch.equal(block_sparse_attention(q, k, v, layout, backend=backend),
                       block_sparse_attention(q, k, v, layout))


def test_cpu_benchmark_writes_report(tmp_path):
    # The smallest real run: one shape, forward only, no FlexAttention compile, 1 round.
    code = bench_kernels.main(["--device", "cpu", "--only", "^small 8x16x16$", "--no-backward", "--no-flex",
                               "--repeats", "1", "--warmup", "0", "--out", str(tmp_path)])
    assert code == 0
    (report,) = tmp_path.glob("*.json")
    data = json.loads(report.read_text())
    assert data["meta"]["backend"] == "cpu" and len(data["results"]) == 4
    assert {row["pattern"] for row in data["results"]} >= {"Dense", "Radial"}
    assert all(row["fwd_ms"] > 0 for row in data["results"])
    assert report.with_suffix(".md").read_text().startswith("# Kernel benchmark: cpu")


def test_script_wrapper_runs_the_package_benchmark():
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_kernels.py"), "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "python scripts/bench_kernels.py" in result.stdout and "--shapes" in result.stdout
