"""Sparse self-attention processor for LTX-Video (``LTXAttention``).

The self-attention path is the stock ``LTXVideoAttnProcessor`` step for step: q/k/v through
``attn.to_q/to_k/to_v`` (so LoRA and peft keep working), RMS norms across all heads, LTX's rotary
embedding applied to the whole ``[B, N, heads * head_dim]`` projection *before* the split into
heads (in float32, like the stock one), with the attention itself replaced by the block-sparse
kernel. Cross-attention (``attn2``, text with its padding mask), any explicit mask, and dense
steps and layers go to the stock processor unchanged.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import SparseAttnProcessor


def _ltx_rotary(hidden_states: torch.Tensor, freqs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """LTX rotary embedding on ``[B, N, C]``: rotates interleaved (even, odd) channel pairs.

    ``cos``/``sin`` are ``[B, N, C]`` with each frequency repeated for its pair; the rotation is
    computed in float32 and cast back, as the stock processor does.
    """
    cos, sin = freqs
    even, odd = hidden_states.unflatten(2, (-1, 2)).unbind(-1)
    # (x_even, x_odd) -> (-x_odd, x_even): the "i * x" of the complex rotation, per pair.
    rotated = torch.stack([-odd, even], dim=-1).flatten(2)
    return (hidden_states.float() * cos + rotated.float() * sin).to(hidden_states.dtype)


class LTXVideoSparseAttnProcessor(SparseAttnProcessor):
    """Block-sparse self-attention for one ``LTXAttention`` layer (``attn1``).

    Constructed like every :class:`SparseAttnProcessor` (stock processor, state, layer index).
    """

    # The signature matches the stock processor's: ``LTXAttention.forward`` inspects it to decide
    # which extra keyword arguments to pass on.
    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if (
            encoder_hidden_states is not None
            or attention_mask is not None
            or not self.state.sparse_now(self.layer_index, hidden_states.shape[1])
        ):
            # Not a video self-attention call we can reproduce exactly: the stock path.
            return self.run_stock(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)

        query = attn.norm_q(attn.to_q(hidden_states))
        key = attn.norm_k(attn.to_k(hidden_states))
        value = attn.to_v(hidden_states)
        if image_rotary_emb is not None:
            query = _ltx_rotary(query, image_rotary_emb)
            key = _ltx_rotary(key, image_rotary_emb)
        query = query.unflatten(2, (attn.heads, -1))
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))

        out = self.state.attend(query, key, value, self.layer_index)
        out = out.flatten(2, 3).to(query.dtype)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)
