"""The HUB path end to end: producer -> Redis -> dispatcher -> RQ workers -> local HUB server.

Everything runs as real processes (dispatcher, `rq worker`, HUB server) against a real
Redis, with fast rate limits (metrics 0.2 s, checkpoints 1 s, heartbeats 0.5 s).
"""

from __future__ import annotations

import hashlib
import time

import pytest

from producers import Publisher
from tests.conftest import stream_events
from tests.helpers import wait_for
from tests.pipeline import MODEL_ID, HubServer, Pipeline, gaps, metrics_by_epoch, train

JITTER_S = 0.03  # server-side arrival times wobble a little around the client's send times


@pytest.fixture
def hub():
    server = HubServer(MODEL_ID)
    yield server
    server.stop()


@pytest.fixture
def pipeline(redis_url, namespace, hub, spool_dir):
    p = Pipeline(redis_url, namespace, hub, spool_dir)
    yield p
    p.stop()


def publisher(pipeline, spool_dir, run_id, model=MODEL_ID) -> Publisher:
    return Publisher(
        redis_url=pipeline.redis_url, namespace=pipeline.namespace, spool_dir=spool_dir, run_id=run_id, hub_model=model
    )


def final_uploads(hub, model):
    return [r for r in hub.requests("upload") if r["model"] == model and r["fields"]["type"] == "final"]


def test_a_20_epoch_run_reaches_hub_once_in_order_within_rate_limits(pipeline, hub, spool_dir, client, keys, tmp_path):
    pipeline.dispatcher()
    pipeline.worker()
    with publisher(pipeline, spool_dir, "run20") as bus:
        sent = train(bus, tmp_path / "run20", epochs=20)
    wait_for(lambda: final_uploads(hub, MODEL_ID), timeout=60)
    ended = hub.requests()[-1]["ts"]
    time.sleep(1.5)  # heartbeats would show up within 0.5 s if they had not stopped

    got = metrics_by_epoch(hub, MODEL_ID)
    assert sorted(got) == list(range(20))
    assert all(values == [sent[e]] for e, values in got.items()), "each epoch exactly once, as sent"
    metric_times = [r["ts"] for r in hub.requests("metrics")]
    assert len(metric_times) < 20, "pending epochs are coalesced into fewer requests"
    assert min(gaps(metric_times)) >= 0.2 - JITTER_S

    requests = [r for r in hub.requests() if r["model"] == MODEL_ID]
    assert requests[-1]["endpoint"] == "upload" and requests[-1]["fields"]["type"] == "final"
    assert all(r["ts"] <= ended for r in hub.requests()), "nothing (no heartbeat) after the final"
    final = requests[-1]
    assert final["fields"] == {"epoch": "19", "type": "final", "map": "0.19"}
    assert list(final["files"]) == ["best.pt|best.pt"]

    snapshots = {
        e["payload"]["checkpoint"]["sha256"]: e["payload"]["epoch"]
        for e in stream_events(client, keys)
        if e["type"] == "checkpoint"
    }
    uploads = [r for r in requests if r["endpoint"] == "upload" and r["fields"]["type"] == "epoch"]
    assert uploads, "at least the first checkpoint goes out at once"
    for r in uploads:
        sha = r["files"]["last.pt|last.pt"]["sha256"]
        assert snapshots[sha] == int(r["fields"]["epoch"]), "the file is the snapshot of its epoch"
        assert r["fields"]["isBest"] == "True"
    assert min(gaps([r["ts"] for r in uploads]), default=1.0) >= 1.0 - JITTER_S
    best = (tmp_path / "run20" / "weights" / "best.pt").read_bytes()
    assert final["files"]["best.pt|best.pt"]["sha256"] == hashlib.sha256(best).hexdigest()

    beats = [r for r in hub.requests("heartbeat") if r["model"] == MODEL_ID]
    assert beats and beats[0]["json"]["agentId"] is None
    assert all(b["json"]["agentId"] == beats[1]["json"]["agentId"] is not None for b in beats[1:])
    state = {k.decode(): v.decode() for k, v in client.hgetall(keys.state("hub", "run20")).items()}
    assert int(state["metrics_epochs"]) == 20
    assert int(state["ckpt_uploads"]) + int(state.get("ckpt_superseded", 0)) == 20
