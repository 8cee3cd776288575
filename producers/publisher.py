"""The training-side API: turn training moments into events, in microseconds.

Every method builds an event, encodes it, appends it to the run's spool with one
``write()``, wakes the flusher thread and returns. None of them touches the network or
raises into training: a failure is logged and the method returns ``None``.

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
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from importlib import metadata
from typing import Any

from producers.drain import pending_runs, spawn_drainer
from producers.flusher import Flusher, Pusher
from producers.snapshot import Snapshotter, checkpoint_request
from producers.spool import RunSpool, SpoolWriter, run_dirs
from shared.encoding import encode
from shared.errors import TrainbusError
from shared.events import KEPT_WHEN_FULL, MAX_EVENT_BYTES, EventType, encode_event
from shared.hub_model import parse_hub_model
from shared.keys import Keys
from shared.redis_client import PRODUCER, connect
from shared.settings import SECRET_ENV_VARS, Settings

log = logging.getLogger("trainbus.publisher")

LOCK_ATTEMPTS = 5  # x 2 ms: a drainer's probe of the writer lock takes microseconds
SHUTDOWN_GRACE_S = 0.5  # close() waits this much past its flush budget for the threads to stop
DOWN_EXIT_FLUSH_S = 0.5  # the exit flush when the last push had failed
MIN_SECRET_LEN = 8
VERSIONED = ("trainbus", "torch", "ultralytics", "numpy", "redis", "orjson")


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
        **overrides: Any,
    ) -> None:
        """``on_stop(reason)``: called once, from trainbus's background thread, when the run is told
        to stop (cancelled in the Ultralytics Platform, or ``trainbus stop RUN``)."""
        self.settings = settings or Settings.from_env(**overrides)
        self.stop_reason: str | None = None
        self._on_stop = on_stop
        self.run_id = self.settings.run_id
        self.keys = Keys(self.settings.namespace)
        self._lock = threading.Lock()
        self._closed = False
        self._ended = False
        self._session_sent = False
        self._versions = _versions()
        self._dropped: Counter[str] = Counter()
        self._failures = 0
        self._secrets = _secrets_of(self.settings)
        self.drainer: subprocess.Popen | None = None  # started at close when Redis had not taken everything

        root = self.settings.spool_dir.expanduser()
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._run = RunSpool(root.resolve(), self.run_id)  # real paths: workers compare them with their roots
        self._run.create()
        self._take_writer_lock()
        try:
            self._writer = SpoolWriter(self._run, int(self.settings.spool_max_mb * (1 << 20)))
            self._snapshots = Snapshotter(self._run.checkpoint_dir)
            self._client = connect(self.settings.redis_url, PRODUCER)
            pusher = Pusher(self._run, self._client, self.keys, self._snapshots, self._writer)
            self._flusher = Flusher(pusher, housekeeping=self._hand_off_others, on_stop_order=self._stop_ordered)
            self._snapshots.on_done = self._flusher.wake
            self._snapshots.start()
            self._flusher.start()
        except BaseException:  # nothing half-open stays behind: the next try starts clean
            if hasattr(self, "_writer"):
                self._writer.close()
            self._run.writer_lock.release()
            raise
        atexit.register(self.close)

    @property
    def stop_requested(self) -> bool:
        """True once the run was told to stop: the training loop should end at its next epoch boundary."""
        return self.stop_reason is not None

    def every(self, seconds: float, fn: Callable[[], None]) -> None:
        """Run ``fn`` every ``seconds`` in trainbus's background thread, not in a hook."""
        self._flusher.every(seconds, fn)

    def _stop_ordered(self, reason: str) -> None:
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
        return self._writer.next_seq

    # -- the hook path ---------------------------------------------------------------

    def publish(self, type: str | EventType, payload: Mapping[str, Any] | None = None) -> int | None:
        """Append one event; returns its seq, or None when it was dropped (spool full, closed)."""
        try:
            return self._publish(EventType(type).value, dict(payload or {}))
        except Exception:  # never into training
            self._failures += 1
            if self._failures <= 3:
                log.exception("trainbus could not record a %r event (run %s)", type, self.run_id)
            return None

    def _publish(self, type: str, payload: dict[str, Any]) -> int | None:
        with self._lock:
            if self._closed:
                log.warning("publisher of run %s is closed; %s event dropped", self.run_id, type)
                return None
            if not self._session_sent and type != EventType.SESSION.value:
                self._append(EventType.SESSION.value, self._session_payload())  # every run starts with one
            self._session_sent = True
            if self._dropped and self._writer.bytes < self._writer.max_bytes * 0.9:
                self._append(EventType.SPOOL_OVERFLOW.value, {"dropped": dict(self._dropped)})
                self._dropped.clear()
            seq = self._append(type, payload)
        if seq is not None:
            self._flusher.wake()
        return seq

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
        if "checkpoint" in payload:
            self._snapshots.submit(seq, payload["checkpoint"])
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
                "paths": [os.path.realpath(p) for p in paths],  # workers see the same paths, not our cwd
                "dir": os.path.realpath(directory) if directory is not None else None,
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
            payload["files"] = [os.path.realpath(f) for f in files]
        return self.publish(EventType.FINAL, payload)

    def end(self, status: str = "completed", error: str | None = None) -> int | None:
        """The run is over (``completed``, ``failed`` or ``stopped``); liveness stops."""
        if self._ended:
            return None
        self._ended = True
        seq = self.publish(EventType.RUN_END, {"status": status, "error": error})
        self._flusher.run_ended = True
        return seq

    def close(self, timeout: float | None = None) -> bool:
        """Flush for at most ``timeout`` (default TRAINBUS_EXIT_FLUSH_S) seconds, then stop.

        What is not in Redis by then is handed to a detached drainer process, so the
        script ends on time and nothing is lost; when Redis is already known to be down,
        after at most DOWN_EXIT_FLUSH_S. Returns True when everything was pushed.
        """
        if self._closed:
            return True
        if not self._ended:
            failed = getattr(sys, "last_value", None) is not None
            self.end("failed" if failed else "completed", repr(sys.last_value) if failed else None)
        with self._lock:
            self._closed = True
            last = self._writer.next_seq - 1
        budget = self.settings.exit_flush_s if timeout is None else timeout
        if not self._flusher.redis_up:  # waiting would mostly delay the script: the drainer retries
            budget = min(budget, DOWN_EXIT_FLUSH_S)
        flushed = False
        try:
            flushed = last < 0 or self._flusher.wait_pushed(last, budget)
        finally:  # on Ctrl-C during the wait too: stop the threads, hand the rest over
            self._shut_down(last, flushed, budget)
        return flushed

    def _shut_down(self, last: int, flushed: bool, budget: float) -> None:
        """Stop the threads within SHUTDOWN_GRACE_S; what is not in Redis goes to a drainer.

        A flusher still inside a Redis call keeps the pusher lock until it returns or this
        process exits; the drainer waits for that lock, so the hand-over cannot be refused.
        """
        stopped = self._flusher.stop(timeout=SHUTDOWN_GRACE_S)
        self._snapshots.stop(timeout=SHUTDOWN_GRACE_S)  # an unfinished snapshot is made by the drainer
        self._writer.close()
        self._run.writer_lock.release()
        atexit.unregister(self.close)
        if flushed and stopped and self._run.pusher_lock.acquire():
            try:  # retire the last segment now the writer is gone (never beside a drainer)
                self._flusher.pusher.push_available()
                flushed = not self._run.segments()
            except Exception:  # Redis went away just now: the drainer pushes the rest
                flushed = False
            finally:
                self._run.pusher_lock.release()
        if not flushed or self._run.segments() or _holds_snapshots(self._run):
            if not flushed:
                log.warning(
                    "run %s: %d events not in Redis after %.1f s; a drainer process keeps pushing them (log: %s)",
                    self.run_id,
                    last - (self._flusher.pusher.pushed or -1),
                    budget,
                    self.settings.spool_dir / "drain.log",
                )
            self._spawn_drainer([self.run_id])

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: object) -> None:
        if exc is not None:
            self.end("stopped" if isinstance(exc, KeyboardInterrupt) else "failed", repr(exc))
        self.close()

    # -- internals ---------------------------------------------------------------------

    def _take_writer_lock(self) -> None:
        for _ in range(LOCK_ATTEMPTS):
            if self._run.writer_lock.acquire():
                return
            time.sleep(0.002)
        raise SpoolBusy(
            f"another process is writing run {self.run_id!r} in {self._run.dir}; "
            "use another TRAINBUS_RUN_ID or stop that process"
        )

    def _hand_off_others(self) -> None:
        """Spools left by killed processes, or snapshots waiting for sinks: a detached drainer takes
        them. Runs once in the flusher thread, off the hook path."""
        root = self._run.dir.parent
        orphans = [r.run_id for r in pending_runs(root) if r.run_id != self.run_id]
        if orphans:
            log.warning("spool holds undelivered events of %d earlier run(s); starting a drainer", len(orphans))
        if orphans or any(r.run_id != self.run_id and _holds_snapshots(r) for r in run_dirs(root)):
            self._spawn_drainer(orphans)

    def _spawn_drainer(self, run_ids: list[str]) -> None:
        try:
            self.drainer = spawn_drainer(self._run.dir.parent, self.settings, run_ids)
        except OSError as exc:
            log.error("could not start a drainer (%s); run `trainbus spool replay` to push %s", exc, run_ids)

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


def _secrets_of(settings: Settings) -> tuple[bytes, ...]:
    """Byte strings that must never appear in an event: keys from settings and env."""
    found = [os.environ.get(name, "") for name in SECRET_ENV_VARS]
    if settings.hub_model and settings.hub_model.api_key:
        found.append(settings.hub_model.api_key)
    return tuple(encode(s)[1:-1] for s in found if len(s) >= MIN_SECRET_LEN)


def _holds_snapshots(run: RunSpool) -> bool:
    """Checkpoint snapshots (or sidecars, partial copies) are still in the run's directory."""
    try:
        return any(os.scandir(run.checkpoint_dir))
    except FileNotFoundError:
        return False


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
