"""Sparse self-attention processor for FLUX.1 (``FluxAttention`` in both block kinds).

FLUX has two kinds of blocks and both attend over ``[text, image]`` (text first):

* double-stream blocks (``FluxTransformerBlock.attn``): image tokens arrive as ``hidden_states``,
  text tokens as ``encoder_hidden_states`` with their own projections; the stock processor
  concatenates ``[text, image]``;
* single-stream blocks (``FluxSingleTransformerBlock.attn``): ``hidden_states`` already is the
  concatenated ``[text, image]`` sequence.

The stock ``FluxAttnProcessor`` runs every call, sparse ones included (projections, fused QKV,
norms and rotary embedding are diffusers' own); only its ``dispatch_attention_fn`` is replaced
by the block-sparse kernel. Diffusers re-creates processors by calling their class with no
arguments (``load_ip_adapter``/``unload_ip_adapter``): that builds one around a new stock
``FluxAttnProcessor``, which the installed transformer adopts on its next call. The IP-Adapter's
own processor (double-stream blocks) is not reproduced: those layers run it dense, with a
:class:`~diffattn.errors.DenseFallbackWarning`.
"""

from __future__ import annotations

from typing import Any

from .base import SparseAttnProcessor


class FluxSparseAttnProcessor(
    SparseAttnProcessor,
    stock="diffusers.models.transformers.transformer_flux:FluxAttnProcessor",
    attention_op="dispatch_attention_fn",
):
    """Block-sparse joint ``[text, image]`` self-attention for one ``FluxAttention`` layer.

    Layer indices follow execution order: double-stream blocks first, then single-stream blocks.
    ``FluxSparseAttnProcessor()`` (how ``load_ip_adapter`` re-creates it) wraps a new stock
    ``FluxAttnProcessor``.
    """

    ulysses = True  # see diffattn.processors.parallel

    def is_self_attention(self, call: dict[str, Any]) -> bool:
        # Both block kinds are joint self-attention; the text stream arrives separately or not.
        return True
