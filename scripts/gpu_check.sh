#!/usr/bin/env bash
# One command for a machine with an NVIDIA GPU: install diffattn, run the GPU kernel tests and the
# full kernel tests, then the kernel benchmark, and leave everything in benchmarks/results/:
#
#   <gpu>-<date>.nvidia-smi.txt      nvidia-smi, torch / triton / CUDA versions
#   <gpu>-<date>.pytest-cuda.log     pytest -m cuda tests/kernels -x -q
#   <gpu>-<date>.pytest-kernels.log  pytest tests/kernels -q (CPU path, reference, Triton on CUDA)
#   <gpu>-<date>.bench.log           stdout/stderr of the benchmark
#   <gpu>-<date>.json / .md          benchmark results (written by scripts/bench_kernels.py)
#
# <gpu> is torch.cuda.get_device_name() lower-cased with runs of other characters turned into
# "-" (the same slug bench_kernels.py uses), <date> is today's local date (YYYY-MM-DD).
#
# Usage:  scripts/gpu_check.sh            (PYTHON=/path/to/python to pick an interpreter)
#         BENCH_ARGS='--only Wan2.1-1.3B --repeats 10' STEP_TIMEOUT=240 scripts/gpu_check.sh
# Assumes a CUDA build of torch is already installed in that interpreter's environment; pip
# only adds what is missing, and is skipped when diffattn and the test tools already import (an
# offline machine with the dependencies on PYTHONPATH). BENCH_ARGS go to bench_kernels.py;
# STEP_TIMEOUT (seconds, 0 = none) bounds each test and benchmark step on a short lease. Every
# step runs even if an earlier one fails; the exit status is non-zero if any step failed.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python}"
OUT_DIR="benchmarks/results"
# Tests must compile real kernels, never fall back to Triton's CPU interpreter.
unset TRITON_INTERPRET

die() { echo "gpu_check: $*" >&2; exit 2; }

command -v nvidia-smi >/dev/null 2>&1 || die "nvidia-smi not found: this script needs an NVIDIA GPU and driver"
"$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || die "torch in $PYTHON cannot see a CUDA GPU (install a CUDA build of torch first)"

STEP_TIMEOUT="${STEP_TIMEOUT:-0}"
read -r -a BENCH_EXTRA <<< "${BENCH_ARGS:-}"
if "$PYTHON" -c "import diffattn, diffusers, pytest, hypothesis" >/dev/null 2>&1; then
    echo "== diffattn and the test tools import: no pip install"
else
    echo "== pip install -e .[test]"
    "$PYTHON" -m pip install -e ".[test]" || die "pip install -e .[test] failed"
fi

GPU_SLUG="$("$PYTHON" -c '
import re, torch
print(re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(0).lower()).strip("-"))
')" || die "cannot read the GPU name"
STEM="$OUT_DIR/$GPU_SLUG-$(date +%F)"
mkdir -p "$OUT_DIR"
echo "== results go to $STEM.*"

failed=()

{
    nvidia-smi
    "$PYTHON" -c '
import platform, torch
try:
    import triton
    triton_version = triton.__version__
except Exception as exc:  # report, do not stop
    triton_version = f"unavailable ({exc!r})"
print(f"python {platform.python_version()}  torch {torch.__version__}  CUDA {torch.version.cuda}  triton {triton_version}")
print(f"device 0: {torch.cuda.get_device_name(0)}  capability {torch.cuda.get_device_capability(0)}")
'
} 2>&1 | tee "$STEM.nvidia-smi.txt"

echo "== pytest -m cuda tests/kernels -x -q"
timeout "$STEP_TIMEOUT" "$PYTHON" -m pytest -m cuda tests/kernels -x -q 2>&1 | tee "$STEM.pytest-cuda.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || failed+=("pytest -m cuda tests/kernels")

echo "== pytest tests/kernels -q"
timeout "$STEP_TIMEOUT" "$PYTHON" -m pytest tests/kernels -q 2>&1 | tee "$STEM.pytest-kernels.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || failed+=("pytest tests/kernels")

echo "== python scripts/bench_kernels.py --device cuda --shapes reference --out $OUT_DIR ${BENCH_EXTRA[*]}"
timeout "$STEP_TIMEOUT" "$PYTHON" scripts/bench_kernels.py --device cuda --shapes reference --out "$OUT_DIR" "${BENCH_EXTRA[@]}" 2>&1 | tee "$STEM.bench.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || failed+=("bench_kernels.py")

echo
ls -l "$STEM".* 2>/dev/null
if [ "${#failed[@]}" -ne 0 ]; then
    printf 'gpu_check: FAILED: %s\n' "${failed[@]}" >&2
    exit 1
fi
echo "gpu_check: all steps passed"
