"""The ClearML sink: what Ultralytics' ClearML callbacks did inside training, from events.

Per run, one ClearML task (never ``Task.init``: in a worker it would become the process's
main task), created at the session event and found again by id after a worker restart
(``task_id`` in the run's state hash). Events are reported in seq order:

  session     the task: project, name, tags, args as hyperparameters ("General")
  train_epoch scalars "train/<loss>" and "lr/<group>" at iteration = epoch
  fit_epoch   scalars "val/<metric>" and "Epoch Time"; model info as single values at epoch 0
  media       debug samples (iteration from ``_batchN`` in the name) or plots; files that
              appear late are waited for, up to MEDIA_WAIT_S, without holding back the rest
  final       final metrics as single values; best checkpoint as the output model
              (offline mode: as an artifact, the SDK's offline output model is broken)
  run_end     task completed / failed / stopped; a producer that went silent: stopped

An event counts as reported only once the SDK flushed it, so ClearML being down delays
the run but loses nothing; every SDK call runs under a timeout because the SDK retries
forever when its server is gone. Use the non-forking worker (``-w
workers.rq_worker.SimpleWorker``): the tasks and the SDK's queues live in the process.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import orjson
import redis

from shared.backoff import compute_backoff
from shared.events import Event, EventType
from shared.keys import LIVENESS_TTL_S, Keys
from shared.settings import WorkerSettings
from workers.files import FileMissing, FileRefused, allowed_dir, allowed_path, verified_checkpoint
from workers.sink import RunState

log = logging.getLogger("trainbus.clearml")

SINK = "clearml"
KINDS = ("events", "media")
TYPES = frozenset(
    {EventType.SESSION, EventType.TRAIN_EPOCH, EventType.FIT_EPOCH, EventType.MEDIA, EventType.FINAL, EventType.RUN_END}
)
BATCH = 200
# A run with no live producer and no event for this long is taken as dead and its task
# stopped. Not the 30 s liveness TTL: a producer cut off from Redis for a while (its events
# waiting in its spool) looks just like that, and a stopped task takes no more reports.
SILENCE_STOP_S = 300.0
SEND_POLL_S = 0.05  # how often _send_reports looks at the SDK's queue
MEDIA_WAIT_S = 60.0  # a file named by an event may appear this late (mosaics are drawn in a thread)
MEDIA_POLL_S = 1.0
BATCH_IN_NAME = re.compile(r"_batch(\d+)")
T = TypeVar("T")


class ClearmlTimeout(Exception):
    """A ClearML call did not return in time (server down or slow): retried later."""


def call_with_timeout(fn: Callable[[], T], timeout: float, what: str) -> T:
    """Run ``fn`` in a thread; raise ClearmlTimeout if it has not returned in ``timeout`` s.

    The SDK retries forever once logged in, so a call may never return: the thread is left
    to finish on its own (it is a daemon) and the job moves on.
    """
    result: list[Any] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            result.append(fn())
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=run, daemon=True, name=f"clearml-{what}")
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise ClearmlTimeout(f"ClearML {what} did not return within {timeout:.0f} s")
    if error:
        raise error[0]
    return result[0]


class _Tasks:
    """Tasks and not-yet-flushed seqs per run, kept for the life of the worker process."""

    def __init__(self) -> None:
        self.tasks: dict[str, Any] = {}
        self.inflight: dict[str, set[int]] = {}


_PROCESS = _Tasks()


def offline() -> bool:
    return os.environ.get("CLEARML_OFFLINE_MODE", "").strip().lower() in ("1", "true", "yes", "on")


class ClearmlSink:
    name = SINK

    def __init__(self, client: redis.Redis, keys: Keys, settings: WorkerSettings) -> None:
        self.client = client
        self.keys = keys
        self.settings = settings
        self.runs = RunState(client, keys, SINK)
        self.process = _PROCESS

    def _call(self, fn: Callable[[], T], what: str) -> T:
        return call_with_timeout(fn, self.settings.clearml_timeout_s, what)

    # -- dispatcher side -----------------------------------------------------------------

    def record(self, pipe: redis.client.Pipeline, event: Event) -> None:
        self.runs.mark_seen(pipe, event)
        if event.type in TYPES:
            data = orjson.dumps({"seq": event.seq, "ts": event.ts, "type": event.type, "payload": event.payload})
            pipe.zadd(self.keys.pending(SINK, event.run_id, "events"), {data: event.seq})

    # -- worker side -----------------------------------------------------------------------

    def drain(self, run_id: str) -> float | None:
        state_key = self.keys.state(SINK, run_id)
        try:
            waits = [self._report_events(run_id), self._report_media(run_id), self._flush(run_id)]
        except (ClearmlTimeout, ConnectionError, OSError) as exc:
            attempt = self.client.hincrby(state_key, "fail", 1)
            delay = compute_backoff(attempt - 1, base=1.0, cap=120.0)
            self.client.hincrby(state_key, "retries", 1)
            self.runs.counters.upload(SINK, "events", "retry")
            log.warning("upload sink=clearml run=%s outcome=retry delay=%.1f error=%r", run_id, delay, str(exc))
            return delay
        self.client.hdel(state_key, "fail")
        pending = [w for w in waits if w is not None]
        if pending:
            return min(pending)
        if self._finished(run_id):
            self.process.tasks.pop(run_id, None)
            self.runs.finish(run_id, KINDS)
            return None
        return self._silence_wait(run_id)

    # -- events in seq order ---------------------------------------------------------------

    def _report_events(self, run_id: str) -> float | None:
        key = self.keys.pending(SINK, run_id, "events")
        inflight = self.process.inflight.setdefault(run_id, set())
        done, ended = self.client.hmget(self.keys.state(SINK, run_id), "done_seq", "ended")
        for raw in self.client.zrangebyscore(key, f"({int(done or -1)}", "+inf", start=0, num=BATCH):
            event = orjson.loads(raw)
            seq = event["seq"]
            if seq in inflight:
                continue
            if ended:  # the task is closed: what comes after the run's end is not reported
                inflight.add(seq)
                continue
            task = self._task(run_id, event)
            if task is None:
                return 1.0  # no session event yet: nothing to attach reports to
            self._report(run_id, task, event)
            inflight.add(seq)
        return None

    def _report(self, run_id: str, task: Any, event: dict[str, Any]) -> None:
        p, kind = event["payload"], event["type"]
        logger = task.get_logger()
        epoch = p.get("epoch") if isinstance(p.get("epoch"), int) else 0
        if kind == EventType.TRAIN_EPOCH:
            for name, value in _numbers(p.get("metrics")):
                logger.report_scalar("train", name, value, iteration=epoch)
            for name, value in _numbers(p.get("lr")):
                logger.report_scalar("lr", name, value, iteration=epoch)
        elif kind == EventType.FIT_EPOCH and not p.get("final_eval"):
            if isinstance(p.get("epoch_time"), (int, float)):
                logger.report_scalar("Epoch Time", "Epoch Time", p["epoch_time"], iteration=epoch)
            for name, value in _numbers(p.get("metrics")):
                if not name.startswith("train/"):
                    logger.report_scalar("val", name, value, iteration=epoch)
            for name, value in _numbers(p.get("model_info")):
                logger.report_single_value(name, value)
        elif kind == EventType.MEDIA:
            self.client.hset(
                self.keys.pending(SINK, run_id, "media"),
                str(event["seq"]),
                orjson.dumps({**p, "recorded": time.time(), "done": []}),
            )
        elif kind == EventType.FINAL:
            for name, value in _numbers(p.get("metrics")):
                logger.report_single_value(name, value)
            self._output_model(run_id, task, p)
        elif kind == EventType.RUN_END:
            self._end_task(run_id, task, p.get("status") or "completed", p.get("error"))

    def _task(self, run_id: str, event: dict[str, Any]) -> Any:
        """The run's task: cached, reopened by id, or created from the session event."""
        if run_id in self.process.tasks:
            return self.process.tasks[run_id]
        from clearml import Task

        state_key = self.keys.state(SINK, run_id)
        task_id = self.client.hget(state_key, "task_id")
        if task_id and not offline():
            task = self._call(lambda: Task.get_task(task_id=task_id.decode()), what="get_task")
        elif event["type"] != EventType.SESSION:
            return None
        else:
            task = self._create_task(run_id, event["payload"])
            self.client.hset(state_key, "task_id", task.id)
        self.process.tasks[run_id] = task
        return task

    def _create_task(self, run_id: str, session: dict[str, Any]) -> Any:
        from clearml import Task

        if offline():
            Task.set_offline(True)
        project = session.get("project") or (session.get("args") or {}).get("project") or "trainbus"
        name = session.get("name") or run_id
        task = self._call(
            lambda: Task._create(project_name=str(project), task_name=str(name), task_type=Task.TaskTypes.training),
            what="task create",
        )
        if not offline():  # models go to the files server (CLEARML_FILES_HOST)
            self._call(lambda: setattr(task, "output_uri", True), what="output destination")
        args = {k: v for k, v in (session.get("args") or {}).items() if v is not None}
        self._call(lambda: task.connect(args, name="General"), what="connect args")
        self._call(lambda: task.add_tags(["trainbus", f"run:{run_id}"]), what="add tags")
        log.info("upload sink=clearml run=%s kind=task outcome=ok task=%s project=%s", run_id, task.id, project)
        return task

    def _output_model(self, run_id: str, task: Any, final: dict[str, Any]) -> None:
        ck = final.get("checkpoint") or {}
        try:
            path = verified_checkpoint(ck["path"], ck["sha256"], self.settings.file_roots)
        except (FileRefused, KeyError) as exc:
            self.runs.dead_letter(f"output model not logged: {exc}", run_id=run_id)
            return
        if offline():
            self._call(
                lambda: task.upload_artifact("best.pt", artifact_object=str(path), wait_on_upload=True),
                what="output model artifact",
            )
        else:
            self._call(
                lambda: task.update_output_model(model_path=str(path), model_name="best", auto_delete_file=False),
                what="output model",
            )
        log.info("upload sink=clearml run=%s kind=model outcome=ok", run_id)

    def _end_task(self, run_id: str, task: Any, status: str, reason: str | None = None) -> None:
        self._flush_media(run_id)
        mark = {
            "failed": lambda: task.mark_failed(status_reason=reason or "failed", force=True),
            "stopped": lambda: task.mark_stopped(force=True, status_message=reason or "stopped"),
        }
        self._send_reports(task)  # then close()'s own flush finds nothing left to send
        self._call(mark.get(status, lambda: task.mark_completed(force=True)), what=f"mark {status}")
        self._call(task.close, what="close")
        self.client.hset(self.keys.state(SINK, run_id), "ended", status)
        log.info("upload sink=clearml run=%s kind=status outcome=ok status=%s", run_id, status)

    # -- media: files that may appear late ---------------------------------------------------

    def _report_media(self, run_id: str) -> float | None:
        key = self.keys.pending(SINK, run_id, "media")
        waits = []
        for seq, raw in self.client.hgetall(key).items():
            media = orjson.loads(raw)
            task = self.process.tasks.get(run_id)
            if task is None:
                return 1.0
            found = self._media_files(run_id, media)
            for path in found:
                if path.name not in media["done"]:
                    self._report_file(task, media, path)
                    media["done"].append(path.name)
            expired = time.time() - media["recorded"] >= MEDIA_WAIT_S
            if expired or _complete(media, found):
                if not found and not media.get("refused"):
                    self.runs.dead_letter(
                        f"{media['title']}: no file matching {_wanted(media)} appeared within {MEDIA_WAIT_S:.0f} s",
                        run_id=run_id,
                    )
                self.client.hdel(key, seq)
            else:
                self.client.hset(key, seq, orjson.dumps(media))
                waits.append(MEDIA_POLL_S)
        return min(waits) if waits else None

    def _flush_media(self, run_id: str) -> None:
        """At the end of the run: report what is there now, give up on the rest."""
        key = self.keys.pending(SINK, run_id, "media")
        for seq, raw in self.client.hgetall(key).items():
            media = orjson.loads(raw)
            media["recorded"] = 0.0
            self.client.hset(key, seq, orjson.dumps(media))
        self._report_media(run_id)

    def _media_files(self, run_id: str, media: dict[str, Any]) -> list[Path]:
        candidates = [Path(p) for p in media.get("paths") or []]
        directory = media.get("dir")
        if directory:
            base = Path(directory)
            candidates += [base / n for n in media.get("names") or []]
            if media.get("pattern"):
                try:
                    base = allowed_dir(base, self.settings.file_roots)
                    candidates += sorted(base.glob(media["pattern"]))
                except FileRefused as exc:
                    self._refuse(run_id, media, base, exc)
                    media["recorded"] = 0.0
        found = []
        for path in candidates:
            if str(path) in media.get("refused", ()):
                continue
            try:
                found.append(allowed_path(path, self.settings.file_roots))
            except FileMissing:
                continue  # not written yet: waited for until MEDIA_WAIT_S
            except FileRefused as exc:
                self._refuse(run_id, media, path, exc)
        return list(dict.fromkeys(found))

    def _refuse(self, run_id: str, media: dict[str, Any], path: Path, exc: FileRefused) -> None:
        """A file or directory that will never do (outside the roots, not a file): said once."""
        self.runs.dead_letter(f"{media['title']}: {exc}", run_id=run_id)
        media.setdefault("refused", []).append(str(path))

    def _report_file(self, task: Any, media: dict[str, Any], path: Path) -> None:
        logger = task.get_logger()
        if media.get("kind") == "plot":
            logger._report_image_plot_and_upload(title=path.stem, series="", path=str(path), iteration=0)
            return
        match = BATCH_IN_NAME.search(path.name)
        iteration = int(match.group(1)) if match else (media.get("iteration") or 0)
        series = path.name.replace(match.group(), "") if match else path.name
        logger.report_image(
            title=media.get("title") or "Debug", series=series, local_path=str(path), iteration=iteration
        )

    # -- flushing, ending -------------------------------------------------------------------

    def _flush(self, run_id: str) -> float | None:
        """Once the SDK delivered what was reported, count those seqs as done."""
        inflight = self.process.inflight.get(run_id)
        task = self.process.tasks.get(run_id)
        if not inflight or task is None:
            return None
        if not self.client.hget(self.keys.state(SINK, run_id), "ended"):
            self._send_reports(task)
        top = max(inflight)
        pipe = self.client.pipeline(transaction=False)
        pipe.hset(self.keys.state(SINK, run_id), "done_seq", top)
        pipe.hincrby(self.keys.state(SINK, run_id), "reported", len(inflight))
        pipe.zremrangebyscore(self.keys.pending(SINK, run_id, "events"), "-inf", top)
        pipe.execute()
        self.runs.counters.upload(SINK, "events", "ok", len(inflight))
        inflight.clear()
        return 0.0 if self.client.zcard(self.keys.pending(SINK, run_id, "events")) else None

    def _send_reports(self, task: Any) -> None:
        """Have the SDK send what was reported; wait until it has, at most clearml_timeout_s.

        Not ``task.flush(wait_for_uploads=True)``: after 10 s of waiting, that call sends the
        pending events from the caller's thread, beside the SDK's own thread that is still
        retrying the same list, and the server gets them twice (clearml 2.1,
        ``reporter.py: wait_for_events``; the soak run found it). Here only the SDK's thread
        sends; this one watches its queue, which the SDK offers only privately.
        """
        from clearml.backend_interface.model import Model as BackendModel

        reporter = task._reporter
        self._call(lambda: task.flush(wait_for_uploads=False), what="flush")  # wakes the SDK's thread
        deadline = time.monotonic() + self.settings.clearml_timeout_s
        while reporter.events_waiting() or BackendModel.get_num_results() > 0:
            if time.monotonic() > deadline:
                raise ClearmlTimeout(f"ClearML did not take the reports within {self.settings.clearml_timeout_s:.0f} s")
            time.sleep(SEND_POLL_S)

    def _finished(self, run_id: str) -> bool:
        state = self.client.hmget(self.keys.state(SINK, run_id), "ended")
        return bool(state[0]) and not self.client.hlen(self.keys.pending(SINK, run_id, "media"))

    def _silence_wait(self, run_id: str) -> float | None:
        """Nothing to do: keep the run while its producer lives; a dead producer's task is stopped."""
        if self.client.exists(self.keys.alive(run_id)):
            return float(LIVENESS_TTL_S)
        last = float(self.client.hget(self.keys.state(SINK, run_id), "last_event_ts") or 0)
        task = self.process.tasks.get(run_id)
        if time.time() - last < SILENCE_STOP_S:
            return float(LIVENESS_TTL_S)
        if task is not None:
            self._end_task(run_id, task, "stopped", "the training process went silent")
            self.process.tasks.pop(run_id, None)
        self.runs.finish(run_id, KINDS)
        return None


def _numbers(values: Any) -> list[tuple[str, float]]:
    """(name, value) pairs worth reporting: numbers only (NaN arrives as null and is skipped)."""
    if not isinstance(values, dict):
        return []
    return [(str(k), float(v)) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]


def _wanted(media: dict[str, Any]) -> str:
    return str(media.get("pattern") or media.get("names") or media.get("paths"))


def _complete(media: dict[str, Any], found: list[Path]) -> bool:
    """Named files are all there (a glob can always grow, so it waits out its window)."""
    if media.get("pattern"):
        return False
    wanted = len(media.get("names") or []) + len(media.get("paths") or [])
    return len(found) + len(media.get("refused") or []) >= wanted > 0
