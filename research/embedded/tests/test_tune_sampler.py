"""research/embedded/tune_sampler.py: setting parsing and a tiny run on a saved random pipeline."""

from __future__ import annotations

import json

import pytest

from diffattn.pipelines.embedded import DEFAULT_CALL
from diffattn.pipelines.eval_embedded import PROFILE_SIGMAS
from research.embedded import tune_sampler as script
from tests.pipelines.tiny_embedded import tiny_embedded_pipeline


def test_settings_parse_into_typed_values():
    assert script.parse_setting("guidance=4.5,steps=10,sampler=euler") == {"guidance": 4.5, "steps": 10,
                                                                          "sampler": "euler"}
    assert script.parse_setting("sampler=stochastic") == {"sampler": "stochastic"}


@pytest.mark.parametrize("setting, message", [
    ("guidance", "must be key=value with key one of ('guidance', 'steps', 'sampler')"),
    ("lag=0.5", "must be key=value with key one of"),
    ("shift=3", "must be key=value with key one of"),
    ("steps=0", "steps='0' must be a positive integer"),
    ("guidance=high", "guidance='high' must be a number"),
    ("sampler=ddim", "sampler='ddim' must be stochastic or euler"),
    ("steps=2,steps=3", "gives 'steps' twice"),
])
def test_bad_settings_exit_2_with_the_reason(setting, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        script.parse_args(["--setting", setting, "--out", str(tmp_path / "out.json")])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_tiny_run_scores_each_setting_and_the_denoising_profile(tmp_path):
    model = tmp_path / "model"
    tiny_embedded_pipeline().save_pretrained(model)
    out = tmp_path / "sampler.json"
    assert script.main(["--model", str(model), "--out", str(out), "--num-captions", "2", "--batch-size", "2",
                        "--setting", "guidance=1,steps=1,sampler=euler", "--setting", "steps=2"]) == 0
    result = json.loads(out.read_text())
    first, second = result["settings"]
    assert (first["guidance"], first["steps"], first["sampler"]) == (1.0, 1, "euler")
    assert (second["steps"], second["sampler"]) == (2, result["model_sampler"])
    assert second["guidance"] == DEFAULT_CALL["guidance_scale"]
    assert all(0.0 <= entry["adherence"] <= 1.0 for entry in (first, second))
    assert result["denoising_profile"]["sigmas"] == list(PROFILE_SIGMAS)
