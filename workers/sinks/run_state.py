"""Per-run bookkeeping every sink shares: recorded seqs, active runs, finishing, dead letters.

A sink keeps per-run state in Redis under ``<ns>:<sink>:<run>:*`` (see ``shared/keys.py``).
Which seqs of a run a sink has recorded is kept as a count and a set: every seq below
``next`` was recorded, and ``ahead`` holds the recorded seqs above it (entries that
arrived out of order). Both grow only with entries the run really sent, whatever seq an
entry claims, unlike a bitmap indexed by seq.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson
import redis

from shared.backoff import compute_backoff
from shared.events import Event
from shared.keys import RUN_STATE_TTL_S, Keys
from shared.redis_client import REDIS_UNAVAILABLE, NotReplicated, replicas_hold
from workers.counters import Counters

log = logging.getLogger("trainbus.sink")

DEAD_LETTER_MAXLEN = 10_000
CONFIRM_WAIT_S = 120.0  # how long a delivery's record waits for Redis before the job gives up
T = TypeVar("T")


@dataclass
class Attempt:
    """What one request to a service came to: ``ok``, its reply, or the status of its failure."""

    ok: bool = False
    reply: dict[str, Any] | None = None
    status: int | None = None
    error: str | None = None  # a refusal the caller decides about (the sink says which)


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
# The start of every script that records an event. KEYS[1]: seen hash, KEYS[2]: ahead zset;
# ARGV[1]: seq. Leaves ``new`` = true when the seq had not been recorded before.
SEEN_LUA = """
local seq = tonumber(ARGV[1])
local nxt = tonumber(redis.call('HGET', KEYS[1], 'next') or '0')
local new = seq >= nxt and not redis.call('ZSCORE', KEYS[2], seq)
if new then
  if seq == nxt then
    nxt = nxt + 1
    while redis.call('ZSCORE', KEYS[2], nxt) do
      redis.call('ZREM', KEYS[2], nxt)
      nxt = nxt + 1
    end
    redis.call('HSET', KEYS[1], 'next', nxt)
  else
    redis.call('ZADD', KEYS[2], seq, seq)
  end
end
"""
MARK_SEEN = SEEN_LUA + "return new and 1 or 0\n"
# KEYS: pending hash (seq, data, recorded_at, ts), state hash. ARGV: seq, data, kind, event ts.
# Keeps the newest. 'seq' stays after a sink removes 'data', so a redelivered older entry
# is ignored; a replaced entry that was never sent counts as superseded.
SET_IF_NEWER = """
local current = tonumber(redis.call('HGET', KEYS[1], 'seq') or '-1')
if tonumber(ARGV[1]) <= current then
  return 0
end
if redis.call('HEXISTS', KEYS[1], 'data') == 1 then
  redis.call('HINCRBY', KEYS[2], ARGV[3] .. '_superseded', 1)
end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('HSET', KEYS[1], 'seq', ARGV[1], 'data', ARGV[2], 'recorded_at', tostring(now), 'ts', ARGV[4])
return 1
"""


class RunState:
    """Bookkeeping shared by the sinks: recorded seqs, active runs, finishing, dead letters."""

    def __init__(self, client: redis.Redis, keys: Keys, sink: str, min_replicas: int = 0) -> None:
        self.client = client
        self.keys = keys
        self.sink = sink
        self.min_replicas = min_replicas
        self._hdel_if_same = client.register_script(HDEL_IF_SAME)
        self._mark_seen = client.register_script(MARK_SEEN)
        self._set_if_newer = client.register_script(SET_IF_NEWER)
        self.counters = Counters(client, keys)

    def seen_keys(self, run_id: str) -> list[str]:
        """KEYS[1:2] of a script that starts with SEEN_LUA."""
        return [self.keys.seen(self.sink, run_id), self.keys.ahead(self.sink, run_id)]

    def mark_seen(self, pipe: redis.client.Pipeline, event: Event) -> None:
        """Record the event's seq (for sinks whose own records are idempotent) and the run as active."""
        self._mark_seen(keys=self.seen_keys(event.run_id), args=[event.seq], client=pipe)
        self.mark_active(pipe, event)

    def mark_seen_only(self, pipe: redis.client.Pipeline, run_id: str, seq: int) -> None:
        """A seq that was dead-lettered: counted as recorded, so nothing waits for it."""
        self._mark_seen(keys=self.seen_keys(run_id), args=[seq], client=pipe)

    def mark_active(self, pipe: redis.client.Pipeline, event: Event) -> None:
        pipe.sadd(self.keys.active(self.sink), event.run_id)
        pipe.hset(self.keys.state(self.sink, event.run_id), "last_event_ts", repr(event.ts))

    def set_if_newer(self, pipe: redis.client.Pipeline, event: Event, kind: str) -> None:
        """``pending:<kind>`` holds the event's payload unless a later seq is there already (latest wins)."""
        self._set_if_newer(
            keys=[self.keys.pending(self.sink, event.run_id, kind), self.keys.state(self.sink, event.run_id)],
            args=[event.seq, orjson.dumps(event.payload), kind, repr(event.ts)],
            client=pipe,
        )

    def recorded_below(self, run_id: str) -> int:
        """Every seq below this number was recorded: the first one still missing."""
        return int(self.client.hget(self.keys.seen(self.sink, run_id), "next") or 0)

    def remove_if_same(self, key: str, values: dict[str, bytes]) -> int:
        """Delete fields that still hold the values we acted on (newer values stay): the record that
        they were delivered, so it waits for an unavailable Redis (see :func:`confirm`)."""
        args: list[Any] = []
        for field, value in values.items():
            args += [field, value]
        if not args:
            return 0
        removed = confirm(lambda: int(self._hdel_if_same(keys=[key], args=args)))
        self.wait_for_replicas()
        return removed

    def wait_for_replicas(self, *, strict: bool = False) -> None:
        """Until TRAINBUS_REDIS_MIN_REPLICAS replicas hold the record just written (bounded): the next
        delivery starts only then, so a failover can repeat at most the last one. Logged if they do not;
        ``strict``: raised instead (NotReplicated), for a record the caller can write again."""
        if not replicas_hold(self.client, self.min_replicas):
            if strict:
                raise NotReplicated(f"{self.sink}: a delivery record is on fewer than {self.min_replicas} replicas")
            log.warning(
                "%s: a delivery record is on fewer than %d replicas; a failover now would repeat that delivery",
                self.sink,
                self.min_replicas,
            )

    def latest_sent(self, run_id: str, kind: str, pending: bytes) -> None:
        """The pending ``kind`` (see :meth:`set_if_newer`) was sent: counted once, as sent. A newer
        one that replaced it while it was in flight counted it as superseded; that is undone."""
        removed = self.remove_if_same(self.keys.pending(self.sink, run_id, kind), {"data": pending})
        pipe = self.client.pipeline(transaction=False)
        pipe.hincrby(self.keys.state(self.sink, run_id), f"{kind}_uploads", 1)
        if not removed:
            pipe.hincrby(self.keys.state(self.sink, run_id), f"{kind}_superseded", -1)
        pipe.execute()

    def finish(self, run_id: str, kinds: tuple[str, ...]) -> None:
        """The run needs nothing more here: forget it as active, let its state expire.

        ``finished`` in the state tells a training machine that this sink needs none of the
        run's files any more (its checkpoint snapshots can go).
        """
        k = self.keys
        pipe = self.client.pipeline(transaction=False)
        pipe.srem(k.active(self.sink), run_id)
        pipe.zrem(k.due(self.sink), run_id)
        pipe.hset(k.state(self.sink, run_id), "finished", repr(time.time()))
        for key in (
            k.state(self.sink, run_id),
            *self.seen_keys(run_id),
            *(k.pending(self.sink, run_id, kind) for kind in kinds),
        ):
            pipe.expire(key, RUN_STATE_TTL_S)
        pipe.execute()

    def failed_attempt(
        self, run_id: str, kind: str, error: Exception, *, wait: float | None = None, cap: float = 300.0
    ) -> float:
        """Count one retryable failure of ``kind`` and say how long to wait before the next try:
        ``wait`` when the server said (Retry-After), else exponential backoff up to ``cap``."""
        state_key = self.keys.state(self.sink, run_id)
        attempt = self.client.hincrby(state_key, f"fail:{kind}", 1)
        delay = wait if wait else compute_backoff(attempt - 1, base=1.0, cap=cap)
        self.client.hincrby(state_key, "retries", 1)
        self.counters.upload(self.sink, kind, "retry")
        log.warning(
            "upload sink=%s run=%s kind=%s outcome=retry delay=%.1f error=%r",
            self.sink,
            run_id,
            kind,
            delay,
            str(error),
        )
        return delay

    def attempt_ok(self, run_id: str, kind: str, *, count: bool = True) -> None:
        """``kind`` went through: its failure count starts over (``count``: an upload, counted).
        The first write after a delivery, so it waits for an unavailable Redis (see :func:`confirm`)."""
        confirm(lambda: self.client.hdel(self.keys.state(self.sink, run_id), f"fail:{kind}"))
        if count:
            self.counters.upload(self.sink, kind, "ok")

    def checkpoint_refused(self, run_id: str, what: str, payload: dict[str, Any], exc: Exception) -> None:
        """The snapshot an event names cannot be used (see ``files.open_snapshot``): said, the run goes on."""
        epoch = payload.get("epoch")
        self.dead_letter(f"{what} of epoch {epoch} not uploaded: {exc}", run_id=run_id, epoch=epoch)

    def dead_letter(self, reason: str, **context: Any) -> None:
        """Record what could not be processed and why; the pipeline goes on."""
        fields = {"reason": reason, "sink": self.sink, "ts": repr(time.time())}
        fields.update({k: v if isinstance(v, (bytes, str)) else orjson.dumps(v) for k, v in context.items()})
        self.client.xadd(self.keys.dead_letters, fields, maxlen=DEAD_LETTER_MAXLEN, approximate=True)
        self.counters.dead_lettered(self.sink)
        log.warning("dead letter (%s): %s", self.sink, reason)


def confirm(write: Callable[[], T], wait_s: float = CONFIRM_WAIT_S) -> T:
    """Run a Redis write that records a delivery, retrying while Redis is unavailable.

    The service has the data already: if this record were lost with the job, the work would
    be redone and sent twice. So a Redis restart or failover is waited out here, up to
    ``wait_s``; the run's lease expires meanwhile only if Redis lost its data too.
    """
    deadline = time.monotonic() + wait_s
    attempt = 0
    while True:
        try:
            return write()
        except REDIS_UNAVAILABLE as exc:
            if time.monotonic() >= deadline:
                raise
            delay = compute_backoff(attempt, base=0.2, cap=5.0)
            if attempt == 0:
                log.warning("Redis unavailable (%s) while recording a delivery; waiting for it", exc)
            time.sleep(delay)
            attempt += 1


def pending_counts(
    client: redis.Redis, keys: Keys, sink: str, run_id: str, *, queued: tuple[str, ...], slots: tuple[str, ...]
) -> dict[str, int]:
    """What a run still waits on, for a sink's ``pending``: entries per ``queued`` hash, and
    1 for each newest-only slot (``SET_IF_NEWER``) still holding data."""
    pipe = client.pipeline(transaction=False)
    for kind in queued:
        pipe.hlen(keys.pending(sink, run_id, kind))
    for kind in slots:
        pipe.hexists(keys.pending(sink, run_id, kind), "data")
    return {kind: int(n) for kind, n in zip((*queued, *slots), pipe.execute(), strict=True)}


def final_done(client: redis.Redis, keys: Keys, sink: str, run_id: str) -> bool:
    """The run's final reached the service, for a sink's ``delivered``."""
    return bool(client.hexists(keys.state(sink, run_id), "final_done"))
