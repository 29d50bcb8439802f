"""Attention kernels: the dispatching entry point, the backend registry, the exact masked
reference and the CPU path; agent attention (AgentSD), an op of its own.

Torch only at import time: the Triton kernels (``triton_*.py``) are imported lazily by the
dispatcher the first time ``backend="triton"`` is used.
"""

from .agent import agent_attention, agent_attention_problems
from .api import block_sparse_attention, support_problems
from .backends import BACKEND_NAMES, BACKENDS, Backend, backends_on, resolve_backend, triton_interpreter
from .cpu import cpu_block_sparse_attention
from .reference import masked_attention_reference, pooled_attention_reference

__all__ = [
    "BACKENDS",
    "BACKEND_NAMES",
    "Backend",
    "agent_attention",
    "agent_attention_problems",
    "backends_on",
    "block_sparse_attention",
    "cpu_block_sparse_attention",
    "masked_attention_reference",
    "pooled_attention_reference",
    "resolve_backend",
    "support_problems",
    "triton_interpreter",
]
