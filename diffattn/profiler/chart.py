"""The profile report's PNG bar chart, drawn with PIL (matplotlib is not a dependency).

Two groups of bars on one seconds axis: the whole run (dense vs preset) and its attention (dense
vs preset). A dashed line over the preset's whole-run bar marks the Amdahl bound: the run time if
the sparse calls' attention ran at its ideal ``1 / density``.
"""

from __future__ import annotations

import io
import math
from typing import TYPE_CHECKING

from PIL import Image, ImageDraw, ImageFont

if TYPE_CHECKING:
    from .report import ProfileReport

WIDTH, HEIGHT = 760, 460
DENSE_COLOUR, SPARSE_COLOUR, BOUND_COLOUR = (150, 150, 150), (52, 110, 190), (200, 60, 40)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one fixed-size bitmap font
        return ImageFont.load_default()


def chart_png(report: "ProfileReport") -> bytes:
    """The chart as PNG bytes.

    Example:
        >>> import diffattn
        >>> from diffattn.pipelines.embedded import load_embedded_pipeline
        >>> report = diffattn.profile(load_embedded_pipeline(), "radial", warmup=0, prompt="a red circle moves left",
        ...                           num_frames=3, height=32, width=32, num_inference_steps=2)
        >>> chart_png(report)[1:4]   # a PNG file's signature
        b'PNG'
    """
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    title, small = _font(18), _font(13)
    draw.text((20, 12), f"diffattn profile: {report.title()}", fill="black", font=title)
    draw.text((20, 40), f"end-to-end {report.e2e_speedup:.2f}x   attention {report.attention_speedup:.2f}x   "
                        f"Amdahl bound {report.amdahl_bound:.2f}x   density {report.density:.3f}   "
                        f"attention share {100 * report.attention_share:.1f} %", fill="black", font=small)

    left, right, top, bottom = 80, WIDTH - 30, 80, HEIGHT - 60
    values = [report.dense_seconds, report.sparse_seconds, report.dense_attention_seconds,
              report.sparse_attention_seconds]
    finite = [v for v in values if math.isfinite(v)]
    top_value = max(finite + [1e-9]) * 1.1

    def y_of(seconds: float) -> float:
        return bottom - (bottom - top) * min(max(seconds, 0.0), top_value) / top_value

    # Axis with a few ticks in seconds.
    draw.line([(left, top), (left, bottom), (right, bottom)], fill="black")
    for tick in range(5):
        seconds = top_value * tick / 4
        y = y_of(seconds)
        draw.line([(left - 4, y), (left, y)], fill="black")
        draw.text((8, y - 7), f"{seconds:.3g} s", fill="black", font=small)

    groups = [("whole run", report.dense_seconds, report.sparse_seconds),
              ("attention", report.dense_attention_seconds, report.sparse_attention_seconds)]
    group_width = (right - left) / len(groups)
    bar = group_width / 4
    sparse_whole_bar = None
    for index, (label, dense, sparse) in enumerate(groups):
        x0 = left + index * group_width + bar * 0.75
        bars = ((0, dense, DENSE_COLOUR, "dense"), (1.25, sparse, SPARSE_COLOUR, report.preset))
        for offset, seconds, colour, name in bars:
            bx = x0 + offset * bar
            if math.isfinite(seconds):
                draw.rectangle([bx, y_of(seconds), bx + bar, bottom], fill=colour)
                draw.text((bx, y_of(seconds) - 16), f"{seconds:.3g} s", fill="black", font=small)
            draw.text((bx, bottom + 6), name, fill="black", font=small)
            if index == 0 and offset:
                sparse_whole_bar = bx
        draw.text((x0 + bar * 0.6, bottom + 26), label, fill="black", font=small)

    if sparse_whole_bar is not None and math.isfinite(report.amdahl_bound) and report.amdahl_bound > 0:
        y = y_of(report.dense_seconds / report.amdahl_bound)
        x = sparse_whole_bar - bar * 0.3
        while x < sparse_whole_bar + bar * 1.3:  # dashed
            draw.line([(x, y), (min(x + 8, sparse_whole_bar + bar * 1.3), y)], fill=BOUND_COLOUR, width=2)
            x += 14
        draw.text((sparse_whole_bar + bar * 1.35, y - 8), f"Amdahl bound {report.amdahl_bound:.2f}x",
                  fill=BOUND_COLOUR, font=small)

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
