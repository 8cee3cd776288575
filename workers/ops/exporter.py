"""``trainbus metrics``: the counters every process keeps in Redis, plus the stream lag and queue
depths read at scrape time, as Prometheus metrics."""

from __future__ import annotations

import redis
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from shared.keys import Keys
from workers.counters import LATENCY_BUCKETS_S, SEP
from workers.ops.status import pipeline_status


class RedisCollector:
    """A prometheus_client collector that reads the counters and the pipeline at scrape time."""

    def __init__(self, client: redis.Redis, keys: Keys, sinks: tuple[str, ...]) -> None:
        self.client, self.keys, self.sinks = client, keys, sinks

    def collect(self):
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
        abandoned = GaugeMetricFamily(
            "trainbus_group_abandoned",
            "1 for a consumer group no dispatcher fed for TRAINBUS_GROUP_ABANDON_H",
            labels=["group"],
        )
        for group, info in status["stream"]["groups"].items():
            abandoned.add_metric([group], 1.0 if info["abandoned"] else 0.0)
        yield abandoned
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
