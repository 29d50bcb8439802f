"""What an adapter knows about one model family, and the install/uninstall mechanics they share."""

from __future__ import annotations

import abc
import fnmatch
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch

from ..errors import DenseFallbackWarning, UserError
from ..patterns import VideoGrid
from ..processors.base import SparseAttnProcessor
from ..processors.config import SparsityConfig
from ..processors.state import SparsityState

__all__ = ["DenseFallbackWarning", "ModelAdapter", "install", "sparse_processors", "uninstall"]


class ModelAdapter(abc.ABC):
    """One model family: where its transformers are, which layers are self-attention, its token
    order and latent grid, and which processor replaces the stock one."""

    #: Human-readable family name (used in error messages and presets).
    family: str = ""
    #: Attribute names of the pipeline's transformers (Wan 2.2 A14B has two).
    transformer_attributes: tuple[str, ...] = ("transformer",)
    #: Transformer class names this adapter handles.
    transformer_classes: tuple[str, ...] = ()
    #: When :meth:`grid_from_call` can answer None, which calls those are (the fallback reason
    #: of their attention calls); empty for families whose every call has a grid.
    no_grid_calls: str = ""
    #: The family's sparse processor class (it lists the stock processors it reproduces).
    processor_class: ClassVar[type[SparseAttnProcessor]] = SparseAttnProcessor
    #: The latent token grid ``(frames, height, width, text_tokens, text_position)`` the family's
    #: presets are described at (``diffattn presets`` and ``diffattn mask`` use it).
    default_grid: ClassVar[tuple[int, int, int, int, str]] = (1, 1, 1, 0, "end")

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

    def make_state(self, config: SparsityConfig, scheduler: Any, label: str) -> SparsityState:
        """The state the processors of one transformer share (FreeSwim's adapter makes its own)."""
        return SparsityState(config, scheduler, label=label)

    def make_processor(self, stock: Any, state: SparsityState | None, layer_index: int) -> Any:
        """The sparse processor that replaces ``stock`` on one layer; ``stock`` itself when it is
        not a processor the family's sparse processor reproduces (e.g. a third-party one, or
        FLUX's IP-Adapter processor): that layer stays dense, and the transformer's calls say so
        with a :class:`DenseFallbackWarning`."""
        if type(stock).__name__ not in self.processor_class.stock_classes:
            return stock
        return self.processor_class(stock, state, layer_index)

    def extra_hooks(self, transformer: torch.nn.Module, layers: list[tuple[str, int]],
                    state: SparsityState) -> list[torch.utils.hooks.RemovableHandle]:
        """Hooks on submodules the family's processors read from (removed with the installation)."""
        return []


def call_argument(args: tuple, kwargs: dict, name: str, position: int, required: bool = True) -> Any:
    """A transformer forward's argument ``name``, passed by keyword or at ``position``."""
    if name in kwargs:
        return kwargs[name]
    if len(args) > position:
        return args[position]
    if required:
        raise UserError(f"the transformer was called without {name!r} (keyword, or positional #{position})")
    return None


@dataclass
class Installed:
    """What diffattn installed on one transformer, so ``remove`` can undo exactly that."""

    layers: list[tuple[str, int]]
    hook: torch.utils.hooks.RemovableHandle
    end_hook: torch.utils.hooks.RemovableHandle
    state: SparsityState
    assigned_directly: bool
    #: More to undo on remove (e.g. FreeSwim's batch hooks), run in order.
    undo: list[Callable[[], None]] = field(default_factory=list)


INSTALLED_ATTRIBUTE = "_diffattn_installed"


def dense_layer_indices(config: SparsityConfig, layers: list[tuple[str, int]]) -> frozenset[int]:
    """Resolve ``config.dense_layers`` (indices, negative indices, name filters) to block indices."""
    num_blocks = max((index for _, index in layers), default=-1) + 1
    dense: set[int] = set()
    for entry in config.dense_layers:
        if isinstance(entry, int):
            index = entry + num_blocks if entry < 0 else entry
            if not 0 <= index < num_blocks:
                raise UserError(
                    f"dense_layers entry {entry} is out of range for a transformer with {num_blocks} blocks; "
                    f"allowed: {-num_blocks}..{num_blocks - 1}"
                )
            dense.add(index)
        else:
            matched = {index for name, index in layers if fnmatch.fnmatch(name, entry)}
            if not matched:
                example = layers[0][0] if layers else "?"
                raise UserError(
                    f"dense_layers filter {entry!r} matches no self-attention layer (names look like {example!r})"
                )
            dense |= matched
    return frozenset(dense)


def sparse_processors(
    adapter: ModelAdapter, transformer: torch.nn.Module, config: SparsityConfig, scheduler: Any = None
) -> dict[str, Any]:
    """``{"<module>.processor": processor}`` for ``transformer.set_attn_processor``, with sparse
    processors on the family's self-attention layers; installs the pre-hook they read the step
    and grid from (replacing an earlier installation's, whose processors then run stock).

    Every attention module is in the dict (``set_attn_processor`` wants them all): the stock
    processor where nothing is sparsified. ``scheduler`` gives the current step for
    ``dense_steps``/``dense_last_steps``; without one every step runs sparse.
    """
    transformer = unwrap_compiled(transformer)
    processors = attention_processors(transformer)
    for key, processor in processors.items():
        if isinstance(processor, SparseAttnProcessor) or getattr(processor, "wraps_stock", False):
            processors[key] = processor.stock  # re-installing (or steered): start from the stock processors
    layers = adapter.self_attention_layers(transformer)
    state = adapter.make_state(config, scheduler, f"{adapter.family} transformer ({type(transformer).__name__})")
    state.dense_layer_indices = dense_layer_indices(config, layers)
    kept: Counter[str] = Counter()
    for name, index in layers:
        key = f"{name}.processor"
        processors[key] = adapter.make_processor(processors[key], state, index)
        if not isinstance(processors[key], SparseAttnProcessor):
            kept[type(processors[key]).__name__] += 1
    if kept and config.on_unsupported == "raise":
        state.fall_back(_not_ours_reason(next(iter(kept))), calls=0)

    _forget(transformer)  # only now: a bad config leaves an earlier installation working
    modules = [(transformer.get_submodule(name), index) for name, index in layers]

    def publish(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        grid = adapter.grid_from_call(module, args, kwargs)
        reason = None if grid is not None else (
            f"the transformer's inputs form no token grid ({adapter.no_grid_calls or 'unexpected inputs'})"
        )
        state.begin_call(grid, adapter.timestep_from_call(args, kwargs), no_grid_reason=reason,
                         device=_input_device(args, kwargs))
        _check_processors(state, modules)

    def book(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        _book_compiled(state, modules)

    # Both hooks run eagerly under torch.compile(transformer), which traces only the forward:
    # reading the scheduler, building the grid and layout, counting and warning are host-side
    # work that would otherwise be traced, guarded and recompiled for every new step.
    hook = transformer.register_forward_pre_hook(torch.compiler.disable(publish), with_kwargs=True)
    end_hook = transformer.register_forward_hook(torch.compiler.disable(book), with_kwargs=True)
    direct = not hasattr(transformer, "set_attn_processor")
    undo = [extra.remove for extra in adapter.extra_hooks(transformer, layers, state)]
    setattr(transformer, INSTALLED_ATTRIBUTE, Installed(layers, hook, end_hook, state, direct, undo))
    return processors


def _input_device(args: tuple, kwargs: dict) -> torch.device | None:
    """The device of a transformer forward's first tensor argument (where its layouts belong)."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value.device
    return None


def _not_ours_reason(class_name: str) -> str:
    return (f"the layer's processor is {class_name}, not a diffattn one (kept because diffattn does not "
            "reproduce it, or set after diffattn by e.g. load_ip_adapter, fuse_qkv_projections or "
            "set_attn_processor; apply diffattn again to sparsify such layers)")


_STALE = ("the layer's processor belongs to an earlier diffattn installation (sparse_processors was called "
          "again but its processors were not set)")


def _check_processors(state: SparsityState, modules: list[tuple[torch.nn.Module, int]]) -> None:
    """Before each transformer call: adopt the processors diffusers re-created from our class
    (no state yet), and count the self-attention layers whose processor is not ours as fallbacks."""
    others: Counter[str] = Counter()
    for module, index in modules:
        processor = module.processor
        if isinstance(processor, SparseAttnProcessor):
            if processor.state is None:
                processor.state, processor.layer_index = state, index
            if processor.state is state:
                processor.prepare()
                continue
        if not state.dense_now(index):  # a layer the schedule keeps dense loses nothing
            stale = isinstance(processor, SparseAttnProcessor)
            others[_STALE if stale else _not_ours_reason(type(processor).__name__)] += 1
    for reason, layers in others.items():
        state.fall_back(reason, calls=layers)


def _book_compiled(state: SparsityState, modules: list[tuple[torch.nn.Module, int]]) -> None:
    """After each transformer call: book the sparse calls and fallbacks a compiled forward noted
    on its processors (nothing, after an eager one: it booked them itself)."""
    sparse, fallbacks = [], []
    for module, index in modules:
        processor = module.processor
        if isinstance(processor, SparseAttnProcessor) and processor.state is state:
            ran_sparse, reason = processor.take_compiled()
            if ran_sparse:
                sparse.append(index)
            if reason is not None:
                fallbacks.append(reason)
    state.end_call(sparse, fallbacks)


def install(adapter: ModelAdapter, transformer: torch.nn.Module, config: SparsityConfig, scheduler: Any) -> None:
    """Install sparse processors and the step/grid pre-hook on one transformer."""
    transformer = unwrap_compiled(transformer)
    processors = sparse_processors(adapter, transformer, config, scheduler)
    _set_processors(transformer, processors, getattr(transformer, INSTALLED_ATTRIBUTE).assigned_directly)


def unwrap_compiled(module: Any) -> Any:
    """The module inside a ``torch.compile(module)`` wrapper (``OptimizedModule``), else ``module``.

    The wrapper's class name is not the model's, and attributes set on it would not land on the
    model, so processors, the pre-hook and the install record always go to the wrapped model
    (whose ``__call__``, hooks included, is what the wrapper runs).
    """
    return getattr(module, "_orig_mod", module) if isinstance(module, torch.nn.Module) else module


def uninstall(transformer: torch.nn.Module) -> bool:
    """Restore the stock processors and remove the hook; False if nothing was installed.

    Each layer that still runs a processor of this installation gets back the stock processor
    that processor wraps; a layer whose processor was replaced since (by the user or diffusers)
    keeps it.
    """
    transformer = unwrap_compiled(transformer)
    installed: Installed | None = getattr(transformer, INSTALLED_ATTRIBUTE, None)
    if installed is None:
        return False
    processors = attention_processors(transformer)
    for key, processor in processors.items():
        if isinstance(processor, SparseAttnProcessor) and processor.state in (installed.state, None):
            processors[key] = processor.stock
    _set_processors(transformer, processors, installed.assigned_directly)
    _forget(transformer)
    return True


def _forget(transformer: torch.nn.Module) -> None:
    """Remove an installation's hook and record (its processors, if still set, run stock)."""
    installed: Installed | None = getattr(transformer, INSTALLED_ATTRIBUTE, None)
    if installed is not None:
        installed.hook.remove()
        installed.end_hook.remove()
        for undo in installed.undo:
            undo()
        delattr(transformer, INSTALLED_ATTRIBUTE)


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
