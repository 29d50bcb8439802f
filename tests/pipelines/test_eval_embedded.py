"""evaluate_embedded's bookkeeping, with stand-in pipelines instead of a trained model."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from diffattn.pipelines.eval_embedded import EVAL_SEED, TUNING_SEED, evaluate_embedded, held_out_specs
from diffattn.pipelines.shapes import caption, render_clip


class RenderingPipe:
    """Returns the true clip of each caption it is asked for (a perfect model), as floats in [0, 1]."""

    def __init__(self, specs) -> None:
        self.by_caption = {caption(spec): spec for spec in specs}
        self.prompts: list[str] = []

    def __call__(self, prompt, generator, num_frames, height, width, output_type, **_):
        self.prompts.extend(prompt)
        frames = [render_clip(self.by_caption[p], num_frames, height).astype(np.float32) / 255.0 for p in prompt]
        return SimpleNamespace(frames=frames)


@pytest.mark.parametrize("stream", [EVAL_SEED, TUNING_SEED])
def test_perfect_model_scores_like_ground_truth_on_the_chosen_stream(stream):
    specs = held_out_specs(6, stream)
    pipe = RenderingPipe(specs)
    report, videos = evaluate_embedded(pipe, num_captions=6, batch_size=4, caption_seed=stream)
    assert pipe.prompts == [caption(spec) for spec in specs]
    assert report["caption_seed"] == stream
    assert report["adherence"] == pytest.approx(report["ground_truth"]["adherence"])
    assert report["motion_deviation_px"] == pytest.approx(report["ground_truth"]["motion_deviation_px"])
    assert report["adherence"] > 0.9
    assert len(videos) == 6 and videos[0].dtype == np.uint8


def test_tuning_and_reported_streams_differ():
    assert [caption(s) for s in held_out_specs(8, EVAL_SEED)] != [caption(s) for s in held_out_specs(8, TUNING_SEED)]


def test_blank_model_fails_every_presence_check():
    def blank(prompt, num_frames, height, width, **_):
        return SimpleNamespace(frames=[np.full((num_frames, height, width, 3), 0.5, np.float32) for _ in prompt])

    report, _ = evaluate_embedded(blank, num_captions=3, batch_size=3)
    assert report["adherence_by_check"]["present"] == 0.0
    assert report["adherence"] == 0.0
    assert not report["targets_met"]
