"""Redis stays bounded whatever lands on the stream: far-out seqs, groups nobody feeds."""

from __future__ import annotations

import json

import redis

from shared.events import MAX_SEQ, encode_event
from shared.keys import Keys
from shared.settings import WorkerSettings
from tests.helpers import wait_for
from tests.pipeline import MODEL_ID, Pipeline
from workers.pipeline.dispatch import Dispatcher


def test_a_far_out_seq_is_dead_lettered_and_per_run_state_stays_small(own_redis, namespace):
    own_redis.start()
    client, keys = redis.Redis.from_url(own_redis.url), Keys(namespace)
    entries = [
        ("big", 0, "session", {"args": {}, "hub_model_id": MODEL_ID}),
        ("big", 1, "fit_epoch", {"epoch": 0, "metrics": {"loss": 1.0}}),
        ("big", MAX_SEQ, "fit_epoch", {"epoch": 1, "metrics": {"loss": 0.5}}),
        ("nowhere", MAX_SEQ, "run_end", {"status": "completed"}),
        ("big", 3, "fit_epoch", {"epoch": 2, "metrics": {"loss": 0.2}}),  # out of order, near: kept
    ]
    for run, seq, kind, payload in entries:
        client.xadd(keys.events, {"event": encode_event(run, seq, 1.0, kind, payload)})
    before = client.info("memory")["used_memory"]
    settings = WorkerSettings.from_env({}, redis_url=own_redis.url, namespace=namespace, sinks=("hub", "clearml"))
    Dispatcher(client, settings).run(burst=True)
    grew = client.info("memory")["used_memory"] - before
    assert grew < 1 << 20, f"one entry made Redis allocate {grew / (1 << 20):.0f} MiB"
    reasons = [f[b"reason"].decode() for _, f in client.xrange(keys.dead_letters)]
    assert len(reasons) == 4 and all(f"seq {MAX_SEQ} of run" in r and "past the last seq" in r for r in reasons)
    assert sorted(client.hkeys(keys.pending("hub", "big", "metrics"))) == [b"0", b"2"]
    assert client.zrange(keys.ahead("hub", "big"), 0, -1) == [b"3"], "what arrived early, and only that"


def test_a_consumer_group_nobody_feeds_stops_holding_the_stream_back_and_can_be_dropped(
    redis_url, namespace, hub, spool_dir, client, keys
):
    both = Pipeline(redis_url, namespace, hub, spool_dir, TRAINBUS_SINKS="hub,clearml")
    hub_only = Pipeline(redis_url, namespace, hub, spool_dir, TRAINBUS_SINKS="hub", TRAINBUS_GROUP_ABANDON_H=2 / 3600)
    try:
        for seq in range(3):
            client.xadd(keys.events, {"event": encode_event("g", seq, 1.0, "val_start", {})})
        first = both.dispatcher()
        wait_for(lambda: {g["name"] for g in client.xinfo_groups(keys.events)} == {b"hub", b"clearml"}, timeout=30)
        both.kill(first)  # TRAINBUS_SINKS changes from hub,clearml to hub
        hub_only.dispatcher("--trim-every", "0.5")
        for seq in range(3, 200):
            client.xadd(keys.events, {"event": encode_event("g", seq, 1.0, "val_start", {})})
        wait_for(lambda: client.xlen(keys.events) == 0, timeout=60)  # trimmed without the abandoned group
        status = json.loads(hub_only.cli("status", "--json").stdout)
        assert status["stream"]["groups"]["clearml"]["abandoned"] is True
        assert status["stream"]["groups"]["hub"]["abandoned"] is False
        logs = b"".join(p.read_bytes() for p in spool_dir.glob("proc-*.log"))
        assert b"consumer group clearml: no dispatcher has fed it" in logs, "said out loud"
        refused = hub_only.cli("groups", "drop", "hub")
        assert refused.returncode == 2 and "is in TRAINBUS_SINKS" in refused.stderr
        dropped = hub_only.cli("groups", "drop", "clearml")
        assert dropped.returncode == 0, dropped.stderr
        assert {g["name"] for g in client.xinfo_groups(keys.events)} == {b"hub"}
    finally:
        both.stop()
        hub_only.stop()
