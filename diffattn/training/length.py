"""Length extrapolation: what running a model at more frames than it was trained at needs besides
LoRA weights.

* **RoPE positions.** Wan's transformer precomputes its rotary tables for ``rope_max_seq_len``
  positions per axis (1024 in Wan 2.1, 256 in the embedded model); a video with more latent
  frames (or rows, columns) than that fails inside the rotary embedding. The tables have no
  learned parameters, so :func:`fit_rope` rebuilds them longer: positions below the old limit
  get exactly the old values, new positions continue the same frequencies (extrapolation, as
  the Radial Attention LoRA recipe trains it). The other families compute RoPE from the call's
  sizes (HunyuanVideo, LTX-Video, Mochi, CogVideoX) and need nothing.
* **Sparse density at the longer length.** A preset's pattern is defined per grid, so the same
  preset is sparser at 4x the frames (Radial's work grows as O(n log n)); :func:`density_by_length`
  reports the layout density at each length so the saving at the target length is known before
  training (``diffattn train-lora`` prints it).
"""

from __future__ import annotations

from typing import Any

import torch


def needed_rope_positions(transformer: Any, latent_shape: tuple[int, ...]) -> int:
    """Positions per axis a Wan transformer's RoPE must cover for latents ``[.., f, h, w]``.

    Example:
        >>> from diffusers import WanTransformer3DModel
        >>> transformer = WanTransformer3DModel(num_attention_heads=2, attention_head_dim=12, in_channels=4,
        ...     out_channels=4, text_dim=8, freq_dim=8, ffn_dim=8, num_layers=1, rope_max_seq_len=16)
        >>> needed_rope_positions(transformer, (1, 4, 40, 8, 8))    # patch (1, 2, 2): 40 frames, 4 x 4
        40
    """
    p_t, p_h, p_w = transformer.config.patch_size
    frames, height, width = latent_shape[-3:]
    return max(frames // p_t, height // p_h, width // p_w)


def fit_rope(transformer: Any, latent_shape: tuple[int, ...]) -> bool:
    """Rebuild a Wan transformer's rotary tables if latents ``[.., f, h, w]`` need more positions
    than it has (exact for the old positions); True if it did. Other transformers: False.

    Example:
        >>> from diffusers import WanTransformer3DModel
        >>> transformer = WanTransformer3DModel(num_attention_heads=2, attention_head_dim=12, in_channels=4,
        ...     out_channels=4, text_dim=8, freq_dim=8, ffn_dim=8, num_layers=1, rope_max_seq_len=16)
        >>> old = transformer.rope.freqs_cos.clone()
        >>> fit_rope(transformer, (1, 4, 40, 8, 8)), transformer.rope.max_seq_len
        (True, 40)
        >>> bool(torch.equal(transformer.rope.freqs_cos[:16], old))
        True
    """
    rope = getattr(transformer, "rope", None)
    if rope is None or not hasattr(rope, "max_seq_len") or not hasattr(rope, "freqs_cos"):
        return False
    needed = needed_rope_positions(transformer, latent_shape)
    if needed <= rope.max_seq_len:
        return False
    longer = type(rope)(rope.attention_head_dim, rope.patch_size, needed)
    rope.max_seq_len = needed
    rope.freqs_cos = longer.freqs_cos.to(rope.freqs_cos.device)
    rope.freqs_sin = longer.freqs_sin.to(rope.freqs_sin.device)
    return True


def install_rope_fit(transformer: torch.nn.Module) -> Any:
    """A forward pre-hook that calls :func:`fit_rope` with each call's latents (so any length a
    pipeline is called with works); returns the hook handle.

    Example:
        >>> from diffusers import WanTransformer3DModel
        >>> transformer = WanTransformer3DModel(num_attention_heads=2, attention_head_dim=12, in_channels=4,
        ...     out_channels=4, text_dim=8, freq_dim=8, ffn_dim=8, num_layers=1, rope_max_seq_len=4)
        >>> handle = install_rope_fit(transformer)
        >>> transformer(torch.zeros(1, 4, 6, 4, 4), torch.tensor([1]), torch.zeros(1, 2, 8)).sample.shape
        torch.Size([1, 4, 6, 4, 4])
        >>> handle.remove()
    """
    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.get("hidden_states")
        if isinstance(hidden, torch.Tensor) and hidden.ndim == 5:
            fit_rope(module, tuple(hidden.shape))

    return transformer.register_forward_pre_hook(hook, with_kwargs=True)


def density_by_length(config: Any, grids: dict[str, Any]) -> dict[str, float]:
    """Layout density of a :class:`~diffattn.SparsityConfig` on each named grid (sparse layers only).

    Example:
        >>> from diffattn import Radial, SparsityConfig, VideoGrid
        >>> config = SparsityConfig(pattern=Radial(block_size=64), block_size=64)
        >>> d = density_by_length(config, {"17": VideoGrid(17, 8, 8), "65": VideoGrid(65, 8, 8)})
        >>> d["65"] < d["17"] <= 1.0
        True
    """
    from ..processors.presets import preset_density

    return {name: float(preset_density(config, grid)) for name, grid in grids.items()}
