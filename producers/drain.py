"""Pushing spools that no training process is pushing any more.

Three callers: the detached drainer a producer starts at exit when its bounded flush did
not finish (or at start, for spools a killed process left behind); ``trainbus spool
replay``; and tests. A run is drained only while nobody else holds its pusher lock, so a
drainer and a restarted producer of the same run never push at the same time.

Run as ``python -m producers.drain`` (what the producer spawns); the Redis URL comes from
the environment, never the command line, so a password does not show in ``ps``.
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

from producers.flusher import REDIS_DOWN, Pusher, connect
from producers.snapshot import Snapshotter
from producers.spool import RunSpool, run_dirs
from shared.backoff import compute_backoff
from shared.keys import Keys
from shared.settings import redact_url

log = logging.getLogger("trainbus.drain")

DRAINER_GIVE_UP_S = 24 * 3600  # the detached drainer stops trying after a day
DRAIN_LOG = "drain.log"


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


def drain_run(run: RunSpool, client: redis.Redis, keys: Keys) -> int | None:
    """Push one run's spool; None when another process holds its pusher lock."""
    if not run.pusher_lock.acquire():
        return None
    try:
        pusher = Pusher(run, client, keys, Snapshotter(run.checkpoint_dir))
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
) -> DrainReport:
    """Push every pending run until done, retrying with backoff while Redis is down.

    Stops early when what is left is being pushed by other processes.
    """
    report = DrainReport()
    client = connect(redis_url)
    deadline = time.monotonic() + give_up_after
    started_with = {r.run_id for r in pending_runs(root, run_ids)}
    attempt = 0
    while runs := pending_runs(root, run_ids):
        locked = 0
        try:
            for run in runs:
                n = drain_run(run, client, keys)
                if n is None:
                    locked += 1
                    continue
                report.pushed += n
                if on_progress:
                    on_progress(run.run_id, n)
        except REDIS_DOWN as exc:
            report.last_error = f"Redis at {redact_url(redis_url)} unreachable: {exc}"
            if time.monotonic() >= deadline:
                break
            time.sleep(min(compute_backoff(attempt, base=0.5, cap=60.0), max(0.0, deadline - time.monotonic())))
            attempt += 1
            continue
        if locked == len(runs):
            break  # what is left is being pushed by other processes
    left = pending_runs(root, run_ids)
    report.runs_left = [r.run_id for r in left]
    report.runs_done = sorted(started_with - set(report.runs_left))
    return report


def spawn_drainer(root: Path, redis_url: str, namespace: str, run_ids: list[str]) -> subprocess.Popen:
    """Start a detached drainer that outlives this process; its log is in the spool root."""
    env = dict(os.environ, TRAINBUS_REDIS_URL=redis_url, TRAINBUS_NAMESPACE=namespace)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / DRAIN_LOG, "ab") as logfile:
        return subprocess.Popen(
            [sys.executable, "-m", "producers.drain", "--spool-dir", str(root), *run_ids],
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
        f"(gives up after {DRAINER_GIVE_UP_S // 3600} h). Redis URL from TRAINBUS_REDIS_URL.",
    )
    parser.add_argument("--spool-dir", type=Path, required=True)
    parser.add_argument("run_ids", nargs="*", help="runs to drain (default: every orphaned run)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s drainer[%(process)d] %(levelname)s %(message)s")
    from shared.settings import Settings  # the drainer takes the same settings as producers

    settings = Settings.from_env(spool_dir=args.spool_dir)
    report = drain(args.spool_dir, settings.redis_url, Keys(settings.namespace), run_ids=args.run_ids or None)
    if report.runs_left:
        log.error("gave up; still in the spool: %s (%s)", report.runs_left, report.last_error)
        return 1
    log.info("pushed %d events; spool empty for %s", report.pushed, report.runs_done)
    return 0


if __name__ == "__main__":
    sys.exit(main())
