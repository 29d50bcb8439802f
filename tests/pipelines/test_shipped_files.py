"""No shipped file (package data, presets) holds a path of the machine that made it."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
#: Roots of home, scratch and work folders on Linux and macOS, and Windows drive paths.
MACHINE_PATH = re.compile(r"(?<![\w.~])/(?:work|home|tmp|root|Users|mnt|scratch)/|\b[A-Z]:\\\\")
BINARY_SUFFIXES = {".safetensors", ".png", ".pyc"}


def shipped_files() -> list[Path]:
    """Every file a wheel installs from the repository: the package (code and data) and configs/."""
    files = [f for root in (REPO / "diffattn", REPO / "configs") for f in root.rglob("*") if f.is_file()]
    return [f for f in files if f.suffix not in BINARY_SUFFIXES and "__pycache__" not in f.parts]


def test_the_pattern_finds_machine_paths_and_nothing_else():
    for text in ('"output": "/work/main/diffattn"', "saved to /home/ana/runs", "tmp = '/tmp/x'", r"C:\\Users\\ana"):
        assert MACHINE_PATH.search(text), text
    for text in ('"output": "diffattn/pipelines/embedded_model"', "runs/embedded", "a/tmp/b", "~/tmp/x"):
        assert not MACHINE_PATH.search(text), text


def test_no_shipped_file_holds_an_absolute_machine_path():
    files = shipped_files()
    assert any(f.name == "training.json" for f in files) and any(f.suffix == ".yaml" for f in files)
    found = [f"{f.relative_to(REPO)}: {match.group(0)!r}" for f in files
             for match in [MACHINE_PATH.search(f.read_text(encoding="utf-8", errors="replace"))] if match]
    assert found == [], found
