"""Pushing spools that no training process is pushing any more, and clearing their snapshots.

Callers: the detached drainer a delivery process starts for spools that killed processes
(and their delivery processes) left behind, or for other runs' snapshots waiting for sinks;
``trainbus spool replay``; the delivery process itself, which waits for sinks the same way
once its run is delivered; and tests. A run is pushed only by whoever holds its pusher
lock, so a drainer and a delivery process of the same run never push at the same time.

A drainer then stays while snapshots in its spool wait for sinks to finish their runs
(``producers/retention.py``), one such process per spool directory.

Run as ``python -m producers.drain`` (a delivery process starts it through ``ENTRY``); the
Redis URL comes from the environment, never the command line, so a password does not show
in ``ps``.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import redis

from producers.pusher import Pusher
from producers.retention import Held, collect
from producers.snapshot import Snapshotter
from producers.spool import FileLock, RunSpool, run_dirs
from shared.backoff import compute_backoff
from shared.keys import Keys
from shared.redis_client import PRODUCER, REDIS_UNAVAILABLE, connect
from shared.settings import Settings, redact_url

log = logging.getLogger("trainbus.drain")

DRAINER_GIVE_UP_S = 24 * 3600  # the detached drainer stops trying after a day
DRAIN_LOG = "drain.log"
JANITOR_LOCK = "janitor.lock"  # held by the one drainer of a spool directory that waits for sinks
LOCK_POLL_S = 0.2
COLLECT_POLL_S = 5.0  # how soon to look again at snapshots waiting for sinks, doubling to
COLLECT_MAX_POLL_S = 300.0  # ... this
# How a producer starts these processes: ``-m`` would import the module twice (the package's
# __init__ imports it first) and say so in the log.
ENTRY = "import sys; from {module} import main; sys.exit(main(sys.argv[1:]))"


@dataclass
class DrainReport:
    pushed: int = 0
    runs_done: list[str] = field(default_factory=list)
    runs_left: list[str] = field(default_factory=list)
    last_error: str | None = None


def pending_runs(root: Path, run_ids: list[str] | None = None) -> list[RunSpool]:
    """Runs (all, or ``run_ids``) with spooled records and no live training process."""
    runs = [RunSpool(root, r) for r in run_ids] if run_ids else run_dirs(root)
    return [r for r in runs if r.segments() and r.writer_lock.is_free()]


def drain_run(run: RunSpool, client: redis.Redis, keys: Keys, min_replicas: int = 0) -> int | None:
    """Push one run's spool; None when another process holds its pusher lock."""
    if not run.pusher_lock.acquire():
        return None
    try:
        run.drop_spare()  # its writer is gone (pending_runs): the next segment it made ahead is not needed
        pusher = Pusher(run, client, keys, Snapshotter(run.checkpoint_dir), min_replicas=min_replicas)
        return pusher.push_available()
    finally:
        run.pusher_lock.release()


def drain(
    root: Path,
    redis_url: str,
    keys: Keys,
    *,
    run_ids: list[str] | None = None,
    give_up_after: float = DRAINER_GIVE_UP_S,
    on_progress: Callable[[str, int], None] | None = None,
    min_replicas: int = 0,
) -> DrainReport:
    """Push every pending run until done, retrying with backoff while Redis is down and waiting
    for pusher locks held by other processes. A file error of the spool itself stops it."""
    report = DrainReport()
    client = connect(redis_url, PRODUCER)
    deadline = time.monotonic() + give_up_after
    started_with = {r.run_id for r in pending_runs(root, run_ids)}
    attempt = 0
    while (runs := pending_runs(root, run_ids)) and time.monotonic() < deadline:
        locked = 0
        try:
            for run in runs:
                n = drain_run(run, client, keys, min_replicas)
                if n is None:
                    locked += 1
                    continue
                report.pushed += n
                if on_progress:
                    on_progress(run.run_id, n)
        except REDIS_UNAVAILABLE as exc:
            report.last_error = f"Redis at {redact_url(redis_url)} unreachable: {exc}"
            time.sleep(min(compute_backoff(attempt, base=0.5, cap=60.0), max(0.0, deadline - time.monotonic())))
            attempt += 1
            continue
        except OSError as exc:  # the spool's files, not the network: retrying will not help
            report.last_error = f"cannot read the spool at {root}: {exc}"
            break
        attempt = 0
        if locked:
            report.last_error = "another process (an exiting training process, or a drainer) is pushing them"
            time.sleep(min(LOCK_POLL_S, max(0.0, deadline - time.monotonic())))
    left = pending_runs(root, run_ids)
    report.runs_left = [r.run_id for r in left]
    report.runs_done = sorted(started_with - set(report.runs_left))
    return report


def wait_for_sinks(root: Path, redis_url: str, keys: Keys, retention_s: float, deadline: float) -> None:
    """Stay (one per spool directory) while snapshots wait for sinks; remove them when they may go."""
    lock = FileLock(root / JANITOR_LOCK)
    client = connect(redis_url, PRODUCER)
    attempt = 0
    polls = COLLECT_POLL_S
    said: list[Held] | None = None
    while time.monotonic() < deadline:
        if not lock.acquire():
            return  # another drainer of this spool does it; it looks at every run
        try:
            held = collect(root, client, keys, retention_s)
            attempt = 0
        except REDIS_UNAVAILABLE:
            held = None
            attempt += 1
        if held == []:
            lock.release()  # then one more look, for a run that became ready just now
            if not collect(root, client, keys, retention_s) or not lock.acquire():
                return
            continue
        if held and [(h.run_id, h.waiting_for) for h in held] != [(h.run_id, h.waiting_for) for h in said or []]:
            log.info(
                "snapshots held for %s", ", ".join(f"{h.run_id} (waiting for {','.join(h.waiting_for)})" for h in held)
            )
            said = held
        time.sleep(compute_backoff(attempt, base=1.0, cap=60.0) if held is None else min(polls, COLLECT_MAX_POLL_S))
        polls = polls * 2 if held else COLLECT_POLL_S
    lock.release()


def spawn_drainer(root: Path, settings: Settings, run_ids: list[str]) -> subprocess.Popen:
    """Start a detached drainer that outlives this process; its log is in the spool root."""
    return spawn_detached(root, settings, [ENTRY.format(module="producers.drain"), "--spool-dir", str(root), *run_ids])


def spawn_detached(root: Path, settings: Settings, args: list[str], pass_fds: tuple[int, ...] = ()) -> subprocess.Popen:
    """``python -c ARGS...`` in its own session (a Ctrl-C of the training does not reach it), logging to
    the spool root's drain.log; the Redis URL goes in its environment, never on its command line."""
    env = dict(
        os.environ,
        TRAINBUS_REDIS_URL=settings.redis_url,
        TRAINBUS_NAMESPACE=settings.namespace,
        TRAINBUS_SNAPSHOT_RETENTION_H=repr(settings.snapshot_retention_h),
        TRAINBUS_REDIS_MIN_REPLICAS=str(settings.redis_min_replicas),
    )
    root.mkdir(parents=True, exist_ok=True)
    with open(root / DRAIN_LOG, "ab") as logfile:
        return subprocess.Popen(
            [sys.executable, "-c", *args],
            pass_fds=pass_fds,
            stdin=subprocess.DEVNULL,
            stdout=logfile,
            stderr=logfile,
            start_new_session=True,
            env=env,
            cwd=str(root),
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m producers.drain",
        description="Push spooled trainbus events to Redis, retrying until done "
        f"(gives up after {DRAINER_GIVE_UP_S // 3600} h), then remove checkpoint snapshots once every "
        "sink is done with them. Redis URL from TRAINBUS_REDIS_URL.",
    )
    parser.add_argument("--spool-dir", type=Path, required=True)
    parser.add_argument("run_ids", nargs="*", help="runs to drain (default: every orphaned run)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s drainer[%(process)d] %(levelname)s %(message)s")
    settings = Settings.from_env(spool_dir=args.spool_dir)
    keys = Keys(settings.namespace)
    deadline = time.monotonic() + DRAINER_GIVE_UP_S
    report = drain(
        args.spool_dir, settings.redis_url, keys, run_ids=args.run_ids or None, min_replicas=settings.redis_min_replicas
    )
    if report.runs_left:
        log.error("gave up; still in the spool: %s (%s)", report.runs_left, report.last_error)
        return 1
    log.info("pushed %d events; spool empty for %s", report.pushed, report.runs_done)
    wait_for_sinks(args.spool_dir, settings.redis_url, keys, settings.snapshot_retention_s, deadline)
    return 0


if __name__ == "__main__":
    sys.exit(main())
