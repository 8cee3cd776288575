"""Following a live run's spool from the delivery process, record by record.

The training process appends records into memory-mapped segments and wakes the delivery
process; the :class:`SpoolTail` then reads what is new. A checkpoint event goes to the
snapshotter right away, without waiting for Redis, so the copy starts before the trainer
can save again. ``published`` tells the pusher how far it may read: never past a
checkpoint whose snapshot was not yet requested.

A record never holds a NUL byte (JSON escapes it) and a segment is preallocated with
zeros, so the writer's end is the first NUL after the last record.
"""

from __future__ import annotations

import mmap
from pathlib import Path

import orjson

from producers.snapshot import SNAPSHOT_TYPES, Snapshotter
from producers.spool import Position, RunSpool, read_records

NOT_STARTED = Path()  # sorts before every segment: the pusher may read nothing yet


class SpoolTail:
    """Reads a run's new records; requests snapshots of checkpoint events from ``from_seq`` on
    (older ones are an earlier process's: whoever pushes them makes what is missing)."""

    def __init__(self, run: RunSpool, snapshots: Snapshotter, from_seq: int) -> None:
        self.run = run
        self.snapshots = snapshots
        self.from_seq = from_seq
        self.published: tuple[Path | None, int] = (NOT_STARTED, 0)  # read by the pusher thread
        self._position: Position | None = None
        self._map: mmap.mmap | None = None

    def follow(self) -> int:
        """Read everything appended since the last call; returns how many records were new."""
        new = 0
        while True:
            segments = self.run.segments()
            position = self._current(segments)
            if position is None:
                return new
            end = self._writer_end(position)
            records, offset = read_records(position.segment, position.offset, end=end)
            if offset != position.offset:
                for record in records:
                    if record.seq >= self.from_seq and record.type in SNAPSHOT_TYPES:
                        request = orjson.loads(record.data)["payload"].get("checkpoint")
                        if isinstance(request, dict):
                            self.snapshots.submit(record.seq, request)
                position.offset = offset
                self.published = (position.segment, offset)  # after the requests: the pusher waits for them
                new += len(records)
                continue
            if position.segment == segments[-1]:
                return new  # nothing more yet (the writer appends here)
            self._open(segments[segments.index(position.segment) + 1])

    def has_new(self) -> bool:
        """Has the writer appended past what was read (a memory read, no system call)?"""
        if self._map is None or self._position is None:
            return True  # not mapped yet: follow() finds out
        offset = self._position.offset
        return offset < len(self._map) and self._map[offset] != 0

    def finish(self) -> None:
        """The writer is gone and everything was read: the pusher may read the whole spool."""
        self.follow()
        self.published = (None, 0)
        self.close()

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None

    def _current(self, segments: list[Path]) -> Position | None:
        """Where to read: the current segment, or the first after it when it is gone (a drainer
        pushed and removed it)."""
        if not segments:
            return None
        if self._position is not None and self._position.segment in segments:
            return self._position
        after = self._position.segment.name if self._position is not None else ""
        later = [s for s in segments if s.name > after]
        if not later:
            return None
        self._open(later[0])
        return self._position

    def _open(self, segment: Path) -> None:
        self.close()
        self._position = Position(segment, 0)
        self.published = (segment, 0)
        self._open_map(segment)

    def _open_map(self, segment: Path) -> None:
        try:
            with open(segment, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (FileNotFoundError, ValueError):  # gone, or not allocated yet: read_records copes
            self._map = None

    def _writer_end(self, position: Position) -> int | None:
        if self._map is None:
            self._open_map(position.segment)
        if self._map is None:
            return None
        end = self._map.find(b"\0", position.offset)
        return len(self._map) if end < 0 else end
