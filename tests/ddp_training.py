"""A tiny DDP training on the CPU (gloo, two processes) publishing with trainbus; run by tests/test_ranks.py.

    python -m torch.distributed.run --nproc_per_node 2 tests/ddp_training.py torchrun RUN_ID WORKDIR
        every rank makes its own Publisher (RANK is in its environment)
    python tests/ddp_training.py spawn RUN_ID WORKDIR
        the parent makes one Publisher and torch.multiprocessing.spawn pickles it into both ranks
    python -m torch.distributed.run --nproc_per_node 2 tests/ddp_training.py ultralytics CALLBACKS WORKDIR
        Ultralytics' way: callbacks pickled with cloudpickle (CALLBACKS, a file), loaded in every rank,
        driven by the stand-in trainer of tests/test_ultralytics_hooks.py

Every metric carries the rank that published it, so the test can tell which ranks did.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from producers import Publisher

EPOCHS = 3


def train(bus: Publisher, workdir: Path) -> None:
    torch.manual_seed(dist.get_rank())
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    last = workdir / "last.pt"
    bus.session({"epochs": EPOCHS, "world_size": dist.get_world_size()}, name="ddp", project="ranks", device="cpu")
    for epoch in range(EPOCHS):
        x = torch.randn(64, 4)
        loss = ((model(x) - x.sum(1, keepdim=True)) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()  # gradients all-reduced over gloo
        optimizer.step()
        bus.metrics(epoch, {"loss": loss.item(), "rank": dist.get_rank()})
        if dist.get_rank() == 0:
            torch.save(model.module.state_dict(), last)
        dist.barrier()
        bus.checkpoint(last, epoch)
    bus.final(last, EPOCHS - 1, {"loss": loss.item(), "rank": dist.get_rank()})
    bus.close()


def spawned(rank: int, world: int, bus: Publisher, workdir: Path) -> None:
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        train(bus, workdir)
    finally:
        dist.destroy_process_group()


def ultralytics_rank(callbacks_file: Path, workdir: Path) -> None:
    import cloudpickle

    from tests.test_ultralytics_hooks import train as drive

    with open(callbacks_file, "rb") as f:
        callbacks = cloudpickle.load(f)
    rank = dist.get_rank()
    drive(callbacks, workdir / f"rank{rank}", epochs=EPOCHS)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    mode, name, workdir = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    if mode == "spawn":
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        bus = Publisher(run_id=name)
        mp.spawn(spawned, args=(2, bus, workdir), nprocs=2)
        assert bus.close(), "the parent handed the run over: nothing of it is left here"
        return
    dist.init_process_group("gloo")
    try:
        if mode == "torchrun":
            train(Publisher(run_id=name), workdir)
        else:
            ultralytics_rank(Path(name), workdir)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
