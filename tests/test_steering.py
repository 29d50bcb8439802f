"""diffattn.steer on real (tiny, random) pipelines of every family it targets, and the embedded model.

The tiny pipelines have no tokenizer (they are called with ``prompt_embeds``), so they are
steered by token position; words are resolved on the embedded model and on a sub-word tokenizer
built in code.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

import diffattn
from diffattn import Radial, SparsityConfig, UserError
from diffattn.adapters import sparsity_state
from diffattn.processors.base import SparseAttnProcessor
from diffattn.processors.steering import SteeredAttnProcessor
from diffattn.steering import resolve_tokens

from .adapters.test_ltx_video import ltx_call_kwargs, tiny_ltx_pipeline
from .adapters.tiny_cogvideox import TEXT_TOKENS as COG_TEXT
from .adapters.tiny_cogvideox import cogvideox_call_kwargs, tiny_cogvideox_pipeline
from .adapters.tiny_flux import TEXT_TOKENS as FLUX_TEXT
from .adapters.tiny_flux import flux_call_kwargs, tiny_flux_pipeline
from .adapters.tiny_hunyuan_video import hunyuan_video_call_kwargs, tiny_hunyuan_video_pipeline
from .adapters.tiny_mochi import mochi_call_kwargs, tiny_mochi_pipeline
from .adapters.tiny_pipelines import tiny_wan_pipeline, wan_call_kwargs
from .threads import one_thread  # noqa: F401 (autouse fixture)

pytestmark = pytest.mark.filterwarnings("ignore:In CPU autocast:UserWarning")  # Mochi's rotary

# family: (pipeline, call arguments, text tokens, latent token grid [F, h, w], cross-attention?)
FAMILIES = {
    "wan": (tiny_wan_pipeline, wan_call_kwargs, 8, (3, 4, 4), True),
    "ltx_video": (tiny_ltx_pipeline, ltx_call_kwargs, 8, (3, 8, 8), True),
    "flux": (tiny_flux_pipeline, lambda: flux_call_kwargs(true_cfg_scale=2.0), FLUX_TEXT, (1, 8, 6), False),
    "cogvideox": (tiny_cogvideox_pipeline, cogvideox_call_kwargs, COG_TEXT, (3, 4, 4), False),
    "hunyuan_video": (tiny_hunyuan_video_pipeline, hunyuan_video_call_kwargs, 8, (3, 4, 4), False),
    "mochi": (tiny_mochi_pipeline, mochi_call_kwargs, 8, (3, 4, 4), False),
}
LEFT_HALF = (0.0, 0.0, 0.5, 1.0)


def output(pipe, kwargs) -> torch.Tensor:
    result = pipe(**kwargs)
    return result.frames if hasattr(result, "frames") else result.images


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    make, call, text, grid, cross = FAMILIES[request.param]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Mochi's rotary autocast note
        pipe = make()
        stock = output(pipe, call())
    return request.param, pipe, call, text, grid, cross, stock


def test_neutral_settings_give_exactly_the_stock_output(family):
    _, pipe, call, _, _, _, stock = family
    handle = diffattn.steer(pipe, token_weights={0: 1.0, 2: 1.0}, steps=(0.0, 1.0))
    torch.testing.assert_close(output(pipe, call()), stock, atol=0, rtol=0)
    handle.remove()


def test_capture_only_leaves_the_output_and_maps_have_the_grid_shape(family):
    name, pipe, call, text, grid, cross, stock = family
    handle = diffattn.steer(pipe, capture=list(range(text)))
    steered = output(pipe, call())
    torch.testing.assert_close(steered, stock, atol=1e-5, rtol=1e-5)
    assert set(handle.maps) == set(range(text))
    for word_map in handle.maps.values():
        assert tuple(word_map.shape) == grid
    total = sum(handle.maps.values())
    if cross:  # every text token captured: each video query's mass over the text is 1
        torch.testing.assert_close(total, torch.ones(grid), atol=1e-5, rtol=0)
    else:      # joint attention: the text columns hold part of the mass
        assert float(total.min()) > 0 and float(total.max()) < 1
    assert len(handle.step_maps[0]) == 3  # one map per denoising step
    diffattn.remove(pipe)


def test_edits_change_the_output_and_remove_restores_stock(family):
    _, pipe, call, _, _, _, stock = family
    handle = diffattn.steer(pipe, token_weights={1: 3.0}, regions={2: LEFT_HALF})
    assert not torch.allclose(output(pipe, call()), stock, atol=1e-4)
    stock_class = handle._stock_class
    diffattn.remove(pipe)
    assert type(pipe) is stock_class
    assert not any(isinstance(p, SteeredAttnProcessor) for p in pipe.transformer.attn_processors.values()) \
        if hasattr(pipe.transformer, "attn_processors") else True
    torch.testing.assert_close(output(pipe, call()), stock, atol=0, rtol=0)


def test_hard_region_puts_no_captured_mass_outside(family):
    _, pipe, call, _, grid, _, _ = family
    handle = diffattn.steer(pipe, regions={1: LEFT_HALF}, capture=[1, 2], strength=math.inf)
    output(pipe, call())
    left = grid[2] // 2
    phrase = handle.maps[1]
    assert float(phrase[..., left:].abs().max()) == 0.0
    assert float(phrase[..., :left].min()) > 0.0
    assert float(handle.maps[2][..., left:].min()) > 0.0  # other tokens are not confined
    handle.remove()


def test_hard_exclusion_puts_no_captured_mass_inside(family):
    _, pipe, call, _, grid, _, _ = family
    handle = diffattn.steer(pipe, exclude={3: LEFT_HALF}, capture=[3], strength=math.inf)
    output(pipe, call())
    assert float(handle.maps[3][..., : grid[2] // 2].abs().max()) == 0.0
    assert float(handle.maps[3][..., grid[2] // 2 :].min()) > 0.0
    handle.remove()


@pytest.mark.parametrize("steer_first", [False, True])
def test_composes_with_a_sparse_preset_in_either_order(family, steer_first):
    _, pipe, call, _, grid, _, _ = family
    config = SparsityConfig(pattern=Radial(block_size=32), block_size=32)
    if steer_first:
        handle = diffattn.steer(pipe, regions={1: LEFT_HALF}, capture=[1], strength=math.inf)
        diffattn.apply(pipe, config)
    else:
        diffattn.apply(pipe, config)
        handle = diffattn.steer(pipe, regions={1: LEFT_HALF}, capture=[1], strength=math.inf)
    with warnings.catch_warnings():
        warnings.simplefilter("error", diffattn.DenseFallbackWarning)
        warnings.simplefilter("ignore", UserWarning)
        output(pipe, call())
    assert sum(sparsity_state(pipe).sparse_calls.values()) > 0
    assert float(handle.maps[1][..., grid[2] // 2 :].abs().max()) == 0.0
    diffattn.remove(pipe)
    processors = [m.processor for m in pipe.transformer.modules() if hasattr(m, "processor")]
    assert not any(isinstance(p, (SparseAttnProcessor, SteeredAttnProcessor)) for p in processors)


def test_sparse_joint_layers_steer_through_the_extension_point():
    pipe = tiny_cogvideox_pipeline()
    diffattn.apply(pipe, SparsityConfig(pattern=Radial(block_size=32), block_size=32))
    handle = diffattn.steer(pipe, token_weights={1: 2.0}, capture=[1])
    output(pipe, cogvideox_call_kwargs())
    processor = pipe.transformer.transformer_blocks[0].attn1.processor
    assert isinstance(processor, SparseAttnProcessor) and processor.text_steering is not None
    assert handle.maps[1].shape == (3, 4, 4)
    handle.remove()
    assert processor.text_steering is None
    diffattn.remove(pipe)


def test_the_unconditional_rows_are_not_steered():
    """LTX batches [negative, prompt] in one transformer call: only the prompt's row changes."""
    pipe = tiny_ltx_pipeline()
    seen = []
    hook = pipe.transformer.register_forward_hook(lambda module, args, out: seen.append(out[0].detach()))
    output(pipe, ltx_call_kwargs(steps=1))
    stock = seen.pop()
    diffattn.steer(pipe, token_weights={1: 4.0})
    output(pipe, ltx_call_kwargs(steps=1))
    steered = seen.pop()
    hook.remove()
    diffattn.remove(pipe)
    torch.testing.assert_close(steered[0], stock[0], atol=0, rtol=0)
    assert not torch.allclose(steered[1], stock[1], atol=1e-4)


# -- words ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def embedded():
    from diffattn.pipelines.embedded import load_embedded_pipeline

    pipe = load_embedded_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_embedded(pipe, prompt="a red circle moves right", **kwargs):
    return pipe(prompt, num_frames=2, height=32, width=32, num_inference_steps=2,
                generator=torch.Generator().manual_seed(0), output_type="pt", **kwargs).frames


def test_words_resolve_in_the_prompt_of_each_call(embedded):
    handle = diffattn.steer(embedded, token_weights={"red": 2.0}, regions={"Red Circle": np.ones((32, 32), bool)},
                            capture=["circle"])
    run_embedded(embedded)
    assert handle.tokens == {"red": [1], "Red Circle": [1, 2], "circle": [2]}
    run_embedded(embedded, prompt="a blue square and a red circle move left")
    assert handle.tokens["Red Circle"] == [5, 6]
    assert handle.maps["circle"].shape == (2, 4, 4)
    with pytest.raises(UserError, match=r"'red' is not in the prompt 'a blue square moves up'.*\['a', 'blue'"):
        run_embedded(embedded, prompt="a blue square moves up")
    handle.remove()


def test_words_need_a_prompt(embedded):
    embeds = embedded.encode_prompt("a red circle moves right")
    with diffattn.steer(embedded, capture=["red"]):
        with pytest.raises(UserError, match="prompt_embeds and no prompt"):
            run_embedded(embedded, prompt=None, prompt_embeds=embeds)
    with diffattn.steer(embedded, capture=[1]) as handle:   # by position it works
        run_embedded(embedded, prompt=None, prompt_embeds=embeds)
        assert handle.maps[1].shape == (2, 4, 4)


def test_sub_word_pieces_are_all_steered():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[UNK]", "a", "red", "circ", "##le", "moves", "right"])}
    backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    assert resolve_tokens(tokenizer, "a red circle moves right", "circle") == [2, 3]
    assert resolve_tokens(tokenizer, "a red circle moves right", "red circle") == [1, 2, 3]
    assert resolve_tokens(tokenizer, "a red circle moves right", 4) == [4]
    with pytest.raises(UserError, match="'circ' is not in the prompt"):  # whole words only
        resolve_tokens(tokenizer, "a red circle moves right", "circ")


# -- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize("arguments, message", [
    (dict(regions={"red": torch.ones(2, 3, 4, 5)}), r"regions\['red'\] must have shape \[H, W\] or \[F, H, W\]"),
    (dict(regions={"red": np.full((8, 8), 2.0)}), r"values must lie in \[0, 1\]"),
    (dict(exclude={"red": (0.0, 0.0, 1.5, 1.0)}), r"exclude\['red'\] must satisfy 0 <= x0 < x1 <= 1"),
    (dict(regions={"red": (0.5, 0.0, 0.5, 1.0)}), "must satisfy"),
    (dict(token_weights={"red": -1}), r"token_weights\['red'\] must be a finite factor >= 0"),
    (dict(capture=["red"], steps=(0.5, 0.2)), "steps must be"),
    (dict(capture=["red"], strength=0), "strength must be a positive number"),
    (dict(capture=[""]), "keys must be words"),
    (dict(capture=["red"], layers=[99]), r"layers \[99\] do not exist"),
    (dict(), "at least one of"),
])
def test_bad_arguments_are_user_errors(embedded, arguments, message):
    with pytest.raises(UserError, match=message):
        diffattn.steer(embedded, **arguments)
    assert type(embedded).__name__ == "EmbeddedVideoPipeline" and type(embedded).__mro__[1].__name__ != type(
        embedded).__name__  # nothing installed


def test_a_mask_of_another_aspect_than_the_output_is_a_user_error(embedded):
    with diffattn.steer(embedded, regions={"red": torch.ones(32, 64)}):
        with pytest.raises(UserError, match=r"regions\['red'\] has shape \(1, 32, 64\).*4x4 tokens"):
            run_embedded(embedded)


def test_cli_steering_flags(tmp_path, capsys):
    from diffattn.cli import main

    out = tmp_path / "v.gif"
    base = ["generate", "--num-frames", "2", "--height", "32", "--width", "32", "--steps", "1",
            "--prompt", "a red circle moves right", "--output", str(out)]
    assert main(base + ["--region", "red circle=0,0,0.5,1", "--weight", "circle=1.5", "--capture", "red"]) == 0
    assert "wrote attention maps" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.gif", "v.red.gif", "v.red.png"]
    for bad, message in ((["--region", "red=0,0,1.2,1"], "--region 'red=0,0,1.2,1': the box must satisfy"),
                         (["--exclude", "red 0,0,1,1"], "--exclude must be PHRASE=x0,y0,x1,y1"),
                         (["--weight", "red=lots"], "FACTOR must be a number")):
        assert main(base + bad) == 2
        assert message in capsys.readouterr().err


def test_pixel_masks_become_token_fractions_per_latent_frame():
    from diffattn.steering import _grid_mask

    mask = torch.zeros(4, 16, 32)
    mask[:2, :, :16] = 1          # the first two pixel frames: the left half
    tokens = _grid_mask(mask, 2, 2, 4, "regions['x']").reshape(2, 2, 4)
    torch.testing.assert_close(tokens[0], torch.tensor([[1.0, 1, 0, 0], [1, 1, 0, 0]]))
    torch.testing.assert_close(tokens[1], torch.zeros(2, 4))
    boxed = _grid_mask((0.0, 0.0, 0.25, 1.0), 1, 2, 4, "box").reshape(2, 4)
    torch.testing.assert_close(boxed, torch.tensor([[1.0, 0, 0, 0], [1, 0, 0, 0]]))
