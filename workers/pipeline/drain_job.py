"""The RQ job that drains one (sink, run): ``workers.pipeline.drain_job.drain``.

At most one such job waits in the queue per (sink, run) (``workers/pipeline/queues.py``),
and at most one runs (a Redis lease that a watchdog thread renews; if the worker dies, the
lease expires and the dispatcher's sweep enqueues the job again). The job does what the
rate limits allow, sleeps through short waits, and for longer ones records when it is due
again; the dispatcher enqueues it then. Retrying is done by this rescheduling (with
backoff in the sink), so RQ's scheduler and Retry are not needed.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import uuid

import redis

from shared.backoff import compute_backoff
from shared.keys import Keys
from shared.redis_client import WORKER, connect
from shared.settings import WorkerSettings
from workers.counters import Counters
from workers.pipeline.queues import queue_for, schedule
from workers.sinks.interface import SinkRefused
from workers.sinks.registry import make_sink

log = logging.getLogger("trainbus.drain_job")

LOCK_TTL_S = 15
INLINE_WAIT_S = 1.0  # waits up to this long are slept inside the job, if no other job is queued
POLL_S = 0.1  # while sleeping inside the job, look for new work this often
JOB_BUDGET_S = 10.0  # then the job hands over to a later one, so workers rotate between runs

RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""


class RedisLease:
    """A lock in Redis (one (sink, run)) that expires unless its watchdog thread renews it."""

    def __init__(self, client: redis.Redis, key: str, ttl: float = LOCK_TTL_S) -> None:
        self.client, self.key, self.ttl = client, key, ttl
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._watchdog: threading.Thread | None = None

    def acquire(self) -> bool:
        if not self.client.set(self.key, self.token, nx=True, px=int(self.ttl * 1000)):
            return False
        self._watchdog = threading.Thread(target=self._renew, daemon=True, name="trainbus-lock")
        self._watchdog.start()
        return True

    def release(self) -> None:
        self._stop.set()
        if self._watchdog is not None:
            self._watchdog.join()
        self.client.eval(RELEASE, 1, self.key, self.token)

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                self.client.eval(RENEW, 1, self.key, self.token, int(self.ttl * 1000))
            except redis.RedisError as exc:  # the next renewal may work; expiry is the fallback
                log.warning("could not renew %s: %s", self.key, exc)


def drain(sink: str, run_id: str) -> str:
    """The job: drain one run in one sink. Raises when the sink refuses for good."""
    settings = worker_settings()
    client = redis_client(settings.redis_url)
    keys = Keys(settings.namespace)
    client.delete(keys.guard(sink, run_id))  # no longer queued: new events may queue another job
    lock = RedisLease(client, keys.lock(sink, run_id))
    if not lock.acquire():
        schedule(client, keys, sink, run_id, time.time() + 1.0)
        return "another worker is draining this run; rescheduled"
    try:
        if client.exists(keys.blocked(sink, run_id)):  # blocked while this job was queued
            return "blocked until `trainbus failed --requeue`"
        target = make_sink(sink, client, keys, settings)
        queue = queue_for(client, keys, sink)
        deadline = time.monotonic() + JOB_BUDGET_S
        while True:
            try:
                wait = target.drain(run_id)
            except SinkRefused:
                raise  # needs a person: the job goes to the failed registry (`trainbus failed`)
            except redis.RedisError:
                raise  # the worker waits for Redis; the sweep enqueues the run again
            except Exception as exc:  # a bug or an error nobody foresaw: retried with backoff, shown in status
                wait = _unexpected(client, keys, sink, run_id, exc)
                schedule(client, keys, sink, run_id, time.time() + wait)
                return f"unexpected error; retry in {wait:.1f} s"
            client.hdel(keys.state(sink, run_id), "error", "errors")
            if wait is None:
                return "done"
            if wait > INLINE_WAIT_S or time.monotonic() + wait > deadline or queue.count:
                schedule(client, keys, sink, run_id, time.time() + wait)  # let other runs have this worker
                Counters(client, keys).rate_limited(sink)
                return f"more in {wait:.1f} s"
            time.sleep(min(wait, POLL_S))
    finally:
        lock.release()


def _unexpected(client: redis.Redis, keys: Keys, sink: str, run_id: str, exc: Exception) -> float:
    """Record an unforeseen failure of a drain and return the backoff before the next try."""
    state = keys.state(sink, run_id)
    attempt = client.hincrby(state, "errors", 1)
    client.hset(state, "error", f"{exc.__class__.__name__}: {exc}"[:500])
    Counters(client, keys).upload(sink, "drain", "error")
    delay = compute_backoff(attempt - 1, base=1.0, cap=300.0)
    log.exception(
        "drain sink=%s run=%s failed unexpectedly (attempt %d); retry in %.1f s", sink, run_id, attempt, delay
    )
    return delay


@functools.cache
def worker_settings() -> WorkerSettings:
    """Read once per worker process, from the worker's environment."""
    return WorkerSettings.from_env()


@functools.cache
def redis_client(url: str) -> redis.Redis:
    """One client per worker process (and per forked horse: a fork gets a fresh pool)."""
    return connect(url, WORKER)
