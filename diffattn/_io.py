"""Atomic file writes (a reader never sees a half-written result, and a failure leaves no file) and
the conversion of a pipeline's frames to the uint8 video every writer and scorer takes."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import numpy as np
import torch


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write to; on success it replaces ``path``.

    The temporary file keeps ``path``'s suffix (writers such as ffmpeg pick the format from it)
    and gets ordinary permissions (``mkstemp`` would leave it 0600). On any error it is removed.

    Example:
        >>> folder = Path(tempfile.mkdtemp())
        >>> with atomic_path(folder / "notes.txt") as tmp:
        ...     _ = tmp.write_text("written in full or not at all")
        ...     tmp.suffix, tmp.parent == folder      # beside the target, same suffix
        ('.txt', True)
        >>> [path.name for path in folder.iterdir()]   # renamed over the target
        ['notes.txt']
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write(handle)`` on a temporary file beside ``path``, then rename it over ``path``.

    Example:
        >>> path = atomic_write(Path(tempfile.mkdtemp()) / "report.json", lambda handle: handle.write(b"{}"))
        >>> path.name, path.read_bytes()
        ('report.json', b'{}')
    """
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        write(handle)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically.

    Example:
        >>> atomic_write_text(Path(tempfile.mkdtemp()) / "table.md", "| a |").read_text()
        '| a |'
    """
    return atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def to_uint8(video) -> np.ndarray:
    """A pipeline's ``frames[0]`` (float [0, 1] array, tensor or list of PIL images) as uint8 [F, H, W, 3].

    Example:
        >>> video = to_uint8(torch.full((2, 4, 4, 1), 0.5))  # 2 grey frames, one channel
        >>> video.shape, video.dtype, int(video[0, 0, 0, 0])
        ((2, 4, 4, 3), dtype('uint8'), 128)
    """
    if isinstance(video, torch.Tensor):
        video = video.float().cpu().numpy()
    if isinstance(video, list):
        video = np.stack([np.asarray(frame) for frame in video])
    video = np.asarray(video)
    if video.dtype != np.uint8:
        video = (np.clip(video, 0.0, 1.0) * 255).round().astype(np.uint8)
    if video.ndim == 3:
        video = video[..., None]
    if video.shape[-1] == 1:
        video = np.repeat(video, 3, axis=-1)
    return video
