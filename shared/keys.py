"""Every Redis key trainbus uses, in one place.

All keys start with the namespace (``TRAINBUS_NAMESPACE``, default ``trainbus``) so that
several deployments, or test runs, can share one Redis server.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Keys:
    """Key names for one namespace."""

    namespace: str = "trainbus"

    @property
    def events(self) -> str:
        """The one ordered stream every producer appends its events to."""
        return f"{self.namespace}:events"

    def producer(self, run_id: str) -> str:
        """Hash of producer-side state for a run: ``pushed`` = highest seq in the stream.

        The flusher's push script reads and advances it atomically with the XADDs, which
        makes replaying a spool harmless: entries at or below ``pushed`` are skipped.
        """
        return f"{self.namespace}:run:{run_id}:producer"

    def alive(self, run_id: str) -> str:
        """Liveness key refreshed by the producer's flusher with a short TTL."""
        return f"{self.namespace}:run:{run_id}:alive"


LIVENESS_TTL_S = 30  # a producer silent this long is considered dead
LIVENESS_REFRESH_S = 10  # how often a live producer's flusher refreshes its key
PUSHED_TTL_S = 7 * 24 * 3600  # how long a replayed spool is still deduplicated
