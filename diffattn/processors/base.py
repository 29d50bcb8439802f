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
