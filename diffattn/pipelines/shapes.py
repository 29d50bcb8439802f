"""Procedural training data for the embedded model: shapes that move and bounce, with captions.

A clip shows 1 to 3 simple shapes (circle, square, triangle) in distinct colours on a plain or
gradient grey background. Each shape moves with constant velocity along its captioned direction
and bounces off the borders (its bounding box stays inside the frame). The caption comes from a
small grammar::

    a red circle moves left and a blue square moves down

A :class:`ClipSpec` is the whole truth about a clip: it renders any number of frames at any size
(:func:`render_clip`), so the same generator serves the base length and longer clips, and it gives
the ground-truth trajectories (:func:`true_centroids`) that the detector is tested against.
Everything is a pure function of a ``numpy`` generator: same seed, same clips.

Example:
    >>> rng = np.random.default_rng(0)
    >>> spec = sample_clip(rng)
    >>> render_clip(spec, num_frames=17).shape
    (17, 64, 64, 3)
    >>> caption(spec)
    'a purple circle moves left and a green triangle moves left and a blue circle moves up'
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import UserError

#: Shape colours (name -> RGB). Saturated and far apart, so colour masks separate them; the
#: backgrounds are low-saturation greys, far from all of them.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 50, 50),
    "green": (50, 190, 70),
    "blue": (60, 90, 230),
    "yellow": (235, 215, 50),
    "purple": (160, 70, 210),
    "cyan": (50, 210, 220),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
#: Direction name -> unit velocity (x to the right, y downwards, in image coordinates).
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
#: Every word the caption grammar can produce (the embedded model's tokenizer vocabulary).
VOCABULARY: tuple[str, ...] = ("a", "and", "moves", *COLOURS, *SHAPES, *DIRECTIONS)

#: The size everything below is specified at; other sizes scale radii and speeds.
BASE_SIZE = 64
RADIUS_RANGE = (6.0, 9.0)
SPEED_RANGE = (1.0, 2.5)
#: A shape travels at least this many frames before its first bounce, so its captioned
#: direction is visible at the start of every clip.
FRAMES_BEFORE_BOUNCE = 5
#: Shapes keep their bounding boxes this many pixels apart during the first BASE_FRAMES frames,
#: so that no shape hides another at the base length (the detector needs to see them whole).
BASE_FRAMES = 17
SEPARATION = 2.0
PLACEMENT_TRIES = 100


@dataclass(frozen=True)
class ShapeSpec:
    """One moving shape, in pixels at ``BASE_SIZE`` (frame 0 position, velocity per frame).

    ``x``/``y`` is the centre of the shape's bounding box (half-size ``radius``); the box stays
    inside the frame, reflecting the velocity at the borders.
    """

    shape: str
    colour: str
    direction: str
    x: float
    y: float
    radius: float
    speed: float

    def phrase(self) -> str:
        return f"a {self.colour} {self.shape} moves {self.direction}"


@dataclass(frozen=True)
class Background:
    """A linear gradient from ``start`` to ``end`` (RGB) along ``angle`` radians; plain when equal."""

    start: tuple[int, int, int]
    end: tuple[int, int, int]
    angle: float


@dataclass(frozen=True)
class ClipSpec:
    shapes: tuple[ShapeSpec, ...]
    background: Background


def caption(spec: ClipSpec) -> str:
    """The clip's caption: one phrase per shape, joined by "and" (drawing order)."""
    return " and ".join(shape.phrase() for shape in spec.shapes)


def sample_clip(rng: np.random.Generator, max_shapes: int = 3) -> ClipSpec:
    """A random clip: 1..``max_shapes`` shapes of distinct colours, on a plain or gradient background.

    Every shape travels :data:`FRAMES_BEFORE_BOUNCE` frames before its first bounce: it starts in
    the part of the frame it moves away from.

    Example:
        >>> spec = sample_clip(np.random.default_rng(0), max_shapes=1)
        >>> len(spec.shapes)
        1
    """
    if not 1 <= max_shapes <= len(COLOURS):
        raise UserError(f"max_shapes must be in 1..{len(COLOURS)}; got {max_shapes}")
    count = int(rng.integers(1, max_shapes + 1))
    colours = rng.choice(list(COLOURS), size=count, replace=False)
    shapes: list[ShapeSpec] = []
    tracks: list[np.ndarray] = []
    for colour in colours:
        # Rejection sampling; a shape that finds no free path is left out (the clip has fewer).
        for _ in range(PLACEMENT_TRIES):
            candidate = sample_shape(rng, str(colour))
            track = box_centres(candidate, BASE_FRAMES)
            if all(_apart(candidate, track, other, other_track) for other, other_track in zip(shapes, tracks)):
                shapes.append(candidate)
                tracks.append(track)
                break
    return ClipSpec(tuple(shapes), sample_background(rng))


def sample_shape(rng: np.random.Generator, colour: str) -> ShapeSpec:
    """One random shape of ``colour`` as :func:`sample_clip` draws it (kind, direction, radius,
    speed, then a start with :data:`FRAMES_BEFORE_BOUNCE` frames of free travel).

    Example:
        >>> sample_shape(np.random.default_rng(0), "red").colour
        'red'
    """
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    direction = list(DIRECTIONS)[int(rng.integers(len(DIRECTIONS)))]
    radius = float(rng.uniform(*RADIUS_RANGE))
    speed = float(rng.uniform(*SPEED_RANGE))
    dx, dy = DIRECTIONS[direction]
    lo, hi = radius, BASE_SIZE - radius
    run_up = FRAMES_BEFORE_BOUNCE * speed  # free travel needed before the first wall
    x = float(rng.uniform(lo + (run_up if dx < 0 else 0), hi - (run_up if dx > 0 else 0)))
    y = float(rng.uniform(lo + (run_up if dy < 0 else 0), hi - (run_up if dy > 0 else 0)))
    return ShapeSpec(shape, colour, direction, x, y, radius, speed)


def _apart(a: ShapeSpec, a_track: np.ndarray, b: ShapeSpec, b_track: np.ndarray) -> bool:
    """Whether two shapes' bounding boxes stay SEPARATION apart (on some axis) in every frame."""
    gap = np.abs(a_track - b_track) - (a.radius + b.radius + SEPARATION)
    return bool((gap.max(axis=1) > 0).all())


def sample_background(rng: np.random.Generator) -> Background:
    """A random background as :func:`sample_clip` draws it: plain or gradient, low-saturation grey."""
    def grey() -> tuple[int, int, int]:
        level = rng.uniform(30, 120)
        tint = rng.uniform(-8, 8, size=3)
        return tuple(int(round(level + t)) for t in tint)

    start = grey()
    end = start if rng.random() < 0.5 else grey()
    return Background(start, end, float(rng.uniform(0, 2 * np.pi)))


def reflect(position: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Fold unbounded positions into ``[lo, hi]`` as a ball bouncing between two walls would be.

    Example:
        >>> reflect(np.array([0.0, 5.0, 12.0, 25.0]), 0.0, 10.0)
        array([0., 5., 8., 5.])
    """
    span = hi - lo
    if span <= 0:
        return np.full_like(position, lo)
    phase = np.mod(position - lo, 2 * span)
    return lo + np.where(phase <= span, phase, 2 * span - phase)


def box_centres(shape: ShapeSpec, num_frames: int, size: int = BASE_SIZE) -> np.ndarray:
    """``[num_frames, 2]`` bounding-box centres (x, y) in pixels of a ``size`` x ``size`` frame.

    Example:
        >>> box_centres(ShapeSpec("circle", "red", "right", 10.0, 20.0, 6.0, 2.0), 3)
        array([[10., 20.],
               [12., 20.],
               [14., 20.]])
    """
    scale = size / BASE_SIZE
    t = np.arange(num_frames, dtype=np.float64)
    dx, dy = DIRECTIONS[shape.direction]
    r = shape.radius * scale
    xs = reflect(shape.x * scale + dx * shape.speed * scale * t, r, size - r)
    ys = reflect(shape.y * scale + dy * shape.speed * scale * t, r, size - r)
    return np.stack([xs, ys], axis=1)


def centroid_offset(shape: str, radius: float) -> tuple[float, float]:
    """Area centroid minus bounding-box centre: a triangle's centroid is a third down from the middle."""
    return (0.0, radius / 3.0) if shape == "triangle" else (0.0, 0.0)


def true_centroids(spec: ClipSpec, num_frames: int, size: int = BASE_SIZE) -> np.ndarray:
    """``[shapes, num_frames, 2]`` ideal area centroids (x, y) of every shape (ignoring occlusion).

    Example:
        >>> up = ShapeSpec("triangle", "red", "up", 32.0, 32.0, 6.0, 2.0)
        >>> true_centroids(ClipSpec((up,), Background((50, 50, 50), (50, 50, 50), 0.0)), 2)
        array([[[32., 34.],
                [32., 32.]]])
    """
    scale = size / BASE_SIZE
    out = []
    for shape in spec.shapes:
        ox, oy = centroid_offset(shape.shape, shape.radius * scale)
        out.append(box_centres(shape, num_frames, size) + np.array([ox, oy]))
    return np.stack(out)


def shape_mask(shape: str, cx: float, cy: float, radius: float, size: int) -> np.ndarray:
    """Boolean ``[size, size]`` mask of pixels whose centres lie inside the shape.

    Example:
        >>> int(shape_mask("square", 4.0, 4.0, 1.0, 8).sum())     # pixel centres 3.5 and 4.5 on each axis
        4
    """
    coords = np.arange(size, dtype=np.float64) + 0.5
    x = coords[None, :] - cx
    y = coords[:, None] - cy
    if shape == "circle":
        return x * x + y * y <= radius * radius
    if shape == "square":
        return (np.abs(x) <= radius) & (np.abs(y) <= radius)
    if shape == "triangle":  # apex up, base at the bottom of the box, as wide as the box
        return (y <= radius) & (np.abs(x) <= (y + radius) / 2.0)
    raise UserError(f"shape must be one of {', '.join(SHAPES)}; got {shape!r}")


def render_background(background: Background, size: int) -> np.ndarray:
    coords = (np.arange(size, dtype=np.float64) + 0.5) / size - 0.5
    along = np.cos(background.angle) * coords[None, :] + np.sin(background.angle) * coords[:, None]
    weight = np.clip(along / np.sqrt(0.5) * 0.5 + 0.5, 0.0, 1.0)[..., None]
    start = np.asarray(background.start, dtype=np.float64)
    end = np.asarray(background.end, dtype=np.float64)
    return start * (1 - weight) + end * weight


def render_clip(spec: ClipSpec, num_frames: int, size: int = BASE_SIZE) -> np.ndarray:
    """``uint8 [num_frames, size, size, 3]`` frames; later shapes are drawn over earlier ones."""
    if num_frames < 1:
        raise UserError(f"num_frames must be >= 1; got {num_frames}")
    if size < 16:
        raise UserError(f"size must be >= 16 pixels; got {size}")
    base = render_background(spec.background, size)
    video = np.empty((num_frames, size, size, 3), dtype=np.uint8)
    centres = [box_centres(shape, num_frames, size) for shape in spec.shapes]
    scale = size / BASE_SIZE
    for f in range(num_frames):
        frame = base.copy()
        for shape, track in zip(spec.shapes, centres):
            mask = shape_mask(shape.shape, track[f, 0], track[f, 1], shape.radius * scale, size)
            frame[mask] = COLOURS[shape.colour]
        video[f] = np.clip(np.round(frame), 0, 255).astype(np.uint8)
    return video


def sample_batch(rng: np.random.Generator, batch: int, num_frames: int, size: int = BASE_SIZE,
                 max_shapes: int = 3) -> tuple[np.ndarray, list[str], list[ClipSpec]]:
    """``(videos uint8 [B, F, S, S, 3], captions, specs)`` for training and evaluation.

    Example:
        >>> videos, captions, specs = sample_batch(np.random.default_rng(0), 2, num_frames=3, size=32)
        >>> videos.shape, len(captions)
        ((2, 3, 32, 32, 3), 2)
    """
    specs = [sample_clip(rng, max_shapes) for _ in range(batch)]
    videos = np.stack([render_clip(spec, num_frames, size) for spec in specs])
    return videos, [caption(spec) for spec in specs], specs
