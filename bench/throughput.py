"""Throughput of each stage of the pipeline, against what Redis itself takes: where the ceiling is.

    python bench/throughput.py                                    # defaults: about 2 minutes on 2 cores
    python bench/throughput.py --events 200000 --upload-runs 400 --repeats 5    # bigger, steadier

Stages, each repeated --repeats times in a fresh namespace; the table shows the median and
the range over the repeats:

  producer: hook calls          one Publisher, --events metrics() calls back to back: the rate
                                the training thread can hand events off at
  producer: into the stream     the same calls, timed from the first call until the run's
                                ``pushed`` seq (advanced by the delivery process's pipelined XADD script,
                                Keys.producer) reaches the last event: events/s landing in Redis
  dispatcher (--burst)          --events fit_epoch events prefilled across --runs runs while no
                                dispatcher runs, then ``trainbus dispatch --burst``; timed by polling
                                the ``hub`` consumer group from its creation until the last entry is
                                delivered and nothing is pending (the process start-up is excluded)
  hub-uploads: N worker(s)      --upload-runs runs, each a HUB model on the local HUB server with
                                one epoch's metrics, a checkpoint and the final (3 uploads, one
                                drain job per run), rate limits 0.01 s; N ``rq worker`` processes
                                are started and registered first, then a dispatcher; successful
                                uploads/s from the HUB server's receipt times, first to last
  redis-benchmark XADD          the ceiling: ``redis-benchmark -P 16 -n --xadds XADD <key> * event
                                <payload>`` (50 clients) with a payload the size of one metrics event

"vs ceiling" is each median over the redis-benchmark median. Events and uploads are
different units: an upload is an HTTP request and a forked RQ job; the ratio says how far
each stage is from Redis being the limit.
"""

from __future__ import annotations

import hashlib
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.procs import Stack, arguments, epoch_metrics, exit_on_sigterm, model_id, table, wait_until
from shared.events import encode_event

METRICS = epoch_metrics(3)
WORKER_COUNTS = (1, 2, 4)
UPLOADS_PER_RUN = 3  # metrics, checkpoint, final
CHECKPOINT_BYTES = 256 * 1024
Events = list[tuple[str, dict[str, Any]]]


def producer(redis_url: str, events: int) -> tuple[float, float]:
    """(hook calls/s, events/s into the stream) for one Publisher publishing ``events`` metrics."""
    with Stack(redis_url) as stack:
        bus = stack.publisher("producer")
        pushed_key = stack.keys.producer(bus.run_id)
        start = time.perf_counter()
        for epoch in range(events):
            bus.metrics(epoch, METRICS)
        hooks_s = time.perf_counter() - start
        last = bus.next_seq - 1
        wait_until(lambda: int(stack.client.hget(pushed_key, "pushed") or -1) >= last, 300, "push", interval=0.002)
        pushed_s = time.perf_counter() - start
        return events / hooks_s, (last + 1) / pushed_s


def prefill(stack: Stack, runs: int, events_of: Callable[[int], Events]) -> tuple[int, bytes]:
    """XADD every run's events as its delivery process would have, runs interleaved. Returns (count, last id)."""
    per_run = [events_of(i) for i in range(runs)]
    count, last = 0, b""
    pipe = stack.client.pipeline(transaction=False)
    for seq in range(max(len(events) for events in per_run)):
        for i, events in enumerate(per_run):
            if seq < len(events):
                kind, payload = events[seq]
                pipe.xadd(stack.keys.events, {"event": encode_event(f"run-{i}", seq, time.time(), kind, payload)})
                count += 1
        if len(pipe) >= 1000:
            last = pipe.execute()[-1]
    if len(pipe):
        last = pipe.execute()[-1]
    return count, last


def session(i: int) -> tuple[str, dict[str, Any]]:
    return "session", {"args": {"epochs": 50}, "name": f"run-{i}", "hub_model_id": model_id(i)}


def dispatcher(redis_url: str, events: int, runs: int) -> float:
    """Entries/s ``trainbus dispatch --burst`` routes from a prefilled stream."""
    epochs = max(1, events // runs - 1)
    with Stack(redis_url) as stack:
        count, last = prefill(
            stack,
            runs,
            lambda i: [session(i), *(("fit_epoch", {"epoch": e, "metrics": METRICS}) for e in range(epochs))],
        )

        def hub_group() -> dict[str, Any] | None:
            groups = stack.client.xinfo_groups(stack.keys.events)
            return next((g for g in groups if g["name"] == b"hub"), None)

        def all_acked() -> bool:
            group = hub_group()
            return group is not None and group["last-delivered-id"] == last and group["pending"] == 0

        proc = stack.dispatcher(burst=True)
        started = wait_until(lambda: hub_group() is not None, 60, "dispatcher start", interval=0.005)
        done = wait_until(all_acked, 600, "dispatch", interval=0.005)
        proc.wait(timeout=60)
        if f"dispatched {count} entries" not in stack.output(proc):
            raise RuntimeError(f"dispatcher did not dispatch all {count} entries:\n{stack.output(proc)}")
        return count / (done - started)


def uploads(redis_url: str, runs: int, workers: int) -> float:
    """Uploads/s that ``workers`` hub-uploads workers complete against the local HUB server."""
    with Stack(redis_url, models=[model_id(i) for i in range(runs)], metrics=0.01, ckpt=0.01) as stack:
        checkpoint = stack.workdir / "last.pt"
        checkpoint.write_bytes(os.urandom(CHECKPOINT_BYTES))
        snapshot = {"source": str(checkpoint), "path": str(checkpoint), "size": CHECKPOINT_BYTES}
        snapshot["sha256"] = hashlib.sha256(checkpoint.read_bytes()).hexdigest()

        def run_events(i: int) -> Events:
            return [
                session(i),
                ("fit_epoch", {"epoch": 0, "metrics": METRICS}),
                ("checkpoint", {"epoch": 0, "is_best": True, "checkpoint": {**snapshot, "label": "best"}}),
                (
                    "final",
                    {"epoch": 0, "metrics": METRICS, "map50_95": 0.4, "checkpoint": {**snapshot, "label": "final"}},
                ),
                ("run_end", {"status": "completed", "error": None}),
            ]

        prefill(stack, runs, run_events)
        for _ in range(workers):
            stack.worker()
        registered = f"rq:workers:{stack.queue}"
        wait_until(lambda: stack.client.scard(registered) == workers, 60, "workers registering", interval=0.1)
        stack.dispatcher()
        expected = runs * UPLOADS_PER_RUN
        try:
            wait_until(lambda: len(stack.hub.uploads()) >= expected, 600, f"{expected} uploads", interval=0.5)
        except TimeoutError:
            print(stack.logs_tail(), file=sys.stderr)
            raise
        times = [r["ts"] for r in stack.hub.uploads()]
        return (len(times) - 1) / (times[-1] - times[0])


def redis_benchmark(redis_url: str, xadds: int) -> float:
    """XADD/s redis-benchmark reaches with 16-deep pipelines, on an event-sized payload."""
    url = urlparse(redis_url)
    if url.scheme == "unix":
        target = ["-s", url.path]
    else:
        target = ["-h", url.hostname or "127.0.0.1", "-p", str(url.port or 6379)]
        if url.scheme == "rediss":
            target.append("--tls")
        if url.path.strip("/"):
            target += ["--dbnum", url.path.strip("/")]
    if url.username:
        target += ["--user", unquote(url.username)]
    if url.password:
        target += ["-a", unquote(url.password)]
    payload = encode_event("run-0", 1, time.time(), "fit_epoch", {"epoch": 1, "metrics": METRICS})
    with Stack(redis_url) as stack:  # for its namespace and cleanup
        key = f"{stack.namespace}:ceiling"
        out = subprocess.run(
            ["redis-benchmark", *target, "-n", str(xadds), "-P", "16", "-q", "XADD", key, "*", "event", payload],
            capture_output=True,
            text=True,
            timeout=600,
            check=True,
        )
    found = re.findall(r"([\d.]+) requests per second", out.stdout)
    if not found:
        raise RuntimeError(f"no rate in redis-benchmark's output:\n{out.stdout}\n{out.stderr}")
    return float(found[-1])


def repeat(measure: Callable[[], float], times: int) -> list[float]:
    return [measure() for _ in range(times)]


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--events", type=int, default=30000, help="events for the producer and dispatcher (30000)")
    parser.add_argument("--runs", type=int, default=20, help="runs the dispatcher's events are spread over (20)")
    parser.add_argument("--upload-runs", type=int, default=100, help="runs (3 uploads each) per worker case (100)")
    parser.add_argument(
        "--workers", default=",".join(map(str, WORKER_COUNTS)), help="worker counts to try, comma-separated (1,2,4)"
    )
    parser.add_argument("--xadds", type=int, default=300000, help="XADDs redis-benchmark sends (300000)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each stage; medians are shown (3)")
    args = parser.parse_args()
    exit_on_sigterm()

    results: list[tuple[str, int, str, list[float]]] = []
    producer_rates = repeat(lambda: producer(args.redis_url, args.events), args.repeats)
    results.append(("producer: hook calls", args.events, "events/s", [hooks for hooks, _ in producer_rates]))
    results.append(("producer: into the stream", args.events, "events/s", [pushed for _, pushed in producer_rates]))
    results.append(
        (
            "dispatcher (--burst)",
            args.events,
            "events/s",
            repeat(lambda: dispatcher(args.redis_url, args.events, args.runs), args.repeats),
        )
    )
    for workers in (int(w) for w in args.workers.split(",")):
        results.append(
            (
                f"hub-uploads: {workers} worker{'s' if workers > 1 else ''}",
                args.upload_runs * UPLOADS_PER_RUN,
                "uploads/s",
                repeat(lambda w=workers: uploads(args.redis_url, args.upload_runs, w), args.repeats),
            )
        )
    ceiling_rates = repeat(lambda: redis_benchmark(args.redis_url, args.xadds), args.repeats)
    results.append(("redis-benchmark XADD -P 16", args.xadds, "XADD/s", ceiling_rates))
    ceiling = statistics.median(ceiling_rates)

    rows = [
        (
            stage,
            items,
            unit,
            statistics.median(rates),
            min(rates),
            max(rates),
            f"{100 * statistics.median(rates) / ceiling:.3g}%",
        )
        for stage, items, unit, rates in results
    ]
    print(f"{args.repeats} repeat(s) per stage; medians, range over the repeats")
    print(table(["stage", "per repeat", "unit", "median", "min", "max", "vs ceiling"], rows))


if __name__ == "__main__":
    main()
