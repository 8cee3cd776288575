"""What every sink does with a run: record work (dispatcher side), drain it (worker side).

A sink keeps per-run state in Redis under ``<ns>:<sink>:<run>:*`` (see ``shared/keys.py``).
``record`` is called by the dispatcher for each event, in a pipeline, and must be
idempotent: a redelivered entry writes the same state again. ``drain`` is called by a
drain job holding the run's lock; it does what the rate limits allow now and returns the
seconds until it has more to do, or None when the run needs nothing more.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Protocol

import orjson
import redis

from shared.events import Event
from shared.keys import RUN_STATE_TTL_S, Keys
from workers.telemetry import Counters

log = logging.getLogger("trainbus.sink")

DEAD_LETTER_MAXLEN = 10_000
# KEYS: hash. ARGV: field, value, ... Deletes each field only if it still holds that value.
HDEL_IF_SAME = """
local removed = 0
for i = 1, #ARGV, 2 do
  if redis.call('HGET', KEYS[1], ARGV[i]) == ARGV[i + 1] then
    redis.call('HDEL', KEYS[1], ARGV[i])
    removed = removed + 1
  end
end
return removed
"""


class Sink(Protocol):
    name: str

    def record(self, pipe: redis.client.Pipeline, event: Event) -> None: ...

    def drain(self, run_id: str) -> float | None: ...


class RunState:
    """Bookkeeping shared by the sinks: seen seqs, active runs, finishing, dead letters."""

    def __init__(self, client: redis.Redis, keys: Keys, sink: str) -> None:
        self.client = client
        self.keys = keys
        self.sink = sink
        self._hdel_if_same = client.register_script(HDEL_IF_SAME)
        self.counters = Counters(client, keys)

    def mark_seen(self, pipe: redis.client.Pipeline, event: Event) -> None:
        pipe.setbit(self.keys.seen(self.sink, event.run_id), event.seq, 1)
        pipe.sadd(self.keys.active(self.sink), event.run_id)
        pipe.hset(self.keys.state(self.sink, event.run_id), "last_event_ts", repr(event.ts))

    def contiguous_up_to(self, run_id: str, seq: int) -> bool:
        """True when every seq in 0..seq was recorded (nothing of the run still in flight)."""
        first_missing = self.client.bitpos(self.keys.seen(self.sink, run_id), 0)
        return first_missing == -1 or first_missing > seq

    def remove_if_same(self, key: str, values: dict[str, bytes]) -> int:
        """Delete fields that still hold the values we acted on (newer values stay)."""
        args: list[Any] = []
        for field, value in values.items():
            args += [field, value]
        return int(self._hdel_if_same(keys=[key], args=args)) if args else 0

    def finish(self, run_id: str, kinds: tuple[str, ...]) -> None:
        """The run needs nothing more here: forget it as active, let its state expire."""
        k = self.keys
        pipe = self.client.pipeline(transaction=False)
        pipe.srem(k.active(self.sink), run_id)
        pipe.zrem(k.due(self.sink), run_id)
        for key in (
            k.state(self.sink, run_id),
            k.seen(self.sink, run_id),
            *(k.pending(self.sink, run_id, kind) for kind in kinds),
        ):
            pipe.expire(key, RUN_STATE_TTL_S)
        pipe.execute()

    def dead_letter(self, reason: str, **context: Any) -> None:
        """Record what could not be processed and why; the pipeline goes on."""
        fields = {"reason": reason, "sink": self.sink, "ts": repr(time.time())}
        fields.update({k: v if isinstance(v, (bytes, str)) else orjson.dumps(v) for k, v in context.items()})
        self.client.xadd(self.keys.dead_letters, fields, maxlen=DEAD_LETTER_MAXLEN, approximate=True)
        self.counters.dead_lettered(self.sink)
        log.warning("dead letter (%s): %s", self.sink, reason)
