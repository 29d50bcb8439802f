"""The one template of every family's sparse processor.

A call to a family processor goes, in this order:

1. not a self-attention call of this layer (cross-attention, text-only attention): the stock
   processor, always. Not a fallback: these calls are never sparsified, by design.
2. kept dense by the schedule (a dense warm-up or last step, a dense layer): the stock processor.
   Not a fallback either.
3. :meth:`SparseAttnProcessor.fallback_reason` gives a reason (no token grid, a context-parallel
   mode other than Ulysses, text tokens that are not the grid's, ...): the stock processor, and the state
   records a fallback (one :class:`~diffattn.errors.DenseFallbackWarning` per reason, or a
   :class:`~diffattn.errors.UserError` with ``on_unsupported="raise"``).
4. otherwise :meth:`SparseAttnProcessor.sparse`: by default the stock processor's own code (its
   projections, norms, rotary embedding and output projections, so LoRA, peft and fused QKV keep
   working exactly as in diffusers) with only its attention op replaced by diffattn's. That op
   runs the kernel through :meth:`~diffattn.processors.state.SparsityState.attend`; when the
   kernel refuses the inputs it runs the stock op instead (a fallback, nothing recomputed).

A family file says only what differs: the stock classes it reproduces, the name of the attention
op inside the stock ``__call__`` (diffusers' ``dispatch_attention_fn``, or ``F`` for processors
that call ``F.scaled_dot_product_attention``), its ``__call__`` parameter names, and what makes a
call of its layers a self-attention call.

Under diffusers' Ulysses context parallelism the replaced op sees a sequence shard and runs the
kernel between two all-to-alls (see :mod:`diffattn.processors.parallel`).

Under ``torch.compile`` the whole flow above is traced (into the graph of the transformer's
forward, no graph break): it reads only what the transformer's pre-hook published on the
:class:`~diffattn.processors.state.SparsityState`, and the copy of the stock ``__call__`` is built
eagerly by that hook (:meth:`SparseAttnProcessor.prepare`). Fallbacks are noted and warned about
after the forward (see :mod:`diffattn.processors.state`); a data-dependent key-padding mask (joint
attention) or a profiler's observer costs a graph break.
"""

from __future__ import annotations

import importlib
import inspect
import types
import warnings
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F

from ..errors import DenseFallbackWarning
from .joint import joint_attention
from .parallel import context_parallel_problem, ulysses_attention, ulysses_degree
from .state import SparseUnsupported, SparsityState

#: The fallback reason of every call under context parallelism on a family without a Ulysses path.
CONTEXT_PARALLEL = ("context parallelism on a family diffattn has no Ulysses path for (the layer sees a shard of "
                    "the sequence, not the grid; Ulysses is supported for Wan, LTX-Video and FLUX)")
#: Not a fallback: the schedule keeps this call dense (a dense step or layer).
SCHEDULED_DENSE = "dense step or layer"
#: The fallback reason of a processor that diffusers created without diffattn (no state yet).
NOT_INSTALLED = "the processor was created without diffattn.apply/sparse_processors (no SparsityState)"

# Reasons already warned about by processors that have no state to remember them.
_WARNED_WITHOUT_STATE: set[str] = set()


def _on_stock(name: str) -> tuple[Callable[[Any], Any], Callable[[Any, Any], None]]:
    """Getter and setter of an attribute that lives on the wrapped stock processor."""

    def get(self: Any) -> Any:
        return getattr(self.stock, name, None)

    def put(self: Any, value: Any) -> None:
        setattr(self.stock, name, value)

    return get, put


class SparseAttnProcessor:
    """Base of the sparse processors; owns the flow of every call (see the module docstring).

    Args:
        stock: the processor this one replaces (runs every call that is not sparse). None (as
            when diffusers re-creates processors by calling their class with no arguments, e.g.
            ``load_ip_adapter``) creates the family's default stock processor.
        state: the transformer's :class:`SparsityState`; None until installed (a processor
            without one runs stock with a :class:`DenseFallbackWarning`; an installed
            transformer's pre-hook adopts such processors on its next call).
        layer_index: the transformer block index of this layer.

    Example:
        >>> class Echo(SparseAttnProcessor, parameters=("attn", "hidden_states")):
        ...     pass
        >>> echo = Echo(stock=lambda attn, hidden_states: hidden_states)
        >>> import warnings
        >>> with warnings.catch_warnings(record=True):   # no state: runs the stock processor
        ...     echo(None, "stock output")
        'stock output'
    """

    #: Class names of the stock processors whose computation this processor reproduces.
    stock_classes: ClassVar[tuple[str, ...]] = ()
    #: ``"module:Class"`` of the stock processor made when the class is called without one.
    default_stock: ClassVar[str] = ""
    #: Name of the global the stock ``__call__`` reaches its attention op through:
    #: ``"dispatch_attention_fn"`` (``[B, N, H, D]`` tensors) or ``"F"`` (``torch.nn.functional``,
    #: ``scaled_dot_product_attention`` on ``[B, H, N, D]``); empty when ``sparse`` is overridden.
    attention_global: ClassVar[str] = ""
    #: The stock ``__call__``'s parameters after ``self`` (diffusers filters the keyword
    #: arguments it passes by this signature, so it must be the stock one).
    call_parameters: ClassVar[tuple[str, ...]] = (
        "attn", "hidden_states", "encoder_hidden_states", "attention_mask", "image_rotary_emb",
    )
    #: Whether the family runs sparse under diffusers' Ulysses context parallelism: its attention op
    #: is ``dispatch_attention_fn`` and how its model's ``_cp_plan`` shards the self-attention
    #: sequence is known (video only, or each rank's text then video share).
    ulysses: ClassVar[bool] = False
    #: The extension point of attention edits on the text columns: an object with
    #: ``run_stock(stock, call, layer_index)`` (every stock run of this layer goes through it) and
    #: ``sparse_attention(processor, q, k, v, key_padding, parallel_config)`` (the sparse call's attention,
    #: or None to run ours). :func:`diffattn.steer` sets it (a
    #: :class:`~diffattn.processors.steering.TextSteering`); None runs the stock processor as it is.
    text_steering: Any = None

    def __init_subclass__(
        cls,
        stock: str = "",
        reproduces: tuple[str, ...] = (),
        attention_op: str = "",
        parameters: tuple[str, ...] = (),
        **kwargs: Any,
    ) -> None:
        """A family declares itself in its class statement: ``stock`` (``"module:Class"``, made
        when diffusers calls the class without arguments, and reproduced), ``reproduces`` (more
        stock class names it reproduces), ``attention_op`` and ``parameters`` (see the attributes)."""
        super().__init_subclass__(**kwargs)
        if stock:
            cls.default_stock = stock
            cls.stock_classes = (stock.partition(":")[2], *reproduces)
        cls.attention_global = attention_op or cls.attention_global
        cls.call_parameters = parameters or cls.call_parameters
        names = cls.call_parameters
        parameters = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        parameters += [
            inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                              default=None if i >= 2 else inspect.Parameter.empty)
            for i, name in enumerate(names)
        ]

        def __call__(self: SparseAttnProcessor, *args: Any, **kwargs: Any) -> Any:
            if len(args) > len(names):
                raise TypeError(f"{type(self).__name__} takes at most {len(names)} positional arguments")
            call = dict(zip(names, args))
            call.update(kwargs)
            return self.process(call)

        __call__.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
        __call__.__doc__ = f"The stock processor's call ``({', '.join(names)})``, sparse where possible."
        cls.__call__ = __call__  # type: ignore[method-assign]

    def __init__(self, stock: Any = None, state: SparsityState | None = None, layer_index: int = 0) -> None:
        if stock is None:
            module, _, name = self.default_stock.partition(":")
            stock = getattr(importlib.import_module(module), name)()
        self.stock = stock
        self.state = state
        self.layer_index = layer_index
        self._intercepted: Callable[..., Any] | str | None = None
        # What a compiled call did, booked by the transformer's post-hook (see take_compiled).
        self.compiled_sparse = False
        self._compiled_fallback: str | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(layer_index={self.layer_index}, stock={type(self.stock).__name__})"

    def __getstate__(self) -> dict[str, Any]:
        # The intercepted copy of the stock call closes over this very object: a copy (deepcopy,
        # pickle) builds its own.
        return {**self.__dict__, "_intercepted": None}

    # diffusers' enable_parallelism / set_attention_backend write these on the processor it finds
    # in the module: they belong to the stock processor, which runs every call that is not sparse.
    _parallel_config = property(*_on_stock("_parallel_config"))
    _attention_backend = property(*_on_stock("_attention_backend"))

    # -- the flow -------------------------------------------------------------------------------

    def process(self, call: dict[str, Any]) -> Any:
        """Run one call (the stock ``__call__``'s arguments by name) through the template."""
        if not self.is_self_attention(call):
            return self._run_stock(call)
        reason = self._decide(call)
        if reason is None:
            try:
                return self.sparse(call)
            except SparseUnsupported as unsupported:  # raised before anything was computed
                reason = unsupported.reason
                self.fall_back(reason)
        if self.state is None:
            return self._run_stock(call)
        return self.state.run_dense(self.layer_index, lambda: self._run_stock(call))

    def _run_stock(self, call: dict[str, Any]) -> Any:
        steering = self.text_steering
        return self.stock(**call) if steering is None else steering.run_stock(self.stock, call, self.layer_index)

    def _decide(self, call: dict[str, Any]) -> str | None:
        """None when the call runs sparse; else why not, recorded as a fallback unless it is the
        schedule."""
        state = self.state
        if state is not None and state.dense_now(self.layer_index):
            return SCHEDULED_DENSE
        reason = self.fallback_reason(call)
        if reason is not None:
            self.fall_back(reason)
        return reason

    def is_self_attention(self, call: dict[str, Any]) -> bool:
        """Whether the call is the self-attention this layer sparsifies (default: no
        ``encoder_hidden_states``, as in Wan's and LTX's ``attn1``)."""
        return call.get("encoder_hidden_states") is None

    def fallback_reason(self, call: dict[str, Any]) -> str | None:
        """Why this self-attention call must run the stock attention (a short string), or None.

        Families extend it (``super().fallback_reason(call) or ...``) with what only they know.
        """
        state = self.state
        if state is None:
            return NOT_INSTALLED
        if self._parallel_config is not None:
            if not (self.ulysses and self.attention_global == "dispatch_attention_fn"):
                return CONTEXT_PARALLEL
            problem = context_parallel_problem(self._parallel_config)
            if problem is not None:
                return problem
        grid = state.grid
        if grid is None:
            return state.no_grid_reason or "no token grid was published for this call"
        text = call.get("encoder_hidden_states")
        # Under context parallelism the text stream is a shard too (FLUX's cp plan splits it).
        if text is not None and text.shape[1] * ulysses_degree(self._parallel_config) != grid.text_tokens:
            return f"{text.shape[1]} text tokens where the grid has {grid.text_tokens}"
        return None

    def fall_back(self, reason: str) -> None:
        """Record a call that runs stock because of ``reason`` (warns once per reason)."""
        if self.state is not None and torch.compiler.is_compiling():
            self._compiled_fallback = reason
        elif self.state is not None:
            self.state.fall_back(reason)
        else:
            _warn_without_state(type(self).__name__, reason)

    def sparse(self, call: dict[str, Any]) -> Any:
        """The sparse call: the stock ``__call__`` with its attention op replaced by :meth:`attention`."""
        intercepted = self._intercepted if self._intercepted is not None else self.prepare()
        if isinstance(intercepted, str):
            raise SparseUnsupported(intercepted)
        return intercepted(self.stock, **call)

    @torch.compiler.disable
    def take_compiled(self) -> tuple[bool, str | None]:
        """What the last compiled call noted: whether it ran sparse, and why it fell back (or None).

        Compiled code notes these on the processor (see
        :meth:`~diffattn.processors.state.SparsityState.attend`); the post-hook books them
        (:meth:`~diffattn.processors.state.SparsityState.end_call`).
        """
        noted = self.compiled_sparse, self._compiled_fallback
        self.compiled_sparse, self._compiled_fallback = False, None
        return noted

    @torch.compiler.disable
    def prepare(self) -> Callable[..., Any] | str:
        """Build (once) the copy of the stock ``__call__`` that :meth:`sparse` runs, or the reason
        there is none. The pre-hook calls it eagerly before each transformer forward, so that
        compiled code only calls the copy (and it forgets what the previous forward noted)."""
        self.compiled_sparse, self._compiled_fallback = False, None
        if self._intercepted is None:
            stock_call = type(self.stock).__call__
            code = getattr(stock_call, "__code__", None)
            if not self.attention_global:  # the family overrides sparse(): nothing to intercept
                self._intercepted = "no stock attention op to replace"
            elif code is None or self.attention_global not in code.co_names:
                self._intercepted = (
                    f"{type(self.stock).__name__}.__call__ does not use {self.attention_global!r} in this diffusers "
                    "version, so diffattn cannot replace its attention op"
                )
            else:
                self._intercepted = _with_global(stock_call, self.attention_global, self._replacement())
        return self._intercepted

    def attention(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding: torch.Tensor | None = None,
        stock_op: Callable[[], torch.Tensor] | None = None,
        parallel_config: Any = None,
    ) -> torch.Tensor:
        """Sparse attention ``[B, N, H, D]`` over the grid's token order (text dense both ways).

        When the kernel cannot run these inputs, ``stock_op()`` (the stock attention op on the same
        inputs) runs instead as a fallback; without ``stock_op`` the refusal propagates and the
        whole call runs stock. With a Ulysses ``parallel_config`` (diffusers' context parallelism)
        the tensors are this rank's shard ``[B, N/P, H, D]`` of the sequence (see
        :func:`~diffattn.processors.parallel.ulysses_attention`).
        """
        if self.text_steering is not None:
            steered = self.text_steering.sparse_attention(self, query, key, value, key_padding, parallel_config)
            if steered is not None:
                return steered

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   heads: tuple[int, int] | None = None) -> torch.Tensor:
            return joint_attention(self.state, self.layer_index, q, k, v, key_padding=key_padding,
                                   processor=self, heads=heads)

        try:
            if parallel_config is not None:
                return ulysses_attention(attend, query, key, value, parallel_config, self.state.grid)
            return attend(query, key, value)
        except SparseUnsupported as unsupported:
            if stock_op is None:
                raise
            self.fall_back(unsupported.reason)
            return self.state.run_dense(self.layer_index, stock_op)

    # -- the intercepted attention op ---------------------------------------------------------

    def _replacement(self) -> Any:
        if self.attention_global == "dispatch_attention_fn":
            original = type(self.stock).__call__.__globals__["dispatch_attention_fn"]

            def dispatch(query, key, value, attn_mask=None, *args, **kwargs):  # [B, N, H, D]
                return self._intercept(query, key, value, attn_mask, False,
                                       lambda: original(query, key, value, attn_mask, *args, **kwargs), args, kwargs)

            return dispatch
        if self.attention_global == "F":
            def sdpa(query, key, value, attn_mask=None, *args, **kwargs):  # [B, H, N, D]
                def stock_op():
                    return F.scaled_dot_product_attention(query, key, value, attn_mask, *args, **kwargs)

                return self._intercept(query, key, value, attn_mask, True, stock_op, args, kwargs)

            return _FunctionalWith(scaled_dot_product_attention=sdpa)
        raise TypeError(f"{type(self).__name__}.attention_global must be 'dispatch_attention_fn' or 'F'")

    def _intercept(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: Any,
                   heads_first: bool, stock_op: Callable[[], torch.Tensor], args: tuple, kwargs: dict) -> torch.Tensor:
        """The stock processor's attention op, sparse when this is the layer's self-attention."""
        sequence = 2 if heads_first else 1
        if key.shape[sequence] != query.shape[sequence]:
            # An attention to other tokens inside the stock call (IP-Adapter image tokens, Wan I2V
            # image context): dense by design, like cross-attention.
            return stock_op()
        if heads_first:
            query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        reason = _op_options_problem(args, kwargs)
        key_padding = None
        if reason is None and attn_mask is not None:
            key_padding = key_padding_from_mask(attn_mask, query.shape[0], query.shape[1])
            if isinstance(key_padding, str):
                reason = key_padding
        if reason is not None:
            self.fall_back(reason)
            return self.state.run_dense(self.layer_index, stock_op)
        out = self.attention(query, key, value, key_padding, stock_op=lambda: _heads_second(stock_op(), heads_first),
                             parallel_config=kwargs.get("parallel_config"))
        return out.transpose(1, 2) if heads_first else out


@torch.compiler.disable
def _warn_without_state(processor: str, reason: str) -> None:
    if reason not in _WARNED_WITHOUT_STATE:
        _WARNED_WITHOUT_STATE.add(reason)
        warnings.warn(f"diffattn: {processor} runs the stock dense attention: {reason}",
                      DenseFallbackWarning, stacklevel=5)


def _heads_second(out: torch.Tensor, heads_first: bool) -> torch.Tensor:
    return out.transpose(1, 2) if heads_first else out


def _op_options_problem(args: tuple, kwargs: dict) -> str | None:
    """Why the attention op's extra options (dropout, causal, scale, ...) rule out the kernel."""
    names = ("dropout_p", "is_causal", "scale", "enable_gqa")
    options = dict(zip(names, args))
    options.update(kwargs)
    if options.get("dropout_p", 0.0) or options.get("is_causal", False) or options.get("enable_gqa", False):
        return "attention dropout, a causal or a grouped-query attention op"
    if options.get("scale") is not None:
        return "an explicit attention scale"
    return None


def key_padding_from_mask(attention_mask: torch.Tensor, batch: int, tokens: int) -> torch.Tensor | str:
    """The ``[B, N]`` bool key-padding mask (True = may be attended) an attention mask stands for.

    A boolean ``[B|1, 1, 1, N]`` or ``[B|1, N]`` mask is one; anything else (an additive float mask,
    a per-query mask) cannot be expressed as one, and the answer is the fallback reason. The joint
    attention masks text keys only: a mask on video tokens is also a reason.

    Example:
        >>> mask = torch.tensor([[True, True, False]])
        >>> key_padding_from_mask(mask[:, None, None, :], 2, 3).shape
        torch.Size([2, 3])
        >>> key_padding_from_mask(mask.float(), 1, 3)
        'an attention mask that is not a boolean key-padding mask'
    """
    reason = "an attention mask that is not a boolean key-padding mask"
    if attention_mask.dtype != torch.bool or attention_mask.shape[-1] != tokens:
        return reason
    if attention_mask.ndim == 4 and attention_mask.shape[1:3] == (1, 1):
        mask = attention_mask[:, 0, 0]
    elif attention_mask.ndim == 2:
        mask = attention_mask
    else:
        return reason
    if mask.shape[0] not in (1, batch):
        return reason
    return mask.expand(batch, tokens)


class _FunctionalWith:
    """``torch.nn.functional`` with some functions replaced (the ``F`` a stock call sees)."""

    def __init__(self, **replacements: Any) -> None:
        self.__dict__.update(replacements)

    def __getattr__(self, name: str) -> Any:
        return getattr(F, name)


def _with_global(function: types.FunctionType, name: str, replacement: Any) -> types.FunctionType:
    """A copy of ``function`` that sees ``replacement`` as its global ``name``.

    Nothing is patched: diffusers' module and every other caller keep the original. The copy
    reads a snapshot of the function's module globals taken here.

    Example:
        >>> def area(side):
        ...     return pow(side, 2)
        >>> _with_global(area, "pow", lambda x, n: "replaced")(3), area(3)
        ('replaced', 9)
    """
    namespace = dict(function.__globals__)
    namespace[name] = replacement
    # Without a module name torch.compile guards the copy's globals as this very dict (with it,
    # dynamo would read them from the named module, which holds the original).
    namespace.pop("__name__", None)
    copy = types.FunctionType(function.__code__, namespace, function.__name__, function.__defaults__,
                              function.__closure__)
    copy.__kwdefaults__ = function.__kwdefaults__
    return copy
