"""SparsityConfig: which pattern runs where and when inside a diffusion pipeline."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from ..errors import UserError
from ..kernels.backends import check_backend_name, check_config_block_size
from ..patterns import Pattern
from ..patterns._checks import check_positive_int
from ..patterns.grid import check_tile_shape

#: What a call that cannot run sparse does: "warn" (the stock attention and one
#: DenseFallbackWarning per reason) or "raise" (a UserError naming the reason).
ON_UNSUPPORTED = ("warn", "raise")


@dataclass(frozen=True)
class SparsityConfig:
    """How a pipeline's self-attention is sparsified.

    Args:
        pattern: the sparsity pattern (any :class:`~diffattn.patterns.Pattern`).
        dense_layers: transformer blocks that stay dense: block indices (ints, negative counts from
            the end) and/or ``fnmatch`` filters on attention module names (e.g. ``"blocks.0.*"``).
        dense_steps: the first denoising steps that stay dense (warm-up).
        dense_last_steps: the last denoising steps that stay dense.
        block_size: kernel tile size (64 or 128 for real models); one the backend runs
            (``"auto"``: one every backend it may pick runs, see
            :func:`diffattn.kernels.backends.config_block_sizes`).
        tile_shape: ``(t, h, w)`` tile-major token permutation for local patterns, or None.
        backend: ``"auto"`` (Triton on CUDA, the CPU path on CPU), ``"cpu"``, ``"triton"`` or
            ``"reference"``.
        on_unsupported: what a self-attention call that cannot run sparse does (no token grid,
            a sequence that is not the grid, a head dim/dtype/device the kernel refuses, context
            parallelism, ...): ``"warn"`` (default) runs the stock attention and issues one
            :class:`~diffattn.errors.DenseFallbackWarning` per reason and transformer;
            ``"raise"`` raises :class:`~diffattn.errors.UserError` naming the reason.

    Example:
        >>> from diffattn import Radial
        >>> SparsityConfig(pattern=Radial(), dense_steps=12, dense_layers=(0,)).dense_layers
        (0,)
    """

    pattern: Pattern
    dense_layers: tuple[int | str, ...] = ()
    dense_steps: int = 0
    dense_last_steps: int = 0
    block_size: int = 128
    tile_shape: tuple[int, int, int] | None = None
    backend: str = "auto"
    on_unsupported: str = "warn"

    def __post_init__(self) -> None:
        if not isinstance(self.pattern, Pattern):
            raise UserError(
                f"SparsityConfig.pattern must be a diffattn Pattern (Dense, Radial, Neighborhood, ...), "
                f"got {self.pattern!r}"
            )
        layers = self.dense_layers
        if isinstance(layers, (int, str)):
            layers = (layers,)
        if not isinstance(layers, (tuple, list)) or any(
            isinstance(x, bool) or not isinstance(x, (int, str)) for x in layers
        ):
            raise UserError(
                f"SparsityConfig.dense_layers must be a tuple of block indices (int) and name filters (str), "
                f"got {self.dense_layers!r}"
            )
        object.__setattr__(self, "dense_layers", tuple(layers))
        check_positive_int("SparsityConfig.dense_steps", self.dense_steps, allow_zero=True)
        check_positive_int("SparsityConfig.dense_last_steps", self.dense_last_steps, allow_zero=True)
        check_backend_name("SparsityConfig.backend", self.backend)
        check_config_block_size("SparsityConfig.block_size", self.block_size, self.backend)
        if self.tile_shape is not None:
            object.__setattr__(self, "tile_shape", check_tile_shape(self.tile_shape))
        if not isinstance(self.on_unsupported, str) or self.on_unsupported not in ON_UNSUPPORTED:
            raise UserError(
                f"SparsityConfig.on_unsupported must be one of {', '.join(map(repr, ON_UNSUPPORTED))}; "
                f"got {self.on_unsupported!r}"
            )

    def with_overrides(self, **overrides: Any) -> "SparsityConfig":
        """A copy with some fields replaced (unknown names are a :class:`UserError`)."""
        unknown = sorted(set(overrides) - {f for f in self.__dataclass_fields__})
        if unknown:
            allowed = ", ".join(sorted(self.__dataclass_fields__))
            raise UserError(f"unknown SparsityConfig field(s) {', '.join(unknown)}; allowed: {allowed}")
        return replace(self, **overrides)
