"""Joint (video + text) self-attention with the video part sparse and the text part dense.

HunyuanVideo, CogVideoX, Mochi and FLUX put text tokens into the self-attention sequence. Text is
always dense in both directions. Without a key-padding mask the layout itself carries the dense
text rows and columns (``VideoGrid.text_tokens``). With one (HunyuanVideo pads its prompt), the
video queries' attention is split into a sparse video-to-video part and a dense, masked
video-to-text part, merged exactly through their log-sum-exps; text queries attend densely.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..patterns import VideoGrid
from .state import SparseUnsupported, SparsityState

# Video queries per chunk of the dense video->text part (bounds the [B, H, chunk, T] scores).
_QUERY_CHUNK = 4096


def joint_attention(
    state: SparsityState,
    layer_index: int,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_padding: torch.Tensor | None = None,
    processor: Any = None,
    heads: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Attention over ``[B, N, H, D]`` tensors whose tokens follow ``state.grid``'s order.

    Args:
        key_padding: bool ``[B, N]``, True where a key may be attended (None: all).
        processor: the calling processor (see :meth:`~diffattn.processors.state.SparsityState.attend`).
        heads: the model heads the tensors hold (a Ulysses rank's), or None (all).
    Returns:
        ``[B, N, H, D]``, equal to softmax attention restricted to the pattern's token mask AND the
        key-padding mask.
    """
    grid = state.grid
    if key_padding is None or bool(key_padding.all()):
        return state.attend(query, key, value, layer_index, processor=processor, heads=heads)
    if heads is not None:
        raise SparseUnsupported("a key-padding mask under context parallelism")
    if grid.text_tokens == 0 or not bool(key_padding[:, _video_slice(grid)].all()):
        raise SparseUnsupported("an attention mask on video tokens (only text keys may be padding)")

    if state.observer is None:
        return _split_attention(state, layer_index, query, key, value, key_padding, processor)
    # The whole split op (sparse video part, dense text parts, merge) is one call for a profiler.
    return state.observe(
        layer_index, lambda: _split_attention(state, layer_index, query, key, value, key_padding, processor)
    )


def _split_attention(
    state: SparsityState,
    layer_index: int,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_padding: torch.Tensor,
    processor: Any = None,
) -> torch.Tensor:
    """:func:`joint_attention` with a key-padding mask on text keys: sparse video->video part and
    dense masked video->text part merged through their LSEs; text queries attend densely."""
    grid = state.grid
    video, text = _video_slice(grid), _text_slice(grid)
    video_grid = VideoGrid(grid.frames, grid.height, grid.width)
    q_video = query[:, video]
    out_vv, lse_vv = state.attend(q_video, key[:, video], value[:, video], layer_index, grid=video_grid,
                                  return_lse=True, processor=processor)
    out_vt, lse_vt = _dense_with_lse(q_video, key[:, text], value[:, text], key_padding[:, text])
    video_out, _ = _merge_parts(out_vv, lse_vv, out_vt, lse_vt)
    return _with_dense_text_queries(query, key, value, video, text, video_out, key_padding)


def _merge_parts(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
                 lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention over two disjoint key sets from each part's output ``[B, Nq, H, D]`` and
    LSE ``[B, Nq, H]``: ``(out float32, total lse)``, exact, an empty part weighing 0."""
    lse = torch.logaddexp(lse_a, lse_b)
    return out_a.float() * _merge_weight(lse_a, lse) + out_b * _merge_weight(lse_b, lse), lse


def _with_dense_text_queries(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, video: slice, text: slice,
                             video_out: torch.Tensor, key_padding: torch.Tensor) -> torch.Tensor:
    """The joint output ``[B, N, H, D]``: ``video_out`` on the video rows; text queries attend
    everything that is not padding (dense, as in the stock processor)."""
    text_out = F.scaled_dot_product_attention(
        query[:, text].transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
        attn_mask=key_padding[:, None, None, :],
    ).transpose(1, 2)
    out = torch.empty_like(query)
    out[:, video] = video_out.to(query.dtype)
    out[:, text] = text_out
    return out


def _merge_weight(part_lse: torch.Tensor, total_lse: torch.Tensor) -> torch.Tensor:
    """``exp(part - total)[..., None]``, 0 where the part is empty (avoids -inf - -inf = NaN)."""
    weight = torch.where(torch.isfinite(part_lse), (part_lse - total_lse).exp(), torch.zeros_like(part_lse))
    return weight[..., None]


def _video_slice(grid: VideoGrid) -> slice:
    return slice(grid.video_offset, grid.video_offset + grid.video_tokens)


def _text_slice(grid: VideoGrid) -> slice:
    return slice(0, grid.text_tokens) if grid.text_position == "start" else slice(grid.video_tokens, grid.num_tokens)


def _dense_with_lse(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked dense attention ``[B, Nq, H, D]`` over few keys, with float32 output and LSE ``[B, Nq, H]``."""
    scale = query.shape[-1] ** -0.5
    k = key.transpose(1, 2).float()
    v = value.transpose(1, 2).float()
    bias = torch.zeros(key_mask.shape, dtype=torch.float32, device=key.device).masked_fill(~key_mask, float("-inf"))
    outs, lses = [], []
    for start in range(0, query.shape[1], _QUERY_CHUNK):
        q = query[:, start : start + _QUERY_CHUNK].transpose(1, 2).float()
        scores = (q @ k.transpose(-1, -2)) * scale + bias[:, None, None, :]
        lse = torch.logsumexp(scores, dim=-1)
        # Rows whose text keys are all padding have lse = -inf: give them zero weight, not NaN.
        probs = torch.where(torch.isfinite(lse)[..., None], (scores - lse[..., None]).exp(), torch.zeros_like(scores))
        outs.append((probs @ v).transpose(1, 2))
        lses.append(lse.transpose(1, 2))
    return torch.cat(outs, 1), torch.cat(lses, 1)
