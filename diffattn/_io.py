"""Atomic file writes: a reader never sees a half-written result, and a failure leaves no file."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Iterator


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
