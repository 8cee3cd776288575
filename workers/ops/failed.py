"""``trainbus failed``: drain jobs that failed for good, with their reasons, and requeueing.

A drain job fails when HUB refuses in a way retrying cannot fix (bad key, unknown model,
file too large): the run is marked blocked so that no more jobs pile up for it, and the
job stays in RQ's failed registry. Its arguments (sink, run) and the work recorded in
Redis are all that is needed to try again once the cause is fixed.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import redis
from rq.job import Job
from rq.registry import FailedJobRegistry
from rq.serializers import JSONSerializer

from shared.keys import Keys
from workers.pipeline.queues import queue_for


@dataclass
class FailedDrain:
    job_id: str
    sink: str
    run_id: str
    ended_at: datetime | None
    reason: str


def failed_drains(client: redis.Redis, keys: Keys, sinks: tuple[str, ...]) -> list[FailedDrain]:
    found = []
    for sink in sinks:
        registry = FailedJobRegistry(queue=queue_for(client, keys, sink))
        for job_id in registry.get_job_ids():
            try:
                job = Job.fetch(job_id, connection=client, serializer=JSONSerializer)
            except Exception as exc:  # a job we cannot even read is worth showing, not crashing on
                found.append(FailedDrain(job_id, sink, "?", None, f"unreadable job: {exc}"))
                continue
            run_id = job.args[1] if len(job.args) > 1 else "?"
            found.append(FailedDrain(job_id, sink, run_id, job.ended_at, _reason(job)))
    return found


def requeue_failed(client: redis.Redis, keys: Keys, sinks: tuple[str, ...]) -> list[FailedDrain]:
    """Unblock each failed run (and a sink's refused API key) and send its job again."""
    for sink in sinks:  # a refused key blocks every run of it: once fixed, all may go again
        refused = list(client.scan_iter(match=keys.blocked(sink, "key-*"), count=1000))
        if refused:
            client.delete(*refused)
    requeued = []
    for drain in failed_drains(client, keys, sinks):
        client.delete(keys.blocked(drain.sink, drain.run_id))
        FailedJobRegistry(queue=queue_for(client, keys, drain.sink)).requeue(drain.job_id)
        requeued.append(drain)
    return requeued


def _reason(job: Job) -> str:
    result = job.latest_result()
    text = (getattr(result, "exc_string", None) or "").strip()
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no reason recorded"
