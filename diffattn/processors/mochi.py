"""Sparse self-attention processor for Mochi (``MochiAttention`` layers, ``MochiAttnProcessor2_0``).

Mochi's joint self-attention sequence is ``[video, text]``: video through ``to_q/to_k/to_v`` +
``norm_q/norm_k`` + Mochi's interleaved rotary embedding, text through
``add_q_proj/add_k_proj/add_v_proj`` + ``norm_added_q/norm_added_k`` (no rotary).

The stock processor handles the prompt mask per sample: it keeps only the valid (nonzero) prompt
tokens, attends ``[video, valid text]`` densely, and pads the output back with zeros at the END.
So the text output at position ``j`` is the output of the ``j``-th valid text token, not of the
token at ``j``, and the last ``L - valid`` text outputs are zero. For a prefix mask (the usual
T5 padding) that is the same as masking positions in place; for a mask with holes it is not.
This processor builds the equivalent key-padding mask, runs :func:`joint_attention` (sparse video
part, dense masked text part), and then reorders and zero-fills the text outputs exactly as the
stock processor does. Everything else (projections, norms, rotary, output projections) is the stock
processor step for step, so peft LoRA keeps working.
"""

from __future__ import annotations

from typing import Any

import torch

from .joint import joint_attention
from .base import SparseAttnProcessor, heads_qkv


def _mochi_rotary(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    # Mochi rotates interleaved (even, odd) channel pairs in float32 and casts each half back to
    # the input dtype before re-interleaving (the cast order matters for bf16 exactness).
    even = x[..., 0::2].float()
    odd = x[..., 1::2].float()
    rotated_even = (even * freqs_cos - odd * freqs_sin).to(x.dtype)
    rotated_odd = (even * freqs_sin + odd * freqs_cos).to(x.dtype)
    return torch.stack([rotated_even, rotated_odd], dim=-1).flatten(-2)


def compact_text_outputs(text_out: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Reorder ``[B, L, ...]`` text outputs like the stock Mochi processor.

    Output position ``j`` of sample ``b`` gets the output of the ``j``-th valid text token of ``b``
    (valid = ``valid[b]`` True, in sequence order); positions past the number of valid tokens are 0.
    """
    # A stable sort on "is padding" lists the valid positions first, in their original order,
    # exactly like the stock processor's torch.nonzero over the mask.
    order = torch.sort((~valid).to(torch.uint8), dim=1, stable=True).indices
    index = order.reshape(*order.shape, *([1] * (text_out.ndim - 2))).expand_as(text_out)
    gathered = text_out.gather(1, index)
    positions = torch.arange(valid.shape[1], device=valid.device)
    keep = positions[None, :] < valid.sum(dim=1, keepdim=True)
    return gathered.masked_fill(~keep.reshape(*keep.shape, *([1] * (text_out.ndim - 2))), 0)


class MochiSparseAttnProcessor(SparseAttnProcessor):
    """Block-sparse joint self-attention for one ``MochiAttention`` layer.

    Args:
        stock: the processor this one replaces (runs every call that is not sparsified).
        state: the transformer's :class:`SparsityState`.
        layer_index: the transformer block index of this layer.
    """

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self._sparsifiable(hidden_states, encoder_hidden_states, attention_mask):
            return self.run_stock(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)

        query, key, value = heads_qkv(attn, hidden_states)
        encoder_query, encoder_key, encoder_value = heads_qkv(attn, encoder_hidden_states, added=True)

        # Rotary positions exist for video tokens only.
        if image_rotary_emb is not None:
            query = _mochi_rotary(query, *image_rotary_emb)
            key = _mochi_rotary(key, *image_rotary_emb)

        video_tokens, text_tokens = hidden_states.shape[1], encoder_hidden_states.shape[1]
        valid_text = attention_mask != 0  # the stock processor keeps nonzero mask entries
        key_padding = torch.cat(
            [torch.ones(valid_text.shape[0], video_tokens, dtype=torch.bool, device=valid_text.device), valid_text], 1
        )
        out = joint_attention(
            self.state,
            self.layer_index,
            torch.cat([query, encoder_query], dim=1),
            torch.cat([key, encoder_key], dim=1),
            torch.cat([value, encoder_value], dim=1),
            key_padding=key_padding,
        )
        out = out.flatten(2, 3)
        video_out, text_out = out.split_with_sizes((video_tokens, text_tokens), dim=1)
        if not bool(valid_text.all()):
            text_out = compact_text_outputs(text_out, valid_text)

        video_out = attn.to_out[1](attn.to_out[0](video_out))
        if hasattr(attn, "to_add_out"):
            text_out = attn.to_add_out(text_out)
        return video_out, text_out

    def _sparsifiable(
        self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None, attention_mask: Any
    ) -> bool:
        """Whether this call is one the sparse path reproduces exactly (else the stock one runs)."""
        if encoder_hidden_states is None or self.state.dense_now(self.layer_index):
            return False
        grid = self.state.grid
        batch = hidden_states.shape[0]
        return (
            grid.text_position == "end"
            and hidden_states.shape[1] == grid.video_tokens
            and encoder_hidden_states.shape[1] == grid.text_tokens
            and grid.text_tokens > 0
            # The stock processor reads one [L] row per sample; other mask shapes are its business.
            and isinstance(attention_mask, torch.Tensor)
            and tuple(attention_mask.shape) == (batch, grid.text_tokens)
        )
