"""The Platform path end to end: producer -> Redis -> dispatcher -> `rq worker platform` -> a local
server speaking the Ultralytics Platform's protocol, with its per-key limits and faults.

Real processes throughout (dispatchers, workers, the server); the server's log is what the
Platform received, in arrival order.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import time
from pathlib import Path

import pytest
import torch

from producers import Publisher
from shared.events import encode_event
from tests.helpers import wait_for
from tests.pipeline import PLATFORM_KEY, PLATFORM_PROJECT, Pipeline, PlatformServer

RATE_CKPT = 1.0


def platform_pipeline(redis_url, namespace, spool_dir, platform, **env) -> Pipeline:
    return Pipeline(
        redis_url,
        namespace,
        None,
        spool_dir,
        TRAINBUS_SINKS="platform",
        **{"TRAINBUS_RATE_CKPT": RATE_CKPT, "TRAINBUS_PLATFORM_TIMEOUT_S": 2, **platform.env(), **env},
    )


@pytest.fixture
def pipeline(redis_url, namespace, spool_dir, platform):
    p = platform_pipeline(redis_url, namespace, spool_dir, platform)
    yield p
    p.stop()


def publisher(p: Pipeline, spool_dir: Path, run_id: str, **kw) -> Publisher:
    return Publisher(redis_url=p.redis_url, namespace=p.namespace, spool_dir=spool_dir, run_id=run_id, **kw)


def train(bus: Publisher, workdir: Path, epochs: int, *, pause: float = 0.05, final: bool = True) -> dict[int, dict]:
    """What the Ultralytics callbacks publish, reduced: session, epochs (and the final validation), best
    checkpoints, the final with its summary."""
    weights = workdir / "weights"
    weights.mkdir(parents=True, exist_ok=True)
    best = weights / "best.pt"
    sent = {}
    bus.session({"epochs": epochs, "imgsz": 64, "batch": 2, "device": None}, name=workdir.name, device="cpu")
    for epoch in range(epochs + 1):  # the last one is the final validation (epoch = epochs)
        sent[epoch] = {"train/box_loss": 1.0 / (epoch + 1), "metrics/mAP50-95(B)": epoch / 100}
        extra = {"model_info": {"model/parameters": 3000, "model/GFLOPs": 8.2}} if epoch == 0 else {}
        bus.metrics(
            epoch,
            sent[epoch],
            final_eval=epoch == epochs,
            fitness=epoch / 10,
            best_fitness=epoch / 10,
            lr=0.01,
            **extra,
        )
        if epoch < epochs:
            torch.save({"epoch": epoch, "w": torch.full((64,), float(epoch))}, best)
            bus.checkpoint(best, epoch, is_best=True)
        time.sleep(pause)
    if final:
        summary = {
            "metrics": {"metrics/mAP50-95(B)": 0.3, "fitness": 0.3},
            "best_epoch": epochs - 1,
            "best_fitness": 0.3,
            "class_names": ["square"],
            "plots": [{"type": "pr_curve", "x": [0, 1], "y": [1, 0]}],
        }
        bus.final(best, epochs - 1, sent[epochs], map50_95=0.3, summary=summary)
    return sent


def model_named(platform: PlatformServer, name: str) -> dict | None:
    return next((m for m in platform.models() if m["slug"] == name), None)


def completed(platform: PlatformServer, name: str) -> dict | None:
    model = model_named(platform, name)
    return model if model and model["runs"] and model["runs"][-1]["end"] else None


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


def test_a_run_reaches_the_platform_once_in_order_and_its_final_last(pipeline, platform, spool_dir, tmp_path):
    pipeline.dispatcher()
    pipeline.worker("platform")
    with publisher(pipeline, spool_dir, "plat1") as bus:
        sent = train(bus, tmp_path / "exp1", epochs=5)
    model = wait_for(lambda: completed(platform, "exp1"), timeout=60)
    assert model["project"] == PLATFORM_PROJECT and len(model["runs"]) == 1
    run = model["runs"][0]
    started = run["started"]
    assert started["trainArgs"]["imgsz"] == "64" and started["trainArgs"]["device"] == "None", "every arg a string"
    assert started["epochs"] == 5 and started["device"] == "cpu"
    assert started["environment"]["trainbusRunId"] == "plat1"
    epochs = run["epochs"]
    assert [e["epoch"] for e in epochs] == list(range(6)), "every epoch once, in order, the final validation's too"
    for e in epochs:
        assert e["metrics"] == {**sent[e["epoch"]], "lr": 0.01}
        assert e["fitness"] == e["best_fitness"] == e["epoch"] / 10
    assert epochs[0]["modelInfo"] == {"parameters": 3000, "gflops": 8.2, "speedMs": 0}
    assert all("modelInfo" not in e for e in epochs[1:])
    best = hashlib.sha256((tmp_path / "exp1" / "weights" / "best.pt").read_bytes()).hexdigest()
    assert run["checkpoints"] and run["checkpoints"][-1]["sha256"] == best, "the final is the last best.pt"
    end = run["end"]
    assert end["event"] == "training_complete" and end["runId"] == run["runId"]
    assert end["results"]["modelPath"] == run["checkpoints"][-1]["modelPath"]
    assert end["results"]["bestEpoch"] == 4 and end["classNames"] == ["square"] and end["plots"]
    received = [r for r in platform.requests() if r["status"] == 200]
    assert received[-1]["endpoint"] == "metrics" and received[-1]["event"] == "training_complete", "nothing after it"
    puts = platform.requests("put")
    assert puts and all(p["authorization"] is None for p in puts), "the signed PUT carries no API key"
    periodic = [r["ts"] for r in platform.requests("upload_url")][:-1]
    assert min(gaps(periodic), default=RATE_CKPT) >= RATE_CKPT - 0.1, "checkpoints at most one per TRAINBUS_RATE_CKPT"


def test_the_final_is_not_held_back_by_the_checkpoint_rate(
    redis_url, namespace, spool_dir, platform, client, keys, tmp_path
):
    """A periodic checkpoint still waiting for its slot (TRAINBUS_RATE_CKPT, 15 min by default) when the
    run ends is superseded by the final's best.pt, as Ultralytics' callback never sends it either."""
    p = platform_pipeline(redis_url, namespace, spool_dir, platform, TRAINBUS_RATE_CKPT=600)
    try:
        p.dispatcher()
        p.worker("platform")
        best = tmp_path / "exp-rate" / "weights" / "best.pt"
        best.parent.mkdir(parents=True)
        with publisher(p, spool_dir, "plat-rate") as bus:
            bus.session({"epochs": 2}, name="exp-rate", device="cpu")
            for epoch in range(2):
                bus.metrics(epoch, {"loss": 1.0 / (epoch + 1)})
                torch.save({"epoch": epoch}, best)
                bus.checkpoint(best, epoch, is_best=True)
                # epoch 0's checkpoint took the slot: epoch 1's waits for it
                wait_for(lambda: (m := model_named(platform, "exp-rate")) and m["runs"][0]["checkpoints"], timeout=30)
            bus.final(best, 1, {"loss": 0.5})
        model = wait_for(lambda: completed(platform, "exp-rate"), timeout=30)
        checkpoints = model["runs"][0]["checkpoints"]
        assert [c["sha256"] for c in checkpoints][-1] == hashlib.sha256(best.read_bytes()).hexdigest()
        assert len(checkpoints) == 2, "epoch 0's, then the final; epoch 1's waiting one was superseded"
        state = client.hgetall(keys.state("platform", "plat-rate"))
        assert state[b"ckpt_uploads"] == b"1" and state[b"ckpt_superseded"] == b"1"
    finally:
        p.stop()


def test_platform_faults_are_retried_and_a_429_holds_every_request_of_the_key(pipeline, platform, spool_dir, tmp_path):
    # spread over the endpoints: failures of one kind in a row back off exponentially (1, 2, 4 s ...)
    platform.fault(endpoint="metrics", status=503, count=2)
    platform.fault(endpoint="metrics", hang=4, count=1)  # past TRAINBUS_PLATFORM_TIMEOUT_S=2
    platform.fault(endpoint="upload_url", status=429, retry_after=2, count=1)
    platform.fault(endpoint="put", reset=True, count=1)
    platform.fault(endpoint="upload_url", truncate=True, count=1)
    pipeline.dispatcher()
    pipeline.worker("platform")
    with publisher(pipeline, spool_dir, "faulty") as bus:
        train(bus, tmp_path / "faulty", epochs=4)
    model = wait_for(lambda: completed(platform, "faulty"), timeout=90)
    epochs = [e["epoch"] for e in model["runs"][-1]["epochs"]]
    assert sorted(set(epochs)) == list(range(5)), "every epoch arrived"
    everything = platform.requests()
    assert [r["status"] for r in everything].count(503) == 2
    throttled = next(r for r in everything if r["status"] == 429)
    after = [r for r in everything if r["ts"] > throttled["ts"]]
    assert after and min(r["ts"] for r in after) - throttled["ts"] >= 2.0 - 0.1, "Retry-After: 2 held the whole key"
    assert {"reset", "truncated"} <= {r["status"] for r in everything}
    assert len(platform.models()) == 1


def test_a_403_on_the_put_asks_for_a_new_url(pipeline, platform, spool_dir, tmp_path):
    platform.control("put403", count=1)
    pipeline.dispatcher()
    pipeline.worker("platform")
    with publisher(pipeline, spool_dir, "expired") as bus:
        train(bus, tmp_path / "expired", epochs=1)
    model = wait_for(lambda: completed(platform, "expired"), timeout=60)
    puts = platform.requests("put")
    assert [p["status"] for p in puts][:2] == [403, 200], "refused, then a new URL that worked"
    assert model["runs"][-1]["checkpoints"], "and the checkpoint was promoted"


@pytest.mark.parametrize("workers", [3])
def test_racing_workers_on_runs_of_one_key_never_exceed_its_limit(redis_url, namespace, spool_dir, workers, tmp_path):
    """Three runs, three workers, one key allowed 8 events per 2 s: measured where the requests arrive."""
    server = PlatformServer(PLATFORM_KEY, "--events-per-min", "8", "--window", "2")
    p = platform_pipeline(
        redis_url, namespace, spool_dir, server, TRAINBUS_PLATFORM_EVENTS_PER_MIN=8, TRAINBUS_PLATFORM_WINDOW_S=2
    )
    try:
        p.dispatcher()
        p.dispatcher()
        for _ in range(workers):
            p.worker("platform")
        buses = [publisher(p, spool_dir, f"race{i}") for i in range(3)]
        for i, bus in enumerate(buses):
            train(bus, tmp_path / f"race{i}", epochs=5, pause=0, final=i != 1)
        for bus in buses:
            bus.close()
        for i in (0, 2):
            wait_for(lambda i=i: completed(server, f"race{i}"), timeout=120)
        wait_for(lambda: completed(server, "race1"), timeout=120)  # ended without a final: training_complete
        arrivals = sorted(r["ts"] for r in server.requests() if r["endpoint"] in ("metrics", "models"))
        busiest = max(sum(1 for t in arrivals if start <= t < start + 2.0) for start in arrivals)
        assert busiest <= 8, f"{busiest} event requests of one key arrived within 2 s (limit 8)"
        assert not [r for r in server.requests() if r["status"] == 429], "the limit was kept, not enforced on us"
        for i in range(3):
            model = model_named(server, f"race{i}")
            assert [e["epoch"] for e in model["runs"][-1]["epochs"]] == list(range(6)), "each epoch once"
    finally:
        p.stop()
        server.stop()


def test_a_lost_reply_to_training_started_makes_one_model(pipeline, platform, spool_dir, tmp_path):
    """The server registers the run but the answer comes after the worker gave up: the model is found."""
    platform.fault(endpoint="metrics", hang=4, count=1)  # the first request is training_started
    pipeline.dispatcher()
    pipeline.worker("platform")
    with publisher(pipeline, spool_dir, "lost") as bus:
        train(bus, tmp_path / "lost", epochs=2)
    wait_for(lambda: completed(platform, "lost"), timeout=90)
    assert len(platform.models()) == 1, "one model, not two"
    assert len(platform.requests("models")) >= 1, "looked up before registering again"


def test_a_worker_killed_mid_upload_is_replaced_and_the_run_completes(pipeline, platform, spool_dir, tmp_path):
    platform.fault(endpoint="put", delay=4, count=1)
    pipeline.dispatcher()
    with publisher(pipeline, spool_dir, "killed") as bus:
        train(bus, tmp_path / "killed", epochs=1)
    worker = pipeline.worker("platform")
    wait_for(lambda: [r for r in platform.requests("put") if r["status"] == "pending"], timeout=60)
    pipeline.kill(worker)
    pipeline.worker("platform")
    model = wait_for(lambda: completed(platform, "killed"), timeout=90)
    assert model["runs"][-1]["end"]["event"] == "training_complete"
    assert len([r for r in platform.requests(event="training_complete") if r["status"] == 200]) == 1


def test_a_bad_key_stops_every_run_of_it_clearly_then_recovers_with_requeue(
    redis_url, namespace, spool_dir, platform, tmp_path
):
    p = platform_pipeline(redis_url, namespace, spool_dir, platform, TRAINBUS_PLATFORM_API_KEY="ul_" + "b" * 40)
    try:
        worker = p.worker("platform")
        p.dispatcher()
        for run in ("k1", "k2"):
            with publisher(p, spool_dir, run) as bus:
                train(bus, tmp_path / run, epochs=1)
        failed = wait_for(
            lambda: (out := p.cli("failed")).stdout.count("TRAINBUS_PLATFORM_API_KEY") >= 2 and out, timeout=60
        )
        assert "k1" in failed.stdout and "k2" in failed.stdout
        assert len([r for r in platform.requests() if r["status"] == 401]) == 1, "one 401 blocks the key's runs"
        assert "b" * 40 not in failed.stdout
        p.kill(worker)
        p.env["TRAINBUS_PLATFORM_API_KEY"] = PLATFORM_KEY
        p.worker("platform")
        assert "requeued" in p.cli("failed", "--requeue").stdout
        for run in ("k1", "k2"):
            wait_for(lambda run=run: completed(platform, run), timeout=60)
    finally:
        p.stop()


def test_a_resumed_run_continues_its_model_and_one_whose_model_is_gone_registers_again(
    pipeline, platform, spool_dir, client, keys, tmp_path
):
    pipeline.dispatcher()
    pipeline.worker("platform")
    with publisher(pipeline, spool_dir, "resumed") as bus:
        train(bus, tmp_path / "resumed", epochs=1, final=False)
        bus.end("failed", "CUDA out of memory")
    first = wait_for(lambda: completed(platform, "resumed"), timeout=60)
    assert first["runs"][0]["end"]["event"] == "training_failed"
    assert first["runs"][0]["end"]["error"] == "CUDA out of memory"
    with publisher(pipeline, spool_dir, "resumed") as bus:  # the same run again: a new run of its model
        train(bus, tmp_path / "resumed", epochs=2)
    model = wait_for(
        lambda: (m := model_named(platform, "resumed")) and len(m["runs"]) == 2 and m["runs"][1]["end"] and m,
        timeout=60,
    )
    assert model["id"] == first["id"] and model["runs"][1]["end"]["event"] == "training_complete"
    platform.control("forget", modelId=first["id"])  # deleted in the Platform meanwhile
    with publisher(pipeline, spool_dir, "resumed") as bus:
        train(bus, tmp_path / "resumed", epochs=1)
    wait_for(lambda: any(m["id"] != first["id"] and m["runs"][-1]["end"] for m in platform.models()), timeout=60)
    assert len(platform.models()) == 1, "a new model replaced the gone one"


def test_bad_entries_are_dead_lettered_and_no_key_reaches_redis_or_logs(
    pipeline, platform, spool_dir, client, keys, tmp_path
):
    client.xadd(keys.events, {"event": b"not json"})
    client.xadd(keys.events, {"event": encode_event("x", 0, 1.0, "fit_epoch", {"epoch": "one", "metrics": {}})})
    pipeline.dispatcher()
    pipeline.worker("platform")
    with publisher(pipeline, spool_dir, "clean") as bus:
        train(bus, tmp_path / "clean", epochs=1)
    wait_for(lambda: completed(platform, "clean"), timeout=60)
    reasons = [f[b"reason"].decode() for _, f in client.xrange(keys.dead_letters)]
    assert any(r.startswith("not JSON") for r in reasons) and any("'epoch' must be int" in r for r in reasons)
    secret = PLATFORM_KEY.encode()
    for name in client.scan_iter(match=f"{keys.namespace}:*"):
        assert secret not in name and secret not in (client.dump(name) or b""), name
    for log in spool_dir.glob("proc-*.log"):
        assert secret not in log.read_bytes(), log
    status = json.loads(pipeline.cli("status", "--json", TRAINBUS_SINKS="platform").stdout)
    assert "platform" in status["queues"]


def test_a_model_deleted_mid_run_stops_that_run_with_the_reason(pipeline, platform, spool_dir, client, keys, tmp_path):
    pipeline.dispatcher()
    pipeline.worker("platform")
    bus = publisher(pipeline, spool_dir, "deleted")
    bus.session({"epochs": 3}, name="deleted")
    bus.metrics(0, {"loss": 1.0})
    model = wait_for(lambda: (m := model_named(platform, "deleted")) and m["runs"][0]["epochs"] and m, timeout=60)
    platform.control("forget", modelId=model["id"])
    bus.metrics(1, {"loss": 0.5})
    failed = wait_for(
        lambda: "deleted" in (out := pipeline.cli("failed", TRAINBUS_SINKS="platform")).stdout and out, timeout=60
    )
    assert "does not know this model" in failed.stdout
    assert client.get(keys.blocked("platform", "deleted")), "that run is blocked; others go on"
    bus.close()
