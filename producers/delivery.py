"""The delivery process: everything a training process's telemetry needs but the append.

One per publisher, spawned (not forked) when it opens, so no thread of trainbus's ever
holds the training interpreter's GIL. It follows the run's spool (``producers/tail.py``),
makes checkpoint snapshots as soon as the events appear, pushes to Redis, refreshes the
run's liveness key, learns stop orders, samples the machine's load, and makes the writer's
next segment ahead. It tells the training process what it needs through the control page
(``producers/control.py``). The training process makes no system call to tell it of an
event: the tail looks at the spool every 20 ms, a memory read when nothing is new. The pipe
between them carries a byte for a checkpoint event (its copy starts at once), a "push now"
from a closing publisher, and its end of file.

When the training process has gone (the pipe's end of file: closed or killed), it keeps
going until the spool is delivered, like any drainer, then waits for sinks to finish with
the run's snapshots (``producers/drain.py``) and exits.

Started as ``python -m producers.delivery`` would be (see ``ENTRY``); the Redis URL comes from the environment, never
the command line, so a password does not show in ``ps``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import select
import subprocess
import sys
import threading
import time
from pathlib import Path

import orjson

from producers.control import Control
from producers.drain import DRAINER_GIVE_UP_S, ENTRY, pending_runs, spawn_detached, spawn_drainer, wait_for_sinks
from producers.pusher import Pusher
from producers.snapshot import Snapshotter
from producers.spool import RunSpool, prepare_spare, run_dirs
from producers.system import SystemSampler
from producers.tail import SpoolTail
from shared.backoff import compute_backoff
from shared.keys import LIVENESS_REFRESH_S, LIVENESS_TTL_S, Keys
from shared.redis_client import PRODUCER, REDIS_UNAVAILABLE, connect
from shared.settings import Settings

log = logging.getLogger("trainbus.delivery")

POLL_S = 0.02  # how often the tail looks for new records: hooks make no system call to say so
FULL_LOOK_S = 0.1  # how often it also lists the directory (a new segment)
WAKE, FLUSH_NOW = b"\0", b"\1"  # on the pipe: a checkpoint to copy now; a closing publisher's "push now"
NICE = 5  # below the training's priority, not so far that a busy machine starves the snapshots
IDLE_S = 1.0  # the longest the push thread sleeps without being told of new records
STOP_CHECK_S = 1.0  # how often a live run looks for its stop order
WRITER_POLL_S = 0.2  # after the pipe's end: how often to look whether the writer's lock is free
SYSTEM_EVERY_S = 10.0  # how often the machine's load is sampled


class Delivery:
    """The process's work for one run: the tail in the main thread, pushes in another."""

    def __init__(self, run: RunSpool, settings: Settings, wake_fd: int, from_seq: int, system: bool) -> None:
        self.run = run
        self.settings = settings
        self.wake_fd = wake_fd
        self.control = Control.attach(run.dir)
        self.snapshots = Snapshotter(run.checkpoint_dir)
        self.tail = SpoolTail(run, self.snapshots, from_seq)
        client = connect(settings.redis_url, PRODUCER)
        keys = Keys(settings.namespace)
        self.pusher = Pusher(run, client, keys, self.snapshots, self.tail, min_replicas=settings.redis_min_replicas)
        self.system = SystemSampler() if system else None
        self.writer_gone = False
        self.superseded = False  # a new training process of the run took over
        self.delivered = False
        self._push_wake = threading.Event()
        self._retry_now = False  # the publisher is closing: do not wait out a backoff
        self._next_sample = 0.0
        self._next_liveness = 0.0
        self._next_stop_check = 0.0
        self._stop_order_seen = False
        self._redis_up = True
        self._spool_error: str | None = None

    def run_until_delivered(self) -> None:
        self.snapshots.on_done = self._push_wake.set
        self.snapshots.start()
        pushing = threading.Thread(target=self._push_loop, name="trainbus-push", daemon=True)
        pushing.start()
        try:
            self._follow_writer()
            if not self.superseded:
                self.tail.finish()
                self.run.drop_spare()
            self._push_wake.set()
            pushing.join(DRAINER_GIVE_UP_S)
        finally:
            self.snapshots.stop()

    # -- the main thread: the tail ------------------------------------------------------

    def _follow_writer(self) -> None:
        """Until the writer is gone: look at the spool every POLL_S (a memory read when nothing is new),
        read what was appended, make the writer's next segment, sample the machine."""
        self.tail.follow()
        self.control.set_following()
        next_full_look = 0.0
        while not self.writer_gone:
            self.control.beat()
            readable, _, _ = select.select([self.wake_fd], [], [], POLL_S)
            if readable:
                wakes = os.read(self.wake_fd, 1 << 16)
                if not wakes:  # end of file: every writer end closed
                    self._wait_for_writer_lock()
                elif FLUSH_NOW in wakes:
                    self._retry_now = True
            now = time.monotonic()
            if readable or self.tail.has_new() or now >= next_full_look:
                next_full_look = now + FULL_LOOK_S  # a rotation shows only in the directory
                try:
                    if self.tail.follow():
                        self._push_wake.set()
                    if not self.writer_gone:
                        prepare_spare(self.run)
                except OSError as exc:  # the spool's own files: a disk problem, said once
                    self._spool_failed(exc)
                if self._retry_now:
                    self._push_wake.set()
            self._sample()

    def _wait_for_writer_lock(self) -> None:
        """The pipe's end: the writer closed or died. A forked child of it may still hold the
        lock for a moment (a data loader worker finishing); a new training process of the run
        may hold it already (it has its own delivery process: this one stops)."""
        while not self.run.writer_lock.is_free():
            if self.control.replaced():
                log.info("run %s: a new training process of the run delivers it from now on", self.run.run_id)
                self.superseded = True
                break
            time.sleep(WRITER_POLL_S)
        self.writer_gone = True

    def _sample(self) -> None:
        if self.system is None or time.monotonic() < self._next_sample:
            return
        self._next_sample = time.monotonic() + SYSTEM_EVERY_S
        sample = self.system.sample()
        if sample is not None:
            self.control.set_sample(orjson.dumps(sample))

    # -- the push thread ----------------------------------------------------------------

    def _push_loop(self) -> None:
        self._hand_off_others()
        lock = self.run.pusher_lock
        attempt, next_try = 0, 0.0
        deadline = time.monotonic() + DRAINER_GIVE_UP_S
        while time.monotonic() < deadline and not self.superseded:
            finishing = self.tail.published[0] is None
            self._push_wake.wait(0.02 if self.pusher.waiting_for_snapshot else IDLE_S)
            self._push_wake.clear()
            if self.writer_gone and self.control.replaced():  # the run's next training process delivers it
                self.superseded = True
                break
            if time.monotonic() < next_try and not self._retry_now:
                continue
            self._retry_now = False
            try:
                self._refresh_liveness()
                if not lock.acquire():
                    continue  # a drainer of an earlier process still pushes this run
                self.pusher.push_available()
                self.control.set_pushed(self.pusher.pushed if self.pusher.pushed is not None else -1)
                self._check_stop_order()
                self._set_redis_up(True)
                attempt = 0
            except REDIS_UNAVAILABLE as exc:
                self._set_redis_up(False, exc)
                next_try = time.monotonic() + compute_backoff(attempt, base=0.2, cap=10.0)
                attempt += 1
                continue
            except OSError as exc:
                self._spool_failed(exc)
                next_try = time.monotonic() + compute_backoff(attempt, base=0.5, cap=30.0)
                attempt += 1
                continue
            except Exception:  # a bug must not stop the delivery: log it and keep the spool
                log.exception("unexpected error while pushing run %s", self.run.run_id)
                next_try = time.monotonic() + 1.0
                continue
            if finishing and not self.run.segments():
                self.delivered = True
                break
        lock.release()

    def _hand_off_others(self) -> None:
        """Spools left by killed processes, or snapshots waiting for sinks: a drainer takes them."""
        try:
            root = self.run.dir.parent
            orphans = [r.run_id for r in pending_runs(root) if r.run_id != self.run.run_id]
            if orphans:
                log.warning("spool holds undelivered events of %d earlier run(s); starting a drainer", len(orphans))
            held = any(r.run_id != self.run.run_id and r.holds_snapshots() for r in run_dirs(root))
            if orphans or held:
                spawn_drainer(root, self.settings, orphans)
        except OSError as exc:
            log.warning("could not hand earlier spools to a drainer (%s); `trainbus spool replay` pushes them", exc)

    def _refresh_liveness(self) -> None:
        client, key = self.pusher.client, self.pusher.keys.alive(self.run.run_id)
        if self.pusher.ended or self.writer_gone:  # ended: gone at once; killed: it expires
            if self.pusher.ended and self._next_liveness >= 0:
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
        if self._stop_order_seen or self.pusher.ended or self.writer_gone or now < self._next_stop_check:
            return
        self._next_stop_check = now + STOP_CHECK_S
        reason = self.pusher.client.get(self.pusher.keys.stop(self.run.run_id))
        if reason:
            self._stop_order_seen = True
            self.control.set_stop(reason.decode(errors="replace"))

    def _set_redis_up(self, up: bool, exc: Exception | None = None) -> None:
        if up and not self._redis_up:
            log.warning("run %s: Redis is reachable again; pushing the spool", self.run.run_id)
        elif not up and self._redis_up:
            log.warning(
                "run %s: Redis cannot take events (%s); they stay in the spool at %s",
                self.run.run_id,
                exc,
                self.run.dir,
            )
        self._redis_up = up
        self.control.set_redis_down(not up)
        if up and self._spool_error is not None:
            log.warning("run %s: the spool can be read again", self.run.run_id)
            self._spool_error = None

    def _spool_failed(self, exc: OSError) -> None:
        reason = f"{exc.__class__.__name__}: {exc}"
        if reason != self._spool_error:
            log.error(
                "run %s: cannot use the spool at %s (%s); events stay there and it is retried",
                self.run.run_id,
                self.run.dir,
                reason,
            )
        self._spool_error = reason


def spawn_delivery(
    run: RunSpool, settings: Settings, wake_fd: int, from_seq: int, *, system: bool = False
) -> subprocess.Popen:
    """Start the delivery process of a run; it reads wake-ups from ``wake_fd`` (a pipe's read end)."""
    args = [ENTRY.format(module="producers.delivery"), "--spool-dir", str(run.dir.parent), "--run-id", run.run_id]
    args += ["--wake-fd", str(wake_fd), "--from-seq", str(from_seq), *(["--system"] if system else [])]
    return spawn_detached(run.dir.parent, settings, args, pass_fds=(wake_fd,))


def _yield_to_training() -> None:
    """Never preempt the training process when woken (SCHED_BATCH: no wake-up preemption), and take
    a smaller share of a busy machine's CPU (nice). Its threads inherit both."""
    with contextlib.suppress(OSError, AttributeError):  # not Linux, or not allowed: the defaults
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    with contextlib.suppress(OSError):
        os.nice(NICE)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m producers.delivery",
        description="Deliver one training process's trainbus spool to Redis (started by the publisher): follow "
        "it while the training runs, finish it after, then remove its checkpoint snapshots once every sink is "
        "done with them. Redis URL from TRAINBUS_REDIS_URL.",
    )
    parser.add_argument("--spool-dir", type=Path, required=True)
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--wake-fd", type=int, required=True, help="the read end of the publisher's wake-up pipe")
    parser.add_argument("--from-seq", type=int, default=0, help="snapshot checkpoint events from this seq on")
    parser.add_argument("--system", action="store_true", help="sample the machine's load for the publisher")
    args = parser.parse_args(argv)
    _yield_to_training()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s delivery[%(process)d] %(levelname)s %(message)s")
    settings = Settings.from_env(spool_dir=args.spool_dir)
    deadline = time.monotonic() + DRAINER_GIVE_UP_S
    delivery = Delivery(RunSpool(args.spool_dir, args.run_id), settings, args.wake_fd, args.from_seq, args.system)
    delivery.run_until_delivered()
    if delivery.superseded:
        return 0
    if not delivery.delivered:
        log.error("gave up; run %s is still in the spool at %s", args.run_id, delivery.run.dir)
        return 1
    wait_for_sinks(
        args.spool_dir, settings.redis_url, Keys(settings.namespace), settings.snapshot_retention_s, deadline
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
