"""What a sink is: it records a run's work as events arrive, and drains it when a job runs.

``record`` is called by the dispatcher for each event, in a pipeline, and must be
idempotent: a redelivered entry writes the same state again. ``drain`` is called by a
drain job holding the run's lease; it does what the rate limits allow now and returns the
seconds until it has more to do, or None when the run needs nothing more. ``pending`` and
``delivered`` read a run's state for ``trainbus status`` and the demo.

A sink is one package under ``workers/sinks/`` and one entry in ``shared/sinks.py``.
"""

from __future__ import annotations

from typing import Protocol

import redis

from shared.errors import TrainbusError
from shared.events import Event
from shared.keys import Keys
from shared.settings import WorkerSettings


class SinkRefused(TrainbusError):
    """A sink's service refused a run for good (bad key, unknown model): blocked until requeued."""


class Sink(Protocol):
    name: str

    def __init__(self, client: redis.Redis, keys: Keys, settings: WorkerSettings) -> None: ...

    def record(self, pipe: redis.client.Pipeline, event: Event) -> None: ...

    def drain(self, run_id: str) -> float | None: ...

    @staticmethod
    def pending(client: redis.Redis, keys: Keys, run_id: str) -> dict[str, int]:
        """Work recorded for the run and not done yet, by kind (what ``trainbus status`` shows)."""
        ...

    @staticmethod
    def delivered(client: redis.Redis, keys: Keys, run_id: str) -> bool:
        """Everything of the run reached the service (what the demo waits for)."""
        ...
