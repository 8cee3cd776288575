"""``trainbus dispatch``: from the event stream to per-run work and drain jobs.

One consumer group per sink reads the stream, so a slow sink never holds back another.
For each entry the dispatcher validates it, lets the sink record the work in Redis,
makes sure a drain job for (sink, run) is queued, then acknowledges. A crash between
recording and acknowledging only means the entry is recorded again (records are
idempotent). Entries left pending by a dead dispatcher are claimed after ``claim_idle``.
Entries that fail validation go to the dead-letter stream with the reason.

Each tick the dispatcher also enqueues the drain jobs that came due (rate limits, retries,
heartbeats), re-enqueues runs whose worker died, and trims the stream below what every
group has acknowledged.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass

import redis

from shared.backoff import compute_backoff
from shared.errors import InvalidEvent
from shared.events import MAX_SEQ_AHEAD, Event, decode_event
from shared.keys import Keys
from shared.redis_client import REDIS_UNAVAILABLE, replicas_hold
from shared.settings import WorkerSettings, redact_url
from workers.counters import Counters
from workers.pipeline.groups import mark_fed, refresh_abandoned
from workers.pipeline.queues import enqueue_drain
from workers.sinks.interface import Sink
from workers.sinks.registry import make_sink
from workers.sinks.run_state import RunState

log = logging.getLogger("trainbus.dispatch")

READ_COUNT = 200
BLOCK_MS = 100  # also how often due drain jobs are enqueued
SWEEP_EVERY_S = 5.0
TRIM_EVERY_S = 30.0
FORGET_DISPATCHER_S = 86400.0
RAW_KEEP_BYTES = 2048  # how much of an invalid entry the dead letter keeps


@dataclass
class DispatchStats:
    entries: int = 0
    dead_letters: int = 0
    jobs_enqueued: int = 0


class Dispatcher:
    def __init__(
        self,
        client: redis.Redis,
        settings: WorkerSettings,
        *,
        claim_idle_s: float = 30.0,
        trim_every_s: float = TRIM_EVERY_S,
        consumer: str | None = None,
    ) -> None:
        self.client = client
        self.settings = settings
        self.keys = Keys(settings.namespace)
        self.claim_idle_ms = int(claim_idle_s * 1000)
        self.trim_every_s = trim_every_s
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}"
        self.sinks: dict[str, Sink] = {name: make_sink(name, client, self.keys, settings) for name in settings.sinks}
        self.dead = {name: RunState(client, self.keys, name) for name in settings.sinks}
        self.stats = DispatchStats()
        self.counters = Counters(client, self.keys)
        self._next_sweep = 0.0
        self._next_trim = 0.0

    def run(self, *, burst: bool = False, stop_after: float | None = None) -> DispatchStats:
        """Dispatch until stopped; ``burst``: until a round finds no new entry."""
        deadline = None if stop_after is None else time.monotonic() + stop_after
        attempt = 0
        while deadline is None or time.monotonic() < deadline:
            try:
                self.ensure_groups()
                moved = self.step(block_ms=0 if burst else BLOCK_MS)
                attempt = 0
            except REDIS_UNAVAILABLE as exc:
                delay = compute_backoff(attempt, base=0.5, cap=10.0)
                log.warning(
                    "Redis at %s unavailable or full (%s); retrying in %.1f s",
                    redact_url(self.settings.redis_url),
                    exc,
                    delay,
                )
                time.sleep(delay)
                attempt += 1
                continue
            except redis.ResponseError:  # a bug or a refusing Redis: keep going, entries stay pending
                log.exception("dispatch round failed; retrying")
                time.sleep(compute_backoff(attempt, base=0.5, cap=10.0))
                attempt += 1
                continue
            if burst and not moved:
                break
        return self.stats

    def ensure_groups(self) -> None:
        """One group per sink, from the start of the stream (idempotent; Redis may have restarted)."""
        for name in self.sinks:
            try:
                self.client.xgroup_create(self.keys.events, name, id="0", mkstream=True)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    def step(self, block_ms: int = 0) -> int:
        """One round: claim stale entries, read new ones, enqueue due jobs. Returns entries handled."""
        handled = 0
        for name in self.sinks:
            handled += self._claim_stale(name)
            handled += self._read_new(name, block_ms if handled == 0 else 0)
        now = time.time()
        self._enqueue_due(now)
        if time.monotonic() >= self._next_sweep:
            self._sweep()
            self._next_sweep = time.monotonic() + SWEEP_EVERY_S
        if time.monotonic() >= self._next_trim:
            self.trim()
            self._next_trim = time.monotonic() + self.trim_every_s
        return handled

    def _read_new(self, sink: str, block_ms: int) -> int:
        reply = self.client.xreadgroup(
            sink, self.consumer, {self.keys.events: ">"}, count=READ_COUNT, block=block_ms or None
        )
        entries = reply[0][1] if reply else []
        self._handle(sink, entries)
        return len(entries)

    def _claim_stale(self, sink: str) -> int:
        """Entries another (dead) dispatcher read but never acknowledged."""
        _, entries, _ = self.client.xautoclaim(
            self.keys.events, sink, self.consumer, min_idle_time=self.claim_idle_ms, start_id="0-0", count=READ_COUNT
        )
        entries = [e for e in entries if e[1]]  # trimmed entries come back empty
        if entries:
            log.info("claimed %d stale entries for %s", len(entries), sink)
        self._handle(sink, entries)
        return len(entries)

    def _handle(self, sink: str, entries: list) -> None:
        if not entries:
            return
        if self.settings.redis_min_replicas and not self._replicated():
            return  # left pending: claimed again once idle, or read again from the promoted replica
        decoded: list[tuple[bytes, Event | InvalidEvent]] = []
        for entry_id, fields in entries:
            raw = fields.get(b"event", b"")
            try:
                decoded.append((entry_id, decode_event(raw)))
            except InvalidEvent as exc:
                self.dead[sink].dead_letter(exc.reason, entry_id=entry_id, raw=raw[:RAW_KEEP_BYTES])
                self.stats.dead_letters += 1
                decoded.append((entry_id, exc))
        pushed = self._pushed({e.run_id for _, e in decoded if e.run_id is not None})
        runs: set[str] = set()
        pipe = self.client.pipeline(transaction=False)
        for entry_id, event in decoded:
            if event.run_id is None or event.seq is None:
                continue
            if event.seq > pushed[event.run_id] + MAX_SEQ_AHEAD:
                if isinstance(event, Event):
                    reason = (
                        f"seq {event.seq} of run {event.run_id} is more than {MAX_SEQ_AHEAD} past the last seq "
                        f"its producer pushed ({pushed[event.run_id]}): not recorded, to keep per-run state bounded"
                    )
                    self.dead[sink].dead_letter(reason, entry_id=entry_id, run_id=event.run_id, seq=event.seq)
                    self.stats.dead_letters += 1
                continue
            if isinstance(event, InvalidEvent):
                self.dead[sink].mark_seen_only(pipe, event.run_id, event.seq)  # nothing waits for this seq
                continue
            self.sinks[sink].record(pipe, event)
            runs.add(event.run_id)
        pipe.execute()
        for run_id in runs:
            if enqueue_drain(self.client, self.keys, sink, run_id):
                self.stats.jobs_enqueued += 1
        self.client.xack(self.keys.events, sink, *[entry_id for entry_id, _ in entries])
        self.counters.dispatched(sink, len(entries))
        self.stats.entries += len(entries)

    def _pushed(self, runs: set[str]) -> dict[str, int]:
        """The last seq each run's producer pushed (-1 if unknown): no real entry is past it."""
        ordered = sorted(runs)
        pipe = self.client.pipeline(transaction=False)
        for run_id in ordered:
            pipe.hget(self.keys.producer(run_id), "pushed")
        return {run_id: int(v or -1) for run_id, v in zip(ordered, pipe.execute(), strict=True)}

    def _enqueue_due(self, now: float) -> None:
        for sink in self.sinks:
            for run in self.client.zrangebyscore(self.keys.due(sink), "-inf", now):
                run_id = run.decode()
                self.client.zrem(self.keys.due(sink), run_id)
                if enqueue_drain(self.client, self.keys, sink, run_id):
                    self.stats.jobs_enqueued += 1

    def _sweep(self) -> None:
        """Active runs with no job queued, running or scheduled: their worker died. Requeue."""
        mark_fed(self.client, self.keys, list(self.sinks))
        self._beat()
        for sink in self.sinks:
            for run in self.client.smembers(self.keys.active(sink)):
                run_id = run.decode()
                k = self.keys
                if (
                    self.client.exists(k.guard(sink, run_id), k.lock(sink, run_id))
                    or self.client.zscore(k.due(sink), run_id) is not None
                ):
                    continue
                if enqueue_drain(self.client, k, sink, run_id):
                    log.info("requeued %s run %s (no job was queued or running)", sink, run_id)
                    self.stats.jobs_enqueued += 1

    def _replicated(self) -> bool:
        """Whether the entries just read (and this read) are on TRAINBUS_REDIS_MIN_REPLICAS replicas: WAIT
        covers this connection's last write, the XREADGROUP after them. Work recorded from entries a
        failover then loses would be work on events the producer will push again."""
        wanted = self.settings.redis_min_replicas
        if replicas_hold(self.client, wanted):
            return True
        log.warning(
            "fewer than %d replicas hold the entries just read; they wait (TRAINBUS_REDIS_MIN_REPLICAS)", wanted
        )
        return False

    def _beat(self) -> None:
        """Say this dispatcher is reading (``trainbus health dispatcher``); forget ones silent for a day."""
        now = time.time()
        seen = self.client.hgetall(self.keys.dispatchers)
        gone = [name for name, at in seen.items() if now - float(at) > FORGET_DISPATCHER_S]
        pipe = self.client.pipeline(transaction=False)
        pipe.hset(self.keys.dispatchers, self.consumer, repr(now))
        if gone:
            pipe.hdel(self.keys.dispatchers, *gone)
        pipe.execute()

    def trim(self) -> None:
        """Drop stream entries every group has acknowledged (XTRIM MINID, never MAXLEN).

        Abandoned groups (``workers/groups.py``) are not waited for."""
        abandoned = refresh_abandoned(self.client, self.keys, self.settings.group_abandon_s, self.sinks)
        try:
            groups = [g for g in self.client.xinfo_groups(self.keys.events) if _name(g) not in abandoned]
        except redis.ResponseError:
            return
        if not groups:
            return
        floor = None
        for group in groups:
            pending = self.client.xpending(self.keys.events, group["name"])
            oldest = pending["min"] if pending["pending"] else None
            candidate = oldest or _next_id(group["last-delivered-id"])
            floor = candidate if floor is None or _id_key(candidate) < _id_key(floor) else floor
        if floor is not None:
            self.client.xtrim(self.keys.events, minid=floor, approximate=False)


def _name(group: dict) -> str:
    name = group["name"]
    return name.decode() if isinstance(name, bytes) else name


def _id_key(entry_id: bytes | str) -> tuple[int, int]:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def _next_id(entry_id: bytes | str) -> str:
    """The smallest id after ``entry_id``: entries below it were all delivered."""
    ms, seq = _id_key(entry_id)
    return f"{ms}-{seq + 1}"
