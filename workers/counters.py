"""Counters for Prometheus, kept in Redis so that every process contributes to them.

Drain jobs run in forked work horses on any number of machines, so in-process
prometheus_client counters would be lost with each horse. Instead each process increments
fields of one Redis hash (``<ns>:metrics``), and ``trainbus metrics`` serves them
(``workers/ops/exporter.py``).
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
