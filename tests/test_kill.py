"""SIGKILL of the training process right after a hook returned: nothing is lost."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import redis

from producers import Publisher
from shared.keys import Keys
from tests.conftest import stream_events
from tests.helpers import delivery_processes, kill_drainers, producer_env, wait_for

ROOT = Path(__file__).resolve().parents[1]


def start_child(run_id: str, count: int, redis_url: str, namespace: str, spool_dir: Path, *flags: str):
    env = producer_env(redis_url, namespace, spool_dir)
    return subprocess.Popen(
        [sys.executable, "-m", "tests.producer_child", run_id, str(count), *flags],
        stdout=subprocess.PIPE,
        env=env,
        cwd=ROOT,
        text=True,
    )


def accepted_then_kill(child: subprocess.Popen, after: int | None = None) -> list[int]:
    """Read accepted seqs (all, or the first ``after``), then SIGKILL the child."""
    seqs: list[int] = []
    for line in child.stdout:
        if line.strip() == "done":
            break
        seqs.append(int(line))
        if after is not None and len(seqs) >= after:
            break
    child.send_signal(signal.SIGKILL)
    child.wait()
    return seqs


def test_killed_with_redis_down_then_delivered_by_its_delivery_process(own_redis, namespace, spool_dir):
    """The delivery process outlives the training process it served: it pushes the rest and exits."""
    child = start_child("killed", 200, own_redis.url, namespace, spool_dir)
    seqs = accepted_then_kill(child)
    assert seqs == list(range(201))
    delivery = delivery_processes(spool_dir)
    assert len(delivery) == 1, "one delivery process per training process"
    own_redis.start()
    client, keys = redis.Redis.from_url(own_redis.url), Keys(namespace)
    wait_for(lambda: len(stream_events(client, keys)) == 201, timeout=60)
    assert [e["seq"] for e in stream_events(client, keys)] == seqs
    wait_for(lambda: not delivery_processes(spool_dir), timeout=30)  # done: it exits (no snapshots to keep)
    assert not list((spool_dir / "killed").glob("*.log"))


def test_killed_with_redis_down_then_trainbus_spool_replay(own_redis, namespace, spool_dir):
    """The machine went down with it: nothing runs any more, the spool is all there is."""
    child = start_child("killed", 200, own_redis.url, namespace, spool_dir)
    seqs = accepted_then_kill(child)
    assert seqs == list(range(201))
    kill_drainers(spool_dir)
    own_redis.start()
    env = dict(os.environ, TRAINBUS_REDIS_URL=own_redis.url, TRAINBUS_NAMESPACE=namespace)
    replay = [sys.executable, "-m", "workers.ops.cli", "spool", "replay", "--spool-dir", str(spool_dir)]
    out = subprocess.run(replay, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "done: 201 events pushed; 1 run(s) fully delivered" in out.stdout
    events = stream_events(redis.Redis.from_url(own_redis.url), Keys(namespace))
    assert [e["seq"] for e in events] == seqs
    again = subprocess.run(replay, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert "nothing to replay" in again.stdout


def test_killed_with_redis_down_then_delivered_by_the_next_producer_start(own_redis, namespace, spool_dir):
    seqs = accepted_then_kill(start_child("killed", 50, own_redis.url, namespace, spool_dir))
    own_redis.start()
    client, keys = redis.Redis.from_url(own_redis.url), Keys(namespace)
    with Publisher(run_id="next", redis_url=own_redis.url, namespace=namespace, spool_dir=spool_dir) as bus:
        bus.metrics(0, {"loss": 0})
    wait_for(lambda: len([e for e in stream_events(client, keys) if e["run_id"] == "killed"]) == 51, timeout=60)
    assert [e["seq"] for e in stream_events(client, keys) if e["run_id"] == "killed"] == seqs


def test_repeated_kills_mid_stream_deliver_every_accepted_event_exactly_once(
    redis_url, namespace, spool_dir, client, keys
):
    rng = random.Random(7)
    accepted: list[int] = []
    for _ in range(4):
        child = start_child("phoenix", 400, redis_url, namespace, spool_dir)
        accepted += accepted_then_kill(child, after=rng.randint(1, 399))
    child = start_child("phoenix", 10, redis_url, namespace, spool_dir, "--then-exit")
    accepted += [int(line) for line in child.stdout if line.strip() != "done"]
    assert child.wait(timeout=60) == 0
    seqs = [e["seq"] for e in stream_events(client, keys)]
    assert seqs == sorted(set(seqs)), "no duplicates, in order"
    assert set(accepted) <= set(seqs), "every accepted event arrived"
    assert seqs == list(range(len(seqs))), "no gaps"
