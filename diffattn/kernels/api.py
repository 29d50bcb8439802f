"""The one public entry point for block-sparse attention: validation, permutation and dispatch.

Backends (declared with their capabilities in :mod:`diffattn.kernels.backends`) work in *kernel
token order* (``layout.permutation`` applied) on validated inputs:

* ``"triton"``: the block-sparse FlashAttention kernels (CUDA tensors; CPU tensors only under
  ``TRITON_INTERPRET=1``). Imported lazily: ``import diffattn`` never imports Triton.
* ``"cpu"``: the batched exact PyTorch path of :mod:`diffattn.kernels.cpu` (CPU tensors).
* ``"reference"``: dense masked attention built from ``layout.token_mask()`` (any device; O(N^2)
  memory, for tests and small inputs); for a layout with pooled tiles (``layout.kv_levels``),
  :func:`~diffattn.kernels.reference.pooled_attention_reference`.
* ``"auto"``: ``"triton"`` for CUDA tensors, ``"cpu"`` for CPU tensors. The choice depends on the
  tensors' device only, never on whether Triton happens to import: launching a compiled Triton
  kernel on CPU tensors fails.

``"cpu"`` and ``"triton"`` run through the custom op ``diffattn::block_sparse_attention``
(:mod:`diffattn.kernels.op`), so ``torch.compile(..., fullgraph=True)`` traces a call without a
graph break; the checks here then run once, while tracing.
"""

from __future__ import annotations

import math
import weakref
from typing import Any

import torch

from ..errors import UserError
from ..patterns._checks import is_finite_number
from ..patterns.layout import BlockLayout
from .backends import BACKENDS, resolve_backend
from .op import attention_op
from .reference import masked_attention_reference, pooled_attention_reference

# dtypes some backend accepts (checked even when the backend name is wrong, so that every
# reason is listed at once).
_ANY_BACKEND_DTYPES = tuple(dict.fromkeys(d for b in BACKENDS.values() for d in b.dtypes))

# Layouts moved to the inputs' device, per source layout: moving on every call would defeat the
# per-layout caches (CPU plans, Triton metadata) that key on the layout object.
_MOVED: "weakref.WeakKeyDictionary[BlockLayout, dict[str, BlockLayout]]" = weakref.WeakKeyDictionary()


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"shape={tuple(x.shape)} ({x.dtype}, {x.device})"
    if isinstance(x, BlockLayout):
        short = (f"BlockLayout(N={x.num_tokens}, block=({x.block_q}, {x.block_k}), heads={x.num_heads}, "
                 f"device={x.device})")
        if torch.compiler.is_compiling():  # the statistics in repr() are tensor reductions
            return short
        try:
            return repr(x)
        except Exception:  # e.g. a layout on the meta device cannot compute its statistics
            return short
    return f"{type(x).__name__} {x!r}"


def _input_problems(q: Any, k: Any, v: Any, layout: Any, scale: Any, return_lse: Any) -> list[str]:
    """Reasons the inputs are invalid for every backend (empty when they are fine)."""
    problems: list[str] = []
    tensors = {"q": q, "k": k, "v": v}
    for name, x in tensors.items():
        if not isinstance(x, torch.Tensor):
            problems.append(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(layout, BlockLayout):
        problems.append(f"layout must be a BlockLayout (e.g. pattern.layout(grid)), got {type(layout).__name__}")
    if scale is not None and not (is_finite_number(scale) and scale > 0):
        problems.append(f"scale must be None or a finite number > 0, got {scale!r}")
    if not isinstance(return_lse, bool):
        problems.append(f"return_lse must be a bool, got {return_lse!r}")
    if problems and any(not isinstance(x, torch.Tensor) for x in tensors.values()):
        return problems

    for name, x in tensors.items():
        if x.dim() != 4:
            problems.append(f"{name} must have 4 dimensions [B, H, N, D], got {x.dim()} (shape {tuple(x.shape)})")
    if k.shape != q.shape or v.shape != q.shape:
        problems.append(
            f"q, k and v must have the same shape [B, H, N, D]; got q={tuple(q.shape)}, k={tuple(k.shape)}, "
            f"v={tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype):
        problems.append(f"q, k and v must have the same dtype; got q={q.dtype}, k={k.dtype}, v={v.dtype}")
    if not (q.device == k.device == v.device):
        problems.append(f"q, k and v must be on the same device; got q={q.device}, k={k.device}, v={v.device}")
    if q.dim() == 4 and isinstance(layout, BlockLayout):
        _, heads, n, dim = q.shape
        if n != layout.num_tokens:
            problems.append(f"N={n} (q.shape[2]) does not match layout.num_tokens={layout.num_tokens}")
        if layout.num_heads not in (1, heads):
            problems.append(
                f"layout.num_heads={layout.num_heads} does not match the H={heads} heads of q; "
                f"allowed: 1 (shared by all heads) or {heads} (per head)"
            )
        if dim == 0:
            problems.append("head dim D (q.shape[3]) must be >= 1, got 0")
    return problems


def _table_problems(backend: str | None, q: Any, layout: Any) -> list[str]:
    """What the backend's capabilities table refuses (device, dtype, head dim, block sizes).

    With an unknown backend only the dtype is checked, against what any backend accepts.
    """
    if not isinstance(q, torch.Tensor):
        return []
    if backend is None:
        if q.dtype in _ANY_BACKEND_DTYPES:
            return []
        allowed = ", ".join(str(d).replace("torch.", "") for d in _ANY_BACKEND_DTYPES)
        return [f"dtype={str(q.dtype).replace('torch.', '')} is not supported by any backend; allowed: {allowed}"]
    head_dim = int(q.shape[-1]) if q.dim() == 4 and q.shape[-1] > 0 else None
    is_layout = isinstance(layout, BlockLayout)
    block_q, block_k = (layout.block_q, layout.block_k) if is_layout else (None, None)
    return BACKENDS[backend].problems(q.device, q.dtype, head_dim, block_q, block_k)


def _triton_problems(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout) -> list[str]:
    """The Triton backend's own reasons beyond the table (imported lazily: Triton is slow to
    import, maybe absent)."""
    try:
        from . import triton_attention
    except Exception as exc:  # ImportError, or Triton failing to initialise
        return [f"backend='triton' is unavailable: importing diffattn.kernels.triton_attention failed ({exc!r})"]
    return list(triton_attention.triton_support_problems(q, k, v, layout))


def _raise(problems: list[str], backend: Any, q: Any, k: Any, v: Any, layout: Any) -> None:
    lines = [
        "block_sparse_attention is not supported with these inputs:",
        f"     q       : {_describe(q)}",
        f"     k       : {_describe(k)}",
        f"     v       : {_describe(v)}",
        f"     layout  : {_describe(layout)}",
        f"     backend : {backend!r}",
        f"`{backend}` is not supported because:",
    ]
    lines += [f"    {p}" for p in problems]
    raise UserError("\n".join(lines))


def _layout_on(layout: BlockLayout, device: torch.device) -> BlockLayout:
    if layout.device == device:
        return layout
    per_device = _MOVED.setdefault(layout, {})
    key = str(device)
    if key not in per_device:
        per_device[key] = layout.to(device)
    return per_device[key]


def _check(
    q: Any, k: Any, v: Any, layout: Any, scale: Any, return_lse: Any, backend: Any
) -> tuple[str | None, list[str]]:
    """(resolved backend, every reason the call would be refused); no reasons means it runs."""
    problems = _input_problems(q, k, v, layout, scale, return_lse)
    device = q.device if isinstance(q, torch.Tensor) else torch.device("cpu")
    resolved, backend_problems = resolve_backend(backend, device)
    problems += backend_problems + _table_problems(resolved, q, layout)
    if not problems and resolved == "triton":
        problems = _triton_problems(q, k, v, _layout_on(layout, device))
    return resolved, problems


def support_problems(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout, backend: str = "auto"
) -> list[str]:
    """Every reason :func:`block_sparse_attention` would refuse these inputs (``[]`` when it runs them).

    Processors ask this before a sparse call, so that an input the backend does not support (a
    head dim, a dtype, a device) runs the stock attention with a warning instead of failing
    mid-generation.

    Example:
        >>> from diffattn import Dense, VideoGrid
        >>> layout = Dense().layout(VideoGrid(1, 4, 4), block_size=32)
        >>> q = torch.randn(1, 1, 16, 8, dtype=torch.float64)
        >>> support_problems(q, q, q, layout)
        ["dtype=float64 is not supported by backend='cpu'; allowed: float16, bfloat16, float32"]
    """
    return _check(q, k, v, layout, None, False, backend)[1]


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout,
    scale: float | None = None,
    return_lse: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention restricted to a block layout: ``out == attention masked by layout.token_mask()``.

    Args:
        q, k, v: ``[B, H, N, D]`` in the caller's token order; float16, bfloat16 or float32;
            same shape, dtype and device. ``N`` must equal ``layout.num_tokens``.
        layout: the :class:`BlockLayout` to execute (``pattern.layout(grid)``); shared by all
            heads (``num_heads == 1``) or one per head (``num_heads == H``). With pooled tiles
            (``layout.kv_levels``, PSA plans) a level-``p`` tile attends to the means of
            consecutive groups of ``p`` keys and values (kernel token order), each logit plus
            ``log(group size)``, on every backend
            (:func:`~diffattn.kernels.reference.pooled_attention_reference` states it). Moved to the inputs'
            device if needed (the moved copy is cached per layout).
        scale: score scale, default ``1 / sqrt(D)``.
        return_lse: also return the log-sum-exp of each row.
        backend: ``"auto"`` (CUDA -> ``"triton"``, CPU -> ``"cpu"``), ``"cpu"``, ``"triton"``
            (CPU tensors only with ``TRITON_INTERPRET=1``) or ``"reference"``.

    Returns:
        ``out [B, H, N, D]`` in ``q.dtype``; with ``return_lse`` also ``lse float32 [B, H, N]``,
        the natural log of the softmax denominator (scale included). Rows without any allowed key
        give ``out = 0`` and ``lse = -inf`` (never NaN). Differentiable on every backend.

    Raises:
        UserError: listing every reason the inputs or the backend are not supported (the
            backends' capabilities: :data:`diffattn.kernels.backends.BACKENDS`).

    Example:
        >>> from diffattn import Neighborhood, VideoGrid
        >>> grid = VideoGrid(4, 8, 8)
        >>> layout = Neighborhood(kernel_size=(3, 5, 5)).layout(grid, block_size=64)
        >>> q = k = v = torch.randn(1, 2, grid.num_tokens, 64)
        >>> block_sparse_attention(q, k, v, layout).shape
        torch.Size([1, 2, 256, 64])
    """
    resolved, problems = _check(q, k, v, layout, scale, return_lse, backend)
    if problems:
        shown = backend if resolved in (None, backend) else f"{backend} -> {resolved}"
        _raise(problems, shown, q, k, v, layout)
    layout = _layout_on(layout, q.device)

    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if q.numel() == 0:  # B == 0 or H == 0: nothing to attend
        # Empty, but still a function of q, k and v, so that backward() works as for any size.
        out = q * 0 + k * 0 + v * 0
        return (out, out.float().sum(-1)) if return_lse else out

    if resolved == "reference":
        if layout.is_pooled:  # token_mask() of a pooled layout is not an attention mask
            return pooled_attention_reference(q, k, v, layout, scale=scale, return_lse=return_lse)
        # token_mask() is already in the caller's order: no permutation round trip needed.
        return masked_attention_reference(q, k, v, layout.token_mask(), scale=scale, return_lse=return_lse)

    qk, kk, vk = (layout.permute_tokens(x) for x in (q, k, v))
    out, lse = attention_op(qk, kk, vk, layout, scale, return_lse, resolved)
    if return_lse:
        return layout.unpermute_tokens(out), layout.unpermute_tokens(lse, dim=-1)
    return layout.unpermute_tokens(out)
