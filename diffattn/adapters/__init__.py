"""diffusers integration: ``apply`` sparse attention to a pipeline, ``remove`` it again.

One adapter per model family knows its token order, latent grid and self-attention layers.
"""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any

import torch

from ..errors import UserError
from ..patterns import Pattern, VideoGrid
from ..processors.config import SparsityConfig
from ..processors.freeswim import FreeSwim
from ..processors.presets import load_preset
from .base import INSTALLED_ATTRIBUTE, DenseFallbackWarning, ModelAdapter, install, uninstall, unwrap_compiled
from .base import sparse_processors as _sparse_processors
from .cogvideox import CogVideoXAdapter
from .flux import FluxAdapter
from .hunyuan_video import HunyuanVideoAdapter
from .ltx_video import LTXVideoAdapter
from .mochi import MochiAdapter
from .unet import StableDiffusionAdapter, StableDiffusionXLAdapter
from .wan import WanAdapter

ADAPTERS: tuple[ModelAdapter, ...] = (
    WanAdapter(),
    CogVideoXAdapter(),
    FluxAdapter(),
    LTXVideoAdapter(),
    HunyuanVideoAdapter(),
    MochiAdapter(),
    StableDiffusionAdapter(),
    StableDiffusionXLAdapter(),
)


def find_adapter(pipe: Any) -> ModelAdapter:
    """The adapter for ``pipe``'s model family, or :class:`UserError` listing the supported families."""
    for adapter in ADAPTERS:
        if adapter.matches(pipe):
            return adapter
    names = ", ".join(a.family for a in ADAPTERS)
    model = getattr(pipe, "transformer", None)
    model = getattr(pipe, "unet", None) if model is None else model
    found = getattr(model, "__class__", type(None)).__name__
    raise UserError(
        f"{type(pipe).__name__} (transformer {found}) is not a supported pipeline; supported model families: {names}"
    )


def adapter_for_transformer(transformer: Any) -> ModelAdapter:
    """The adapter whose family's transformer ``transformer`` is, or :class:`UserError`."""
    transformer = unwrap_compiled(transformer)
    name = type(transformer).__name__
    for adapter in ADAPTERS:
        # As its pipeline's model: tells SD from SDXL UNets (one class, two families).
        as_pipe = SimpleNamespace(**dict.fromkeys(adapter.transformer_attributes, transformer))
        if name in adapter.transformer_classes and adapter.matches(as_pipe):
            return adapter
    supported = ", ".join(c for a in ADAPTERS for c in a.transformer_classes)
    raise UserError(f"transformer must be one of {supported}; got a {name}")


def family_default_grid(family: str) -> VideoGrid:
    """The :class:`VideoGrid` a family's presets are described at (its adapter's ``default_grid``)."""
    for adapter in ADAPTERS:
        if adapter.family == family:
            return VideoGrid(*adapter.default_grid)
    raise UserError(f"family must be one of {', '.join(sorted(a.family for a in ADAPTERS))}; got {family!r}")


def resolve_config(config: Any, family: str, **overrides: Any) -> SparsityConfig:
    """A :class:`SparsityConfig` from anything :func:`apply` accepts (see there)."""
    if isinstance(config, (str, os.PathLike)):
        config = load_preset(config, family=family).config
    if isinstance(config, Pattern):
        config = SparsityConfig(pattern=config)
    if not isinstance(config, SparsityConfig):
        raise UserError(
            f"config must be a SparsityConfig, a Pattern, a preset name or a YAML path; got {config!r} "
            f"({type(config).__name__})"
        )
    return config.with_overrides(**overrides) if overrides else config


def sparse_processors(
    transformer: Any, config: SparsityConfig | Pattern | str | os.PathLike, *, scheduler: Any = None, **overrides: Any
) -> dict[str, Any]:
    """The ``{name: processor}`` dict ``transformer.set_attn_processor(...)`` takes, sparse on the
    family's self-attention layers; the diffusers way to do what :func:`apply` does.

    It also installs, on ``transformer``, the forward pre-hook that tells the processors the
    current latent grid and step (replacing an earlier installation). The step comes from
    ``scheduler`` (the pipeline's, e.g. ``pipe.scheduler``): without one the step is unknown and
    ``dense_steps``/``dense_last_steps`` do not apply (every step runs sparse). ``config`` and
    ``overrides`` are as for :func:`apply`. ``diffattn.remove(transformer)`` restores the stock
    processors. Mochi's transformer has no ``set_attn_processor``: assign each
    ``module.processor`` from the dict, or use :func:`apply`.

    Example:
        >>> from diffusers import WanTransformer3DModel
        >>> import diffattn
        >>> transformer = WanTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
        ...     out_channels=4, text_dim=16, freq_dim=16, ffn_dim=16, num_layers=1, rope_max_seq_len=32)
        >>> processors = diffattn.sparse_processors(transformer, diffattn.Radial(block_size=32), block_size=32)
        >>> transformer.set_attn_processor(processors)
        >>> type(transformer.blocks[0].attn1.processor).__name__
        'WanSparseAttnProcessor'
        >>> diffattn.remove(transformer) is transformer
        True
    """
    adapter = adapter_for_transformer(transformer)
    config = resolve_config(config, adapter.family, **overrides)
    if isinstance(config, FreeSwim):
        raise UserError("FreeSwim needs the pipeline (its native size and the transformer hooks): use "
                        "diffattn.apply(pipe, FreeSwim(...)), not sparse_processors")
    return _sparse_processors(adapter, transformer, config, scheduler)


def apply(pipe: Any, config: SparsityConfig | Pattern | str | os.PathLike, **overrides: Any) -> Any:
    """Sparsify the self-attention of a diffusers pipeline in place; returns ``pipe``.

    Args:
        pipe: a diffusers pipeline of a supported family.
        config: a :class:`SparsityConfig` (or :class:`~diffattn.FreeSwim`); a bare pattern (then every
            layer and step is sparse); a preset name of the pipeline's family (``"radial"``, see
            ``configs/<family>/``); or the path of a preset YAML file.
        **overrides: :class:`SparsityConfig` fields to replace (e.g. ``dense_steps=10``).

    Applying again replaces the previous configuration (never stacks); :func:`remove` restores
    the stock processors exactly. Built on :func:`sparse_processors` with ``pipe.scheduler``.

    Example:
        >>> from types import SimpleNamespace
        >>> from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
        >>> import diffattn
        >>> transformer = WanTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
        ...     out_channels=4, text_dim=16, freq_dim=16, ffn_dim=16, num_layers=2, rope_max_seq_len=32)
        >>> pipe = SimpleNamespace(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler())
        >>> config = diffattn.SparsityConfig(pattern=diffattn.Radial(block_size=32), block_size=32,
        ...                                  dense_steps=12, dense_layers=(0,))
        >>> _ = diffattn.apply(pipe, config)       # with a real pipeline: pipe(...) runs sparse
        >>> [type(block.attn1.processor).__name__ for block in transformer.blocks]
        ['WanSparseAttnProcessor', 'WanSparseAttnProcessor']
        >>> _ = diffattn.remove(pipe)
        >>> type(transformer.blocks[0].attn1.processor).__name__
        'WanAttnProcessor'
    """
    adapter = find_adapter(pipe)
    config = resolve_config(config, adapter.family, **overrides)
    remove(pipe)
    if isinstance(config, FreeSwim):  # FreeSwim: processors on both attention layers and batch hooks
        from .freeswim import apply_freeswim

        return apply_freeswim(pipe, adapter, config)
    scheduler = getattr(pipe, "scheduler", None)
    for _, transformer in adapter.transformers(pipe):
        install(adapter, transformer, config, scheduler)
    return pipe


def remove(pipe: Any) -> Any:
    """Restore the stock attention processors and remove diffattn's hooks; returns ``pipe``.

    ``pipe`` may also be a transformer given to :func:`sparse_processors`.
    """
    if isinstance(pipe, torch.nn.Module):
        uninstall(pipe)
        return pipe
    for attribute in ("transformer", "transformer_2", "unet"):
        module = getattr(pipe, attribute, None)
        if module is not None and hasattr(module, INSTALLED_ATTRIBUTE):
            uninstall(module)
    return pipe


def sparsity_state(pipe: Any, attribute: str | None = None):
    """The :class:`SparsityState` installed on ``pipe.<attribute>`` (None if not applied); by
    default ``pipe.transformer``, or ``pipe.unet`` for a UNet pipeline."""
    if attribute is None:
        attribute = "unet" if getattr(pipe, "transformer", None) is None and hasattr(pipe, "unet") else "transformer"
    installed = getattr(getattr(pipe, attribute, None), INSTALLED_ATTRIBUTE, None)
    return None if installed is None else installed.state


__all__ = [
    "ADAPTERS", "DenseFallbackWarning", "ModelAdapter", "adapter_for_transformer", "apply", "family_default_grid",
    "find_adapter", "remove", "resolve_config", "sparse_processors", "sparsity_state",
]
