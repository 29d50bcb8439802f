"""Bookkeeping of scripts/bench_kernels.py that a GPU run depends on (the timings need a device)."""

from __future__ import annotations

import json
from pathlib import Path

from .scripts import load_script

REPO = Path(__file__).resolve().parents[1]
bench_kernels = load_script("bench_kernels")


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
