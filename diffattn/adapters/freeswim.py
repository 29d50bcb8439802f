"""Installing FreeSwim (:class:`~diffattn.processors.freeswim.FreeSwim`) on a pipeline.

Supported: the ``wan`` family (Wan 2.1/2.2 text-to-video and image-to-video, the embedded model):
its text enters through a cross-attention whose output the guide branch can override, and its
pipelines call the transformer once for the conditional and once for the unconditional pass.
Refused with :class:`~diffattn.errors.UserError`:

* HunyuanVideo, CogVideoX, Mochi, FLUX: joint attention. Text and video share one attention, so
  there is no cross-attention output to override; overriding the text rows or columns of the
  joint attention is not FreeSwim's method, and the reference defines none.
* LTX-Video: it has cross-attention, but its pipeline runs the unconditional and conditional
  passes as one batch ``[uncond, cond]`` in one transformer call, which FreeSwim's per-call
  dual path does not split.

How the two branches run without forking the pipeline: a forward pre-hook on the transformer
names each call (below) and, on a conditional guide step, doubles the batch to ``[window, full]``
(the inputs repeated); the processors read the role from the
:class:`~diffattn.processors.freeswim.FreeSwimState`; a forward hook keeps the window half of the
output. The pipeline sees a transformer with the stock inputs and outputs.

How a call is named conditional or unconditional:

1. the diffusers cache context (``transformer.cache_context("cond"|"uncond")``, which diffusers'
   Wan pipelines set around each call): a small stateful diffusers hook receives its name;
2. without one (e.g. the embedded pipeline): the first call on a latent tensor is the
   conditional one, a second call on the very same tensor object the unconditional one; a third
   call on it is refused (a pipeline that calls the transformer more than twice per step).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from ..errors import UserError
from ..processors.freeswim import CACHED, GUIDE, PLAIN, UNCOND, FreeSwim, FreeSwimState, FreeSwimWanProcessor
from ..processors.state import SparsityState
from .base import INSTALLED_ATTRIBUTE, ModelAdapter, install
from .wan import WanAdapter

#: The families FreeSwim supports (see the module docstring for the others).
FREESWIM_FAMILIES = ("wan",)
#: The transformer forward's inputs doubled for a guide call (Wan's names, in positional order).
BATCHED_INPUTS = ("hidden_states", "timestep", "encoder_hidden_states", "encoder_hidden_states_image")
_CONTEXT_HOOK = "diffattn_freeswim_context"


class FreeSwimWanAdapter(WanAdapter):
    """The Wan adapter with FreeSwim's processors on both attention layers of every block
    (``attn1``: window and full self-attention; ``attn2``: the guide cross-attention)."""

    processor_class = FreeSwimWanProcessor

    def __init__(self, window: tuple[int, int]) -> None:
        self.window = window

    def self_attention_layers(self, transformer: torch.nn.Module) -> list[tuple[str, int]]:
        return [(f"blocks.{i}.{name}", i) for i in range(len(transformer.blocks)) for name in ("attn1", "attn2")]

    def make_state(self, config: Any, scheduler: Any, label: str) -> SparsityState:
        return FreeSwimState(config, scheduler, label=label, window=self.window)


def native_window(pipe: Any, adapter: ModelAdapter) -> tuple[int, int]:
    """The latent ``(height, width)`` the model was trained at (FreeSwim's ``window=None``).

    The embedded model: its training size (``DEFAULT_CALL``, 64 x 64 pixels) over its patch, 8 x 8
    tokens. Any other Wan model: the adapter's default grid, Wan 2.1 480p (30 x 52 tokens), the
    size the 1.3B model was trained at and the reference's base size.
    """
    if type(pipe).__name__ == "EmbeddedVideoPipeline":
        from ..pipelines.embedded import DEFAULT_CALL  # lazily: pipelines sit above adapters

        return DEFAULT_CALL["height"] // pipe.patch_pixels, DEFAULT_CALL["width"] // pipe.patch_pixels
    return adapter.default_grid[1], adapter.default_grid[2]


def check_family(adapter: ModelAdapter) -> None:
    """:class:`UserError` unless FreeSwim supports ``adapter``'s family."""
    if adapter.family not in FREESWIM_FAMILIES:
        raise UserError(
            f"FreeSwim supports the model families {', '.join(FREESWIM_FAMILIES)} (Wan 2.1/2.2, the embedded model); "
            f"got {adapter.family!r}: HunyuanVideo, CogVideoX, Mochi and FLUX use joint attention (no cross-attention "
            "output for the guide branch to override), LTX-Video runs cond and uncond in one batch"
        )


def apply_freeswim(pipe: Any, adapter: ModelAdapter, config: FreeSwim) -> Any:
    """Install FreeSwim on every transformer of ``pipe`` (``diffattn.apply`` calls it); returns ``pipe``."""
    check_family(adapter)
    window = config.window if config.window is not None else native_window(pipe, adapter)
    freeswim_adapter = FreeSwimWanAdapter(window)
    scheduler = getattr(pipe, "scheduler", None)
    for _, transformer in adapter.transformers(pipe):
        install(freeswim_adapter, transformer, config, scheduler)
        add_batch_hooks(transformer)
    return pipe


def _context_receiver(transformer: torch.nn.Module) -> tuple[Any, Any]:
    """A stateful diffusers hook on ``transformer`` whose only job is to receive the name of the
    cache context (``cache_context`` hands the context to every ``StateManager`` of a stateful hook
    in the transformer's registry); and how to remove it. Its forward is the identity."""
    from diffusers.hooks.hooks import HookRegistry, ModelHook, StateManager

    class ContextName(StateManager):
        def __init__(self) -> None:
            super().__init__(dict)
            self.name: str | None = None

        def set_context(self, context: Any) -> None:
            super().set_context(context)
            self.name = None if context is None else context.name

    class ContextHook(ModelHook):
        _is_stateful = True

        def __init__(self) -> None:
            super().__init__()
            self.context_name = ContextName()

        def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
            self.context_name.set_context(None)
            return module

    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    hook = ContextHook()
    registry.register_hook(hook, _CONTEXT_HOOK)

    def remove() -> None:
        registry.remove_hook(_CONTEXT_HOOK, recurse=False)
        if transformer.__dict__.get("forward") == type(transformer).forward.__get__(transformer):
            del transformer.forward  # the registry leaves the bound method behind: back to the class's

    return hook.context_name, remove


def add_batch_hooks(transformer: torch.nn.Module) -> None:
    """The pre-hook that names each call and doubles a guide call's batch, and the hook that keeps
    the window half of its output (after the install's own hooks; removed with them)."""
    installed = getattr(transformer, INSTALLED_ATTRIBUTE)
    state: FreeSwimState = installed.state
    context = _context_name_source(transformer, installed)
    previous: dict[str, Any] = {"latents": None, "calls": 0}

    def before(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        hidden_states = _argument(args, kwargs, 0)
        text = _argument(args, kwargs, 2)
        _check_cross_processors(module, installed)
        cond = _is_conditional(context(), hidden_states, previous)
        state.text_tokens = text.shape[1] if isinstance(text, torch.Tensor) else None
        batch = hidden_states.shape[0]
        key = (state.grid, batch, hidden_states.dtype, hidden_states.device, state.text_tokens)
        state.role = UNCOND if not cond else _conditional_role(state, key)
        if state.role != GUIDE:
            return None
        state.cache.clear()
        state.cache_key, state.last_guide_step = key, state.step
        state.guide_steps.append(state.step)
        args = tuple(_doubled(value, batch) if i < len(BATCHED_INPUTS) else value for i, value in enumerate(args))
        kwargs = {name: _doubled(value, batch) if name in BATCHED_INPUTS else value for name, value in kwargs.items()}
        return args, kwargs

    def after(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        role, state.role = state.role, PLAIN
        if role != GUIDE:
            return None
        batch = _argument(args, kwargs, 0).shape[0] // 2
        if isinstance(output, tuple):
            return (output[0][:batch], *output[1:])
        output.sample = output.sample[:batch]
        return output

    pre = transformer.register_forward_pre_hook(torch.compiler.disable(before), with_kwargs=True)
    post = transformer.register_forward_hook(torch.compiler.disable(after), with_kwargs=True)
    installed.undo.extend([pre.remove, post.remove, state.close])


def _context_name_source(transformer: torch.nn.Module, installed: Any):
    """A function giving the current diffusers cache context name (None when none is set)."""
    if not hasattr(transformer, "cache_context"):
        return lambda: None
    receiver, remove = _context_receiver(transformer)
    installed.undo.append(remove)
    return lambda: receiver.name


def _argument(args: tuple, kwargs: dict, position: int) -> Any:
    name = BATCHED_INPUTS[position]
    return kwargs[name] if name in kwargs else (args[position] if len(args) > position else None)


def _doubled(value: Any, batch: int) -> Any:
    """``value`` repeated along the batch (a tensor with that batch), else as it is."""
    if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == batch:
        return torch.cat([value, value])
    return value


def _is_conditional(context_name: str | None, hidden_states: torch.Tensor, previous: dict[str, Any]) -> bool:
    """Whether this transformer call is the conditional pass (see the module docstring)."""
    if context_name is not None:
        if context_name not in ("cond", "uncond"):
            raise UserError(f"FreeSwim: the transformer was called in the cache context {context_name!r}; it knows "
                            "'cond' and 'uncond' only")
        return context_name == "cond"
    last = previous["latents"]() if previous["latents"] is not None else None
    if last is hidden_states:
        previous["calls"] += 1
        if previous["calls"] > 2:
            raise UserError(
                "FreeSwim: the transformer was called a third time on the same latents within a step; it can tell "
                "only the conditional (first) and unconditional (second) calls apart. Use a pipeline that calls "
                "the transformer once per pass, or set transformer.cache_context('cond'/'uncond') around the calls"
            )
        return False
    previous["latents"], previous["calls"] = weakref.ref(hidden_states), 1
    return True


def _conditional_role(state: FreeSwimState, key: tuple) -> str:
    """GUIDE on ``range(0, steps, cache_steps)`` (and whenever the cache cannot serve: empty, another
    size, an unknown step, a new run), else CACHED."""
    step, last = state.step, state.last_guide_step
    if not state.cache or state.cache_key != key or step is None or last is None or step <= last:
        return GUIDE
    return GUIDE if step - last >= state.config.cache_steps else CACHED


def _check_cross_processors(transformer: torch.nn.Module, installed: Any) -> None:
    """:class:`UserError` when a cross-attention layer no longer runs FreeSwim's processor (e.g.
    steering installed after FreeSwim): the guide branch's override would be silently lost."""
    for name, _ in installed.layers:
        if not name.endswith("attn2"):
            continue
        processor = transformer.get_submodule(name).processor
        if not isinstance(processor, FreeSwimWanProcessor) or processor.state is not installed.state:
            raise UserError(
                f"FreeSwim: {name} runs {type(processor).__name__}, not FreeSwim's processor (another cross-attention "
                "processor, e.g. diffattn.steer, was installed after FreeSwim); FreeSwim and steering do not "
                "compose: remove one, or apply FreeSwim again"
            )

