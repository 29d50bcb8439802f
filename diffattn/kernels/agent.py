"""Agent attention (AgentSD): queries read a few agent tokens that have read the keys and values.

The AgentSD attention of "Agent Attention" (Han et al., reference code LeapLabTHU/Agent-Attention,
``agentsd/patch.py``) replaces ``softmax(Q K^T s) V`` by two small attentions through ``A`` agent
tokens, plus a shortcut of the values::

    agent_feature = softmax(A K^T * s) @ V                     # [B, H, A, D]: agents aggregate V
    out = softmax(Q A^T * s ** k_scale2) @ agent_feature + k_shortcut * V    # [B, H, N, D]

with ``s = D ** -0.5`` (the reference's ``self.scale``), so the second score scale is
``D ** (-0.5 * k_scale2)`` (the reference's ``self.scale ** k_scale2``). Both steps are
``torch.nn.functional.scaled_dot_product_attention`` calls: the largest score matrix is
``N x A``, never ``N x N``, and the fused SDPA backends (flash, memory-efficient) are used where
the device and dtype allow. The backward is autograd through SDPA: each SDPA backward is already
fused where its forward was, so a custom backward would not pay.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..patterns._checks import is_finite_number


def _tensor_problems(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, agents: torch.Tensor) -> list[str]:
    tensors = {"q": q, "k": k, "v": v, "agents": agents}
    problems = [
        f"{name} must have 4 dimensions [B, H, {'A' if name == 'agents' else 'N'}, D], got {x.dim()} "
        f"(shape {tuple(x.shape)})"
        for name, x in tensors.items()
        if x.dim() != 4
    ]
    problems += [
        f"{name} must be a floating-point tensor, got dtype {x.dtype}"
        for name, x in tensors.items()
        if not x.is_floating_point()
    ]
    if len({x.dtype for x in tensors.values()}) > 1:
        problems.append("q, k, v and agents must have the same dtype; got "
                        + ", ".join(f"{name}={x.dtype}" for name, x in tensors.items()))
    if len({x.device for x in tensors.values()}) > 1:
        problems.append("q, k, v and agents must be on the same device; got "
                        + ", ".join(f"{name}={x.device}" for name, x in tensors.items()))
    if any(x.dim() != 4 for x in tensors.values()):
        return problems

    if k.shape != q.shape or v.shape != q.shape:
        problems.append(f"k and v must have the shape of q [B, H, N, D]={tuple(q.shape)}; "
                        f"got k={tuple(k.shape)}, v={tuple(v.shape)}")
    batch, heads, tokens, head_dim = q.shape
    a_batch, a_heads, num_agents, a_head_dim = agents.shape
    for what, got, want in (("B", a_batch, batch), ("H", a_heads, heads), ("D", a_head_dim, head_dim)):
        if got != want:
            problems.append(f"agents {what}={got} (agents.shape={tuple(agents.shape)}) must equal q's {what}={want} "
                            f"(q.shape={tuple(q.shape)})")
    if not 1 <= num_agents <= tokens:
        problems.append(f"agent count A={num_agents} (agents.shape[2]) must be in [1, N={tokens}]")
    if head_dim < 1:
        problems.append("head dim D (q.shape[3]) must be >= 1, got 0")
    return problems


def agent_attention_problems(q: Any, k: Any, v: Any, agents: Any, k_scale2: Any = 0.3, shortcut: Any = 0.075,
                             scale: Any = None) -> list[str]:
    """Every reason :func:`agent_attention` would reject these arguments (empty when it accepts them).

    Example:
        >>> import torch
        >>> q = torch.zeros(1, 2, 10, 8)
        >>> for problem in agent_attention_problems(q, q, q, torch.zeros(1, 2, 11, 8), scale=-1.0):
        ...     print(problem)
        scale must be None or a finite number > 0, got -1.0
        agent count A=11 (agents.shape[2]) must be in [1, N=10]
    """
    problems: list[str] = []
    if scale is not None and not (is_finite_number(scale) and scale > 0):
        problems.append(f"scale must be None or a finite number > 0, got {scale!r}")
    for name, value in (("k_scale2", k_scale2), ("shortcut", shortcut)):
        if not is_finite_number(value):
            problems.append(f"{name} must be a finite real number (int or float), got {value!r}")
    tensors = {"q": q, "k": k, "v": v, "agents": agents}
    not_tensors = [f"{name} must be a torch.Tensor, got {type(x).__name__}"
                   for name, x in tensors.items() if not isinstance(x, torch.Tensor)]
    if not_tensors:
        return problems + not_tensors
    return problems + _tensor_problems(q, k, v, agents)


def agent_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, agents: torch.Tensor,
                    k_scale2: float = 0.3, shortcut: float = 0.075, scale: float | None = None) -> torch.Tensor:
    """AgentSD attention: ``softmax(Q A^T s^k_scale2) @ (softmax(A K^T s) @ V) + shortcut * V``.

    In the reference's names (``agentsd/patch.py``, with ``agent`` the agent tokens projected by
    ``to_q``)::

        s = scale if scale is not None else D ** -0.5               # self.scale
        agent_feature = softmax(agent @ k^T * s) @ v                 # attn1, [B, H, A, D]
        out = softmax(q @ agent^T * s ** k_scale2) @ agent_feature   # attn2, [B, H, N, D]
        out = out + shortcut * v                                     # k_shortcut

    Two ``scaled_dot_product_attention`` calls; memory is O((N + A) * D + N * A) at worst (the
    unfused math backend), never N x N. Differentiable in q, k, v and agents (autograd through
    SDPA). Defaults ``k_scale2=0.3, shortcut=0.075`` are AgentSD's.

    Args:
        q, k, v: ``[B, H, N, D]``, same dtype and device (self-attention: the shortcut adds ``v``
            to the output of each query, so the query and key counts are the same N).
        agents: ``[B, H, A, D]`` with ``1 <= A <= N``: the agent tokens in query space.
        k_scale2: exponent of ``s`` for the queries-read-agents scores (finite real).
        shortcut: weight of ``v`` added to the output (finite real; 0 disables it).
        scale: ``s``, a finite number > 0; ``None`` means ``D ** -0.5``.

    Returns:
        ``[B, H, N, D]`` in the inputs' dtype.

    Raises:
        UserError: listing every problem with the arguments (see :func:`agent_attention_problems`).

    Example:
        >>> import torch
        >>> from diffattn import agent_attention
        >>> q, k, v = torch.randn(3, 2, 4, 100, 64).unbind(0)
        >>> agents = q[:, :, :16]                     # any [B, H, A, D] tokens; AgentSD merges tokens
        >>> out = agent_attention(q, k, v, agents)
        >>> out.shape
        torch.Size([2, 4, 100, 64])
        >>> s = 64 ** -0.5
        >>> plain = (torch.softmax(q @ agents.mT * s ** 0.3, -1) @ (torch.softmax(agents @ k.mT * s, -1) @ v)
        ...          + 0.075 * v)
        >>> torch.allclose(out, plain, atol=1e-5)
        True
    """
    problems = agent_attention_problems(q, k, v, agents, k_scale2, shortcut, scale)
    if problems:
        raise UserError("agent_attention got invalid arguments:\n" + "\n".join(f"    {p}" for p in problems))
    s = q.shape[-1] ** -0.5 if scale is None else float(scale)
    agent_feature = F.scaled_dot_product_attention(agents, k, v, scale=s)
    out = F.scaled_dot_product_attention(q, agents, agent_feature, scale=s ** float(k_scale2))
    return out + float(shortcut) * v if shortcut != 0 else out


__all__ = ["agent_attention", "agent_attention_problems"]
