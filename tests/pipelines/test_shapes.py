"""The procedural data: determinism, captions that describe the pixels, bounces, any length."""

import numpy as np
import pytest

from diffattn.pipelines.shapes import (
    BASE_FRAMES,
    BASE_SIZE,
    COLOURS,
    DIRECTIONS,
    FRAMES_BEFORE_BOUNCE,
    SHAPES,
    VOCABULARY,
    box_centres,
    caption,
    render_clip,
    sample_batch,
    sample_clip,
    true_centroids,
)


def specs(count: int, seed: int = 0):
    return [sample_clip(np.random.default_rng([seed, i])) for i in range(count)]


def test_same_seed_same_clips_and_other_seed_other_clips():
    a = sample_batch(np.random.default_rng(7), 4, 9)
    b = sample_batch(np.random.default_rng(7), 4, 9)
    c = sample_batch(np.random.default_rng(8), 4, 9)
    assert np.array_equal(a[0], b[0]) and a[1] == b[1]
    assert not np.array_equal(a[0], c[0])


@pytest.mark.parametrize("spec", specs(40), ids=lambda s: caption(s).replace(" ", "_")[:40])
def test_caption_names_what_is_drawn(spec):
    words = caption(spec).split(" and ")
    assert 1 <= len(words) <= 3 and set(" ".join(words).split()) <= set(VOCABULARY)
    assert len({shape.colour for shape in spec.shapes}) == len(spec.shapes)  # distinct colours
    video = render_clip(spec, BASE_FRAMES)
    for phrase, shape in zip(words, spec.shapes):
        article, colour, kind, verb, direction = phrase.split()
        assert (article, verb) == ("a", "moves")
        assert (colour, kind, direction) == (shape.colour, shape.shape, shape.direction)
        # The shape's colour is drawn where its true centroid is (the centroid is inside every shape).
        x, y = true_centroids(type(spec)((shape,), spec.background), 1)[0, 0]
        assert tuple(video[0, int(y), int(x)]) == COLOURS[colour]
        # Colour area matches the shape: fill of its bounding box ~ 1, pi/4 or 1/2.
        mask = np.all(video[0] == COLOURS[colour], axis=-1)
        ys, xs = np.nonzero(mask)
        fill = mask.sum() / ((np.ptp(xs) + 1) * (np.ptp(ys) + 1))
        expected = {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5}[kind]
        assert abs(fill - expected) < 0.12


@pytest.mark.parametrize("spec", specs(30, seed=1), ids=str)
def test_motion_starts_in_the_captioned_direction_and_shapes_never_overlap(spec):
    tracks = [box_centres(shape, BASE_FRAMES) for shape in spec.shapes]
    for shape, track in zip(spec.shapes, tracks):
        step = np.diff(track[: FRAMES_BEFORE_BOUNCE + 1], axis=0)
        unit = np.array(DIRECTIONS[shape.direction])
        assert np.allclose(step, unit * shape.speed)  # straight line before the first bounce
    for i in range(len(tracks)):
        for j in range(i):
            reach = spec.shapes[i].radius + spec.shapes[j].radius
            assert (np.abs(tracks[i] - tracks[j]).max(axis=1) > reach).all()


def test_long_clips_bounce_and_stay_inside():
    spec = specs(1, seed=3)[0]
    frames = 200
    video = render_clip(spec, frames, size=96)
    assert video.shape == (frames, 96, 96, 3)
    for shape, track in zip(spec.shapes, true_centroids(spec, frames, 96)):
        box = box_centres(shape, frames, 96)
        r = shape.radius * 96 / 64
        assert (box >= r - 1e-9).all() and (box <= 96 - r + 1e-9).all()
        axis = 0 if DIRECTIONS[shape.direction][0] else 1
        velocity = np.diff(box[:, axis])
        speed = shape.speed * 96 / 64
        # Constant speed, except for the frame steps that contain a bounce (they fold back).
        assert (np.abs(velocity) <= speed + 1e-9).all()
        assert np.isclose(np.abs(velocity), speed).mean() > 0.7
        assert (np.sign(velocity) > 0).any() and (np.sign(velocity) < 0).any()  # it bounced


def test_every_word_is_used():
    words = {w for s in specs(200) for w in caption(s).split()}
    assert words == set(VOCABULARY)
    assert set(SHAPES) <= words and set(COLOURS) <= words


def test_shapes_travel_their_run_up_straight_and_start_upstream():
    """Every shape goes FRAMES_BEFORE_BOUNCE frames without a bounce, so it starts at least that
    far from the wall it moves towards, and upstream of the middle on average."""
    run_up = FRAMES_BEFORE_BOUNCE
    clips = [sample_clip(np.random.default_rng([5, i])) for i in range(60)]
    upstream = []
    for spec in clips:
        for shape in spec.shapes:
            unit = np.array(DIRECTIONS[shape.direction])
            track = box_centres(shape, run_up + 1)
            assert np.allclose(np.diff(track, axis=0), unit * shape.speed)
            # Position along the motion, 0 at the wall it leaves, 1 at the wall it moves towards.
            along = (track[0] - shape.radius) / (BASE_SIZE - 2 * shape.radius)
            upstream.append(float(along @ unit if unit.sum() > 0 else 1 + along @ unit))
    assert np.mean(upstream) < 0.5


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_frames"):
        render_clip(specs(1)[0], 0)
    with pytest.raises(ValueError, match="max_shapes"):
        sample_clip(np.random.default_rng(0), max_shapes=0)
