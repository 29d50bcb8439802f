"""``diffattn.profile`` on a tiny embedded pipeline (random weights, a few steps, tiny sizes)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

import diffattn
from diffattn import Neighborhood, ProfileReport, SparsityConfig, VideoGrid
from diffattn.adapters import sparsity_state
from diffattn.processors import WanSparseAttnProcessor

from ..pipelines.tiny_embedded import tiny_embedded_pipeline
from ..threads import one_thread  # noqa: F401 (autouse fixture)


@pytest.fixture(scope="module")
def pipe():
    return tiny_embedded_pipeline()


@pytest.fixture(scope="module")
def call():
    # Pixel patches of 8: 2 frames at 16x16 px are a 2x2x2 token grid.
    return dict(prompt="a red circle moves left", num_frames=2, height=16, width=16, num_inference_steps=2)


@pytest.fixture(scope="module")
def dense_report(pipe, call) -> ProfileReport:
    return diffattn.profile(pipe, "dense", warmup=1, repeats=3, **call)


# Neighborhood (1, 3, 3) on 32-token blocks: a 2x4x4 grid at 32x32 px is sparse inside its one
# block; step 0 and layer 0 stay dense, so both kinds of calls occur.
SPARSE = SparsityConfig(pattern=Neighborhood(kernel_size=(1, 3, 3)), block_size=32, dense_steps=1, dense_layers=(0,))


@pytest.fixture(scope="module")
def sparse_report(pipe, call) -> ProfileReport:
    return diffattn.profile(pipe, SPARSE, warmup=1, seed=3,
                            **{**call, "height": 32, "width": 32, "num_inference_steps": 3})


def finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def test_every_field_is_documented(dense_report):
    doc = ProfileReport.__doc__
    for field in dataclasses.fields(ProfileReport):
        assert f"{field.name}:" in doc or f"{field.name}," in doc, field.name


def test_dense_preset_is_identical_to_the_dense_run(dense_report):
    r = dense_report
    assert (r.family, r.preset, r.device, r.dtype) == ("wan", "dense", "cpu", "float32")
    assert (r.num_frames, r.height, r.width, r.num_inference_steps) == (2, 16, 16, 2)
    assert r.grid == dict(frames=2, height=2, width=2, text_tokens=0, num_tokens=8)
    assert r.psnr == math.inf and r.ssim == 1.0
    # The dense preset keeps every layer dense (stock processors): no sparse call, no layout.
    assert r.density == 1.0 and r.layout_density is None and r.tile_density is None and r.sparse_calls == 0
    assert r.density_per_layer == {0: 1.0, 1: 1.0}
    assert r.amdahl_bound == pytest.approx(1.0)
    # Timing noise on a shared CPU (medians of 3 runs of ~50 ms): loose bands around 1.
    assert 0.5 < r.e2e_speedup < 2.0
    assert 0.33 < r.attention_speedup < 3.0
    assert 0.0 < r.attention_share < 1.0
    # 2 steps x 2 CFG forwards x 2 blocks, every one through the stock processor (timed SDPA).
    assert (r.attention_calls, r.sparse_calls, r.dense_calls, r.untimed_calls) == (8, 0, 8, 0)
    assert r.dense_fraction == 1.0  # all attention time is in calls the preset keeps dense


def test_timings_hold_every_repeat_and_the_medians(dense_report):
    r = dense_report
    assert r.warmup == 1 and r.repeats == 3
    for key in ("dense_seconds", "sparse_seconds", "dense_attention_seconds", "sparse_attention_seconds"):
        values = r.timings[key]
        assert len(values) == 3 and all(finite(v) and v > 0 for v in values), key
        assert getattr(r, key) == sorted(values)[1]  # the median
    assert r.dense_attention_seconds < r.dense_seconds
    assert r.attention_share == pytest.approx(r.dense_attention_seconds / r.dense_seconds)
    assert r.e2e_speedup == pytest.approx(r.dense_seconds / r.sparse_seconds)


def test_sparse_preset_counts_sparse_and_dense_calls(sparse_report):
    r = sparse_report
    assert r.preset == "custom" and r.pattern.startswith("Neighborhood(kernel_size=(1, 3, 3)")
    assert r.grid["num_tokens"] == 32 and r.seed == 3
    # 3 steps x 2 CFG x 2 blocks = 12 calls; step 0 (4 calls) and block 0 (2 more steps x 2) stay dense.
    assert (r.attention_calls, r.sparse_calls, r.dense_calls, r.untimed_calls) == (12, 4, 8, 0)
    assert 0 < r.layout_density < 1 and r.layout_density <= r.tile_density <= 1
    grid = VideoGrid(r.grid["frames"], r.grid["height"], r.grid["width"])
    layout = Neighborhood(kernel_size=(1, 3, 3)).layout(grid, block_size=r.block_size)
    assert r.layout_nbytes == layout.nbytes > 0
    assert f"| layout memory (sparse calls) | {layout.nbytes / 1024:.1f} KiB |" in r.to_markdown()  # < 1 MiB
    assert r.density == pytest.approx((8 + 4 * r.layout_density) / 12)
    assert r.density < 1
    assert r.density_per_layer[0] == 1.0
    assert r.density_per_layer[1] == pytest.approx((2 + 4 * r.layout_density) / 6)
    assert finite(r.psnr) and 0 < r.ssim < 1
    assert 0 < r.dense_fraction < 1
    for name in ("e2e_speedup", "attention_share", "attention_speedup", "predicted_e2e", "amdahl_bound"):
        assert finite(getattr(r, name)) and getattr(r, name) > 0, name


def test_speedup_fields_follow_their_formulas(sparse_report):
    r = sparse_report
    s, f = r.attention_share, r.dense_fraction
    assert r.amdahl_bound == pytest.approx(1 / ((1 - s) + s * (f + (1 - f) * r.layout_density)))
    assert r.predicted_e2e == pytest.approx(1 / ((1 - s) + s / r.attention_speedup))
    assert r.attention_speedup == pytest.approx(r.dense_attention_seconds / r.sparse_attention_seconds)
    assert 1.0 < r.amdahl_bound


def test_report_serialises(sparse_report, dense_report, tmp_path):
    data = json.loads(dense_report.to_json())
    assert data["psnr"] == "inf" and data["density_per_layer"] == {"0": 1.0, "1": 1.0}
    assert set(data) == {f.name for f in dataclasses.fields(ProfileReport)}
    assert json.loads(sparse_report.to_json())["psnr"] == pytest.approx(sparse_report.psnr)
    markdown = sparse_report.to_markdown()
    assert "| end-to-end speedup |" in markdown and "| Amdahl bound" in markdown and "| PSNR vs dense |" in markdown
    paths = sparse_report.save(tmp_path / "out" / "report.json")
    assert [p.name for p in paths] == ["report.json", "report.md", "report.png"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["report.json", "report.md", "report.png"]
    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert paths[1].read_text() == markdown


def test_processors_are_restored(pipe, call):
    stock = {name: type(p) for name, p in pipe.transformer.attn_processors.items()}
    diffattn.profile(pipe, "radial", warmup=0, **{**call, "num_inference_steps": 1})
    assert {name: type(p) for name, p in pipe.transformer.attn_processors.items()} == stock
    assert sparsity_state(pipe) is None

    # A configuration applied before profiling is applied again afterwards, without an observer.
    diffattn.apply(pipe, SPARSE)
    try:
        diffattn.profile(pipe, "dense", warmup=0, **{**call, "num_inference_steps": 1})
        state = sparsity_state(pipe)
        assert state.config == SPARSE and state.observer is None
        assert isinstance(pipe.transformer.blocks[1].attn1.processor, WanSparseAttnProcessor)
    finally:
        diffattn.remove(pipe)


@pytest.mark.parametrize("arguments, message", [
    (dict(preset="no-such-preset"), "unknown preset 'no-such-preset' for model family 'wan'; available: dense"),
    (dict(preset=3), "preset must be a preset name"),
    (dict(warmup=-1), "warmup must be an integer >= 0; got -1"),
    (dict(repeats=0), "repeats must be an integer >= 1; got 0"),
    (dict(generator=None), "use seed="),
    (dict(output_type="pil"), "output_type"),
])
def test_bad_arguments(pipe, call, arguments, message):
    arguments = {"preset": "dense", **arguments}
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        diffattn.profile(pipe, arguments.pop("preset"), **{**call, **arguments})
    assert sparsity_state(pipe) is None
