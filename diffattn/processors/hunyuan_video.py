"""Sparse self-attention processor for HunyuanVideo (``HunyuanVideoAttnProcessor2_0`` layers).

HunyuanVideo's self-attention sequence is ``[video, text]`` in both block kinds (dual-stream
blocks project the text with their own ``add_*_proj``, single-stream blocks concatenate first).
The stock processor runs every call, sparse ones included (projections, norms and rotary on the
video tokens are diffusers' own, so peft LoRA keeps working); only its ``dispatch_attention_fn``
is replaced by the block-sparse kernel. The transformer passes a boolean key-padding mask
``[B, 1, 1, N]`` (False on padded prompt tokens): :func:`~diffattn.processors.joint.joint_attention`
applies it exactly. The token refiner's text-only attention is never given this processor.
"""

from __future__ import annotations

from typing import Any

from .base import SparseAttnProcessor


class HunyuanVideoSparseAttnProcessor(
    SparseAttnProcessor,
    stock="diffusers.models.transformers.transformer_hunyuan_video:HunyuanVideoAttnProcessor2_0",
    attention_op="dispatch_attention_fn",
):
    """Block-sparse joint self-attention for one HunyuanVideo dual- or single-stream block.

    Layer indices count the dual-stream blocks first, then the single-stream blocks.
    """

    def is_self_attention(self, call: dict[str, Any]) -> bool:
        # Video and text attend jointly; a call without text tokens is not a layer of ours.
        return call.get("encoder_hidden_states") is not None
