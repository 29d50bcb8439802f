"""research/embedded/explore_recipes.py: argument checks and a tiny two-variant run."""

from __future__ import annotations

import json

import pytest

from diffattn.pipelines.eval_embedded import TUNING_SEED
from research.embedded import explore_recipes as script

TINY = ("--steps 2 --batch-size 1 --num-frames 3 --size 16 --num-layers 1 --num-attention-heads 2 "
        "--attention-head-dim 24 --ffn-dim 32 --warmup 1")


@pytest.mark.parametrize("variants, message", [
    (["no-flags-separator"], "must be NAME=FLAGS"),
    (["a=--steps 2", "a=--steps 3"], "given twice"),
    (["bad/name=--steps 2"], "must be NAME=FLAGS"),
])
def test_bad_variants_are_refused(variants, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        script.parse_args([x for v in variants for x in ("--variant", v)] + ["--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_tiny_run_scores_finished_variants_and_reports_failed_ones(tmp_path):
    assert script.main(["--variant", f"tiny={TINY}", "--variant", "broken=--steps 0", "--out", str(tmp_path),
                        "--num-captions", "1", "--guidance", "1.0", "--threads", "1", "--deadline-min", "5"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary) == {"tiny", "broken"}
    scores = summary["tiny"]["guidance"]["1.0"]
    assert 0.0 <= scores["adherence"] <= 1.0
    assert (tmp_path / "tiny.json").is_file() and (tmp_path / "tiny.png").is_file()
    assert json.loads((tmp_path / "tiny.json").read_text())["caption_seed"] == TUNING_SEED  # never the reported stream
    assert "exited with 2" in summary["broken"]["error"]
