"""Container healthchecks (``trainbus health``): is this host's process doing its job, seen from Redis.

A worker is healthy when an RQ worker started on this host serves the sink's queue and sent a
heartbeat recently; the dispatcher when its consumer (named after this host) recently finished a
round of reads of every sink's consumer group. Each returns None when healthy, else what is wrong, in one line.
"""

from __future__ import annotations

import socket
import time
from datetime import datetime, timezone

import redis
import rq

from shared.keys import Keys


def worker_problem(client: redis.Redis, keys: Keys, sink: str, within_s: float) -> str | None:
    queue = keys.queue(sink)
    host = socket.gethostname()
    now = datetime.now(timezone.utc)
    ages = [
        (now - w.last_heartbeat.replace(tzinfo=w.last_heartbeat.tzinfo or timezone.utc)).total_seconds()
        for w in rq.Worker.all(connection=client, queue=rq.Queue(queue, connection=client))
        if w.hostname == host and w.last_heartbeat is not None
    ]
    if any(age <= within_s for age in ages):
        return None
    said = f"last heartbeat {min(ages):.0f} s ago" if ages else "none registered"
    return f"no live worker of queue {queue} on {host} ({said})"


def dispatcher_problem(client: redis.Redis, keys: Keys, within_s: float) -> str | None:
    """Dispatchers are named ``<hostname>-<pid>`` and note the time every 5 s, after a round of reads."""
    host = socket.gethostname()
    now = time.time()
    ages = [
        now - float(at) for name, at in client.hgetall(keys.dispatchers).items() if name.startswith(f"{host}-".encode())
    ]
    if any(age <= within_s for age in ages):
        return None
    said = f"last read {min(ages):.0f} s ago" if ages else "none seen"
    return f"no dispatcher on {host} reading {keys.events} ({said})"
