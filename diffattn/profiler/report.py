"""``ProfileReport``: what ``diffattn.profile`` measured, as JSON, Markdown and a PNG chart."""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .._io import atomic_path


@dataclass
class ProfileReport:
    """A dense run and a preset run of the same pipeline call with the same seed, compared.

    "Attention" is always the core attention op (softmax(QK^T)V: the layout lookup plus the
    block-sparse kernel on sparse calls, ``scaled_dot_product_attention`` on stock calls) of the
    self-attention layers diffattn sparsifies; projections, norms, rotary embeddings and
    cross-attention count as "the rest". Times are medians over the timed repeats. The dense run
    applies the family's ``dense`` preset (diffattn's kernel on a dense layout); in the preset run,
    the calls the preset keeps dense (warm-up steps, dense layers) run the stock processor.

    Attributes:
        preset: the preset's name (``"custom"`` for a :class:`SparsityConfig` or pattern object).
        family: the pipeline's model family (``"wan"``, ...).
        pattern: ``repr`` of the preset's pattern.
        dense_steps, dense_last_steps, dense_layers, block_size: the preset's schedule and tiles.
        device: the device the pipeline executed on (``"cpu"``, ``"cuda:0"``).
        dtype: the transformer's dtype (``"float32"``, ...).
        num_frames, height, width: size of the produced video (frames, pixels).
        num_inference_steps, guidance_scale: of the call (None when the pipeline does not say).
        seed: the seed of the fresh ``torch.Generator`` (CPU) given to every run.
        warmup, repeats: untimed warm-up runs and timed runs, each a dense and a preset run.
        grid: the latent token grid of the self-attention calls (frames, height, width,
            text_tokens, num_tokens), or None when there were none.
        e2e_speedup: dense wall time / preset wall time.
        attention_share: share of the DENSE run's wall time spent in attention.
        attention_speedup: dense-run attention time / preset-run attention time.
        predicted_e2e: ``1 / ((1 - s) + s / attention_speedup)`` with ``s = attention_share``: the
            end-to-end speedup the measured attention speedup implies (Amdahl's law).
        amdahl_bound: ``1 / ((1 - s) + s * (f_dense + f_sparse * layout_density))``: the end-to-end
            speedup if the sparse calls ran at their ideal ``1 / density`` and the calls kept dense
            (warm-up steps, dense layers) at 1x; ``f_dense = dense_fraction``, ``f_sparse = 1 -
            f_dense``, ``layout_density`` weighted by the dense run's attention time.
        density: overall density of the preset run: mean over its attention calls, a call kept
            dense counting 1 and a sparse call its layout's density.
        density_per_layer: the same mean per transformer block index.
        layout_density: mean layout density of the sparse calls (None without sparse calls).
        tile_density: mean layout tile density (pairs in visited tiles / N^2: what a block-sparse
            kernel pays for) of the sparse calls (None without sparse calls).
        dense_fraction: share of the dense run's attention time in calls that the preset keeps
            dense (``f_dense`` above).
        attention_calls: attention calls per run (both runs make the same calls).
        sparse_calls, dense_calls: the preset run's calls that ran sparse / stayed dense.
        psnr: PSNR in dB of the preset run's frames against the dense run's (``inf`` when
            identical; written as the string ``"inf"`` in JSON, which has no Infinity).
        ssim: SSIM of the preset run's frames against the dense run's (1 when identical).
        dense_seconds, sparse_seconds: median wall time of a dense / preset run.
        dense_attention_seconds, sparse_attention_seconds: median attention time per run.
        timings: per timed repeat: ``dense_seconds``, ``sparse_seconds``,
            ``dense_attention_seconds``, ``sparse_attention_seconds`` (lists).
        layout_nbytes: bytes the distinct block layouts of the sparse calls hold (``layout.nbytes``
            summed; what the layout cache keeps for this run), None without sparse calls.
        fallbacks: the preset run's self-attention calls that could not run sparse and ran the
            stock attention instead, per reason (``SparsityState.fallbacks``; empty when none).
        untimed_calls: stock calls whose core op was not visible to the timer (a diffusers
            attention backend other than SDPA); their attention time is missing.
        notes: caveats about this measurement, one sentence each.
        level_shares: a dynamic pattern's (PSA) share of all (head, query block, key block) tiles
            at each pooling level over the sparse calls' plans (``0`` = skipped); None otherwise.
            For such calls ``layout_density`` is the effective density (a level-p tile counting
            1/p) and ``tile_density`` the visited tiles' area.
        plan_seconds: a dynamic pattern's planning time per run (median), inside the attention time.
        plan_share: ``plan_seconds`` over the sparse calls' attention time.

    Example:
        >>> import diffattn
        >>> from diffattn.pipelines.embedded import load_embedded_pipeline
        >>> pipe = load_embedded_pipeline()   # the shipped offline model; any supported pipeline works
        >>> tiny = dict(prompt="a red circle moves left", num_frames=3, height=32, width=32, num_inference_steps=2)
        >>> report = diffattn.profile(pipe, "radial", warmup=0, **tiny)
        >>> print(report.to_markdown().splitlines()[0])
        **diffattn profile: wan/radial on cpu (float32)**
        >>> report.grid, report.attention_calls > 0
        ({'frames': 3, 'height': 4, 'width': 4, 'text_tokens': 0, 'num_tokens': 48}, True)
    """

    preset: str
    family: str
    pattern: str
    dense_steps: int
    dense_last_steps: int
    dense_layers: list
    block_size: int
    device: str
    dtype: str
    num_frames: int | None
    height: int | None
    width: int | None
    num_inference_steps: int | None
    guidance_scale: float | None
    seed: int
    warmup: int
    repeats: int
    grid: dict | None
    e2e_speedup: float
    attention_share: float
    attention_speedup: float
    predicted_e2e: float
    amdahl_bound: float
    density: float
    density_per_layer: dict[int, float]
    layout_density: float | None
    tile_density: float | None
    dense_fraction: float
    attention_calls: int
    sparse_calls: int
    dense_calls: int
    psnr: float
    ssim: float
    dense_seconds: float
    sparse_seconds: float
    dense_attention_seconds: float
    sparse_attention_seconds: float
    timings: dict[str, list[float]]
    untimed_calls: int = 0
    fallbacks: dict[str, int] = field(default_factory=dict)
    layout_nbytes: int | None = None
    notes: list[str] = field(default_factory=list)
    level_shares: dict[int, float] | None = None
    plan_seconds: float | None = None
    plan_share: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """Every field as plain Python values (floats may be ``inf``/``nan``; see :meth:`to_json`)."""
        return asdict(self)

    def to_json(self) -> str:
        """Valid JSON (indented): non-finite floats become the strings ``"inf"``, ``"-inf"``,
        ``"nan"``; ``density_per_layer`` keys become strings (JSON keys always are).

        Example:
            >>> import diffattn
            >>> from diffattn.pipelines.embedded import load_embedded_pipeline
            >>> pipe = load_embedded_pipeline()
            >>> report = diffattn.profile(pipe, "dense", warmup=0, prompt="a red circle moves left",
            ...                           num_frames=3, height=32, width=32, num_inference_steps=2)
            >>> json.loads(report.to_json())["psnr"]   # the dense preset against itself: identical frames
            'inf'
        """
        return json.dumps(_finite_json(self.to_dict()), indent=2, allow_nan=False) + "\n"

    def title(self) -> str:
        return f"{self.family}/{self.preset} on {self.device} ({self.dtype})"

    def to_markdown(self) -> str:
        """A heading line, the call, and a metric | value table (what ``diffattn profile`` prints)."""
        size = f"{self.num_frames} frames {self.height}x{self.width} px" if self.num_frames else "?"
        steps = f", {self.num_inference_steps} steps" if self.num_inference_steps else ""
        guidance = f", guidance {self.guidance_scale:g}" if self.guidance_scale is not None else ""
        grid = ""
        if self.grid:
            text = f" + {self.grid['text_tokens']} text" if self.grid["text_tokens"] else ""
            grid = (f" -> {self.grid['frames']}x{self.grid['height']}x{self.grid['width']}{text} = "
                    f"{self.grid['num_tokens']} latent tokens")
        schedule = (f"{self.pattern}, dense steps {self.dense_steps}"
                    + (f" + last {self.dense_last_steps}" if self.dense_last_steps else "")
                    + f", dense layers {list(self.dense_layers) or 'none'}, block {self.block_size}")
        rows = [
            ("end-to-end speedup", f"{_x(self.e2e_speedup)} "
                                   f"({self.dense_seconds:.3f} s -> {self.sparse_seconds:.3f} s)"),
            ("attention share (dense run)", _percent(self.attention_share)),
            ("attention speedup", f"{_x(self.attention_speedup)} ({self.dense_attention_seconds:.3f} s -> "
                                  f"{self.sparse_attention_seconds:.3f} s)"),
            ("predicted end-to-end (from attention speedup)", _x(self.predicted_e2e)),
            ("Amdahl bound (sparse calls at 1/density)", _x(self.amdahl_bound)),
            ("density (overall; dense calls count 1)", _number(self.density)),
            ("layout / tile density (sparse calls)", f"{_number(self.layout_density)} / {_number(self.tile_density)}"),
            ("layout memory (sparse calls)",
             "-" if self.layout_nbytes is None else _bytes(self.layout_nbytes)),
            *([] if self.level_shares is None else [
                ("tiles per pooling level (0 = skipped)",
                 ", ".join(f"{level}: {_percent(share)}" for level, share in self.level_shares.items())),
                ("planning time per run (share of sparse attention)",
                 f"{self.plan_seconds:.3f} s ({_percent(self.plan_share)})"),
            ]),
            ("attention calls per run (sparse / kept dense)",
             f"{self.attention_calls} ({self.sparse_calls} / {self.dense_calls})"),
            ("attention time in calls kept dense", _percent(self.dense_fraction)),
            ("PSNR vs dense", "inf dB (identical frames)" if self.psnr == math.inf else f"{self.psnr:.2f} dB"),
            ("SSIM vs dense", f"{self.ssim:.4f}"),
        ]
        lines = [
            f"**diffattn profile: {self.title()}**",
            "",
            f"{size}{steps}{guidance}, seed {self.seed}{grid}; median of {self.repeats} timed run(s) "
            f"after {self.warmup} warm-up run(s) each",
            "",
            f"preset: {schedule}",
            "",
            "| metric | value |",
            "| --- | ---: |",
            *[f"| {name} | {value} |" for name, value in rows],
        ]
        if self.density_per_layer:
            per_layer = ", ".join(f"{layer}: {value:.3f}" for layer, value in sorted(self.density_per_layer.items()))
            lines += ["", f"density per layer: {per_layer}"]
        if self.fallbacks:
            lines += ["", f"calls that fell back to the stock dense attention: {sum(self.fallbacks.values())}"]
            lines += [f"- {count} x {reason}" for reason, count in sorted(self.fallbacks.items())]
        if self.notes:
            lines += [""] + [f"note: {note}" for note in self.notes]
        return "\n".join(lines) + "\n"

    def save(self, path: str | os.PathLike) -> list[Path]:
        """Write ``path`` (JSON), and beside it ``.md`` (Markdown) and ``.png`` (bar chart).

        All three are rendered first and written to temporary files that replace the targets only
        when every one of them was written, so a failure leaves no partial report.

        Example:
            >>> import diffattn
            >>> from diffattn.pipelines.embedded import load_embedded_pipeline
            >>> report = diffattn.profile(load_embedded_pipeline(), "radial", warmup=0,
            ...                           prompt="a red circle moves left",
            ...                           num_frames=3, height=32, width=32, num_inference_steps=2)
            >>> report.save("out/profile.json")
            [PosixPath('out/profile.json'), PosixPath('out/profile.md'), PosixPath('out/profile.png')]
        """
        from .chart import chart_png

        path = Path(path)
        paths = [path, path.with_suffix(".md"), path.with_suffix(".png")]
        contents = [self.to_json().encode("utf-8"), self.to_markdown().encode("utf-8"), chart_png(self)]
        with contextlib.ExitStack() as stack:
            temporaries = [stack.enter_context(atomic_path(target)) for target in paths]
            for temporary, content in zip(temporaries, contents):
                temporary.write_bytes(content)
        return paths


def _finite_json(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): _finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_json(v) for v in value]
    return value


def _x(value: float) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.2f}x"


def _bytes(count: int) -> str:
    """``count`` bytes in KiB below one MiB, else in MiB (a small layout would read 0.00 MiB)."""
    return f"{count / 2**10:.1f} KiB" if count < 2**20 else f"{count / 2**20:.2f} MiB"


def _percent(value: float) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:.1f} %"


def _number(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.3f}"
