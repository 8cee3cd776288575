"""The RQ worker classes trainbus runs: ``rq worker hub-uploads`` with RQ_WORKER_CLASS set.

``RQ_WORKER_CLASS=workers.pipeline.rq_worker.SinkWorker`` (the image sets it; ``trainbus worker
SINK`` does too) makes the plain command right for every sink: it picks the forking worker or
the in-process one by the queue's sink, reads jobs as JSON (a pickled payload fails to decode,
it is never unpickled) and takes trainbus's heartbeat and maintenance intervals, unless they
are given on the command line.

RQ's work loop quits on any unexpected Redis error (a Redis restart, a failover), which
leaves a queue without a worker until something restarts the process. These workers wait
for Redis to answer again and re-enter the loop.
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
from rq.defaults import DEFAULT_JOB_MONITORING_INTERVAL, DEFAULT_MAINTENANCE_TASK_INTERVAL, DEFAULT_WORKER_TTL
from rq.serializers import DefaultSerializer, JSONSerializer, resolve_serializer

from shared.backoff import compute_backoff
from shared.errors import SettingsError
from shared.redis_client import REDIS_UNAVAILABLE, is_sentinel
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

# A SIGKILLed job is found abandoned only by another worker's maintenance pass; these make it
# minutes sooner than RQ's defaults (the dispatcher's sweep redoes the work sooner still).
OURS = {"worker_ttl": 30, "maintenance_interval": 5, "job_monitoring_interval": 5}
RQ_DEFAULTS = {
    "worker_ttl": DEFAULT_WORKER_TTL,
    "maintenance_interval": DEFAULT_MAINTENANCE_TASK_INTERVAL,
    "job_monitoring_interval": DEFAULT_JOB_MONITORING_INTERVAL,
}


class OutlivesRedisRestarts:
    """Mixed into RQ's worker classes: trainbus's defaults, and wait for Redis and re-enter the loop
    instead of exiting."""

    connection: redis.Redis
    name: str
    _stop_requested: bool
    _shutdown_requested_date: object | None  # set by RQ on SIGINT/SIGTERM, busy or idle

    def __init__(self, queues: Any, *args: Any, **kwargs: Any) -> None:
        """JSON jobs, and OURS for each interval left at RQ's default (``rq worker QUEUE`` as typed)."""
        if resolve_serializer(kwargs.get("serializer")) is DefaultSerializer:
            kwargs["serializer"] = JSONSerializer
            for queue in queues if isinstance(queues, (list, tuple)) else [queues]:
                if isinstance(queue, rq.Queue):
                    queue.serializer = resolve_serializer(JSONSerializer)
        for name, ours in OURS.items():
            if kwargs.get(name) in (None, RQ_DEFAULTS[name]):
                kwargs[name] = ours
        super().__init__(queues, *args, **kwargs)  # type: ignore[call-arg]

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


class SinkWorker(Worker):
    """RQ_WORKER_CLASS for any trainbus queue: this forking worker, or a :class:`SimpleWorker` when the
    queue's sink keeps state in the worker process (``shared/sinks.py``)."""

    def __new__(cls, queues: Any, *args: Any, **kwargs: Any) -> Worker | SimpleWorker:
        names = [str(getattr(q, "name", q)) for q in (queues if isinstance(queues, (list, tuple)) else [queues])]
        if any((sink := _sink_of(name)) is not None and SINKS[sink].worker != FORKING for name in names):
            return SimpleWorker(queues, *args, **kwargs)  # not a SinkWorker: Python does not init it again
        return super().__new__(cls)


def _sink_of(queue: str) -> str | None:
    """The sink whose queue this is (``hub-uploads``, or ``<namespace>.hub-uploads``)."""
    return next((name for name, entry in SINKS.items() if queue.rpartition(".")[2] == entry.queue), None)


WORKER_CLASS = "workers.pipeline.rq_worker.SinkWorker"


def worker_command(queue: str) -> list[str]:
    """The documented ``rq worker QUEUE`` (as in docker-compose.yml), with :func:`worker_env`.

    Redis comes from ``RQ_REDIS_URL`` in the environment, not ``-u``: a password on a command
    line shows in ``ps``.
    """
    return [sys.executable, "-m", "rq.cli", "worker", queue]


def worker_env(env: Mapping[str, str], redis_url: str) -> dict[str, str]:
    """``env`` with the Redis URL where both RQ (``RQ_REDIS_URL``) and trainbus read it, and
    trainbus's worker class where ``rq worker`` reads it. A Sentinel URL reaches RQ through its
    settings module instead (``workers/pipeline/rq_settings.py``)."""
    out = {**env, "TRAINBUS_REDIS_URL": redis_url, "RQ_WORKER_CLASS": WORKER_CLASS}
    if is_sentinel(redis_url):
        out.pop("RQ_REDIS_URL", None)
        out["RQ_CONFIG"] = "workers.pipeline.rq_settings"
    else:
        out["RQ_REDIS_URL"] = redis_url
    return out


def show_trainbus_logs(level: int = logging.INFO) -> None:
    """One line per upload outcome (``upload sink=hub run=... outcome=ok``) on stderr."""
    logger = logging.getLogger("trainbus")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(level)
        logger.propagate = False  # the root logger may have a handler too (basicConfig)
