"""The one way trainbus connects to Redis, with the timeouts each kind of process needs.

Every client trainbus builds comes from :func:`connect`, so no call can hang: a producer's
delivery process gives up on a socket within seconds (its events stay in the spool), a worker waits
longer (a large pipeline reply), a one-shot command answers or says Redis is not there.
:data:`REDIS_UNAVAILABLE` is what "Redis cannot take this now" looks like, everywhere: the
caller keeps what it has and retries with backoff.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis


@dataclass(frozen=True)
class Timeouts:
    """Seconds: to connect, and for any one reply (``socket``)."""

    connect: float
    socket: float
    health_check: int = 15  # seconds idle before a connection is checked with a PING


PRODUCER = Timeouts(connect=2, socket=5)  # a training process: short, the spool keeps the events
WORKER = Timeouts(connect=5, socket=30)  # dispatcher, drain jobs, RQ workers
COMMAND = Timeouts(connect=5, socket=10)  # trainbus status/failed/groups/..., the exporter, the demo

# Redis cannot take the request now: down, restarting, loading, or full under maxmemory.
REDIS_UNAVAILABLE = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError, redis.OutOfMemoryError)


def connect(url: str, timeouts: Timeouts = WORKER) -> redis.Redis:
    """A client for ``url`` (redis://, rediss://, unix://; passwords and TLS options in the URL)."""
    return redis.Redis.from_url(
        url,
        socket_timeout=timeouts.socket,
        socket_connect_timeout=timeouts.connect,
        health_check_interval=timeouts.health_check,
        retry_on_timeout=False,
    )
