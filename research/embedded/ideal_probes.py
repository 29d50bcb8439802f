"""What a perfect model's caption sensitivity would be: the reference of the ``ideal_*`` probe.

At sigma 1 (pure noise) the best possible (least-squares) clean-clip estimate for a caption is the
mean of the training clips with that caption. :func:`ideal_caption_sensitivity` runs
:func:`diffattn.pipelines.eval_embedded.caption_sensitivity`'s word swaps on that estimate, so the
shipped model's sensitivity can be read against it: the finding (README.md here) is that the
shipped model reads the colour word as much as the ideal estimate does and the direction word
2-6 % as much.

    PYTHONPATH=. python -c "from research.embedded.ideal_probes import ideal_caption_sensitivity as f; print(f())"
"""

from __future__ import annotations

import numpy as np

from diffattn.patterns._checks import check_choice, check_given_positive_ints
from diffattn.pipelines.shapes import (
    COLOURS,
    DIRECTIONS,
    SHAPES,
    ClipSpec,
    render_clip,
    sample_background,
    sample_shape,
)


def ideal_pure_noise_estimate(colour: str, shape: str, direction: str, num_clips: int = 600, num_frames: int = 17,
                              size: int = 64, seed: int = 0) -> np.ndarray:
    """``float [num_frames, size, size, 3]`` in [-1, 1]: the best possible (least-squares) clean
    estimate at sigma 1 for the one-shape caption "a {colour} {shape} moves {direction}", i.e. the
    mean of the training distribution's clips with that caption, by Monte Carlo over
    ``num_clips`` of them (shapes drawn as :func:`~diffattn.pipelines.shapes.sample_clip` draws
    them, kept when kind and direction match). The reference scale for :func:`caption_sensitivity`:
    what a model that has learned everything a caption says about layout would predict from
    pure noise.

    Example:
        >>> left = ideal_pure_noise_estimate("red", "circle", "left", num_clips=50, num_frames=3)
        >>> right = ideal_pure_noise_estimate("red", "circle", "right", num_clips=50, num_frames=3)
        >>> float(np.abs(left - right).mean()) > 0.005       # what reading the direction word is worth
        True
    """
    check_choice("colour", colour, tuple(COLOURS))
    check_choice("shape", shape, SHAPES)
    check_choice("direction", direction, tuple(DIRECTIONS))
    check_given_positive_ints({"num_clips": num_clips, "num_frames": num_frames})
    rng = np.random.default_rng(seed)
    total = np.zeros((num_frames, size, size, 3))
    kept = 0
    while kept < num_clips:
        drawn = sample_shape(rng, colour)
        if drawn.shape != shape or drawn.direction != direction:
            continue
        total += render_clip(ClipSpec((drawn,), sample_background(rng)), num_frames, size)
        kept += 1
    return total / num_clips / 127.5 - 1.0


def ideal_caption_sensitivity(num_clips: int = 600, num_frames: int = 17, size: int = 64, seed: int = 0
                              ) -> dict[str, float]:
    """:func:`caption_sensitivity`'s ``mean_abs_change`` at sigma 1 for the least-squares
    estimate (:func:`ideal_pure_noise_estimate`), on "a red circle moves left" with the colour
    swapped to green or the direction to right (one-shape captions: the probe's swaps, without the
    other shapes), and ``mse_gain``: how much lower the sigma-1 x0 loss is for knowing the word --
    the variance of the four directions' estimates around their mean (red circle), or of red's and
    green's (circle, left).

    Example:
        >>> ideal = ideal_caption_sensitivity(num_clips=20, num_frames=3)
        >>> sorted(ideal["mean_abs_change"])
        ['colour', 'direction']
    """
    estimate = {(c, d): ideal_pure_noise_estimate(c, "circle", d, num_clips, num_frames, size, seed + index)
                for index, (c, d) in enumerate([("red", d) for d in DIRECTIONS] + [("green", "left")])}
    base = estimate["red", "left"]
    by_direction = np.stack([estimate["red", d] for d in DIRECTIONS])
    by_colour = np.stack([base, estimate["green", "left"]])
    return {
        "mean_abs_change": {"colour": float(np.abs(estimate["green", "left"] - base).mean()),
                            "direction": float(np.abs(estimate["red", "right"] - base).mean())},
        "mse_gain": {"colour": float(((by_colour - by_colour.mean(0)) ** 2).mean()),
                     "direction": float(((by_direction - by_direction.mean(0)) ** 2).mean())},
        "num_clips": num_clips,
    }
