"""The delivery process: a training process keeps only the append; everything else survives a
SIGKILL of either process, forks of the training process, and several publishers in one process.

Real processes, a real Redis, a delaying TCP proxy where a push must be slow enough to be caught.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch

from producers import Publisher
from shared.checksum import sha256_of
from tests.conftest import stream_events
from tests.helpers import delivery_processes, producer_env, wait_for
from tests.proxy import DelayProxy

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def slow_redis(redis_url):
    """Redis through a link that delays every chunk by 20 ms: a push of many batches takes a while."""
    url = urlparse(redis_url)
    proxy = DelayProxy(url.hostname, url.port or 6379, delay=0.02)
    yield proxy.url
    proxy.close()


def seqs_of(client, keys, run_id: str) -> list[int]:
    return [e["seq"] for e in stream_events(client, keys) if e["run_id"] == run_id]


def test_the_training_process_runs_no_thread_of_trainbus(redis_url, namespace, spool_dir, client, keys):
    before = set(threading.enumerate())
    with Publisher(redis_url=redis_url, namespace=namespace, spool_dir=spool_dir, run_id="lean") as bus:
        for epoch in range(20):
            bus.metrics(epoch, {"loss": 1.0})
        assert set(threading.enumerate()) == before, "hooks hand off to the delivery process, not to a thread"
        assert bus.delivery is not None and bus.delivery.poll() is None
        delivery = bus.delivery
    assert seqs_of(client, keys, "lean") == list(range(22))
    assert delivery.wait(timeout=30) == 0, "delivered, nothing held: it exits"


def test_the_delivery_process_killed_mid_push_is_replaced_and_nothing_is_lost_or_doubled(
    slow_redis, redis_url, namespace, spool_dir, client, keys
):
    bus = Publisher(redis_url=slow_redis, namespace=namespace, spool_dir=spool_dir, run_id="mid-push")
    for i in range(3000):
        bus.metrics(i, {"loss": i})
    wait_for(lambda: client.xlen(keys.events) > 0, timeout=30, interval=0.005)  # pushing, far from done
    first = bus.delivery
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert client.xlen(keys.events) < 3001
    sent = [3000]

    def hook_then_replaced() -> bool:  # a hook finds its heartbeat silent: another starts, off the hook's thread
        started = time.perf_counter()
        assert bus.metrics(sent[0], {"loss": sent[0]}) is not None
        assert time.perf_counter() - started < 0.05, "the hook does not wait for the new process"
        sent[0] += 1
        return bus.delivery is not first

    wait_for(hook_then_replaced, timeout=30)  # replaced within 30 s
    assert bus.close(timeout=120) is True
    assert seqs_of(client, keys, "mid-push") == list(range(sent[0] + 2)), "once each, in order"


def test_the_delivery_process_killed_mid_snapshot_the_next_one_makes_it(
    redis_url, namespace, spool_dir, client, keys, tmp_path
):
    ckpt = tmp_path / "last.pt"
    torch.save({"w": torch.randn((24 << 20) // 4)}, ckpt)  # 24 MB: a copy, a zip check and a hash take a while
    bus = Publisher(redis_url=redis_url, namespace=namespace, spool_dir=spool_dir, run_id="mid-snap")
    wait_for(lambda: bus.delivering, timeout=30)
    held = spool_dir / "mid-snap" / "checkpoints"
    bus.checkpoint(ckpt, 0)
    part = wait_for(lambda: next(held.glob("*.part"), None), timeout=10, interval=0.001)
    first = bus.delivery
    first.send_signal(signal.SIGKILL)
    first.wait()
    bus.metrics(1, {"loss": 1.0})  # the hook notices; the new process finds the checkpoint unmade
    assert bus.close(timeout=60) is True
    [event] = [e for e in stream_events(client, keys) if e["type"] == "checkpoint"]
    snapshot = event["payload"]["checkpoint"]
    assert snapshot["sha256"] == sha256_of(ckpt), "the file had not changed: the new process copied it whole"
    assert not part.exists() and not list(held.glob("*.part")), "the killed copy's part file is gone"


def test_the_delivery_process_killed_while_the_trainer_exits(slow_redis, namespace, spool_dir, client, keys):
    bus = Publisher(redis_url=slow_redis, namespace=namespace, spool_dir=spool_dir, run_id="at-exit")
    for i in range(2000):
        bus.metrics(i, {"loss": i})
    first = bus.delivery
    threading.Timer(0.3, first.send_signal, (signal.SIGKILL,)).start()  # while close() waits
    started = time.monotonic()
    assert bus.close(timeout=120) is True, "close() started another one and it finished"
    assert time.monotonic() - started >= 0.3 and bus.delivery is not first
    assert seqs_of(client, keys, "at-exit") == list(range(2002))


FORKING_TRAINING = """
import os, sys
import torch
from torch.utils.data import DataLoader
from producers import Publisher

bus = Publisher(run_id="forked")
loader = DataLoader(list(range(64)), batch_size=8, num_workers=2, multiprocessing_context="fork")
for epoch in range(3):
    for batch in loader:
        pass
    bus.metrics(epoch, {"loss": 1.0 / (epoch + 1)})
pid = os.fork()
if pid == 0:  # a plain fork whose child calls a hook and exits normally (exit handlers run)
    assert bus.metrics(99, {"loss": 0.0}) is None, "a forked child never writes the parent's spool"
    sys.exit(0)
assert os.waitpid(pid, 0)[1] == 0
bus.metrics(3, {"loss": 0.25})
print("closed", bus.close(timeout=30), flush=True)
"""


def test_forked_children_neither_write_the_spool_nor_end_the_run(redis_url, namespace, spool_dir, client, keys):
    env = producer_env(redis_url, namespace, spool_dir)
    out = subprocess.run(
        [sys.executable, "-c", FORKING_TRAINING], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and "closed True" in out.stdout, out.stderr
    events = [e for e in stream_events(client, keys) if e["run_id"] == "forked"]
    assert [e["type"] for e in events] == ["session"] + ["fit_epoch"] * 4 + ["run_end"]
    assert [e["payload"]["epoch"] for e in events[1:-1]] == [0, 1, 2, 3]
    assert "forked child" in out.stderr, "the child's dropped call says why"


def test_several_publishers_in_one_process_each_have_their_own(redis_url, namespace, spool_dir, client, keys):
    buses = [
        Publisher(redis_url=redis_url, namespace=namespace, spool_dir=spool_dir, run_id=f"many-{n}") for n in range(3)
    ]
    assert len({b.delivery.pid for b in buses}) == 3
    for epoch in range(50):
        for bus in buses:
            bus.metrics(epoch, {"loss": 1.0})
    assert all(bus.close() for bus in buses)
    for n in range(3):
        assert seqs_of(client, keys, f"many-{n}") == list(range(52))
    wait_for(lambda: not delivery_processes(spool_dir), timeout=30)
