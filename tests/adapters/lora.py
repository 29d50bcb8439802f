"""LoRA round-trip helpers shared by the adapter tests (peft, nothing downloaded)."""

from __future__ import annotations

from pathlib import Path

import pytest

from diffattn import Dense
from diffattn.adapters import apply

ATTENTION_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
JOINT_ATTENTION_TARGETS = ATTENTION_TARGETS + ["add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


def add_and_save_random_lora(pipe, directory: Path, target_modules: list[str] = ATTENTION_TARGETS) -> Path:
    """Give ``pipe.transformer`` a random (non-zero) LoRA and save it with the pipeline class's
    ``save_lora_weights``; returns the folder ``pipe.load_lora_weights`` reads."""
    peft = pytest.importorskip("peft")
    from peft.utils import get_peft_model_state_dict

    config = peft.LoraConfig(r=4, lora_alpha=4, target_modules=target_modules, init_lora_weights=False)
    pipe.transformer.add_adapter(config)
    type(pipe).save_lora_weights(directory, transformer_lora_layers=get_peft_model_state_dict(pipe.transformer))
    return directory


def load_lora_around_apply(pipe, lora_dir: Path, order: str) -> None:
    """``load_lora_weights`` before (``"lora_then_apply"``) or after (``"apply_then_lora"``)
    ``diffattn.apply(pipe, Dense(), block_size=32)``."""
    if order == "lora_then_apply":
        pipe.load_lora_weights(lora_dir)
        apply(pipe, Dense(), block_size=32)
    elif order == "apply_then_lora":
        apply(pipe, Dense(), block_size=32)
        pipe.load_lora_weights(lora_dir)
    else:
        raise ValueError(f"order must be 'lora_then_apply' or 'apply_then_lora', got {order!r}")
