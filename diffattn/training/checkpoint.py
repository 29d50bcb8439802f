"""Training checkpoints: safetensors tensors plus one JSON file, written atomically, nothing pickled.

Shared by ``diffattn train-lora`` and ``scripts/train_embedded_model.py``. A checkpoint folder
holds named groups of tensors (``<group>.safetensors``: weights, EMA weights, optimizer moments)
and ``checkpoint.json`` (the step, the optimizer's non-tensor state, anything else JSON-able).
The JSON is written last, so a checkpoint counts only once its JSON names the step that every
file belongs to; an interrupted write leaves the previous checkpoint readable.

Example:
    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> model = torch.nn.Linear(2, 2)
    >>> optimizer = torch.optim.AdamW(model.parameters())
    >>> model(torch.ones(1, 2)).sum().backward(); optimizer.step()
    >>> folder = Path(tempfile.mkdtemp())
    >>> save_checkpoint(folder, 1, {"weights": model.state_dict()}, optimizer, {"note": "x"})
    >>> restored = torch.optim.AdamW(model.parameters())
    >>> info = load_checkpoint(folder, restored)
    >>> info["step"], sorted(info["tensors"]), info["note"]
    (1, ['weights'], 'x')
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .._io import atomic_path, atomic_write_text

CHECKPOINT_JSON = "checkpoint.json"


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """``tensors`` to a safetensors file at ``path``, atomically (detached, on the CPU, contiguous).

    Example:
        >>> import tempfile
        >>> from safetensors.torch import load_file
        >>> path = Path(tempfile.mkdtemp()) / "w.safetensors"
        >>> save_tensors({"a": torch.ones(2)}, path)
        >>> load_file(str(path))["a"].tolist()
        [1.0, 1.0]
    """
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        # clone(): tied weights (a shared embedding) must not share memory in safetensors
        save_file({k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}, str(tmp))


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Flatten an optimizer's state into safetensors-able tensors and a JSON-able remainder.

    Example:
        >>> parameter = torch.nn.Parameter(torch.ones(2))
        >>> optimizer = torch.optim.AdamW([parameter])
        >>> parameter.sum().backward(); optimizer.step()
        >>> tensors, meta = optimizer_tensors(optimizer)
        >>> sorted(tensors), "param_groups" in meta
        (['0.exp_avg', '0.exp_avg_sq', '0.step'], True)
    """
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entry in state["state"].items():
        for name, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{name}"] = value
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Inverse of :func:`optimizer_tensors`: load the flattened state back into ``optimizer``.

    Example:
        >>> parameter = torch.nn.Parameter(torch.ones(2))
        >>> optimizer = torch.optim.AdamW([parameter])
        >>> parameter.sum().backward(); optimizer.step()
        >>> tensors, meta = optimizer_tensors(optimizer)
        >>> fresh = torch.optim.AdamW([parameter])
        >>> restore_optimizer(fresh, tensors, meta)
        >>> bool(torch.equal(fresh.state_dict()["state"][0]["exp_avg"], tensors["0.exp_avg"]))
        True
    """
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    for key, value in meta["scalars"].items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(folder: Path, step: int, groups: dict[str, dict[str, torch.Tensor]],
                    optimizer: torch.optim.Optimizer, info: dict[str, Any] | None = None) -> None:
    """Write ``<group>.safetensors`` per tensor group, ``optimizer.safetensors``, then
    ``checkpoint.json`` (``step``, the optimizer's JSON part, the group names and ``info``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, tensors in groups.items():
        save_tensors(tensors, folder / f"{name}.safetensors")
    tensors, meta = optimizer_tensors(optimizer)
    save_tensors(tensors, folder / "optimizer.safetensors")
    # Written last: a checkpoint counts only once its JSON names the step all files belong to.
    atomic_write_text(folder / CHECKPOINT_JSON, json.dumps(
        {**(info or {}), "step": step, "optimizer": meta, "groups": sorted(groups)}, indent=1))


def load_checkpoint(folder: Path, optimizer: torch.optim.Optimizer | None = None,
                    groups: list[str] | None = None) -> dict[str, Any] | None:
    """The checkpoint in ``folder`` (None if there is none): its JSON, plus ``tensors``
    (``{group: {name: tensor}}`` for ``groups``, default the groups its JSON names); the optimizer
    state is restored into ``optimizer`` if given."""
    from safetensors.torch import load_file

    folder = Path(folder)
    info_path = folder / CHECKPOINT_JSON
    if not info_path.is_file():
        return None
    info = json.loads(info_path.read_text())
    names = groups if groups is not None else info.get("groups", [])
    info["tensors"] = {name: load_file(str(folder / f"{name}.safetensors")) for name in names}
    if optimizer is not None:
        restore_optimizer(optimizer, load_file(str(folder / "optimizer.safetensors")), info["optimizer"])
    return info
