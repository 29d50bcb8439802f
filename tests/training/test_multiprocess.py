"""Data-parallel train-lora: 2 processes (accelerate over gloo, CPU) with 1 clip each give the loss
curve and the weights of 1 process with 2 clips (the same global batch, drawn from the same seed)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from diffattn.training import TrainLoraOptions, train_lora
from diffattn.training.lora import LORA_FILE
from tests.threads import one_thread  # noqa: F401 (autouse fixture)
from tests.training.tiny import saved_tiny_embedded

STEPS = 2
LR = 1e-2


def options(model: Path, output: Path, batch_size: int) -> TrainLoraOptions:
    return TrainLoraOptions(output=str(output), model=str(model), preset="radial", num_frames=5, height=16,
                            width=16, steps=STEPS, batch_size=batch_size, rank=4, lr=LR, warmup=0, save_every=10)


def _worker(rank: int, world: int, port: int, model: str, output: str, queue) -> None:
    # What `accelerate launch` / torchrun set for each process; accelerate then joins a gloo group on the CPU.
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), ACCELERATE_USE_CPU="true")
    torch.set_num_threads(1)
    result = train_lora(options(Path(model), Path(output), batch_size=1), log=lambda line: None)
    queue.put((rank, result.losses))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    model = saved_tiny_embedded(tmp_path / "model")
    single = train_lora(options(model, tmp_path / "one", batch_size=2), log=lambda line: None)

    context = mp.get_context("spawn")
    queue = context.Queue()
    port = _free_port()
    workers = [context.Process(target=_worker, args=(rank, 2, port, str(model), str(tmp_path / "two"), queue))
               for rank in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=180)
    assert all(worker.exitcode == 0 for worker in workers), [worker.exitcode for worker in workers]
    results = dict(queue.get(timeout=5) for _ in workers)

    assert len(single.losses) == STEPS
    # every process reports the global mean loss: the one-process curve, up to the all-reduce's rounding
    for rank in (0, 1):
        assert results[rank] == pytest.approx(single.losses, rel=1e-5)
    a, b = load_file(str(tmp_path / "one" / LORA_FILE)), load_file(str(tmp_path / "two" / LORA_FILE))
    assert a.keys() == b.keys()
    # Adam's first steps move a weight by about lr whatever its gradient's size, so the all-reduce's
    # rounding of tiny gradients shows at ~1e-5 (lr 1e-2): the bound is 1 % of one step.
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 1e-2 * LR, worst
