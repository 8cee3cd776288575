"""The spool: a run's write-ahead log of events on local disk.

Layout, under ``TRAINBUS_SPOOL_DIR``::

    <run_id>/
        writer.lock          held (flock) by the training process while it runs
        pusher.lock          held by whoever pushes this run to Redis (delivery process or drainer)
        control              what the delivery process tells the training process (control.py)
        seq                  last seq of the run once every segment was pushed and removed
        spool-id             this spool's identity (a resumed run elsewhere has another one)
        000000000000.log     segments named by their first seq, each at most SEGMENT_BYTES
        checkpoints/         snapshots of checkpoint files (see snapshot.py)

A record is one line: ``<seq> <type> <event JSON>\\n``, copied into a memory-mapped
segment, so it is in the kernel's page cache when the hook returns: a SIGKILL of the
training process cannot lose it (a power failure can lose what was not yet pushed).
Segments are removed once every record in them reached Redis.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import logging
import mmap
import os
import secrets
import socket
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("trainbus.spool")

SEGMENT_BYTES = 4 << 20
FIRST_SEGMENT_BYTES = 256 << 10  # a new writer's first segment, made on the training thread
READ_BYTES = 2 << 20  # more than the largest record (events are capped at 1 MiB)
NEWLINE = 10
SEGMENT_SUFFIX = ".log"
SPARE_NAME = ".next-segment.tmp"  # the next segment, made ahead by the delivery process (not a segment yet)
CHUNK_BYTES = 64 << 10  # the writer forgets pushed bytes in chunks of at most this


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


class FileLock:
    """A non-blocking flock on a file (in a run directory); released on process death."""

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
    """One run's directory in the spool: its segments, locks, seq counter and spool id."""

    def __init__(self, root: Path, run_id: str) -> None:
        self.run_id = run_id
        self.dir = Path(root) / run_id
        self.checkpoint_dir = self.dir / "checkpoints"
        self.writer_lock = FileLock(self.dir / "writer.lock")
        self.pusher_lock = FileLock(self.dir / "pusher.lock")
        self._seq_file = self.dir / "seq"
        self._id_file = self.dir / "spool-id"

    def create(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.checkpoint_dir.mkdir(exist_ok=True, mode=0o700)

    @functools.cached_property
    def spool_id(self) -> str:
        """This spool's identity, made once: tells a replay of it from a resumed run's new spool."""
        with contextlib.suppress(FileNotFoundError):
            if found := self._id_file.read_text().strip():
                return found
        tmp = self._id_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(f"{socket.gethostname()}-{secrets.token_hex(8)}\n")
        with contextlib.suppress(FileExistsError):
            os.link(tmp, self._id_file)  # the first one made wins, even against a racing process
        tmp.unlink()
        return self._id_file.read_text().strip()

    def segments(self) -> list[Path]:
        """Segment files, oldest first."""
        try:
            names = [n for n in os.listdir(self.dir) if n.endswith(SEGMENT_SUFFIX)]
        except FileNotFoundError:
            return []
        return [self.dir / n for n in sorted(names)]

    def backlog(self) -> dict[Path, int]:
        """Bytes of records in each segment (pushed or not): an upper bound of what is unpushed."""
        return {segment: records_end(segment) for segment in self.segments()}

    def pending_bytes(self) -> int:
        return sum(self.backlog().values())

    def last_seq(self) -> int:
        """The highest seq ever written to this run's spool, or -1."""
        last = -1
        segments = self.segments()
        if segments:
            last = int(segments[-1].stem) - 1
            record = last_record(segments[-1])
            if record is not None:
                last = max(last, record.seq)
        with contextlib.suppress(FileNotFoundError, ValueError):
            last = max(last, int(self._seq_file.read_text().strip() or -1))
        return last

    def holds_snapshots(self) -> bool:
        """Checkpoint snapshots (or sidecars, partial copies) are still in the run's directory."""
        try:
            return any(os.scandir(self.checkpoint_dir))
        except FileNotFoundError:
            return False

    def drop_spare(self) -> None:
        """Remove the next segment made ahead for a writer that is gone (and any half-made one)."""
        with contextlib.suppress(FileNotFoundError):
            for name in os.listdir(self.dir):
                if name.startswith(SPARE_NAME):
                    (self.dir / name).unlink(missing_ok=True)

    def remember_seq(self, seq: int) -> None:
        """Record the last seq before removing the segments that hold it."""
        tmp = self._seq_file.with_suffix(".tmp")
        tmp.write_text(f"{seq}\n")
        os.replace(tmp, self._seq_file)


class SpoolWriter:
    """Appends records for one run from the training thread, without a system call.

    Each segment is a preallocated file mapped into memory (``MAP_SHARED``): an append is
    a memory copy into the page cache, where it survives a SIGKILL of this process, and it
    never releases the GIL. The newline is stored last, so a reader never takes a
    half-copied record as whole. Preallocating (``posix_fallocate``) means a full disk fails
    the rotation with ENOSPC instead of killing the process with SIGBUS on a page fault. The
    first write into a fresh segment costs 1-1.7 ms on ext4 (its blocks and pages are set up
    on that fault), so the delivery process makes the next segment ahead
    (:func:`prepare_spare`); a rotation only renames and maps it.

    What counts against the size limit: segments found at start (an earlier process's
    backlog) until someone removes them, and what this writer appended until the pushed seq
    (``pushed()``, the control page) passes it, kept in chunks so a long outage costs little
    memory.
    """

    def __init__(self, run: RunSpool, max_bytes: int, pushed: Callable[[], int] = lambda: -1) -> None:
        self.run = run
        self.max_bytes = max_bytes
        self.next_seq = run.last_seq() + 1
        self.segment: Path | None = None
        self._map: mmap.mmap | None = None
        self._size = 0
        self.end = 0  # offset just past the last record in the current segment
        self._pushed = pushed
        self._backlog: dict[Path, int] = run.backlog()
        self._backlog_total = sum(self._backlog.values())
        self._chunk_bytes = max(1, min(CHUNK_BYTES, max_bytes // 16))
        self._chunks: deque[tuple[int, int]] = deque()  # (last seq, bytes) appended, not yet known pushed
        self._open_chunk = 0  # bytes appended after the last chunk
        self._unpushed = 0  # bytes in the chunks and the open chunk
        self._next_recount = 0.0
        self._next_rotate_try = 0.0
        self._rotate(self.next_seq, FIRST_SEGMENT_BYTES)

    @property
    def bytes(self) -> int:
        """Bytes in the spool not known to be in Redis; what the size limit applies to."""
        return self._backlog_total + self._unpushed

    def append(self, seq: int, type: str, data: bytes, *, keep_when_full: bool) -> bool:
        """Write one record; False (and nothing written) when the spool is full.

        Records with ``keep_when_full`` are written past the limit: they are few and small.
        Raises OSError when a new segment cannot be allocated (disk full); after that, tries
        again at most once a second (the caller counts what it could not write).
        """
        body = b"%d %s %s" % (seq, type.encode(), data)
        size = len(body) + 1
        if self.bytes + size > self.max_bytes and not keep_when_full and not self.has_room(size):
            return False
        if self.end + size > self._size:
            now = time.monotonic()
            if now < self._next_rotate_try:
                raise OSError(errno.ENOSPC, "no new spool segment (the last try failed less than 1 s ago)")
            try:
                self._rotate(seq, max(SEGMENT_BYTES, size))
            except OSError:
                self._next_rotate_try = now + 1.0
                raise
        assert self._map is not None
        self._map[self.end : self.end + size - 1] = body
        self._map[self.end + size - 1] = NEWLINE
        self.end += size
        self.next_seq = seq + 1
        self._unpushed += size
        self._open_chunk += size
        if self._open_chunk >= self._chunk_bytes:
            self._chunks.append((seq, self._open_chunk))
            self._open_chunk = 0
        return True

    def has_room(self, size: int) -> bool:
        """Forget what was pushed (the control page says, in a memory read) or removed since; True if
        ``size`` more bytes fit. Looks for removed segments at most once a second, so a full spool
        stays cheap to hit."""
        pushed = self._pushed()
        while self._chunks and self._chunks[0][0] <= pushed:
            self._unpushed -= self._chunks.popleft()[1]
        if not self._chunks and pushed >= self.next_seq - 1:
            self._unpushed -= self._open_chunk
            self._open_chunk = 0
        now = time.monotonic()
        if self._backlog and now >= self._next_recount:
            self._next_recount = now + 1.0
            for segment in [s for s in self._backlog if not s.exists()]:
                self._backlog_total -= self._backlog.pop(segment)
        return self.bytes + size <= self.max_bytes

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None

    def _rotate(self, first_seq: int, size: int) -> None:
        """Start a new segment: the spare the delivery process made, when there is one; a new
        writer always starts one, never appends to an old one."""
        path = self.run.dir / f"{first_seq:012d}{SEGMENT_SUFFIX}"
        new_map = _take_spare(self.run.dir / SPARE_NAME, path) if size <= SEGMENT_BYTES else None
        if new_map is None:  # the first segment (small, so writing it through is cheap), or no spare yet
            new_map = _new_segment_file(path, size, written=size <= FIRST_SEGMENT_BYTES)
        if self._map is not None:
            self._map.close()
        self._map, self._size, self.segment, self.end = new_map, len(new_map), path, 0


def prepare_spare(run: RunSpool) -> None:
    """Make the writer's next segment, if none is ready: called by the delivery process. Written
    through once with zeros, so its blocks are allocated and its pages cached; made under another
    name and renamed, so a spare is always whole."""
    path = run.dir / SPARE_NAME
    if path.exists():
        return
    tmp = run.dir / f"{SPARE_NAME}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.posix_fallocate(fd, 0, SEGMENT_BYTES)
        os.pwrite(fd, bytes(SEGMENT_BYTES), 0)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _take_spare(spare: Path, path: Path) -> mmap.mmap | None:
    """The spare, renamed to ``path`` and mapped; None when there is none (or it is not whole)."""
    try:
        os.replace(spare, path)  # an old file of this name (no whole record in it) goes
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return None
    try:
        if os.fstat(fd).st_size != SEGMENT_BYTES:
            return None  # not one of ours: _new_segment_file starts this segment afresh
        return mmap.mmap(fd, SEGMENT_BYTES, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)


def _new_segment_file(path: Path, size: int, *, written: bool = False) -> mmap.mmap:
    """``written``: zeros written through, so that the first appends do not pay for the blocks."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, 0)  # an existing file of this name holds no whole record
        os.posix_fallocate(fd, 0, size)
        if written:
            os.pwrite(fd, bytes(size), 0)
        return mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except OSError:
        path.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)  # the mapping keeps the file open


def records_end(segment: Path) -> int:
    """Offset just past the last whole record of a segment (the rest is preallocated zeros)."""
    try:
        with open(segment, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            return mm.rfind(b"\n") + 1
    except (FileNotFoundError, ValueError):  # gone, or empty (mmap refuses 0 bytes)
        return 0


def last_record(segment: Path) -> Record | None:
    """The last whole record of a segment, found from its end."""
    try:
        with open(segment, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            end = mm.rfind(b"\n")
            while end > 0:
                start = mm.rfind(b"\n", 0, end) + 1
                record = _parse(mm[start:end])
                if record is not None:
                    return record
                end = start - 1
    except (FileNotFoundError, ValueError):
        pass
    return None


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
