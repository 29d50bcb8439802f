"""Kernel benchmark (block-sparse attention vs SDPA, FlexAttention and our dense kernel): a thin
wrapper of ``diffattn bench``, whose code is :mod:`diffattn.profiler.bench_kernels`.

    python scripts/bench_kernels.py --device cpu --shapes small
    python scripts/bench_kernels.py --device cuda --shapes reference
"""

from __future__ import annotations

import sys
from pathlib import Path

# Runs from a source checkout without an install (scripts/gpu_check.sh calls it that way).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffattn.profiler.bench_kernels import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(prog="python scripts/bench_kernels.py"))
