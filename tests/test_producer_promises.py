"""The producer's promises where they broke: resumed runs, close() over a slow link, the spool
limit after a drainer delivered an old backlog, a publisher that cannot start, snapshots.

Real Redis, real training-process stand-ins (subprocesses killed with SIGKILL), a real
delaying TCP proxy in front of Redis, real drainer processes.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlparse

import redis

from producers import Publisher
from producers.spool import RunSpool
from producers.ultralytics import make_callbacks
from shared.keys import Keys
from tests.conftest import stream_events
from tests.helpers import children, wait_for
from tests.proxy import DelayProxy

ROOT = Path(__file__).resolve().parents[1]


def child(run_id: str, count: int, redis_url: str, namespace: str, spool: Path, *flags: str) -> subprocess.Popen:
    env = dict(
        os.environ,
        TRAINBUS_REDIS_URL=redis_url,
        TRAINBUS_NAMESPACE=namespace,
        TRAINBUS_SPOOL_DIR=str(spool),
        TRAINBUS_EXIT_FLUSH_S="0",
        PYTHONPATH=str(ROOT),
    )
    return subprocess.Popen(
        [sys.executable, "-m", "tests.producer_child", run_id, str(count), *flags],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        cwd=ROOT,
        text=True,
    )


def accepted(proc: subprocess.Popen) -> list[int]:
    seqs = []
    for line in proc.stdout:
        if line.strip() == "done":
            return seqs
        seqs.append(int(line))
    raise AssertionError("the child ended before saying done")


def replay(spool: Path, redis_url: str, namespace: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, TRAINBUS_REDIS_URL=redis_url, TRAINBUS_NAMESPACE=namespace, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "workers.ops.cli", "spool", "replay", "--spool-dir", str(spool), "--wait", "60"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def epochs_of(client: redis.Redis, keys: Keys) -> list[int]:
    return [e["payload"]["epoch"] for e in stream_events(client, keys) if e["type"] == "fit_epoch"]


def test_a_run_resumed_with_a_fresh_spool_delivers_every_new_event_once_after_the_old_ones(
    redis_url, namespace, client, keys, tmp_path
):
    with Publisher(redis_url=redis_url, namespace=namespace, spool_dir=tmp_path / "machine-a", run_id="pre") as bus:
        for epoch in range(3):
            bus.metrics(epoch, {"loss": epoch})
    resumed = Publisher(redis_url=redis_url, namespace=namespace, spool_dir=tmp_path / "machine-b", run_id="pre")
    for epoch in range(3, 6):
        resumed.metrics(epoch, {"loss": epoch})
    assert resumed.close() is True
    events = stream_events(client, keys)
    assert [e["seq"] for e in events] == list(range(len(events))), "the run's seqs go on, no gap, no repeat"
    assert epochs_of(client, keys) == [0, 1, 2, 3, 4, 5]
    assert [e["type"] for e in events].count("session") == 2, "the resumed process's session too"


def test_a_preempted_runs_leftovers_replayed_after_its_resume_arrive_once_after_it(own_redis, namespace, tmp_path):
    """Machine A pushes epochs 0-2, loses Redis, accepts 3-5 and is killed; B resumes the run on a
    fresh spool (6-8); later A's spool is replayed: every event once, A's leftovers after B's."""
    own_redis.extra = ("--appendonly", "yes")  # what Redis took before it stopped, it keeps
    own_redis.start()
    client, keys = redis.Redis.from_url(own_redis.url), Keys(namespace)
    a = child("pre", 3, own_redis.url, namespace, tmp_path / "a", "--more", "3")
    accepted(a)
    wait_for(lambda: len(stream_events(client, keys)) == 4)  # session + 3 epochs
    own_redis.stop()
    a.stdin.write("go\n")
    a.stdin.flush()
    leftovers = accepted(a)
    for pid in [*children(a.pid), a.pid]:  # machine A is preempted: its delivery process dies with the training
        os.kill(pid, signal.SIGKILL)  # (left alive, it pushes 3-5 once Redis is back, before B's: timing luck)
    a.wait()
    own_redis.start()
    with Publisher(redis_url=own_redis.url, namespace=namespace, spool_dir=tmp_path / "b", run_id="pre") as bus:
        for epoch in range(6, 9):
            bus.metrics(epoch, {"loss": 1.0 / (epoch + 1)})
    out = replay(tmp_path / "a", own_redis.url, namespace)
    assert out.returncode == 0, out.stdout + out.stderr
    assert len(leftovers) == 3
    events = stream_events(client, keys)
    assert [e["seq"] for e in events] == list(range(len(events)))
    assert epochs_of(client, keys) == [0, 1, 2, 6, 7, 8, 3, 4, 5], "each once; the late ones after the resume"


def test_close_returns_within_its_bound_over_a_slow_link_and_hands_the_backlog_to_a_drainer(
    redis_url, namespace, client, keys, tmp_path
):
    url = urlparse(redis_url)
    proxy = DelayProxy(url.hostname, url.port or 6379, delay=0.02)
    try:
        bus = Publisher(
            redis_url=proxy.url, namespace=namespace, spool_dir=tmp_path / "spool", run_id="slow", exit_flush_s=1
        )
        for i in range(20_000):
            bus.metrics(i, {"loss": 1.0 / (i + 1), "pad": "x" * 100})
        started = time.monotonic()
        flushed = bus.close()
        took = time.monotonic() - started
        assert not flushed, "20 000 events do not fit through a 20 ms link in a second"
        assert took < 1.0 + 1.0, f"close() took {took:.1f} s with TRAINBUS_EXIT_FLUSH_S=1"
        assert bus.delivery is not None
        wait_for(lambda: client.xlen(keys.events) == 20_002, timeout=180, interval=0.5)  # through the slow link
        assert bus.delivery.wait(timeout=60) == 0
        assert [e["seq"] for e in stream_events(client, keys)] == list(range(20_002))
    finally:
        proxy.close()


def test_a_resumed_runs_spool_limit_frees_what_a_drainer_delivered_of_the_old_backlog(
    redis_url, namespace, client, keys, tmp_path
):
    """The old backlog is ~1.6 of the run's 2 MB; a drainer pushes it (slowly) while the run resumes."""
    spool = tmp_path / "spool"
    old = Publisher(redis_url="redis://127.0.0.1:1/0", namespace=namespace, spool_dir=spool, run_id="full")
    for i in range(1600):
        old.metrics(i, {"pad": "x" * 1000})
    old.close(timeout=0)
    old.delivery.kill()  # it tries an unreachable Redis; the replay below delivers instead
    url = urlparse(redis_url)
    proxy = DelayProxy(url.hostname, url.port or 6379, delay=0.05)
    try:
        drainer = subprocess.Popen(
            [sys.executable, "-m", "workers.ops.cli", "spool", "replay", "--spool-dir", str(spool), "--wait", "60"],
            env=dict(os.environ, TRAINBUS_REDIS_URL=proxy.url, TRAINBUS_NAMESPACE=namespace, PYTHONPATH=str(ROOT)),
            cwd=ROOT,
        )
        wait_for(lambda: client.xlen(keys.events) > 0, timeout=30, interval=0.01)  # it is pushing now
        bus = Publisher(
            redis_url=redis_url, namespace=namespace, spool_dir=spool, run_id="full", spool_max_mb=2, exit_flush_s=30
        )
        assert drainer.wait(timeout=120) == 0
        wait_for(lambda: not list((spool / "full").glob("0000000000*.log"))[:-1], timeout=30)  # old segments gone
        results = [bus.metrics(1600 + i, {"pad": "y" * 1000}) for i in range(800)]
        assert None not in results, f"{results.count(None)} of 800 metrics dropped while Redis was healthy"
        assert bus.close() is True
    finally:
        proxy.close()
    assert epochs_of(client, keys) == list(range(2400))


class Trainer(SimpleNamespace):
    def label_loss_items(self, loss_items=None, prefix="train"):
        return {}


def test_hooks_stay_fast_and_say_once_why_when_the_publisher_cannot_start(redis_url, namespace, tmp_path, caplog):
    spool = tmp_path / "spool"
    holder = Publisher(redis_url=redis_url, namespace=namespace, spool_dir=spool, run_id="taken")
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    try:
        for spool_dir, reason in ((spool, "SpoolBusy"), (not_a_dir / "spool", "NotADirectoryError")):
            callbacks = make_callbacks(redis_url=redis_url, namespace=namespace, spool_dir=spool_dir, run_id="taken")
            trainer = Trainer(args=SimpleNamespace(name="t", project=None), epoch=0, epochs=50, metrics={})
            fds = len(os.listdir("/proc/self/fd"))
            caplog.clear()
            with caplog.at_level(logging.ERROR, logger="trainbus"):
                took = []
                for epoch in range(50):
                    trainer.epoch = epoch
                    for name in ("on_train_epoch_end", "on_fit_epoch_end"):
                        started = time.perf_counter()
                        callbacks[name](trainer)
                        took.append(time.perf_counter() - started)
            assert max(took[1:]) < 0.01, f"a hook took {max(took[1:]) * 1000:.0f} ms after the publisher failed"
            errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
            assert len(errors) == 1 and reason in errors[0], errors
            assert len(os.listdir("/proc/self/fd")) <= fds, "a failed start leaked a descriptor"
    finally:
        holder.close()


def test_snapshots_are_removed_once_every_sink_is_done_with_the_run(redis_url, namespace, client, keys, tmp_path):
    spool = tmp_path / "spool"
    for group in ("hub", "clearml"):
        client.xgroup_create(keys.events, group, id="0", mkstream=True)
    ckpt = tmp_path / "last.pt"
    ckpt.write_bytes(os.urandom(1 << 16))
    bus = Publisher(redis_url=redis_url, namespace=namespace, spool_dir=spool, run_id="kept")
    wait_for(lambda: bus.delivering, timeout=30)
    for epoch in range(3):
        bus.checkpoint(ckpt, epoch, is_best=epoch == 1)
        time.sleep(0.05)
    bus.final(ckpt, 2, {}, map50_95=0.5)
    bus.close()
    run = RunSpool(spool, "kept")
    wait_for(lambda: not run.segments() and run.pusher_lock.is_free(), timeout=30)  # delivered: the run is idle
    held = spool / "kept" / "checkpoints"
    status = subprocess.run(
        [sys.executable, "-m", "workers.ops.cli", "spool", "gc", "--spool-dir", str(spool)],
        env=dict(os.environ, TRAINBUS_REDIS_URL=redis_url, TRAINBUS_NAMESPACE=namespace, PYTHONPATH=str(ROOT)),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "kept: " in status.stdout and "waiting for clearml, hub" in status.stdout, status.stdout + status.stderr
    assert len(list(held.glob("*.pt"))) == 3, "newest, best, final"
    client.hset(keys.state("hub", "kept"), "finished", "1")
    time.sleep(0.5)
    assert list(held.glob("*.pt")), "the ClearML sink has not finished the run"
    client.hset(keys.state("clearml", "kept"), "finished", "1")
    wait_for(lambda: not any(held.iterdir()), timeout=30)  # the drainer started at close removes them
    assert bus.delivery.wait(timeout=30) == 0, "and then it is gone"


def test_snapshots_of_a_run_no_sink_finishes_go_after_the_retention(redis_url, namespace, client, keys, tmp_path):
    spool = tmp_path / "spool"
    client.xgroup_create(keys.events, "never-reads", id="0", mkstream=True)
    ckpt = tmp_path / "last.pt"
    ckpt.write_bytes(b"w" * 1000)
    bus = Publisher(
        redis_url=redis_url, namespace=namespace, spool_dir=spool, run_id="old", snapshot_retention_h=2 / 3600
    )
    bus.checkpoint(ckpt, 0)
    (spool / "old" / "checkpoints" / "000000000099-last.pt.part").write_bytes(b"a copy a crash left")
    bus.close()
    wait_for(lambda: not any((spool / "old" / "checkpoints").iterdir()), timeout=60)
