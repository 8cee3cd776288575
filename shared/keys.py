"""Every Redis key trainbus uses, in one place.

All keys start with the namespace (``TRAINBUS_NAMESPACE``, default ``trainbus``) so that
several deployments, or test runs, can share one Redis server. RQ keeps its own keys
(``rq:*``); the queue names come from here too.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.sinks import SINKS

DEFAULT_NAMESPACE = "trainbus"
LIVENESS_TTL_S = 30  # a producer silent this long is considered dead
LIVENESS_REFRESH_S = 10  # how often a live producer's delivery process refreshes its key
PUSHED_TTL_S = 7 * 24 * 3600  # how long a replayed spool is still deduplicated
RUN_STATE_TTL_S = 7 * 24 * 3600  # per-run sink state kept after the run is finished


@dataclass(frozen=True, slots=True)
class Keys:
    """Key names for one namespace."""

    namespace: str = DEFAULT_NAMESPACE

    # -- producer side -------------------------------------------------------------------

    @property
    def events(self) -> str:
        """The one ordered stream every producer appends its events to."""
        return f"{self.namespace}:events"

    def producer(self, run_id: str) -> str:
        """Hash of producer-side state for a run: ``pushed`` = highest seq in the stream.

        The delivery process's push script reads and advances it atomically with the XADDs, which
        makes replaying a spool harmless: entries at or below ``pushed`` are skipped.
        """
        return f"{self.namespace}:run:{run_id}:producer"

    def stop(self, run_id: str) -> str:
        """The run's stop order (who gave it): the Platform's cancel, or ``trainbus stop``.

        Written by workers and operators; the training process reads it in the background
        and the next hook tells the trainer to stop.
        """
        return f"{self.namespace}:run:{run_id}:stop"

    def alive(self, run_id: str) -> str:
        """Liveness key refreshed by the producer's delivery process with a short TTL."""
        return f"{self.namespace}:run:{run_id}:alive"

    # -- dispatcher and workers ------------------------------------------------------------

    @property
    def dead_letters(self) -> str:
        """Stream of entries and uploads that cannot be processed, each with its reason."""
        return f"{self.namespace}:dead"

    @property
    def groups_fed(self) -> str:
        """Hash group -> unix time a dispatcher last read the stream for it (as one of its sinks)."""
        return f"{self.namespace}:groups:fed"

    @property
    def dispatchers(self) -> str:
        """Hash consumer (``<hostname>-<pid>``) -> unix time its dispatcher last read every group."""
        return f"{self.namespace}:dispatchers"

    @property
    def abandoned_groups(self) -> str:
        """Set of consumer groups no dispatcher fed for TRAINBUS_GROUP_ABANDON_H: not waited for."""
        return f"{self.namespace}:groups:abandoned"

    @property
    def metrics(self) -> str:
        """Hash of counters every process increments; served by ``trainbus metrics``."""
        return f"{self.namespace}:metrics"

    def queue(self, sink: str) -> str:
        """RQ queue of a sink (``hub-uploads``, ``clearml``, ...), prefixed outside the default namespace."""
        name = SINKS[sink].queue
        return name if self.namespace == DEFAULT_NAMESPACE else f"{self.namespace}.{name}"

    def state(self, sink: str, run_id: str) -> str:
        """Hash of a run's state in one sink (model id, counters, rate-limit times, ...)."""
        return f"{self.namespace}:{sink}:{run_id}:state"

    def pending(self, sink: str, run_id: str, kind: str) -> str:
        """Hash of work recorded for a run and not yet done, e.g. ``metrics``: epoch -> JSON."""
        return f"{self.namespace}:{sink}:{run_id}:pending:{kind}"

    def seen(self, sink: str, run_id: str) -> str:
        """Hash: ``next`` = every seq of the run below it is recorded in this sink."""
        return f"{self.namespace}:{sink}:{run_id}:seen"

    def ahead(self, sink: str, run_id: str) -> str:
        """Sorted set of the run's recorded seqs above ``next`` (arrived out of order)."""
        return f"{self.namespace}:{sink}:{run_id}:ahead"

    def active(self, sink: str) -> str:
        """Set of runs with work left in a sink: the dispatcher's sweep looks at these."""
        return f"{self.namespace}:{sink}:active"

    def due(self, sink: str) -> str:
        """Sorted set run -> unix time when its drain job should run next."""
        return f"{self.namespace}:{sink}:due"

    def guard(self, sink: str, run_id: str) -> str:
        """Set (NX) while a drain job for the run is queued: at most one waits at a time."""
        return f"{self.namespace}:{sink}:{run_id}:guard"

    def lock(self, sink: str, run_id: str) -> str:
        """Held by the worker draining the run; expires if that worker dies."""
        return f"{self.namespace}:{sink}:{run_id}:lock"

    def owner(self, sink: str, token: str) -> str:
        """Liveness of one worker process (a lease it renews): what it handed to an SDK is its own."""
        return f"{self.namespace}:{sink}:owner:{token}"

    def blocked(self, sink: str, run_id: str) -> str:
        """Why a run's uploads stopped (bad key, unknown model): set until requeued."""
        return f"{self.namespace}:{sink}:{run_id}:blocked"
