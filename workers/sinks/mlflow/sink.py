"""The MLflow sink: what Ultralytics' MLflow callback logs, from a worker, each point once.

What a run becomes (``ultralytics/utils/callbacks/mlflow.py`` is the reference), over
``workers/sinks/mlflow/client.py``:

  run         one MLflow run in the experiment named by TRAINBUS_MLFLOW_EXPERIMENT, else the
              run's ``project`` arg, else ``trainbus``; named by its ``name`` arg and tagged
              ``trainbus.run_id``. Found by that tag before it is created, so a lost reply to
              the create makes no second run; its id is stored in Redis before anything uses it.
  params      the training args, as resolved by the trainer's set-up (``pretrain_end``), else
              the session's; logged once the run's first later event is recorded
  metrics     every (key, step) once: train losses and learning rates at ``train_epoch``,
              validation metrics at ``fit_epoch`` (the final validation of best.pt at step =
              epochs), keys as Ultralytics writes them (no parentheses), coalesced into
              ``log_batch`` calls at most one per TRAINBUS_RATE_METRICS
  artifacts   at the end: ``weights/best.pt`` (the final's snapshot) and ``weights/last.pt``
              (the newest checkpoint's), sha256-checked, and every file the final lists
              (the save dir's png, jpg, csv and yaml)
  status      FINISHED after the artifacts; FAILED when the run ended in an error; KILLED when
              the producer went silent (if it sends again, the run continues)

Exactly once: MLflow appends a history point per logged metric, so a redelivered epoch
would be a visible duplicate. A batch's (key, step) fields are written to the run's state
as ``inflight`` before the call; after an answer that was lost (timeout, reset, a worker
killed mid-call), the next attempt reads the server's history of those keys and sends only
the points it lacks; delivered fields go to a ``done`` set that a redelivered event cannot
undo. Timestamps come from the events, so a resend is the identical point, which
MLflow's SQL store also refuses to store twice.

State per run: ``state`` (mlflow_run, experiment, registered_seq, params_ready, inflight,
ended, final_done, ``artifact:<name>``), ``pending:session`` / ``params`` / ``last`` /
``final`` (newest wins), ``pending:metrics`` (``step|key`` -> [value, ts ms]), ``done``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import redis

from shared.events import Event, EventType
from shared.keys import Keys
from shared.settings import WorkerSettings
from workers.sinks.files import FileMissing, FileRefused, open_file, open_snapshot, private_dir
from workers.sinks.interface import SinkRefused
from workers.sinks.mlflow.client import MAX_BATCH_METRICS, MAX_BATCH_PARAMS, MlflowApi, MlflowError, param_value
from workers.sinks.rate_limit import RateLimiter
from workers.sinks.run_state import Attempt, RunState, final_done, pending_counts

log = logging.getLogger("trainbus.mlflow")

SINK = "mlflow"
KINDS = ("session", "params", "metrics", "last", "final", "done")
RUN_TAG = "trainbus.run_id"
DEFAULT_EXPERIMENT = "trainbus"
FINAL_GAP_WAIT_S = 60.0  # after this, the final goes out even if an earlier seq never arrived
POLL_S = 0.5
SILENT_S = 300.0  # a producer silent this long (and not alive) left its run KILLED
INVALID_KEY_CHARS = re.compile(r"[^\w\-. :/]")


class MlflowRefused(SinkRefused):
    """MLflow refused the run in a way retrying cannot fix (credentials, permissions, a deleted run)."""


class MlflowSink:
    name = SINK

    def __init__(self, client: redis.Redis, keys: Keys, settings: WorkerSettings, api: MlflowApi | None = None) -> None:
        self.client = client
        self.keys = keys
        self.settings = settings
        self._api = api
        self.runs = RunState(client, keys, SINK, settings.redis_min_replicas)
        self.slots = RateLimiter(client, settings.redis_min_replicas)

    @property
    def api(self) -> MlflowApi:
        """Built on first use: the dispatcher records events without importing mlflow."""
        if self._api is None:
            self._api = MlflowApi(self.settings.mlflow_tracking_uri, self.settings.mlflow_timeout_s)
        return self._api

    @staticmethod
    def pending(client: redis.Redis, keys: Keys, run_id: str) -> dict[str, int]:
        return pending_counts(client, keys, SINK, run_id, queued=("metrics",), slots=("params", "final"))

    @staticmethod
    def delivered(client: redis.Redis, keys: Keys, run_id: str) -> bool:
        return final_done(client, keys, SINK, run_id)

    # -- dispatcher side -----------------------------------------------------------------

    def record(self, pipe: redis.client.Pipeline, event: Event) -> None:
        run, p = event.run_id, event.payload
        state_key = self.keys.state(SINK, run)
        self.runs.mark_seen(pipe, event)
        if event.type == EventType.SESSION:
            self.runs.set_if_newer(pipe, event, "session")
            if p.get("args"):
                self.runs.set_if_newer(pipe, event, "params")
            return
        pipe.hset(state_key, "params_ready", 1)  # the session's args are final unless pretrain_end said otherwise
        if event.type == EventType.PRETRAIN_END and p.get("args"):
            self.runs.set_if_newer(pipe, event, "params")
        elif event.type in (EventType.TRAIN_EPOCH, EventType.FIT_EPOCH) and isinstance(p.get("epoch"), int):
            points = epoch_points(event)
            if points:
                pipe.hset(self.keys.pending(SINK, run, "metrics"), mapping=points)
        elif event.type == EventType.CHECKPOINT:
            self.runs.set_if_newer(pipe, event, "last")  # every checkpoint event is of last.pt
        elif event.type == EventType.FINAL:
            self.runs.set_if_newer(pipe, event, "final")
        elif event.type == EventType.RUN_END:
            pipe.hset(state_key, mapping={"ended": p.get("status") or "completed", "error": p.get("error") or ""})

    # -- worker side -----------------------------------------------------------------------

    def drain(self, run_id: str) -> float | None:
        state = self._state(run_id)
        seq, session = self.client.hmget(self.keys.pending(SINK, run_id, "session"), "seq", "data")
        if state.get("final_done"):
            if session is None or int(seq) <= int(state.get("registered_seq", -1)):
                self.runs.finish(run_id, KINDS)
                return None
            # resumed after its end: it ends again, with its new final's artifacts (logged over the old ones)
            again = ["final_done", "ended", "error", "status", *(f for f in state if f.startswith("artifact:"))]
            self.client.hdel(self.keys.state(SINK, run_id), *again)
            state = self._state(run_id)
        if session is None:
            return 1.0  # the session event is not recorded yet
        if not state.get("mlflow_run") or int(state.get("registered_seq", -1)) < int(seq):
            wait = self._open_run(run_id, orjson.loads(session), int(seq), state)
            if wait is not None:
                return wait
            state = self._state(run_id)
        mlflow_run = state["mlflow_run"]
        for step in (self._params, self._metrics, self._final):
            wait = step(run_id, mlflow_run, state)
            if wait is not None:
                return wait
        if self.client.hexists(self.keys.state(SINK, run_id), "final_done"):
            self.runs.finish(run_id, KINDS)
            return None
        return self._idle_wait(run_id, mlflow_run, state)

    def _state(self, run_id: str) -> dict[str, str]:
        return {k.decode(): v.decode() for k, v in self.client.hgetall(self.keys.state(SINK, run_id)).items()}

    # -- the MLflow run ---------------------------------------------------------------------

    def _open_run(self, run_id: str, session: dict[str, Any], seq: int, state: dict[str, str]) -> float | None:
        """The run's MLflow run, found by its tag or created; None once its id is stored."""
        if wait := self.slots.wait(self.keys.state(SINK, run_id), "retry:run"):
            return wait
        args = session.get("args") or {}
        experiment = self.settings.mlflow_experiment or args.get("project") or session.get("project")
        experiment = str(experiment or DEFAULT_EXPERIMENT)
        name = str(args.get("name") or session.get("name") or run_id)
        with self._attempt(run_id, "run") as attempt:
            experiment_id = self.api.experiment_id(experiment)
            mlflow_run = self.api.find_run(experiment_id, RUN_TAG, run_id)
            if mlflow_run is None:
                mlflow_run = self.api.create_run(experiment_id, name, {RUN_TAG: run_id})
                outcome = "created"
            else:
                outcome = "found"
                if state.get("mlflow_run"):  # a later session of the run: it runs again
                    self.api.reopen(mlflow_run)
        if attempt.error:
            self._block(run_id, f"run {run_id}: {attempt.error}")
        if not attempt.ok:
            return self._retry_wait(run_id, "run")
        self.client.hset(
            self.keys.state(SINK, run_id),
            mapping={"mlflow_run": mlflow_run, "experiment": experiment, "registered_seq": seq},
        )
        log.info(
            "upload sink=mlflow run=%s kind=run outcome=%s mlflow_run=%s experiment=%r",
            run_id,
            outcome,
            mlflow_run,
            experiment,
        )
        return None

    # -- params and metrics -----------------------------------------------------------------

    def _params(self, run_id: str, mlflow_run: str, state: dict[str, str]) -> float | None:
        """The training args, once the last word on them is in (``params_ready``)."""
        key = self.keys.pending(SINK, run_id, "params")
        pending = self.client.hget(key, "data")
        if pending is None or not state.get("params_ready"):
            return None
        args = orjson.loads(pending).get("args") or {}
        params = {metric_key(str(k)): param_value(v) for k, v in args.items()}
        items = sorted(params.items())
        for start in range(0, len(items), MAX_BATCH_PARAMS):
            with self._attempt(run_id, "params") as attempt:
                self.api.log_batch(mlflow_run, params=dict(items[start : start + MAX_BATCH_PARAMS]))
            if attempt.error:  # logged before with other values (a resumed run): those stay
                self.runs.dead_letter(f"params of run {run_id} not logged: {attempt.error}", run_id=run_id)
            elif not attempt.ok:
                return self._retry_wait(run_id, "params")
        self.runs.remove_if_same(key, {"data": pending})
        log.info("upload sink=mlflow run=%s kind=params outcome=ok params=%d", run_id, len(items))
        return None

    def _metrics(self, run_id: str, mlflow_run: str, state: dict[str, str]) -> float | None:
        """Pending points in ``log_batch`` calls, each (key, step) once; see the module's docstring."""
        state_key = self.keys.state(SINK, run_id)
        pending_key, done_key = self.keys.pending(SINK, run_id, "metrics"), self.keys.pending(SINK, run_id, "done")
        if state.get("inflight"):
            wait = self._settle_inflight(run_id, mlflow_run, orjson.loads(state["inflight"]))
            if wait is not None:
                return wait
        pending = self.client.hgetall(pending_key)
        if not pending:
            return None
        done = self.client.smismember(done_key, list(pending))
        delivered = {f: v for (f, v), d in zip(pending.items(), done, strict=True) if d}
        if delivered:  # redelivered events of points already logged
            self.runs.remove_if_same(pending_key, {f.decode(): v for f, v in delivered.items()})
        batch = sorted((f for f in pending if f not in delivered), key=_field_order)[:MAX_BATCH_METRICS]
        if not batch:
            return None
        if wait := self.slots.wait(state_key, "retry:metrics") or self.slots.reserve(
            state_key, "metrics", self.settings.rate_metrics
        ):
            return wait
        fields = [f.decode() for f in batch]
        self.client.hset(state_key, "inflight", orjson.dumps(fields))
        with self._attempt(run_id, "metrics") as attempt:
            self.api.log_batch(mlflow_run, metrics=[point(f, pending[f]) for f in batch])
        if attempt.error:  # the server refused the batch (a bad key or value): find which, send the rest
            return self._one_by_one(run_id, mlflow_run, fields, pending)
        if not attempt.ok:
            return self._retry_wait(run_id, "metrics")
        self._delivered(run_id, {f: pending[f.encode()] for f in fields})
        log.info("upload sink=mlflow run=%s kind=metrics outcome=ok points=%d", run_id, len(fields))
        return None

    def _settle_inflight(self, run_id: str, mlflow_run: str, fields: list[str]) -> float | None:
        """A batch whose answer was lost: the points the server holds count as delivered."""
        by_key: dict[str, set[int]] = {}
        for f in fields:
            step, _, key = f.partition("|")
            by_key.setdefault(key, set()).add(int(step))
        held: list[str] = []
        for key, steps in sorted(by_key.items()):
            with self._attempt(run_id, "verify") as attempt:
                on_server = self.api.metric_steps(mlflow_run, key)
            if not attempt.ok and not attempt.error:
                return self._retry_wait(run_id, "verify")
            held += [f"{s}|{key}" for s in steps & (on_server if attempt.ok else set())]
        values = self.client.hmget(self.keys.pending(SINK, run_id, "metrics"), held) if held else []
        self._delivered(run_id, {f: v for f, v in zip(held, values, strict=True)})
        if held:
            log.info(
                "upload sink=mlflow run=%s kind=metrics outcome=ok points=%d (the server had them; reply lost)",
                run_id,
                len(held),
            )
        return None

    def _one_by_one(self, run_id: str, mlflow_run: str, fields: list[str], pending: dict[bytes, bytes]) -> float | None:
        """After a refused batch: each point alone; the ones refused are dead-lettered."""
        for f in fields:
            with self._attempt(run_id, "metrics") as attempt:
                self.api.log_batch(mlflow_run, metrics=[point(f.encode(), pending[f.encode()])])
            if not attempt.ok and not attempt.error:
                return self._retry_wait(run_id, "metrics")
            if attempt.error:
                self.runs.dead_letter(f"metric {f} of run {run_id} refused: {attempt.error}", run_id=run_id)
            self._delivered(run_id, {f: pending[f.encode()]})
        return None

    def _delivered(self, run_id: str, points: dict[str, bytes | None]) -> None:
        """Fields in ``done`` first (a redelivered event cannot send them again), then out of pending."""
        state_key = self.keys.state(SINK, run_id)
        pipe = self.client.pipeline()
        if points:
            pipe.sadd(self.keys.pending(SINK, run_id, "done"), *points)
        pipe.hdel(state_key, "inflight")
        pipe.hincrby(state_key, "points_sent", len(points))
        pipe.execute()
        self.runs.remove_if_same(
            self.keys.pending(SINK, run_id, "metrics"), {f: v for f, v in points.items() if v is not None}
        )

    # -- the end ---------------------------------------------------------------------------

    def _final(self, run_id: str, mlflow_run: str, state: dict[str, str]) -> float | None:
        """The artifacts, then FINISHED: after every point and every earlier event; last."""
        seq, pending, recorded_at = self.client.hmget(
            self.keys.pending(SINK, run_id, "final"), "seq", "data", "recorded_at"
        )
        metrics_left = self.client.hlen(self.keys.pending(SINK, run_id, "metrics")) or state.get("inflight")
        if pending is None:
            if state.get("ended") and not metrics_left:
                status = "FAILED" if state["ended"] == "failed" else "FINISHED"
                return self._terminate(run_id, mlflow_run, status)
            return None
        if metrics_left or self.client.hexists(self.keys.pending(SINK, run_id, "params"), "data"):
            return POLL_S
        waited = time.time() - float(recorded_at or time.time())
        if self.runs.recorded_below(run_id) < int(seq) and waited < FINAL_GAP_WAIT_S:
            return POLL_S
        final = orjson.loads(pending)
        last = self.client.hget(self.keys.pending(SINK, run_id, "last"), "data")
        artifacts = [("weights", "best.pt", final.get("checkpoint") or {})]
        if last is not None:
            artifacts.append(("weights", "last.pt", orjson.loads(last).get("checkpoint") or {}))
        artifacts += [(None, Path(f).name, {"file": f}) for f in final.get("files") or []]
        for folder, name, source in artifacts:
            wait = self._artifact(run_id, mlflow_run, folder, name, source, state)
            if wait is not None:
                return wait
        status = "FAILED" if state.get("ended") == "failed" else "FINISHED"
        return self._terminate(run_id, mlflow_run, status)

    def _artifact(
        self, run_id: str, mlflow_run: str, folder: str | None, name: str, source: dict[str, Any], state: dict[str, str]
    ) -> float | None:
        """One artifact, once (``artifact:<path>`` in the state): a checked private copy, logged."""
        shown = f"{folder}/{name}" if folder else name
        field = f"artifact:{shown}"
        if state.get(field):
            return None
        if wait := self.slots.wait(self.keys.state(SINK, run_id), f"retry:{field}"):
            return wait
        directory = private_dir("trainbus-mlflow-")
        try:
            try:
                if "file" in source:
                    opened = open_file(source["file"], self.settings.file_roots)
                    sha256 = None
                else:
                    opened = open_snapshot(source, self.settings.file_roots)
                    sha256 = source["sha256"]
                with opened:
                    copy = opened.copy_into(directory, sha256, name=name)
            except FileRefused as exc:
                missing = " (gone)" if isinstance(exc, FileMissing) else ""
                self.runs.dead_letter(f"artifact {shown} of run {run_id} not logged{missing}: {exc}", run_id=run_id)
                self.client.hset(self.keys.state(SINK, run_id), field, "refused")
                return None
            path = copy.rename(directory / name)
            with self._attempt(run_id, field) as attempt:
                self.api.log_artifact(mlflow_run, path, folder)
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        if attempt.error:
            self.runs.dead_letter(f"artifact {shown} of run {run_id} refused: {attempt.error}", run_id=run_id)
        elif not attempt.ok:
            return self._retry_wait(run_id, field)
        self.client.hset(self.keys.state(SINK, run_id), field, "ok" if attempt.ok else "refused")
        log.info("upload sink=mlflow run=%s kind=artifact outcome=ok path=%s", run_id, shown)
        return None

    def _terminate(self, run_id: str, mlflow_run: str, status: str, *, done: bool = True) -> float | None:
        """The MLflow run's status; ``done``: nothing of the run comes after it (else events that
        still arrive are logged to it, and its final sets it FINISHED)."""
        with self._attempt(run_id, "end") as attempt:
            self.api.set_terminated(mlflow_run, status)
        if attempt.error:
            self._block(run_id, f"run {run_id}: {attempt.error}")
        if not attempt.ok:
            return self._retry_wait(run_id, "end")
        pipe = self.client.pipeline()
        pipe.hset(self.keys.state(SINK, run_id), "status", status)
        if done:
            pipe.hset(self.keys.state(SINK, run_id), "final_done", 1)
            pipe.delete(self.keys.pending(SINK, run_id, "final"), self.keys.pending(SINK, run_id, "last"))
        pipe.execute()
        log.info("upload sink=mlflow run=%s kind=end outcome=ok status=%s", run_id, status)
        return None

    def _idle_wait(self, run_id: str, mlflow_run: str, state: dict[str, str]) -> float | None:
        """Nothing to send now: keep the run while its producer lives; a silent one was KILLED (a
        producer that was only cut off, and sends again, continues it)."""
        if self.client.exists(self.keys.alive(run_id)) or state.get("ended"):
            return 30.0
        if time.time() - float(state.get("last_event_ts") or 0) < SILENT_S:
            return 30.0
        if state.get("status") == "KILLED":
            self.runs.finish(run_id, KINDS)
            return None
        wait = self._terminate(run_id, mlflow_run, "KILLED", done=False)
        if wait is None:
            self.runs.finish(run_id, KINDS)  # a later event starts it again
        return wait

    # -- failures ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _attempt(self, run_id: str, kind: str) -> Iterator[Attempt]:
        """Around one call. A retryable failure backs the kind off; a credentials or permission
        refusal blocks the run (raising); any other refusal is left in ``attempt.error``."""
        result = Attempt()
        try:
            yield result
        except MlflowError as exc:
            result.status = exc.status
            if exc.status in (401, 403) or (exc.status is None and not exc.retryable):
                self.runs.counters.upload(SINK, kind, "failed")
                self._block(run_id, f"run {run_id}: {exc}")
            if not exc.retryable:
                result.error = str(exc)
                self.runs.counters.upload(SINK, kind, "failed")
                return
            delay = self.runs.failed_attempt(run_id, kind, exc)
            self.slots.retry_in(self.keys.state(SINK, run_id), f"retry:{kind}", delay)
            return
        result.ok = True
        self.runs.attempt_ok(run_id, kind)

    def _retry_wait(self, run_id: str, kind: str) -> float:
        return max(POLL_S, self.slots.wait(self.keys.state(SINK, run_id), f"retry:{kind}"))

    def _block(self, run_id: str, reason: str) -> None:
        log.error("upload sink=mlflow run=%s outcome=failed error=%r", run_id, reason)
        self.client.set(self.keys.blocked(SINK, run_id), reason)
        raise MlflowRefused(reason)


def metric_key(key: str) -> str:
    """A key as Ultralytics' MLflow callback writes it (no parentheses), in the characters MLflow takes."""
    return INVALID_KEY_CHARS.sub("_", key.replace("(", "").replace(")", ""))


def epoch_points(event: Event) -> dict[str, bytes]:
    """``step|key`` -> [value, ts ms] for one epoch event, as Ultralytics logs it: learning rates and
    train losses at ``train_epoch``, the validation's metrics at ``fit_epoch`` (its train losses are
    the train_epoch's; the final validation of best.pt has none)."""
    p = event.payload
    values: dict[str, Any] = dict(p.get("metrics") or {})
    if event.type == EventType.TRAIN_EPOCH:
        values.update(p.get("lr") or {})
    elif p.get("series_logged"):  # Lightning's: its points came as train_epoch events, by step
        values = {}
    elif p.get("final_eval"):
        values = {k: v for k, v in values.items() if not str(k).startswith("train/")}
    step = p["step"] if isinstance(p.get("step"), int) else p["epoch"]  # a framework's global step, else the epoch
    nulls = {n.removeprefix("metrics.").removeprefix("lr.") for n in event.nulls}
    ts = int(event.ts * 1000)
    points: dict[str, bytes] = {}
    for key, value in values.items():
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if number or (value is None and str(key) in nulls):  # null: NaN or infinity in training, NaN in MLflow
            points[f"{step}|{metric_key(str(key))}"] = orjson.dumps([value, ts])
    return points


def point(field: bytes, raw: bytes) -> tuple[str, float, int, int]:
    """(key, value, timestamp ms, step) of a pending field."""
    step, _, key = field.decode().partition("|")
    value, ts = orjson.loads(raw)
    return key, math.nan if value is None else float(value), int(ts), int(step)


def _field_order(field: bytes) -> tuple[int, bytes]:
    step, _, key = field.partition(b"|")
    return int(step), key
