"""Sparsity presets: YAML files in ``configs/<family>/<name>.yaml``, validated into SparsityConfig.

A preset file (``yaml.safe_load``; nothing else is ever executed or unpickled)::

    description: Radial attention, paper-like (dense warm-up and first layer)
    pattern:
      type: radial          # dense | radial | neighborhood | freeswim | agent | pyramid
      decay: 1.0
    dense_steps: 12
    dense_layers: [0]
    block_size: 128

Keys: ``description`` (str, required), ``pattern`` (mapping, required), and the optional
:class:`SparsityConfig` fields ``dense_layers``, ``dense_steps``, ``dense_last_steps``,
``block_size``, ``tile_shape``, ``backend``, ``on_unsupported``. Errors name the file, the key and
what is allowed.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..errors import UserError
from ..patterns import Dense, Neighborhood, Pattern, PyramidSparse, Radial
from .agent import AGENT_PATTERN_KEYS
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
    # Not a pattern class: FreeSwim's window, scale and guide cache (the whole config is a FreeSwim).
    "freeswim": (Pattern, ("window", "cache_steps", "scale", "offload_cache")),
    **AGENT_PATTERN_KEYS,  # agent (AgentSD, UNets)
    # Dynamic (planned per call from q and k): see preset_density for what a preset list shows.
    "pyramid": (PyramidSparse, ("levels", "mode", "min_full", "estimate")),
}
_CONFIG_KEYS = (
    "dense_layers", "dense_steps", "dense_last_steps", "block_size", "tile_shape", "backend", "on_unsupported",
)
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
        UserError: naming ``source``, the offending key and the allowed values.
    """
    if not isinstance(data, dict):
        raise UserError(
            f"{source}: a preset must be a mapping with keys {', '.join(_TOP_KEYS)}; got {type(data).__name__}"
        )
    unknown = sorted(set(data) - set(_TOP_KEYS))
    if unknown:
        raise UserError(f"{source}: unknown key(s) {', '.join(map(str, unknown))}; allowed: {', '.join(_TOP_KEYS)}")
    description = data.get("description")
    if not isinstance(description, str) or not description.strip():
        raise UserError(f"{source}: key 'description' must be a non-empty string, got {description!r}")
    spec = data.get("pattern")
    if not isinstance(spec, dict) or spec.get("type") not in _PATTERN_KEYS:
        kind = spec.get("type") if isinstance(spec, dict) else spec
        raise UserError(f"{source}: key 'pattern.type' must be one of {', '.join(_PATTERN_KEYS)}; got {kind!r}")
    cls, allowed = _PATTERN_KEYS[spec["type"]]
    extra = sorted(set(spec) - {"type", *allowed})
    if extra:
        raise UserError(
            f"{source}: unknown key(s) {', '.join('pattern.' + str(k) for k in extra)} for pattern type "
            f"{spec['type']!r}; allowed: {', '.join(allowed) or '(none)'}"
        )
    try:
        arguments = {k: _tuple_if_list(v) for k, v in spec.items() if k != "type"}
        fields = {k: _tuple_if_list(data[k]) for k in _CONFIG_KEYS if k in data}
        if spec["type"] == "freeswim":
            from .freeswim import FreeSwim  # freeswim imports the processor template, which imports presets' peers

            config = FreeSwim(**arguments, **fields)
        else:
            config = SparsityConfig(pattern=cls(**arguments), **fields)
    except (ValueError, TypeError) as error:  # a UserError too: add the file to its message
        raise UserError(f"{source}: {error}") from None
    return description.strip(), config


def load_preset_file(path: str | os.PathLike, family: str | None = None) -> Preset:
    """Load and validate one preset YAML file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"preset file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise UserError(f"{path}: not valid YAML ({error})") from None
    description, config = parse_preset(data, str(path))
    return Preset(name=path.stem, family=family, description=description, config=config, path=path)


def families() -> list[str]:
    """Model families that ship presets."""
    return sorted(p.name for p in CONFIG_DIR.iterdir() if p.is_dir()) if CONFIG_DIR.is_dir() else []


def list_presets(family: str) -> list[Preset]:
    """Every shipped preset of ``family``, by name."""
    if family not in families():
        raise UserError(f"family must be one of {', '.join(families())}; got {family!r}")
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
        raise UserError(f"preset {text!r} is a name: give the model family (one of {', '.join(families())})")
    path = CONFIG_DIR / family / f"{text}.yaml"
    if not path.is_file():
        family_dir = CONFIG_DIR / family
        names = ", ".join(p.stem for p in sorted(family_dir.glob("*.yaml"))) if family_dir.is_dir() else ""
        raise UserError(f"unknown preset {text!r} for model family {family!r}; available: {names or '(none)'}")
    return load_preset_file(path, family)


def preset_layout(config: SparsityConfig, grid):
    """The :class:`~diffattn.patterns.BlockLayout` that ``config``'s sparse steps run on ``grid``
    (a dynamic pattern such as PyramidSparse has none: :class:`UserError`, see :func:`preset_density`)."""
    return config.pattern.layout(grid, block_size=config.block_size, tile_shape=config.tile_shape)


def is_dynamic(config: SparsityConfig) -> bool:
    """Whether ``config``'s pattern is planned per call from q and k (PyramidSparse)."""
    return bool(getattr(config.pattern, "dynamic", False))


def preset_density(config: SparsityConfig, grid) -> float:
    """The fraction of the ``N x N`` (query, key) pairs ``config``'s sparse steps compute on ``grid``:
    the layout's density, an agent pattern's pair density (an op, not a layout), or for a dynamic
    pattern (checked against the grid) the effective density its shares stand for
    (:attr:`~diffattn.patterns.PyramidSparse.nominal_density`).

    Example:
        >>> from diffattn import VideoGrid
        >>> round(preset_density(load_preset("agent", family="sd").config, VideoGrid(1, 64, 64)), 4)
        0.075
        >>> round(preset_density(load_preset("psa", family="wan").config, VideoGrid(21, 30, 52)), 3)
        0.15
    """
    if is_dynamic(config):
        config.pattern.validate_grid(grid)
        return config.pattern.nominal_density
    pair_density = getattr(config.pattern, "pair_density", None)
    return pair_density(grid) if pair_density is not None else preset_layout(config, grid).density
