"""A Redis primary failure mid-run, behind Sentinel: every process follows the promoted replica, and with
TRAINBUS_REDIS_MIN_REPLICAS=1 nothing the producer handed over is lost; with 0, side by side, what
asynchronous replication drops.

Real processes throughout: a primary, a replica (replicating through a proxy the test can hold) and
three Sentinels; the training's delivery process, a dispatcher and ``rq worker platform`` on the
Sentinel URL; the local Platform server.
"""

from __future__ import annotations

import threading
import time

import orjson
import pytest
import redis

from producers import Publisher
from shared.keys import Keys
from shared.redis_client import REPLICA_WAIT_MS, NotReplicated, connect
from tests.helpers import wait_for
from tests.pipeline import Pipeline
from tests.sentinel_cluster import SentinelCluster
from workers.sinks.rate_limit import REPLICA_RETRY_S, RateLimiter, WindowLimiter
from workers.sinks.run_state import RunState

pytestmark = pytest.mark.failover

EPOCHS = 15  # 0-4 replicated; 5-9 while replication is held and no dispatcher reads; the failover; 10-14


@pytest.fixture
def cluster(tmp_path):
    c = SentinelCluster(tmp_path / "redis")
    yield c
    c.stop()


def stream_seqs(port: int, keys: Keys, run_id: str) -> list[int]:
    entries = redis.Redis(port=port).xrange(keys.events)
    events = [orjson.loads(fields[b"event"]) for _, fields in entries]
    return [e["seq"] for e in events if e["run_id"] == run_id]


@pytest.mark.parametrize("min_replicas", [1, 0])
def test_a_primary_killed_mid_run_is_followed_and_with_min_replicas_nothing_is_lost(
    min_replicas, cluster, namespace, spool_dir, platform, tmp_path, capsys
):
    keys = Keys(namespace)
    pipeline = Pipeline(
        cluster.url,
        namespace,
        None,
        spool_dir,
        TRAINBUS_SINKS="platform",
        TRAINBUS_REDIS_MIN_REPLICAS=min_replicas,
        **platform.env(),
    )
    run_id = f"failover-{min_replicas}"
    try:
        dispatcher = pipeline.dispatcher()
        pipeline.worker("platform")
        bus = Publisher(
            redis_url=cluster.url,
            namespace=namespace,
            spool_dir=spool_dir,
            run_id=run_id,
            redis_min_replicas=min_replicas,
        )
        bus.session({"epochs": EPOCHS}, name=run_id, device="cpu")
        for epoch in range(5):
            bus.metrics(epoch, {"loss": 1.0 / (epoch + 1)})
        wait_for(lambda: len(epochs_at(platform, run_id)) == 5, timeout=60)
        # and their deliveries' records on the replica too (else one the primary alone recorded is sent again
        # after the failover: the window the README states)
        primary = redis.Redis(port=cluster.primary.port)
        wait_for(lambda: primary.hlen(keys.pending("platform", run_id, "epochs")) == 0, timeout=30)
        written = primary.info("replication")["master_repl_offset"]
        replica = redis.Redis(port=cluster.replica.port)
        wait_for(lambda: replica.info("replication")["slave_repl_offset"] >= written, timeout=30)

        cluster.link.hold()  # what the primary takes now stays on it
        pipeline.kill(dispatcher)  # and nothing reads it before the primary dies (a stopped process's
        # blocked XREADGROUP would still be answered)
        for epoch in range(5, 10):
            bus.metrics(epoch, {"loss": 1.0 / (epoch + 1)})
        wait_for(lambda: len(stream_seqs(cluster.primary.port, keys, run_id)) >= 11, timeout=30)
        held_at_primary = stream_seqs(cluster.primary.port, keys, run_id)
        killed = time.monotonic()
        cluster.kill_primary()
        promoted_s = time.monotonic() - killed
        pipeline.dispatcher()
        cluster.restart_old_primary()  # a replica again: WAIT can be satisfied on the new primary

        for epoch in range(10, EPOCHS):
            bus.metrics(epoch, {"loss": 1.0 / (epoch + 1)})
        bus.end("completed")
        bus.close(timeout=30)
        wait_for(lambda: 14 in epochs_at(platform, run_id), timeout=90, interval=0.2)
        followed_s = time.monotonic() - killed
        on_new_primary = stream_seqs(cluster.replica.port, keys, run_id)
        delivered = epochs_at(platform, run_id)
    finally:
        pipeline.stop()
    accepted = list(range(EPOCHS))
    lost = sorted(set(accepted) - set(delivered))
    with capsys.disabled():
        print(
            f"\nMIN_REPLICAS={min_replicas}: promoted in {promoted_s:.1f} s, epoch 14 delivered {followed_s:.1f} s "
            f"after the kill; stream seqs at the old primary {len(held_at_primary)}, at the new one "
            f"{len(on_new_primary)}; epochs delivered {delivered}, lost {lost}"
        )
    assert sorted(set(on_new_primary)) == on_new_primary, "each seq once on the new primary"
    if min_replicas:
        assert delivered == accepted, "every epoch once, in order: nothing lost in the failover"
    else:
        assert lost == list(range(5, 10)), "without replica acknowledgement what the dead primary alone held is gone"


def epochs_at(platform, run_id: str) -> list[int]:
    model = next((m for m in platform.models() if m["slug"] == run_id), None)
    return [e["epoch"] for run in (model or {}).get("runs", []) for e in run["epochs"]]


def test_a_rate_limit_slot_is_used_only_once_a_replica_holds_it(cluster):
    """A reservation the primary alone holds is given back: a failover that lost it must not let a second
    request go inside the interval. Once the replica acknowledges, the slot is taken as usual."""
    client = connect(cluster.url)
    slots, window = RateLimiter(client, min_replicas=1), WindowLimiter(client, min_replicas=1)
    cluster.link.hold()
    assert slots.reserve("state", "ckpt", 900) == REPLICA_RETRY_S
    assert window.reserve("window", 1, 60) == REPLICA_RETRY_S
    assert client.zcard("window") == 0, "the window's reservation was given back"
    cluster.link.release()
    wait_for(lambda: slots.reserve("state", "ckpt", 900) == 0.0, timeout=10)
    assert slots.reserve("state", "ckpt", 900) > 890
    assert window.reserve("window", 1, 60) == 0.0
    assert window.reserve("window", 1, 60) > 50


def test_a_delivery_record_no_replica_holds_is_said_and_the_next_waits_for_it(cluster, caplog):
    client = connect(cluster.url)
    runs = RunState(client, Keys("acks"), "hub", min_replicas=1)
    client.hset("pending", "data", b"x")
    assert runs.remove_if_same("pending", {"data": b"x"}) == 1
    assert "fewer than" not in caplog.text
    cluster.link.hold()
    client.hset("pending", "data", b"y")
    started = time.monotonic()
    assert runs.remove_if_same("pending", {"data": b"y"}) == 1
    assert time.monotonic() - started >= REPLICA_WAIT_MS / 1000 - 0.1, "it waited for the replica"
    assert "a delivery record is on fewer than 1 replicas" in caplog.text
    with pytest.raises(NotReplicated):  # for a record its writer keeps and writes again (ClearML's confirmations)
        runs.wait_for_replicas(strict=True)


def test_a_slot_that_waited_for_the_replica_counts_from_when_its_request_goes(cluster):
    """The WAIT took 1.2 s: the next per-run slot is an interval after that, not after the reservation
    (the soak saw two heartbeats 0.25 s apart), and a window's reservation that waited that long is given back."""
    client = connect(cluster.url)
    slots, window = RateLimiter(client, min_replicas=1), WindowLimiter(client, min_replicas=1)

    def held_for_a_while() -> None:
        cluster.link.hold()
        threading.Timer(1.2, cluster.link.release).start()

    held_for_a_while()
    assert slots.reserve("state", "heartbeat", 1.0) == 0.0, "the replica acknowledged within 2 s"
    assert slots.reserve("state", "heartbeat", 1.0) > 0.8, "the interval runs from the request, not the reservation"
    held_for_a_while()
    assert window.reserve("window", 5, 60) == REPLICA_RETRY_S
    assert client.zcard("window") == 0, "the window's slow reservation was given back"
