"""Checkpoint snapshots: a complete, hashed copy of a file the trainer rewrites in place.

Ultralytics rewrites ``last.pt``/``best.pt`` in place (truncate + write, same inode), so a
reader can see a half-written file. The hook only ``stat``s the file (microseconds) and
records its stamp in the checkpoint event. A background thread then copies it in the
kernel (``shutil.copyfile`` uses sendfile), checks that the stamp did not change before or
during the copy, checks a zip file's members (``torch.save`` writes zips) and records the
sha256. The result goes to a sidecar ``<seq>.json`` that the pusher merges into the event.

If the process dies before the copy, whoever pushes the spool later makes the snapshot
itself, and the stamp check tells whether the file is still the version the hook saw.
Only what can still be uploaded is kept: the newest snapshot, the newest best, the finals.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import queue
import shutil
import struct
import threading
import time
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from shared.checksum import CHUNK, sha256_of
from shared.errors import TrainbusError
from shared.events import EventType

log = logging.getLogger("trainbus.snapshot")

ZIP_MAGIC = b"PK\x03\x04"
SNAPSHOT_TYPES = frozenset({EventType.CHECKPOINT.value, EventType.FINAL.value})  # events that carry one


class SnapshotError(TrainbusError):
    """The version the hook saw cannot be captured; the message says why."""


@dataclass(frozen=True, slots=True)
class Stamp:
    """What identifies one version of a file: inode, size and modification time."""

    ino: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: Path | str) -> Stamp:
        st = os.stat(path)
        return cls(st.st_ino, st.st_size, st.st_mtime_ns)

    def as_dict(self) -> dict[str, int]:
        return {"ino": self.ino, "size": self.size, "mtime_ns": self.mtime_ns}


def checkpoint_request(source: Path | str, label: str) -> dict[str, Any]:
    """The ``checkpoint`` part of an event as the hook writes it: a path and its stamp."""
    try:
        stamp = Stamp.of(source).as_dict()
    except OSError as exc:
        return {"source": str(source), "label": label, "error": f"cannot stat: {exc.strerror}"}
    return {"source": str(source), "label": label, "stamp": stamp}


def take_snapshot(source: Path, expected: Stamp, dest: Path) -> dict[str, Any]:
    """Copy ``source`` to ``dest`` if it is still the ``expected`` version; verify; hash."""
    before = Stamp.of(source)
    if before != expected:
        raise SnapshotError(f"{source} was rewritten before it could be copied (superseded)")
    tmp = dest.with_name(f"{dest.name}.{os.getpid()}-{threading.get_ident()}.part")  # racing makers each copy
    shutil.copyfile(source, tmp)
    try:
        if Stamp.of(source) != before:
            raise SnapshotError(f"{source} changed while it was being copied")
        copied_at = time.time()  # from here on the trainer may rewrite the file
        size = tmp.stat().st_size
        if size != before.size:
            raise SnapshotError(f"copied {size} bytes of {source}, expected {before.size}")
        digest = _check_and_hash(tmp, source)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, dest)
    return {"path": str(dest), "sha256": digest, "size": size, "copied_at": copied_at}


def _check_and_hash(copy: Path, source: Path) -> str:
    """The copy's sha256; a file that starts like a zip must also be a whole zip with valid member
    CRCs. One read of the copy does both when every member is stored (``torch.save`` stores): a
    260 MB checkpoint is read once instead of twice."""
    with open(copy, "rb") as f:
        if f.read(4) != ZIP_MAGIC:
            return sha256_of(copy)
        try:
            with zipfile.ZipFile(f) as zf:
                members = zf.infolist()
                if any(m.compress_type != zipfile.ZIP_STORED for m in members):
                    bad = zf.testzip()
                    if bad is not None:
                        raise SnapshotError(f"{source} member {bad!r} fails its CRC check (torn write?)")
                    return sha256_of(copy)
                ranges = sorted((_data_offset(f, m), m) for m in members)
        except (zipfile.BadZipFile, OSError, EOFError, struct.error) as exc:
            raise SnapshotError(f"{source} is not a complete zip (torn write?): {exc}") from None
        f.seek(0)
        digest = hashlib.sha256()
        crcs = [0] * len(ranges)
        position, first = 0, 0  # members before ``first`` end before the current chunk
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            end = position + len(chunk)
            k = first
            while k < len(ranges) and ranges[k][0] < end:  # members overlapping this chunk
                start, member = ranges[k]
                stop = start + member.file_size
                if stop > position:
                    view = memoryview(chunk)[max(start, position) - position : min(stop, end) - position]
                    crcs[k] = zlib.crc32(view, crcs[k])
                if stop <= end and k == first:
                    first += 1
                k += 1
            position = end
    for crc, (start, member) in zip(crcs, ranges, strict=True):
        if crc != member.CRC or start + member.file_size > position:
            raise SnapshotError(f"{source} member {member.filename!r} fails its CRC check (torn write?)")
    return digest.hexdigest()


def _data_offset(f: Any, member: zipfile.ZipInfo) -> int:
    """Where a member's bytes start: after its local header, whose name and extra field may differ
    in length from the central directory's."""
    f.seek(member.header_offset)
    header = f.read(zipfile.sizeFileHeader)
    if len(header) != zipfile.sizeFileHeader or header[:4] != zipfile.stringFileHeader:
        raise zipfile.BadZipFile(f"bad local header for {member.filename!r}")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return member.header_offset + zipfile.sizeFileHeader + name_len + extra_len


class Snapshotter:
    """Makes the snapshots of one run, in a background thread or on demand.

    ``submit`` is called from the hook; ``result`` from the pusher (the delivery process's, or a drainer's) when it
    reaches the event: it returns the sidecar, ``None`` while the thread still works on
    it, or makes the snapshot right there when no thread ever will (a previous process).
    """

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        _remove_parts_of_dead_makers(directory)
        self._queue: queue.SimpleQueue[tuple[int, dict[str, Any]] | None] = queue.SimpleQueue()
        self._queued: set[int] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.on_done: Callable[[], None] = lambda: None  # the push thread's wake-up

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="trainbus-snapshot", daemon=True)
        self._thread.start()

    def submit(self, seq: int, request: dict[str, Any]) -> None:
        with self._lock:
            self._queued.add(seq)
        self._queue.put((seq, request))

    def stop(self, timeout: float | None = None) -> None:
        """Stop after the snapshot in progress; a copy still running after ``timeout`` is left to
        the daemon thread (whoever pushes the spool later makes what has no sidecar)."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout)
            self._thread = None

    def result(self, seq: int, request: dict[str, Any]) -> dict[str, Any] | None:
        sidecar = self._sidecar(seq)
        try:
            return orjson.loads(sidecar.read_bytes())
        except FileNotFoundError:
            pass
        with self._lock:
            if seq in self._queued:
                return None
        return self._make(seq, request)

    def forget(self, seq: int) -> None:
        """The event was pushed: its sidecar is no longer needed."""
        self._sidecar(seq).unlink(missing_ok=True)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            seq, request = item
            try:
                self._make(seq, request)
            except Exception:  # never let the thread die: the next checkpoint matters too
                log.exception("snapshot of event %d failed unexpectedly", seq)
            finally:
                with self._lock:
                    self._queued.discard(seq)
                self.on_done()

    def _make(self, seq: int, request: dict[str, Any]) -> dict[str, Any]:
        with contextlib.suppress(FileNotFoundError):  # made already (by a process since killed, or a drainer)
            return orjson.loads(self._sidecar(seq).read_bytes())
        if "error" in request:
            result: dict[str, Any] = {"error": request["error"]}
        else:
            dest = self.dir / f"{seq:012d}-{request['label']}{Path(request['source']).suffix}"
            try:
                result = take_snapshot(Path(request["source"]), Stamp(**request["stamp"]), dest)
            except SnapshotError as exc:
                result = {"error": str(exc)}
            except OSError as exc:
                result = {"error": f"cannot snapshot {request['source']}: {exc.strerror or exc}"}
        if "error" in result:
            log.warning("checkpoint of event %d not captured: %s", seq, result["error"])
        tmp = self._sidecar(seq).with_suffix(f".{os.getpid()}-{threading.get_ident()}.tmp")
        tmp.write_bytes(orjson.dumps(result))
        os.replace(tmp, self._sidecar(seq))
        self._prune()
        return result

    def _sidecar(self, seq: int) -> Path:
        return self.dir / f"{seq:012d}.json"

    def _prune(self) -> None:
        """Keep the newest snapshot, the newest best, and finals; the rest is superseded."""
        snaps = sorted(p for p in self.dir.iterdir() if "-" in p.name and not p.name.endswith((".part", ".tmp")))
        periodic = [p for p in snaps if "-final" not in p.name]
        best = [p for p in periodic if "-best" in p.name]
        keep = {p for p in snaps if "-final" in p.name} | set(periodic[-1:]) | set(best[-1:])
        for path in snaps:
            if path not in keep:
                path.unlink(missing_ok=True)


def _remove_parts_of_dead_makers(directory: Path) -> None:
    """Partial copies and sidecars left by a process killed while it made them."""
    with contextlib.suppress(FileNotFoundError):
        for path in directory.iterdir():
            if path.suffix in (".part", ".tmp") and not _alive(path.stem.rsplit(".", 1)[-1].split("-")[0]):
                path.unlink(missing_ok=True)


def _alive(pid: str) -> bool:
    if not pid.isdigit():
        return False  # a name from before makers were named: its maker is gone
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
