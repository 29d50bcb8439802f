"""Sparse self-attention processor for CogVideoX 1.0 and 1.5 (``CogVideoXBlock.attn1``).

CogVideoX has no cross-attention: every block runs one joint self-attention over
``[text, video]`` (text first). The sparse path is the stock ``CogVideoXAttnProcessor2_0`` (or
its fused twin ``FusedCogVideoXAttnProcessor2_0``) step for step: q/k/v through
``attn.to_q/to_k/to_v`` (or ``attn.to_qkv`` when fused) so LoRA and peft keep working, the per-head
LayerNorms, and the rotary embedding on the video tokens only (text tokens get none). Only the
attention itself is replaced: video tokens follow the pattern, text tokens stay dense both ways.
Calls it cannot reproduce exactly (an explicit attention mask, a cross-attention module, a
sequence that does not match the published grid, dense steps and layers) go to the stock
processor unchanged.
"""

from __future__ import annotations

from typing import Any

import torch

from .joint import joint_attention
from .base import SparseAttnProcessor
from .state import SparsityState


def _apply_rotary(x: torch.Tensor, freqs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    # diffusers' own function, the one the stock processor calls: same numerics by construction.
    from diffusers.models.embeddings import apply_rotary_emb

    return apply_rotary_emb(x, freqs)


class CogVideoXSparseAttnProcessor(SparseAttnProcessor):
    """Block-sparse joint ``[text, video]`` self-attention for one CogVideoX ``attn1`` layer.

    Args:
        stock: the processor this one replaces (runs every call that stays dense).
        state: the transformer's :class:`SparsityState`.
        layer_index: the transformer block index of this layer.
        fused: whether ``stock`` is the fused-QKV processor (``attn.to_qkv``), so the sparse path
            computes the projections the same way.
    """

    def __init__(self, stock: Any, state: SparsityState, layer_index: int, fused: bool = False) -> None:
        super().__init__(stock, state, layer_index)
        self.fused = fused

    # The explicit parameters match the stock processor's: ``Attention.forward`` filters the
    # ``attention_kwargs`` it forwards by this signature, so unknown keys are dropped (with the same
    # warning) exactly as they are for the stock processor.
    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self._can_sparsify(attn, hidden_states, encoder_hidden_states, attention_mask):
            return self.run_stock(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)

        text_tokens = encoder_hidden_states.shape[1]
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        batch, tokens, _ = hidden_states.shape

        if self.fused:
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        # [B, H, N, D] like the stock processor: the norms act on the last axis and the rotary
        # helper expects the sequence on axis 2.
        query = query.view(batch, tokens, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, tokens, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, tokens, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            # Rotary positions cover the video tokens only; the text tokens keep theirs unrotated.
            query = torch.cat(
                [query[:, :, :text_tokens], _apply_rotary(query[:, :, text_tokens:], image_rotary_emb)], dim=2
            )
            key = torch.cat([key[:, :, :text_tokens], _apply_rotary(key[:, :, text_tokens:], image_rotary_emb)], dim=2)

        out = joint_attention(
            self.state, self.layer_index, query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        )
        out = out.reshape(batch, tokens, attn.heads * head_dim).type_as(query)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        encoder_out, video_out = out.split([text_tokens, tokens - text_tokens], dim=1)
        return video_out, encoder_out

    def _can_sparsify(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
    ) -> bool:
        """Whether this call is the joint self-attention over exactly the published grid."""
        if attention_mask is not None or encoder_hidden_states is None or attn.is_cross_attention:
            return False
        if self.state.dense_now(self.layer_index):
            return False
        grid = self.state.grid
        return (
            grid.text_position == "start"
            and encoder_hidden_states.shape[1] == grid.text_tokens
            and hidden_states.shape[1] == grid.video_tokens
        )
