"""diffusers integration: ``apply`` sparse attention to a pipeline, ``remove`` it again.

One adapter per model family knows its token order, latent grid and self-attention layers.
"""

from __future__ import annotations

import os
from typing import Any

from ..processors.config import SparsityConfig
from ..processors.presets import load_preset
from ..patterns import Pattern
from .base import INSTALLED_ATTRIBUTE, DenseFallbackWarning, ModelAdapter, install, uninstall
from .cogvideox import CogVideoXAdapter
from .flux import FluxAdapter
from .ltx_video import LTXVideoAdapter
from .hunyuan_video import HunyuanVideoAdapter
from .mochi import MochiAdapter
from .wan import WanAdapter

ADAPTERS: tuple[ModelAdapter, ...] = (
    WanAdapter(),
    CogVideoXAdapter(),
    FluxAdapter(),
    LTXVideoAdapter(),
    HunyuanVideoAdapter(),
    MochiAdapter(),
)


def find_adapter(pipe: Any) -> ModelAdapter:
    """The adapter for ``pipe``'s model family, or ValueError listing the supported families."""
    for adapter in ADAPTERS:
        if adapter.matches(pipe):
            return adapter
    names = ", ".join(a.family for a in ADAPTERS)
    found = getattr(getattr(pipe, "transformer", None), "__class__", type(None)).__name__
    raise ValueError(
        f"{type(pipe).__name__} (transformer {found}) is not a supported pipeline; supported model families: {names}"
    )


def apply(pipe: Any, config: SparsityConfig | Pattern | str | os.PathLike, **overrides: Any) -> Any:
    """Sparsify the self-attention of a diffusers pipeline in place; returns ``pipe``.

    Args:
        pipe: a diffusers pipeline of a supported family.
        config: a :class:`SparsityConfig`; a bare pattern (then every layer and step is sparse); a
            preset name of the pipeline's family (``"radial"``, see ``configs/<family>/``); or the
            path of a preset YAML file.
        **overrides: :class:`SparsityConfig` fields to replace (e.g. ``dense_steps=10``).

    Applying again replaces the previous configuration (never stacks); :func:`remove` restores
    the stock processors exactly.

    Example:
        >>> diffattn.apply(pipe, SparsityConfig(pattern=Radial(), dense_steps=12, dense_layers=(0,)))
        >>> video = pipe(prompt_embeds=..., num_frames=81).frames
        >>> diffattn.remove(pipe)
    """
    adapter = find_adapter(pipe)
    if isinstance(config, (str, os.PathLike)):
        config = load_preset(config, family=adapter.family).config
    if isinstance(config, Pattern):
        config = SparsityConfig(pattern=config)
    if not isinstance(config, SparsityConfig):
        raise ValueError(
            f"config must be a SparsityConfig, a Pattern, a preset name or a YAML path; got {type(config).__name__}"
        )
    if overrides:
        config = config.with_overrides(**overrides)
    remove(pipe)
    scheduler = getattr(pipe, "scheduler", None)
    for _, transformer in adapter.transformers(pipe):
        install(adapter, transformer, config, scheduler)
    return pipe


def remove(pipe: Any) -> Any:
    """Restore the stock attention processors and remove diffattn's hooks; returns ``pipe``."""
    for attribute in ("transformer", "transformer_2"):
        module = getattr(pipe, attribute, None)
        if module is not None and hasattr(module, INSTALLED_ATTRIBUTE):
            uninstall(module)
    return pipe


def sparsity_state(pipe: Any, attribute: str = "transformer"):
    """The :class:`SparsityState` installed on ``pipe.<attribute>`` (None if not applied)."""
    installed = getattr(getattr(pipe, attribute, None), INSTALLED_ATTRIBUTE, None)
    return None if installed is None else installed.state


__all__ = ["ADAPTERS", "DenseFallbackWarning", "ModelAdapter", "apply", "find_adapter", "remove", "sparsity_state"]
