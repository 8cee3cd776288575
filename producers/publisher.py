"""The training-side API: turn training moments into events, in microseconds.

Every method builds an event, encodes it, copies it into the run's memory-mapped spool,
and returns: the run's delivery process finds it there within 20 ms. Only a checkpoint
event also writes a byte on a pipe, so that its copy starts at once. The training process
runs no thread of trainbus's: the delivery process (``producers/delivery.py``) does the
rest, snapshots and Redis included. None of the methods touches the network or raises
into training: a failure is logged and the method returns ``None``.

    from producers import Publisher

    with Publisher(run_id="resnet-42") as bus:
        bus.session(args={"epochs": 10, "lr": 0.1})
        for epoch in range(10):
            loss = train_one_epoch()
            bus.metrics(epoch, {"train/loss": loss, "val/acc": evaluate()})
            torch.save(model.state_dict(), "last.pt")
            bus.checkpoint("last.pt", epoch)
        bus.final("last.pt", epoch, {"val/acc": evaluate()})
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import logging
import os
import platform
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from importlib import metadata
from typing import Any

import orjson

from producers.control import Control
from producers.delivery import FLUSH_NOW, WAKE, spawn_delivery
from producers.drain import DRAIN_LOG
from producers.rank import global_rank
from producers.snapshot import SNAPSHOT_TYPES, checkpoint_request
from producers.spool import RunSpool, SpoolWriter
from shared.encoding import encode
from shared.errors import TrainbusError
from shared.events import KEPT_WHEN_FULL, MAX_EVENT_BYTES, EventType, encode_event
from shared.hub_model import parse_hub_model
from shared.settings import SECRET_ENV_VARS, Settings

log = logging.getLogger("trainbus.publisher")

LOCK_ATTEMPTS = 5  # x 2 ms: a drainer's probe of the writer lock takes microseconds
DOWN_EXIT_FLUSH_S = 0.5  # the exit flush when the last push had failed
CLOSE_POLL_S = 0.002  # how often close() looks at the pushed seq
DELIVERY_SILENT_S = 5.0  # a delivery process whose heartbeat is older is checked (and replaced if gone)
RESPAWN_EVERY_S = 5.0  # at most one new delivery process this often (one that keeps dying must not cost hooks)
REALPATHS_KEPT = 256
MIN_SECRET_LEN = 8
VERSIONED = ("trainbus", "torch", "ultralytics", "numpy", "redis", "orjson")
_TYPE_NAMES: dict[object, str] = {**{t.value: t.value for t in EventType}, **{t: t.value for t in EventType}}
_OPEN: weakref.WeakSet[Publisher] = weakref.WeakSet()  # for fork(): a child must not write the parent's spool


class SpoolBusy(TrainbusError):
    """Another live process writes this run's spool (same run id and spool directory)."""


class Publisher:
    """Publishes one run's events. Configure with ``Settings`` or keyword overrides.

    Keyword arguments are the settings' names (``redis_url``, ``run_id``, ``hub_model``,
    ``clearml_project``, ``spool_dir``, ``exit_flush_s``, ``spool_max_mb``, ``namespace``);
    unset ones come from the ``TRAINBUS_*`` environment variables.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        on_stop: Callable[[str], None] | None = None,
        system_metrics: bool = False,
        **overrides: Any,
    ) -> None:
        """``on_stop(reason)``: called once, in the next call of this publisher after the run was told
        to stop (cancelled in the Ultralytics Platform, or ``trainbus stop RUN``).
        ``system_metrics``: the delivery process samples the machine's load (:meth:`system_sample`).
        In a distributed training only global rank 0 opens the run; elsewhere every method does nothing."""
        self._configure(settings or Settings.from_env(**overrides), on_stop, system_metrics)
        if self._publishes_here():
            self._open()

    def _configure(self, settings: Settings, on_stop: Callable[[str], None] | None, system_metrics: bool) -> None:
        self.settings = settings
        self.stop_reason: str | None = None
        self._on_stop = on_stop
        self.run_id = self.settings.run_id
        self._lock = threading.Lock()
        self._closed = False
        self._closed_why = "closed"
        self._ended = False
        self._session_sent = False
        self._versions = _versions()
        self._dropped: Counter[str] = Counter()
        self._failures = 0
        self._secrets = _secrets_of(self.settings)
        self._system = system_metrics
        self._pid = os.getpid()
        self._realpaths: dict[str, str] = {}
        self.delivery: subprocess.Popen | None = None  # the delivery process (it outlives this one)
        self._wake_fd = -1
        self._spawn_lock = threading.Lock()
        self._respawning = False
        self._next_respawn = 0.0
        self._control: Control | None = None  # None: not open (another rank, or unpickled and not used yet)
        self._writer: SpoolWriter | None = None
        self._quiet = False  # dropping is what this publisher is for (a rank that does not publish)
        self.rank = -1

    def _publishes_here(self) -> bool:
        """Global rank 0 (or not distributed) opens the run; another rank's publisher stays closed, quietly."""
        self.rank = global_rank()
        if self.rank in (-1, 0):
            return True
        self._closed, self._quiet = True, True
        self._closed_why = f"in rank {self.rank} (only global rank 0 publishes)"
        return False

    def _open(self) -> None:
        """The spool, the control page, the delivery process: this process writes the run from here on."""
        root = self.settings.spool_dir.expanduser()
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._run = RunSpool(root.resolve(), self.run_id)  # real paths: workers compare them with their roots
        self._run.create()
        self._take_writer_lock()
        try:
            self._control = Control.create(self._run.dir)
            self._writer = SpoolWriter(self._run, int(self.settings.spool_max_mb * (1 << 20)), self._pushed)
        except BaseException:  # nothing half-open stays behind: the next try starts clean
            self._run.writer_lock.release()
            raise
        self._first_seq = self._writer.next_seq
        self._start_delivery()
        atexit.register(self.close)
        _OPEN.add(self)

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled into a child (``mp.spawn``, a DDP launcher): the child gets the run, unopened, and
        opens it with its first event if it is global rank 0; this process hands it over (it lets go of
        the spool, without ending the run, and drops what it is given after). Nothing open is pickled."""
        if self._writer is not None and not self._closed:
            log.info("run %s handed over to a child process (pickled)", self.run_id)
            with self._lock:
                self._closed = True
                self._closed_why = "handed over to a child process (it was pickled)"
            self._shut_down()
        return (_unpickled, (self.settings, self._on_stop, self._system, self._session_sent))

    @property
    def stop_requested(self) -> bool:
        """True once the run was told to stop: the training loop should end at its next epoch boundary."""
        self._check_stop()
        return self.stop_reason is not None

    @property
    def delivering(self) -> bool:
        """True once the delivery process follows the spool (it starts in about 0.2 s): from then on a
        checkpoint is copied within milliseconds of its event."""
        return self._control is not None and self._control.following

    def system_sample(self) -> orjson.Fragment | None:
        """The machine's latest load sample (with ``system_metrics=True``), ready to put in a payload."""
        sample = self._control.sample() if self._control is not None else None
        return orjson.Fragment(sample) if sample else None

    def _check_stop(self) -> None:
        if self.stop_reason is not None or self._control is None or (reason := self._control.stop_reason) is None:
            return
        self.stop_reason = reason
        log.warning("run %s was told to stop (%s); stop the training at the next epoch", self.run_id, reason)
        if self._on_stop is not None:
            try:
                self._on_stop(reason)
            except Exception:
                log.exception("the on_stop callback of run %s failed", self.run_id)

    @property
    def next_seq(self) -> int:
        """The seq the next event will get: how many events this run has produced so far."""
        return self._writer.next_seq if self._writer is not None else 0

    # -- the hook path ---------------------------------------------------------------

    def publish(self, type: str | EventType, payload: Mapping[str, Any] | None = None) -> int | None:
        """Append one event; returns its seq, or None when it was dropped (spool full, closed)."""
        try:
            return self._publish(_TYPE_NAMES.get(type) or EventType(type).value, dict(payload or {}))
        except Exception:  # never into training
            self._failures += 1
            if self._failures <= 3:
                log.exception("trainbus could not record a %r event (run %s)", type, self.run_id)
            return None

    def _publish(self, type: str, payload: dict[str, Any]) -> int | None:
        with self._lock:
            if self._writer is None and not self._closed:
                self._open_unpickled()
            if self._closed:
                self._failures += 1
                if self._failures <= 3 and not self._quiet:
                    log.warning("publisher of run %s is %s; %s event dropped", self.run_id, self._closed_why, type)
                return None
            if not self._session_sent and type != EventType.SESSION.value:
                self._append(EventType.SESSION.value, self._session_payload())  # every run starts with one
            self._session_sent = True
            if self._dropped and self._writer.has_room(int(self._writer.max_bytes * 0.1)):
                self._append(EventType.SPOOL_OVERFLOW.value, {"dropped": dict(self._dropped)})
                self._dropped.clear()
            seq = self._append(type, payload)
        if type in SNAPSHOT_TYPES:
            self._wake(WAKE)  # the copy must start before the trainer's next save: now, not within 20 ms
        if time.monotonic() - self._control.heartbeat > DELIVERY_SILENT_S and self._control.following:
            self._delivery_lost()  # it looks at the spool every 20 ms: silent this long, it may be gone
        self._check_stop()
        return seq

    def _open_unpickled(self) -> None:
        """A publisher unpickled in a child opens with its first event, once the rank is known."""
        if not self._publishes_here():
            return
        try:
            self._open()
        except Exception as exc:
            self._closed, self._closed_why = True, f"not open ({exc})"
            log.error("trainbus cannot record run %s in this process: %s", self.run_id, exc)

    def _wake(self, byte: bytes) -> None:
        """A byte on the delivery process's pipe: look at the spool now (WAKE), or push now whatever
        the backoff (FLUSH_NOW, from close)."""
        try:
            os.write(self._wake_fd, byte)
        except BlockingIOError:
            pass  # the pipe is full of wake-ups it has not read yet
        except OSError:  # EPIPE: it is gone (EBADF: it never started)
            self._delivery_lost()

    def _append(self, type: str, payload: dict[str, Any]) -> int | None:
        seq = self._writer.next_seq
        data = encode_event(self.run_id, seq, time.time(), type, payload)
        for secret in self._secrets:
            if secret in data:
                data = data.replace(secret, b"***")
        if len(data) > MAX_EVENT_BYTES:
            log.error(
                "%s event of run %s is %d bytes (limit %d); sent without its payload",
                type,
                self.run_id,
                len(data),
                MAX_EVENT_BYTES,
            )
            keys = sorted(str(k) for k in payload)[:100]
            data = encode_event(
                self.run_id, seq, time.time(), type, {"truncated": True, "bytes": len(data), "keys": keys}
            )
        try:
            appended = self._writer.append(seq, type, data, keep_when_full=type in KEPT_WHEN_FULL)
        except OSError as exc:
            if not self._dropped:
                log.error(
                    "run %s: cannot write the spool at %s (%s): dropping %s events and counting them",
                    self.run_id,
                    self._run.dir,
                    exc.strerror or exc,
                    type,
                )
            self._dropped[type] += 1
            return None
        if not appended:
            if not self._dropped:
                log.warning(
                    "spool of run %s is full (%g MB at %s): dropping %s events and "
                    "counting them until Redis takes the backlog",
                    self.run_id,
                    self.settings.spool_max_mb,
                    self._run.dir,
                    type,
                )
            self._dropped[type] += 1
            return None
        return seq

    # -- what training code calls ----------------------------------------------------

    def session(
        self,
        args: Mapping[str, Any] | None = None,
        *,
        name: str | None = None,
        project: str | None = None,
        model: str | None = None,
        **extra: Any,
    ) -> int | None:
        """The run starts: its arguments, names, HUB model, host and library versions.

        Sent automatically (without args) before the first other event if not called.
        """
        try:
            payload = self._session_payload(args, name, project, model, **extra)
        except ValueError as exc:
            log.error("run %s: ignoring the HUB model given to session(): %s", self.run_id, exc)
            payload = self._session_payload(args, name, project, None, **extra)
        return self.publish(EventType.SESSION, payload)

    def _session_payload(
        self,
        args: Mapping[str, Any] | None = None,
        name: str | None = None,
        project: str | None = None,
        model: str | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        hub = self.settings.hub_model
        if model:
            ref = parse_hub_model(model)
            if ref.api_key:
                self.add_secret(ref.api_key)
            hub = ref
        return {
            "args": self._scrub_args(args or {}),
            "name": name or self.run_id,
            "project": self.settings.clearml_project or project,
            "hub_model_id": hub.model_id if hub else None,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "python": platform.python_version(),
            "versions": self._versions,
            **extra,
        }

    def metrics(self, epoch: int, metrics: Mapping[str, Any], *, stage: str = "fit", **extra: Any) -> int | None:
        """Metrics of one epoch. ``stage="fit"``: the per-epoch metrics HUB receives;
        ``stage="train"``: losses and learning rates at the end of the training pass."""
        kind = EventType.FIT_EPOCH if stage == "fit" else EventType.TRAIN_EPOCH
        return self.publish(kind, {"epoch": epoch, "metrics": metrics, **extra})

    def checkpoint(self, path: str | os.PathLike[str], epoch: int, *, is_best: bool = False) -> int | None:
        """A checkpoint was saved; a snapshot is taken off this thread before the next save."""
        label = "best" if is_best else "last"
        return self.publish(
            EventType.CHECKPOINT, {"epoch": epoch, "is_best": is_best, "checkpoint": checkpoint_request(path, label)}
        )

    def media(
        self,
        kind: str,
        title: str,
        *,
        paths: Iterable[str | os.PathLike[str]] = (),
        directory: str | os.PathLike[str] | None = None,
        pattern: str | None = None,
        names: Iterable[str] = (),
        iteration: int | None = None,
    ) -> int | None:
        """Images or plots on disk, by path: workers read them (under TRAINBUS_FILE_ROOTS).

        ``kind`` is ``"debug"`` (debug samples) or ``"plot"``. Files that do not exist yet
        can be named by ``directory`` + ``pattern`` (a glob) or ``names``: workers wait
        for them within a bound.
        """
        return self.publish(
            EventType.MEDIA,
            {
                "kind": kind,
                "title": title,
                "paths": [self._realpath(p) for p in paths],  # workers see the same paths, not our cwd
                "dir": self._realpath(directory) if directory is not None else None,
                "pattern": pattern,
                "names": list(names),
                "iteration": iteration,
            },
        )

    def lifecycle(self, type: str | EventType, **payload: Any) -> int | None:
        """A moment of the run: pretrain_end (with the ``args`` set-up resolved), train_start, ..."""
        if isinstance(payload.get("args"), Mapping):
            payload["args"] = self._scrub_args(payload["args"])
        return self.publish(type, payload)

    def final(
        self,
        best: str | os.PathLike[str],
        epoch: int,
        metrics: Mapping[str, Any],
        *,
        map50_95: float | None = None,
        summary: Mapping[str, Any] | None = None,
        files: Iterable[str | os.PathLike[str]] = (),
    ) -> int | None:
        """Training finished: the best checkpoint (snapshotted) and the final metrics.

        ``summary``: what the Platform's ``training_complete`` also carries (best epoch and
        fitness, class names, plots' data, ...); the Ultralytics callbacks fill it.
        ``files``: the run's finished files (plots, results.csv, args.yaml) that sinks keep
        as artifacts (MLflow); read by workers under TRAINBUS_FILE_ROOTS.
        """
        payload = {
            "epoch": epoch,
            "metrics": metrics,
            "map50_95": map50_95,
            "checkpoint": checkpoint_request(best, "final"),
        }
        if summary is not None:
            payload["summary"] = dict(summary)
        if files:
            payload["files"] = [self._realpath(f) for f in files]
        return self.publish(EventType.FINAL, payload)

    def end(self, status: str = "completed", error: str | None = None) -> int | None:
        """The run is over (``completed``, ``failed`` or ``stopped``); liveness stops."""
        if self._ended:
            return None
        self._ended = True
        return self.publish(EventType.RUN_END, {"status": status, "error": error})

    def close(self, timeout: float | None = None) -> bool:
        """Wait at most ``timeout`` (default TRAINBUS_EXIT_FLUSH_S) seconds for the events to reach Redis.

        The delivery process keeps pushing what is not there by then, after this process has
        exited, so the script ends on time and nothing is lost; when Redis is already known to
        be down, it ends at the next failed try (asked for at once), at most DOWN_EXIT_FLUSH_S.
        Returns True when everything was pushed.
        """
        if self._closed or self._writer is None:  # closed, another rank's, or unpickled and never used
            self._closed = True
            return True
        if not self._ended:
            failed = getattr(sys, "last_value", None) is not None
            self.end("failed" if failed else "completed", repr(sys.last_value) if failed else None)
        with self._lock:
            self._closed = True
            last = self._writer.next_seq - 1
        budget = self.settings.exit_flush_s if timeout is None else timeout
        known_down = self._control.redis_down
        if known_down:  # waiting would mostly delay the script: the delivery process retries
            budget = min(budget, DOWN_EXIT_FLUSH_S)
        failures = self._control.failures
        started = time.monotonic()
        flushed = False
        self._wake(FLUSH_NOW)  # one more try now, whatever its backoff
        try:
            flushed = self._wait_pushed(last, budget, failures if known_down else None)
        finally:  # on Ctrl-C during the wait too: let go of the spool, the delivery process finishes it
            self._shut_down()
        if not flushed:
            pushed = self._control.pushed
            log.warning(
                "run %s: %d events not in Redis after %.1f s; the delivery process keeps pushing them (log: %s)",
                self.run_id,
                last - pushed,
                time.monotonic() - started,
                self._run.dir.parent / DRAIN_LOG,
            )
        return flushed

    def _wait_pushed(self, seq: int, timeout: float, failures: int | None) -> bool:
        """Until ``seq`` is in Redis, ``timeout`` passed, or (``failures`` given: Redis was down) another
        push failed: that try was the one asked for, or one already under way when Redis was down."""
        deadline = time.monotonic() + timeout
        while self._control.pushed < seq:
            if self.delivery is None or self.delivery.poll() is not None:
                self._restart_delivery()  # it died (or never started): the exit must not lose the rest
            if time.monotonic() >= deadline or (failures is not None and self._control.failures != failures):
                return False
            time.sleep(CLOSE_POLL_S)
        return True

    def _shut_down(self) -> None:
        """Let go of the spool: the delivery process sees the pipe close and the lock free."""
        self._writer.close()
        self._run.writer_lock.release()
        with self._spawn_lock:
            with contextlib.suppress(OSError):
                os.close(self._wake_fd)
            self._wake_fd = -1
        atexit.unregister(self.close)
        _OPEN.discard(self)

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: object) -> None:
        if exc is not None:
            self.end("stopped" if isinstance(exc, KeyboardInterrupt) else "failed", repr(exc))
        self.close()

    # -- the delivery process ----------------------------------------------------------

    def _start_delivery(self) -> None:
        """Spawn the delivery process with a fresh pipe; its write end takes the old one's number, so
        a hook racing this never writes into an unrelated file."""
        read_fd, write_fd = os.pipe()
        try:
            os.set_blocking(write_fd, False)
            from_seq = max(self._first_seq, self._control.pushed + 1)  # what is pushed needs no snapshot
            self.delivery = spawn_delivery(self._run, self.settings, read_fd, from_seq, system=self._system)
        except OSError as exc:
            os.close(write_fd)
            log.error(
                "run %s: cannot start the delivery process (%s); events stay in the spool at %s "
                "(`trainbus spool replay` pushes them)",
                self.run_id,
                exc,
                self._run.dir,
            )
            return
        finally:
            os.close(read_fd)
        if self._wake_fd < 0:
            self._wake_fd = write_fd
        else:
            os.dup2(write_fd, self._wake_fd, inheritable=False)
            os.close(write_fd)

    def _delivery_lost(self) -> None:
        """Seen from a hook (a silent heartbeat, a broken pipe): check, and start another if it is gone,
        off the hook's thread (spawning takes a millisecond)."""
        now = time.monotonic()
        if self._respawning or self._closed or now < self._next_respawn:
            return
        self._respawning = True
        threading.Thread(target=self._restart_delivery, name="trainbus-respawn", daemon=True).start()

    def _restart_delivery(self) -> None:
        with self._spawn_lock:
            try:
                if (self._wake_fd < 0 and self._closed) or time.monotonic() < self._next_respawn:
                    return
                self._next_respawn = time.monotonic() + RESPAWN_EVERY_S
                old = self.delivery
                if old is not None and old.poll() is None:
                    return  # alive after all
                status = old.returncode if old is not None else None
                log.warning(
                    "run %s: the delivery process is gone (exit status %s); starting another", self.run_id, status
                )
                self._start_delivery()
            finally:
                self._respawning = False

    def _forget_after_fork(self) -> None:
        """In a forked child (a data loader worker): hooks run in the parent only, and the child must
        not hold the parent's lock or pipe open."""
        self._closed = True
        self._closed_why = f"open in process {self._pid} only (this is a forked child)"
        self._run.writer_lock.release()  # the child's copy: the parent keeps its lock
        with contextlib.suppress(OSError):
            os.close(self._wake_fd)
        self._wake_fd = -1
        self.delivery = None
        atexit.unregister(self.close)

    # -- internals ---------------------------------------------------------------------

    def _realpath(self, path: str | os.PathLike[str]) -> str:
        """``os.path.realpath``, remembered: it costs a system call per path component, and hooks
        name the same directories every epoch."""
        key = os.fspath(path)
        found = self._realpaths.get(key)
        if found is None:
            if len(self._realpaths) >= REALPATHS_KEPT:
                self._realpaths.clear()
            found = self._realpaths[key] = os.path.realpath(key)
        return found

    def _pushed(self) -> int:
        return self._control.pushed

    def _take_writer_lock(self) -> None:
        for _ in range(LOCK_ATTEMPTS):
            if self._run.writer_lock.acquire():
                return
            time.sleep(0.002)
        raise SpoolBusy(
            f"another process is writing run {self.run_id!r} in {self._run.dir}; "
            "use another TRAINBUS_RUN_ID or stop that process"
        )

    def add_secret(self, secret: str) -> None:
        """Redact ``secret`` from every later event (keys the hooks come across)."""
        if len(secret) >= MIN_SECRET_LEN:
            self._secrets = (*self._secrets, encode(secret)[1:-1])

    def _scrub_args(self, args: Mapping[str, Any]) -> dict[str, Any]:
        """Training args with any HUB identifier reduced to its model id (key removed)."""
        clean: dict[str, Any] = {}
        for key, value in args.items():
            if isinstance(value, str) and len(value) >= 20:
                try:
                    ref = parse_hub_model(value)
                except ValueError:
                    pass
                else:
                    if ref.api_key:
                        self.add_secret(ref.api_key)
                    value = ref.model_id
            clean[str(key)] = value
        return clean


def _unpickled(
    settings: Settings, on_stop: Callable[[str], None] | None, system_metrics: bool, session_sent: bool
) -> Publisher:
    """A pickled publisher in its new process: configured, not open (see ``Publisher.__reduce__``)."""
    bus = Publisher.__new__(Publisher)
    bus._configure(settings, on_stop, system_metrics)
    bus._session_sent = session_sent  # the run's session went out before the hand-over: not again
    return bus


def _secrets_of(settings: Settings) -> tuple[bytes, ...]:
    """Byte strings that must never appear in an event: keys from settings and env."""
    found = [os.environ.get(name, "") for name in SECRET_ENV_VARS]
    if settings.hub_model and settings.hub_model.api_key:
        found.append(settings.hub_model.api_key)
    return tuple(encode(s)[1:-1] for s in found if len(s) >= MIN_SECRET_LEN)


@functools.cache
def _versions() -> dict[str, str]:
    """Library versions for the session, once per process: a module's own ``__version__`` when it is
    imported already (reading a package's metadata costs about 2 ms, on the training thread), else
    the metadata."""
    found = {}
    for name in VERSIONED:
        version = getattr(sys.modules.get(name), "__version__", None)
        if isinstance(version, str):
            found[name] = str(version)
            continue
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[name] = metadata.version(name)
    return found


def _after_fork_in_child() -> None:
    for bus in list(_OPEN):
        bus._forget_after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)
