"""The worker stops on SIGTERM/SIGINT when idle (docker compose stop), after the job when busy."""

from __future__ import annotations

import os
import signal
import subprocess
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
