#!/usr/bin/env python3
"""Thin wrapper of ``diffattn train-lora`` (the logic is :mod:`diffattn.training`), for
``accelerate launch scripts/train_lora.py ...`` or a checkout without the package installed.

    python scripts/train_lora.py --preset radial --num-frames 65 --steps 200 --output runs/lora65
    accelerate launch --num_processes 2 scripts/train_lora.py --preset radial --output runs/lora65
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from diffattn.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train-lora", *sys.argv[1:]]))
