"""Sparse self-attention processor for Wan 2.1 / 2.2 (``WanAttention``).

The self-attention path is the stock ``WanAttnProcessor`` step for step (q/k/v through
``attn.to_q/to_k/to_v`` so LoRA and peft keep working, RMS norms across heads, Wan's interleaved
rotary embedding), with the attention itself replaced by the block-sparse kernel. Anything else
(cross-attention, I2V image tokens, an explicit attention mask, dense steps and layers) goes to
the stock processor unchanged.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import SparseAttnProcessor


def _wan_rotary(hidden_states: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    # Wan rotates interleaved (even, odd) channel pairs; cos/sin come repeated per pair.
    x1, x2 = hidden_states.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(hidden_states)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(hidden_states)


class WanSparseAttnProcessor(SparseAttnProcessor):
    """Block-sparse self-attention for one ``WanAttention`` layer.

    Constructed like every :class:`SparseAttnProcessor` (stock processor, state, layer index).
    """

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        if (
            encoder_hidden_states is not None
            or attention_mask is not None
            or attn.add_k_proj is not None
            or not self.state.sparse_now(self.layer_index, hidden_states.shape[1])
        ):
            return self.run_stock(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb, **kwargs)

        if getattr(attn, "fused_projections", False):
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query = _wan_rotary(query, *rotary_emb)
            key = _wan_rotary(key, *rotary_emb)

        out = self.state.attend(query, key, value, self.layer_index)
        out = out.flatten(2, 3).type_as(query)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)
