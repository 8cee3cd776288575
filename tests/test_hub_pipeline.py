"""The HUB path end to end: producer -> Redis -> dispatcher -> RQ workers -> local HUB server.

Everything runs as real processes (dispatcher, `rq worker`, HUB server) against a real
Redis, with fast rate limits (metrics 0.2 s, checkpoints 1 s, heartbeats 0.5 s).
"""

from __future__ import annotations

import hashlib
import json
import time
import zlib

import orjson
import pytest
import torch

from producers import Publisher
from tests import pipeline as tests_pipeline
from tests.conftest import stream_events
from tests.helpers import wait_for
from tests.pipeline import MODEL_ID, Pipeline, gaps, metrics_by_epoch, train

JITTER_S = 0.1  # server-side arrival times wobble around the client's send times on a loaded machine
RACE_JITTER_S = 0.25  # ... more with four workers forking horses on two loaded cores (as in the chaos run)


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
    client.xgroup_create(keys.events, "test-keep", id="0", mkstream=True)  # a group that never reads: no trim
    pipeline.dispatcher()
    pipeline.worker()
    pipeline.wait_ready()  # else a cold start can see only the last checkpoint, which the final supersedes
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


@pytest.mark.parametrize("workers", [2, 4])
def test_racing_workers_never_break_a_rate_limit_or_upload_twice(
    redis_url, namespace, hub, spool_dir, workers, tmp_path
):
    """Three runs, four waves of three epochs; each wave waits until HUB has the previous one, so
    every run needs at least four metrics requests, whatever the machine's speed."""
    pipeline = Pipeline(redis_url, namespace, hub, spool_dir, TRAINBUS_RATE_METRICS="1", TRAINBUS_RATE_CKPT="2")
    models = [f"{chr(ord('A') + i)}" * 20 for i in range(3)]
    try:
        for model in models:
            hub.add_model(model)
        pipeline.dispatcher()
        pipeline.dispatcher()
        for _ in range(workers):
            pipeline.worker()
        buses = [publisher(pipeline, spool_dir, f"race{i}", model) for i, model in enumerate(models)]
        sent = [{} for _ in buses]
        for wave in range(4):
            for epoch in range(3 * wave, 3 * wave + 3):  # the three runs interleave, as concurrent trainings would
                for i, bus in enumerate(buses):
                    sent[i].update(train_epoch(bus, tmp_path / f"race{i}", epoch))
            wait_for(lambda w=wave: all(3 * w + 2 in metrics_by_epoch(hub, m) for m in models), timeout=60)
        for i, bus in enumerate(buses):
            bus.final(tmp_path / f"race{i}" / "last.pt", 11, sent[i][11], map50_95=0.5)
            bus.close()
        wait_for(lambda: all(final_uploads(hub, m) for m in models), timeout=90)
        for i, model in enumerate(models):
            got = metrics_by_epoch(hub, model)
            assert got == {e: [sent[i][e]] for e in range(12)}, "every epoch once"
            mine = [r for r in hub.requests() if r["model"] == model]
            metric_times = [r["ts"] for r in mine if r["endpoint"] == "metrics"]
            assert len(metric_times) >= 4, "the limit was actually exercised"
            assert min(gaps(metric_times)) >= 1.0 - RACE_JITTER_S
            uploads = [r for r in mine if r["endpoint"] == "upload"]
            epochs = [(r["fields"]["type"], r["fields"]["epoch"]) for r in uploads]
            assert len(epochs) == len(set(epochs)), f"an upload went out twice: {epochs}"
            periodic = [r["ts"] for r in uploads if r["fields"]["type"] == "epoch"]
            assert min(gaps(periodic), default=2.0) >= 2.0 - RACE_JITTER_S
            assert mine[-1]["endpoint"] == "upload" and mine[-1]["fields"]["type"] == "final"
    finally:
        pipeline.stop()


def train_epoch(bus, workdir, epoch) -> dict[int, dict]:
    workdir.mkdir(parents=True, exist_ok=True)
    metrics = {"train/loss": 1.0 / (epoch + 1), "epoch": epoch}
    bus.metrics(epoch, metrics)
    torch.save({"epoch": epoch}, workdir / "last.pt")
    bus.checkpoint(workdir / "last.pt", epoch)
    return {epoch: metrics}


def test_hub_faults_are_retried_and_retry_after_is_respected(pipeline, hub, spool_dir, tmp_path):
    hub.fault(endpoint="metrics", status=503, count=3)
    hub.fault(endpoint="upload", status=429, retry_after=2, count=1)
    hub.fault(endpoint="heartbeat", hang=4, count=1)  # longer than TRAINBUS_HUB_TIMEOUT_S=2
    hub.fault(endpoint="metrics", reset=True, count=1)
    pipeline.dispatcher()
    pipeline.worker()
    with publisher(pipeline, spool_dir, "faulty") as bus:
        sent = train(bus, tmp_path / "faulty", epochs=8)
    wait_for(lambda: final_uploads(hub, MODEL_ID), timeout=90)
    assert {e: v for e, v in metrics_by_epoch(hub, MODEL_ID).items()} == {e: [sent[e]] for e in range(8)}
    everything = hub.requests(status=None)
    assert [r["status"] for r in everything if r["endpoint"] == "metrics"][:4].count(503) == 3
    throttled = next(r for r in everything if r["status"] == 429)
    after = next(r for r in everything if r["endpoint"] == "upload" and r["ts"] > throttled["ts"])
    assert after["ts"] - throttled["ts"] >= 2.0 - JITTER_S, "Retry-After: 2 respected"
    assert any(r["status"] == "reset" for r in everything)


def test_bad_key_and_unknown_model_fail_clearly_then_recover_with_requeue(pipeline, hub, spool_dir, tmp_path):
    pipeline.env["TRAINBUS_HUB_API_KEY"] = "w" * 42  # wrong key
    worker = pipeline.worker()
    pipeline.dispatcher()
    with publisher(pipeline, spool_dir, "badkey") as bus:
        train(bus, tmp_path / "badkey", epochs=3)
    failed = wait_for(lambda: (out := pipeline.cli("failed")).returncode == 1 and out, timeout=30)
    assert "badkey" in failed.stdout and "check TRAINBUS_HUB_API_KEY" in failed.stdout
    assert len(hub.requests(status=401)) == 1, "a 401 is not retried"
    assert "w" * 42 not in failed.stdout
    pipeline.kill(worker)
    pipeline.env["TRAINBUS_HUB_API_KEY"] = tests_pipeline.API_KEY
    pipeline.worker()
    requeued = pipeline.cli("failed", "--requeue")
    assert "requeued 1 drain job(s)" in requeued.stdout
    wait_for(lambda: final_uploads(hub, MODEL_ID), timeout=60)
    assert sorted(metrics_by_epoch(hub, MODEL_ID)) == [0, 1, 2]

    unknown = "U" * 20
    with publisher(pipeline, spool_dir, "nomodel", unknown) as bus:
        train(bus, tmp_path / "nomodel", epochs=2)
    failed = wait_for(lambda: "nomodel" in (out := pipeline.cli("failed")).stdout and out, timeout=30)
    assert "HUB does not know this model: check TRAINBUS_HUB_MODEL" in failed.stdout
    hub.add_model(unknown)
    pipeline.cli("failed", "--requeue")
    wait_for(lambda: final_uploads(hub, unknown), timeout=60)
    assert pipeline.cli("failed").stdout.strip() == "no failed drain jobs"


def test_a_run_without_a_model_id_gets_a_model_created_from_its_args(pipeline, hub, spool_dir, tmp_path):
    pipeline.dispatcher()
    pipeline.worker()
    bus = Publisher(redis_url=pipeline.redis_url, namespace=pipeline.namespace, spool_dir=spool_dir, run_id="new")
    with bus:
        train(bus, tmp_path / "new", epochs=2)
    create = wait_for(lambda: hub.requests("create"), timeout=30)[0]
    assert create["json"]["config"] == {
        "batchSize": 2,
        "epochs": 2,
        "imageSize": 64,
        "patience": 100,
        "device": "",
        "cache": "ram",
    }
    assert create["json"]["lineage"]["architecture"]["name"] == "yolov8n"
    assert create["json"]["dataset"] == {"name": "coco8.yaml"}
    new_model = wait_for(lambda: [r["model"] for r in hub.requests("metrics")], timeout=30)[0]
    wait_for(lambda: final_uploads(hub, new_model), timeout=30)


def test_torn_checkpoint_is_not_uploaded_and_the_reason_is_dead_lettered(
    pipeline, hub, spool_dir, client, keys, tmp_path
):
    pipeline.dispatcher()
    with publisher(pipeline, spool_dir, "torn") as bus:
        train(bus, tmp_path / "torn", epochs=2)
    snapshots = sorted((spool_dir / "torn" / "checkpoints").glob("*.pt"))
    for snap in snapshots:
        snap.write_bytes(snap.read_bytes()[:-10] + b"0123456789")  # changed after its snapshot
    pipeline.worker()
    dead = wait_for(lambda: client.xrange(keys.dead_letters), timeout=30)
    reasons = [fields[b"reason"].decode() for _, fields in dead]
    assert any("sha256" in r and "not uploaded" in r for r in reasons), reasons
    wait_for(lambda: sorted(metrics_by_epoch(hub, MODEL_ID)) == [0, 1], timeout=30)
    assert not hub.requests("upload"), "no torn file reached HUB"


def test_bad_entries_are_dead_lettered_and_the_rest_is_delivered(pipeline, hub, spool_dir, client, keys, tmp_path):
    for raw in (
        b"not json",
        b'{"schema": 1, "run_id": "x", "seq": 0, "ts": 0, "type": "nope", "payload": {}}',
        b'{"schema": 1, "seq": 3}',
        b'{"schema": 1, "run_id": "x", "pad": "' + b"x" * (10 << 20) + b'"}',
    ):
        client.xadd(keys.events, {"event": raw})
    client.xadd(keys.events, {"other": b"no event field"})
    pipeline.dispatcher()
    pipeline.worker()
    with publisher(pipeline, spool_dir, "good") as bus:
        sent = train(bus, tmp_path / "good", epochs=3)
    wait_for(lambda: final_uploads(hub, MODEL_ID), timeout=60)
    assert metrics_by_epoch(hub, MODEL_ID) == {e: [sent[e]] for e in range(3)}
    reasons = [fields[b"reason"].decode() for _, fields in client.xrange(keys.dead_letters)]
    assert len(reasons) == 5
    assert any(r.startswith("not JSON") for r in reasons)
    assert "unknown event type 'nope'" in reasons
    assert "missing field 'run_id'" in reasons
    assert any("more than the 1048576 allowed" in r for r in reasons)


def test_a_checkpoint_replaced_while_it_uploads_counts_as_uploaded_only(
    redis_url, namespace, hub, spool_dir, client, keys, tmp_path
):
    """The dispatcher records a newer checkpoint while the worker still uploads the older one:
    the older one is counted once, as uploaded (it was counted superseded too: CI saw 1 + 20 for 20)."""
    pipe = Pipeline(redis_url, namespace, hub, spool_dir, TRAINBUS_HUB_TIMEOUT_S="20")
    hub.fault(endpoint="upload", delay=8.0, count=1)  # the first checkpoint's upload takes 8 s
    pending = keys.pending("hub", "inflight", "ckpt")
    try:
        pipe.dispatcher()
        pipe.worker()
        pipe.wait_ready()

        def replace_in_flight(epoch: int) -> None:
            if epoch == 0:
                wait_for(lambda: hub.requests("upload", status="pending"), timeout=30)
            if epoch == 1:
                wait_for(lambda: orjson.loads(client.hget(pending, "data") or b"{}").get("epoch") == 1, timeout=30)
                assert hub.requests("upload", status="pending"), "the premise: recorded while epoch 0 was in flight"

        with publisher(pipe, spool_dir, "inflight") as bus:
            train(bus, tmp_path / "inflight", epochs=2, between=replace_in_flight)
        wait_for(lambda: final_uploads(hub, MODEL_ID), timeout=60)
        state = {
            k.decode(): int(float(v))
            for k, v in client.hgetall(keys.state("hub", "inflight")).items()
            if k.startswith(b"ckpt_")
        }
        epochs_sent = [r["fields"]["epoch"] for r in hub.requests("upload") if r["fields"]["type"] == "epoch"]
        assert epochs_sent[0] == "0" and state["ckpt_uploads"] == len(epochs_sent)
        assert state["ckpt_uploads"] + state.get("ckpt_superseded", 0) == 2
    finally:
        pipe.stop()


def test_worker_killed_mid_upload_is_replaced_and_the_upload_completes_within_60s(pipeline, hub, spool_dir, tmp_path):
    hub.fault(endpoint="upload", delay=3.0, count=1)  # the final upload hangs in the server for 3 s
    pipeline.dispatcher()
    with publisher(pipeline, spool_dir, "killed-worker") as bus:
        train(bus, tmp_path / "kw", epochs=1)
    worker = pipeline.worker()
    wait_for(lambda: hub.requests("metrics"), timeout=30)
    time.sleep(0.8)  # now inside the delayed final upload
    pipeline.kill(worker)  # SIGKILL the worker and its work horse
    killed_at = time.monotonic()
    pipeline.worker()
    wait_for(lambda: [r for r in final_uploads(hub, MODEL_ID) if r["ts"] > time.time() - 60], timeout=60)
    assert time.monotonic() - killed_at < 60


def test_dispatcher_killed_mid_batch_loses_no_entry(pipeline, hub, spool_dir, client, keys, tmp_path):
    with publisher(pipeline, spool_dir, "kd") as bus:
        sent = train(bus, tmp_path / "kd", epochs=40, pause=0)
    first = pipeline.dispatcher()
    wait_for(lambda: client.exists(keys.state("hub", "kd")), timeout=30)
    pipeline.kill(first)
    pipeline.dispatcher()  # claims what the dead one read but never acknowledged (--claim-idle 1)
    pipeline.worker()
    wait_for(lambda: final_uploads(hub, MODEL_ID), timeout=60)
    assert metrics_by_epoch(hub, MODEL_ID) == {e: [sent[e]] for e in range(40)}
    # what the dead one had read is claimed by the new one (after --claim-idle) and acknowledged
    wait_for(lambda: client.xpending(keys.events, "hub")["pending"] == 0, timeout=30)


def test_redis_restarted_mid_run_and_the_run_completes(own_redis, namespace, hub, spool_dir, tmp_path):
    own_redis.extra = ("--appendonly", "yes")
    own_redis.start()
    pipe = Pipeline(own_redis.url, namespace, hub, spool_dir)
    try:
        pipe.dispatcher()
        pipe.worker()
        bus = publisher(pipe, spool_dir, "rr")

        def restart_redis(epoch: int) -> None:
            if epoch == 5:
                own_redis.stop()
            if epoch == 8:
                own_redis.start()

        sent = train(bus, tmp_path / "rr", epochs=12, pause=0.2, between=restart_redis)
        bus.close()
        wait_for(lambda: final_uploads(hub, MODEL_ID), timeout=90)
        assert metrics_by_epoch(hub, MODEL_ID) == {e: [sent[e]] for e in range(12)}
    finally:
        pipe.stop()


def test_no_secret_in_redis_or_logs_and_jobs_are_json(pipeline, hub, spool_dir, client, keys, tmp_path):
    pipeline.dispatcher()
    pipeline.worker()
    with publisher(pipeline, spool_dir, "secret", f"{tests_pipeline.API_KEY}_{MODEL_ID}") as bus:
        train(bus, tmp_path / "secret", epochs=3)
    wait_for(lambda: final_uploads(hub, MODEL_ID), timeout=60)
    key = tests_pipeline.API_KEY.encode()
    queue = keys.queue("hub").encode()
    for name in client.scan_iter(match="*"):  # every key, other tests' too: the key is in none
        kind = client.type(name)
        dumped = client.dump(name) or b""
        assert key not in name and key not in dumped, name
        if name.startswith(b"rq:job:") and kind == b"hash" and client.hget(name, "origin") == queue:
            data = client.hget(name, "data")
            if data:
                json.loads(zlib.decompress(data))  # RQ compresses job data; inside: JSON, not a pickle
    for log in spool_dir.glob("proc-*.log"):
        assert key not in log.read_bytes(), log


def test_a_hub_reply_cut_off_mid_body_is_retried_with_backoff_not_failed(pipeline, hub, spool_dir, tmp_path):
    """Headers, then half a body, then a closed connection: a transport failure like any other."""
    hub.fault(endpoint="metrics", truncate=True, count=2)
    hub.fault(endpoint="upload", truncate=True, count=1)  # every run uploads at least its final
    pipeline.dispatcher()
    pipeline.worker()
    with publisher(pipeline, spool_dir, "cut") as bus:
        sent = train(bus, tmp_path / "cut", epochs=4)
    wait_for(lambda: final_uploads(hub, MODEL_ID), timeout=60)
    assert [r["status"] for r in hub.requests(status=None)].count("truncated") == 3
    got = metrics_by_epoch(hub, MODEL_ID)
    assert sorted(got) == [0, 1, 2, 3] and all(got[e][-1] == sent[e] for e in got), "every epoch arrived"
    assert pipeline.cli("failed").stdout.strip() == "no failed drain jobs", "a cut-off reply is not a failure for good"
    logs = b"".join(p.read_bytes() for p in spool_dir.glob("proc-*.log"))
    assert logs.count(b"outcome=retry") >= 3 and b"ChunkedEncodingError" in logs


def test_a_model_creation_that_got_no_answer_is_said_out_loud_before_the_next(
    pipeline, hub, spool_dir, client, keys, tmp_path
):
    """HUB creates the model but the answer comes after the client's timeout: HUB's protocol cannot
    find a model by run, so the second creation is preceded by a dead letter saying so."""
    hub.fault(endpoint="create", hang=4, count=1)  # past TRAINBUS_HUB_TIMEOUT_S=2
    pipeline.dispatcher()
    pipeline.worker()
    with Publisher(redis_url=pipeline.redis_url, namespace=pipeline.namespace, spool_dir=spool_dir, run_id="x2") as bus:
        train(bus, tmp_path / "x2", epochs=1)
    model = wait_for(lambda: [r["model"] for r in hub.requests("metrics")], timeout=60)[0]
    wait_for(lambda: final_uploads(hub, model), timeout=60)
    assert len(hub.requests("create", status=None)) == 2
    reasons = [f[b"reason"].decode() for _, f in client.xrange(keys.dead_letters)]
    assert any("HUB may hold an extra model" in r for r in reasons), reasons
