"""The Ultralytics Platform sink: HUB's live successor, fed from events instead of from training.

What a run becomes, as the Platform's own callbacks (``ultralytics/utils/callbacks/platform.py``)
send it, over ``workers/sinks/platform/client.py``:

  session     ``training_started`` once (args as strings, epochs, device, environment), which
              creates the model; its ``modelId``/``runId`` are stored before anything uses them.
              Registering is not idempotent: after an attempt whose answer was lost the
              project's models are looked up (by the run id in the environment) first. A
              resumed run (a later session) sends ``modelId``; a 404 then registers a new model.
  fit_epoch   ``epoch_end`` for every epoch, 0-based, with metrics, lr, fitness, system and
              ``modelInfo`` at epoch 0, the final validation's too; each once, none dropped
  checkpoint  the newest best checkpoint, at most one per TRAINBUS_RATE_CKPT: upload URL, PUT of
              the snapshot's bytes (no auth; a 403 asks for a new URL), ``checkpoint_saved``
  final       best.pt through the same flow, then ``training_complete`` with the results, last;
              a run that ended in an error without one sends ``training_failed``

Rate limits are per API key, shared by every run and worker (sliding windows in Redis:
events and uploads, ``TRAINBUS_PLATFORM_*_PER_MIN``); a 429 holds every request of the key
until its Retry-After / X-RateLimit-Reset. A 401 stops every run of the key (``trainbus
failed --requeue`` once fixed); 400/403/404 stop the run. A reply with ``cancelled: true``
(the user pressed stop in the Platform) becomes the run's stop order in Redis, which the
training process reads and turns into ``trainer.stop``.

State per run: ``state`` (model_id, run_id, model_url, registered_seq, registering, ended,
final_done, counters), ``pending:session`` / ``ckpt`` / ``final`` (newest wins, by seq),
``pending:epochs`` (epoch -> epoch_end data).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import time
from collections.abc import Iterator
from typing import Any

import orjson
import redis

from shared.backoff import compute_backoff
from shared.events import Event, EventType
from shared.keys import RUN_STATE_TTL_S, Keys
from shared.settings import WorkerSettings
from workers.sinks.files import FileRefused, open_snapshot
from workers.sinks.interface import SinkRefused
from workers.sinks.platform.client import PlatformClient, PlatformError
from workers.sinks.rate_limit import RateLimiter, WindowLimiter
from workers.sinks.run_state import Attempt, RunState, final_done, pending_counts

log = logging.getLogger("trainbus.platform")

SINK = "platform"
KINDS = ("session", "epochs", "console", "ckpt", "final")
FINAL_GAP_WAIT_S = 60.0  # after this, the final goes out even if an earlier seq never arrived
POLL_S = 0.5
PUT_TRIES = 3  # signed URLs that answer 403 (expired) before the upload counts as a failure
STOP_REASON = "the run was cancelled in the Ultralytics Platform"
# Refusals the caller handles: a signed URL that expired (ask for another), a resumed run's model gone (a new one).
HANDLED_BY_CALLER = frozenset({(403, "put"), (404, "register")})


class PlatformRefused(SinkRefused):
    """The Platform refused the run (or the key) in a way retrying cannot fix."""


class PlatformSink:
    name = SINK

    def __init__(
        self, client: redis.Redis, keys: Keys, settings: WorkerSettings, api: PlatformClient | None = None
    ) -> None:
        self.client = client
        self.keys = keys
        self.settings = settings
        target, key = settings.platform_target, settings.platform_api_key
        self.api = api or PlatformClient(target, key, settings.platform_timeout_s)
        self.key_id = key_fingerprint(settings.platform_api_key)
        self.runs = RunState(client, keys, SINK, settings.redis_min_replicas)
        self.slots = RateLimiter(client, settings.redis_min_replicas)
        self.window = WindowLimiter(client, settings.redis_min_replicas)

    @staticmethod
    def pending(client: redis.Redis, keys: Keys, run_id: str) -> dict[str, int]:
        return pending_counts(client, keys, SINK, run_id, queued=("epochs", "console"), slots=("ckpt", "final"))

    @staticmethod
    def delivered(client: redis.Redis, keys: Keys, run_id: str) -> bool:
        return final_done(client, keys, SINK, run_id)

    # -- dispatcher side -----------------------------------------------------------------

    def record(self, pipe: redis.client.Pipeline, event: Event) -> None:
        k, run, p = self.keys, event.run_id, event.payload
        self.runs.mark_seen(pipe, event)
        if event.type == EventType.SESSION:
            self.runs.set_if_newer(pipe, event, "session")
        elif event.type == EventType.FIT_EPOCH and isinstance(p.get("epoch"), int):
            pipe.hset(k.pending(SINK, run, "epochs"), str(p["epoch"]), orjson.dumps(epoch_end(p)))
        elif event.type == EventType.CHECKPOINT and p.get("is_best"):  # the Platform keeps one best.pt
            self.runs.set_if_newer(pipe, event, "ckpt")
        elif event.type == EventType.FINAL:
            self.runs.set_if_newer(pipe, event, "final")
        elif event.type == EventType.CONSOLE:
            pipe.hset(k.pending(SINK, run, "console"), str(p.get("chunk_id")), orjson.dumps(console_output(p)))
        elif event.type == EventType.RUN_END:
            pipe.hset(
                k.state(SINK, run), mapping={"ended": p.get("status") or "completed", "error": p.get("error") or ""}
            )

    # -- worker side -----------------------------------------------------------------------

    def drain(self, run_id: str) -> float | None:
        state_key = self.keys.state(SINK, run_id)
        state = {k.decode(): v.decode() for k, v in self.client.hgetall(state_key).items()}
        seq, session = self.client.hmget(self.keys.pending(SINK, run_id, "session"), "seq", "data")
        if state.get("final_done"):
            if session is None or int(seq) <= int(state.get("registered_seq", -1)):
                self.runs.finish(run_id, KINDS)
                return None
            # a later session: the run was resumed after it ended; it becomes a new run of its model
            self.client.hdel(state_key, "final_done", "final_artifact", "ended", "error")
            state = {k.decode(): v.decode() for k, v in self.client.hgetall(state_key).items()}
        refused = self.client.get(self._key_block)
        if refused:
            self._block(run_id, refused.decode())
        if session is None:
            return 1.0  # the session event is not recorded yet
        if not state.get("model_id") or int(state.get("registered_seq", -1)) < int(seq):
            wait = self._register(run_id, orjson.loads(session), int(seq), state)
            if wait is not None:
                return wait
            state = {k.decode(): v.decode() for k, v in self.client.hgetall(state_key).items()}
        model_id, platform_run = state["model_id"], state.get("run_id")
        for step in (self._epochs, self._console, self._checkpoint, self._final):
            wait = step(run_id, model_id, platform_run, state)
            if wait is not None:
                return wait
        if self.client.hexists(state_key, "final_done"):
            self.runs.finish(run_id, KINDS)
            return None
        return self._idle_wait(run_id, state)

    # -- registration ---------------------------------------------------------------------

    def _register(self, run_id: str, session: dict[str, Any], seq: int, state: dict[str, str]) -> float | None:
        """``training_started``: None once the run has a model and a Platform run, else seconds to wait."""
        project = self.settings.platform_project or session.get("project") or (session.get("args") or {}).get("project")
        if not project:
            self._block(
                run_id,
                f"run {run_id} has no Platform project: set TRAINBUS_PLATFORM_PROJECT=owner/slug on the worker "
                "or pass project= to the training",
            )
        project, name = project_and_name(str(project), str(session.get("name") or run_id))
        data = registration(session, run_id)
        state_key = self.keys.state(SINK, run_id)
        model_id = state.get("model_id")
        if not model_id and state.get("registering"):  # an earlier attempt got no answer: it may have created one
            if wait := self._wait(run_id, "lookup", "events"):
                return wait
            model_id = self._find_model(run_id, project)
        if wait := self._wait(run_id, "register", "events"):
            return wait
        if not model_id:
            self.client.hset(state_key, "registering", repr(time.time()))
        with self._attempt(run_id, "register") as attempt:
            attempt.reply = self.api.event(
                "training_started", data, model_id=model_id, project=None if model_id else project, name=name
            )
        resumed_but_gone = attempt.status == 404 or (attempt.reply or {}).get("cancelled")
        if model_id and resumed_but_gone:  # the resumed run's model is gone or ended: a new one, as Ultralytics does
            self.client.hdel(state_key, "model_id", "run_id")
            log.warning("upload sink=platform run=%s kind=register outcome=retry error='model gone; new model'", run_id)
            return 0.0
        if not attempt.ok:
            return self._retry_wait(run_id, "register")
        reply = attempt.reply or {}
        new_id = reply.get("modelId") or model_id
        if not new_id:
            self._block(run_id, f"run {run_id}: the Platform's training_started reply has no modelId")
        self.client.hset(
            state_key,
            mapping={
                "model_id": new_id,
                "run_id": reply.get("runId") or "",
                "model_url": reply.get("modelUrl") or "",
                "registered_seq": seq,
            },
        )
        self.client.hdel(state_key, "registering")
        self._control(run_id, reply)
        log.info(
            "upload sink=platform run=%s kind=register outcome=ok model=%s url=%s",
            run_id,
            new_id,
            reply.get("modelUrl"),
        )
        return None

    def _find_model(self, run_id: str, project: str) -> str | None:
        """The model an unanswered registration made, found by this run's id in its environment."""
        owner, _, slug = project.partition("/")
        if not slug:
            log.warning("run %s: %r has no owner; cannot look for a model a lost reply created", run_id, project)
            return None
        with self._attempt(run_id, "lookup") as attempt:
            models = self.api.models(owner, slug)
        if not attempt.ok:
            return None
        for model in models:
            if (model.get("environment") or {}).get("trainbusRunId") == run_id:
                log.info(
                    "upload sink=platform run=%s kind=lookup outcome=ok model=%s (reply had been lost)",
                    run_id,
                    model.get("id"),
                )
                return model.get("id")
        return None

    # -- epochs ---------------------------------------------------------------------------

    def _epochs(self, run_id: str, model_id: str, platform_run: str | None, state: dict[str, str]) -> float | None:
        """Every pending epoch, in order, one ``epoch_end`` each, within the key's event limit."""
        key = self.keys.pending(SINK, run_id, "epochs")
        pending = sorted(((int(e), raw) for e, raw in self.client.hgetall(key).items()), key=lambda x: x[0])
        for epoch, raw in pending:
            if wait := self._wait(run_id, "epoch", "events"):
                return wait
            data = {**orjson.loads(raw), **({"runId": _run_id(platform_run)} if platform_run else {})}
            with self._attempt(run_id, "epoch") as attempt:
                attempt.reply = self.api.event("epoch_end", data, model_id=model_id)
            if not attempt.ok:
                return self._retry_wait(run_id, "epoch")
            self.runs.remove_if_same(key, {str(epoch): raw})
            self.client.hincrby(self.keys.state(SINK, run_id), "epochs_sent", 1)
            self._control(run_id, attempt.reply)
        if pending:
            log.info("upload sink=platform run=%s kind=epochs outcome=ok epochs=%d", run_id, len(pending))
        return None

    def _console(self, run_id: str, model_id: str, platform_run: str | None, state: dict[str, str]) -> float | None:
        """The training's console lines, one ``console_output`` per chunk, each once, in order."""
        key = self.keys.pending(SINK, run_id, "console")
        for chunk, raw in sorted(self.client.hgetall(key).items(), key=lambda x: int(x[0])):
            if wait := self._wait(run_id, "console", "events"):
                return wait
            with self._attempt(run_id, "console") as attempt:
                attempt.reply = self.api.event("console_output", orjson.loads(raw), model_id=model_id)
            if not attempt.ok:
                return self._retry_wait(run_id, "console")
            self.runs.remove_if_same(key, {chunk.decode(): raw})
            self._control(run_id, attempt.reply)
        return None

    # -- checkpoints and the final --------------------------------------------------------

    def _checkpoint(self, run_id: str, model_id: str, platform_run: str | None, state: dict[str, str]) -> float | None:
        """The newest best checkpoint, at most one per TRAINBUS_RATE_CKPT seconds (latest wins)."""
        key = self.keys.pending(SINK, run_id, "ckpt")
        pending = self.client.hget(key, "data")
        if pending is None or self.client.hexists(self.keys.pending(SINK, run_id, "final"), "data"):
            return None  # the final's best.pt supersedes it: not held back by the checkpoint rate
        state_key = self.keys.state(SINK, run_id)
        if wait := self.slots.wait(state_key, "retry:ckpt") or self.slots.reserve(
            state_key, "ckpt", self.settings.rate_ckpt
        ):
            return wait
        payload = orjson.loads(pending)
        result = self._upload(run_id, "ckpt", payload, model_id, platform_run)
        if isinstance(result, float):
            self.slots.retry_in(state_key, "ckpt", 0.0)  # the slot was not used: free it for the retry
            return result
        if result is None:
            self.runs.remove_if_same(key, {"data": pending})
            return None
        self.runs.latest_sent(run_id, "ckpt", pending)
        log.info("upload sink=platform run=%s kind=ckpt outcome=ok epoch=%s", run_id, payload.get("epoch"))
        return None

    def _final(self, run_id: str, model_id: str, platform_run: str | None, state: dict[str, str]) -> float | None:
        """best.pt, then ``training_complete``: after every epoch and every earlier event; last."""
        key = self.keys.pending(SINK, run_id, "final")
        seq, pending, recorded_at = self.client.hmget(key, "seq", "data", "recorded_at")
        state_key = self.keys.state(SINK, run_id)
        if pending is None:
            if state.get("ended") and not self.client.hlen(self.keys.pending(SINK, run_id, "epochs")):
                return self._ended_without_final(run_id, model_id, platform_run, state)
            return None
        if self.client.hlen(self.keys.pending(SINK, run_id, "epochs")) or self.client.hlen(
            self.keys.pending(SINK, run_id, "console")
        ):
            return POLL_S
        waited = time.time() - float(recorded_at or time.time())
        if self.runs.recorded_below(run_id) < int(seq) and waited < FINAL_GAP_WAIT_S:
            return POLL_S
        payload = orjson.loads(pending)
        artifact = self.client.hget(state_key, "final_artifact")
        if artifact is None:
            result = self._upload(run_id, "final", payload, model_id, platform_run)
            if isinstance(result, float):
                return result
            artifact = orjson.dumps(result or {})
            self.client.hset(state_key, "final_artifact", artifact)  # the upload is not repeated
        if wait := self._wait(run_id, "complete", "events"):
            return wait
        data = training_complete(payload, orjson.loads(artifact), platform_run)
        with self._attempt(run_id, "complete") as attempt:
            attempt.reply = self.api.event("training_complete", data, model_id=model_id)
        if not attempt.ok:
            return self._retry_wait(run_id, "complete")
        self._done(run_id, "complete")
        return None

    def _ended_without_final(
        self, run_id: str, model_id: str, platform_run: str | None, state: dict[str, str]
    ) -> float | None:
        """The run ended with no final: ``training_failed`` for an error, else ``training_complete``."""
        if wait := self._wait(run_id, "end", "events"):
            return wait
        run = {"runId": _run_id(platform_run)} if platform_run else {}
        failed = state.get("ended") == "failed"
        event = "training_failed" if failed else "training_complete"
        data = {"error": state.get("error") or "failed", **run} if failed else {"results": {}, **run}
        with self._attempt(run_id, "end") as attempt:
            attempt.reply = self.api.event(event, data, model_id=model_id)
        if not attempt.ok:
            return self._retry_wait(run_id, "end")
        self._done(run_id, event)
        return None

    def _done(self, run_id: str, event: str) -> None:
        pipe = self.client.pipeline()
        if self.client.hexists(self.keys.pending(SINK, run_id, "ckpt"), "data"):
            pipe.hincrby(self.keys.state(SINK, run_id), "ckpt_superseded", 1)  # the final made it pointless
        pipe.hset(self.keys.state(SINK, run_id), "final_done", 1)
        pipe.delete(self.keys.pending(SINK, run_id, "ckpt"), self.keys.pending(SINK, run_id, "final"))
        pipe.execute()
        log.info("upload sink=platform run=%s kind=%s outcome=ok", run_id, event)

    def _upload(
        self, run_id: str, kind: str, payload: dict[str, Any], model_id: str, platform_run: str | None
    ) -> dict[str, Any] | float | None:
        """A snapshot through the three steps. The artifact (modelPath, modelSize) when done, a float
        (seconds) to try again, None when the file cannot be used (the reason is dead-lettered)."""
        ck = payload.get("checkpoint") or {}
        try:
            with open_snapshot(ck, self.settings.file_roots) as file:
                return self._put_flow(run_id, kind, file, ck["sha256"], model_id, platform_run)
        except FileRefused as exc:
            self.runs.checkpoint_refused(run_id, f"{kind} checkpoint", payload, exc)
            return None

    def _put_flow(
        self, run_id: str, kind: str, file: Any, sha256: str, model_id: str, platform_run: str | None
    ) -> dict[str, Any] | float:
        for _ in range(PUT_TRIES):
            if wait := self._wait(run_id, kind, "uploads"):
                return wait
            with self._attempt(run_id, kind) as attempt:
                target = self.api.upload_url("best.pt", model_id, _run_id(platform_run) if platform_run else None)
            if not attempt.ok:
                return self._retry_wait(run_id, kind)
            with self._attempt(run_id, "put") as attempt:
                self.api.put(target["uploadUrl"], file, sha256)
            if attempt.status == 403:  # the signed URL expired or was refused: ask for a new one
                log.warning("upload sink=platform run=%s kind=%s outcome=retry error='PUT 403: new URL'", run_id, kind)
                continue
            if not attempt.ok:
                return self._retry_wait(run_id, "put")
            break
        else:
            self.slots.retry_in(self.keys.state(SINK, run_id), f"retry:{kind}", compute_backoff(0, base=5.0, cap=60.0))
            return self._retry_wait(run_id, kind)
        if platform_run:  # the Platform promotes an uploaded checkpoint only for its runId
            if wait := self._wait(run_id, kind, "events"):
                return wait
            saved = {
                "modelPath": target.get("gcsPath"),
                "runId": _run_id(platform_run),
                "uploadPath": target.get("uploadPath"),
            }
            with self._attempt(run_id, kind) as attempt:
                attempt.reply = self.api.event("checkpoint_saved", saved, model_id=model_id)
            if not attempt.ok:
                return self._retry_wait(run_id, kind)
            self._control(run_id, attempt.reply)
        return {"modelPath": target.get("gcsPath"), "modelSize": file.size}

    # -- limits, failures, stop orders ----------------------------------------------------

    @property
    def _key_block(self) -> str:
        """Set when the Platform refused the API key: every run of the key is blocked."""
        return self.keys.blocked(SINK, f"key-{self.key_id}")

    def _wait(self, run_id: str, kind: str, bucket: str) -> float:
        """0 when a request of ``kind`` may go now (its slot in the key's window is taken), else seconds."""
        if wait := self.slots.wait(self.keys.state(SINK, run_id), f"retry:{kind}"):
            return wait
        limit = self.settings.platform_events_per_min if bucket == "events" else self.settings.platform_uploads_per_min
        wait = self.window.reserve(self._window_key(bucket), limit, self.settings.platform_window_s)
        if wait:
            self.runs.counters.rate_limited(SINK)
        return wait

    def _window_key(self, bucket: str) -> str:
        return f"{self.keys.namespace}:{SINK}:key-{self.key_id}:{bucket}"

    def _retry_wait(self, run_id: str, kind: str) -> float:
        return max(POLL_S, self.slots.wait(self.keys.state(SINK, run_id), f"retry:{kind}"))

    @contextlib.contextmanager
    def _attempt(self, run_id: str, kind: str) -> Iterator[Attempt]:
        """Around one request. A retryable failure backs the kind off (a 429 holds the whole key);
        401 blocks the key, other 4xx the run (raising), but HANDLED_BY_CALLER."""
        state_key = self.keys.state(SINK, run_id)
        result = Attempt()
        try:
            yield result
        except PlatformError as exc:
            result.status = exc.status
            if exc.status == 401:
                self.client.set(self._key_block, f"{exc}", ex=RUN_STATE_TTL_S)
                self._block(run_id, str(exc))
            if not exc.retryable and (exc.status, kind) not in HANDLED_BY_CALLER:
                self.runs.counters.upload(SINK, kind, "failed")
                self._block(run_id, f"run {run_id}: {exc}")
            if not exc.retryable:
                return
            delay = self.runs.failed_attempt(run_id, kind, exc, wait=exc.retry_after)
            self.slots.retry_in(state_key, f"retry:{kind}", delay)
            if exc.retry_after:  # the Platform's limits are per key: every run of the key waits
                for bucket in ("events", "uploads"):
                    self.window.hold(self._window_key(bucket), exc.retry_after)
            return
        result.ok = True
        self.runs.attempt_ok(run_id, kind)

    def _block(self, run_id: str, reason: str) -> None:
        log.error("upload sink=platform run=%s outcome=failed error=%r", run_id, reason)
        self.client.set(self.keys.blocked(SINK, run_id), reason)
        raise PlatformRefused(reason)

    def _control(self, run_id: str, reply: dict[str, Any] | None) -> None:
        """A reply saying the user cancelled the run in the Platform: the run's stop order, in Redis."""
        if (
            reply
            and reply.get("cancelled")
            and self.client.set(self.keys.stop(run_id), STOP_REASON, nx=True, ex=RUN_STATE_TTL_S)
        ):
            log.warning("run %s: %s; the training process is told to stop", run_id, STOP_REASON)

    def _idle_wait(self, run_id: str, state: dict[str, str]) -> float | None:
        """Nothing to send now: keep the run while its producer lives (or events may come)."""
        if self.client.exists(self.keys.alive(run_id)) or state.get("ended"):
            return 30.0
        last = float(state.get("last_event_ts") or 0)
        if time.time() - last < 300:
            return 30.0
        self.runs.finish(run_id, KINDS)  # the producer went silent; a later event starts it again
        return None


def key_fingerprint(api_key: str | None) -> str:
    """Names a key in Redis without holding it."""
    return hashlib.sha256((api_key or "").encode()).hexdigest()[:16]


def slugify(text: str) -> str:
    """As Ultralytics: 'My Project 1' -> 'my-project-1'."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9\s-]", "", text.lower()).replace(" ", "-")).strip("-")[:128]


def project_and_name(project: str, name: str) -> tuple[str, str]:
    """``owner/slug`` or a bare slug, and the run's name, slugified as Ultralytics does."""
    owner, _, rest = project.partition("/")
    project = f"{owner}/{slugify(rest.replace('/', '-'))}" if rest else slugify(project)
    return project, slugify(name) or "train"


def registration(session: dict[str, Any], run_id: str) -> dict[str, Any]:
    """``training_started`` data: what Ultralytics sends, plus the run id to find the model by."""
    args = session.get("args") or {}
    return {
        "trainArgs": {str(k): str(v) for k, v in args.items()},
        "epochs": session.get("epochs", args.get("epochs")),
        "device": str(session.get("device") or args.get("device") or ""),
        "environment": {**(session.get("environment") or {}), "trainbusRunId": run_id},
        "system": session.get("system"),
    }


def epoch_end(p: dict[str, Any]) -> dict[str, Any]:
    """``epoch_end`` data from a fit_epoch payload, as Ultralytics builds it."""
    metrics = dict(p.get("metrics") or {})
    if p.get("lr") is not None:
        metrics["lr"] = p["lr"]
    data: dict[str, Any] = {
        "epoch": p["epoch"],
        "metrics": metrics,
        "system": p.get("system"),
        "fitness": p.get("fitness"),
        "best_fitness": p.get("best_fitness"),
    }
    info = p.get("model_info")
    if info and not p.get("final_eval"):
        data["modelInfo"] = {
            "parameters": info.get("model/parameters", 0),
            "gflops": info.get("model/GFLOPs", 0),
            "speedMs": info.get("model/speed_PyTorch(ms)", 0),
        }
    return data


def console_output(p: dict[str, Any]) -> dict[str, Any]:
    return {
        "chunkId": p.get("chunk_id"),
        "content": p.get("content"),
        "lineCount": p.get("line_count"),
        "progress": p.get("progress") or {},
    }


def training_complete(final: dict[str, Any], artifact: dict[str, Any], platform_run: str | None) -> dict[str, Any]:
    """``training_complete`` data from the final event (its ``summary``, from the Ultralytics adapter)."""
    summary = final.get("summary") or {}
    results: dict[str, Any] = {
        "metrics": summary.get("metrics") or final.get("metrics") or {},
        "bestEpoch": summary.get("best_epoch", final.get("epoch")),
        "bestFitness": summary.get("best_fitness"),
    }
    for field, name in (("calibration", "calibration"), ("validation", "validation")):
        if summary.get(field):
            results[name] = summary[field]
    results.update(artifact)
    data: dict[str, Any] = {
        "results": results,
        "classNames": summary.get("class_names"),
        "plots": summary.get("plots") or [],
    }
    if platform_run:
        data["runId"] = _run_id(platform_run)
    return data


def _run_id(value: str) -> int | str:
    """The Platform's runId is an integer; Redis gives it back as text."""
    return int(value) if value.isdigit() else value
