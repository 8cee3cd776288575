"""Publisher against a real Redis: order, envelope, Redis outages, bounded exit, secrets."""

from __future__ import annotations

import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from producers import Publisher, SpoolBusy
from shared.keys import Keys
from tests.conftest import stream_events
from tests.helpers import wait_for

UNREACHABLE = "redis://127.0.0.1:1/0"


def publisher(redis_url, namespace, spool_dir, **kw) -> Publisher:
    return Publisher(redis_url=redis_url, namespace=namespace, spool_dir=spool_dir, **kw)


def test_events_arrive_once_in_order_with_envelope(redis_url, namespace, spool_dir, client, keys, tmp_path):
    ckpt = tmp_path / "last.pt"
    ckpt.write_bytes(b"weights")
    with publisher(redis_url, namespace, spool_dir, run_id="run-a") as bus:
        bus.session({"epochs": 3}, name="exp")
        for epoch in range(3):
            bus.metrics(epoch, {"train/loss": 1.0 / (epoch + 1), "val/mAP": math.nan})
            bus.checkpoint(ckpt, epoch)
        bus.final(ckpt, 2, {"val/mAP": 0.5}, map50_95=0.5)
    events = stream_events(client, keys)
    assert [e["seq"] for e in events] == list(range(len(events)))
    assert [e["type"] for e in events] == (["session"] + ["fit_epoch", "checkpoint"] * 3 + ["final", "run_end"])
    for e in events:
        assert e["schema"] == 1 and e["run_id"] == "run-a" and e["ts"] > 0
    assert events[1]["nulls"] == ["metrics.val/mAP"]
    assert events[-1]["payload"] == {"status": "completed", "error": None}
    wait_for(lambda: not list((spool_dir / "run-a").glob("*.log")), timeout=10)  # a delivered run leaves no segments


def test_redis_down_for_the_whole_run_then_drained_by_the_detached_drainer(own_redis, namespace, spool_dir):
    bus = publisher(own_redis.url, namespace, spool_dir, run_id="offline", exit_flush_s=0.3)
    accepted = [bus.metrics(i, {"loss": i}) for i in range(300)]
    started = time.monotonic()
    assert bus.close() is False, "nothing can be flushed while Redis is down"
    assert time.monotonic() - started < 2.0, "exit flush is bounded by TRAINBUS_EXIT_FLUSH_S"
    assert None not in accepted
    own_redis.start()
    client = redis.Redis.from_url(own_redis.url)
    keys = Keys(namespace)
    wait_for(lambda: len(stream_events(client, keys)) == 302, timeout=60)  # session, 300 metrics, run_end
    events = stream_events(client, keys)
    assert [e["seq"] for e in events] == list(range(302))
    wait_for(lambda: not list((spool_dir / "offline").glob("*.log")), timeout=10)


def test_redis_outage_mid_run_is_survived_in_process(own_redis, namespace, spool_dir, tmp_path):
    own_redis.extra = ("--appendonly", "yes")
    own_redis.start()
    bus = publisher(own_redis.url, namespace, spool_dir, run_id="flaky")
    client = redis.Redis.from_url(own_redis.url)
    keys = Keys(namespace)
    for i in range(50):
        bus.metrics(i, {"loss": i})
    wait_for(lambda: len(stream_events(client, keys)) == 51)  # the session first
    own_redis.stop()
    for i in range(50, 120):
        assert bus.metrics(i, {"loss": i}) is not None
    own_redis.start()
    for i in range(120, 150):
        bus.metrics(i, {"loss": i})
    assert bus.close() is True
    epochs = [e["payload"]["epoch"] for e in stream_events(client, keys) if e["type"] == "fit_epoch"]
    assert epochs == list(range(150))


def test_a_full_redis_refuses_events_they_wait_in_the_spool(own_redis, namespace, spool_dir):
    own_redis.start()
    client = redis.Redis.from_url(own_redis.url)
    client.set("ballast", b"x" * (2 << 20))
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", "1mb")  # now over the limit: every write is refused
    with pytest.raises(redis.OutOfMemoryError):
        client.set("probe", 1)
    bus = publisher(own_redis.url, namespace, spool_dir, run_id="full")
    accepted = [bus.metrics(i, {"loss": i}) for i in range(50)]
    assert all(seq is not None for seq in accepted), "hooks accept while Redis refuses"
    said = "Redis cannot take events (command not allowed when used memory"
    wait_for(lambda: said in (spool_dir / "drain.log").read_text(), timeout=10)  # the delivery process's log
    assert client.xlen(Keys(namespace).events) == 0
    client.config_set("maxmemory", "0")  # the operator gives Redis room
    bus.close(timeout=30)  # Redis was known full: the delivery process delivers it
    wait_for(lambda: client.xlen(Keys(namespace).events) == 52, timeout=30)
    seqs = [e["seq"] for e in stream_events(client, Keys(namespace))]
    assert seqs == list(range(52)), "the session, every metrics event and the run_end, once, in order"
    if bus.delivery is not None:
        bus.delivery.wait(timeout=30)


def test_close_is_bounded_when_redis_is_unreachable(namespace, spool_dir):
    bus = publisher(UNREACHABLE, namespace, spool_dir, exit_flush_s=0.5)
    bus.metrics(0, {"loss": 1})
    started = time.monotonic()
    assert bus.close() is False
    assert time.monotonic() - started < 1.5
    assert bus.delivery is not None and bus.delivery.poll() is None, "a drainer keeps trying"
    bus.delivery.kill()


def test_close_hands_over_at_once_when_redis_is_known_down(namespace, spool_dir):
    bus = publisher(UNREACHABLE, namespace, spool_dir, exit_flush_s=30)
    bus.metrics(0, {"loss": 1})
    wait_for(lambda: bus._control.redis_down, timeout=5)
    started = time.monotonic()
    assert bus.close() is False
    assert time.monotonic() - started < 1.0, "not the 30 s exit flush"
    assert bus.delivery is not None
    bus.delivery.kill()


CTRL_C_DURING_CLOSE = """
import os, signal, sys, threading, time
from producers import Publisher
url, ns, spool, redis_pid = sys.argv[1:5]
bus = Publisher(redis_url=url, namespace=ns, spool_dir=spool, run_id="ctrl-c", exit_flush_s=30)
bus.metrics(0, {"loss": 1})
while bus._control.pushed < 1:  # pushed: Redis is up as far as the delivery process knows
    time.sleep(0.01)
os.kill(int(redis_pid), signal.SIGSTOP)  # now it hangs: the next push waits for its socket timeout
bus.metrics(1, {"loss": 1})
threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()
try:
    bus.close()  # waits up to 30 s for the push
except KeyboardInterrupt:
    print("interrupted", "drainer" if bus.delivery else "no drainer", flush=True)
    bus.delivery.kill()
    os.kill(int(redis_pid), signal.SIGCONT)
    Publisher(redis_url=url, namespace=ns, spool_dir=spool, run_id="ctrl-c").close(0)
    print("reopened", flush=True)
"""


def test_ctrl_c_during_the_exit_flush_still_hands_over(own_redis, namespace, spool_dir):
    """Ctrl-C while close() waits for Redis: the threads stop, a drainer takes the rest, the run can reopen."""
    own_redis.start()
    try:
        args = [own_redis.url, namespace, str(spool_dir), str(own_redis.proc.pid)]
        out = subprocess.run(
            [sys.executable, "-c", CTRL_C_DURING_CLOSE, *args],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=Path(__file__).resolve().parents[1],
        )
    finally:
        os.kill(own_redis.proc.pid, signal.SIGCONT)
    assert "interrupted drainer" in out.stdout and "reopened" in out.stdout, out.stderr


def test_restarted_run_continues_its_sequence(redis_url, namespace, spool_dir, client, keys):
    with publisher(redis_url, namespace, spool_dir, run_id="again") as bus:
        bus.metrics(0, {"loss": 1})
    with publisher(redis_url, namespace, spool_dir, run_id="again") as bus:
        bus.metrics(1, {"loss": 1})
    events = stream_events(client, keys)
    assert [e["seq"] for e in events] == [0, 1, 2, 3, 4, 5]
    assert [e["type"] for e in events] == ["session", "fit_epoch", "run_end"] * 2


def test_a_second_live_writer_of_the_same_run_is_refused(redis_url, namespace, spool_dir):
    with (
        publisher(redis_url, namespace, spool_dir, run_id="mine"),
        pytest.raises(SpoolBusy, match="another process is writing run 'mine'"),
    ):
        publisher(redis_url, namespace, spool_dir, run_id="mine")


def test_liveness_key_lives_while_the_run_does(redis_url, namespace, spool_dir, client, keys):
    bus = publisher(redis_url, namespace, spool_dir, run_id="alive")
    bus.session({})
    wait_for(lambda: client.exists(keys.alive("alive")))
    assert 0 < client.ttl(keys.alive("alive")) <= 30
    bus.end("completed")
    wait_for(lambda: not client.exists(keys.alive("alive")))
    bus.close()


def test_secrets_never_reach_redis(redis_url, namespace, spool_dir, client, monkeypatch):
    hub_key, clearml_secret = "A" * 42, "clearml-secret-value-123"
    monkeypatch.setenv("TRAINBUS_HUB_API_KEY", hub_key)
    monkeypatch.setenv("CLEARML_API_SECRET_KEY", clearml_secret)
    with publisher(redis_url, namespace, spool_dir, hub_model=f"{'B' * 42}_{'m' * 20}") as bus:
        bus.session(
            {
                "model": f"https://hub.ultralytics.com/models/{'m' * 20}?api_key={'C' * 42}",
                "note": f"key={hub_key} secret={clearml_secret}",
            }
        )
        bus.metrics(0, {"k": "B" * 42})
    dump = b"".join(client.dump(k) or b"" for k in client.scan_iter(match=f"{namespace}:*"))
    dump += b"".join(f[b"event"] for _, f in client.xrange(f"{namespace}:events"))
    for secret in (hub_key, clearml_secret, "B" * 42, "C" * 42):
        assert secret.encode() not in dump
    session = stream_events(client, Keys(namespace))[0]
    assert session["payload"]["hub_model_id"] == "m" * 20
    assert session["payload"]["args"]["model"] == "m" * 20


def test_bad_calls_never_raise_into_training(redis_url, namespace, spool_dir, caplog, client, keys):
    with publisher(redis_url, namespace, spool_dir) as bus, caplog.at_level(logging.ERROR):
        assert bus.publish("no-such-type", {}) is None
        assert bus.metrics(0, {"huge": "x" * (2 << 20)}) is not None
        assert bus.checkpoint("/does/not/exist.pt", 0) is not None
    events = stream_events(client, keys)[1:]  # after the session
    assert events[0]["payload"]["truncated"] is True and events[0]["payload"]["keys"] == ["epoch", "metrics"]
    assert "cannot stat" in events[1]["payload"]["checkpoint"]["error"]


def test_full_spool_drops_metrics_keeps_the_rest_and_reports(own_redis, namespace, spool_dir, tmp_path):
    ckpt = tmp_path / "last.pt"
    ckpt.write_bytes(b"w")
    bus = publisher(own_redis.url, namespace, spool_dir, run_id="full", spool_max_mb=0.02)
    results = [bus.metrics(i, {"loss": i, "pad": "x" * 200}) for i in range(200)]
    dropped = results.count(None)
    assert 0 < dropped < 200
    assert bus.checkpoint(ckpt, 1) is not None, "checkpoints are kept past the limit"
    own_redis.start()
    client = redis.Redis.from_url(own_redis.url)
    keys = Keys(namespace)
    wait_for(lambda: len(stream_events(client, keys)) == 1 + 200 - dropped + 1)  # session, metrics, checkpoint
    bus.metrics(200, {"loss": 200})
    bus.close()
    events = stream_events(client, keys)
    overflow = [e for e in events if e["type"] == "spool_overflow"]
    assert overflow and overflow[0]["payload"]["dropped"] == {"fit_epoch": dropped}
    assert [e["seq"] for e in events] == list(range(len(events)))


def test_an_uncaught_exception_ends_the_run_as_failed(redis_url, namespace, spool_dir, client, keys, tmp_path):
    script = tmp_path / "train.py"
    script.write_text(
        "from producers import Publisher\n"
        f"bus = Publisher(run_id='crash', redis_url={redis_url!r}, namespace={namespace!r},\n"
        f"                spool_dir={str(spool_dir)!r})\n"
        "bus.metrics(0, {'loss': 1.0})\n"
        "raise RuntimeError('boom in training')\n"
    )
    out = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])),
    )
    assert out.returncode == 1 and "boom in training" in out.stderr
    end = stream_events(client, keys)[-1]
    assert end["type"] == "run_end"
    assert end["payload"] == {"status": "failed", "error": "RuntimeError('boom in training')"}


def test_the_next_segment_is_made_ahead_and_a_rotation_only_renames_it(own_redis, namespace, spool_dir):
    """The first write into a fresh segment costs a millisecond or more (ext4): the delivery process
    makes the next one ahead, so the hook's rotation is a rename. None is left behind."""
    from producers.spool import SPARE_NAME

    run_dir = spool_dir / "ahead"
    run_dir.mkdir(parents=True)
    (run_dir / SPARE_NAME).write_bytes(b"left by a writer killed before it used it")
    stale = (run_dir / SPARE_NAME).stat().st_ino
    bus = publisher(own_redis.url, namespace, spool_dir, run_id="ahead", exit_flush_s=0.2)  # Redis not started
    spare = wait_for(lambda: (p := run_dir / SPARE_NAME).exists() and p.stat().st_size == 4 << 20 and p.stat())
    assert spare.st_ino != stale or spare.st_size != len(b"left by a writer killed before it used it")
    payload = {"blob": "x" * 2000}
    seq = 0
    while len(list(run_dir.glob("*.log"))) < 2:
        bus.publish("media", payload)
        seq += 1
    second = sorted(run_dir.glob("*.log"))[1]
    assert second.stat().st_ino == spare.st_ino, "the rotation took the segment made ahead"
    wait_for(lambda: (run_dir / SPARE_NAME).exists() and (run_dir / SPARE_NAME).stat().st_ino != spare.st_ino)
    assert bus.close() is False
    wait_for(lambda: not (run_dir / SPARE_NAME).exists())  # the unused one goes once the writer is gone
    if bus.delivery is not None:
        bus.delivery.kill()
        bus.delivery.wait()
    own_redis.start()
    client = redis.Redis.from_url(own_redis.url)
    keys = Keys(namespace)
    total = seq + 2  # the session, every media event, the run's end
    subprocess.run(
        [sys.executable, "-m", "workers.ops.cli", "spool", "replay", "ahead"],
        check=True,
        timeout=60,
        env={
            **os.environ,
            "TRAINBUS_REDIS_URL": own_redis.url,
            "TRAINBUS_NAMESPACE": namespace,
            "TRAINBUS_SPOOL_DIR": str(spool_dir),
        },
        capture_output=True,
    )
    events = wait_for(lambda: (e := stream_events(client, keys)) and len(e) >= total and e, timeout=60)
    assert [e["seq"] for e in events] == list(range(total)), "every event once, in order, across segments"
