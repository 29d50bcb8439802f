"""Sparsity presets: YAML files in ``configs/<family>/<name>.yaml``, validated into SparsityConfig.

A preset file (``yaml.safe_load``; nothing else is ever executed or unpickled)::

    description: Radial attention, paper-like (dense warm-up and first layer)
    pattern:
      type: radial          # dense | radial | neighborhood
      decay: 1.0
    dense_steps: 12
    dense_layers: [0]
    block_size: 128

Keys: ``description`` (str, required), ``pattern`` (mapping, required), and the optional
:class:`SparsityConfig` fields ``dense_layers``, ``dense_steps``, ``dense_last_steps``,
``block_size``, ``tile_shape``, ``backend``. Errors name the file, the key and what is allowed.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..patterns import Dense, Neighborhood, Pattern, Radial
from .config import SparsityConfig

#: Where a wheel installs the presets (``[tool.setuptools.data-files]`` in pyproject.toml).
INSTALLED_CONFIG_DIR = Path(sys.prefix) / "share" / "diffattn" / "configs"


def _shipped_config_dir() -> Path:
    """The source tree's ``configs/`` (a checkout or an editable install), else the copy a wheel
    installed under ``sys.prefix``."""
    source = Path(__file__).resolve().parents[2] / "configs"
    return source if source.is_dir() else INSTALLED_CONFIG_DIR


#: Where shipped presets live (override with the ``DIFFATTN_CONFIGS`` environment variable).
CONFIG_DIR = Path(os.environ.get("DIFFATTN_CONFIGS") or _shipped_config_dir())

_PATTERN_KEYS: dict[str, tuple[type[Pattern], tuple[str, ...]]] = {
    "dense": (Dense, ()),
    "radial": (Radial, ("decay", "sink_frames", "dense_frame_distance", "block_size")),
    "neighborhood": (Neighborhood, ("kernel_size", "stride", "dilation", "causal")),
}
_CONFIG_KEYS = ("dense_layers", "dense_steps", "dense_last_steps", "block_size", "tile_shape", "backend")
_TOP_KEYS = ("description", "pattern") + _CONFIG_KEYS


@dataclass(frozen=True)
class Preset:
    """A named, described :class:`SparsityConfig` loaded from a YAML file."""

    name: str
    family: str | None
    description: str
    config: SparsityConfig
    path: Path


def _tuple_if_list(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def parse_preset(data: Any, source: str) -> tuple[str, SparsityConfig]:
    """Validate a loaded YAML document; returns ``(description, config)``.

    Raises:
        ValueError: naming ``source``, the offending key and the allowed values.
    """
    if not isinstance(data, dict):
        raise ValueError(f"{source}: a preset must be a mapping with keys {', '.join(_TOP_KEYS)}; got {type(data).__name__}")
    unknown = sorted(set(data) - set(_TOP_KEYS))
    if unknown:
        raise ValueError(f"{source}: unknown key(s) {', '.join(map(str, unknown))}; allowed: {', '.join(_TOP_KEYS)}")
    description = data.get("description")
    if not isinstance(description, str) or not description.strip():
        raise ValueError(f"{source}: key 'description' must be a non-empty string, got {description!r}")
    spec = data.get("pattern")
    if not isinstance(spec, dict) or spec.get("type") not in _PATTERN_KEYS:
        kind = spec.get("type") if isinstance(spec, dict) else spec
        raise ValueError(f"{source}: key 'pattern.type' must be one of {', '.join(_PATTERN_KEYS)}; got {kind!r}")
    cls, allowed = _PATTERN_KEYS[spec["type"]]
    extra = sorted(set(spec) - {"type", *allowed})
    if extra:
        raise ValueError(
            f"{source}: unknown key(s) {', '.join('pattern.' + str(k) for k in extra)} for pattern type "
            f"{spec['type']!r}; allowed: {', '.join(allowed) or '(none)'}"
        )
    try:
        pattern = cls(**{k: _tuple_if_list(v) for k, v in spec.items() if k != "type"})
        fields = {k: _tuple_if_list(data[k]) for k in _CONFIG_KEYS if k in data}
        config = SparsityConfig(pattern=pattern, **fields)
    except (ValueError, TypeError) as error:
        raise ValueError(f"{source}: {error}") from None
    return description.strip(), config


def load_preset_file(path: str | os.PathLike, family: str | None = None) -> Preset:
    """Load and validate one preset YAML file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"preset file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not valid YAML ({error})") from None
    description, config = parse_preset(data, str(path))
    return Preset(name=path.stem, family=family, description=description, config=config, path=path)


def families() -> list[str]:
    """Model families that ship presets."""
    return sorted(p.name for p in CONFIG_DIR.iterdir() if p.is_dir()) if CONFIG_DIR.is_dir() else []


def list_presets(family: str) -> list[Preset]:
    """Every shipped preset of ``family``, by name."""
    if family not in families():
        raise ValueError(f"family must be one of {', '.join(families())}; got {family!r}")
    return [load_preset_file(p, family) for p in sorted((CONFIG_DIR / family).glob("*.yaml"))]


def load_preset(name_or_path: str | os.PathLike, family: str | None = None) -> Preset:
    """A shipped preset by name for ``family``, or a user's YAML file by path.

    Example:
        >>> load_preset("radial", family="wan").config.pattern
        Radial(decay=1.0, sink_frames=1, dense_frame_distance=1, block_size=128)
    """
    text = os.fspath(name_or_path)
    if text.endswith((".yaml", ".yml")) or os.sep in text:
        return load_preset_file(text, family)
    if family is None:
        raise ValueError(f"preset {text!r} is a name: give the model family (one of {', '.join(families())})")
    path = CONFIG_DIR / family / f"{text}.yaml"
    if not path.is_file():
        names = ", ".join(p.stem for p in sorted((CONFIG_DIR / family).glob("*.yaml"))) if (CONFIG_DIR / family).is_dir() else ""
        raise ValueError(f"unknown preset {text!r} for model family {family!r}; available: {names or '(none)'}")
    return load_preset_file(path, family)


#: Each family's default latent token grid ``(frames, height, width, text_tokens, text_position)``:
#: the size its presets are described at (``diffattn presets`` reports densities at this grid).
DEFAULT_GRIDS: dict[str, tuple[int, int, int, int, str]] = {
    "wan": (21, 30, 52, 0, "end"),  # Wan 2.1 480p, 81 frames
    "hunyuan_video": (33, 45, 80, 256, "end"),  # 720x1280, 129 frames
    "cogvideox": (13, 30, 45, 226, "start"),  # 480x720, 49 frames
    "mochi": (28, 30, 53, 256, "end"),  # 480x848, 163 frames
    "ltx_video": (16, 15, 22, 0, "end"),  # 480x704, 121 frames
    "flux": (1, 64, 64, 512, "start"),  # 1024x1024 image
}


def default_grid(family: str):
    """The :class:`~diffattn.patterns.VideoGrid` a family's presets are described at."""
    from ..patterns import VideoGrid

    if family not in DEFAULT_GRIDS:
        raise ValueError(f"family must be one of {', '.join(sorted(DEFAULT_GRIDS))}; got {family!r}")
    return VideoGrid(*DEFAULT_GRIDS[family])


def preset_layout(config: SparsityConfig, grid):
    """The :class:`~diffattn.patterns.BlockLayout` that ``config``'s sparse steps run on ``grid``."""
    return config.pattern.layout(grid, block_size=config.block_size, tile_shape=config.tile_shape)
