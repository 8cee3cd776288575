"""Removing a run's checkpoint snapshots once every sink is done with them.

A snapshot is kept while a sink may still upload it. Each sink marks a run ``finished`` in
its state when it needs nothing more of it; the sinks that count are the stream's consumer
groups, but for those marked abandoned (see ``trainbus groups``); with no group at all
yet, the first dispatcher is waited for. Once all of them
finished the run, or ``TRAINBUS_SNAPSHOT_RETENTION_H`` after the run's last file changed
(a sink down for that long, or state that expired), the snapshots go. Only runs nobody
writes or pushes any more, with nothing left unpushed, are looked at.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import redis

from producers.spool import RunSpool, run_dirs
from shared.keys import Keys

NO_SINK_YET = "a first dispatcher (the stream has no consumer group yet)"


@dataclass(frozen=True)
class Held:
    """Snapshots of one run that stay for now, and why."""

    run_id: str
    files: int
    bytes: int
    waiting_for: tuple[str, ...]  # sinks that have not finished the run
    until: float  # unix time when the retention removes them anyway


def collect(root: Path, client: redis.Redis, keys: Keys, retention_s: float) -> list[Held]:
    """Remove the snapshots no sink needs any more; returns what is still held."""
    sinks = sinks_that_count(client, keys)
    held = []
    for run in run_dirs(root):
        files = _snapshot_files(run)
        if not files or not _idle(run):
            continue
        waiting = tuple(sorted(s for s in sinks if not client.hexists(keys.state(s, run.run_id), "finished")))
        if not sinks:
            waiting = (NO_SINK_YET,)
        until = max(_mtime(f) for f in files) + retention_s
        if waiting and time.time() < until:
            held.append(Held(run.run_id, len(files), sum(_size(f) for f in files), waiting, until))
            continue
        for path in files:
            path.unlink(missing_ok=True)
    return held


def sinks_that_count(client: redis.Redis, keys: Keys) -> list[str]:
    """The stream's consumer groups, but for the abandoned ones."""
    try:
        groups = [
            g["name"].decode() if isinstance(g["name"], bytes) else g["name"] for g in client.xinfo_groups(keys.events)
        ]
    except redis.ResponseError:  # no stream yet
        return []
    abandoned = {a.decode() for a in client.smembers(keys.abandoned_groups)}
    return [g for g in groups if g not in abandoned]


def _snapshot_files(run: RunSpool) -> list[Path]:
    try:
        return [run.checkpoint_dir / n for n in os.listdir(run.checkpoint_dir)]
    except FileNotFoundError:
        return []


def _idle(run: RunSpool) -> bool:
    """Nobody writes or pushes the run, and everything it spooled is in Redis."""
    return not run.segments() and run.writer_lock.is_free() and run.pusher_lock.is_free()


def _mtime(path: Path) -> float:
    with contextlib.suppress(OSError):
        return path.stat().st_mtime
    return 0.0


def _size(path: Path) -> int:
    with contextlib.suppress(OSError):
        return path.stat().st_size
    return 0
