"""The RQ worker classes trainbus runs: ``rq worker hub-uploads -w workers.pipeline.rq_worker.Worker ...``.

RQ's work loop quits on any unexpected Redis error (a Redis restart, a failover), which
leaves a queue without a worker until something restarts the process. This worker waits
for Redis to answer again and re-enters the loop. (Jobs are JSON: with
``-S rq.serializers.JSONSerializer`` a pickled payload fails to decode, it is never unpickled.)
"""

from __future__ import annotations

import importlib
import logging
import sys
import time
from collections.abc import Mapping
from typing import Any

import redis
import rq

from shared.backoff import compute_backoff
from shared.errors import SettingsError
from shared.redis_client import REDIS_UNAVAILABLE
from shared.settings import WorkerSettings
from shared.sinks import FORKING, SINKS
from workers.pipeline import drain_job  # noqa: F401 - preloaded, see below

# The sinks that run in forked work horses are imported here, in the worker, so that each
# horse has them already instead of importing them per job (about 40 ms: half the cost of a
# small upload).
for _entry in SINKS.values():
    if _entry.worker == FORKING:
        importlib.import_module(_entry.sink.partition(":")[0])

log = logging.getLogger("trainbus.worker")


class OutlivesRedisRestarts:
    """Mixed into RQ's worker classes: wait for Redis and re-enter the loop instead of exiting."""

    connection: redis.Redis
    name: str
    _stop_requested: bool
    _shutdown_requested_date: object | None  # set by RQ on SIGINT/SIGTERM, busy or idle

    def work(self, burst: bool = False, *args: Any, **kwargs: Any) -> bool:
        show_trainbus_logs()
        try:
            WorkerSettings.from_env()  # a bad setting stops the worker here, not every job later
        except SettingsError as exc:
            log.error("worker %s: bad setting %s", self.name, exc)
            raise SystemExit(2) from None
        attempt = 0
        while True:
            try:
                worked = super().work(burst, *args, **kwargs)  # type: ignore[misc]
            except REDIS_UNAVAILABLE as exc:  # raised by RQ's own clean-up when Redis is gone
                log.warning("worker %s: Redis unavailable (%s)", self.name, exc)
                worked = False
            stopping = self._stop_requested or self._shutdown_requested_date is not None
            if burst or stopping or kwargs.get("max_jobs") or kwargs.get("max_idle_time"):
                return worked
            while not self._redis_answers():
                delay = compute_backoff(attempt, base=0.5, cap=30.0)
                log.warning("worker %s: waiting %.1f s for Redis to answer", self.name, delay)
                time.sleep(delay)
                attempt += 1
            attempt = 0
            log.warning("worker %s: Redis answers again; re-entering the work loop", self.name)

    def _redis_answers(self) -> bool:
        """Ping; once it answers, clear this worker's stale registration so it can register again."""
        try:
            self.connection.ping()
            self.register_death()  # type: ignore[attr-defined]
            return True
        except REDIS_UNAVAILABLE:
            return False


class Worker(OutlivesRedisRestarts, rq.Worker):
    """The forking worker, for ``hub-uploads``: each job in a fresh work horse."""


class SimpleWorker(OutlivesRedisRestarts, rq.SimpleWorker):
    """The non-forking worker, for ``clearml``: ClearML tasks and the SDK's queues live in the
    worker process between jobs (a forked horse would lose what the SDK had not sent)."""


# A SIGKILLed job is found abandoned only by another worker's maintenance pass; these make it
# minutes sooner than RQ's defaults (the dispatcher's sweep redoes the work sooner still).
WORKER_FLAGS = (
    "-S",
    "rq.serializers.JSONSerializer",
    "--worker-ttl",
    "30",
    "--maintenance-interval",
    "5",
    "--job-monitoring-interval",
    "5",
)


def worker_command(queue: str, sink: str) -> list[str]:
    """The documented ``rq worker`` command for a sink's queue (as in docker-compose.yml).

    Redis comes from ``RQ_REDIS_URL`` in the environment (see :func:`worker_env`), not ``-u``:
    a password on a command line shows in ``ps``.
    """
    return [sys.executable, "-m", "rq.cli", "worker", queue, "-w", SINKS[sink].worker, *WORKER_FLAGS]


def worker_env(env: Mapping[str, str], redis_url: str) -> dict[str, str]:
    """``env`` with the Redis URL where both RQ (``RQ_REDIS_URL``) and trainbus read it."""
    return {**env, "RQ_REDIS_URL": redis_url, "TRAINBUS_REDIS_URL": redis_url}


def show_trainbus_logs(level: int = logging.INFO) -> None:
    """One line per upload outcome (``upload sink=hub run=... outcome=ok``) on stderr."""
    logger = logging.getLogger("trainbus")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(level)
        logger.propagate = False  # the root logger may have a handler too (basicConfig)
