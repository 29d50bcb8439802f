"""A detector for the synthetic shape videos: colour masks -> tracked shapes -> caption checks.

It works because the data is synthetic: every shape has one of a few saturated palette colours
(:data:`~diffattn.pipelines.shapes.COLOURS`) on a grey background, so a colour mask per palette
entry finds each shape; its fill ratio (area / bounding box) tells circle (pi/4), square (1)
and triangle (1/2) apart; its centroid track, fitted with constant velocity and bounces off the
borders, gives the motion direction and the deviation from physically consistent motion.

Example:
    >>> from diffattn.pipelines.shapes import render_clip, sample_clip
    >>> spec = sample_clip(np.random.default_rng(0))
    >>> score = score_video(render_clip(spec, 17), spec)
    >>> score.adherence, score.motion_deviation_px < 0.5               # the true clip passes every check
    (1.0, True)
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from ..errors import UserError
from .shapes import BASE_SIZE, COLOURS, DIRECTIONS, ClipSpec, reflect

#: A pixel belongs to a palette colour when it is this close (RGB Euclidean) to it.
MAX_COLOUR_DISTANCE = 80.0
#: Components smaller than this (pixels at BASE_SIZE) are noise, not shapes.
MIN_AREA = 12
#: A frame counts for shape and track when the shape shows at least this share of its full area
#: (frames where it is occluded by another shape are left out).
WHOLE_SHARE = 0.8
#: Fill-ratio thresholds: square ~1.0, circle ~0.785, triangle ~0.5.
SQUARE_FILL = 0.89
CIRCLE_FILL = 0.64
#: Slower than this (pixels per frame at BASE_SIZE) is "not moving".
MIN_SPEED = 0.3


@dataclass
class Track:
    """One palette colour followed through a video.

    Attributes:
        colour: palette name.
        centroids: ``[F, 2]`` (x, y) of the largest component per frame; NaN where absent.
        areas: ``[F]`` pixels of that component (0 where absent).
        boxes: ``[F, 4]`` x0, y0, x1, y1 (inclusive pixel bounds); NaN where absent.
        whole: ``[F]`` frames where the shape is seen whole (not occluded).
        shape: "circle", "square" or "triangle" (from the median fill ratio of whole frames).
        fill: that median fill ratio.
    """

    colour: str
    centroids: np.ndarray
    areas: np.ndarray
    boxes: np.ndarray
    whole: np.ndarray
    shape: str
    fill: float

    @property
    def present(self) -> bool:
        return bool(self.whole.sum() >= max(2, self.whole.size // 2))


@dataclass
class MotionFit:
    """Constant velocity with bounces, per axis: ``reflect(start + velocity * t, lo, hi)``."""

    start: np.ndarray      # [2]
    velocity: np.ndarray   # [2] pixels per frame
    lo: np.ndarray         # [2]
    hi: np.ndarray         # [2]
    deviation_px: float    # mean Euclidean distance of the used centroids from the fit

    def positions(self, num_frames: int) -> np.ndarray:
        t = np.arange(num_frames, dtype=np.float64)
        return np.stack([reflect(self.start[a] + self.velocity[a] * t, self.lo[a], self.hi[a]) for a in range(2)], 1)

    def direction(self, size: int = BASE_SIZE) -> str:
        """The captioned direction the fit starts with ("still" when slower than MIN_SPEED)."""
        step = self.positions(3)
        delta = (step[2] - step[0]) / 2.0
        axis = int(np.argmax(np.abs(delta)))
        if abs(delta[axis]) < MIN_SPEED * size / BASE_SIZE:
            return "still"
        unit = [0, 0]
        unit[axis] = int(np.sign(delta[axis]))
        return {v: k for k, v in DIRECTIONS.items()}[tuple(unit)]


def colour_labels(video: np.ndarray) -> np.ndarray:
    """``int8 [F, H, W]``: index into COLOURS of the nearest palette colour, -1 for background."""
    palette = np.asarray(list(COLOURS.values()), dtype=np.float32)
    pixels = video.astype(np.float32)
    distance = np.linalg.norm(pixels[..., None, :] - palette, axis=-1)  # [F, H, W, C]
    nearest = distance.argmin(-1)
    close = np.take_along_axis(distance, nearest[..., None], -1)[..., 0] <= MAX_COLOUR_DISTANCE
    return np.where(close, nearest, -1).astype(np.int8)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean ``[H, W]`` mask (breadth-first search)."""
    seen = np.zeros_like(mask, dtype=bool)
    best: list[tuple[int, int]] = []
    height, width = mask.shape
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        component = []
        queue = deque([(y, x)])
        seen[y, x] = True
        while queue:
            cy, cx = queue.popleft()
            component.append((cy, cx))
            for ny, nx in ((cy - 1, cx), (cy + 1, cx), (cy, cx - 1), (cy, cx + 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        if len(component) > len(best):
            best = component
    out = np.zeros_like(mask, dtype=bool)
    if best:
        ys, xs = zip(*best)
        out[list(ys), list(xs)] = True
    return out


def classify_fill(fill: float) -> str:
    if fill >= SQUARE_FILL:
        return "square"
    return "circle" if fill >= CIRCLE_FILL else "triangle"


def track_colours(video: np.ndarray) -> dict[str, Track]:
    """Follow every palette colour that appears in ``uint8 [F, H, W, 3]`` ``video``."""
    if video.ndim != 4 or video.shape[-1] != 3:
        raise UserError(f"video must be uint8 [frames, height, width, 3]; got shape {video.shape}")
    frames, height, width, _ = video.shape
    labels = colour_labels(video)
    min_area = MIN_AREA * (height * width) / BASE_SIZE**2
    tracks = {}
    for index, colour in enumerate(COLOURS):
        present = labels == index
        if present.sum() < min_area:
            continue
        centroids = np.full((frames, 2), np.nan)
        boxes = np.full((frames, 4), np.nan)
        areas = np.zeros(frames)
        for f in range(frames):
            if present[f].sum() < min_area:
                continue
            component = largest_component(present[f])
            ys, xs = np.nonzero(component)
            if ys.size < min_area:
                continue
            areas[f] = ys.size
            centroids[f] = (xs.mean() + 0.5, ys.mean() + 0.5)
            boxes[f] = (xs.min(), ys.min(), xs.max(), ys.max())
        if not areas.any():
            continue
        full_area = np.percentile(areas[areas > 0], 90)
        whole = areas >= WHOLE_SHARE * full_area
        box_area = (boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1)
        fill = float(np.median(areas[whole] / box_area[whole]))
        tracks[colour] = Track(colour, centroids, areas, boxes, whole, classify_fill(fill), fill)
    return tracks


def fit_motion(track: Track, size: int) -> MotionFit:
    """Least-squares fit (coarse grid, then a finer one) of constant velocity with bounces to the
    track's whole frames. The walls are where the shape's bounding box touches the border, moved
    by the measured centroid-to-box-centre offset (a triangle's centroid sits low in its box)."""
    used = np.nonzero(track.whole)[0]
    t = used.astype(np.float64)
    boxes = track.boxes[used]
    half = np.median(np.stack([boxes[:, 2] - boxes[:, 0] + 1, boxes[:, 3] - boxes[:, 1] + 1], 1), 0) / 2.0
    box_centre = np.stack([(boxes[:, 0] + boxes[:, 2] + 1) / 2.0, (boxes[:, 1] + boxes[:, 3] + 1) / 2.0], 1)
    observed = track.centroids[used]
    offset = np.median(observed - box_centre, 0)
    lo, hi = half + offset, size - half + offset
    max_speed = 0.1 * size  # far above any training speed (2.5 px/frame at 64)
    start, velocity = np.zeros(2), np.zeros(2)
    for axis in range(2):
        target = observed[:, axis]
        a_grid = np.linspace(lo[axis], hi[axis], max(2, int((hi[axis] - lo[axis]) / 0.25) + 1))
        b_grid = np.linspace(-max_speed, max_speed, int(2 * max_speed / 0.05) + 1)
        for refine in range(2):
            positions = reflect(a_grid[:, None, None] + b_grid[None, :, None] * t, lo[axis], hi[axis])
            error = np.square(positions - target).sum(-1)
            ia, ib = np.unravel_index(error.argmin(), error.shape)
            start[axis], velocity[axis] = a_grid[ia], b_grid[ib]
            if refine == 0:  # a 10x finer grid around the coarse optimum
                da, db = a_grid[1] - a_grid[0], b_grid[1] - b_grid[0]
                a_grid = np.linspace(start[axis] - da, start[axis] + da, 21)
                b_grid = np.linspace(velocity[axis] - db, velocity[axis] + db, 21)
    fit = MotionFit(start, velocity, lo, hi, 0.0)
    fitted = fit.positions(track.centroids.shape[0])[used]
    fit.deviation_px = float(np.linalg.norm(fitted - observed, axis=1).mean())
    return fit


@dataclass
class VideoScore:
    """Caption checks for one video.

    ``checks`` maps ``"<colour> present" / "<colour> shape" / "<colour> direction"`` to pass/fail;
    ``adherence`` is the share passed. ``motion_deviation_px`` is the mean, over the captioned
    shapes that were found, of the fit deviation (NaN if none was found). ``spurious`` lists
    palette colours seen although the caption does not name them.
    """

    checks: dict[str, bool] = field(default_factory=dict)
    deviations: dict[str, float] = field(default_factory=dict)
    detected: dict[str, dict] = field(default_factory=dict)
    spurious: list[str] = field(default_factory=list)

    @property
    def adherence(self) -> float:
        return float(np.mean(list(self.checks.values()))) if self.checks else 0.0

    @property
    def motion_deviation_px(self) -> float:
        return float(np.mean(list(self.deviations.values()))) if self.deviations else float("nan")


def score_video(video: np.ndarray, spec: ClipSpec) -> VideoScore:
    """Check ``uint8 [F, H, W, 3]`` ``video`` against the caption of ``spec`` (colours, shapes,
    directions) and measure how far each shape's motion is from constant velocity with bounces."""
    size = video.shape[1]
    tracks = track_colours(video)
    score = VideoScore()
    for shape in spec.shapes:
        track = tracks.get(shape.colour)
        found = track is not None and track.present
        score.checks[f"{shape.colour} present"] = found
        score.checks[f"{shape.colour} shape"] = found and track.shape == shape.shape
        if not found:
            score.checks[f"{shape.colour} direction"] = False
            continue
        fit = fit_motion(track, size)
        direction = fit.direction(size)
        score.checks[f"{shape.colour} direction"] = direction == shape.direction
        score.deviations[shape.colour] = fit.deviation_px
        score.detected[shape.colour] = {"shape": track.shape, "fill": round(track.fill, 3), "direction": direction,
                                        "velocity_px": [round(float(v), 3) for v in fit.velocity],
                                        "deviation_px": round(fit.deviation_px, 3)}
    named = {shape.colour for shape in spec.shapes}
    score.spurious = sorted(c for c, track in tracks.items() if c not in named and track.present)
    return score
