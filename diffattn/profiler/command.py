"""``diffattn profile``: the model, prompt and size options of ``diffattn generate``, then
:func:`diffattn.profile` on the loaded pipeline, and the report written beside ``--report``.

Loading and call building are :func:`diffattn.runs.prepare_run`, shared with ``generate``; bad
inputs raise :class:`~diffattn.errors.UserError` before any report file is touched.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import UserError
from ..runs import RunOptions, check_output, is_main_rank, prepare_run
from .report import ProfileReport
from .runner import profile

REPORT_SUFFIXES = (".json",)


@dataclass(kw_only=True)
class ProfileOptions(RunOptions):
    """Everything ``diffattn profile`` takes: :class:`RunOptions` plus the report and repeats.

    Attributes:
        report: JSON path (``.md`` and ``.png`` are written beside it), or None to only print.
        warmup: untimed warm-up rounds (a dense and a preset run each).
        repeats: timed rounds; the report holds medians.

    Example:
        >>> options = ProfileOptions(preset="radial", num_frames=33, steps=4, report="out/radial.json")
        >>> options.warmup, options.repeats
        (1, 1)
    """

    report: str | None = None
    warmup: int = 1
    repeats: int = 1


def run_profile(options: ProfileOptions, log: Callable[[str], None] | None = None) -> tuple[ProfileReport, list[Path]]:
    """Check the options, load the pipeline, profile it and write the report; returns the report
    and the paths written (none without ``options.report``).

    Example:
        >>> import tempfile
        >>> report_path = Path(tempfile.mkdtemp()) / "profile.json"
        >>> report, paths = run_profile(ProfileOptions(preset="radial-fast", num_frames=5, height=32, width=32,
        ...                                            steps=1, warmup=0, report=str(report_path)))
        >>> report.preset, sorted(path.suffix for path in paths)
        ('radial-fast', ['.json', '.md', '.png'])
    """
    report_path = check_output(options.report, REPORT_SUFFIXES, "--report") if options.report is not None else None
    for name, value, minimum in (("--warmup", options.warmup, 0), ("--repeats", options.repeats, 1)):
        if value < minimum:
            raise UserError(f"{name} must be an integer >= {minimum}; got {value}")
    run = prepare_run(options)
    # The preset string itself (name or YAML path), so the report carries its name.
    report = profile(run.pipe, options.preset, seed=options.seed, warmup=options.warmup, repeats=options.repeats,
                     log=log, **run.call)
    # Under --ulysses-degree every rank has the whole report; the first one writes it.
    paths = report.save(report_path) if report_path is not None and is_main_rank() else []
    return report, paths
