"""ClearML: every recorded seq is reported exactly once, with any number of workers, whatever
the order the events were recorded in and whatever the server does meanwhile; one task per run.

Real processes throughout: dispatcher and `rq worker` processes, the ClearML test server.
"""

from __future__ import annotations

import collections
import os
import signal
import time
from pathlib import Path

import pytest
import redis

from shared.events import encode_event
from shared.keys import Keys
from tests.helpers import wait_for
from tests.pipeline import ClearmlServer, Pipeline


@pytest.fixture
def online(redis_url, namespace, hub, spool_dir, clearml):
    p = Pipeline(
        redis_url,
        namespace,
        hub,
        spool_dir,
        TRAINBUS_SINKS="clearml",
        TRAINBUS_CLEARML_TIMEOUT_S=2,
        **clearml.env(),
    )
    yield p
    p.stop()


def scalars(clearml: ClearmlServer, name: str) -> collections.Counter:
    state = clearml.state()
    ids = {t["id"] for t in state["tasks"].values() if t.get("name") == name}
    return collections.Counter(
        (e["metric"], e["variant"], e["iter"], e["value"])
        for e in state["events"]
        if e.get("task") in ids and e["type"] == "training_stats_scalar"
    )


def tasks_named(clearml: ClearmlServer, name: str) -> list[dict]:
    return [t for t in clearml.state()["tasks"].values() if t.get("name") == name]


def completed(clearml: ClearmlServer, name: str) -> bool:
    return any(t["status"] == "completed" for t in tasks_named(clearml, name))


def event(run: str, seq: int, kind: str, **payload) -> dict:
    return {"event": encode_event(run, seq, 1_000_000.0 + seq, kind, payload)}


def epoch(run: str, seq: int, n: int) -> dict:
    return event(run, seq, "train_epoch", epoch=n, metrics={"train/loss": float(n)}, lr={})


def logs(p: Pipeline) -> bytes:
    return b"".join(path.read_bytes() for path in Path(p.log_dir).glob("proc-*.log"))


def test_events_recorded_out_of_seq_order_are_each_reported_once(online, clearml, client, keys):
    """As a batch claimed from a dead dispatcher, or a second dispatcher, records them: 0, 4-6, then 1-3."""
    run = "late"
    client.xadd(keys.events, event(run, 0, "session", args={"epochs": 6}, name=run))
    for seq in (4, 5, 6):
        client.xadd(keys.events, epoch(run, seq, seq - 1))
    online.dispatcher()
    online.worker("clearml")
    wait_for(lambda: tasks_named(clearml, run), timeout=120)  # the worker drained what was recorded
    wait_for(lambda: client.zcard(keys.pending("clearml", run, "events")) <= 3, timeout=30)
    for seq in (1, 2, 3):
        client.xadd(keys.events, epoch(run, seq, seq - 1))
    client.xadd(keys.events, event(run, 7, "run_end", status="completed"))
    wait_for(lambda: completed(clearml, run), timeout=90)
    got = scalars(clearml, run)
    assert sorted(got) == [("train", "train/loss", n, float(n)) for n in range(6)], "epochs 0-5, none skipped"
    assert set(got.values()) == {1}, "each once"


def test_two_workers_report_each_scalar_once_through_a_flush_timeout(online, clearml, client, keys):
    """Worker A's SDK holds reports it could not send; A is paused, B drains the run; then A sends."""
    run = "dup"
    first = online.worker("clearml")
    online.dispatcher()
    client.xadd(keys.events, event(run, 0, "session", args={"epochs": 10}, name=run))
    for n in range(3):
        client.xadd(keys.events, epoch(run, 1 + n, n))
    wait_for(lambda: len(scalars(clearml, run)) == 3, timeout=120)
    clearml.fault(down=True)
    for n in range(3, 6):
        client.xadd(keys.events, epoch(run, 1 + n, n))
    wait_for(lambda: b"sink=clearml run=dup outcome=" in logs(online), timeout=120)  # A could not send in time
    os.kill(first.pid, signal.SIGSTOP)  # A keeps what its SDK holds and takes no jobs, for far less than its lease
    try:
        drains = logs(online).count(b"drain clearml run dup")
        online.worker("clearml")  # B: every job of the run now goes to it
        wait_for(lambda: logs(online).count(b"drain clearml run dup") > drains, timeout=120)
        clearml.fault(down=False)
        time.sleep(1.0)  # long enough for B's SDK to send anything it was given
    finally:
        os.kill(first.pid, signal.SIGCONT)
    for n in range(6, 9):
        client.xadd(keys.events, epoch(run, 1 + n, n))
    client.xadd(keys.events, event(run, 10, "run_end", status="completed"))
    wait_for(lambda: completed(clearml, run), timeout=90)
    time.sleep(2.0)  # a late second send by the other worker's SDK would show up now
    got = scalars(clearml, run)
    assert sorted(got) == [("train", "train/loss", n, float(n)) for n in range(9)]
    assert set(got.values()) == {1}, f"sent twice: {sorted(k for k, v in got.items() if v > 1)}"


def test_a_task_creation_that_outlives_its_timeout_makes_one_task_and_no_pile_of_threads(online, clearml, client, keys):
    run = "slow-create"
    clearml.fault(hang=8, endpoint="tasks.create")  # 4x TRAINBUS_CLEARML_TIMEOUT_S
    worker = online.worker("clearml")
    online.dispatcher()
    client.xadd(keys.events, event(run, 0, "session", args={"epochs": 1}, name=run))
    client.xadd(keys.events, epoch(run, 1, 0))
    wait_for(lambda: logs(online).count(b"sink=clearml run=slow-create kind=events outcome=retry") >= 2, timeout=120)
    threads_early = len(os.listdir(f"/proc/{worker.pid}/task"))
    wait_for(lambda: logs(online).count(b"sink=clearml run=slow-create kind=events outcome=retry") >= 6, timeout=120)
    threads_late = len(os.listdir(f"/proc/{worker.pid}/task"))
    clearml.fault(hang=0)
    client.xadd(keys.events, event(run, 2, "run_end", status="completed"))
    wait_for(lambda: completed(clearml, run), timeout=90)
    assert len(tasks_named(clearml, run)) == 1, "one task per run"
    assert sorted(scalars(clearml, run)) == [("train", "train/loss", 0, 0.0)]
    assert threads_late <= threads_early + 1, f"threads grew from {threads_early} to {threads_late} while retrying"


def test_reports_the_sdk_sent_while_redis_was_down_are_confirmed_once_it_is_back(
    own_redis, namespace, hub, spool_dir, clearml
):
    """The SDK sends during a Redis outage; the confirmation must wait for Redis, not be forgotten
    (the chaos run found a run that never completed: its units stayed handed to a live worker)."""
    own_redis.extra = ("--appendonly", "yes")
    own_redis.start()
    client, keys = redis.Redis.from_url(own_redis.url), Keys(namespace)
    p = Pipeline(
        own_redis.url,
        namespace,
        hub,
        spool_dir,
        TRAINBUS_SINKS="clearml",
        TRAINBUS_CLEARML_TIMEOUT_S=2,
        **clearml.env(),
    )
    try:
        p.dispatcher()
        p.worker("clearml")
        run = "outage"
        client.xadd(keys.events, event(run, 0, "session", args={"epochs": 6}, name=run))
        for n in range(3):
            client.xadd(keys.events, epoch(run, 1 + n, n))
        wait_for(lambda: len(scalars(clearml, run)) == 3, timeout=120)
        clearml.fault(down=True)
        for n in range(3, 6):
            client.xadd(keys.events, epoch(run, 1 + n, n))
        wait_for(lambda: client.hlen(keys.pending("clearml", run, "handed")) == 3, timeout=120)
        own_redis.stop()
        clearml.fault(down=False)
        wait_for(lambda: len(scalars(clearml, run)) == 6, timeout=120)  # sent while Redis is down
        wait_for(lambda: b"confirming ClearML reports failed" in logs(p), timeout=30)
        own_redis.start()
        client.xadd(keys.events, event(run, 7, "run_end", status="completed"))
        wait_for(lambda: completed(clearml, run), timeout=90)
        got = scalars(clearml, run)
        assert sorted(got) == [("train", "train/loss", n, float(n)) for n in range(6)]
        assert set(got.values()) == {1}
    finally:
        p.stop()
