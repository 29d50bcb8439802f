#!/usr/bin/env bash
# Does a wheel built from this checkout work on its own, away from the source tree?
#
# 1. Copies the checkout's files (tracked and untracked-but-not-ignored, as they are in the working
#    tree) to a scratch folder and builds a wheel there (no stale build/ of the checkout leaks in).
# 2. Makes a fresh venv and installs the wheel into it, without dependencies.
# 3. Gives that venv the dependencies of $PYTHON's environment as a plain sys.path entry: their
#    .pth files are NOT run, so an editable install of diffattn there (`pip install -e .`) stays
#    invisible, and downloading torch again is not needed.
# 4. From a folder outside the checkout, with PYTHONPATH and DIFFATTN_CONFIGS unset, checks that
#    `import diffattn` is the installed copy, then runs `diffattn presets` (presets from the
#    wheel's data files, <venv>/share/diffattn/configs), `diffattn bench --help` (benchmark code
#    in the package) and `diffattn generate` with the embedded model (weights as package data).
#
# Usage: PYTHON=.venv/bin/python scripts/check_wheel.sh   (PYTHON: an environment with the
# dependencies installed, e.g. the CI venv; default python3). Exit 0 when every check passes.
# KEEP=1 keeps the scratch folder. Takes about a minute on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
PYTHON=$(command -v "$PYTHON")
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/diffattn-wheel.XXXXXX")
[ "${KEEP:-0}" = 1 ] || trap 'rm -rf "$SCRATCH"' EXIT
step() { printf '== %s (%ds)\n' "$*" "$SECONDS"; }

step "copy the checkout to $SCRATCH/src"
mkdir "$SCRATCH/src"
git ls-files -z --cached --others --exclude-standard \
    | (while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done) \
    | tar --null -T - -cf - | tar -xf - -C "$SCRATCH/src"

step "build the wheel"
# Without build isolation when $PYTHON can build it already (offline, faster); else pip fetches
# the build requirements of pyproject.toml.
ISOLATION=()
"$PYTHON" -c "import setuptools.build_meta" 2>/dev/null && ISOLATION=(--no-build-isolation)
"$PYTHON" -m pip wheel -q --no-deps "${ISOLATION[@]}" -w "$SCRATCH/dist" "$SCRATCH/src"
WHEEL=$(ls "$SCRATCH"/dist/diffattn-*.whl)
echo "   $(basename "$WHEEL"): $(du -k "$WHEEL" | cut -f1) KiB"

step "fresh venv, wheel installed without dependencies"
"$PYTHON" -m venv --without-pip "$SCRATCH/venv"
VENV_PY="$SCRATCH/venv/bin/python"
VENV_SITE=$("$VENV_PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
"$PYTHON" -c "import sysconfig; print(sysconfig.get_paths()['purelib']); print(sysconfig.get_paths()['platlib'])" \
    | sort -u > "$VENV_SITE/dependencies-of-the-checking-environment.pth"
"$PYTHON" -m pip --python "$VENV_PY" install -q --no-deps --no-index "$WHEEL"

step "run the installed diffattn outside the checkout"
mkdir "$SCRATCH/work"
cd "$SCRATCH/work"
unset PYTHONPATH DIFFATTN_CONFIGS
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # the tiny model's ops are too small for threads
"$VENV_PY" - "$SCRATCH/venv" <<'EOF'
import sys
from pathlib import Path

import diffattn
from diffattn.pipelines.embedded import EMBEDDED_DIR
from diffattn.processors.presets import CONFIG_DIR

venv = Path(sys.argv[1]).resolve()
for what, path in (("diffattn", Path(diffattn.__file__)), ("presets", CONFIG_DIR), ("weights", EMBEDDED_DIR)):
    assert venv in Path(path).resolve().parents, f"{what} comes from {path}, not from the installed wheel in {venv}"
    print(f"   {what}: {path}")
EOF
DIFFATTN="$SCRATCH/venv/bin/diffattn"
"$DIFFATTN" presets > presets.txt && head -2 presets.txt
grep -q "radial-fast" presets.txt
"$DIFFATTN" bench --help | grep -q "usage: diffattn bench"
"$DIFFATTN" generate --preset radial --prompt "a red circle moves left" --num-frames 5 --height 32 --width 32 \
    --steps 2 --output out/video.gif
[ -s out/video.gif ]
step "wheel check passed"
