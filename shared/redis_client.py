"""The one way trainbus connects to Redis, with the timeouts each kind of process needs.

Every client trainbus builds comes from :func:`connect`, so no call can hang: a producer's
delivery process gives up on a socket within seconds (its events stay in the spool), a worker waits
longer (a large pipeline reply), a one-shot command answers or says Redis is not there.
:data:`REDIS_UNAVAILABLE` is what "Redis cannot take this now" looks like, everywhere: the
caller keeps what it has and retries with backoff.

A Sentinel URL, ``redis+sentinel://[user:pass@]host1:26379,host2:26379/MASTER/DB`` (``rediss+``
for TLS to the Sentinels and the data nodes alike), gives a client that asks the Sentinels for
the primary on every new connection: after a failover the next try reaches the new primary.
The user and password are the data nodes'; ``?sentinel_username=&sentinel_password=`` are the
Sentinels' own (none by default); ``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile`` and
``ssl_cert_reqs`` query parameters apply to both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import redis
from redis.sentinel import Sentinel

from shared.errors import TrainbusError


@dataclass(frozen=True)
class Timeouts:
    """Seconds: to connect, and for any one reply (``socket``)."""

    connect: float
    socket: float
    health_check: int = 15  # seconds idle before a connection is checked with a PING


PRODUCER = Timeouts(connect=2, socket=5)  # a training process: short, the spool keeps the events
WORKER = Timeouts(connect=5, socket=30)  # dispatcher, drain jobs, RQ workers
COMMAND = Timeouts(connect=5, socket=10)  # trainbus status/failed/groups/..., the exporter, the demo

# Redis cannot take the request now: down, restarting, loading, full under maxmemory, or a replica
# (a primary demoted by a failover, still at the address a plain URL names).
REDIS_UNAVAILABLE = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.BusyLoadingError,
    redis.OutOfMemoryError,
    redis.ReadOnlyError,
)
SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
REPLICA_WAIT_MS = 2000  # how long a WAIT for TRAINBUS_REDIS_MIN_REPLICAS may take before the caller retries
TLS_OPTIONS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs")


class NotReplicated(TrainbusError, redis.ConnectionError):
    """Fewer replicas than TRAINBUS_REDIS_MIN_REPLICAS acknowledged a write: retried like an unavailable Redis."""


@dataclass(frozen=True)
class SentinelUrl:
    """A parsed ``redis+sentinel://`` URL."""

    sentinels: tuple[tuple[str, int], ...]
    master: str
    db: int = 0
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)
    sentinel_username: str | None = field(default=None, repr=False)
    sentinel_password: str | None = field(default=None, repr=False)
    tls: dict[str, Any] = field(default_factory=dict)  # ssl=True and its options, for every connection


def is_sentinel(url: str) -> bool:
    return url.split("://", 1)[0] in SENTINEL_SCHEMES


def parse_sentinel_url(url: str) -> SentinelUrl:
    """Raises ValueError saying what is wrong (never echoing a password)."""
    parts = urlsplit(url)
    hosts = parts.netloc.rpartition("@")[2]
    sentinels = []
    for host in filter(None, hosts.split(",")):
        name, _, port = host.rpartition(":") if ":" in host else (host, "", "26379")
        if not name or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"sentinel address {host!r} is not host:port (e.g. 10.0.0.1:26379)")
        sentinels.append((name.strip("[]"), int(port)))
    if not sentinels:
        raise ValueError("no sentinel addresses (e.g. redis+sentinel://10.0.0.1:26379,10.0.0.2:26379/mymaster/0)")
    path = [p for p in parts.path.split("/") if p]
    if not path or len(path) > 2:
        raise ValueError("the path must be /MASTER_NAME or /MASTER_NAME/DB (e.g. /mymaster/0)")
    if len(path) == 2 and not path[1].isdigit():
        raise ValueError(f"database {path[1][:20]!r} must be a number")
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    tls: dict[str, Any] = {}
    if parts.scheme.startswith("rediss"):
        tls = {"ssl": True, **{k: query[k] for k in TLS_OPTIONS if k in query}}
    return SentinelUrl(
        sentinels=tuple(sentinels),
        master=unquote(path[0]),
        db=int(path[1]) if len(path) == 2 else 0,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        sentinel_username=query.get("sentinel_username"),
        sentinel_password=query.get("sentinel_password"),
        tls=tls,
    )


def sentinel_options(s: SentinelUrl, timeouts: Timeouts) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the data nodes' connection options, the Sentinels' own) for a parsed Sentinel URL."""
    common = {"socket_timeout": timeouts.socket, "socket_connect_timeout": timeouts.connect, **s.tls}
    return common, {**common, "username": s.sentinel_username, "password": s.sentinel_password}


def connect(url: str, timeouts: Timeouts = WORKER) -> redis.Redis:
    """A client for ``url`` (redis://, rediss://, unix://, redis+sentinel://; passwords and TLS
    options in the URL)."""
    if not is_sentinel(url):
        return redis.Redis.from_url(
            url,
            socket_timeout=timeouts.socket,
            socket_connect_timeout=timeouts.connect,
            health_check_interval=timeouts.health_check,
            retry_on_timeout=False,
        )
    s = parse_sentinel_url(url)
    nodes, sentinels = sentinel_options(s, timeouts)
    return Sentinel(list(s.sentinels), sentinel_kwargs=sentinels, **nodes).master_for(
        s.master,
        db=s.db,
        username=s.username,
        password=s.password,
        health_check_interval=timeouts.health_check,
        retry_on_timeout=False,
    )


def replicas_hold(client: redis.Redis, wanted: int) -> bool:
    """Whether ``wanted`` replicas hold every write this client's connection made (WAIT, at most
    REPLICA_WAIT_MS). True at once for 0. Call it right after the write, from the same thread: the
    pool hands that thread the connection it wrote on, and WAIT counts that connection's writes."""
    return not wanted or int(client.wait(wanted, REPLICA_WAIT_MS)) >= wanted
