"""The ClearML sink: what Ultralytics' ClearML callbacks record inside training, from events.

Per run, one ClearML task (never ``Task.init``: in a worker it would become the process's
main task), created at the session event, its id kept in the run's state so any worker can
reopen it. What each event becomes is what ``ultralytics/utils/callbacks/clearml.py`` does:

  session     the task: project (the ``project`` arg without a leading ``/``, else
              "Ultralytics" for an Ultralytics run), name, tags, every arg as a
              hyperparameter in "General" (None included)
  train_epoch scalars "train/<loss>" (title "train") and "lr/pg<n>" (title "lr") at iteration = epoch
  fit_epoch   "Epoch Time"; each validation metric under the title before its "/"
              ("metrics", "val") at iteration = epoch, the final validation's at epochs;
              model info as single values at epoch 0
  media       debug samples, iteration from ``_batchN`` in the name, each (title, series,
              iteration) once however many events name the file; plots by title. Files that
              appear late are waited for (MEDIA_WAIT_S) without holding back the rest
  final       final metrics as single values; the best checkpoint as the output model
              (offline mode: as an artifact, the SDK's offline output model is broken)
  run_end     task completed / failed / stopped, after everything before it was sent

Exactly once, with any number of workers and whatever order the dispatchers recorded the
events in: the dispatcher records each seq once (``workers/sink.py``); a worker hands each
unit to its own process in Redis before its SDK gets it, and the unit counts as done only
when that SDK sent it (``workers/clearml_sdk.py``). A run's events are reported in seq
order; one that arrives after a gap waits for the missing seqs up to GAP_WAIT_S. Files are
opened once below the roots and the SDK gets a private copy (``workers/files.py``). Use
the non-forking worker (``workers.rq_worker.SimpleWorker``): the SDK's queues live in it.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import redis

from shared.events import Event, EventType
from shared.keys import LIVENESS_TTL_S, Keys
from shared.settings import WorkerSettings
from workers.sinks.clearml.sdk import ClearmlBusy, ClearmlTimeout, Owner, TaskHandle, offline
from workers.sinks.files import FileMissing, FileRefused, list_dir, open_file, private_dir
from workers.sinks.run_state import SEEN_LUA, RunState, confirm

log = logging.getLogger("trainbus.clearml")

SINK = "clearml"
KINDS = ("events", "media", "files", "handed", "files_done")
TYPES = frozenset(
    {EventType.SESSION, EventType.TRAIN_EPOCH, EventType.FIT_EPOCH, EventType.MEDIA, EventType.FINAL, EventType.RUN_END}
)
BATCH = 200
GAP_WAIT_S = 60.0  # an event after a missing seq waits this long for it (another dispatcher may hold it)
# A run with no live producer (continuously, as this sink saw it) and no event for this long
# is taken as dead and its task stopped. Not the 30 s liveness TTL: a producer cut off from
# Redis for a while (its events waiting in its spool) looks just like that.
SILENCE_STOP_S = 300.0
MEDIA_WAIT_S = 60.0  # a file named by an event may appear this late (plots are drawn in threads)
POLL_S = 0.2  # how soon to look again while the SDK sends or a file is awaited
BATCH_IN_NAME = re.compile(r"_batch(\d+)")
PLOT_SERIES = "plot image"  # what report_matplotlib_figure(series="") reports as

# KEYS: seen, ahead, pending events. ARGV: seq, event. Adds the event only the first time its
# seq is recorded, so a redelivered entry is never reported twice.
RECORD = (
    SEEN_LUA
    + """
if new and ARGV[2] ~= '' then redis.call('ZADD', KEYS[3], ARGV[1], ARGV[2]) end
return new and 1 or 0
"""
)

_OWNER: Owner | None = None  # one per worker process: its tasks, SDK calls and lease


class ClearmlSink:
    name = SINK

    def __init__(self, client: redis.Redis, keys: Keys, settings: WorkerSettings) -> None:
        self.client = client
        self.keys = keys
        self.settings = settings
        self.runs = RunState(client, keys, SINK, settings.redis_min_replicas)
        self._record = client.register_script(RECORD)

    @property
    def owner(self) -> Owner:
        """This process's owner (tasks, calls, lease), started on first use by a worker."""
        global _OWNER
        if _OWNER is None or _OWNER.keys != self.keys:
            _OWNER = Owner(self.client, self.keys, SINK, self._confirm)
            _OWNER.start()
        return _OWNER

    def _call(self, run_id: str, what: str, fn: Any) -> Any:
        return self.owner.calls.call(run_id, what, fn, self.settings.clearml_timeout_s)

    def _key(self, run_id: str, kind: str) -> str:
        return self.keys.pending(SINK, run_id, kind)

    @staticmethod
    def pending(client: redis.Redis, keys: Keys, run_id: str) -> dict[str, int]:
        pipe = client.pipeline(transaction=False)
        pipe.zcard(keys.pending(SINK, run_id, "events"))
        for kind in ("media", "files", "handed"):
            pipe.hlen(keys.pending(SINK, run_id, kind))
        return dict(zip(("events", "media", "files", "unsent"), pipe.execute(), strict=True))

    @staticmethod
    def delivered(client: redis.Redis, keys: Keys, run_id: str) -> bool:
        ended = client.hexists(keys.state(SINK, run_id), "ended")
        return bool(ended) and not any(ClearmlSink.pending(client, keys, run_id).values())

    # -- dispatcher side -----------------------------------------------------------------

    def record(self, pipe: redis.client.Pipeline, event: Event) -> None:
        self.runs.mark_active(pipe, event)
        data = orjson.dumps({"seq": event.seq, "ts": event.ts, "type": event.type, "payload": event.payload})
        keys = [*self.runs.seen_keys(event.run_id), self._key(event.run_id, "events")]
        self._record(keys=keys, args=[event.seq, data if event.type in TYPES else b""], client=pipe)

    # -- worker side -----------------------------------------------------------------------

    def drain(self, run_id: str) -> float | None:
        try:
            self.owner.confirm_sent(run_id)
            waits = [self._report_events(run_id), self._discover_media(run_id), self._report_files(run_id)]
            waits.append(self._unsent(run_id))
        except ClearmlTimeout as exc:
            return self.runs.failed_attempt(
                run_id, "events", exc, wait=POLL_S if isinstance(exc, ClearmlBusy) else None, cap=120.0
            )
        self.runs.attempt_ok(run_id, "events", count=False)  # each report is counted as it is made
        pending = [w for w in waits if w is not None]
        if pending:
            return min(pending)
        if self._finished(run_id):
            self.owner.forget(run_id)
            self.runs.finish(run_id, KINDS)
            return None
        return self._silence_wait(run_id)

    def _unsent(self, run_id: str) -> float | None:
        """What this process handed is not sent yet: look again soon, and say so when it takes long."""
        unsent = self.owner.confirm_sent(run_id)
        if not unsent:
            self.client.hdel(self.keys.state(SINK, run_id), "unsent_since")
            return None
        state_key = self.keys.state(SINK, run_id)
        self.client.hsetnx(state_key, "unsent_since", repr(time.time()))
        since = float(self.client.hget(state_key, "unsent_since") or time.time())
        if time.time() - since > self.settings.clearml_timeout_s:
            log.warning(
                "upload sink=clearml run=%s outcome=waiting unsent=%d for=%.0fs (ClearML is not taking reports)",
                run_id,
                unsent,
                time.time() - since,
            )
            return 1.0
        return POLL_S

    # -- events, in seq order -----------------------------------------------------------------

    def _report_events(self, run_id: str) -> float | None:
        state_key = self.keys.state(SINK, run_id)
        raw_events = self.client.zrange(self._key(run_id, "events"), 0, BATCH - 1)
        complete_below = self.runs.recorded_below(run_id)
        handed = self.client.hgetall(self._key(run_id, "handed"))
        alive = _Memo(self.owner.alive)
        closed = self._closed(run_id)
        batch: list[dict[str, Any]] = []
        gap = False
        for raw in raw_events:
            event = orjson.loads(raw)
            if event["seq"] >= complete_below:
                gap = True
                if (wait := self._gap_wait(state_key)) is not None:
                    self._report_batch(run_id, batch)
                    return wait
            owner = handed.get(f"e{event['seq']}".encode())
            if owner is not None and alive(owner):
                continue  # sent or being sent by a live worker's SDK
            if closed or event["type"] in (EventType.SESSION, EventType.MEDIA, EventType.RUN_END):
                self._report_batch(run_id, batch)
                batch = []
                wait = self._special(run_id, event)
                if wait is not None:
                    return wait
                closed = self._closed(run_id)
                continue
            batch.append(event)
        self._report_batch(run_id, batch)
        if not gap:
            self.client.hdel(state_key, "gap_since")
        return 0.0 if len(raw_events) == BATCH else None

    def _gap_wait(self, state_key: str) -> float | None:
        """An earlier seq is missing: how long to keep waiting for it (None: waited long enough)."""
        self.client.hsetnx(state_key, "gap_since", repr(time.time()))
        waited = time.time() - float(self.client.hget(state_key, "gap_since") or 0)
        return None if waited >= GAP_WAIT_S else min(POLL_S * 5, GAP_WAIT_S - waited)

    def _special(self, run_id: str, event: dict[str, Any]) -> float | None:
        """Events that change the task or wait for files rather than being reported to it."""
        kind, seq, p = event["type"], event["seq"], event["payload"]
        state_key = self.keys.state(SINK, run_id)
        ended, end_seq = self.client.hmget(state_key, "ended", "end_seq")
        if ended and seq <= int(end_seq or -1):
            self.runs.dead_letter(
                f"{kind} event {seq} of run {run_id} arrived after the run's ClearML task was closed; not reported",
                run_id=run_id,
                seq=seq,
            )
            self._done(run_id, [f"e{seq}"])
            return None
        if ended:  # a later event: the run was resumed
            self._reopen(run_id)
        if kind == EventType.SESSION:
            self._task(run_id, p)
            self._done(run_id, [f"e{seq}"])
        elif kind == EventType.MEDIA:
            pipe = self.client.pipeline()
            pipe.hsetnx(self._key(run_id, "media"), str(seq), orjson.dumps({**p, "recorded": time.time()}))
            pipe.zremrangebyscore(self._key(run_id, "events"), seq, seq)
            pipe.execute()
        elif kind == EventType.RUN_END:
            return self._end(run_id, seq, p.get("status") or "completed", p.get("error"))
        else:
            self._report_batch(run_id, [event])
        return None

    def _report_batch(self, run_id: str, events: list[dict[str, Any]]) -> None:
        """Hand the units to this process, then report them through its SDK, in order."""
        if not events:
            return
        handle = self._task(run_id, None)
        if handle is None:
            raise ClearmlBusy(f"run {run_id} has no ClearML task yet (its session event is not reported)")
        units = [f"e{e['seq']}" for e in events]
        self._hand(run_id, units)

        def report() -> None:
            with self._unhand_unreported(run_id, units):
                for unit, event in zip(units, events, strict=True):
                    self._report(run_id, handle, event)
                    self.owner.handed(run_id, unit)
            handle.task.flush(wait_for_uploads=False)  # wakes the SDK's thread

        self._call(run_id, "report", report)

    def _hand(self, run_id: str, units: list[str]) -> None:
        """These units are this process's to report: others leave them alone while it lives."""
        self.client.hset(self._key(run_id, "handed"), mapping=dict.fromkeys(units, self.owner.token))

    @contextlib.contextmanager
    def _unhand_unreported(self, run_id: str, units: list[str]) -> Iterator[None]:
        """If reporting fails, the units the SDK did not get go back to whoever drains next."""
        try:
            yield
        except BaseException:
            reported = set(self.owner.tasks[run_id].handed) if run_id in self.owner.tasks else set()
            rest = [u for u in units if u not in reported]
            if rest:
                self.client.hdel(self._key(run_id, "handed"), *rest)
            raise

    def _report(self, run_id: str, handle: TaskHandle, event: dict[str, Any]) -> None:
        p, kind = event["payload"], event["type"]
        logger = handle.task.get_logger()
        epoch = p.get("epoch") if isinstance(p.get("epoch"), int) else 0
        at = p["step"] if isinstance(p.get("step"), int) else epoch  # a framework's global step, else the epoch
        if kind == EventType.TRAIN_EPOCH:
            for name, value in _numbers(p.get("metrics")):  # Ultralytics' "train/box_loss": title "train"
                logger.report_scalar(name.split("/")[0], name, value, iteration=at)
            for name, value in _numbers(p.get("lr")):
                logger.report_scalar("lr", name, value, iteration=at)
        elif kind == EventType.FIT_EPOCH:
            if _is_number(p.get("epoch_time")):
                logger.report_scalar("Epoch Time", "Epoch Time", float(p["epoch_time"]), iteration=at)
            for name, value in _numbers(p.get("metrics") if not p.get("series_logged") else None):
                if not name.startswith("train/"):  # the training losses, reported with train_epoch
                    logger.report_scalar(name.split("/")[0], name, value, iteration=at)
            if not p.get("final_eval"):
                for name, value in _numbers(p.get("model_info")):
                    logger.report_single_value(name, value)
        elif kind == EventType.FINAL:
            for name, value in _numbers(p.get("metrics")):
                logger.report_single_value(name, value)
            self._output_model(run_id, handle.task, p)

    def _output_model(self, run_id: str, task: Any, final: dict[str, Any]) -> None:
        ck = final.get("checkpoint") or {}
        try:
            if not isinstance(ck.get("path"), str) or not isinstance(ck.get("sha256"), str):
                raise FileRefused("the final event names no snapshot path and sha256")
            with open_file(ck["path"], self.settings.file_roots) as file:
                copy = file.copy_into(self.copies, ck["sha256"], name="best.pt")
        except FileRefused as exc:
            self.runs.dead_letter(f"output model not logged: {exc}", run_id=run_id)
            return
        name = self.client.hget(self.keys.state(SINK, run_id), "name")
        if offline():
            task.upload_artifact("best.pt", artifact_object=str(copy), wait_on_upload=True, delete_after_upload=True)
        else:
            task.update_output_model(model_path=str(copy), model_name=(name or b"best").decode(), auto_delete_file=True)
        log.info("upload sink=clearml run=%s kind=model outcome=ok", run_id)

    # -- the task -----------------------------------------------------------------------

    def _task(self, run_id: str, session: dict[str, Any] | None) -> TaskHandle | None:
        """The run's task in this process: known, reopened by id, or created (once) from the session."""
        if run_id in self.owner.tasks:
            return self.owner.tasks[run_id]
        state_key = self.keys.state(SINK, run_id)
        task_id, ready, creating = self.client.hmget(state_key, "task_id", "task_ready", "creating")
        if task_id and ready and not offline():
            from clearml import Task

            task = self._call(run_id, "get_task", lambda: Task.get_task(task_id=task_id.decode()))
            self.owner.tasks[run_id] = TaskHandle(task)
            return self.owner.tasks[run_id]
        if session is None:
            raw = self.client.hget(state_key, "session")
            session = orjson.loads(raw) if raw else None
            if session is None:
                return None
        if creating and creating.decode() != self.owner.token and self.owner.alive(creating):
            raise ClearmlBusy(f"another worker is creating the ClearML task of run {run_id}")
        self.client.hset(state_key, mapping={"creating": self.owner.token, "session": orjson.dumps(session)})
        self._call(run_id, "task create", lambda: self._create_task(run_id, session, task_id))
        return self.owner.tasks[run_id]

    def _create_task(self, run_id: str, session: dict[str, Any], task_id: bytes | None) -> None:
        """Runs in the call's thread: when it finishes, even after its caller gave up, the task
        id is stored at once, so a later attempt reopens this task instead of making another."""
        from clearml import Task

        state_key = self.keys.state(SINK, run_id)
        if offline():
            Task.set_offline(True)
        if task_id and not offline():  # created before, but its set-up did not finish
            task = Task.get_task(task_id=task_id.decode())
        else:
            if task_id:
                log.warning("run %s: offline tasks cannot be reopened; a new offline session continues it", run_id)
            task = Task._create(
                project_name=task_project(session),
                task_name=task_name(session, run_id),
                task_type=Task.TaskTypes.training,
            )
            confirm(lambda: self.client.hset(state_key, "task_id", task.id))  # lost, a second task is made
        if not offline():  # models go to the files server (CLEARML_FILES_HOST)
            task.output_uri = True
        task.connect(dict(session.get("args") or {}), name="General", ignore_remote_overrides=True)  # as Ultralytics
        task.add_tags(task_tags(session, run_id))
        confirm(lambda: self.client.hset(state_key, mapping={"task_ready": 1, "name": task_name(session, run_id)}))
        self.client.hdel(state_key, "creating")
        self.owner.tasks[run_id] = TaskHandle(task)
        log.info("upload sink=clearml run=%s kind=task outcome=ok task=%s", run_id, task.id)

    def _reopen(self, run_id: str) -> None:
        """Events after the task was closed: the run was resumed. Its task takes reports again."""
        state_key = self.keys.state(SINK, run_id)
        self.client.hdel(state_key, "ended", "end_seq", "silent_since")
        self.owner.forget(run_id)
        if offline():
            self.client.hdel(state_key, "task_ready")  # a new offline session
            return
        handle = self._task(run_id, None)
        if handle is not None:
            self._call(run_id, "mark started", lambda: handle.task.mark_started(force=True))
        log.info("upload sink=clearml run=%s kind=status outcome=ok status=reopened", run_id)

    def _end(self, run_id: str, seq: int, status: str, reason: str | None = None) -> float | None:
        """Close the task once everything before the end was sent: the SDK's queues and files too."""
        if self._busy_before(run_id, seq):
            return POLL_S
        handle = self._task(run_id, None)
        if handle is not None:
            task = handle.task
            mark = {
                "failed": lambda: task.mark_failed(status_reason=reason or "failed", force=True),
                "stopped": lambda: task.mark_stopped(force=True, status_message=reason or "stopped"),
            }.get(status, lambda: task.mark_completed(force=True))

            def close() -> None:
                mark()
                task.close()

            self._call(run_id, f"mark {status}", close)
        pipe = self.client.pipeline()
        pipe.hset(self.keys.state(SINK, run_id), mapping={"ended": status, "end_seq": seq})
        pipe.zremrangebyscore(self._key(run_id, "events"), seq, seq)
        pipe.execute()
        self.owner.forget(run_id)
        log.info("upload sink=clearml run=%s kind=status outcome=ok status=%s", run_id, status)
        return None

    def _busy_before(self, run_id: str, seq: int) -> bool:
        """Something of the run before ``seq`` is still unreported, unsent or awaited."""
        if self.client.hlen(self._key(run_id, "handed")) or self.client.hlen(self._key(run_id, "files")):
            return True
        first = self.client.zrange(self._key(run_id, "events"), 0, 0, withscores=True)
        if first and first[0][1] < seq:
            return True
        self._expire_media(run_id)  # the run is over: what is there now is all there will be
        return bool(self.client.hlen(self._key(run_id, "media")) or self.client.hlen(self._key(run_id, "files")))

    def _closed(self, run_id: str) -> bool:
        return bool(self.client.hget(self.keys.state(SINK, run_id), "ended"))

    # -- media: files that may appear late ---------------------------------------------------

    def _discover_media(self, run_id: str) -> float | None:
        """Turn media events into file units, one per (title, series, iteration), as files appear."""
        key = self._key(run_id, "media")
        waits = []
        for seq, raw in self.client.hgetall(key).items():
            media = orjson.loads(raw)
            found, complete = self._media_files(run_id, media)
            units = {}
            for path in found:
                unit, entry = file_unit(media, path)
                units[unit] = orjson.dumps(entry)
            if units:
                done = self.client.smismember(self._key(run_id, "files_done"), list(units))
                pipe = self.client.pipeline(transaction=False)
                for (unit, entry), is_done in zip(units.items(), done, strict=True):
                    if not is_done:
                        pipe.hsetnx(self._key(run_id, "files"), unit, entry)
                pipe.execute()
            if complete or time.time() - media["recorded"] >= MEDIA_WAIT_S:
                if not found and not media.get("refused"):
                    self.runs.dead_letter(
                        f"{media['title']}: no file matching {_wanted(media)} appeared within {MEDIA_WAIT_S:.0f} s",
                        run_id=run_id,
                    )
                self.client.hdel(key, seq)
            else:
                if media.get("refused"):
                    self.client.hset(key, seq, orjson.dumps(media))
                waits.append(POLL_S * 5)
        return min(waits) if waits else None

    def _expire_media(self, run_id: str) -> None:
        """Report what is there now, give up on the rest (the run ended)."""
        key = self._key(run_id, "media")
        for seq, raw in self.client.hgetall(key).items():
            self.client.hset(key, seq, orjson.dumps({**orjson.loads(raw), "recorded": 0.0}))
        self._discover_media(run_id)

    def _media_files(self, run_id: str, media: dict[str, Any]) -> tuple[list[str], bool]:
        """(files present, whether every named file is accounted for) for one media event."""
        roots = self.settings.file_roots
        wanted = list(media.get("paths") or [])
        directory = media.get("dir")
        if directory:
            wanted += [str(Path(directory) / n) for n in media.get("names") or []]
        refused = set(media.get("refused") or ())
        found: list[str] = []
        if directory and media.get("pattern") and directory not in refused:
            try:
                found += list_dir(directory, media["pattern"], roots)
            except FileMissing:
                pass
            except FileRefused as exc:
                self._refuse(run_id, media, directory, exc)
        for path in wanted:
            if path in refused:
                continue
            try:
                with open_file(path, roots) as file:
                    if not file.still_being_written():
                        found.append(path)
            except FileMissing:
                continue  # not written yet: waited for until MEDIA_WAIT_S
            except FileRefused as exc:
                self._refuse(run_id, media, path, exc)
        found = [p for p in dict.fromkeys(found) if p not in set(media.get("refused") or ())]
        complete = not media.get("pattern") and len(set(found) | set(media.get("refused") or ())) >= len(wanted) > 0
        return found, complete

    def _refuse(self, run_id: str, media: dict[str, Any], path: str, exc: FileRefused) -> None:
        """A file or directory that will never do (outside the roots, a link, not a file): said once."""
        self.runs.dead_letter(f"{media['title']}: {exc}", run_id=run_id)
        media.setdefault("refused", []).append(path)

    def _report_files(self, run_id: str) -> float | None:
        """Report the file units not handed to a live worker: a private copy each, then the SDK."""
        files = self.client.hgetall(self._key(run_id, "files"))
        if not files:
            return None
        handed = self.client.hgetall(self._key(run_id, "handed"))
        alive = _Memo(self.owner.alive)
        todo = {
            unit.decode(): orjson.loads(raw)
            for unit, raw in files.items()
            if (owner := handed.get(b"f" + unit)) is None or not alive(owner)
        }
        if not todo:
            return None
        handle = self._task(run_id, None)
        if handle is None:
            return 1.0
        copies: dict[str, Path] = {}
        for unit, entry in todo.items():
            try:
                with open_file(entry["path"], self.settings.file_roots) as file:
                    copies[unit] = file.copy_into(self.copies)
            except FileRefused as exc:
                self.runs.dead_letter(f"{entry['title']}: {exc}", run_id=run_id)
                self._done(run_id, [f"f{unit}"])
        if not copies:
            return None
        units = [f"f{u}" for u in copies]
        self._hand(run_id, units)

        def report() -> None:
            logger = handle.task.get_logger()
            with self._unhand_unreported(run_id, units):
                self._report_copies(run_id, logger, todo, copies)
            handle.task.flush(wait_for_uploads=False)

        self._call(run_id, "report files", report)
        return None

    def _report_copies(self, run_id: str, logger: Any, todo: dict[str, Any], copies: dict[str, Path]) -> None:
        for unit, copy in copies.items():
            entry = todo[unit]
            # a plot goes where report_matplotlib_figure(report_interactive=False) puts it
            report, file_arg = (
                (logger._report_image_plot_and_upload, "path") if entry["plot"] else (logger.report_image, "local_path")
            )
            report(
                title=entry["title"],
                series=entry["series"],
                iteration=entry["iteration"],
                delete_after_upload=True,
                **{file_arg: str(copy)},
            )
            self.owner.handed(run_id, f"f{unit}")

    # -- bookkeeping ----------------------------------------------------------------------

    @property
    def copies(self) -> Path:
        """Where this process keeps the checked copies it hands to the SDK (only it writes there)."""
        global _COPIES
        if _COPIES is None or not _COPIES.is_dir():
            _COPIES = private_dir("trainbus-clearml-")
        return _COPIES

    def _confirm(self, run_id: str, units: list[str]) -> None:
        """The SDK sent these units: they are done (called by the owner's thread)."""
        events = [int(u[1:]) for u in units if u.startswith("e")]
        files = [u[1:] for u in units if u.startswith("f")]
        # strict: a record a failover loses would leave these units handed to this live worker, which no
        # longer holds them to confirm: the run would never finish. Not held, they stay to confirm again.
        self._done(run_id, units, events=events, files=files, strict=True)
        if events:
            self.runs.counters.upload(SINK, "events", "ok", len(events))

    def _done(
        self,
        run_id: str,
        units: list[str],
        *,
        events: list[int] | None = None,
        files: list[str] | None = None,
        strict: bool = False,
    ) -> None:
        events = [int(u[1:]) for u in units if u.startswith("e")] if events is None else events
        files = [u[1:] for u in units if u.startswith("f")] if files is None else files
        pipe = self.client.pipeline()
        pipe.hdel(self._key(run_id, "handed"), *units)
        for seq in events:
            pipe.zremrangebyscore(self._key(run_id, "events"), seq, seq)
        if files:
            pipe.hdel(self._key(run_id, "files"), *files)
            pipe.sadd(self._key(run_id, "files_done"), *files)
        pipe.hincrby(self.keys.state(SINK, run_id), "reported", len(events))
        pipe.execute()
        self.runs.wait_for_replicas(strict=strict)

    def _finished(self, run_id: str) -> bool:
        if not self._closed(run_id):
            return False
        return not any(self.client.exists(self._key(run_id, kind)) for kind in ("events", "media", "files", "handed"))

    def _silence_wait(self, run_id: str) -> float | None:
        """Nothing to do: keep the run while its producer lives; a dead producer's task is stopped.

        Silence is counted from when this sink first saw the producer's liveness key gone, so
        a Redis outage (no key, no events) does not count against a producer cut off by it.
        """
        state_key = self.keys.state(SINK, run_id)
        if self._closed(run_id):
            return float(LIVENESS_TTL_S)
        if self.client.exists(self.keys.alive(run_id)):
            self.client.hdel(state_key, "silent_since")
            return float(LIVENESS_TTL_S)
        self.client.hsetnx(state_key, "silent_since", repr(time.time()))
        silent_since, last = self.client.hmget(state_key, "silent_since", "last_event_ts")
        now = time.time()
        if min(now - float(silent_since or now), now - float(last or 0)) < SILENCE_STOP_S:
            return float(LIVENESS_TTL_S)
        return self._end(run_id, self.runs.recorded_below(run_id) - 1, "stopped", "the training process went silent")


_COPIES: Path | None = None


class _Memo:
    """One answer per owner token within a drain (each is a Redis round trip)."""

    def __init__(self, fn: Any) -> None:
        self.fn, self.seen = fn, {}

    def __call__(self, token: bytes) -> bool:
        if token not in self.seen:
            self.seen[token] = self.fn(token)
        return self.seen[token]


def task_project(session: dict[str, Any]) -> str:
    """Ultralytics: ``str(args.project or "Ultralytics").lstrip("/") or "Ultralytics"``."""
    fallback = "Ultralytics" if session.get("framework") == "ultralytics" else "trainbus"
    project = session.get("project") or (session.get("args") or {}).get("project")
    return str(project or fallback).lstrip("/") or fallback


def task_name(session: dict[str, Any], run_id: str) -> str:
    return str(session.get("name") or (session.get("args") or {}).get("name") or run_id)


def task_tags(session: dict[str, Any], run_id: str) -> list[str]:
    tags = ["Ultralytics"] if session.get("framework") == "ultralytics" else []
    return [*tags, "trainbus", f"run:{run_id}"]


def file_unit(media: dict[str, Any], path: str) -> tuple[str, dict[str, Any]]:
    """A file's identity in ClearML (title, series, iteration) and what reporting it needs."""
    name = Path(path).name
    if media.get("kind") == "plot":
        title, series, iteration, plot = Path(path).stem, PLOT_SERIES, 0, True
    else:
        match = BATCH_IN_NAME.search(name)
        title = media.get("title") or "Debug Samples"
        series = name.replace(match.group(), "") if match else name
        iteration = int(match.group(1)) if match else (media.get("iteration") or 0)
        plot = False
    entry = {"title": title, "series": series, "iteration": iteration, "path": path, "plot": plot}
    return f"{'p' if plot else 'd'}|{title}|{series}|{iteration}", entry


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _numbers(values: Any) -> list[tuple[str, float]]:
    """(name, value) pairs worth reporting: numbers only (NaN arrives as null and is skipped)."""
    if not isinstance(values, dict):
        return []
    return [(str(k), float(v)) for k, v in values.items() if _is_number(v)]


def _wanted(media: dict[str, Any]) -> str:
    return str(media.get("pattern") or media.get("names") or media.get("paths"))
