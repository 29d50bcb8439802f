"""Sparse self-attention processor for FLUX.1 (``FluxAttention`` in both block kinds).

FLUX has two kinds of blocks and both attend over ``[text, image]`` (text first):

* double-stream blocks (``FluxTransformerBlock.attn``): image tokens arrive as ``hidden_states``,
  text tokens as ``encoder_hidden_states`` with their own projections (``add_q/k/v_proj``, their own
  RMS norms, ``to_add_out``); the processor concatenates ``[text, image]``;
* single-stream blocks (``FluxSingleTransformerBlock.attn``): ``hidden_states`` already is the
  concatenated ``[text, image]`` sequence and there is no output projection.

The sparse path is the stock ``FluxAttnProcessor`` step for step (projections through the
module's linear layers so LoRA and peft keep working, fused QKV when the module is fused, the
per-head RMS norms, FLUX's rotary embedding over the whole sequence); only the attention itself
is replaced. Calls it cannot reproduce exactly (an explicit attention mask, context parallelism,
a sequence that does not match the published grid, dense steps and layers) go to the stock
processor unchanged.
"""

from __future__ import annotations

from typing import Any

import torch

from .joint import joint_attention
from .base import SparseAttnProcessor


def _apply_rotary(x: torch.Tensor, freqs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    # diffusers' own function, the one the stock processor calls: same numerics by construction.
    from diffusers.models.embeddings import apply_rotary_emb

    return apply_rotary_emb(x, freqs, sequence_dim=1)


class FluxSparseAttnProcessor(SparseAttnProcessor):
    """Block-sparse joint ``[text, image]`` self-attention for one ``FluxAttention`` layer.

    Args:
        stock: the processor this one replaces (runs every call that stays dense).
        state: the transformer's :class:`SparsityState`.
        layer_index: position of the block in execution order (double-stream blocks first, then
            single-stream blocks).
    """

    # The explicit parameters match the stock processor's: ``FluxAttention.forward`` filters the
    # ``joint_attention_kwargs`` it forwards by this signature, exactly as for the stock processor.
    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if not self._can_sparsify(attn, hidden_states, encoder_hidden_states, attention_mask):
            return self.run_stock(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)

        double_stream = encoder_hidden_states is not None
        if getattr(attn, "fused_projections", False):
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        # Split by the fixed head_dim and let -1 absorb the head count, as the stock processor does.
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))

        if double_stream:
            if getattr(attn, "fused_projections", False):
                text_q, text_k, text_v = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
            else:
                text_q = attn.add_q_proj(encoder_hidden_states)
                text_k = attn.add_k_proj(encoder_hidden_states)
                text_v = attn.add_v_proj(encoder_hidden_states)
            text_q = attn.norm_added_q(text_q.unflatten(-1, (-1, attn.head_dim)))
            text_k = attn.norm_added_k(text_k.unflatten(-1, (-1, attn.head_dim)))
            text_v = text_v.unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([text_q, query], dim=1)
            key = torch.cat([text_k, key], dim=1)
            value = torch.cat([text_v, value], dim=1)

        if image_rotary_emb is not None:
            # FLUX rotates every token (text ids are all zero, which makes theirs the identity).
            query = _apply_rotary(query, image_rotary_emb)
            key = _apply_rotary(key, image_rotary_emb)

        out = joint_attention(self.state, self.layer_index, query, key, value)
        out = out.flatten(2, 3).to(query.dtype)
        if not double_stream:
            return out
        text_tokens = encoder_hidden_states.shape[1]
        text_out, image_out = out.split_with_sizes([text_tokens, out.shape[1] - text_tokens], dim=1)
        image_out = attn.to_out[1](attn.to_out[0](image_out.contiguous()))
        text_out = attn.to_add_out(text_out.contiguous())
        return image_out, text_out

    def _can_sparsify(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
    ) -> bool:
        """Whether this call is the joint self-attention over exactly the published grid."""
        if attention_mask is not None or self.state.dense_now(self.layer_index):
            return False
        # Context parallelism shards the sequence and exchanges it inside the stock dispatch.
        if getattr(self.stock, "_parallel_config", None) is not None:
            return False
        grid = self.state.grid
        if grid.text_position != "start":
            return False
        if encoder_hidden_states is None:
            # Single-stream: the sequence is already [text, image].
            return hidden_states.shape[1] == grid.num_tokens
        return (
            getattr(attn, "added_kv_proj_dim", None) is not None
            and encoder_hidden_states.shape[1] == grid.text_tokens
            and hidden_states.shape[1] == grid.video_tokens
        )
