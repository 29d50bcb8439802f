"""Tiny saved pipelines and data folders for the train-lora tests (offline, seconds)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from diffattn.runs import write_video
from tests.pipelines.tiny_embedded import tiny_embedded_pipeline


def saved_tiny_embedded(folder: Path) -> Path:
    """A 2-layer embedded pipeline saved with ``save_pretrained`` (``--model`` takes it)."""
    tiny_embedded_pipeline(seed=0).save_pretrained(str(folder))
    return folder


def saved_tiny_wan(folder: Path) -> Path:
    """The tiny WanPipeline of the adapter tests plus a word-level tokenizer and a 1-layer UMT5
    text encoder (width 32 = the transformer's text_dim), saved as a pipeline folder."""
    from tests.adapters.tiny_pipelines import tiny_wan_pipeline

    pipe = tiny_wan_pipeline(num_layers=2, seed=0)
    tokenizer, encoder = _tiny_text(32)
    pipe.register_modules(tokenizer=tokenizer, text_encoder=encoder)
    pipe.save_pretrained(str(folder))
    return folder


def _tiny_text(d_model: int):
    """The embedded model's word-level tokenizer and a 1-layer encoder of width ``d_model``."""
    from transformers import UMT5Config, UMT5EncoderModel

    from diffattn.pipelines.embedded import build_tokenizer

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
        relative_attention_num_buckets=8, dropout_rate=0.0, feed_forward_proj="gated-gelu", pad_token_id=0,
        eos_token_id=0, decoder_start_token_id=0))
    return tokenizer, encoder


def saved_tiny_ltx(folder: Path) -> Path:
    """The tiny LTXPipeline of the adapter tests with a tokenizer and text encoder, saved."""
    from tests.adapters.test_ltx_video import tiny_ltx_pipeline

    pipe = tiny_ltx_pipeline(num_layers=2, seed=0)
    tokenizer, encoder = _tiny_text(32)
    pipe.register_modules(tokenizer=tokenizer, text_encoder=encoder)
    pipe.save_pretrained(str(folder))
    return folder


def video_folder(folder: Path, frames: int = 9, size: int = 32, count: int = 2, captions: bool = True) -> Path:
    """``count`` moving-square GIFs and (with ``captions``) their metadata.jsonl."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(count):
        video = np.zeros((frames, size, size, 3), np.uint8)
        for f in range(frames):
            x = (2 * f + 5 * index) % (size - 8)
            video[f, 8:16, x:x + 8] = (255, 40 * index, 0)
        write_video(video, folder / f"clip{index}.gif", fps=8)
        rows.append({"file_name": f"clip{index}.gif", "caption": f"a red square moves right {index}"})
    if captions:
        (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder
