"""Real processes for the load benchmarks: the local HUB server, dispatchers and RQ workers.

Each benchmark runs its pipeline in a namespace of its own on a shared Redis, so
``Stack.close()`` (called from a ``finally``, Ctrl-C and SIGTERM included) stops every
process it started and deletes every key they made: ``<namespace>:*`` and RQ's keys for
the namespace's queue, workers and jobs. Also here: waiting, percentiles and tables.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import redis
import requests

from producers import Publisher
from shared.keys import Keys
from tests.helpers import children
from workers.pipeline.rq_worker import worker_command, worker_env

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
API_KEY = "k" * 42  # what the workers send and the local HUB requires


def new_namespace(prefix: str = "bench") -> str:
    """A namespace no other run uses, so that cleanup cannot touch anyone else's keys."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def model_id(i: int) -> str:
    """A 20-character HUB model id (the form HUB uses), distinct per ``i``."""
    return f"bench{i:015d}"


def epoch_metrics(epoch: int) -> dict[str, float]:
    """One epoch's HUB metrics as Ultralytics sends them (ten values), varying with the epoch."""
    names = ("train/box_loss", "train/cls_loss", "train/dfl_loss", "val/box_loss", "val/cls_loss", "val/dfl_loss")
    losses = {name: round(2.0 / (epoch + 1) + i / 10, 6) for i, name in enumerate(names)}
    scores = ("metrics/precision(B)", "metrics/recall(B)", "metrics/mAP50(B)", "metrics/mAP50-95(B)")
    return {**losses, **{name: round(min(0.99, epoch / 100 + i / 10), 6) for i, name in enumerate(scores)}}


def arguments(doc: str) -> argparse.ArgumentParser:
    """A benchmark's command line: its docstring as help, and --redis-url."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL, help=f"Redis to use (default {DEFAULT_REDIS_URL})")
    return parser


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so ``finally`` blocks clean up as on Ctrl-C."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def stop_process(proc: subprocess.Popen) -> None:
    """SIGKILL a process, its group and its children's groups: its keys are deleted anyway.

    Not SIGTERM: a worker would finish its job first, and the benchmark is over. And the
    children: RQ starts each work horse in a process group of its own; left alive, it
    finishes its job and writes keys after they were deleted.
    """
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGSTOP)  # it forks no new work horse from here on
    for child in children(proc.pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(os.getpgid(child), signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


class HubProcess:
    """``python -m workers.devstack.local_hub`` with the given models, and its recorded requests."""

    def __init__(self, models: Iterable[str] = ()) -> None:
        args = [sys.executable, "-m", "workers.devstack.local_hub", "--api-key", API_KEY]
        for model in models:
            args += ["--model", model]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, cwd=ROOT, start_new_session=True)
        self.url = self.proc.stdout.readline().rsplit(" ", 1)[-1].strip()
        if not self.url.startswith("http"):
            stop_process(self.proc)
            raise RuntimeError("the local HUB server did not start")

    def requests(self, *endpoints: str) -> list[dict[str, Any]]:
        """Successful requests (status 200) to these endpoints (all if none), oldest first."""
        got = requests.get(f"{self.url}/_control/requests", timeout=30).json()["requests"]
        return [r for r in got if r.get("status") == 200 and (not endpoints or r["endpoint"] in endpoints)]

    def uploads(self) -> list[dict[str, Any]]:
        """Successful metrics posts and checkpoint uploads: what a worker delivers."""
        return self.requests("metrics", "upload")

    def stop(self) -> None:
        stop_process(self.proc)


class Stack:
    """A namespace on Redis with the local HUB, dispatchers and hub-uploads workers as processes.

    ``rates`` are the workers' ``TRAINBUS_RATE_*`` settings by kind (``metrics``, ``ckpt``,
    ``heartbeat``), in seconds. ``workdir`` (a temporary directory, removed at close) holds
    the process logs and is the workers' file root: put spools and checkpoints there.
    Use it as a context manager.
    """

    def __init__(self, redis_url: str, *, models: Iterable[str] = (), **rates: float) -> None:
        self.redis_url = redis_url
        self.namespace = new_namespace()
        self.keys = Keys(self.namespace)
        self.queue = self.keys.queue("hub")
        self.client = redis.Redis.from_url(redis_url)
        self.hub = HubProcess(models)
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{self.namespace}-"))
        self.procs: list[subprocess.Popen] = []
        self.publishers: list[Publisher] = []
        self.names: dict[int, str] = {}  # pid -> name of its log file
        self.env = {
            **worker_env(os.environ, redis_url),
            "PYTHONPATH": str(ROOT),
            "TRAINBUS_NAMESPACE": self.namespace,
            "TRAINBUS_HUB_API_URL": self.hub.url,
            "TRAINBUS_HUB_API_KEY": API_KEY,
            "TRAINBUS_FILE_ROOTS": str(self.workdir),
            "TRAINBUS_SINKS": "hub",
            "TRAINBUS_HUB_TIMEOUT_S": "10",
            **{f"TRAINBUS_RATE_{kind.upper()}": repr(seconds) for kind, seconds in rates.items()},
        }

    def dispatcher(self, *, burst: bool = False) -> subprocess.Popen:
        """``trainbus dispatch``: until the stack closes, or with ``burst`` until the stream has nothing new."""
        name = f"dispatcher-{len(self.procs)}"
        return self._start([sys.executable, "-m", "workers.ops.cli", "dispatch", *(["--burst"] if burst else [])], name)

    def publisher(self, run_id: str, hub_model: str | None = None) -> Publisher:
        """A producer of this namespace, its spool under the work directory (the workers' file root)."""
        bus = Publisher(
            redis_url=self.redis_url,
            namespace=self.namespace,
            spool_dir=self.workdir / "spool",
            run_id=run_id,
            hub_model=hub_model,
            spool_max_mb=4096,  # a benchmark's burst must not be dropped
        )
        self.publishers.append(bus)
        return bus

    def worker(self) -> subprocess.Popen:
        """``rq worker <ns>.hub-uploads`` as documented, named after the namespace (for cleanup)."""
        name = f"{self.namespace}-w{len(self.procs)}"
        return self._start([*worker_command(self.queue), "-n", name], name)

    def output(self, proc: subprocess.Popen) -> str:
        """What a process of this stack printed (stdout and stderr)."""
        return (self.workdir / f"{self.names[proc.pid]}.log").read_text(errors="replace")

    def logs_tail(self, lines: int = 20) -> str:
        """The end of every process log: what to read when a wait times out."""
        parts = []
        for path in sorted(self.workdir.glob("*.log")):
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {path.name}\n" + "\n".join(tail))
        return "\n".join(parts)

    def owned_keys(self) -> list[bytes]:
        """Every key of this namespace: ``<ns>:*``, and RQ's for its queue, its workers and its jobs."""
        rq_keys = list(self.client.scan_iter(match="rq:*", count=1000))
        job_keys = [k for k in rq_keys if k.startswith(b"rq:job:")]
        pipe = self.client.pipeline(transaction=False)
        for key in job_keys:
            pipe.hget(key, "origin")
        origins = pipe.execute()
        jobs = {k.split(b":")[2] for k, origin in zip(job_keys, origins, strict=True) if origin == self.queue.encode()}
        rq_mine = [k for k in rq_keys if self.namespace.encode() in k or jobs.intersection(k.split(b":"))]
        return list(self.client.scan_iter(match=f"{self.namespace}:*", count=1000)) + rq_mine

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop producers and processes, delete every key this namespace made and the work directory."""
        for bus in self.publishers:
            bus.close(timeout=1)
            if bus.delivery is not None:  # it would push the rest into keys about to be deleted
                bus.delivery.kill()
                bus.delivery.wait()
        for proc in self.procs:
            stop_process(proc)
        self.hub.stop()
        for key in self.owned_keys():
            self.client.delete(key)
        for index in (b"rq:queues", b"rq:workers"):
            members = [m for m in self.client.smembers(index) if self.namespace.encode() in m]
            if members:
                self.client.srem(index, *members)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def _start(self, args: list[str], name: str) -> subprocess.Popen:
        with open(self.workdir / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(
                args, env=self.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.procs.append(proc)
        self.names[proc.pid] = name
        return proc


def wait_until(done: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> float:
    """Poll ``done`` until it is true; returns the time.time() when it was seen. Raises on timeout."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not done after {timeout:.0f} s")
        time.sleep(interval)
    return time.time()


def percentile(samples: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), interpolated between the nearest samples."""
    if len(samples) == 1:
        return samples[0]
    return statistics.quantiles(samples, n=1000, method="inclusive")[round(q * 10) - 1]


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Columns sized to fit; the first left-aligned, the rest right-aligned; floats with 1-2 decimals."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.2f}" if abs(value) < 10 else f"{value:.1f}" if abs(value) < 1000 else f"{value:,.0f}"
        return str(value)

    cells = [[cell(v) for v in row] for row in [headers, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        aligned = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        lines.append("  ".join(aligned).rstrip())
    return "\n".join(lines)
