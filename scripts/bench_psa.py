"""Pyramid Sparse Attention numbers (kernel speed and planning cost at N = 16,384, importance
estimates and fidelity on the embedded model): a thin wrapper of :mod:`diffattn.profiler.bench_psa`.

    python scripts/bench_psa.py                      # all parts -> benchmarks/results/psa-*-cpu-2026-12-07.*
    python scripts/bench_psa.py --parts kernel
    python scripts/bench_psa.py --parts small [--compete]   # N = 2,112 (the embedded model), plan + call
"""

from __future__ import annotations

import sys
from pathlib import Path

# Runs from a source checkout without an install.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffattn.profiler.bench_psa import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(prog="python scripts/bench_psa.py"))
