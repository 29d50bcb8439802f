"""Sparse self-attention processor for LTX-Video (``LTXAttention``).

The stock ``LTXVideoAttnProcessor`` runs every call, sparse ones included: its projections
(through ``attn.to_q/to_k/to_v``, so LoRA and peft keep working), RMS norms and rotary embedding
are diffusers' own; only its ``dispatch_attention_fn`` is replaced by the block-sparse kernel, and
only for the self-attention (``attn1``). Cross-attention (``attn2``, text with its padding mask)
is never sparsified.
"""

from __future__ import annotations

from .base import SparseAttnProcessor


class LTXVideoSparseAttnProcessor(
    SparseAttnProcessor,
    stock="diffusers.models.transformers.transformer_ltx:LTXVideoAttnProcessor",
    attention_op="dispatch_attention_fn",
):
    """Block-sparse self-attention for one ``LTXAttention`` layer (``attn1``; ``attn2`` stays stock).

    Example:
        >>> LTXVideoSparseAttnProcessor(layer_index=3)
        LTXVideoSparseAttnProcessor(layer_index=3, stock=LTXVideoAttnProcessor)
    """

    ulysses = True  # see diffattn.processors.parallel
