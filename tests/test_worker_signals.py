"""The worker stops on SIGTERM/SIGINT when idle (docker compose stop), after the job when busy."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import wait_for
from tests.pipeline import ROOT
from workers.pipeline.rq_worker import worker_command, worker_env


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_an_idle_worker_stops_on_a_signal(redis_url, namespace, client, sig):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRAINBUS_NAMESPACE": namespace, "TRAINBUS_REDIS_URL": redis_url}
    queue = f"{namespace}.hub-uploads"
    proc = subprocess.Popen(
        worker_command(queue),
        env=worker_env(env, redis_url),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(lambda: client.smembers(f"rq:workers:{queue}"), timeout=30)
        time.sleep(0.5)
        proc.send_signal(sig)
        assert proc.wait(timeout=15) == 0
        assert b"re-entering the work loop" not in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_trainbus_health_is_true_while_this_hosts_worker_heartbeats(redis_url, namespace, client):
    """The compose healthcheck of a worker container: registered and heartbeating, from this host."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRAINBUS_NAMESPACE": namespace, "TRAINBUS_REDIS_URL": redis_url}
    health = [sys.executable, "-m", "workers.ops.cli", "health", "hub"]
    before = subprocess.run(health, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert before.returncode == 1 and "none registered" in before.stderr
    proc = subprocess.Popen(worker_command(f"{namespace}.hub-uploads"), env=worker_env(env, redis_url), cwd=ROOT)
    try:
        wait_for(lambda: subprocess.run(health, env=env, cwd=ROOT, capture_output=True, timeout=60).returncode == 0)
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def test_trainbus_health_dispatcher_is_true_while_this_hosts_dispatcher_reads(redis_url, namespace):
    """The compose healthcheck of the dispatcher container: its consumer on this host read lately."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRAINBUS_NAMESPACE": namespace, "TRAINBUS_REDIS_URL": redis_url}
    health = [sys.executable, "-m", "workers.ops.cli", "health", "dispatcher", "--within", "3"]

    def healthy() -> subprocess.CompletedProcess:
        return subprocess.run(health, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)

    before = healthy()
    assert before.returncode == 1 and "none seen" in before.stderr
    proc = subprocess.Popen([sys.executable, "-m", "workers.ops.cli", "dispatch"], env=env, cwd=ROOT)
    try:
        wait_for(lambda: healthy().returncode == 0, timeout=30)
    finally:
        proc.kill()
        proc.wait(timeout=15)
    after = wait_for(lambda: (out := healthy()).returncode == 1 and out, timeout=30)
    assert "last read" in after.stderr, "a dispatcher that stopped reading is unhealthy"
