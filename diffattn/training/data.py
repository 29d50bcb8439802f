"""Training data for ``diffattn train-lora``: the embedded model's procedural clips at any length,
or a folder of videos with captions whose VAE latents and text embeddings are cached once.

Both draw a step's *global* batch from a generator seeded by ``(seed, step, micro-step)`` and let
each process load only its share of it, so a run with N processes sees exactly the batches of a
one-process run with the same global batch, and a resumed run sees the batches an uninterrupted
run would have seen.

A video folder holds the clips and ``metadata.jsonl`` (one ``{"file_name": ..., "caption": ...}``
per line; ``video``/``file`` and ``text``/``prompt`` are accepted too) or ``metadata.csv`` with the
same columns. Every listed video must decode (imageio) to at least ``--num-frames`` frames; the
first ``--num-frames`` are used, resized to the training size. Everything is checked before any
training starts; the encodings go to ``<folder>/.diffattn-cache/`` (safetensors) and are reused
by later runs with the same model, size and length.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from ..errors import UserError

VIDEO_SUFFIXES = (".mp4", ".gif", ".webm", ".mov", ".avi", ".mkv")
FILE_KEYS = ("file_name", "video", "file", "path")
CAPTION_KEYS = ("caption", "text", "prompt")


class TrainingData(Protocol):
    """A seeded source of training batches."""

    def draw(self, rng: np.random.Generator, count: int) -> list[Any]:
        """``count`` sample keys of one micro-step's global batch (cheap; the same on every process)."""

    def load(self, keys: list[Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The clean inputs ``[len(keys), ...]`` and text keyword arguments of these samples."""


class ProceduralData:
    """The embedded model's procedural clips (:mod:`diffattn.pipelines.shapes`) at any length,
    rendered and encoded on the fly (rendering is cheaper than reading a cache).

    Example:
        >>> from diffattn.pipelines.embedded import load_embedded_pipeline
        >>> from diffattn.training.families import TRAINING_FAMILIES
        >>> data = ProceduralData(load_embedded_pipeline(), TRAINING_FAMILIES["embedded"], 5, 32, 32)
        >>> clean, text = data.load(data.draw(np.random.default_rng(0), 2))
        >>> tuple(clean.shape), tuple(text["encoder_hidden_states"].shape)
        ((2, 3, 5, 32, 32), (2, 24, 64))
    """

    def __init__(self, pipe: Any, family: Any, num_frames: int, height: int, width: int) -> None:
        if height != width:
            raise UserError(f"procedural clips are square: --height and --width must be equal; got {height}x{width}")
        self.pipe, self.family, self.num_frames, self.size = pipe, family, num_frames, height

    def draw(self, rng: np.random.Generator, count: int) -> list[Any]:
        from ..pipelines.shapes import sample_clip

        return [sample_clip(rng) for _ in range(count)]

    def load(self, keys: list[Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        from ..pipelines.shapes import caption, render_clip

        videos = np.stack([render_clip(spec, self.num_frames, self.size) for spec in keys])
        return (self.family.encode_videos(self.pipe, videos),
                self.family.encode_captions(self.pipe, [caption(spec) for spec in keys]))


@dataclass(frozen=True)
class Sample:
    """One listed clip of a video folder."""

    path: Path
    caption: str


def read_metadata(folder: str | Path) -> list[Sample]:
    """The clips and captions listed in ``folder``'s ``metadata.jsonl`` or ``metadata.csv``;
    UserError naming the file and the problem (no metadata, a missing caption or file, a video in
    the folder without a caption).

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> read_metadata(folder)
        Traceback (most recent call last):
        diffattn.errors.UserError: --data folder ... has no captions: expected metadata.jsonl or metadata.csv ...
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"--data must be a folder of videos with metadata.jsonl or metadata.csv; got {str(folder)!r}")
    rows: list[dict[str, Any]] = []
    jsonl, table = folder / "metadata.jsonl", folder / "metadata.csv"
    if jsonl.is_file():
        source = jsonl
        for number, line in enumerate(jsonl.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as error:
                raise UserError(f"{jsonl}: line {number} is not JSON ({error})") from None
            if not isinstance(row, dict):
                raise UserError(f"{jsonl}: line {number} must be a JSON object; got {line.strip()!r}")
            rows.append(row)
    elif table.is_file():
        source = table
        with open(table, newline="") as handle:
            rows = list(csv.DictReader(handle))
    else:
        raise UserError(f"--data folder {str(folder)!r} has no captions: expected metadata.jsonl or metadata.csv "
                        f"with a file_name and a caption per video")
    samples = []
    for number, row in enumerate(rows, 1):
        name = next((row[k] for k in FILE_KEYS if row.get(k)), None)
        text = next((row[k] for k in CAPTION_KEYS if row.get(k) is not None), None)
        if name is None or text is None or not str(text).strip():
            raise UserError(f"{source}: entry {number} needs a file name ({'/'.join(FILE_KEYS)}) and a non-empty "
                            f"caption ({'/'.join(CAPTION_KEYS)}); got {row!r}")
        path = folder / str(name)
        if not path.is_file():
            raise UserError(f"{source}: entry {number} names {str(path)!r}, which does not exist")
        samples.append(Sample(path, str(text)))
    if not samples:
        raise UserError(f"{source} lists no videos")
    listed = {sample.path.resolve() for sample in samples}
    uncaptioned = sorted(p.name for p in folder.iterdir()
                         if p.suffix.lower() in VIDEO_SUFFIXES and p.resolve() not in listed)
    if uncaptioned:
        raise UserError(f"--data folder {str(folder)!r}: videos without a caption in {source.name}: "
                        f"{', '.join(uncaptioned)}")
    return samples


def read_video(path: Path, num_frames: int, height: int, width: int) -> np.ndarray:
    """The first ``num_frames`` frames of ``path`` as uint8 ``[F, height, width, 3]`` (resized
    when the file's size differs); UserError naming the file if it does not decode or is too short.

    Example:
        >>> import tempfile, imageio.v2 as imageio
        >>> path = Path(tempfile.mkdtemp()) / "clip.gif"
        >>> imageio.mimsave(path, [np.full((8, 8, 3), 80 * i, np.uint8) for i in range(3)])
        >>> read_video(path, 2, 16, 16).shape
        (2, 16, 16, 3)
    """
    import warnings

    import imageio.v2 as imageio

    frames = []
    try:
        with warnings.catch_warnings(), imageio.get_reader(path) as reader:
            warnings.simplefilter("ignore", DeprecationWarning)  # imageio probing its legacy plugins on a bad file
            for frame in reader:
                frames.append(np.asarray(frame))
                if len(frames) == num_frames:
                    break
    except Exception as error:  # imageio raises many types for a broken or foreign file
        raise UserError(f"--data video {str(path)!r} could not be decoded: {type(error).__name__}: {error}") from None
    if len(frames) < num_frames:
        raise UserError(f"--data video {str(path)!r} has {len(frames)} frames; --num-frames {num_frames} needs "
                        f"at least that many")
    video = np.stack(frames)
    if video.ndim == 3:
        video = np.repeat(video[..., None], 3, axis=-1)
    video = video[..., :3]
    if video.shape[1:3] != (height, width):
        tensor = torch.from_numpy(video).permute(0, 3, 1, 2).float()
        tensor = torch.nn.functional.interpolate(tensor, size=(height, width), mode="bilinear", antialias=True,
                                                 align_corners=False)
        video = tensor.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return video


class VideoFolderData:
    """A folder of captioned videos, encoded once (VAE latents, text embeddings) into a
    safetensors cache; :meth:`prepare` checks and encodes everything before training starts."""

    def __init__(self, folder: str | Path, pipe: Any, family: Any, num_frames: int, height: int, width: int,
                 model_id: str, cache_dir: str | Path | None = None) -> None:
        self.samples = read_metadata(folder)
        self.pipe, self.family = pipe, family
        self.num_frames, self.height, self.width = num_frames, height, width
        self.model_id = model_id
        self.cache_dir = Path(cache_dir) if cache_dir is not None else Path(folder) / ".diffattn-cache"
        self._cache: dict[int, dict[str, torch.Tensor]] = {}

    def _cache_path(self, sample: Sample) -> Path:
        stat = sample.path.stat()
        key = json.dumps([str(sample.path.resolve()), stat.st_size, stat.st_mtime_ns, sample.caption, self.model_id,
                          self.family.name, self.num_frames, self.height, self.width])
        return self.cache_dir / f"{sample.path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"

    def prepare(self, log=None, encode: bool = True) -> int:
        """Decode every video (UserError naming the first bad one) and, with ``encode``, write
        the missing cache files; returns how many were encoded now."""
        from safetensors.torch import load_file

        from .checkpoint import save_tensors

        missing = [(index, sample) for index, sample in enumerate(self.samples)
                   if not self._cache_path(sample).is_file()]
        videos = {index: read_video(sample.path, self.num_frames, self.height, self.width)
                  for index, sample in missing}  # every file checked before anything is encoded
        if encode:
            for count, (index, sample) in enumerate(missing, 1):
                clean = self.family.encode_videos(self.pipe, videos[index][None])[0]
                text = {k: v[0] for k, v in self.family.encode_captions(self.pipe, [sample.caption]).items()}
                save_tensors({"clean": clean, **{f"text.{k}": v for k, v in text.items()}}, self._cache_path(sample))
                if log is not None:
                    log(f"cached {count}/{len(missing)}: {sample.path.name}")
            for index, sample in enumerate(self.samples):
                self._cache[index] = load_file(str(self._cache_path(sample)))
        return len(missing)

    def draw(self, rng: np.random.Generator, count: int) -> list[Any]:
        return [int(i) for i in rng.integers(0, len(self.samples), size=count)]

    def load(self, keys: list[Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        entries = [self._cache[index] for index in keys]
        clean = torch.stack([entry["clean"] for entry in entries])
        names = [k for k in entries[0] if k.startswith("text.")]
        return clean, {name[len("text."):]: torch.stack([entry[name] for entry in entries]) for name in names}
