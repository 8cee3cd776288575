"""From the spool to the Redis stream, in order, each record once.

The :class:`Pusher` reads a run's spool in order and XADDs records in pipelined batches
through one Lua script that also advances the run's ``pushed`` seq. Because the check and
the XADD are atomic in Redis, pushing a record twice (a lost reply, a replay after a crash)
adds it once. The delivery process drives it while the training process runs
(``producers/delivery.py``), a drainer or ``trainbus spool replay`` afterwards.

Seqs in a spool are the spool's own; the stream's are the run's. They are the same unless
the run was resumed with another spool (another machine or container, the usual case after
preemption): its new spool starts again at 0 while Redis already holds the run's pushed
seqs. The script then continues the run's numbering after what is there (it remembers,
per spool, the offset and the last record pushed), so a resumed run's events arrive once,
after the old ones, and a replay of the old spool later lands after them too.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import orjson
import redis

from producers.snapshot import SNAPSHOT_TYPES, Snapshotter
from producers.spool import Position, Record, RunSpool, read_records
from shared.events import EventType
from shared.keys import PUSHED_TTL_S, Keys
from shared.redis_client import REPLICA_WAIT_MS, NotReplicated, replicas_hold

BATCH_RECORDS = 256

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


class Bound(Protocol):
    """How far the pusher may read: ``published`` is (segment, end) of what is ready (earlier
    segments all), or (None, 0) when everything in the spool is."""

    published: tuple[Path | None, int]


class Pusher:
    """Pushes one run's spooled records to the stream, in order, each exactly once.

    ``bound`` (the delivery process's tail) keeps it behind the records whose snapshots are
    under way; without one (a drainer, a replay) it reads everything and snapshots on demand.
    """

    def __init__(
        self,
        run: RunSpool,
        client: redis.Redis,
        keys: Keys,
        snapshots: Snapshotter,
        bound: Bound | None = None,
        *,
        min_replicas: int = 0,
    ) -> None:
        """``min_replicas`` (TRAINBUS_REDIS_MIN_REPLICAS): a batch counts as pushed, and its spool records
        may go, only once WAIT says that many replicas hold it; a failover cannot lose it then."""
        self.run = run
        self.min_replicas = min_replicas
        self.client = client
        self.keys = keys
        self.snapshots = snapshots
        self.bound = bound
        self.pushed: int | None = None  # highest spool seq known to be in the stream
        self.ended = False  # the run's run_end is in the stream
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
        pushed = int(self._script(keys=[self.keys.events, self.keys.producer(self.run.run_id)], args=args))
        if self.min_replicas:
            self._wait_for_replicas()
        self.pushed = pushed
        self._advance(batch[-1][0].end)
        for record, _ in batch:
            if record.type in SNAPSHOT_TYPES:
                self.snapshots.forget(record.seq)
            elif record.type == EventType.RUN_END.value:
                self.ended = True
        return len(batch)

    def _wait_for_replicas(self) -> None:
        """Until enough replicas hold what this connection wrote (at most REPLICA_WAIT_MS), else raise:
        the batch stays in the spool and the next try pushes it again (the script skips what is there)."""
        if not replicas_hold(self.client, self.min_replicas):
            raise NotReplicated(
                f"run {self.run.run_id}: fewer than {self.min_replicas} replicas hold the batch after "
                f"{REPLICA_WAIT_MS} ms (TRAINBUS_REDIS_MIN_REPLICAS); it stays in the spool and is pushed again"
            )

    def _next_records(self) -> list[Record]:
        """Records after the current position, moving past (and removing) pushed segments."""
        while True:
            segments = self.run.segments()
            if not segments:
                return []
            if self._position is None or self._position.segment not in segments:
                self._position = Position(segments[0], 0)
            bound = self._bound_in(self._position.segment)
            records, end = read_records(self._position.segment, self._position.offset, BATCH_RECORDS, bound)
            if records:
                return records
            if end != self._position.offset:  # only corrupt lines: step over them
                self._advance(end)
                continue
            if bound is not None or not self._retire_segment(segments):
                return []  # at the bound: the tail has not finished this segment

    def _bound_in(self, segment: Path) -> int | None:
        """How far ``segment`` may be read: all of a segment the tail has passed, up to the tail in
        its own, nothing of one it has not reached."""
        if self.bound is None:
            return None
        at, end = self.bound.published  # one read: never one segment's end for another
        if at is None or at.name > segment.name:
            return None
        return end if at.name == segment.name else 0

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
        """Move past pushed (or skipped) bytes."""
        assert self._position is not None
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
