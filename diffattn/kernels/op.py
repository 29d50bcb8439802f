"""The sparse attention as a registered PyTorch custom op, so that ``torch.compile`` sees one node.

``diffattn::block_sparse_attention`` runs a backend's kernels (``cpu`` or ``triton``) on q, k, v
already in kernel token order; ``diffattn::block_sparse_attention_backward`` is its gradient.
Both have fake (meta) implementations, so dynamo and AOTAutograd trace them without running
them, and the pair is tied together with :func:`torch.library.register_autograd`: a compiled
graph calls the same kernels, forward and backward, as eager mode.

A :class:`BlockLayout` is a Python object and custom ops take only tensors and scalars: the op
takes the layout's tensors (``kv_counts``, ``kv_indices``, ``kv_mask_ids``, ``masks``, ``kv_levels`` or None) and
its three sizes and rebuilds a lightweight layout around them inside. The permutation stays
outside (plain ``index_select`` in :mod:`.api`, traced as is). Per-layout kernel data (CPU
plans, Triton tile lists) is cached by those tensors (:mod:`._cache`), so the rebuilt object
costs nothing, and layers whose layouts have equal shapes share one compiled graph: the layout
tensors are graph inputs, guarded on shape and dtype only, never on identity.

Validation is not in here: :func:`diffattn.kernels.block_sparse_attention` checks its inputs
before calling the op (under ``torch.compile`` that check runs once, while tracing).
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

from ..errors import UserError
from ..patterns.layout import BlockLayout
from .backends import BACKENDS

_LAYOUT_ARGS = (
    "Tensor kv_counts, Tensor kv_indices, Tensor kv_mask_ids, Tensor masks, Tensor? kv_levels, int num_tokens, "
    "int block_q, int block_k"
)


def _layout_args(layout: BlockLayout) -> tuple:
    """A layout as the op's arguments (the inverse of :func:`_layout_view`)."""
    return (layout.kv_counts, layout.kv_indices, layout.kv_mask_ids, layout.masks, layout.kv_levels,
            layout.num_tokens, layout.block_q, layout.block_k)  # fmt: skip


def _layout_view(kv_counts, kv_indices, kv_mask_ids, masks, kv_levels, num_tokens, block_q, block_k) -> BlockLayout:  # type: ignore[no-untyped-def]
    layout = BlockLayout(num_tokens, block_q, block_k, kv_counts, kv_indices, kv_mask_ids, masks)
    # The levels were validated when the caller's layout was built: set them without checking
    # again (a check reads the tensors: a device sync per call).
    object.__setattr__(layout, "kv_levels", kv_levels)
    return layout


def _kernels(backend: str) -> ModuleType:
    """The module with ``kernel_forward`` / ``kernel_backward`` of a backend (imported lazily:
    Triton is slow to import and maybe absent)."""
    module = BACKENDS[backend].module
    if module is None:
        raise UserError(f"backend={backend!r} runs as plain PyTorch ops, not through the custom op")
    return importlib.import_module(f"{__package__}.{module}")


def _lse_dtype(q: torch.Tensor) -> torch.dtype:
    # float64 inputs (the CPU path's gradient checks) get a float64 log-sum-exp.
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _no_lse(q: torch.Tensor) -> torch.Tensor:
    """The op's second output when the log-sum-exp was not asked for: an empty tensor."""
    return q.new_empty((0,), dtype=_lse_dtype(q))


@torch.library.custom_op("diffattn::block_sparse_attention", mutates_args=())
def _forward_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    kv_counts: torch.Tensor, kv_indices: torch.Tensor, kv_mask_ids: torch.Tensor, masks: torch.Tensor,
    kv_levels: torch.Tensor | None, num_tokens: int, block_q: int, block_k: int,
    scale: float, want_lse: bool, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    layout = _layout_view(kv_counts, kv_indices, kv_mask_ids, masks, kv_levels, num_tokens, block_q, block_k)
    out, lse = _kernels(backend).kernel_forward(q, k, v, layout, scale, want_lse)
    return out, (lse if want_lse else _no_lse(q))


@_forward_op.register_fake
def _forward_fake(q, k, v, kv_counts, kv_indices, kv_mask_ids, masks, kv_levels, num_tokens, block_q, block_k,  # type: ignore[no-untyped-def]
                  scale, want_lse, backend):
    out = q.new_empty(q.shape)
    return out, (q.new_empty(q.shape[:-1], dtype=_lse_dtype(q)) if want_lse else _no_lse(q))


@torch.library.custom_op("diffattn::block_sparse_attention_backward", mutates_args=())
def _backward_op(
    grad_out: torch.Tensor, grad_lse: torch.Tensor | None,
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    kv_counts: torch.Tensor, kv_indices: torch.Tensor, kv_mask_ids: torch.Tensor, masks: torch.Tensor,
    kv_levels: torch.Tensor | None, num_tokens: int, block_q: int, block_k: int,
    scale: float, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    layout = _layout_view(kv_counts, kv_indices, kv_mask_ids, masks, kv_levels, num_tokens, block_q, block_k)
    dq, dk, dv = _kernels(backend).kernel_backward(q, k, v, out, lse, grad_out, grad_lse, layout, scale)
    return dq, dk, dv


@_backward_op.register_fake
def _backward_fake(grad_out, grad_lse, q, k, v, *rest):  # type: ignore[no-untyped-def]
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    q, k, v, *layout_tensors = inputs[:8]  # kv_levels (the 8th) may be None: save_for_backward keeps it
    ctx.save_for_backward(q, k, v, *output, *layout_tensors)
    ctx.sizes = inputs[8:11]
    ctx.scale, ctx.want_lse, ctx.backend = inputs[11:14]


def _backward(ctx, grad_out, grad_lse):  # type: ignore[no-untyped-def]
    q, k, v, out, lse, *layout_tensors = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    grad_lse = grad_lse if ctx.want_lse else None
    dq, dk, dv = _backward_op(
        grad_out, grad_lse, q, k, v, out, lse, *layout_tensors, *ctx.sizes, ctx.scale, ctx.backend
    )
    return (dq, dk, dv) + (None,) * 11


torch.library.register_autograd("diffattn::block_sparse_attention", _backward, setup_context=_setup_context)


def attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout, scale: float, return_lse: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run ``backend``'s kernels through the custom op (differentiable, traceable, no checks).

    Args:
        q, k, v: ``[B, H, N, D]`` in kernel token order, validated for ``backend``.
        layout: on the tensors' device; its permutation is ignored (already applied).
        scale: score scale.
        return_lse: return the log-sum-exp too. The forward also computes it, without returning
            it, when a gradient will be taken and the backend's backward reads it
            (:attr:`~diffattn.kernels.backends.Backend.backward_needs_lse`).
        backend: ``"cpu"`` or ``"triton"`` (a backend with a kernel module).

    Returns:
        ``out [B, H, N, D]`` (contiguous, ``q.dtype``) and ``lse [B, H, N]`` float32 (None unless
        ``return_lse``).

    Example:
        >>> from diffattn import Dense, VideoGrid
        >>> layout = Dense().layout(VideoGrid(1, 4, 8), block_size=32)
        >>> q = torch.randn(1, 2, 32, 16)
        >>> out, lse = attention_op(q, q, q, layout, 0.25, True, "cpu")
        >>> out.shape, lse.shape
        (torch.Size([1, 2, 32, 16]), torch.Size([1, 2, 32]))
    """
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    want_lse = return_lse or (needs_grad and BACKENDS[backend].backward_needs_lse)
    out, lse = _forward_op(q, k, v, *_layout_args(layout), float(scale), bool(want_lse), backend)
    return out, (lse if return_lse else None)


__all__ = ["attention_op"]
