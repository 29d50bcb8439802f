"""Attention kernels: the dispatching entry point, the exact masked reference and the CPU path.

Torch only at import time: the Triton kernels (``triton_*.py``) are imported lazily by the
dispatcher the first time ``backend="triton"`` is used.
"""

from .api import BACKENDS, SUPPORTED_DTYPES, block_sparse_attention, support_problems
from .cpu import cpu_block_sparse_attention
from .reference import masked_attention_reference

__all__ = [
    "BACKENDS",
    "SUPPORTED_DTYPES",
    "block_sparse_attention",
    "cpu_block_sparse_attention",
    "masked_attention_reference",
    "support_problems",
]
