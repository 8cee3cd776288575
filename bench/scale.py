"""Scale: many concurrent runs through one pipeline, how long delivery takes, what Redis holds.

    python bench/scale.py                                  # --runs 1,10,100 --epochs 50: about 1 minute
    python bench/scale.py --runs 1,10 --epochs 10          # a quick look
    python bench/scale.py --runs 1,10,100,300 --workers 4 --rate-metrics 3 --rate-ckpt 30   # nearer HUB's limits

For each scale, a fresh namespace: the local HUB server with one model per run, --dispatchers
dispatchers and --workers hub-uploads workers, then that many runs trained side by side by
Publishers in this process: every --epoch-s seconds each run publishes its epoch's metrics and
rewrites its --ckpt-kb checkpoint in place and publishes it; after --epochs epochs, the final
(best checkpoint) and the run's end. Rate limits are small (--rate-*) so it fits in minutes; they
still hold back, coalesce and supersede work the way HUB's 3 s / 900 s limits do.

Delivery table, per scale:
  events          what the producers published (2 x epochs + 3 per run)
  delivered s     from the first hook call until HUB received every epoch's metrics and every final
  after last s    of which after the last hook call (the drain time)
  metrics reqs    metrics requests (epochs/req: how many epochs each carried on average;
                  sent twice: epochs HUB received more than once, 0 unless a request was redone)
  ckpt uploads    periodic checkpoint uploads; the rest were superseded (latest wins)
  min gap         the smallest gap between two metrics requests (and two checkpoint uploads)
                  of one model, from the HUB server's arrival times; "limits held" is no when a
                  gap is shorter than the limit minus 30 ms (arrival jitter; slots are taken
                  in the worker before the request)

Memory table, per scale. Redis is shared, so two measures:
  ns KiB          bytes of this namespace's keys: MEMORY USAGE summed over <ns>:* and RQ's keys
                  for the namespace's queue, workers and jobs; sampled every --sample-s by a
                  thread, "peak" is the largest sample
  server MiB      INFO used_memory of the whole server at the same moments (others' keys too)
"before": dispatchers and workers idle. "after": everything delivered, every producer closed,
every run finished in the HUB sink (its state set to expire) and the stream trimmed (one
`trainbus dispatch --burst` round trims at once; a running dispatcher does so every 30 s).
"lasting": the part of "after" with no TTL or one over an hour: per-run state stays 7 days
after the run's end (RUN_STATE_TTL_S, PUSHED_TTL_S in shared/keys.py), while RQ's finished
jobs and results go after 60 s. The keys left after the largest scale are listed by kind.
Growth per run and per event: least-squares slope over the scales (divided with one scale).
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import itertools

from bench.procs import Stack, arguments, epoch_metrics, exit_on_sigterm, model_id, table, wait_until

GAP_TOLERANCE_S = 0.03
LASTING_TTL_S = 3600  # keys without a TTL or with a longer one stay: per-run state lives 7 days
KEY_KINDS = [
    (re.compile(r"run-\d+"), "<run>"),
    (re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"), "<job>"),
]


@dataclass
class Memory:
    """Namespace bytes and server used_memory at one moment."""

    ns: int
    server: int


class Sampler:
    """A thread sampling Memory every ``interval`` seconds until stopped."""

    def __init__(self, stack: Stack, interval: float) -> None:
        self.stack = stack
        self.interval = interval
        self.samples: list[Memory] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.samples.append(memory(self.stack))


def key_sizes(stack: Stack) -> dict[str, tuple[int, int]]:
    """Each key of the namespace -> (MEMORY USAGE bytes, TTL seconds or -1)."""
    keys = stack.owned_keys()
    pipe = stack.client.pipeline(transaction=False)
    for key in keys:
        pipe.memory_usage(key)
        pipe.ttl(key)
    replies = pipe.execute()
    sizes = {}
    for key, size, ttl in zip(keys, replies[::2], replies[1::2], strict=True):
        if size is not None:  # expired between the scan and now
            sizes[key.decode()] = (size, ttl)
    return sizes


def memory(stack: Stack) -> Memory:
    ns = sum(size for size, _ in key_sizes(stack).values())
    return Memory(ns, stack.client.info("memory")["used_memory"])


def kinds(stack: Stack, sizes: dict[str, tuple[int, int]]) -> list[tuple[str, int, int, str]]:
    """Keys grouped by kind (run and job ids replaced): kind, count, bytes, TTL range."""
    groups: dict[str, list[tuple[int, int]]] = {}
    for key, size_ttl in sizes.items():
        kind = key.replace(stack.namespace, "<ns>")
        for pattern, replacement in KEY_KINDS:
            kind = pattern.sub(replacement, kind)
        groups.setdefault(kind, []).append(size_ttl)
    rows = []
    for kind, entries in sorted(groups.items(), key=lambda item: -sum(s for s, _ in item[1])):
        ttls = sorted(ttl for _, ttl in entries)
        ttl = "none" if ttls[-1] < 0 else f"{ttls[0]}-{ttls[-1]} s" if ttls[0] != ttls[-1] else f"{ttls[0]} s"
        rows.append((kind, len(entries), sum(s for s, _ in entries), ttl))
    return rows


@dataclass
class Scale:
    runs: int
    events: int
    delivered_s: float
    after_last_s: float
    metrics_requests: int
    epochs_per_request: float
    epochs_twice: int
    ckpt_uploads: int
    superseded: int
    min_metrics_gap: float
    min_ckpt_gap: float
    limits_held: bool
    before: Memory
    peak: Memory
    after: Memory
    lasting: int  # namespace bytes "after" that have no TTL or one over LASTING_TTL_S
    left: list[tuple[str, int, int, str]]


def min_gap(times_by_model: dict[str, list[float]]) -> float:
    gaps = [b - a for times in times_by_model.values() for a, b in itertools.pairwise(times)]
    return min(gaps) if gaps else float("nan")


def by_model(requests: list[dict]) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {}
    for r in requests:
        times.setdefault(r["model"], []).append(r["ts"])
    return {model: sorted(ts) for model, ts in times.items()}


def train(stack: Stack, runs: int, epochs: int, epoch_s: float, ckpt_bytes: int) -> tuple[float, float]:
    """Every run's epochs side by side; returns (first hook call, last hook call) as time.time()."""
    buses = [stack.publisher(f"run-{i}", hub_model=model_id(i)) for i in range(runs)]
    paths = [stack.workdir / f"run-{i}" / "last.pt" for i in range(runs)]
    for path in paths:
        path.parent.mkdir()
    filler = bytes(ckpt_bytes)
    start = time.time()
    for epoch in range(epochs):
        for bus, path in zip(buses, paths, strict=True):
            bus.metrics(epoch, epoch_metrics(epoch))
            path.write_bytes(epoch.to_bytes(4, "big") + filler)  # in place, as Ultralytics saves
            bus.checkpoint(path, epoch)
        time.sleep(max(0.0, start + (epoch + 1) * epoch_s - time.time()))
    for bus, path in zip(buses, paths, strict=True):
        bus.final(path, epochs - 1, epoch_metrics(epochs - 1), map50_95=0.5)
        bus.end()
    last = time.time()
    for bus in buses:
        bus.close(timeout=30)
    return start, last


def measure(args: argparse.Namespace, runs: int) -> Scale:
    rates = {"metrics": args.rate_metrics, "ckpt": args.rate_ckpt, "heartbeat": args.rate_heartbeat}
    with Stack(args.redis_url, models=[model_id(i) for i in range(runs)], **rates) as stack:
        for _ in range(args.dispatchers):
            stack.dispatcher()
        for _ in range(args.workers):
            stack.worker()
        registered = f"rq:workers:{stack.queue}"
        wait_until(lambda: stack.client.scard(registered) == args.workers, 60, "workers registering")
        before = memory(stack)
        with Sampler(stack, args.sample_s) as sampler:
            start, last = train(stack, runs, args.epochs, args.epoch_s, args.ckpt_kb * 1024)

            def delivered() -> bool:
                epochs = {(r["model"], e) for r in stack.hub.requests("metrics") for e in r["metrics"]}
                finals = [r for r in stack.hub.requests("upload") if r["fields"].get("type") == "final"]
                return len(epochs) == runs * args.epochs and len(finals) == runs

            try:
                done = wait_until(delivered, args.timeout, f"{runs} runs delivered", interval=0.2)
            except TimeoutError:
                print(stack.logs_tail(), file=sys.stderr)
                raise
        active = stack.keys.active("hub")  # a run leaves it when the sink lets its state expire
        wait_until(lambda: stack.client.scard(active) == 0, args.timeout, "every run finished in the HUB sink")
        trimmer = stack.dispatcher(burst=True)
        trimmer.wait(timeout=60)
        wait_until(lambda: stack.client.xlen(stack.keys.events) == 0, 60, "stream trimmed")
        sizes = key_sizes(stack)
        after = Memory(sum(size for size, _ in sizes.values()), stack.client.info("memory")["used_memory"])
        samples = [before, *sampler.samples, after]
        metrics = stack.hub.requests("metrics")
        ckpts = [r for r in stack.hub.requests("upload") if r["fields"].get("type") == "epoch"]
        metrics_gap, ckpt_gap = min_gap(by_model(metrics)), min_gap(by_model(ckpts))
        return Scale(
            runs=runs,
            events=runs * (2 * args.epochs + 3),
            delivered_s=done - start,
            after_last_s=done - last,
            metrics_requests=len(metrics),
            epochs_per_request=sum(len(r["metrics"]) for r in metrics) / len(metrics),
            epochs_twice=sum(len(r["metrics"]) for r in metrics) - runs * args.epochs,
            ckpt_uploads=len(ckpts),
            superseded=runs * args.epochs - len(ckpts),
            min_metrics_gap=metrics_gap,
            min_ckpt_gap=ckpt_gap,
            limits_held=not (
                metrics_gap < args.rate_metrics - GAP_TOLERANCE_S or ckpt_gap < args.rate_ckpt - GAP_TOLERANCE_S
            ),
            before=before,
            peak=Memory(max(m.ns for m in samples), max(m.server for m in samples)),
            after=after,
            lasting=sum(size for size, ttl in sizes.values() if ttl < 0 or ttl > LASTING_TTL_S),
            left=kinds(stack, sizes),
        )


def per_run(scales: list[Scale], growth: list[float]) -> float:
    """Bytes per run: the least-squares slope of ``growth`` over the scales' run counts."""
    runs = [s.runs for s in scales]
    if len(set(runs)) == 1:
        return statistics.mean(g / r for r, g in zip(runs, growth, strict=True))
    return statistics.linear_regression(runs, growth).slope


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--runs", default="1,10,100", help="concurrent runs per scale, comma-separated (1,10,100)")
    parser.add_argument("--epochs", type=int, default=50, help="epochs per run (50)")
    parser.add_argument("--epoch-s", type=float, default=0.2, help="seconds per epoch (0.2)")
    parser.add_argument("--ckpt-kb", type=int, default=64, help="checkpoint size in KiB (64)")
    parser.add_argument("--dispatchers", type=int, default=1, help="dispatcher processes (1)")
    parser.add_argument("--workers", type=int, default=2, help="hub-uploads worker processes (2)")
    parser.add_argument("--rate-metrics", type=float, default=0.5, help="TRAINBUS_RATE_METRICS seconds (0.5)")
    parser.add_argument("--rate-ckpt", type=float, default=2.0, help="TRAINBUS_RATE_CKPT seconds (2)")
    parser.add_argument("--rate-heartbeat", type=float, default=5.0, help="TRAINBUS_RATE_HEARTBEAT seconds (5)")
    parser.add_argument("--sample-s", type=float, default=0.5, help="memory sampling interval (0.5)")
    parser.add_argument("--timeout", type=float, default=600, help="give up a scale after this many seconds (600)")
    args = parser.parse_args()
    exit_on_sigterm()

    scales = []
    for runs in (int(r) for r in args.runs.split(",")):
        scales.append(measure(args, runs))
        print(f"{runs} run(s) done in {scales[-1].delivered_s:.1f} s", file=sys.stderr, flush=True)

    print(
        f"{args.epochs} epochs of {args.epoch_s} s per run; rates metrics {args.rate_metrics} s, "
        f"ckpt {args.rate_ckpt} s, heartbeat {args.rate_heartbeat} s; "
        f"{args.dispatchers} dispatcher(s), {args.workers} worker(s)\n"
    )
    print(
        table(
            [
                "runs",
                "events",
                "delivered s",
                "after last s",
                "metrics reqs",
                "epochs/req",
                "sent twice",
                "ckpt uploads",
                "superseded",
                "min metrics gap s",
                "min ckpt gap s",
                "limits held",
            ],
            [
                (
                    s.runs,
                    s.events,
                    s.delivered_s,
                    s.after_last_s,
                    s.metrics_requests,
                    s.epochs_per_request,
                    s.epochs_twice,
                    s.ckpt_uploads,
                    s.superseded,
                    s.min_metrics_gap,
                    s.min_ckpt_gap,
                    "yes" if s.limits_held else "NO",
                )
                for s in scales
            ],
        )
    )
    print()
    kib, mib = 1024, 1024 * 1024
    print(
        table(
            ["runs", "ns KiB before", "peak", "after", "lasting", "server MiB before", "peak", "after"],
            [
                (
                    s.runs,
                    s.before.ns / kib,
                    s.peak.ns / kib,
                    s.after.ns / kib,
                    s.lasting / kib,
                    s.before.server / mib,
                    s.peak.server / mib,
                    s.after.server / mib,
                )
                for s in scales
            ],
        )
    )
    print(f"lasting: the part of 'after' with no TTL or one over {LASTING_TTL_S} s (the rest is RQ's 60 s results)")
    largest = scales[-1]
    print(f"\nkeys left after {largest.runs} run(s):")
    print(table(["key", "count", "bytes", "TTL"], largest.left))
    events_per_run = 2 * args.epochs + 3
    for label, growth in (
        ("at peak", [s.peak.ns - s.before.ns for s in scales]),
        ("lasting 7 days after delivery", [s.lasting - s.before.ns for s in scales]),
    ):
        bytes_per_run = per_run(scales, growth)
        print(
            f"namespace memory {label}: {bytes_per_run:,.0f} bytes per run, "
            f"{bytes_per_run / events_per_run:,.0f} bytes per event ({events_per_run} events per run)"
        )


if __name__ == "__main__":
    main()
