"""Sparse self-attention processor for CogVideoX 1.0 and 1.5 (``CogVideoXBlock.attn1``).

CogVideoX has no cross-attention: every block runs one joint self-attention over
``[text, video]`` (text first). The stock ``CogVideoXAttnProcessor2_0`` (or its fused twin
``FusedCogVideoXAttnProcessor2_0``, after ``fuse_qkv_projections``) runs every call, sparse ones
included: projections, per-head LayerNorms and the rotary embedding on the video tokens are
diffusers' own; only its ``F.scaled_dot_product_attention`` is replaced by the block-sparse kernel
(video tokens follow the pattern, text tokens stay dense both ways).
"""

from __future__ import annotations

from typing import Any

from .base import SparseAttnProcessor


class CogVideoXSparseAttnProcessor(
    SparseAttnProcessor,
    stock="diffusers.models.attention_processor:CogVideoXAttnProcessor2_0",
    reproduces=("FusedCogVideoXAttnProcessor2_0",),
    attention_op="F",
):
    """Block-sparse joint ``[text, video]`` self-attention for one CogVideoX ``attn1`` layer; with
    a fused stock processor (``fuse_qkv_projections`` before diffattn) it keeps the fused QKV."""

    def is_self_attention(self, call: dict[str, Any]) -> bool:
        return call.get("encoder_hidden_states") is not None and not call["attn"].is_cross_attention
