"""The control page: what the delivery process tells the training process, by shared memory.

A 4 KiB file in the run's directory, mapped by both processes. The delivery process writes
it; the training process only reads it, with a memory read (no system call, no lock, no
thread), when a hook runs or ``close()`` waits::

    0     int64   pushed: the highest spool seq known to be in the stream (-1: none yet)
    8     uint8   redis_down: 1 while the last push failed
    9     uint8   stop: 1 once the run was told to stop (the reason is written before it)
    10    uint8   following: 1 once the delivery process follows the spool (snapshots are made)
    12    uint32  failures: how many pushes failed because Redis could not take them
    16    double  heartbeat: the delivery process's CLOCK_MONOTONIC at its last look at the spool
    24    256 B   the stop reason, UTF-8, NUL-padded
    512   uint32  sample version: odd while the sample below is being rewritten
    516   uint32  sample length
    520   ...     the latest machine-load sample, JSON (see producers/system.py)

Each field has one writer. The pushed seq, the failures and the heartbeat only grow, so a reader that
sees an old value waits a little longer; the sample is guarded by its version (a reader that sees it change
keeps the previous sample).
"""

from __future__ import annotations

import mmap
import os
import struct
import time
from pathlib import Path

CONTROL_NAME = "control"
SIZE = 4096
_PUSHED = struct.Struct("<q")
_U32 = struct.Struct("<I")
REDIS_DOWN_AT, STOP_AT, FOLLOWING_AT, FAILURES_AT = 8, 9, 10, 12
_HEARTBEAT = struct.Struct("<d")
HEARTBEAT_AT = 16
REASON_AT, REASON_BYTES = 24, 256
SAMPLE_VERSION_AT, SAMPLE_LEN_AT, SAMPLE_AT = 512, 516, 520
SAMPLE_MAX = SIZE - SAMPLE_AT


class Control:
    """One run's control page, mapped (``create`` by the training process, ``attach`` by the other)."""

    def __init__(self, mapping: mmap.mmap, path: Path, inode: int) -> None:
        self._map = mapping
        self._path = path
        self._inode = inode
        self._sample_version = -1
        self._sample: bytes | None = None

    @classmethod
    def create(cls, run_dir: Path) -> Control:
        """A fresh page (pushed unknown, no stop order): every process start begins with one."""
        path = run_dir / CONTROL_NAME
        tmp = path.with_name(f".{CONTROL_NAME}.{os.getpid()}.tmp")
        page = bytearray(SIZE)
        _PUSHED.pack_into(page, 0, -1)
        tmp.write_bytes(page)
        os.replace(tmp, path)  # a delivery process of an earlier writer keeps its own (old) page
        return cls.attach(run_dir)

    @classmethod
    def attach(cls, run_dir: Path) -> Control:
        path = run_dir / CONTROL_NAME
        with open(path, "r+b") as f:
            mapping = mmap.mmap(f.fileno(), SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            return cls(mapping, path, os.fstat(f.fileno()).st_ino)

    def replaced(self) -> bool:
        """A new training process of the run made its own page: its delivery process takes over."""
        try:
            return os.stat(self._path).st_ino != self._inode
        except FileNotFoundError:
            return True

    def close(self) -> None:
        self._map.close()

    # -- read by the training process -------------------------------------------------

    @property
    def pushed(self) -> int:
        return _PUSHED.unpack_from(self._map, 0)[0]

    @property
    def redis_down(self) -> bool:
        return self._map[REDIS_DOWN_AT] == 1

    @property
    def following(self) -> bool:
        return self._map[FOLLOWING_AT] == 1

    @property
    def failures(self) -> int:
        return _U32.unpack_from(self._map, FAILURES_AT)[0]

    @property
    def heartbeat(self) -> float:
        return _HEARTBEAT.unpack_from(self._map, HEARTBEAT_AT)[0]

    @property
    def stop_reason(self) -> str | None:
        if self._map[STOP_AT] != 1:
            return None
        return self._map[REASON_AT : REASON_AT + REASON_BYTES].rstrip(b"\0").decode(errors="replace")

    def sample(self) -> bytes | None:
        """The latest machine-load sample (JSON bytes), or None before the first one."""
        version = _U32.unpack_from(self._map, SAMPLE_VERSION_AT)[0]
        if version == self._sample_version or version % 2:
            return self._sample  # unchanged, or being rewritten right now: the previous one
        length = _U32.unpack_from(self._map, SAMPLE_LEN_AT)[0]
        data = self._map[SAMPLE_AT : SAMPLE_AT + min(length, SAMPLE_MAX)]
        if _U32.unpack_from(self._map, SAMPLE_VERSION_AT)[0] == version:
            self._sample, self._sample_version = data, version
        return self._sample

    # -- written by the delivery process ----------------------------------------------

    def set_pushed(self, seq: int) -> None:
        _PUSHED.pack_into(self._map, 0, seq)

    def set_redis_down(self, down: bool) -> None:
        self._map[REDIS_DOWN_AT] = 1 if down else 0
        if down:
            _U32.pack_into(self._map, FAILURES_AT, (self.failures + 1) & 0xFFFFFFFF)

    def set_following(self) -> None:
        self._map[FOLLOWING_AT] = 1

    def beat(self) -> None:
        _HEARTBEAT.pack_into(self._map, HEARTBEAT_AT, time.monotonic())

    def set_stop(self, reason: str) -> None:
        data = reason.encode()[:REASON_BYTES]
        self._map[REASON_AT : REASON_AT + REASON_BYTES] = data.ljust(REASON_BYTES, b"\0")
        self._map[STOP_AT] = 1

    def set_sample(self, data: bytes) -> None:
        if len(data) > SAMPLE_MAX:
            return  # a machine with hundreds of disks: no sample rather than a cut one
        version = _U32.unpack_from(self._map, SAMPLE_VERSION_AT)[0]
        _U32.pack_into(self._map, SAMPLE_VERSION_AT, version + 1)
        _U32.pack_into(self._map, SAMPLE_LEN_AT, len(data))
        self._map[SAMPLE_AT : SAMPLE_AT + len(data)] = data
        _U32.pack_into(self._map, SAMPLE_VERSION_AT, version + 2)
