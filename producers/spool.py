"""The spool: a run's write-ahead log of events on local disk.

Layout, under ``TRAINBUS_SPOOL_DIR``::

    <run_id>/
        writer.lock          held (flock) by the training process while it runs
        pusher.lock          held by whoever pushes this run to Redis (flusher or drainer)
        seq                  last seq of the run once every segment was pushed and removed
        000000000000.log     segments named by their first seq, each at most SEGMENT_BYTES
        checkpoints/         snapshots of checkpoint files (see snapshot.py)

A record is one line: ``<seq> <type> <event JSON>\\n``, copied into a memory-mapped
segment, so it is in the kernel's page cache when the hook returns: a SIGKILL of the
training process cannot lose it (a power failure can lose what was not yet pushed).
Segments are removed once every record in them reached Redis.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import mmap
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("trainbus.spool")

SEGMENT_BYTES = 4 << 20
READ_BYTES = 2 << 20  # more than the largest record (events are capped at 1 MiB)
NEWLINE = 10
SEGMENT_SUFFIX = ".log"


@dataclass(slots=True)
class Record:
    seq: int
    type: str
    data: bytes  # the event JSON
    end: int = 0  # offset just past this record in its segment


@dataclass(slots=True)
class Position:
    """Where a reader stands: a segment and a byte offset in it."""

    segment: Path
    offset: int


class RunLock:
    """A non-blocking flock on a file in the run directory; released on process death."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> bool:
        if self._fd is not None:
            return True
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def is_free(self) -> bool:
        """True when nobody holds the lock (probes by taking and dropping it)."""
        if self.held:
            return False
        if self.acquire():
            self.release()
            return True
        return False


class RunSpool:
    """One run's directory in the spool: its segments, locks and seq counter."""

    def __init__(self, root: Path, run_id: str) -> None:
        self.run_id = run_id
        self.dir = Path(root) / run_id
        self.checkpoint_dir = self.dir / "checkpoints"
        self.writer_lock = RunLock(self.dir / "writer.lock")
        self.pusher_lock = RunLock(self.dir / "pusher.lock")
        self._seq_file = self.dir / "seq"

    def create(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.checkpoint_dir.mkdir(exist_ok=True, mode=0o700)

    def segments(self) -> list[Path]:
        """Segment files, oldest first."""
        try:
            names = [n for n in os.listdir(self.dir) if n.endswith(SEGMENT_SUFFIX)]
        except FileNotFoundError:
            return []
        return [self.dir / n for n in sorted(names)]

    def pending_bytes(self) -> int:
        """Bytes of records in the segments (pushed or not): an upper bound of the backlog."""
        total = 0
        for segment in self.segments():
            offset = 0
            while True:
                records, offset = read_records(segment, offset)
                if not records:
                    break
            total += offset
        return total

    def last_seq(self) -> int:
        """The highest seq ever written to this run's spool, or -1."""
        last = -1
        segments = self.segments()
        if segments:
            last = int(segments[-1].stem) - 1
            offset = 0
            while True:
                records, offset = read_records(segments[-1], offset)
                if not records:
                    break
                last = max(last, records[-1].seq)
        with contextlib.suppress(FileNotFoundError, ValueError):
            last = max(last, int(self._seq_file.read_text().strip() or -1))
        return last

    def remember_seq(self, seq: int) -> None:
        """Record the last seq before removing the segments that hold it."""
        tmp = self._seq_file.with_suffix(".tmp")
        tmp.write_text(f"{seq}\n")
        os.replace(tmp, self._seq_file)


class SpoolWriter:
    """Appends records for one run from the training thread, without a system call.

    Each segment is a preallocated file mapped into memory (``MAP_SHARED``): an append is
    a memory copy into the page cache, where it survives a SIGKILL of this process, and it
    never releases the GIL (a ``write()`` would, letting the flusher thread in between).
    The newline is stored last, so a reader never takes a half-copied record as whole.
    Preallocating (``posix_fallocate``) means a full disk fails the rotation with ENOSPC
    instead of killing the process with SIGBUS on a page fault.
    """

    def __init__(self, run: RunSpool, max_bytes: int) -> None:
        self.run = run
        self.max_bytes = max_bytes
        self.next_seq = run.last_seq() + 1
        self.segment: Path | None = None
        self._map: mmap.mmap | None = None
        self._size = 0
        self.end = 0  # offset just past the last record in the current segment
        # Two counters, each written by one thread only (hook / flusher): no lock needed.
        self._appended = run.pending_bytes()  # not pushed yet, as far as this process knows
        self._released = 0
        self._rotate(self.next_seq, SEGMENT_BYTES)

    @property
    def bytes(self) -> int:
        """Bytes in the spool not yet pushed to Redis; what the size limit applies to."""
        return self._appended - self._released

    def append(self, seq: int, type: str, data: bytes, *, keep_when_full: bool) -> bool:
        """Write one record; False (and nothing written) when the spool is full.

        Records with ``keep_when_full`` are written past the limit: they are few and small.
        Raises OSError when a new segment cannot be allocated (disk full).
        """
        body = b"%d %s %s" % (seq, type.encode(), data)
        size = len(body) + 1
        if self.bytes + size > self.max_bytes and not keep_when_full:
            return False
        if self.end + size > self._size:
            self._rotate(seq, max(SEGMENT_BYTES, size))
        assert self._map is not None
        self._map[self.end : self.end + size - 1] = body
        self._map[self.end + size - 1] = NEWLINE
        self.end += size
        self._appended += size
        self.next_seq = seq + 1
        return True

    def released(self, nbytes: int) -> None:
        """``nbytes`` of records reached Redis: they no longer count against the limit."""
        self._released += nbytes

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None

    def _rotate(self, first_seq: int, size: int) -> None:
        """Start a new segment; a new writer always starts one, never appends to an old one."""
        path = self.run.dir / f"{first_seq:012d}{SEGMENT_SUFFIX}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.ftruncate(fd, 0)  # an existing file of this name holds no whole record
            os.posix_fallocate(fd, 0, size)
            new_map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        os.close(fd)  # the mapping keeps the file open
        self.close()
        self._map, self._size, self.segment, self.end = new_map, size, path, 0


def read_records(
    segment: Path,
    offset: int,
    limit: int = 1 << 30,
    end: int | None = None,
) -> tuple[list[Record], int]:
    """Whole records of ``segment`` from ``offset``: (records, offset after the last one).

    ``end``, when known (the writer's position), bounds the read; otherwise the unused,
    zero-filled rest of a preallocated segment is simply not a record. A trailing partial
    record (being copied right now) is left for the next read; a line that cannot be parsed
    is logged and skipped.
    """
    try:
        with open(segment, "rb") as f:
            f.seek(offset)
            chunk = f.read(READ_BYTES if end is None else max(0, min(READ_BYTES, end - offset)))
    except FileNotFoundError:
        return [], offset
    end = chunk.rfind(b"\n") + 1
    records: list[Record] = []
    position = offset
    for line in _lines(chunk[:end]):
        if len(records) >= limit:
            break
        start, position = position, position + len(line) + 1
        record = _parse(line)
        if record is None:
            log.warning("skipping a corrupt spool line in %s at byte %d", segment, start)
            continue
        record.end = position
        records.append(record)
    return records, position


def _lines(chunk: bytes) -> Iterator[bytes]:
    start = 0
    while start < len(chunk):
        end = chunk.index(b"\n", start)
        yield chunk[start:end]
        start = end + 1


def _parse(line: bytes) -> Record | None:
    parts = line.split(b" ", 2)
    if len(parts) != 3 or not parts[0].isdigit() or not parts[2].startswith(b"{"):
        return None
    return Record(seq=int(parts[0]), type=parts[1].decode("ascii", "replace"), data=parts[2])


def run_dirs(root: Path) -> list[RunSpool]:
    """Every run directory in a spool root."""
    try:
        names = sorted(os.listdir(root))
    except FileNotFoundError:
        return []
    return [RunSpool(root, n) for n in names if (Path(root) / n / "writer.lock").exists()]
