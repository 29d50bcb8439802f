"""Sparse self-attention processor for HunyuanVideo (``HunyuanVideoAttnProcessor2_0`` layers).

HunyuanVideo's self-attention sequence is ``[video, text]`` in both block kinds:

* dual-stream blocks (``transformer_blocks.*.attn``, ``attn.add_q_proj`` set): video goes through
  ``to_q/to_k/to_v`` + ``norm_q/norm_k`` + rotary, text through ``add_q_proj/add_k_proj/add_v_proj``
  + ``norm_added_q/norm_added_k`` (no rotary); the two are concatenated after the projections;
* single-stream blocks (``single_transformer_blocks.*.attn``, no ``add_q_proj``): the processor
  concatenates ``[video, text]`` first, projects both with the same ``to_q/to_k/to_v`` and norms,
  and rotates the video part only.

The transformer passes a boolean key-padding mask ``[B, 1, 1, N]`` (False on the padded prompt
tokens at the end of each sample's text); :func:`joint_attention` applies it exactly. Everything is
the stock processor step for step, so peft LoRA on the projections keeps working; only the
attention itself changes. The token refiner's text-only attention is never given this processor.
"""

from __future__ import annotations

from typing import Any

import torch

from .joint import joint_attention
from .base import SparseAttnProcessor, heads_qkv


def _apply_rotary(x: torch.Tensor, freqs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    # The stock processor rotates [B, N, H, D] tensors with diffusers' helper (sequence on dim 1).
    from diffusers.models.embeddings import apply_rotary_emb

    return apply_rotary_emb(x, freqs, sequence_dim=1)


_NOT_A_KEY_PADDING = "not a key-padding mask"


def _key_padding_from_mask(attention_mask: torch.Tensor | None, batch: int, tokens: int) -> torch.Tensor | None | str:
    """The ``[B, N]`` bool key-padding mask of a HunyuanVideo attention mask.

    Returns None for no mask, the ``[B, N]`` mask for a boolean ``[B|1, 1, 1, N]`` or ``[B|1, N]``
    mask, and ``_NOT_A_KEY_PADDING`` for anything else (additive float masks, per-query masks),
    which the caller leaves to the stock processor because a key-padding mask cannot express it.
    """
    if attention_mask is None:
        return None
    if attention_mask.dtype != torch.bool or attention_mask.shape[-1] != tokens:
        return _NOT_A_KEY_PADDING
    if attention_mask.ndim == 4 and attention_mask.shape[1:3] == (1, 1):
        mask = attention_mask[:, 0, 0]
    elif attention_mask.ndim == 2:
        mask = attention_mask
    else:
        return _NOT_A_KEY_PADDING
    if mask.shape[0] not in (1, batch):
        return _NOT_A_KEY_PADDING
    return mask.expand(batch, tokens)


class HunyuanVideoSparseAttnProcessor(SparseAttnProcessor):
    """Block-sparse joint self-attention for one HunyuanVideo dual- or single-stream block.

    Args:
        stock: the processor this one replaces (runs every call that is not sparsified).
        state: the transformer's :class:`SparsityState`.
        layer_index: the block index of this layer (dual-stream blocks first, then single-stream).
    """

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        key_padding = self._key_padding_if_sparse(hidden_states, encoder_hidden_states, attention_mask)
        if isinstance(key_padding, str):
            return self.run_stock(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)

        text_tokens = encoder_hidden_states.shape[1]
        single_stream = attn.add_q_proj is None
        if single_stream:
            # Single-stream blocks project video and text with the same weights.
            hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)

        query, key, value = heads_qkv(attn, hidden_states)

        # Rotary positions exist for video tokens only; text tokens stay unrotated.
        if image_rotary_emb is not None:
            if single_stream:
                query = torch.cat([_apply_rotary(query[:, :-text_tokens], image_rotary_emb), query[:, -text_tokens:]], 1)
                key = torch.cat([_apply_rotary(key[:, :-text_tokens], image_rotary_emb), key[:, -text_tokens:]], 1)
            else:
                query = _apply_rotary(query, image_rotary_emb)
                key = _apply_rotary(key, image_rotary_emb)

        if not single_stream:
            encoder_query, encoder_key, encoder_value = heads_qkv(attn, encoder_hidden_states, added=True)
            query = torch.cat([query, encoder_query], dim=1)
            key = torch.cat([key, encoder_key], dim=1)
            value = torch.cat([value, encoder_value], dim=1)

        out = joint_attention(self.state, self.layer_index, query, key, value, key_padding=key_padding)
        out = out.flatten(2, 3).to(query.dtype)

        video_out, text_out = out[:, :-text_tokens], out[:, -text_tokens:]
        if getattr(attn, "to_out", None) is not None:
            video_out = attn.to_out[1](attn.to_out[0](video_out))
        if getattr(attn, "to_add_out", None) is not None:
            text_out = attn.to_add_out(text_out)
        return video_out, text_out

    def _key_padding_if_sparse(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
    ) -> torch.Tensor | None | str:
        """The key padding of a call this processor sparsifies, or a string saying why the stock
        processor must run it instead."""
        if encoder_hidden_states is None:
            return "no text tokens"
        if self.state.dense_now(self.layer_index):
            return "dense layer or step"
        if getattr(self.stock, "_parallel_config", None) is not None:
            # Context parallelism shards the sequence: the grid no longer describes it.
            return "context parallel"
        grid = self.state.grid
        if (
            grid.text_position != "end"
            or hidden_states.shape[1] != grid.video_tokens
            or encoder_hidden_states.shape[1] != grid.text_tokens
            or grid.text_tokens == 0
        ):
            return "sequence does not match the latent grid"
        key_padding = _key_padding_from_mask(attention_mask, hidden_states.shape[0], grid.num_tokens)
        if key_padding is not None and not isinstance(key_padding, str):
            # joint_attention masks text keys only; the transformer never pads video tokens.
            if not bool(key_padding[:, : grid.video_tokens].all()):
                return "padding on video tokens"
        return key_padding
