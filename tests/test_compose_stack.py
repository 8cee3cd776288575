"""``docker compose up`` for real (``-m compose``): the stack built and brought up on a Docker
engine, a training on the host publishing into it, Redis and a worker restarted, a graceful stop,
a start with Redis's data kept, ``down -v``. Prints the image size and the timings.

Skipped, saying why, when no engine answers (``../shared/tools/docker-env`` starts one here).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import redis

from producers import Publisher
from tests.helpers import wait_for

pytestmark = pytest.mark.compose

ROOT = Path(__file__).resolve().parents[1]
SERVICES = ("redis", "dispatcher", "platform", "hub-uploads", "clearml", "mlflow", "metrics", "rq-dashboard")
KILL_WORKER = (  # run inside the container: SIGKILL the rq worker (not this python, whose -c names it too)
    "import os; me = os.getpid(); cmd = lambda p: open(f'/proc/{p}/cmdline', 'rb').read(); "
    "[os.kill(int(p), 9) for p in os.listdir('/proc') if p.isdigit() and int(p) != me and b'bin/rq' in cmd(p)]"
)


def docker_answers() -> bool:
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stack:
    def __init__(self) -> None:
        self.project = f"tbtest-{uuid.uuid4().hex[:8]}"
        self.port = free_port()
        self.env = {**os.environ, "TRAINBUS_REDIS_PORT": str(self.port), "TRAINBUS_SINKS": "platform,clearml"}

    def compose(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        out = subprocess.run(
            ["docker", "compose", "-p", self.project, *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert out.returncode == 0, f"docker compose {' '.join(args)}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
        return out

    def states(self) -> dict[str, tuple[str, str, int]]:
        """service -> (state, health, exit code)."""
        out = self.compose("ps", "-a", "--format", "json")
        rows = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
        if len(rows) == 1 and isinstance(rows[0], list):
            rows = rows[0]
        return {r["Service"]: (r["State"], r.get("Health", ""), int(r.get("ExitCode", 0))) for r in rows}

    def all_healthy(self) -> bool:
        states = self.states()
        return all(states.get(s, ("", "", 0))[:2] == ("running", "healthy") for s in SERVICES)


@pytest.fixture
def stack():
    if not docker_answers():
        pytest.skip("no Docker engine answers (../shared/tools/docker-env installs and starts one)")
    s = Stack()
    yield s
    subprocess.run(["docker", "compose", "-p", s.project, "down", "-v"], cwd=ROOT, env=s.env, capture_output=True)


def test_the_stack_comes_up_healthy_takes_a_host_training_recovers_and_stops_gracefully(stack, tmp_path, capsys):
    timings: dict[str, float] = {}
    started = time.monotonic()
    stack.compose("build", timeout=1800)
    timings["build"] = time.monotonic() - started
    size = int(
        subprocess.run(
            ["docker", "image", "inspect", "trainbus:latest", "--format", "{{.Size}}"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )

    started = time.monotonic()
    stack.compose("up", "-d", "--wait", *SERVICES)
    timings["up --wait (healthy)"] = time.monotonic() - started
    assert stack.all_healthy(), stack.states()

    # A training on the host publishes into the stack through the published port.
    url = f"redis://127.0.0.1:{stack.port}/0"
    client = redis.Redis.from_url(url)
    with Publisher(redis_url=url, spool_dir=tmp_path / "spool", run_id="from-host") as bus:
        for epoch in range(3):
            bus.metrics(epoch, {"loss": 1.0 / (epoch + 1)})
    wait_for(lambda: _least_read(client) >= 5, timeout=60)  # the dispatcher read the host's 5 events

    # Redis restarted: everything recovers on its own and keeps reading.
    client.set("kept-across-restarts", b"1")
    started = time.monotonic()
    stack.compose("restart", "redis")
    wait_for(stack.all_healthy, timeout=180, interval=1)
    timings["redis restart -> all healthy"] = time.monotonic() - started
    with Publisher(redis_url=url, spool_dir=tmp_path / "spool", run_id="after-restart") as bus:
        bus.metrics(0, {"loss": 0.5})
    wait_for(lambda: _least_read(client) >= 8, timeout=60)

    # A worker killed: its restart policy brings it back, registered again.
    stack.compose("exec", "-T", "platform", "python", "-c", KILL_WORKER)
    started = time.monotonic()
    wait_for(
        lambda: stack.states()["platform"][0] == "running" and _workers(client, "platform"), timeout=120, interval=1
    )
    wait_for(stack.all_healthy, timeout=180, interval=1)
    timings["worker killed -> healthy again"] = time.monotonic() - started

    # A graceful stop: every process ends on SIGTERM, well within the grace period.
    started = time.monotonic()
    stack.compose("stop")
    timings["stop"] = time.monotonic() - started
    codes = {s: stack.states()[s][2] for s in SERVICES}
    assert timings["stop"] < 10, timings
    assert all(code in (0, 143) for code in codes.values()), codes  # 143: rq-dashboard's Flask dies on SIGTERM

    # Started again: Redis's data is still there (AOF on the redis-data volume).
    started = time.monotonic()
    stack.compose("up", "-d", "--wait", *SERVICES)
    timings["start again (healthy)"] = time.monotonic() - started
    assert redis.Redis.from_url(url).get("kept-across-restarts") == b"1"

    with capsys.disabled():
        print(f"\nworker image trainbus:latest: {size / 1e6:.0f} MB")
        for what, seconds in timings.items():
            print(f"{what:32s} {seconds:6.1f} s")
        print(f"exit codes at stop: {codes}")


def _least_read(client: redis.Redis) -> int:
    """Entries read by the slowest of the platform and clearml consumer groups."""
    try:
        groups = {g["name"].decode(): int(g.get("entries-read") or 0) for g in client.xinfo_groups("trainbus:events")}
    except redis.ResponseError:
        return 0
    return min(groups.get("platform", 0), groups.get("clearml", 0))


def _workers(client: redis.Redis, queue: str) -> bool:
    return bool(client.smembers(f"rq:workers:{queue}"))
