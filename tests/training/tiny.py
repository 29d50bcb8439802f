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


def saved_tiny_cogvideox(folder: Path, version: str = "1.0") -> Path:
    """The tiny CogVideoX 1.0 (rotary) or 1.5 pipeline of the adapter tests with a tokenizer and a
    T5-style text encoder of its text width, saved."""
    from tests.adapters.tiny_cogvideox import TEXT_DIM, tiny_cogvideox_pipeline

    pipe = tiny_cogvideox_pipeline(version=version, num_layers=2, seed=0)
    tokenizer, encoder = _tiny_text(TEXT_DIM)
    pipe.register_modules(tokenizer=tokenizer, text_encoder=encoder)
    pipe.save_pretrained(str(folder))
    return folder


def saved_tiny_hunyuan_video(folder: Path) -> Path:
    """The tiny HunyuanVideoPipeline of the adapter tests with word-level tokenizers, a 2-layer
    Llama (its prompt embeddings) and a 1-layer CLIP text model (its pooled embedding), saved."""
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    from diffattn.pipelines.embedded import build_tokenizer
    from tests.adapters.tiny_hunyuan_video import POOLED_DIM, TEXT_DIM, tiny_hunyuan_video_pipeline

    pipe = tiny_hunyuan_video_pipeline(seed=0)
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    llama = LlamaModel(LlamaConfig(vocab_size=len(tokenizer), hidden_size=TEXT_DIM, intermediate_size=32,
                                   num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                   max_position_embeddings=512, pad_token_id=0))
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=POOLED_DIM, intermediate_size=16,
                                        num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77,
                                        pad_token_id=0, bos_token_id=0, eos_token_id=1))
    pipe.register_modules(tokenizer=tokenizer, text_encoder=llama, tokenizer_2=build_tokenizer(), text_encoder_2=clip)
    pipe.save_pretrained(str(folder))
    return folder


def saved_tiny_mochi(folder: Path) -> Path:
    """The tiny MochiPipeline of the adapter tests (12 latent channels) with a tiny Mochi VAE
    (32-channel blocks: its group norms need 32), a tokenizer and a T5-style encoder, saved."""
    from diffusers import AutoencoderKLMochi

    from tests.adapters.tiny_mochi import TEXT_DIM, tiny_mochi_pipeline

    pipe = tiny_mochi_pipeline(num_layers=2, seed=0, in_channels=12)
    torch.manual_seed(0)
    vae = AutoencoderKLMochi(encoder_block_out_channels=(32,) * 4, decoder_block_out_channels=(32,) * 4,
                             layers_per_block=(1,) * 5, add_attention_block=(False,) * 5)
    tokenizer, encoder = _tiny_text(TEXT_DIM)
    pipe.register_modules(vae=vae, tokenizer=tokenizer, text_encoder=encoder)
    pipe.save_pretrained(str(folder))
    return folder
