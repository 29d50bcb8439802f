"""What an adapter knows about one model family, and the install/uninstall mechanics they share."""

from __future__ import annotations

import abc
import fnmatch
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import DenseFallbackWarning
from ..patterns import VideoGrid
from ..processors.config import SparsityConfig
from ..processors.state import SparsityState


class ModelAdapter(abc.ABC):
    """One model family: where its transformers are, which layers are self-attention, its token
    order and latent grid, and which processor replaces the stock one."""

    #: Human-readable family name (used in error messages and presets).
    family: str = ""
    #: Attribute names of the pipeline's transformers (Wan 2.2 A14B has two).
    transformer_attributes: tuple[str, ...] = ("transformer",)
    #: Transformer class names this adapter handles.
    transformer_classes: tuple[str, ...] = ()
    #: When :meth:`grid_from_call` can answer None, which calls those are (for the
    #: :class:`DenseFallbackWarning`); empty for families whose every call has a grid.
    no_grid_calls: str = ""

    def matches(self, pipe: Any) -> bool:
        return any(type(t).__name__ in self.transformer_classes for _, t in self.transformers(pipe))

    def transformers(self, pipe: Any) -> list[tuple[str, torch.nn.Module]]:
        found = []
        for attribute in self.transformer_attributes:
            module = unwrap_compiled(getattr(pipe, attribute, None))
            if isinstance(module, torch.nn.Module):
                found.append((attribute, module))
        return found

    @abc.abstractmethod
    def self_attention_layers(self, transformer: torch.nn.Module) -> list[tuple[str, int]]:
        """``[(attention module name, block index)]`` of the layers to sparsify."""

    @abc.abstractmethod
    def grid_from_call(self, transformer: torch.nn.Module, args: tuple, kwargs: dict) -> VideoGrid:
        """The latent token grid of one transformer forward, from its inputs."""

    @abc.abstractmethod
    def timestep_from_call(self, args: tuple, kwargs: dict) -> torch.Tensor | None:
        """The timestep argument of one transformer forward."""

    @abc.abstractmethod
    def make_processor(self, stock: Any, state: SparsityState, layer_index: int) -> Any:
        """The sparse processor that replaces ``stock`` on one layer."""


def call_argument(args: tuple, kwargs: dict, name: str, position: int, required: bool = True) -> Any:
    """A transformer forward's argument ``name``, passed by keyword or at ``position``."""
    if name in kwargs:
        return kwargs[name]
    if len(args) > position:
        return args[position]
    if required:
        raise ValueError(f"the transformer was called without {name!r} (keyword, or positional #{position})")
    return None


@dataclass
class Installed:
    """What ``apply`` changed on one transformer, so ``remove`` can undo exactly that."""

    stock_processors: dict[str, Any]
    hook: torch.utils.hooks.RemovableHandle
    state: SparsityState
    assigned_directly: bool


INSTALLED_ATTRIBUTE = "_diffattn_installed"


def dense_layer_indices(config: SparsityConfig, layers: list[tuple[str, int]]) -> frozenset[int]:
    """Resolve ``config.dense_layers`` (indices, negative indices, name filters) to block indices."""
    num_blocks = max((index for _, index in layers), default=-1) + 1
    dense: set[int] = set()
    for entry in config.dense_layers:
        if isinstance(entry, int):
            index = entry + num_blocks if entry < 0 else entry
            if not 0 <= index < num_blocks:
                raise ValueError(
                    f"dense_layers entry {entry} is out of range for a transformer with {num_blocks} blocks; "
                    f"allowed: {-num_blocks}..{num_blocks - 1}"
                )
            dense.add(index)
        else:
            matched = {index for name, index in layers if fnmatch.fnmatch(name, entry)}
            if not matched:
                example = layers[0][0] if layers else "?"
                raise ValueError(
                    f"dense_layers filter {entry!r} matches no self-attention layer (names look like {example!r})"
                )
            dense |= matched
    return frozenset(dense)


def install(adapter: ModelAdapter, transformer: torch.nn.Module, config: SparsityConfig, scheduler: Any) -> None:
    """Install sparse processors and the step/grid pre-hook on one transformer."""
    stock = attention_processors(transformer)
    layers = adapter.self_attention_layers(transformer)
    state = SparsityState(config, scheduler)
    state.dense_layer_indices = dense_layer_indices(config, layers)
    replacement = dict(stock)
    for name, index in layers:
        key = f"{name}.processor"
        replacement[key] = adapter.make_processor(stock[key], state, index)

    direct = not hasattr(transformer, "set_attn_processor")
    _set_processors(transformer, replacement, direct)

    warned = False

    def publish(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        nonlocal warned
        grid = adapter.grid_from_call(module, args, kwargs)
        if grid is None and not warned:
            # Dense is the right answer for such a call, but a user who asked for sparsity must
            # hear that this call got none: the speed they expected is not there.
            warned = True
            warnings.warn(
                f"diffattn: the {adapter.family} transformer ({type(module).__name__}) was called with inputs "
                f"that form no token grid ({adapter.no_grid_calls or 'unexpected inputs'}); such calls run the "
                "stock dense attention (this warning is shown once per apply())",
                DenseFallbackWarning, stacklevel=2,
            )
        state.begin_call(grid, adapter.timestep_from_call(args, kwargs))

    # Eager under torch.compile: reading the scheduler and building the grid is host-side work
    # that would otherwise be traced, guarded and recompiled for every new step and shape.
    hook = transformer.register_forward_pre_hook(torch.compiler.disable(publish), with_kwargs=True)
    setattr(transformer, INSTALLED_ATTRIBUTE, Installed(stock, hook, state, direct))


def unwrap_compiled(module: Any) -> Any:
    """The module inside a ``torch.compile(module)`` wrapper (``OptimizedModule``), else ``module``.

    The wrapper's class name is not the model's, and attributes set on it would not land on the
    model, so processors, the pre-hook and the install record always go to the wrapped model
    (whose ``__call__``, hooks included, is what the wrapper runs).
    """
    return getattr(module, "_orig_mod", module) if isinstance(module, torch.nn.Module) else module


def uninstall(transformer: torch.nn.Module) -> bool:
    """Restore the stock processors and remove the hook; False if nothing was installed."""
    transformer = unwrap_compiled(transformer)
    installed: Installed | None = getattr(transformer, INSTALLED_ATTRIBUTE, None)
    if installed is None:
        return False
    _set_processors(transformer, dict(installed.stock_processors), installed.assigned_directly)
    installed.hook.remove()
    delattr(transformer, INSTALLED_ATTRIBUTE)
    return True


def attention_processors(transformer: torch.nn.Module) -> dict[str, Any]:
    """``{"<module name>.processor": processor}`` of every attention module of ``transformer``.

    Uses diffusers' ``attn_processors`` where the model has it; Mochi's transformer has no
    ``AttentionMixin``, so there every submodule that carries a ``processor`` attribute counts.
    """
    if hasattr(transformer, "attn_processors"):
        return dict(transformer.attn_processors)
    return {
        f"{name}.processor": module.processor
        for name, module in transformer.named_modules()
        if name and hasattr(module, "processor")
    }


def _set_processors(transformer: torch.nn.Module, processors: dict[str, Any], direct: bool) -> None:
    if not direct:
        # The dict form gives every layer its own object (the instance form would share one).
        transformer.set_attn_processor(processors)
        return
    for key, processor in processors.items():
        transformer.get_submodule(key.removesuffix(".processor")).processor = processor
