"""Sparse self-attention processor for Wan 2.1 / 2.2 (``WanAttention``).

The stock ``WanAttnProcessor`` runs every call, sparse ones included: its projections (through
``attn.to_q/to_k/to_v``, or ``to_qkv`` when fused, so LoRA and peft keep working), RMS norms and
interleaved rotary embedding are diffusers' own; only its ``dispatch_attention_fn`` is replaced
by the block-sparse kernel, and only for the self-attention (``attn1``). Cross-attention (text
and I2V image tokens) is never sparsified.
"""

from __future__ import annotations

from .base import SparseAttnProcessor


class WanSparseAttnProcessor(
    SparseAttnProcessor,
    stock="diffusers.models.transformers.transformer_wan:WanAttnProcessor",
    attention_op="dispatch_attention_fn",
    parameters=("attn", "hidden_states", "encoder_hidden_states", "attention_mask", "rotary_emb"),
):
    """Block-sparse self-attention for one ``WanAttention`` layer: ``attn1`` calls (no
    ``encoder_hidden_states``) are sparse, ``attn2`` calls keep the stock path.

    Example:
        >>> WanSparseAttnProcessor().stock_classes   # what a diffusers re-creation wraps, and accepts
        ('WanAttnProcessor',)
    """

    ulysses = True  # see diffattn.processors.parallel
