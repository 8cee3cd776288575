"""Drain jobs in RQ's queues: at most one queued per (sink, run), or due at a later time.

A guard key (SET NX) means a job for the run is queued; the job deletes it when it starts,
so new events can queue the next one. Work that must wait (a rate limit, a backoff) is
put in the sink's due set; the dispatcher enqueues it when it is due.
"""

from __future__ import annotations

import redis
from rq import Queue
from rq.serializers import JSONSerializer

from shared.keys import Keys

GUARD_TTL_S = 30  # a queued job older than this is assumed lost (e.g. a Redis restart); the sweep may enqueue again
JOB_TIMEOUT_S = 3600  # a large checkpoint upload may take long
FAILURE_TTL_S = 7 * 24 * 3600
DRAIN_JOB = "workers.pipeline.drain_job.drain"  # stored in each job (``workers.drain_job.drain`` still works)


def queue_for(client: redis.Redis, keys: Keys, sink: str) -> Queue:
    return Queue(keys.queue(sink), connection=client, serializer=JSONSerializer)


def enqueue_drain(client: redis.Redis, keys: Keys, sink: str, run_id: str) -> bool:
    """Queue a drain job unless one is already queued or the run is blocked."""
    if client.exists(keys.blocked(sink, run_id)):
        return False
    if not client.set(keys.guard(sink, run_id), b"1", nx=True, ex=GUARD_TTL_S):
        return False
    queue_for(client, keys, sink).enqueue(
        DRAIN_JOB,
        sink,
        run_id,
        job_timeout=JOB_TIMEOUT_S,
        result_ttl=60,
        failure_ttl=FAILURE_TTL_S,
        description=f"drain {sink} run {run_id}",
    )
    return True


def schedule(client: redis.Redis, keys: Keys, sink: str, run_id: str, at: float) -> None:
    """Ask the dispatcher to enqueue the run's drain job at unix time ``at``."""
    client.zadd(keys.due(sink), {run_id: at})
