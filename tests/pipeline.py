"""Real processes for pipeline tests: the local HUB server, dispatchers and RQ workers."""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests
import torch
from rq import Queue, Worker

from producers import Publisher
from shared.keys import Keys
from shared.redis_client import connect
from tests.clearml_server import ACCESS_KEY, SECRET_KEY
from tests.helpers import children, wait_for
from workers.pipeline.rq_worker import worker_command, worker_env

ROOT = Path(__file__).resolve().parents[1]
API_KEY = "k" * 42
MODEL_ID = "M" * 20


class HubServer:
    """``python -m workers.devstack.local_hub`` as a process, with its control API."""

    def __init__(self, *models: str, api_key: str = API_KEY) -> None:
        args = [sys.executable, "-m", "workers.devstack.local_hub", "--api-key", api_key]
        for model in models:
            args += ["--model", model]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        line = self.proc.stdout.readline()
        self.url = line.rsplit(" ", 1)[-1].strip()

    def fault(self, **fault: Any) -> None:
        requests.post(f"{self.url}/_control/faults", json=fault, timeout=5).raise_for_status()

    def add_model(self, model_id: str) -> None:
        requests.post(f"{self.url}/_control/models", json={"id": model_id}, timeout=5).raise_for_status()

    def requests(self, endpoint: str | None = None, status: int | None = 200) -> list[dict]:
        got = requests.get(f"{self.url}/_control/requests", timeout=5).json()["requests"]
        return [
            r
            for r in got
            if (endpoint is None or r["endpoint"] == endpoint) and (status is None or r.get("status") == status)
        ]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


PLATFORM_KEY = "ul_" + "a" * 40
PLATFORM_PROJECT = "tester/pipeline"


class PlatformServer:
    """``python -m workers.devstack.local_platform`` as a process, with its control API."""

    def __init__(self, api_key: str = PLATFORM_KEY, *limits: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "workers.devstack.local_platform", "--api-key", api_key, *limits],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        self.url = self.proc.stdout.readline().rsplit(" ", 1)[-1].strip()

    def control(self, action: str, **body: Any) -> dict:
        return requests.post(f"{self.url}/_control/{action}", json=body, timeout=5).json()

    def fault(self, **fault: Any) -> None:
        self.control("faults", **fault)

    def requests(self, endpoint: str | None = None, event: str | None = None) -> list[dict]:
        got = requests.get(f"{self.url}/_control/requests", timeout=5).json()["requests"]
        return [
            r
            for r in got
            if (endpoint is None or r["endpoint"] == endpoint) and (event is None or r.get("event") == event)
        ]

    def models(self) -> list[dict]:
        return requests.get(f"{self.url}/_control/models", timeout=5).json()["models"]

    def env(self) -> dict[str, str]:
        return {
            "TRAINBUS_PLATFORM_URL": self.url,
            "TRAINBUS_PLATFORM_API_KEY": PLATFORM_KEY,
            "TRAINBUS_PLATFORM_PROJECT": PLATFORM_PROJECT,
        }

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


class ClearmlServer:
    """``python -m tests.clearml_server`` as a process."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.clearml_server"], stdout=subprocess.PIPE, text=True, cwd=ROOT
        )
        self.url = self.proc.stdout.readline().rsplit(" ", 1)[-1].strip()
        # The SDK's own retries back off up to 120 s by default: after a test's outage its next send could
        # come minutes later (seen under load). Tests cap that; users keep the SDK's defaults.
        self.config = Path(tempfile.mkdtemp(prefix="clearml-conf-")) / "clearml.conf"
        self.config.write_text("api { http { retries { backoff_max: 2.0 } } }\n")

    def state(self) -> dict:
        return requests.get(f"{self.url}/_control/state", timeout=10).json()

    def fault(self, **faults) -> None:
        requests.post(f"{self.url}/_control/faults", json=faults, timeout=10).raise_for_status()

    def env(self) -> dict[str, str]:
        return {
            "CLEARML_API_HOST": self.url,
            "CLEARML_WEB_HOST": self.url,
            "CLEARML_FILES_HOST": self.url,
            "CLEARML_API_ACCESS_KEY": ACCESS_KEY,
            "CLEARML_API_SECRET_KEY": SECRET_KEY,
            "CLEARML_CONFIG_FILE": str(self.config),
        }

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)
        shutil.rmtree(self.config.parent, ignore_errors=True)


class Pipeline:
    """Dispatchers and workers as processes sharing one environment."""

    def __init__(self, redis_url: str, namespace: str, hub: HubServer | None, spool_dir: Path, **settings: Any) -> None:
        spool_dir.mkdir(parents=True, exist_ok=True)
        self.redis_url = redis_url
        self.namespace = namespace
        self.env = dict(
            worker_env(os.environ, redis_url),
            PYTHONPATH=str(ROOT),
            TRAINBUS_NAMESPACE=namespace,
            TRAINBUS_HUB_API_URL=hub.url if hub else "http://127.0.0.1:1",
            TRAINBUS_HUB_API_KEY=API_KEY,
            TRAINBUS_FILE_ROOTS=str(spool_dir),
            TRAINBUS_SINKS="hub",
            TRAINBUS_RATE_METRICS="0.2",
            TRAINBUS_RATE_CKPT="1",
            TRAINBUS_RATE_HEARTBEAT="0.5",
            TRAINBUS_HUB_TIMEOUT_S="2",
        )
        self.env.update({k: str(v) for k, v in settings.items()})
        self.procs: list[subprocess.Popen] = []
        self.log_dir = spool_dir

    def dispatcher(self, *extra: str) -> subprocess.Popen:
        return self._start([sys.executable, "-m", "workers.ops.cli", "dispatch", "--claim-idle", "1", *extra])

    def worker(self, sink: str = "hub") -> subprocess.Popen:
        """``rq worker`` for a sink's queue: forking for hub-uploads, SimpleWorker for clearml."""
        return self._start(worker_command(Keys(self.namespace).queue(sink)))

    def wait_ready(self, sink: str = "hub", workers: int = 1) -> None:
        """Until a dispatcher has read and ``workers`` workers of the sink have registered: for a test
        whose checks need them running from the first event (a cold start can take seconds)."""
        client, keys = connect(self.redis_url), Keys(self.namespace)
        queue = Queue(keys.queue(sink), connection=client)
        wait_for(lambda: client.hlen(keys.dispatchers) and Worker.count(queue=queue) >= workers, timeout=60)

    def cli(self, *args: str, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "workers.ops.cli", *args],
            env={**self.env, **env},
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def kill(self, proc: subprocess.Popen) -> None:
        """SIGKILL a process and everything it forked. RQ puts each work horse in a process
        group of its own, so the horses are found by parent pid and killed first."""
        os.killpg(proc.pid, signal.SIGSTOP)  # forks nothing more from here on
        for child in children(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(os.getpgid(child), signal.SIGKILL)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                self.kill(proc)

    def _start(self, args: list[str]) -> subprocess.Popen:
        log = open(self.log_dir / f"proc-{len(self.procs)}.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            args, env=self.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.procs.append(proc)
        return proc


def train(
    bus: Publisher, workdir: Path, epochs: int, *, pause: float = 0.05, between: Callable[[int], None] | None = None
) -> dict[int, dict]:
    """A small 'training': per epoch metrics and a checkpoint saved in place; then the final.

    It starts once the delivery process follows the spool (a real training's first save comes
    far later than that): saves in the first 0.2 s would supersede snapshots not yet made."""
    wait_for(lambda: bus.delivering, timeout=30)
    weights = workdir / "weights"
    weights.mkdir(parents=True, exist_ok=True)
    last, best = weights / "last.pt", weights / "best.pt"
    sent: dict[int, dict] = {}
    bus.session(
        {"model": "yolov8n.yaml", "data": "coco8.yaml", "epochs": epochs, "imgsz": 64, "batch": 2}, name="pipeline-test"
    )
    for epoch in range(epochs):
        sent[epoch] = {"train/loss": round(1.0 / (epoch + 1), 6), "metrics/mAP50-95(B)": epoch / 100}
        bus.metrics(epoch, sent[epoch])
        torch.save({"epoch": epoch, "w": torch.full((64,), float(epoch))}, last)
        bus.checkpoint(last, epoch, is_best=True)
        best.write_bytes(last.read_bytes())
        if between:
            between(epoch)
        time.sleep(pause)
    bus.final(best, epochs - 1, sent[epochs - 1], map50_95=sent[epochs - 1]["metrics/mAP50-95(B)"])
    return sent


def metrics_by_epoch(hub: HubServer, model: str) -> dict[int, list[dict]]:
    """Every successfully received value per epoch (more than one = sent twice)."""
    got: dict[int, list[dict]] = {}
    for r in hub.requests("metrics"):
        if r["model"] == model:
            for epoch, values in r["metrics"].items():
                got.setdefault(int(epoch), []).append(values)
    return got


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


def framework_pipeline(redis_url: str, namespace: str, spool_dir: Path, platform: Any, workdir: Path) -> Pipeline:
    """A dispatcher and the platform and clearml workers (ClearML offline, sessions in workdir/clearml)
    for a framework's real training writing under ``workdir``; stop() it."""
    pipeline = Pipeline(
        redis_url,
        namespace,
        None,
        spool_dir,
        TRAINBUS_SINKS="platform,clearml",
        TRAINBUS_FILE_ROOTS=f"{spool_dir}:{workdir}",
        CLEARML_OFFLINE_MODE="1",
        CLEARML_CACHE_DIR=workdir / "clearml",
        **platform.env(),
    )
    pipeline.dispatcher()
    pipeline.worker("platform")
    pipeline.worker("clearml")
    return pipeline
