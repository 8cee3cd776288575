"""`trainbus metrics`: Prometheus text with the counters every process kept in Redis."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import requests

from tests.helpers import wait_for
from workers.counters import Counters
from workers.devstack.embedded_redis import free_port

ROOT = Path(__file__).resolve().parents[1]


def test_metrics_endpoint_serves_counters_latency_and_lag(redis_url, namespace, client, keys):
    counters = Counters(client, keys)
    counters.dispatched("hub", 7)
    counters.upload("hub", "metrics", "ok", 3)
    counters.upload("hub", "metrics", "retry")
    counters.rate_limited("hub")
    counters.latency("hub", "metrics", 0.3)
    counters.latency("hub", "metrics", 4.0)
    client.xadd(keys.events, {"event": b"{}"})
    client.xgroup_create(keys.events, "hub", id="0")
    port = free_port()
    env = dict(os.environ, TRAINBUS_REDIS_URL=redis_url, TRAINBUS_NAMESPACE=namespace, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-m", "workers.ops.cli", "metrics", "--port", str(port), "--host", "127.0.0.1"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
    )
    try:
        text = wait_for(lambda: _get(f"http://127.0.0.1:{port}/metrics"), timeout=30)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert 'trainbus_events_dispatched_total{sink="hub"} 7.0' in text
    assert 'trainbus_uploads_total{kind="metrics",outcome="ok",sink="hub"} 3.0' in text
    assert 'trainbus_uploads_total{kind="metrics",outcome="retry",sink="hub"} 1.0' in text
    assert 'trainbus_rate_limit_waits_total{sink="hub"} 1.0' in text
    assert 'trainbus_hook_to_upload_seconds_bucket{kind="metrics",le="0.5",sink="hub"} 1.0' in text
    assert 'trainbus_hook_to_upload_seconds_count{kind="metrics",sink="hub"} 2.0' in text
    assert 'trainbus_stream_lag{group="hub"} 1.0' in text
    assert "trainbus_stream_length 1.0" in text


def _get(url: str) -> str | None:
    try:
        return requests.get(url, timeout=2).text
    except requests.ConnectionError:
        time.sleep(0.1)
        return None
