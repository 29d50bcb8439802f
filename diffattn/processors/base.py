"""What every family's sparse processor holds."""

from __future__ import annotations

from typing import Any

from .state import SparsityState


class SparseAttnProcessor:
    """Base of the sparse processors: the stock processor it replaces, the shared state, its layer.

    Subclasses reproduce their family's stock self-attention path and call ``self.stock`` for
    every call they must not (or cannot exactly) sparsify.

    Args:
        stock: the processor this one replaces (runs every dense call).
        state: the transformer's :class:`SparsityState`.
        layer_index: the transformer block index of this layer.
    """

    def __init__(self, stock: Any, state: SparsityState, layer_index: int) -> None:
        self.stock = stock
        self.state = state
        self.layer_index = layer_index

    def __repr__(self) -> str:
        return f"{type(self).__name__}(layer_index={self.layer_index}, stock={type(self.stock).__name__})"

    def run_stock(self, *args: Any, **kwargs: Any) -> Any:
        """``self.stock(*args, **kwargs)``: every call this processor does not sparsify goes here.

        With a profiler's observer on the state, a self-attention call that the schedule keeps
        dense (a dense step or layer) goes through it instead, so that it is counted and its core
        attention op timed. Without one this costs one attribute check.

        Example:
            >>> if not self.state.sparse_now(self.layer_index, hidden_states.shape[1]):
            ...     return self.run_stock(attn, hidden_states, None, None, rotary_emb)
        """
        state = self.state
        if state.observer is not None and state.take_scheduled_dense(self.layer_index):
            return state.run_dense(self.layer_index, self.stock, args, kwargs)
        return self.stock(*args, **kwargs)


def heads_qkv(attn: Any, hidden_states: Any, added: bool = False) -> tuple[Any, Any, Any]:
    """``q, k, v`` ``[B, N, H, D]``: projections split into ``attn.heads``, then the optional
    per-head norms (HunyuanVideo's and Mochi's order).

    With ``added`` the text-stream projections (``add_q_proj``, ``add_k_proj``, ``add_v_proj``) and
    their norms (``norm_added_q``, ``norm_added_k``) are used instead of ``to_q/to_k/to_v`` and
    ``norm_q/norm_k``. Going through the attention module's own linears keeps LoRA and peft working.
    """
    if added:
        projections, norms = ("add_q_proj", "add_k_proj", "add_v_proj"), ("norm_added_q", "norm_added_k")
    else:
        projections, norms = ("to_q", "to_k", "to_v"), ("norm_q", "norm_k")
    query, key, value = (getattr(attn, name)(hidden_states).unflatten(2, (attn.heads, -1)) for name in projections)
    norm_q, norm_k = (getattr(attn, name, None) for name in norms)
    if norm_q is not None:
        query = norm_q(query)
    if norm_k is not None:
        key = norm_k(key)
    return query, key, value
