"""Hook latency: what one telemetry call costs the training thread, side by side.

    python bench/hooks.py                 # defaults: 20000 calls per case
    python bench/hooks.py --calls 2000    # quicker

Cases, measured in one run on the same payload (one epoch's metrics, as HUB receives):
  no hook                        calling an empty function: the floor
  trainbus, Redis up             Publisher.metrics() with the local Redis answering
  trainbus, Redis unreachable    the same with nothing listening at the Redis URL
  redis-py XADD (sync)           the naive alternative: XADD from the training thread
  wandb.log (offline)            the best-known peer, offline (no account, no network); skipped
                                 with a note when wandb is not installed (pip install -e '.[bench]')
  thread per upload (HUB)        the Ultralytics HUB session's way: a thread started per
                                 upload, posting to a local HTTP server
  mlflow.log_metrics (sync)      Ultralytics' MLflow callback's way: one request per call to a
                                 local ``mlflow server`` (started here; at most 500 calls)
  mlflow.log_metrics (async)     the same with ``synchronous=False``: MLflow's own background
                                 queue (in memory); its flush at the end is not timed
                                 (both skipped with a note when mlflow is not installed)

Prints p50/p99/max in microseconds and the p99 ratio against trainbus (Redis up).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import orjson
import redis
import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from producers import Publisher

METRICS = {
    "train/box_loss": 1.2345,
    "train/cls_loss": 0.9876,
    "train/dfl_loss": 1.1111,
    "metrics/precision(B)": 0.61,
    "metrics/recall(B)": 0.52,
    "metrics/mAP50(B)": 0.55,
    "metrics/mAP50-95(B)": 0.37,
    "val/box_loss": 1.3,
    "val/cls_loss": 1.0,
    "val/dfl_loss": 1.2,
}
WANDB_CASE = "wandb.log (offline)"
MLFLOW_CALLS = 500  # each synchronous call is a request: a few ms


def measure(call: Callable[[int], object], calls: int, interval_s: float) -> list[float]:
    """Latency of each call in microseconds; GC off so that its pauses do not count."""
    for i in range(min(500, calls)):
        call(i)
    samples = []
    gc.disable()
    try:
        for i in range(calls):
            t0 = time.perf_counter_ns()
            call(i)
            samples.append((time.perf_counter_ns() - t0) / 1000)
            if interval_s:
                time.sleep(interval_s)
    finally:
        gc.enable()
    return samples


class Ok(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: object) -> None:
        pass


def wandb_log(calls: int, interval_s: float) -> list[float] | None:
    """``run.log()`` of an offline wandb run (its files in a temporary directory); None without wandb."""
    try:
        import wandb
    except ImportError:
        return None
    with tempfile.TemporaryDirectory() as wandb_dir:
        os.environ.update(WANDB_MODE="offline", WANDB_DIR=wandb_dir, WANDB_SILENT="true")
        run = wandb.init(project="trainbus-bench", mode="offline", dir=wandb_dir)
        try:
            return measure(lambda i: run.log({**METRICS, "epoch": i}), calls, interval_s)
        finally:
            run.finish()  # not timed: syncing the run's file and stopping wandb's service process
            wandb.teardown()


def mlflow_log(calls: int, interval_s: float, uri: str | None) -> list[tuple[str, list[float]]] | None:
    """``mlflow.log_metrics`` to a local mlflow server, synchronous and not; None without mlflow."""
    try:
        import mlflow
        import mlflow.server
    except ImportError:
        return None
    from workers.devstack.local_mlflow import MlflowServer

    metrics = {k.replace("(", "").replace(")", ""): v for k, v in METRICS.items()}  # as Ultralytics sanitizes
    results = []
    with tempfile.TemporaryDirectory() as workdir:
        server = None if uri else MlflowServer(Path(workdir), auth=False).start()  # no password hashing per request
        try:
            mlflow.set_tracking_uri(uri or server.url)
            mlflow.set_experiment("trainbus-bench")
            for name, synchronous in (("mlflow.log_metrics (sync)", True), ("mlflow.log_metrics (async)", False)):
                with mlflow.start_run():
                    n = min(calls, MLFLOW_CALLS)
                    results.append(
                        (
                            name,
                            measure(
                                lambda i, sync=synchronous: mlflow.log_metrics(metrics, step=i, synchronous=sync),
                                n,
                                interval_s,
                            ),
                        )
                    )
                    mlflow.flush_async_logging()  # not timed
        finally:
            if server is not None:
                server.stop()
    return results


def run(calls: int, redis_url: str, interval_s: float, mlflow_uri: str | None) -> list[tuple[str, list[float]]]:
    results: list[tuple[str, list[float]]] = []
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(redis_url)

    def noop(epoch: int, metrics: dict) -> None:
        pass

    results.append(("no hook", measure(lambda i: noop(i, METRICS), calls, interval_s)))

    # ignore_cleanup_errors: the delivery process may still be removing the run's spool as close() returns
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as spool:
        bus = Publisher(redis_url=redis_url, namespace=namespace, spool_dir=spool, spool_max_mb=4096)
        results.append(("trainbus, Redis up", measure(lambda i: bus.metrics(i, METRICS), calls, interval_s)))
        bus.close(timeout=30)
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as spool:
        bus = Publisher(redis_url="redis://127.0.0.1:1/0", namespace=namespace, spool_dir=spool, spool_max_mb=4096)
        results.append(("trainbus, Redis unreachable", measure(lambda i: bus.metrics(i, METRICS), calls, interval_s)))
        bus.close(timeout=0)
        if bus.delivery is not None:
            bus.delivery.kill()  # it would keep trying the unreachable Redis for a day

    stream = f"{namespace}:xadd"
    results.append(
        (
            "redis-py XADD (sync)",
            measure(
                lambda i: client.xadd(stream, {"event": orjson.dumps({"epoch": i, "metrics": METRICS})}),
                calls,
                interval_s,
            ),
        )
    )

    samples = wandb_log(calls, interval_s)
    if samples is None:
        print(f"{WANDB_CASE}: skipped, wandb is not installed (pip install -e '.[bench]')")
    else:
        results.append((WANDB_CASE, samples))

    ThreadingHTTPServer.request_queue_size = 1024
    server = ThreadingHTTPServer(("127.0.0.1", 0), Ok)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/v1/models/x"

    def post_swallowing_errors(payload: dict) -> None:
        with contextlib.suppress(requests.RequestException):  # the HUB client swallowed every error too
            requests.post(url, json=payload, timeout=10)

    def thread_per_upload(i: int) -> None:
        payload = {"metrics": {str(i): orjson.dumps(METRICS).decode()}, "type": "metrics"}
        threading.Thread(target=post_swallowing_errors, args=(payload,), daemon=True).start()

    results.append(("thread per upload (HUB)", measure(thread_per_upload, min(calls, 3000), interval_s)))
    mlflow_results = mlflow_log(calls, interval_s, mlflow_uri)
    if mlflow_results is None:
        print("mlflow.log_metrics: skipped, mlflow is not installed (pip install -e '.[test]')")
    else:
        results += mlflow_results
    time.sleep(1)
    server.shutdown()
    for key in client.scan_iter(match=f"{namespace}:*"):
        client.delete(key)
    return results


def percentile(samples: list[float], q: float) -> float:
    return statistics.quantiles(samples, n=1000)[int(q * 10) - 1] if len(samples) > 1 else samples[0]


def table(results: list[tuple[str, list[float]]]) -> str:
    ref = next(percentile(s, 99) for name, s in results if name == "trainbus, Redis up")
    lines = [f"{'case':<30} {'calls':>7} {'p50 µs':>9} {'p99 µs':>9} {'max µs':>10} {'p99 vs trainbus':>16}"]
    for name, samples in results:
        p99 = percentile(samples, 99)
        lines.append(
            f"{name:<30} {len(samples):>7} {statistics.median(samples):>9.1f} {p99:>9.1f} "
            f"{max(samples):>10.1f} {p99 / ref:>15.2f}x"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=20000, help="calls per case (default 20000)")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument(
        "--interval-us",
        type=float,
        default=0.0,
        help="pause between calls, to mimic a slower training loop (default: none)",
    )
    parser.add_argument("--mlflow-uri", help="an mlflow server for the mlflow.log_metrics cases (default: start one)")
    args = parser.parse_args()
    results = run(args.calls, args.redis_url, args.interval_us / 1e6, args.mlflow_uri)
    print(table(results))


if __name__ == "__main__":
    main()
