import sys
from pathlib import Path

import pytest
import yaml

from diffattn import Radial
from diffattn.adapters import ADAPTERS, apply, remove, sparsity_state
from diffattn.processors.config import SparsityConfig
from diffattn.processors.presets import (
    CONFIG_DIR,
    INSTALLED_CONFIG_DIR,
    families,
    list_presets,
    load_preset,
    parse_preset,
)

from ..adapters.tiny_pipelines import tiny_wan_pipeline, wan_call_kwargs

REQUIRED = {"dense", "radial", "radial-fast", "neighborhood", "freeswim-window"}
# UNet images have one frame: Radial does not apply; AgentSD is their preset.
REQUIRED_UNET = {"dense", "neighborhood", "agent", "agent-fast", "tome"}


def test_every_family_ships_the_required_presets_and_they_validate():
    assert set(families()) == {adapter.family for adapter in ADAPTERS}
    for family in families():
        presets = list_presets(family)
        assert (REQUIRED_UNET if family in ("sd", "sdxl") else REQUIRED) <= {p.name for p in presets}, family
        for preset in presets:
            assert isinstance(preset.config, SparsityConfig) and preset.description


def test_shipped_files_are_plain_yaml_with_known_keys():
    for path in CONFIG_DIR.glob("*/*.yaml"):
        data = yaml.safe_load(path.read_text())
        parse_preset(data, str(path))  # raises on anything unknown


def test_radial_preset_is_paper_like():
    config = load_preset("radial", family="wan").config
    assert config.pattern == Radial(decay=1.0) and config.dense_steps == 12 and config.dense_layers == (0,)


@pytest.mark.parametrize(
    "document, needle",
    [
        ({"pattern": {"type": "dense"}}, "'description'"),
        ({"description": "x", "pattern": {"type": "sparse"}}, "pattern.type.*dense, radial, neighborhood"),
        ({"description": "x", "pattern": {"type": "radial", "width": 3}}, "pattern.width"),
        ({"description": "x", "pattern": {"type": "dense"}, "dense_step": 3}, "dense_step.*allowed"),
        ({"description": "x", "pattern": {"type": "radial", "decay": -1}}, "decay"),
        ({"description": "x", "pattern": {"type": "dense"}, "block_size": 100}, "block_size"),
        ([1, 2], "mapping"),
    ],
)
def test_bad_presets_name_the_file_and_the_key(document, needle):
    with pytest.raises(ValueError, match=f"my.yaml.*{needle}"):
        parse_preset(document, "my.yaml")


def test_unknown_names_and_missing_files(tmp_path):
    with pytest.raises(ValueError, match="unknown preset 'fastest'.*radial-fast"):
        load_preset("fastest", family="wan")
    with pytest.raises(ValueError, match="does not exist"):
        load_preset(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("description: [unclosed\n")
    with pytest.raises(ValueError, match="bad.yaml: not valid YAML"):
        load_preset(bad)


def test_apply_takes_a_preset_name_or_a_user_yaml(tmp_path):
    pipe = tiny_wan_pipeline()
    apply(pipe, "radial-fast", block_size=32)
    state = sparsity_state(pipe)
    assert state.config.pattern == Radial(decay=0.5) and state.config.block_size == 32
    user = tmp_path / "mine.yaml"
    user.write_text("description: local window\npattern:\n  type: neighborhood\n  kernel_size: [3, 3, 3]\n"
                    "block_size: 32\n")
    apply(pipe, str(user))
    try:
        pipe(**wan_call_kwargs(steps=2))
        assert sum(sparsity_state(pipe).sparse_calls.values()) == 2 * 2 * 2
    finally:
        remove(pipe)


def _tiny_pipeline(family):
    from ..adapters import test_ltx_video, tiny_cogvideox, tiny_flux, tiny_hunyuan_video, tiny_mochi, tiny_unet

    builders = {
        "wan": tiny_wan_pipeline,
        "cogvideox": tiny_cogvideox.tiny_cogvideox_pipeline,
        "flux": tiny_flux.tiny_flux_pipeline,
        "hunyuan_video": tiny_hunyuan_video.tiny_hunyuan_video_pipeline,
        "mochi": tiny_mochi.tiny_mochi_pipeline,
        "ltx_video": test_ltx_video.tiny_ltx_pipeline,
        "sd": tiny_unet.tiny_sd_pipeline,
        "sdxl": tiny_unet.tiny_sdxl_pipeline,
    }
    return builders[family]()


@pytest.mark.parametrize("family", sorted({adapter.family for adapter in ADAPTERS}))
def test_every_shipped_preset_applies_to_a_tiny_pipeline_of_its_family(family):
    pipe = _tiny_pipeline(family)
    for preset in list_presets(family):
        apply(pipe, preset.name)
        assert sparsity_state(pipe).config == preset.config
        remove(pipe)
        assert sparsity_state(pipe) is None


def test_a_wheel_installs_every_family_where_the_loader_looks_outside_a_source_tree():
    """pyproject's data-files must list each family folder of configs/ (a new family left out
    would be missing from pip-installed copies), installed at INSTALLED_CONFIG_DIR."""
    tomllib = pytest.importorskip("tomllib")
    root = Path(__file__).resolve().parents[2]
    data_files = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["data-files"]
    shipped = sorted(p.name for p in (root / "configs").iterdir() if p.is_dir())
    assert data_files == {f"share/diffattn/configs/{family}": [f"configs/{family}/*.yaml"] for family in shipped}
    assert INSTALLED_CONFIG_DIR == Path(sys.prefix) / "share" / "diffattn" / "configs"
