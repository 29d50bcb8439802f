"""Self-attention processor for Stable Diffusion UNets (SD 1.x/2.x, SDXL): ``attn1`` of every
``BasicTransformerBlock`` (``Attention`` with the stock ``AttnProcessor2_0``).

A UNet's self-attention runs at several resolutions: a layer's tokens are the raster
``height x width`` grid of its level, the latent grid downsampled ``d`` times (``d`` = 1, 2, 4,
...). The UNet's pre-hook publishes the latent grid; each call finds its level from its token
count (:func:`~diffattn.processors.agent.level_grid`).

* Block-sparse patterns (Neighborhood, Dense) run the stock ``__call__`` with its
  ``F.scaled_dot_product_attention`` replaced by the kernel over the level's grid.
* :class:`~diffattn.processors.agent.AgentSD`: the stock ``__call__`` runs on the ToMe-merged
  tokens (its own projections: LoRA keeps working), with its attention op replaced by
  :func:`diffattn.agent_attention` (agents: the agent merge of the same tokens, projected by
  ``attn.to_q``) or, when AgentSD uses no agents, left as the stock op over the merged tokens
  (plain ToMe); the output is unmerged. The matching's metric is the transformer block's input
  (as in AgentSD), captured by a block pre-hook the UNet adapter installs.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch

from ..errors import UserError
from ..kernels import agent_attention
from .agent import AgentSD, level_grid, run_agent_op, runtime_for, tome_merges
from .base import SparseAttnProcessor
from .state import SparseUnsupported


class UNetSparseAttnProcessor(
    SparseAttnProcessor,
    stock="diffusers.models.attention_processor:AttnProcessor2_0",
    attention_op="F",
    parameters=("attn", "hidden_states", "encoder_hidden_states", "attention_mask", "temb"),
):
    """Sparse or agent self-attention for one UNet ``attn1`` layer (``attn2``, the text
    cross-attention, always keeps the stock path).

    Example:
        >>> UNetSparseAttnProcessor().stock_classes
        ('AttnProcessor2_0',)
    """

    def __init__(self, stock: Any = None, state: Any = None, layer_index: int = 0) -> None:
        super().__init__(stock, state, layer_index)
        #: The transformer block's input of the current call (the UNet adapter's block pre-hook
        #: sets it; AgentSD's matching metric), and the attention module's name.
        self.block_input: torch.Tensor | None = None
        self.layer_name: str | None = None
        self._level: Any = None  # VideoGrid of the running call
        self._agents: torch.Tensor | None = None  # [B, H, A, D] of the running AgentSD call
        self._settings: AgentSD | None = None  # its AgentSD settings

    def process(self, call: dict[str, Any]) -> Any:
        try:
            return super().process(call)
        finally:  # never keep an activation alive between calls
            self.block_input, self._level, self._agents, self._settings = None, None, None, None

    def fallback_reason(self, call: dict[str, Any]) -> str | None:
        reason = super().fallback_reason(call)
        if reason is not None:
            return reason
        if call.get("attention_mask") is not None:
            return "an attention mask on the UNet's self-attention"
        tokens = call["hidden_states"].shape[1] if call["hidden_states"].ndim == 3 else None
        if tokens is None or level_grid(self.state.grid, tokens) is None:
            return (f"the self-attention input {tuple(call['hidden_states'].shape)} is not a level of the latent "
                    f"grid {self.state.grid.height}x{self.state.grid.width}")
        return None

    def sparse(self, call: dict[str, Any]) -> Any:
        hidden_states = call["hidden_states"]
        downsample, self._level = level_grid(self.state.grid, hidden_states.shape[1])
        pattern = self.state.config.pattern
        if not isinstance(pattern, AgentSD):
            return super().sparse(call)
        settings = pattern.settings(self.state.step, self.layer_name, self.layer_index)
        if downsample > settings.max_downsample:  # AgentSD leaves coarser levels alone, by design
            return self.state.run_dense(self.layer_index, lambda: self.stock(**call))
        metric = self.block_input if self.block_input is not None else hidden_states
        if metric.shape != hidden_states.shape:
            metric = hidden_states
        use_rand = settings.use_rand and hidden_states.shape[0] % 2 == 0
        generator = runtime_for(self.state).generator_for(hidden_states.device, pattern.seed, self.state.step) \
            if use_rand else None
        merges = tome_merges(metric, self._level.height, self._level.width, settings, generator)
        if merges is None:
            raise SparseUnsupported(f"the {self._level.height}x{self._level.width} grid has no whole "
                                    f"{settings.sy}x{settings.sx} ToMe cell or nothing to merge")
        if merges.agent_merge is not None:
            self._agents = _heads(call["attn"], merges.agent_merge(hidden_states))
        self._settings = settings
        out = super().sparse({**call, "hidden_states": merges.merge(hidden_states)})
        return merges.unmerge(out)

    def attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  key_padding: torch.Tensor | None = None, stock_op: Callable[[], torch.Tensor] | None = None,
                  parallel_config: Any = None) -> torch.Tensor:
        """``[B, N, H, D]`` attention of the running call: agent attention, ToMe's stock op over
        the merged tokens, or the block-sparse kernel over the level's grid."""
        state, pattern = self.state, self.state.config.pattern
        if isinstance(pattern, AgentSD):
            agents, settings = self._agents, self._settings
            if agents is None:  # plain ToMe: the stock op, over the merged tokens
                op = stock_op
            else:
                def op() -> torch.Tensor:
                    out = agent_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                          agents.to(query.dtype), k_scale2=settings.k_scale2,
                                          shortcut=settings.shortcut)
                    return out.transpose(1, 2)
            return run_agent_op(self, op)
        try:
            return state.attend(query, key, value, self.layer_index, grid=self._level, processor=self)
        except SparseUnsupported as unsupported:
            self.fall_back(unsupported.reason)
            return state.run_dense(self.layer_index, stock_op)


def _with_var_arguments(function: Any) -> None:
    """Give the template's ``__call__`` the stock one's trailing ``*args, **kwargs`` (diffusers
    filters the keyword arguments it passes by the processor's signature)."""
    signature = inspect.signature(function)
    extra = [inspect.Parameter("args", inspect.Parameter.VAR_POSITIONAL),
             inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD)]
    function.__signature__ = signature.replace(parameters=[*signature.parameters.values(), *extra])


_with_var_arguments(UNetSparseAttnProcessor.__call__)


def _heads(attn: Any, tokens: torch.Tensor) -> torch.Tensor:
    """``tokens`` ``[B, A, C]`` projected as queries by ``attn`` (``to_q``, heads, ``norm_q``), ``[B, H, A, D]``."""
    query = attn.to_q(tokens)
    batch, count, inner = query.shape
    if inner % attn.heads:
        raise UserError(f"attention module with {attn.heads} heads and to_q width {inner}: not divisible")
    query = query.view(batch, count, attn.heads, inner // attn.heads).transpose(1, 2)
    if getattr(attn, "norm_q", None) is not None:
        query = attn.norm_q(query)
    return query


__all__ = ["UNetSparseAttnProcessor"]
