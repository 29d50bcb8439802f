"""diffattn.steer on tiny SD 1.5 and SDXL pipelines with real (tiny, random) CLIP tokenizers and
text encoders built in code: words, the UNet's cross-attention at every resolution level, CFG rows,
composition with AgentSD (sparse ``attn1``, steered ``attn2``)."""

from __future__ import annotations

import math
import string
import warnings

import pytest
import torch

import diffattn
from diffattn import UserError
from diffattn.adapters import sparsity_state
from diffattn.processors.steering import SteeredAttnProcessor
from diffattn.processors.unet import UNetSparseAttnProcessor

from .adapters.test_unet import SD_LAYERS, SDXL_LAYERS
from .adapters.tiny_unet import POOLED_DIM, TEXT_DIM, tiny_sd_pipeline, tiny_sdxl_pipeline
from .threads import one_thread  # noqa: F401 (autouse fixture)

PROMPT = "a red circle"
TEXT_TOKENS = 10  # the tokenizer's model_max_length: BOS, the prompt's tokens, EOS, padding
LATENT = 16  # 32 x 32 pixels with the tiny VAE
LEFT_HALF = (0.0, 0.0, 0.5, 1.0)
MERGES = [("r", "e"), ("re", "d</w>"), ("c", "i"), ("ci", "r"), ("cir", "c"), ("circ", "l"), ("circl", "e</w>")]


def clip_tokenizer():
    """A CLIP BPE tokenizer over the lowercase letters with merges for "red" and "circle"."""
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {}
    for piece in [*string.ascii_lowercase, *(c + "</w>" for c in string.ascii_lowercase),
                  *(a + b for a, b in MERGES), "<|startoftext|>", "<|endoftext|>"]:
        vocab[piece] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=MERGES, model_max_length=TEXT_TOKENS)


def clip_encoder(tokenizer, hidden: int, projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    ids = tokenizer.convert_tokens_to_ids(["<|startoftext|>", "<|endoftext|>"])
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=TEXT_TOKENS,
                            bos_token_id=ids[0], eos_token_id=ids[1], pad_token_id=ids[1], projection_dim=POOLED_DIM)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def pipeline(family: str):
    """The tiny pipeline of ``family`` with its tokenizer(s) and text encoder(s): SDXL's two encoders
    give TEXT_DIM / 2 features each (concatenated), the second one the pooled embedding."""
    torch.manual_seed(0)
    tokenizer = clip_tokenizer()
    if family == "sd":
        pipe = tiny_sd_pipeline()
        pipe.register_modules(tokenizer=tokenizer, text_encoder=clip_encoder(tokenizer, TEXT_DIM))
    else:
        pipe = tiny_sdxl_pipeline()
        pipe.register_modules(tokenizer=tokenizer, text_encoder=clip_encoder(tokenizer, TEXT_DIM // 2),
                              tokenizer_2=clip_tokenizer(),
                              text_encoder_2=clip_encoder(tokenizer, TEXT_DIM // 2, projection=True))
    return pipe


def run(pipe, prompt=PROMPT, steps: int = 2, **kwargs) -> torch.Tensor:
    return pipe(prompt, height=2 * LATENT, width=2 * LATENT, num_inference_steps=steps, guidance_scale=3.0,
                output_type="latent", generator=torch.Generator().manual_seed(1), **kwargs).images


@pytest.fixture(scope="module", params=["sd", "sdxl"])
def family(request):
    pipe = pipeline(request.param)
    return request.param, pipe, run(pipe)


def test_neutral_settings_give_exactly_the_stock_output(family):
    _, pipe, stock = family
    with diffattn.steer(pipe, token_weights={"red": 1.0, 1: 1.0}) as handle:
        torch.testing.assert_close(run(pipe), stock, atol=0, rtol=0)
        assert handle.tokens == {"red": [2], 1: [1]}  # BOS first: "a" is token 1


def test_every_cross_attention_is_steered_and_maps_sum_to_one(family):
    name, pipe, stock = family
    handle = diffattn.steer(pipe, capture=list(range(TEXT_TOKENS)))
    steered = run(pipe)
    layers = SD_LAYERS if name == "sd" else SDXL_LAYERS
    attn2 = [m.processor for n, m in pipe.unet.named_modules() if n.endswith("attn2")]
    assert len(attn2) == len(layers) and all(isinstance(p, SteeredAttnProcessor) for p in attn2)
    # capturing only adds value features: the same output up to float rounding of the latents (hundreds)
    torch.testing.assert_close(steered, stock, atol=1e-5 * float(stock.abs().max()), rtol=1e-5)
    assert len(handle.step_maps[0]) == 2
    for word_map in handle.maps.values():
        assert tuple(word_map.shape) == (1, LATENT, LATENT)  # every level at the latent grid
    # cross-attention: each query's mass over all text tokens is 1, at every level
    torch.testing.assert_close(sum(handle.maps.values()), torch.ones(1, LATENT, LATENT), atol=1e-5, rtol=0)
    handle.remove()
    assert not any(isinstance(p, SteeredAttnProcessor) for p in pipe.unet.attn_processors.values())


def test_a_coarse_level_map_is_repeated_over_its_latent_tokens(family):
    name, pipe, _ = family
    layers = SD_LAYERS if name == "sd" else SDXL_LAYERS
    coarse = [layer for layer, downsample in layers.items() if downsample == 2]
    with diffattn.steer(pipe, capture=["circle"], layers=coarse) as handle:
        run(pipe)
        word_map = handle.maps["circle"][0]
    blocks = word_map.reshape(LATENT // 2, 2, LATENT // 2, 2)
    torch.testing.assert_close(blocks, blocks[:, :1, :, :1].expand_as(blocks), atol=0, rtol=0)
    assert float(word_map.std()) > 0  # a map, not a constant


def test_hard_region_and_exclusion_put_no_captured_mass_on_the_wrong_side(family):
    _, pipe, _ = family
    half = LATENT // 2
    with diffattn.steer(pipe, regions={"red": LEFT_HALF}, capture=["red", "circle"], strength=math.inf) as handle:
        run(pipe)
        assert float(handle.maps["red"][..., half:].abs().max()) == 0.0
        assert float(handle.maps["red"][..., :half].min()) > 0.0
        assert float(handle.maps["circle"][..., half:].min()) > 0.0  # other words are not confined
    with diffattn.steer(pipe, exclude={"red circle": LEFT_HALF}, capture=["circle"], strength=math.inf) as handle:
        run(pipe)
        assert float(handle.maps["circle"][..., :half].abs().max()) == 0.0
        assert float(handle.maps["circle"][..., half:].min()) > 0.0


def test_edits_change_the_output_and_remove_restores_stock(family):
    _, pipe, stock = family
    stock_class = type(pipe)
    diffattn.steer(pipe, token_weights={"circle": 3.0}, regions={"red": torch.ones(2 * LATENT, 2 * LATENT)})
    assert not torch.allclose(run(pipe), stock, atol=1e-3)
    diffattn.remove(pipe)
    assert type(pipe) is stock_class
    torch.testing.assert_close(run(pipe), stock, atol=0, rtol=0)


def test_only_the_prompt_rows_of_the_cfg_batch_are_steered(family):
    """The pipeline batches [negative, prompt] in one UNet call: only the prompt's row changes."""
    _, pipe, _ = family
    seen = []
    hook = pipe.unet.register_forward_hook(lambda module, args, out: seen.append(out[0].detach()))
    try:
        run(pipe, steps=1)
        with diffattn.steer(pipe, token_weights={"red": 4.0}):
            run(pipe, steps=1)
    finally:
        hook.remove()
    stock, steered = seen
    torch.testing.assert_close(steered[0], stock[0], atol=0, rtol=0)
    assert not torch.allclose(steered[1], stock[1], atol=1e-4)


@pytest.mark.parametrize("steer_first", [False, True])
def test_composes_with_the_agent_preset(family, steer_first):
    _, pipe, _ = family
    if steer_first:
        handle = diffattn.steer(pipe, regions={"red": LEFT_HALF}, capture=["red"], strength=math.inf)
        diffattn.apply(pipe, "agent")
    else:
        diffattn.apply(pipe, "agent")
        handle = diffattn.steer(pipe, regions={"red": LEFT_HALF}, capture=["red"], strength=math.inf)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", diffattn.DenseFallbackWarning)
            latents = run(pipe)
        assert torch.isfinite(latents).all()
        assert sum(sparsity_state(pipe).sparse_calls.values()) > 0  # attn1: AgentSD
        processors = pipe.unet.attn_processors
        assert any(isinstance(p, UNetSparseAttnProcessor) for k, p in processors.items() if ".attn1." in k)
        assert all(isinstance(p, SteeredAttnProcessor) for k, p in processors.items() if ".attn2." in k)
        assert float(handle.maps["red"][..., LATENT // 2 :].abs().max()) == 0.0  # attn2: steered
    finally:
        diffattn.remove(pipe)
    assert not any(isinstance(p, (SteeredAttnProcessor, UNetSparseAttnProcessor))
                   for p in pipe.unet.attn_processors.values())


def test_unknown_word_is_a_user_error_naming_the_prompt_tokens(family):
    _, pipe, _ = family
    with diffattn.steer(pipe, capture=["blue"]):
        with pytest.raises(UserError, match=r"'blue' is not in the prompt 'a red circle'.*'red</w>'"):
            run(pipe)


def test_sdxl_words_use_the_first_clip_tokenizer_or_the_only_one():
    from diffattn.steering import _tokenizer

    pipe = tiny_sdxl_pipeline()
    first, second = clip_tokenizer(), clip_tokenizer()
    pipe.register_modules(tokenizer=first, tokenizer_2=second)
    assert _tokenizer(pipe) is first
    pipe.register_modules(tokenizer=None)  # as the SDXL refiner
    assert _tokenizer(pipe) is second


def test_levels_of_an_odd_latent_grid_cover_their_latent_tokens():
    """Latent 5 x 7, level d = 2: 3 x 4 tokens, the last row/column covering one latent token."""
    from diffattn import VideoGrid
    from diffattn.steering import _query_factors, _to_latent_grid, check_spec

    grid = VideoGrid(1, 5, 7)
    spec = check_spec(None, {"x": (0.0, 0.0, 3 / 7, 1.0)}, None, None, (0.0, 1.0), None, 1.0, False, False)
    (latent,) = _query_factors(spec, grid, strength=1.0)
    torch.testing.assert_close(latent.reshape(5, 7)[0], torch.tensor([1.0, 1, 1, -1, -1, -1, -1]))
    (level,) = _query_factors(spec, grid, strength=1.0, downsample=2)
    # latent columns {0, 1} inside, {2, 3} half, {4, 5} and {6} outside: bias 2 * inside - 1
    torch.testing.assert_close(level.reshape(3, 4), torch.tensor([[1.0, 0, -1, -1]]).expand(3, 4))
    expanded = _to_latent_grid(torch.arange(12.0).reshape(1, 12, 1), grid).reshape(5, 7)
    rows, cols = torch.arange(5)[:, None] // 2, torch.arange(7)[None, :] // 2
    torch.testing.assert_close(expanded, (rows * 4 + cols).float())


def test_cli_steers_a_local_sd_folder_and_writes_the_map(tmp_path, capsys):
    from diffattn.cli import main

    pipeline("sd").save_pretrained(tmp_path / "sd")
    out = tmp_path / "image.gif"
    # the agent preset (an op, not a layout) also checks that generate reports its pair density
    assert main(["generate", "--model", str(tmp_path / "sd"), "--preset", "agent", "--height", "32", "--width", "32",
                 "--steps", "1", "--prompt", PROMPT, "--region", "red=0,0,0.5,1", "--capture", "red",
                 "--output", str(out)]) == 0
    assert "wrote attention maps" in capsys.readouterr().out
    assert (tmp_path / "image.red.png").is_file() and (tmp_path / "image.red.gif").is_file()
