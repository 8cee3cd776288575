"""Hook-to-HUB latency: how long an epoch's metrics take from the hook call to HUB's receipt,
when no rate limit holds them back.

    python bench/latency.py                               # 100 events 200 ms apart: about 25 s
    python bench/latency.py --events 1000 --interval 0.1  # more samples for the p99

One Publisher calls metrics() --events times, --interval seconds apart (more than the metrics
rate limit, TRAINBUS_RATE_METRICS = --rate, so each epoch can go out on its own); one dispatcher
and one hub-uploads worker run against the local HUB server, which records every request's
arrival time and the epochs it carried. Each epoch is matched to the request that carried it.
Everything runs on this machine, so the hook's time.time(), Redis' clock (stream entry ids)
and the HUB server's time.time() are one clock.

Rows (p50, p99 and max over the events):
  hook -> stream   from the hook call to the entry's XADD: the spool, the delivery process's
                   wake-up and its pipelined push (the stream id has whole milliseconds, so
                   this reads up to 1 ms low; below 1 ms it can be negative)
  stream -> HUB    from the XADD to HUB's receipt: the dispatcher's read (it blocks 100 ms at
                   most), the drain job (one forked RQ job per wake-up) and the HTTP request
  hook -> HUB      the whole way

Also printed: how many HUB requests carried more than one epoch, i.e. an epoch was held back
(by the rate limit, or a job still running when the next epoch came).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.procs import Stack, arguments, epoch_metrics, exit_on_sigterm, model_id, percentile, table, wait_until

KEEP_GROUP = "bench-keep"  # a consumer group that never reads: the dispatcher's trim keeps every entry


def measure(redis_url: str, events: int, interval: float, rate: float) -> tuple[dict[str, list[float]], int]:
    """Per-stage latencies in ms, and the number of HUB requests that carried more than one epoch."""
    model = model_id(0)
    with Stack(redis_url, models=[model], metrics=rate, heartbeat=3600) as stack:
        stack.client.xgroup_create(stack.keys.events, KEEP_GROUP, id="0", mkstream=True)
        stack.dispatcher()
        stack.worker()
        wait_until(lambda: stack.client.scard(f"rq:workers:{stack.queue}") == 1, 60, "worker registering")
        bus = stack.publisher("latency", hub_model=model)
        hooked: dict[int, float] = {}
        for epoch in range(events):
            hooked[epoch] = time.time()
            bus.metrics(epoch, epoch_metrics(epoch))
            time.sleep(interval)
        received: dict[int, float] = {}

        def all_received() -> bool:
            for request in stack.hub.requests("metrics"):
                for epoch in request["metrics"]:
                    received.setdefault(int(epoch), request["ts"])
            return len(received) == events

        try:
            wait_until(all_received, 60, f"HUB receiving {events} epochs", interval=0.2)
        except TimeoutError:
            print(stack.logs_tail(), file=sys.stderr)
            raise
        on_stream = {}
        for entry_id, fields in stack.client.xrange(stack.keys.events):
            event = orjson.loads(fields[b"event"])
            if event["type"] == "fit_epoch":
                on_stream[event["payload"]["epoch"]] = int(entry_id.split(b"-")[0]) / 1000
        coalesced = sum(len(r["metrics"]) > 1 for r in stack.hub.requests("metrics"))
    stages = {
        "hook -> stream": [on_stream[e] - hooked[e] for e in range(events)],
        "stream -> HUB": [received[e] - on_stream[e] for e in range(events)],
        "hook -> HUB": [received[e] - hooked[e] for e in range(events)],
    }
    return {name: [s * 1000 for s in samples] for name, samples in stages.items()}, coalesced


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--events", type=int, default=100, help="metrics events to publish (100)")
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between events (0.2)")
    parser.add_argument("--rate", type=float, default=0.05, help="TRAINBUS_RATE_METRICS for the worker (0.05)")
    args = parser.parse_args()
    if args.interval <= args.rate:
        parser.error("--interval must be longer than --rate, or the rate limit holds events back")
    exit_on_sigterm()
    stages, coalesced = measure(args.redis_url, args.events, args.interval, args.rate)
    rows = [(name, len(ms), statistics.median(ms), percentile(ms, 99), max(ms), min(ms)) for name, ms in stages.items()]
    print(f"{args.events} metrics events {args.interval * 1000:.0f} ms apart, TRAINBUS_RATE_METRICS={args.rate}")
    print(table(["stage", "events", "p50 ms", "p99 ms", "max ms", "min ms"], rows))
    print(f"HUB requests carrying more than one epoch (held back): {coalesced}")


if __name__ == "__main__":
    main()
