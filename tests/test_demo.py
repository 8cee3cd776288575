"""`trainbus demo` end to end in a subprocess: exit code, and its summary against what the
HUB server and the ClearML offline session actually received."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import redis

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--epochs", "3", "--rate-metrics", "0.3", "--rate-ckpt", "1", "--rate-heartbeat", "0.5", "--timeout", "120"]


def demo(tmp_path: Path, redis_url: str, *extra: str) -> tuple[subprocess.CompletedProcess, dict]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRAINBUS_", "CLEARML_", "MLFLOW_"))}
    env.update(TRAINBUS_REDIS_URL=redis_url, PYTHONPATH=str(ROOT))
    summary = tmp_path / "summary.json"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "workers.ops.cli",
            "demo",
            *FAST,
            "--workdir",
            str(tmp_path / "demo"),
            "--summary-json",
            str(summary),
            *extra,
        ],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return out, (json.loads(summary.read_text()) if summary.exists() else {})


def test_the_demo_to_hub_and_clearml_delivers_everything_and_its_summary_is_true(tmp_path, redis_url):
    out, s = demo(
        tmp_path, redis_url, "--sink", "hub", "--sink", "clearml", "--hub-fault", "503x2", "--hub-fault", "429"
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "everything delivered" in out.stdout and "epoch 3/3" in out.stdout
    hub = s["hub"]
    received = [r for r in hub["received"] if r.get("status") == 200]
    metrics = [r for r in received if r["endpoint"] == "metrics"]
    assert hub["requests"]["metrics"] == len(metrics) == hub["metrics_requests"]
    assert sorted(int(e) for r in metrics for e in r["metrics"]) == [0, 1, 2], "each epoch once"
    assert hub["requests"]["upload-final"] == 1 and received[-1]["fields"]["type"] == "final"
    assert hub["failed_requests"] == 3 == len([r for r in hub["received"] if r.get("status") != 200])
    uploads = [r for r in received if r["endpoint"] == "upload" and r["fields"]["type"] == "epoch"]
    assert hub["checkpoints_uploaded"] == len(uploads)
    # one per epoch, and last.pt as the final validation left it (superseded by the final, or sent)
    assert hub["checkpoints_uploaded"] + hub["checkpoints_superseded"] == 3 + 1
    client = redis.Redis.from_url(redis_url)
    pushed = int(client.hget(f"{s['namespace']}:run:{s['run_id']}:producer", "pushed"))
    assert s["events"] == pushed + 1, "every event the hooks produced is in Redis"
    session = Path(s["clearml"]["session"])
    events = [e for line in (session / "metrics.jsonl").read_text().splitlines() for e in json.loads(line)]
    scalars = [e for e in events if e["type"] == "training_stats_scalar" and e["metric"] != "Summary"]
    # per epoch: train loss, lr, 2 validation metrics, epoch time; then the final validation's 3 at iteration 3
    assert len(scalars) == 3 * 5 + 3
    assert {(e["metric"], e["iter"]) for e in scalars if e["iter"] == 3} == {
        ("metrics", 3),
        ("val", 3),
        ("Epoch Time", 3),
    }
    assert {e["metric"] for e in events if e["type"] == "training_debug_image"} == {"Mosaic", "Validation"}
    assert [e["metric"] for e in events if e["type"] == "plot"] == ["results"]
    assert s["hook_us_p50"] > 0 and s["last_event_to_last_upload_s"] >= 0


def test_the_demo_to_the_platform_by_default_names_what_the_platform_received(tmp_path, redis_url):
    out, s = demo(tmp_path, redis_url, "--hub-fault", "503x2")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert s["sinks"] == ["platform", "clearml"] and "Platform model" in out.stdout
    platform = s["platform"]
    events = [r for r in platform["received"] if r.get("status") == 200 and r["endpoint"] == "metrics"]
    assert events[0]["event"] == "training_started" and events[-1]["event"] == "training_complete"
    assert sorted(r["json"]["data"]["epoch"] for r in events if r["event"] == "epoch_end") == [0, 1, 2, 3]
    assert platform["requests"]["epoch_end"] == platform["epochs_sent"] == 4, "3 epochs and the final validation"
    assert platform["failed_requests"] == 2 and platform["model_url"]


def test_the_demo_to_mlflow_starts_a_local_server_and_its_summary_is_what_the_server_holds(tmp_path, redis_url):
    pytest.importorskip("mlflow", reason="the MLflow demo needs mlflow: pip install -e '.[test]'")
    out, s = demo(tmp_path, redis_url, "--sink", "mlflow")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    ml = s["mlflow"]
    assert "MLflow run" in out.stdout and ml["status"] == "FINISHED" and ml["experiment"] == "trainbus-demo"
    assert {"weights/best.pt", "weights/last.pt", "results.png", "results.csv"} <= set(ml["artifacts"])
    with sqlite3.connect(tmp_path / "demo" / "mlflow" / "mlflow.db") as db:  # what the (stopped) server holds
        (status,) = db.execute("SELECT status FROM runs WHERE run_uuid = ?", (ml["run"],)).fetchone()
        points = db.execute("SELECT key, step FROM metrics WHERE run_uuid = ?", (ml["run"],)).fetchall()
    assert status == "FINISHED" and len(points) == ml["points_logged"] == len(set(points)) > 0
    assert {step for _, step in points} == {0, 1, 2, 3}, "3 epochs and the final validation"


def test_demo_starts_and_stops_its_own_redis_when_none_answers(tmp_path):
    out, s = demo(tmp_path, "redis://127.0.0.1:1/0")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "started an embedded redis-server" in out.stdout
    left = subprocess.run(["pgrep", "-f", f"redis-server.*{tmp_path}"], capture_output=True, text=True)
    assert left.stdout.strip() == "", "no redis-server left running"
    assert s["delivered"] is True
