"""From the spool to the Redis stream: the pusher, and the flusher thread that drives it.

The :class:`Pusher` reads a run's spool in order and XADDs records in pipelined batches
through one Lua script that also advances the run's ``pushed`` seq. Because the check and
the XADD are atomic in Redis, pushing a record twice (a lost reply, a replay after a crash)
adds it once. The :class:`Flusher` is the background thread of a live training process:
it pushes whenever the hook wakes it, backs off while Redis is unreachable, and refreshes
the run's liveness key.

Seqs in a spool are the spool's own; the stream's are the run's. They are the same unless
the run was resumed with another spool (another machine or container, the usual case after
preemption): its new spool starts again at 0 while Redis already holds the run's pushed
seqs. The script then continues the run's numbering after what is there (it remembers,
per spool, the offset and the last record pushed), so a resumed run's events arrive once,
after the old ones, and a replay of the old spool later lands after them too.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import redis

from producers.snapshot import Snapshotter
from producers.spool import Position, Record, RunSpool, SpoolWriter, read_records
from shared.backoff import compute_backoff
from shared.events import EventType
from shared.keys import LIVENESS_REFRESH_S, LIVENESS_TTL_S, PUSHED_TTL_S, Keys
from shared.redis_client import REDIS_UNAVAILABLE

log = logging.getLogger("trainbus.flusher")

BATCH_RECORDS = 256
STOP_CHECK_S = 1.0  # how often a live run looks for its stop order
SNAPSHOT_TYPES = frozenset({EventType.CHECKPOINT.value, EventType.FINAL.value})

# KEYS: stream, producer hash.  ARGV: ttl, spool id, then spool seq, event pairs in order.
# The hash: pushed = the run's last seq in the stream; spool + offset = the spool pushing now
# and how its seqs map to the run's; l:<spool> = the last spool seq that spool pushed.
# Returns the last spool seq of this spool that is in the stream.
PUSH_SCRIPT = """
local pushed = tonumber(redis.call('HGET', KEYS[2], 'pushed') or '-1')
local mine = tonumber(redis.call('HGET', KEYS[2], 'l:' .. ARGV[2]) or '-1')
local offset = nil
local owner = redis.call('HGET', KEYS[2], 'spool')
if owner == ARGV[2] then
  offset = tonumber(redis.call('HGET', KEYS[2], 'offset') or '0')
elseif not owner and pushed >= 0 then  -- pushed before spools had ids: the same numbering
  offset = 0
  mine = math.max(mine, pushed)
end
for i = 3, #ARGV, 2 do
  local lseq = tonumber(ARGV[i])
  if lseq > mine then
    if offset == nil then  -- another spool pushed last (or none did): continue after it
      offset = pushed + 1 - lseq
      redis.call('HSET', KEYS[2], 'spool', ARGV[2], 'offset', offset)
    end
    local seq = lseq + offset
    local event = ARGV[i + 1]
    if offset ~= 0 then
      event = string.gsub(event, '"seq":%d+', '"seq":' .. seq, 1)
    end
    redis.call('XADD', KEYS[1], '*', 'event', event)
    pushed = seq
    mine = lseq
  end
end
redis.call('HSET', KEYS[2], 'pushed', pushed, 'l:' .. ARGV[2], mine)
redis.call('EXPIRE', KEYS[2], ARGV[1])
return mine
"""


class Pusher:
    """Pushes one run's spooled records to the stream, in order, each exactly once."""

    def __init__(
        self, run: RunSpool, client: redis.Redis, keys: Keys, snapshots: Snapshotter, writer: SpoolWriter | None = None
    ) -> None:
        self.run = run
        self.client = client
        self.keys = keys
        self.snapshots = snapshots
        self.writer = writer
        self.pushed: int | None = None  # highest spool seq known to be in the stream
        self.waiting_for_snapshot = False
        self._position: Position | None = None
        self._script = client.register_script(PUSH_SCRIPT)

    def push_available(self, keep_going: Callable[[], bool] = lambda: True) -> int:
        """Push everything readable now (or until ``keep_going()`` is false); how many records went.

        Raises redis errors when Redis is unreachable; the spool keeps the records.
        """
        sent = 0
        while keep_going() and (n := self.push_batch()) > 0:
            sent += n
        return sent

    def push_batch(self) -> int:
        if self.pushed is None:
            field = f"l:{self.run.spool_id}"
            self.pushed = int(self.client.hget(self.keys.producer(self.run.run_id), field) or -1)
        while True:
            records = self._next_records()
            if not records:
                return 0
            batch = self._ready(records)
            if batch:
                break
            if self.waiting_for_snapshot:
                return 0
            # every record read was already in the stream; the position moved past them
        args: list[Any] = [PUSHED_TTL_S, self.run.spool_id]
        for record, data in batch:
            args += [record.seq, data]
        self.pushed = int(self._script(keys=[self.keys.events, self.keys.producer(self.run.run_id)], args=args))
        self._advance(batch[-1][0].end)
        for record, _ in batch:
            if record.type in SNAPSHOT_TYPES:
                self.snapshots.forget(record.seq)
        return len(batch)

    def _next_records(self) -> list[Record]:
        """Records after the current position, moving past (and removing) pushed segments."""
        while True:
            segments = self.run.segments()
            if not segments:
                return []
            if self._position is None or self._position.segment not in segments:
                self._position = Position(segments[0], 0)
            bound = None
            if self.writer is not None:
                segment, end = self.writer.published  # one read: never one segment's end for another
                bound = end if segment == self._position.segment else None
            records, end = read_records(self._position.segment, self._position.offset, BATCH_RECORDS, bound)
            if records:
                return records
            if end != self._position.offset:  # only corrupt lines: step over them
                self._advance(end)
                continue
            if not self._retire_segment(segments):
                return []

    def _retire_segment(self, segments: list[Path]) -> bool:
        """The current segment is fully pushed: remove it if nobody appends to it any more."""
        assert self._position is not None
        segment = self._position.segment
        newest = segment == segments[-1]
        if newest and not self.run.writer_lock.is_free():
            return False  # the training process still appends here
        if newest:
            self.run.remember_seq(max(self.pushed or -1, int(segment.stem) - 1))
        segment.unlink()
        self._position = None
        return not newest

    def _advance(self, offset: int) -> None:
        """Move past pushed (or skipped) bytes; the writer counts them as freed."""
        assert self._position is not None
        if self.writer is not None:
            self.writer.released(self._position.segment, offset - self._position.offset)
        self._position.offset = offset

    def _ready(self, records: list[Record]) -> list[tuple[Record, bytes]]:
        """Records not yet in the stream, checkpoint events completed with their snapshot.

        Stops before a checkpoint whose snapshot is still being made, to keep the order.
        """
        ready: list[tuple[Record, bytes]] = []
        self.waiting_for_snapshot = False
        assert self.pushed is not None
        for record in records:
            if record.seq <= self.pushed:
                self._advance(record.end)
                continue
            data = record.data
            if record.type in SNAPSHOT_TYPES:
                completed = self._with_snapshot(record)
                if completed is None:
                    self.waiting_for_snapshot = True
                    break
                data = completed
            ready.append((record, data))
        return ready

    def _with_snapshot(self, record: Record) -> bytes | None:
        event = orjson.loads(record.data)
        request = event["payload"].get("checkpoint")
        if not isinstance(request, dict):
            return record.data
        result = self.snapshots.result(record.seq, request)
        if result is None:
            return None
        request.update(result)
        return orjson.dumps(event)


class Flusher:
    """The training process's background thread: spool to Redis, and liveness."""

    def __init__(
        self,
        pusher: Pusher,
        housekeeping: Callable[[], None] = lambda: None,
        on_stop_order: Callable[[str], None] = lambda reason: None,
    ) -> None:
        self.pusher = pusher
        self.run_ended = False
        self._housekeeping = housekeeping  # once, when the thread starts (off the hook path)
        self._on_stop_order = on_stop_order  # once, when the run's stop order appears in Redis
        self._next_stop_check = 0.0
        self._stop_order_seen = False
        self._periodic: list[list[Any]] = []  # [interval, fn, next time], run in this thread
        self._wake = threading.Event()
        self._stop = False
        self._done = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name="trainbus-flusher", daemon=True)
        self._attempt = 0
        self._next_liveness = 0.0
        self._redis_up = True
        self._spool_error: str | None = None

    def start(self) -> None:
        self._thread.start()

    def every(self, seconds: float, fn: Callable[[], None]) -> None:
        """Run ``fn`` in this thread every ``seconds`` (work a hook must not pay for, e.g. sampling)."""
        self._periodic.append([seconds, fn, 0.0])

    def wake(self) -> None:
        """Called by the hook after an append: the cheapest possible hand-off."""
        self._wake.set()

    @property
    def redis_up(self) -> bool:
        """False while the last push failed (Redis down, full, or refusing)."""
        return self._redis_up

    def wait_pushed(self, seq: int, timeout: float) -> bool:
        """Wait until ``seq`` is in the stream, at most ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._done:
            while (self.pusher.pushed is None or self.pusher.pushed < seq) and self._thread.is_alive():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._wake.set()
                self._done.wait(min(remaining, 0.05))
        return self.pusher.pushed is not None and self.pusher.pushed >= seq

    def stop(self, timeout: float) -> bool:
        """Stop after the batch in flight; wait at most ``timeout``. False if the thread is still in a
        Redis call (it holds the pusher lock until it returns or the process exits)."""
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=timeout)
        return not self._thread.is_alive()

    def _loop(self) -> None:
        self._run_housekeeping()
        lock = self.pusher.run.pusher_lock
        while not self._stop:
            self._wake.wait(timeout=self._idle_timeout())
            self._wake.clear()
            if self._stop:
                break
            self._run_periodic()
            self._prepare_spare()
            if not lock.acquire():
                continue  # a drainer from an earlier process is still pushing this run
            try:
                self._refresh_liveness()  # first: a long backlog must not make the producer look dead
                self.pusher.push_available(lambda: not self._stop)
                self._refresh_liveness()
                self._check_stop_order()
                self._set_redis_up(True)
                self._spool_ok()
            except REDIS_UNAVAILABLE as exc:
                self._set_redis_up(False, exc)
                self._sleep(compute_backoff(self._attempt, base=0.2, cap=10.0))
                self._attempt += 1
                continue
            except OSError as exc:  # the spool's own files: a disk problem, not the network
                self._spool_failed(exc)
                self._sleep(compute_backoff(self._attempt, base=0.5, cap=30.0))
                self._attempt += 1
                continue
            except Exception:  # a bug must not kill the thread: log it and keep the spool
                log.exception("unexpected error while pushing run %s", self.pusher.run.run_id)
                self._sleep(1.0)
            with self._done:
                self._done.notify_all()
        lock.release()

    def _idle_timeout(self) -> float:
        if self.pusher.waiting_for_snapshot:
            return 0.02
        return 1.0

    def _refresh_liveness(self) -> None:
        client, key = self.pusher.client, self.pusher.keys.alive(self.pusher.run.run_id)
        if self.run_ended:
            if self._next_liveness >= 0:
                client.delete(key)
                self._next_liveness = -1.0
            return
        now = time.monotonic()
        if now >= self._next_liveness:
            client.set(key, b"1", ex=LIVENESS_TTL_S)
            self._next_liveness = now + LIVENESS_REFRESH_S

    def _check_stop_order(self) -> None:
        """Once a second: has a worker (a Platform cancel) or an operator (``trainbus stop``) said stop?"""
        now = time.monotonic()
        if self._stop_order_seen or self.run_ended or now < self._next_stop_check:
            return
        self._next_stop_check = now + STOP_CHECK_S
        reason = self.pusher.client.get(self.pusher.keys.stop(self.pusher.run.run_id))
        if reason:
            self._stop_order_seen = True
            self._on_stop_order(reason.decode(errors="replace"))

    def _run_periodic(self) -> None:
        now = time.monotonic()
        for task in self._periodic:
            if now >= task[2]:
                task[2] = now + task[0]
                try:
                    task[1]()
                except Exception:  # a sampler must never stop the pushing
                    log.debug("periodic task %r failed", task[1], exc_info=True)

    def _prepare_spare(self) -> None:
        """The writer's next segment, made here so that no hook pays for a fresh one."""
        if self.pusher.writer is None:
            return
        try:
            self.pusher.writer.prepare_spare()
        except OSError as exc:  # a full disk: the hook's own rotation will say so too
            self._spool_failed(exc)

    def _run_housekeeping(self) -> None:
        try:
            self._housekeeping()
        except Exception:  # housekeeping must never stop the pushing
            log.warning("spool housekeeping failed", exc_info=True)

    def _set_redis_up(self, up: bool, exc: Exception | None = None) -> None:
        if up and not self._redis_up:
            log.warning("run %s: Redis is reachable again; pushing the spool", self.pusher.run.run_id)
        elif not up and self._redis_up:
            log.warning(
                "run %s: Redis cannot take events (%s); they stay in the spool at %s",
                self.pusher.run.run_id,
                exc,
                self.pusher.run.dir,
            )
        self._redis_up = up
        if up:
            self._attempt = 0

    def _spool_failed(self, exc: OSError) -> None:
        reason = f"{exc.__class__.__name__}: {exc}"
        if reason != self._spool_error:
            log.error(
                "run %s: cannot read the spool at %s (%s); events stay there and pushing is retried",
                self.pusher.run.run_id,
                self.pusher.run.dir,
                reason,
            )
        self._spool_error = reason

    def _spool_ok(self) -> None:
        if self._spool_error is not None:
            log.warning("run %s: the spool can be read again", self.pusher.run.run_id)
            self._spool_error = None

    def _sleep(self, seconds: float) -> None:
        """Sleep that a stop request interrupts."""
        deadline = time.monotonic() + seconds
        while not self._stop and time.monotonic() < deadline:
            time.sleep(min(0.05, deadline - time.monotonic()))
