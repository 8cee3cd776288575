"""``docker compose up`` for real (``-m compose``): the stack built and brought up on a Docker
engine with its ``devstack`` local Platform, a training on the host publishing into it, the demo
trained inside it while Redis and then a worker are restarted (what the local Platform and the
ClearML offline session received is checked), a graceful stop, a start with Redis's data kept,
``down -v``. Prints the image sizes and the timings.

Skipped, saying why, when no engine answers (``../shared/tools/docker-env`` starts one here).
The demo image's torch comes from ``TORCH`` (a pip requirement and options, as the build
argument), else from docker-env's local wheel server when it answers, else PyTorch's CPU index.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import redis

from producers import Publisher
from tests.helpers import wait_for

pytestmark = pytest.mark.compose

ROOT = Path(__file__).resolve().parents[1]
SERVICES = ("redis", "dispatcher", "platform", "hub-uploads", "clearml", "mlflow", "metrics", "rq-dashboard")
DEVSTACK = (*SERVICES, "local-platform")
DEMO_EPOCHS = 40
WHEEL_SERVER = "http://127.0.0.1:8765/"  # ../shared/tools/docker-env serves the CPU torch wheel here
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


def torch_requirement() -> str:
    if os.environ.get("TORCH"):
        return os.environ["TORCH"]
    try:
        urllib.request.urlopen(WHEEL_SERVER, timeout=2).close()
        return f"torch==2.13.0 --find-links {WHEEL_SERVER}"
    except OSError:
        return "torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"


class Stack:
    def __init__(self) -> None:
        self.project = f"tbtest-{uuid.uuid4().hex[:8]}"
        self.port, self.platform_port = free_port(), free_port()
        self.env = {
            **os.environ,
            "TRAINBUS_REDIS_PORT": str(self.port),
            "TRAINBUS_LOCAL_PLATFORM_PORT": str(self.platform_port),
            "TRAINBUS_SINKS": "platform,clearml",
            "TORCH": torch_requirement(),
        }
        for name in ("TRAINBUS_PLATFORM_API_KEY", "TRAINBUS_PLATFORM_URL", "CLEARML_API_ACCESS_KEY"):
            self.env.pop(name, None)  # the local Platform and ClearML offline, whatever this shell has

        self.files = ["-f", "docker-compose.yml"]

    def bind_mount_for_host_trainings(self, train_dir: Path) -> None:
        """What the README tells a host training's user to add: its directory in the platform worker at the
        same path, in TRAINBUS_FILE_ROOTS, the worker running as the training's user (spools are 0700)."""
        override = train_dir.parent / "host-trainings.yml"
        override.write_text(
            "services:\n"
            "  platform:\n"
            f'    user: "{os.getuid()}:{os.getgid()}"\n'
            f'    volumes: ["{train_dir}:{train_dir}"]\n'
            f'    environment: {{TRAINBUS_FILE_ROOTS: "/data:{train_dir}"}}\n'
        )
        self.files += ["-f", str(override)]

    def command(self, *args: str) -> list[str]:
        return ["docker", "compose", "-p", self.project, *self.files, "--profile", "devstack", *args]

    def compose(self, *args: str, timeout: float = 300, ok: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess:
        out = subprocess.run(
            self.command(*args),
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert out.returncode in ok, f"docker compose {' '.join(args)}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
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
        return all(states.get(s, ("", "", 0))[:2] == ("running", "healthy") for s in DEVSTACK)

    def platform_models(self) -> list[dict]:
        url = f"http://127.0.0.1:{self.platform_port}/_control/models"
        with urllib.request.urlopen(url, timeout=10) as reply:
            return json.load(reply)["models"]


@pytest.fixture
def stack():
    if not docker_answers():
        pytest.skip("no Docker engine answers (../shared/tools/docker-env installs and starts one)")
    s = Stack()
    yield s
    everything = ("--profile", "demo", "--profile", "ha", "down", "-v")
    subprocess.run(s.command(*everything), cwd=ROOT, env=s.env, capture_output=True)


def test_the_stack_comes_up_healthy_delivers_trainings_through_restarts_and_stops_gracefully(stack, tmp_path, capsys):
    timings: dict[str, float] = {}
    started = time.monotonic()
    host_train = tmp_path / "host-train"
    host_train.mkdir()
    stack.bind_mount_for_host_trainings(host_train)
    stack.compose("--profile", "demo", "build", timeout=1800)
    timings["build (worker and demo images)"] = time.monotonic() - started
    sizes = {image: image_size(image) for image in ("trainbus:latest", "trainbus-demo:latest")}

    started = time.monotonic()
    stack.compose("up", "-d", "--wait", *DEVSTACK)
    timings["up --wait (healthy)"] = time.monotonic() - started
    assert stack.all_healthy(), stack.states()

    # A training on the host publishes into the stack through the published port; the platform worker
    # reads its checkpoints through the bind mount.
    url = f"redis://127.0.0.1:{stack.port}/0"
    client = redis.Redis.from_url(url)
    best = host_train / "weights" / "best.pt"
    best.parent.mkdir()
    with Publisher(redis_url=url, spool_dir=host_train / "spool", run_id="from-host") as bus:
        bus.session({"epochs": 3}, name="host-run", project="host-project", device="cpu")
        for epoch in range(3):
            bus.metrics(epoch, {"loss": 1.0 / (epoch + 1)})
            best.write_bytes(os.urandom(200_000))
            bus.checkpoint(best, epoch, is_best=True)
        bus.final(best, 2, {"loss": 0.33})
    host_model = wait_for(lambda: _completed(stack, "host-project"), timeout=120, interval=1)
    assert host_model["runs"][-1]["checkpoints"][-1]["sha256"] == hashlib.sha256(best.read_bytes()).hexdigest()
    client.set("kept-across-restarts", b"1")
    killed = _workers(client, "platform")

    # The demo trains inside the stack; Redis is restarted under it, then the platform worker killed.
    started = time.monotonic()
    demo_command = ["trainbus", "demo", "--stack", "--workdir", "/data/demo", "--epochs", str(DEMO_EPOCHS)]
    demo = subprocess.Popen(
        stack.command("--profile", "demo", "run", "--rm", "-T", "demo", *demo_command),
        cwd=ROOT,
        env=stack.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output = []
    for line in demo.stdout:
        output.append(line)
        if line.startswith("epoch 3/"):
            redis_restart = time.monotonic()
            stack.compose("restart", "redis")
            timings["redis restart (mid-run)"] = time.monotonic() - redis_restart
            # 137: the container stops with its worker, and this exec with it, before it returns
            stack.compose("exec", "-T", "platform", "python", "-c", KILL_WORKER, ok=(0, 137))
    assert demo.wait(timeout=600) == 0, "".join(output)
    timings["demo (train + deliver)"] = time.monotonic() - started
    out = "".join(output)
    assert "everything delivered" in out, out

    run = _completed(stack, "trainbus-demo")["runs"][-1]
    assert [e["epoch"] for e in run["epochs"]] == list(range(DEMO_EPOCHS + 1)), "every epoch once, in order"
    assert run["checkpoints"] and run["end"]["event"] == "training_complete"
    sessions = stack.compose("exec", "-T", "clearml", "sh", "-c", "ls /clearml/offline").stdout.split()
    assert any(name.endswith(".zip") for name in sessions), sessions  # ClearML zips a closed offline session

    # The stack recovered on its own: the killed worker is back, registered, everything healthy.
    started = time.monotonic()
    wait_for(stack.all_healthy, timeout=180, interval=1)
    timings["after the demo -> all healthy"] = time.monotonic() - started
    assert _workers(client, "platform") - killed, "a new platform worker registered after the kill"

    # A graceful stop: every process ends on SIGTERM, well within the grace period.
    started = time.monotonic()
    stack.compose("stop")
    timings["stop"] = time.monotonic() - started
    codes = {s: stack.states()[s][2] for s in DEVSTACK}
    assert timings["stop"] < 10, timings
    assert all(code in (0, 143) for code in codes.values()), codes  # 143: rq-dashboard's Flask dies on SIGTERM

    # Started again: Redis's data is still there (AOF on the redis-data volume).
    started = time.monotonic()
    stack.compose("up", "-d", "--wait", *DEVSTACK)
    timings["start again (healthy)"] = time.monotonic() - started
    assert redis.Redis.from_url(url).get("kept-across-restarts") == b"1"

    with capsys.disabled():
        print()
        for image, size in sizes.items():
            print(f"image {image:24s} {size / 1e6:6.0f} MB")
        for what, seconds in timings.items():
            print(f"{what:32s} {seconds:6.1f} s")
        print(f"exit codes at stop: {codes}")
        print(
            "demo output (around the restarts, and the end):\n"
            + "".join([*[line for line in output if line.startswith("epoch ")][:6], "...\n", *output[-10:]])
        )


def test_the_ha_profile_fails_over_and_the_stack_follows_it(stack, capsys):
    """``--profile ha`` with the Sentinel URL and TRAINBUS_REDIS_MIN_REPLICAS=1: the primary's container
    killed, a Sentinel promotes the replica, every process follows, and the demo trains and is delivered
    (its dependency start brings the old primary back, as a replica)."""
    stack.env.update(
        TRAINBUS_STACK_REDIS_URL="redis+sentinel://sentinel-1:26379,sentinel-2:26379,sentinel-3:26379/trainbus/0",
        TRAINBUS_REDIS_MIN_REPLICAS="1",
        TRAINBUS_SUBNET="172.29.87.0/24",
        TRAINBUS_REDIS_IP="172.29.87.10",
        TRAINBUS_REDIS_REPLICA_IP="172.29.87.11",
    )
    ha = ("--profile", "ha")
    stack.compose(*ha, "--profile", "demo", "build", timeout=1800)
    stack.compose(*ha, "up", "-d", "--wait", *DEVSTACK, "redis-replica", "sentinel-1", "sentinel-2", "sentinel-3")

    def primary() -> str:
        ask = [
            "exec",
            "-T",
            "sentinel-1",
            "redis-cli",
            "-p",
            "26379",
            "sentinel",
            "get-master-addr-by-name",
            "trainbus",
        ]
        return stack.compose(*ha, *ask).stdout.split()[0]

    assert primary() == "172.29.87.10"
    killed = time.monotonic()
    stack.compose(*ha, "kill", "redis")
    wait_for(lambda: primary() == "172.29.87.11", timeout=60, interval=1)
    promoted_s = time.monotonic() - killed
    demo = stack.compose(
        *ha,
        "--profile",
        "demo",
        "run",
        "--rm",
        "-T",
        "demo",
        "trainbus",
        "demo",
        "--stack",
        "--epochs",
        "5",
        "--workdir",
        "/data/demo",
        timeout=600,
    )
    assert "everything delivered" in demo.stdout, demo.stdout
    model = _completed(stack, "trainbus-demo")
    assert [e["epoch"] for e in model["runs"][-1]["epochs"]] == list(range(6)), "every epoch once"
    with capsys.disabled():
        print(
            f"\nha: the replica promoted {promoted_s:.1f} s after the primary's container was killed; "
            f"the demo delivered in {time.monotonic() - killed:.1f} s after the kill"
        )


def image_size(image: str) -> int:
    inspect = ["docker", "image", "inspect", image, "--format", "{{.Size}}"]
    return int(subprocess.run(inspect, capture_output=True, text=True, check=True).stdout)


def _completed(stack: Stack, project: str) -> dict | None:
    model = next((m for m in stack.platform_models() if m["project"] == project), None)
    return model if model and model["runs"] and model["runs"][-1]["end"] else None


def _workers(client: redis.Redis, queue: str) -> set[bytes]:
    return client.smembers(f"rq:workers:{queue}")
