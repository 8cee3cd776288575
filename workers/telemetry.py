"""Counters for Prometheus, kept in Redis so that every process contributes to them.

Drain jobs run in forked work horses on any number of machines, so in-process
prometheus_client counters would be lost with each horse. Instead each process increments
fields of one Redis hash (``<ns>:metrics``), and ``trainbus metrics`` serves them, with
the stream lag and queue depths read at scrape time, on ``/metrics``.
"""

from __future__ import annotations

import bisect

import redis

from shared.keys import Keys

LATENCY_BUCKETS_S = (0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)
SEP = "|"


class Counters:
    """Increments in the shared hash; fields are ``name|label|label...``."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.client = client
        self.key = keys.metrics

    def dispatched(self, sink: str, entries: int) -> None:
        self.client.hincrby(self.key, f"dispatched{SEP}{sink}", entries)

    def dead_lettered(self, sink: str) -> None:
        self.client.hincrby(self.key, f"dead_letters{SEP}{sink}", 1)

    def upload(self, sink: str, kind: str, outcome: str, count: int = 1) -> None:
        """``outcome``: ok, retry (a retryable failure) or failed (needs a person)."""
        self.client.hincrby(self.key, f"uploads{SEP}{sink}{SEP}{kind}{SEP}{outcome}", count)

    def rate_limited(self, sink: str) -> None:
        """A drain job found its next upload held back by a rate limit or a backoff."""
        self.client.hincrby(self.key, f"rate_limit_waits{SEP}{sink}", 1)

    def latency(self, sink: str, kind: str, seconds: float) -> None:
        """Hook-to-upload latency: from the event's timestamp to the upload's success."""
        bucket = bisect.bisect_left(LATENCY_BUCKETS_S, seconds)
        pipe = self.client.pipeline(transaction=False)
        pipe.hincrby(self.key, f"latency_bucket{SEP}{sink}{SEP}{kind}{SEP}{bucket}", 1)
        pipe.hincrbyfloat(self.key, f"latency_sum{SEP}{sink}{SEP}{kind}", seconds)
        pipe.hincrby(self.key, f"latency_count{SEP}{sink}{SEP}{kind}", 1)
        pipe.execute()


class RedisCollector:
    """A prometheus_client collector that reads the counters and the pipeline at scrape time."""

    def __init__(self, client: redis.Redis, keys: Keys, sinks: tuple[str, ...]) -> None:
        self.client, self.keys, self.sinks = client, keys, sinks

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        from workers.status import pipeline_status

        fields = {k.decode(): v.decode() for k, v in self.client.hgetall(self.key).items()}
        counters = {
            "dispatched": CounterMetricFamily(
                "trainbus_events_dispatched", "Stream entries dispatched", labels=["sink"]
            ),
            "dead_letters": CounterMetricFamily(
                "trainbus_dead_letters", "Entries and uploads dead-lettered", labels=["sink"]
            ),
            "uploads": CounterMetricFamily(
                "trainbus_uploads", "Upload attempts by outcome (ok, retry, failed)", labels=["sink", "kind", "outcome"]
            ),
            "rate_limit_waits": CounterMetricFamily(
                "trainbus_rate_limit_waits", "Drain jobs held back by a rate limit or backoff", labels=["sink"]
            ),
        }
        latency: dict[tuple[str, str], dict] = {}
        for field, value in fields.items():
            name, *labels = field.split(SEP)
            if name in counters:
                counters[name].add_metric(labels, float(value))
            elif name.startswith("latency_"):
                entry = latency.setdefault((labels[0], labels[1]), {"buckets": [0] * (len(LATENCY_BUCKETS_S) + 1)})
                if name == "latency_bucket":
                    entry["buckets"][int(labels[2])] += int(value)
                else:
                    entry[name] = float(value)
        yield from counters.values()
        histogram = HistogramMetricFamily(
            "trainbus_hook_to_upload_seconds", "From the hook's event to its successful upload", labels=["sink", "kind"]
        )
        for (sink, kind), entry in sorted(latency.items()):
            cumulative, buckets = 0, []
            for bound, count in zip((*LATENCY_BUCKETS_S, float("inf")), entry["buckets"], strict=True):
                cumulative += count
                buckets.append(("+Inf" if bound == float("inf") else str(bound), cumulative))
            histogram.add_metric([sink, kind], buckets, entry.get("latency_sum", 0.0))
        yield histogram
        status = pipeline_status(self.client, self.keys, self.sinks)
        yield GaugeMetricFamily(
            "trainbus_stream_length", "Entries in the event stream", value=status["stream"]["length"]
        )
        lag = GaugeMetricFamily("trainbus_stream_lag", "Entries a consumer group has not read yet", labels=["group"])
        pending = GaugeMetricFamily("trainbus_stream_pending", "Entries read but not acknowledged", labels=["group"])
        for group, info in status["stream"]["groups"].items():
            lag.add_metric([group], float(info["lag"] or 0))
            pending.add_metric([group], float(info["pending"] or 0))
        yield lag
        yield pending
        depth = GaugeMetricFamily("trainbus_queue_depth", "Jobs waiting in an RQ queue", labels=["queue"])
        failed = GaugeMetricFamily("trainbus_failed_jobs", "Jobs in an RQ queue's failed registry", labels=["queue"])
        for queue in status["queues"].values():
            depth.add_metric([queue["name"]], queue["queued"])
            failed.add_metric([queue["name"]], queue["failed"])
        yield depth
        yield failed

    @property
    def key(self) -> str:
        return self.keys.metrics
