"""Sparse self-attention processor for Mochi (``MochiAttention`` layers, ``MochiAttnProcessor2_0``).

Mochi's joint self-attention sequence is ``[video, text]``: video through ``to_q/to_k/to_v`` +
``norm_q/norm_k`` + Mochi's interleaved rotary embedding, text through
``add_q_proj/add_k_proj/add_v_proj`` + ``norm_added_q/norm_added_k`` (no rotary).

The stock processor handles the prompt mask per sample: it keeps only the valid (nonzero) prompt
tokens, attends ``[video, valid text]`` densely one sample at a time, and pads the output back
with zeros at the END. So the text output at position ``j`` is the output of the ``j``-th valid
text token, not of the token at ``j``, and the last ``L - valid`` text outputs are zero. This
processor keeps the batch together instead: it builds the equivalent key-padding mask, runs the
joint attention (sparse video part, dense masked text part) on the whole batch, and then reorders
and zero-fills the text outputs exactly as the stock processor does. That is why Mochi, unlike
the other families, re-implements its stock processor's steps (projections, norms, rotary,
output projections) instead of replacing its attention op: the stock op sees one sample at a
time. The steps go through the module's linears, so peft LoRA keeps working.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import SparseAttnProcessor


# Copied from diffusers.models.attention_processor.MochiAttnProcessor2_0.__call__.apply_rotary_emb
# (tests/processors/test_copied_from_diffusers.py fails when the installed diffusers' differs).
def apply_rotary_emb(x, freqs_cos, freqs_sin):
    x_even = x[..., 0::2].float()
    x_odd = x[..., 1::2].float()

    cos = (x_even * freqs_cos - x_odd * freqs_sin).to(x.dtype)
    sin = (x_even * freqs_sin + x_odd * freqs_cos).to(x.dtype)

    return torch.stack([cos, sin], dim=-1).flatten(-2)


def heads_qkv(attn: Any, hidden_states: Any, added: bool = False) -> tuple[Any, Any, Any]:
    """``q, k, v`` ``[B, N, H, D]``: projections split into ``attn.heads``, then the optional
    per-head norms, in Mochi's order.

    With ``added`` the text-stream projections (``add_q_proj``, ``add_k_proj``, ``add_v_proj``) and
    their norms (``norm_added_q``, ``norm_added_k``) are used instead of ``to_q/to_k/to_v`` and
    ``norm_q/norm_k``. Going through the attention module's own linears keeps LoRA and peft working.

    Example:
        >>> from types import SimpleNamespace
        >>> attn = SimpleNamespace(heads=2, to_q=torch.nn.Linear(8, 8), to_k=torch.nn.Linear(8, 8),
        ...                        to_v=torch.nn.Linear(8, 8))
        >>> [t.shape for t in heads_qkv(attn, torch.zeros(1, 5, 8))][0]
        torch.Size([1, 5, 2, 4])
    """
    if added:
        projections, norms = ("add_q_proj", "add_k_proj", "add_v_proj"), ("norm_added_q", "norm_added_k")
    else:
        projections, norms = ("to_q", "to_k", "to_v"), ("norm_q", "norm_k")
    query, key, value = (getattr(attn, name)(hidden_states).unflatten(2, (attn.heads, -1)) for name in projections)
    norm_q, norm_k = (getattr(attn, name, None) for name in norms)
    if norm_q is not None:
        query = norm_q(query)
    if norm_k is not None:
        key = norm_k(key)
    return query, key, value


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


class MochiSparseAttnProcessor(SparseAttnProcessor, stock="diffusers.models.attention_processor:MochiAttnProcessor2_0"):
    """Block-sparse joint self-attention for one ``MochiAttention`` layer (its own steps, see the
    module docstring)."""

    def is_self_attention(self, call: dict[str, Any]) -> bool:
        return call.get("encoder_hidden_states") is not None

    def fallback_reason(self, call: dict[str, Any]) -> str | None:
        reason = super().fallback_reason(call)
        mask = call.get("attention_mask")
        # The stock processor reads one [L] row per sample; other mask shapes are its business.
        if reason is None and not (
            isinstance(mask, torch.Tensor) and tuple(mask.shape) == tuple(call["encoder_hidden_states"].shape[:2])
        ):
            reason = "a prompt mask that is not one [L] row per sample"
        return reason

    def sparse(self, call: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        attn, hidden_states, encoder_hidden_states = call["attn"], call["hidden_states"], call["encoder_hidden_states"]
        attention_mask, image_rotary_emb = call["attention_mask"], call.get("image_rotary_emb")
        query, key, value = heads_qkv(attn, hidden_states)
        encoder_query, encoder_key, encoder_value = heads_qkv(attn, encoder_hidden_states, added=True)

        # Rotary positions exist for video tokens only.
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, *image_rotary_emb)
            key = apply_rotary_emb(key, *image_rotary_emb)

        video_tokens, text_tokens = hidden_states.shape[1], encoder_hidden_states.shape[1]
        valid_text = attention_mask != 0  # the stock processor keeps nonzero mask entries
        key_padding = torch.cat(
            [torch.ones(valid_text.shape[0], video_tokens, dtype=torch.bool, device=valid_text.device), valid_text], 1
        )
        out = self.attention(
            torch.cat([query, encoder_query], dim=1),
            torch.cat([key, encoder_key], dim=1),
            torch.cat([value, encoder_value], dim=1),
            key_padding,
        )
        out = out.flatten(2, 3)
        video_out, text_out = out.split_with_sizes((video_tokens, text_tokens), dim=1)
        if not bool(valid_text.all()):
            text_out = compact_text_outputs(text_out, valid_text)

        video_out = attn.to_out[1](attn.to_out[0](video_out))
        if hasattr(attn, "to_add_out"):
            text_out = attn.to_add_out(text_out)
        return video_out, text_out
