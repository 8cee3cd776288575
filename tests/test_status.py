"""`trainbus status --json` on a pipeline with a known backlog."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from producers import Publisher

ROOT = Path(__file__).resolve().parents[1]


def status(redis_url: str, namespace: str, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, TRAINBUS_REDIS_URL=redis_url, TRAINBUS_NAMESPACE=namespace, TRAINBUS_SINKS="hub,clearml")
    return subprocess.run(
        [sys.executable, "-m", "workers.ops.cli", *extra], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
    )


def test_status_reports_lag_pending_work_queues_and_dead_letters(redis_url, namespace, spool_dir, client, keys):
    with Publisher(
        redis_url=redis_url, namespace=namespace, spool_dir=spool_dir, run_id="backlog", hub_model="M" * 20
    ) as bus:
        for epoch in range(7):
            bus.metrics(epoch, {"loss": epoch})
    client.xadd(keys.events, {"event": b"not json"})
    before = json.loads(status(redis_url, namespace, "status", "--json").stdout)
    assert before["stream"]["length"] == 10  # session, 7 metrics, run_end, the bad entry
    assert before["stream"]["groups"] == {}, "no dispatcher has read anything yet"

    assert status(redis_url, namespace, "dispatch", "--burst").returncode == 0  # no workers running
    after = json.loads(status(redis_url, namespace, "status", "--json").stdout)
    assert after["dead_letters"] == 2, "the bad entry, once per sink"
    for group in ("hub", "clearml"):
        assert after["stream"]["groups"][group]["lag"] == 0
        assert after["stream"]["groups"][group]["pending"] == 0
    assert after["queues"]["hub"] == {"name": f"{namespace}.hub-uploads", "queued": 1, "failed": 0}
    assert after["queues"]["clearml"]["queued"] == 1
    run = after["runs"]["hub"]["backlog"]
    assert run["pending"] == {"metrics": 7}
    assert run["ended"] == "completed" and run["producer_alive"] is False
    assert after["runs"]["clearml"]["backlog"]["pending"]["events"] == 9
    text = status(redis_url, namespace, "status").stdout
    assert "run backlog" in text and "2 dead letters" in text
