"""Text-column edits of attention: word weights, region biases and captured word maps.

This is the attention math behind :func:`diffattn.steer`. Only the columns of the *text* keys
change, and only for the *video* queries (cross-attention: every query; joint attention: the
video queries, while text queries attend exactly as in the stock processor):

* a weight ``c_j`` multiplies the attention probability of text token ``j`` without
  renormalising (Prompt-to-Prompt's re-weighting): ``out' = sum_j p_j c_j v_j``, which is plain
  attention over values ``c_j v_j``. So the fused op scales the values of those tokens and stays
  one ``scaled_dot_product_attention``; equivalently ``out' = out + sum_j (c_j - 1) p_j v_j``.
  :class:`ColumnEdit` can also carry a ``log c`` logit bias instead (the renormalised variant).
* a region or exclusion is an additive logit bias ``b[n, j] = sum_r u_r[n] w_r[j]``: one rank
  per phrase (``u_r`` over video queries from the mask, ``w_r`` the phrase's token indicator).
  It enters the fused op as extra query and key features (``q' = [q, u / scale]``,
  ``k' = [k, w]``, zero on non-text keys), so no ``[N, N]`` or even ``[N, S]`` mask is built
  and any key padding mask passes through unchanged.
* captured maps are the summed probabilities of each captured word's tokens: extra value
  features (``v' = [c v, indicator of the word's tokens]``) make the same op return them, for
  those columns only.

Query, key and value features are zero-padded to one width (a multiple of 8) so the fused
backends take them. On a sparse joint layer (:func:`steered_split_attention`) the video->video
part runs the block-sparse kernel with its log-sum-exp and the few video->text columns are
computed explicitly (``O(N x text tokens)``), then both are merged exactly.

Layering: this module knows nothing about prompts, tokenizers or pipelines; :mod:`diffattn.steering`
turns words and masks into a :class:`ColumnEdit` for each transformer call.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field, replace
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..patterns import VideoGrid
from .base import SparseAttnProcessor, _FunctionalWith, _with_global
from .joint import _merge_parts, _text_slice, _video_slice, _with_dense_text_queries
from .state import SparseUnsupported

#: The logit bias of a hard (infinite-strength) region: exp(-HARD_BIAS) is exactly 0 in every dtype.
HARD_BIAS = 1.0e4
# Video queries per chunk of the explicit video->text part of a sparse layer.
_QUERY_CHUNK = 4096


@dataclass
class ColumnEdit:
    """What one attention call changes on its text columns, per batch row ``B`` (float32).

    Attributes:
        query_factors: ``[B | 1, N_video, R]`` ``u`` of the rank-R logit bias, or None.
        key_factors: ``[B, S, R]`` ``w`` of the bias (``b[n, j] = sum_r u[n, r] w[j, r]``), or None.
        value_scale: ``[B, S]`` P2P factors ``c`` (1 = unchanged), or None.
        capture: ``[B, S, W]`` 0/1 indicator of each captured word's tokens, or None.

    Example:
        >>> edit = ColumnEdit(value_scale=torch.tensor([[1.0, 2.0]]))
        >>> edit.is_neutral(), ColumnEdit().is_neutral()
        (False, True)
    """

    query_factors: torch.Tensor | None = None
    key_factors: torch.Tensor | None = None
    value_scale: torch.Tensor | None = None
    capture: torch.Tensor | None = None

    def is_neutral(self) -> bool:
        """Whether the edit changes nothing and captures nothing (then the stock op runs)."""
        return self.query_factors is None and self.value_scale is None and self.capture is None

    def rows(self, index: torch.Tensor | slice) -> "ColumnEdit":
        """The edit of some batch rows (a query factor shared by all rows stays shared)."""
        def pick(t: torch.Tensor | None, shared: bool = False) -> torch.Tensor | None:
            if t is None or (shared and t.shape[0] == 1):
                return t
            return t[index]

        return ColumnEdit(pick(self.query_factors, True), pick(self.key_factors), pick(self.value_scale),
                          pick(self.capture))

    def columns(self, positions: torch.Tensor) -> "ColumnEdit":
        """The edit of some text positions only (Mochi's stock processor attends the valid ones)."""
        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[:, positions]

        return replace(self, key_factors=pick(self.key_factors), value_scale=pick(self.value_scale),
                       capture=pick(self.capture))


def _augmented(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, edit: ColumnEdit, text: slice, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """``q', k', v'`` ``[B, H, *, E']`` carrying the edit (see the module docstring), and how many
    capture features follow the ``D`` value features."""
    batch, heads, _, dim = q.shape
    keys = k.shape[2]
    q_parts, k_parts, v_parts = [q], [k], []
    v = v.clone() if edit.value_scale is not None else v
    if edit.value_scale is not None:
        v[:, :, text] = v[:, :, text] * edit.value_scale[:, None, :, None].to(v.dtype)
    v_parts.append(v)
    if edit.query_factors is not None:
        rank = edit.query_factors.shape[-1]
        u = (edit.query_factors / scale).to(q.dtype)[:, None].expand(batch, heads, -1, -1)
        w = torch.zeros(batch, keys, rank, dtype=k.dtype, device=k.device)
        w[:, text] = edit.key_factors.to(k.dtype)
        q_parts.append(u)
        k_parts.append(w[:, None].expand(batch, heads, -1, -1))
    words = 0
    if edit.capture is not None:
        words = edit.capture.shape[-1]
        indicator = torch.zeros(batch, keys, words, dtype=v.dtype, device=v.device)
        indicator[:, text] = edit.capture.to(v.dtype)
        v_parts.append(indicator[:, None].expand(batch, heads, -1, -1))
    width = max(sum(t.shape[-1] for t in q_parts), sum(t.shape[-1] for t in v_parts))
    width = -(-width // 8) * 8

    def padded(parts: list[torch.Tensor]) -> torch.Tensor:
        short = width - sum(t.shape[-1] for t in parts)
        if short:
            parts = [*parts, parts[0].new_zeros(*parts[0].shape[:-1], short)]
        return torch.cat(parts, -1) if len(parts) > 1 else parts[0]

    return padded(q_parts), padded(k_parts), padded(v_parts), words


def steered_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    edit: ColumnEdit,
    text: slice,
    video: slice,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fused attention ``[B, H, N, D]`` with the text columns of the video queries edited.

    Args:
        query, key, value: ``[B, H, N, D]`` (``Nk`` keys; the text keys are ``key[:, :, text]``).
        edit: the edit, with ``N_video`` query factors and ``S = len(text)`` columns.
        text: the positions of the text keys (and of the text queries, in joint attention).
        video: the positions of the video queries (all queries in cross-attention).
        attn_mask: the stock op's mask (boolean or additive, broadcastable to ``[B, H, N, Nk]``).
        scale: the softmax scale (default ``D ** -0.5``).
    Returns:
        ``(out, maps)``: ``out`` as the stock op's, and ``maps`` ``[B, H, N_video, W]``, the
        attention mass of each captured word per video query (None without capture).

    Example:
        >>> q, k, v = torch.randn(1, 2, 6, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)
        >>> edit = ColumnEdit(capture=torch.ones(1, 4, 1))        # one word made of all 4 tokens
        >>> out, maps = steered_attention(q, k, v, edit, text=slice(0, 4), video=slice(0, 6))
        >>> torch.allclose(out, F.scaled_dot_product_attention(q, k, v), atol=1e-6), maps.shape
        (True, torch.Size([1, 2, 6, 1]))
        >>> torch.allclose(maps, torch.ones(1, 2, 6, 1))         # cross-attention: rows sum to 1
        True
    """
    dim = query.shape[-1]
    scale = dim ** -0.5 if scale is None else scale
    everything = video == slice(0, query.shape[2])
    q_video = query if everything else query[:, :, video]
    mask_video = _rows(attn_mask, video, query.shape[2])
    q_aug, k_aug, v_aug, words = _augmented(q_video, key, value, edit, text, scale)
    out_aug = F.scaled_dot_product_attention(q_aug, k_aug, v_aug, attn_mask=mask_video, scale=scale)
    maps = out_aug[..., dim : dim + words].float() if words else None
    video_out = out_aug[..., :dim]
    if everything:
        return video_out.contiguous(), maps
    out = torch.empty_like(query)
    out[:, :, video] = video_out
    rest = torch.ones(query.shape[2], dtype=torch.bool, device=query.device)
    rest[video] = False
    if bool(rest.any()):  # text queries: exactly the stock attention
        out[:, :, rest] = F.scaled_dot_product_attention(query[:, :, rest], key, value,
                                                         attn_mask=_rows(attn_mask, rest, query.shape[2]), scale=scale)
    return out, maps


def _rows(mask: torch.Tensor | None, rows: slice | torch.Tensor, queries: int) -> torch.Tensor | None:
    """The mask of some query rows (a mask broadcast over the queries stays as it is)."""
    if mask is None or mask.ndim < 2 or mask.shape[-2] != queries or queries == 1:
        return mask
    return mask[..., rows, :]


def reference_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, edit: ColumnEdit, text: slice, video: slice,
    key_padding: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The unfused reference of :func:`steered_attention` (materialised ``[N, Nk]`` probabilities,
    float64): softmax of the biased scores, then the text columns of the video rows times ``c``.
    For tests on small inputs; ``key_padding`` bool ``[B, Nk]`` (True = may be attended).

    Example:
        >>> q, k, v = torch.randn(1, 1, 3, 4), torch.randn(1, 1, 2, 4), torch.randn(1, 1, 2, 4)
        >>> edit = ColumnEdit(value_scale=torch.tensor([[2.0, 1.0]]))
        >>> fused, _ = steered_attention(q, k, v, edit, slice(0, 2), slice(0, 3))
        >>> torch.allclose(fused, reference_attention(q, k, v, edit, slice(0, 2), slice(0, 3))[0].float(), atol=1e-5)
        True
    """
    q, k, v = query.double(), key.double(), value.double()
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    queries = torch.arange(q.shape[2])[video]
    if edit.query_factors is not None:
        bias = edit.query_factors.double() @ edit.key_factors.double().transpose(-1, -2)  # [B, Nv, S]
        scores[:, :, queries, text] += bias[:, None]
    if key_padding is not None:
        scores = scores.masked_fill(~key_padding[:, None, None, :], float("-inf"))
    probs = scores.softmax(-1)
    maps = None
    if edit.capture is not None:
        maps = probs[:, :, queries][..., text] @ edit.capture.double()[:, None]
    if edit.value_scale is not None:
        factor = torch.ones(q.shape[0], 1, q.shape[2], k.shape[2], dtype=torch.float64)
        columns = torch.arange(k.shape[2])[text]
        factor[:, :, queries[:, None], columns[None, :]] = edit.value_scale.double()[:, None, None]
        probs = probs * factor
    return probs @ v, maps


# -- the sparse path (joint attention, the block-sparse kernel on video->video) -----------------------


def steered_split_attention(
    state: Any,
    layer_index: int,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_padding: torch.Tensor | None,
    edit: ColumnEdit,
    processor: Any = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Joint attention ``[B, N, H, D]`` over ``state.grid``'s order: the video->video part on the
    block-sparse kernel (with its LSE), the video->text part explicit and edited, merged exactly;
    text queries attend densely. Returns ``(out, maps [B, H, N_video, W] or None)``.

    Raises :class:`SparseUnsupported` (before computing anything big) when the kernel cannot run.
    """
    grid: VideoGrid = state.grid
    if grid is None or grid.text_tokens == 0:
        raise SparseUnsupported("no joint token grid for a steered sparse call")
    video, text = _video_slice(grid), _text_slice(grid)
    padding = key_padding if key_padding is not None else torch.ones(
        query.shape[0], query.shape[1], dtype=torch.bool, device=query.device)
    if not bool(padding[:, video].all()):
        raise SparseUnsupported("an attention mask on video tokens (only text keys may be padding)")
    q_video = query[:, video]
    out_vv, lse_vv = state.attend(q_video, key[:, video], value[:, video], layer_index,
                                  grid=VideoGrid(grid.frames, grid.height, grid.width), return_lse=True,
                                  processor=processor)
    scale = query.shape[-1] ** -0.5
    k_text = key[:, text].transpose(1, 2).float()
    v_text = value[:, text].transpose(1, 2).float()
    if edit.value_scale is not None:
        v_text = v_text * edit.value_scale[:, None, :, None]
    bias = torch.zeros(padding.shape[0], grid.text_tokens, device=query.device).masked_fill(
        ~padding[:, text], float("-inf"))
    outs, lses, chunks = [], [], []
    for start in range(0, q_video.shape[1], _QUERY_CHUNK):
        q = q_video[:, start : start + _QUERY_CHUNK].transpose(1, 2).float()
        scores = q @ k_text.transpose(-1, -2) * scale + bias[:, None, None, :]
        if edit.query_factors is not None:
            u = edit.query_factors[:, start : start + _QUERY_CHUNK]
            scores = scores + (u @ edit.key_factors.transpose(-1, -2))[:, None]
        lse = torch.logsumexp(scores, -1)
        probs = torch.where(torch.isfinite(lse)[..., None], (scores - lse[..., None]).exp(), torch.zeros_like(scores))
        outs.append((probs @ v_text).transpose(1, 2))
        lses.append(lse.transpose(1, 2))
        chunks.append((scores, lse))
    out_vt, lse_vt = torch.cat(outs, 1), torch.cat(lses, 1)
    video_out, lse = _merge_parts(out_vv, lse_vv, out_vt, lse_vt)
    maps = None
    if edit.capture is not None:
        total = lse.transpose(1, 2)  # [B, H, Nv]
        parts, start = [], 0
        for scores, _ in chunks:
            rows = scores.shape[2]
            probs = (scores - total[:, :, start : start + rows, None]).exp()
            parts.append(probs @ edit.capture[:, None])
            start += rows
        maps = torch.cat(parts, 2)
    return _with_dense_text_queries(query, key, value, video, text, video_out, padding), maps


# -- the per-transformer controller and the processor of stock layers -------------------------------


@dataclass
class CallEdit:
    """What the steering pre-hook publishes for one transformer forward.

    Attributes:
        edit: the :class:`ColumnEdit` of the forward's batch rows.
        text_position: ``"cross"`` (the keys of the text calls are all text), ``"start"`` or ``"end"``
            (joint attention: where the text tokens sit in the sequence).
        text_tokens, video_tokens: ``S`` and ``N_video`` of this forward.
        layers: the layer indices to edit (None: all steered layers).
        capture_rows: the batch rows whose maps are recorded (the conditional ones).
        level_edit: cross-attention over another query grid than the forward's (a UNet's
            coarser resolution levels): ``level_edit(queries)`` is the edit for ``queries``
            video tokens, or None (that call then runs unsteered, with a warning).
    """

    edit: ColumnEdit
    text_position: str
    text_tokens: int
    video_tokens: int
    layers: frozenset[int] | None = None
    capture_rows: torch.Tensor | None = None
    level_edit: Callable[[int], ColumnEdit | None] | None = None


@dataclass
class TextSteering:
    """The steering of one transformer: the current forward's :class:`CallEdit` (None: every
    layer runs exactly its stock op) and where captured maps go (``sink(layer_index, maps)``
    with ``maps`` ``[rows, N_video, W]``, averaged over heads).

    Example:
        >>> steering = TextSteering()
        >>> steering.edit_for(0) is None           # nothing published: stock attention
        True
    """

    call: CallEdit | None = None
    sink: Callable[[int, torch.Tensor], None] | None = None
    warn: Callable[[str], None] | None = None
    _sample: int = field(default=0, repr=False)
    _valid: torch.Tensor | None = field(default=None, repr=False)
    _calls: dict[tuple[type, int], Any] = field(default_factory=dict, repr=False)

    def edit_for(self, layer_index: int) -> CallEdit | None:
        call = self.call
        if call is None or (call.layers is not None and layer_index not in call.layers):
            return None
        return call

    def record(self, layer_index: int, maps: torch.Tensor | None, rows: slice | torch.Tensor | None = None) -> None:
        """Hand the video queries' captured maps ``[B, H, Nv, W]`` of the conditional rows to the sink."""
        call = self.call
        if maps is None or self.sink is None or call is None or call.capture_rows is None:
            return
        keep = call.capture_rows if rows is None else call.capture_rows[rows]
        if bool(keep.any()):
            self.sink(layer_index, maps[keep].mean(1))

    # The stock call with its attention op replaced ------------------------------------------------

    def run_stock(self, stock: Any, call: dict[str, Any], layer_index: int) -> Any:
        """``stock(**call)`` with the text columns of its attention op edited (exactly
        ``stock(**call)`` when this forward or layer is not steered)."""
        edit = self.edit_for(layer_index)
        if edit is None:
            return stock(**call)
        key = (type(stock), layer_index)
        if key not in self._calls:  # built once per stock class and layer
            self._calls[key] = _steered_call(stock, self, layer_index)
        function = self._calls[key]
        if function is None:
            raise UserError(f"{type(stock).__name__} has no attention op diffattn's steering can edit "
                            "(dispatch_attention_fn or F.scaled_dot_product_attention)")
        mask = call.get("attention_mask")
        # Mochi's stock processor attends one sample at a time over its valid text tokens only.
        self._sample, self._valid = 0, mask != 0 if isinstance(mask, torch.Tensor) and mask.ndim == 2 else None
        return function(stock, **call)

    def op(self, layer_index: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
           attn_mask: Any, scale: float | None, stock_op: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The edited op on ``[B, H, N, D]`` tensors, or ``stock_op()`` for calls that are not text
        attention (an I2V image context, for instance)."""
        call = self.edit_for(layer_index)
        queries, keys = query.shape[2], key.shape[2]
        edit, rows = call.edit, None
        if call.text_position == "cross":
            if keys != call.text_tokens:  # not the text (an I2V image context): never steered
                return stock_op()
            if queries != call.video_tokens:
                edit = call.level_edit(queries) if call.level_edit is not None else None
                if edit is None:
                    return self._unsteered(stock_op, f"a cross-attention with {queries} queries where "
                                                     f"{call.video_tokens} video tokens were expected")
            text, video = slice(0, keys), slice(0, queries)
        elif call.text_position == "end" and self._valid is not None and query.shape[0] == 1:
            # Mochi's stock processor: one sample at a time, over its valid text tokens only.
            rows = slice(self._sample, self._sample + 1)
            positions = self._valid[self._sample].nonzero().flatten()
            self._sample += 1
            edit = edit.rows(rows).columns(positions)
            text, video = slice(call.video_tokens, keys), slice(0, call.video_tokens)
            if keys != call.video_tokens + positions.numel():
                return self._unsteered(stock_op, f"{keys} keys where {call.video_tokens} video + "
                                                 f"{positions.numel()} valid text tokens were expected")
        elif queries == keys == call.video_tokens + call.text_tokens:
            if call.text_position == "start":
                text, video = slice(0, call.text_tokens), slice(call.text_tokens, keys)
            else:
                text, video = slice(call.video_tokens, keys), slice(0, call.video_tokens)
        else:
            return self._unsteered(stock_op, f"a {queries}x{keys} attention where {call.video_tokens} video and "
                                             f"{call.text_tokens} text tokens were expected")
        if any(t is not None and t.shape[0] != query.shape[0] for t in (edit.key_factors, edit.value_scale,
                                                                        edit.capture)):
            return self._unsteered(stock_op, "a batch that is not the transformer call's")
        out, maps = steered_attention(query, key, value, edit, text, video, attn_mask, scale)
        self.record(layer_index, maps, rows)
        return out

    def _unsteered(self, stock_op: Callable[[], torch.Tensor], reason: str) -> torch.Tensor:
        if self.warn is not None:
            self.warn(f"an attention call ran unsteered: {reason}")
        return stock_op()

    def sparse_attention(self, processor: SparseAttnProcessor, query: torch.Tensor, key: torch.Tensor,
                         value: torch.Tensor, key_padding: torch.Tensor | None,
                         parallel_config: Any = None) -> torch.Tensor | None:
        """A sparse joint layer's attention ``[B, N, H, D]`` with the text columns edited, or None
        when this forward or layer is not steered (the processor then runs its own attention)."""
        call = self.edit_for(processor.layer_index)
        if call is None:
            return None
        if parallel_config is not None:
            raise UserError("diffattn.steer does not support context parallelism")
        try:
            out, maps = steered_split_attention(processor.state, processor.layer_index, query, key, value,
                                                key_padding, call.edit, processor)
        except SparseUnsupported as unsupported:
            processor.fall_back(unsupported.reason)
            mask = None if key_padding is None else key_padding[:, None, None, :]
            grid = processor.state.grid
            text = slice(0, grid.text_tokens) if grid.text_position == "start" else slice(grid.video_tokens, None)
            video = slice(grid.video_offset, grid.video_offset + grid.video_tokens)
            out, maps = steered_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                          call.edit, text, video, mask)
            out = out.transpose(1, 2)
        self.record(processor.layer_index, maps)
        return out


def _steered_call(stock: Any, steering: TextSteering, layer_index: int) -> Callable[..., Any] | None:
    """A copy of ``type(stock).__call__`` whose attention op is ``steering.op`` (None when the
    stock call reaches no op we know)."""
    function = type(stock).__call__
    names = getattr(getattr(function, "__code__", None), "co_names", ())
    if "dispatch_attention_fn" in names:
        original = function.__globals__["dispatch_attention_fn"]

        def dispatch(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, *args, **kwargs):
            if kwargs.get("parallel_config") is not None:
                raise UserError("diffattn.steer does not support context parallelism")

            def stock_op() -> torch.Tensor:
                return original(query, key, value, attn_mask, dropout_p, is_causal, scale, *args, **kwargs)

            out = steering.op(layer_index, query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                              attn_mask, scale, lambda: stock_op().transpose(1, 2))
            return out.transpose(1, 2)

        return _with_global(function, "dispatch_attention_fn", dispatch)
    if "F" in names:
        def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
            def stock_op() -> torch.Tensor:
                return F.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal,
                                                      scale=scale, **kwargs)

            return steering.op(layer_index, query, key, value, attn_mask, scale, stock_op)

        return _with_global(function, "F", _FunctionalWith(scaled_dot_product_attention=sdpa))
    return None


class SteeredAttnProcessor:
    """The processor :func:`diffattn.steer` puts on a layer that runs a stock processor: the stock
    call, with the text columns of its attention op edited while a steered forward runs. Made by
    :func:`steered_processor` (one subclass per stock class, with the stock ``__call__``'s
    signature, which diffusers reads to filter keyword arguments).

    Example:
        >>> from diffusers.models.transformers.transformer_wan import WanAttnProcessor
        >>> steered_processor(WanAttnProcessor(), TextSteering(), layer_index=2)
        SteeredAttnProcessor(layer_index=2, stock=WanAttnProcessor)
    """

    #: :func:`diffattn.apply` installs its sparse processor around ``stock`` (see adapters.base).
    wraps_stock = True
    _signature: ClassVar[inspect.Signature]

    def __init__(self, stock: Any, steering: TextSteering, layer_index: int) -> None:
        self.stock = stock
        self.steering = steering
        self.layer_index = layer_index

    def __repr__(self) -> str:
        return f"SteeredAttnProcessor(layer_index={self.layer_index}, stock={type(self.stock).__name__})"

    def _call(self, *args: Any, **kwargs: Any) -> Any:
        bound = self._signature.bind(self.stock, *args, **kwargs).arguments
        call: dict[str, Any] = {}
        for name, value in list(bound.items())[1:]:
            if self._signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
                call.update(value)
            else:
                call[name] = value
        return self.steering.run_stock(self.stock, call, self.layer_index)

    # diffusers reads these on whatever processor a module holds.
    _parallel_config = property(lambda self: getattr(self.stock, "_parallel_config", None))
    _attention_backend = property(lambda self: getattr(self.stock, "_attention_backend", None))


_STEERED_CLASSES: dict[type, type] = {}


def steered_processor(stock: Any, steering: TextSteering, layer_index: int) -> SteeredAttnProcessor:
    """A :class:`SteeredAttnProcessor` around ``stock`` (see there)."""
    cls = _STEERED_CLASSES.get(type(stock))
    if cls is None:
        signature = inspect.signature(type(stock).__call__)

        def __call__(self: SteeredAttnProcessor, *args: Any, **kwargs: Any) -> Any:
            return self._call(*args, **kwargs)

        __call__.__signature__ = signature  # type: ignore[attr-defined]
        cls = type("SteeredAttnProcessor", (SteeredAttnProcessor,), {"__call__": __call__, "_signature": signature})
        _STEERED_CLASSES[type(stock)] = cls
    return cls(stock, steering, layer_index)
