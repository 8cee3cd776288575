"""The HUB sink: a run's events become metrics, checkpoint, heartbeat and final uploads.

Recorded per run (dispatcher):
  state hash        session args, model_id, agent_id, ended, final_done, counters, next:<kind>
  pending:metrics   epoch -> metrics JSON (a later value for an epoch replaces the earlier)
  pending:ckpt      the newest checkpoint not yet uploaded (latest wins; replaced ones counted)
  pending:final     the final checkpoint and map

Drained (worker, holding the run's lock), in this order: model id, heartbeat, metrics
(every pending epoch in one request), checkpoint, final. The final waits until no metrics
are pending and every earlier event was recorded; after it nothing of the run is sent.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import redis

from shared.events import Event, EventType
from shared.keys import Keys
from shared.settings import WorkerSettings
from workers.sinks.files import FileRefused, open_snapshot
from workers.sinks.hub.client import HubClient, HubError
from workers.sinks.interface import SinkRefused
from workers.sinks.rate_limit import RateLimiter
from workers.sinks.run_state import Attempt, RunState, confirm, final_done, pending_counts

log = logging.getLogger("trainbus.hub")

SINK = "hub"
KINDS = ("metrics", "metrics_ts", "ckpt", "final")
FINAL_GAP_WAIT_S = 60.0  # after this, a final goes out even if an earlier seq never arrived
FINAL_RETRY_S = 0.5


class HubUploadFailed(SinkRefused):
    """HUB refused a request in a way retrying cannot fix; the run is blocked until requeued."""


class HubSink:
    name = SINK

    def __init__(self, client: redis.Redis, keys: Keys, settings: WorkerSettings, hub: HubClient | None = None) -> None:
        self.client = client
        self.keys = keys
        self.settings = settings
        self.hub = hub or HubClient(settings.hub_api_url, settings.hub_api_key, settings.hub_timeout_s)
        self.runs = RunState(client, keys, SINK, settings.redis_min_replicas)
        self.limits = RateLimiter(client, settings.redis_min_replicas)

    @staticmethod
    def pending(client: redis.Redis, keys: Keys, run_id: str) -> dict[str, int]:
        return pending_counts(client, keys, SINK, run_id, queued=("metrics",), slots=("ckpt", "final"))

    @staticmethod
    def delivered(client: redis.Redis, keys: Keys, run_id: str) -> bool:
        return final_done(client, keys, SINK, run_id)

    # -- dispatcher side -----------------------------------------------------------------

    def record(self, pipe: redis.client.Pipeline, event: Event) -> None:
        k, run = self.keys, event.run_id
        state = k.state(SINK, run)
        self.runs.mark_seen(pipe, event)
        p = event.payload
        if event.type == EventType.SESSION:
            pipe.hset(state, "session", orjson.dumps(p))
            if p.get("hub_model_id"):
                pipe.hsetnx(state, "model_id", p["hub_model_id"])
        elif event.type == EventType.FIT_EPOCH and isinstance(p.get("epoch"), int) and not p.get("final_eval"):
            metrics = {**(p.get("metrics") or {}), **(p.get("model_info") or {})}
            pipe.hset(k.pending(SINK, run, "metrics"), str(p["epoch"]), orjson.dumps(metrics))
            pipe.hset(k.pending(SINK, run, "metrics_ts"), str(p["epoch"]), repr(event.ts))
        elif event.type in (EventType.CHECKPOINT, EventType.FINAL):
            self.runs.set_if_newer(pipe, event, "final" if event.type == EventType.FINAL else "ckpt")
        elif event.type == EventType.RUN_END:
            pipe.hset(state, "ended", p.get("status") or "completed")

    # -- worker side -----------------------------------------------------------------------

    def drain(self, run_id: str) -> float | None:
        state_key = self.keys.state(SINK, run_id)
        state = {k.decode(): v for k, v in self.client.hgetall(state_key).items()}
        if state.get("final_done"):
            self.runs.finish(run_id, KINDS)
            return None
        model_id = state["model_id"].decode() if state.get("model_id") else None
        if model_id is None:
            if not state.get("session"):
                return 1.0  # the session event is not recorded yet
            model_id = self._create_model(run_id, orjson.loads(state["session"]))
            if model_id is None:
                return self.limits.wait(state_key, "create")
        waits = [
            self._heartbeat(run_id, model_id, state),
            self._metrics(run_id, model_id),
            self._checkpoint(run_id, model_id),
            self._final(run_id, model_id),
        ]
        pending = [w for w in waits if w is not None]
        if not pending or self.client.hexists(state_key, "final_done"):  # the final went out just now
            self.runs.finish(run_id, KINDS)
            return None
        return max(0.0, min(pending))

    def _create_model(self, run_id: str, session: dict[str, Any]) -> str | None:
        """No model id came with the run: create one from its args, as the HUB session did.

        HUB's create is not idempotent and its protocol has no way to find a model by run.
        An attempt whose outcome is unknown (no answer, or a worker that died in between)
        is therefore said out loud before the next one: HUB may hold an extra model.
        """
        state_key = self.keys.state(SINK, run_id)
        if self.limits.wait(state_key, "create"):
            return None
        if self.client.hexists(state_key, "create_unanswered"):
            self.runs.dead_letter(
                f"run {run_id}: an earlier model creation got no answer (timeout, reset, or a worker that died); "
                "HUB may hold an extra model for this run, unused by trainbus",
                run_id=run_id,
            )
        self.client.hset(state_key, "create_unanswered", repr(time.time()))
        with self._attempt(run_id, "create") as attempt:
            model_id = self.hub.create_model(model_payload(session))
        if not attempt.ok:
            if self.client.hget(state_key, "create_http_status"):  # HUB answered: nothing was created
                self.client.hdel(state_key, "create_unanswered", "create_http_status")
            return None
        pipe = self.client.pipeline
        confirm(lambda: pipe().hdel(state_key, "create_unanswered").hset(state_key, "model_id", model_id).execute())
        log.info("upload sink=hub run=%s kind=create outcome=ok model=%s", run_id, model_id)
        return model_id

    def _heartbeat(self, run_id: str, model_id: str, state: dict[str, bytes]) -> float | None:
        """Every rate_heartbeat seconds while the producer is alive and the run not ended."""
        if state.get("ended") or not self.client.exists(self.keys.alive(run_id)):
            return None
        state_key = self.keys.state(SINK, run_id)
        wait = self.limits.reserve(state_key, "heartbeat", self.settings.rate_heartbeat)
        if wait:
            return wait
        agent = state.get("agent_id")
        with self._attempt(run_id, "heartbeat") as attempt:
            agent_id = self.hub.heartbeat(model_id, agent.decode() if agent else None)
        if attempt.ok and agent_id:
            self.client.hset(state_key, "agent_id", agent_id)
        return self.limits.wait(state_key, "heartbeat")

    def _metrics(self, run_id: str, model_id: str) -> float | None:
        """All pending epochs in one request, at most one request per rate_metrics seconds."""
        key = self.keys.pending(SINK, run_id, "metrics")
        pending = {f.decode(): v for f, v in self.client.hgetall(key).items()}
        if not pending:
            return None
        state_key = self.keys.state(SINK, run_id)
        wait = self.limits.reserve(state_key, "metrics", self.settings.rate_metrics)
        if wait:
            return wait
        epochs = {int(e): orjson.loads(v) for e, v in pending.items()}
        with self._attempt(run_id, "metrics") as attempt:
            self.hub.upload_metrics(model_id, epochs)
        if not attempt.ok:  # everything stays pending and goes out with the next request
            return self.limits.wait(state_key, "metrics")
        self.runs.remove_if_same(key, pending)  # a newer value that came meanwhile stays pending
        ts_key = self.keys.pending(SINK, run_id, "metrics_ts")
        for ts in self.client.hmget(ts_key, list(pending)):
            if ts is not None:
                self.runs.counters.latency(SINK, "metrics", time.time() - float(ts))
        self.client.hdel(ts_key, *pending)
        pipe = self.client.pipeline(transaction=False)
        pipe.hincrby(state_key, "metrics_requests", 1)
        pipe.hincrby(state_key, "metrics_epochs", len(epochs))
        pipe.execute()
        log.info("upload sink=hub run=%s kind=metrics outcome=ok epochs=%d", run_id, len(epochs))
        return self.limits.wait(state_key, "metrics") if self.client.hlen(key) else None

    def _checkpoint(self, run_id: str, model_id: str) -> float | None:
        """The newest pending checkpoint, at most one upload per rate_ckpt seconds."""
        key = self.keys.pending(SINK, run_id, "ckpt")
        pending = self.client.hmget(key, "data")[0]
        if pending is None:
            return None
        state_key = self.keys.state(SINK, run_id)
        wait = self.limits.reserve(state_key, "ckpt", self.settings.rate_ckpt)
        if wait:
            return wait
        payload = orjson.loads(pending)
        if not _snapshot_exists(payload):  # the producer pruned it: a newer one replaced it
            if self.runs.remove_if_same(key, {"data": pending}):  # else the newer one counted it already
                self.client.hincrby(state_key, "ckpt_superseded", 1)
            return None
        uploaded = self._upload_file(
            run_id, "ckpt", payload, model_id, epoch=payload["epoch"], is_best=bool(payload.get("is_best"))
        )
        if uploaded is None:
            return self.limits.wait(state_key, "ckpt")
        if not uploaded:
            self.runs.remove_if_same(key, {"data": pending})
            return None
        self._observe_latency(key, "ckpt")
        self.runs.latest_sent(run_id, "ckpt", pending)
        log.info("upload sink=hub run=%s kind=ckpt outcome=ok epoch=%s", run_id, payload["epoch"])
        return None

    def _final(self, run_id: str, model_id: str) -> float | None:
        """Not rate limited, but after every pending metric and every earlier event."""
        key = self.keys.pending(SINK, run_id, "final")
        seq, pending, recorded_at = self.client.hmget(key, "seq", "data", "recorded_at")
        if pending is None:
            return None
        state_key = self.keys.state(SINK, run_id)
        if self.client.hlen(self.keys.pending(SINK, run_id, "metrics")):
            return self.limits.wait(state_key, "metrics") or FINAL_RETRY_S
        now = time.time()
        waited = now - float(recorded_at or now)
        if self.runs.recorded_below(run_id) < int(seq) and waited < FINAL_GAP_WAIT_S:
            return FINAL_RETRY_S
        wait = self.limits.wait(state_key, "final")
        if wait:
            return wait
        payload = orjson.loads(pending)
        uploaded = self._upload_file(
            run_id, "final", payload, model_id, epoch=payload["epoch"], final=True, map50_95=payload.get("map50_95")
        )
        if uploaded is None:
            return self.limits.wait(state_key, "final")
        if uploaded:
            log.info("upload sink=hub run=%s kind=final outcome=ok epoch=%s", run_id, payload["epoch"])
            self._observe_latency(key, "final")
        ckpt_key = self.keys.pending(SINK, run_id, "ckpt")
        pipe = self.client.pipeline(transaction=False)
        if self.client.hexists(ckpt_key, "data"):
            pipe.hincrby(state_key, "ckpt_superseded", 1)  # the final made it pointless
        pipe.hset(state_key, mapping={"final_done": 1, "ended": "completed"})
        pipe.hdel(ckpt_key, "data")
        pipe.hdel(key, "data")
        pipe.execute()
        return None

    def _observe_latency(self, pending_key: str, kind: str) -> None:
        ts = self.client.hget(pending_key, "ts")
        if ts:
            self.runs.counters.latency(SINK, kind, time.time() - float(ts))

    def _upload_file(
        self, run_id: str, kind: str, payload: dict[str, Any], model_id: str, **fields: Any
    ) -> bool | None:
        """Upload the event's snapshot: True when sent, False when it cannot be used (the reason
        is dead-lettered), None after a retryable failure. The file is opened once, below the
        roots; its sha256 is checked on that descriptor, and the bytes sent are hashed again."""
        ck = payload.get("checkpoint") or {}
        try:
            with open_snapshot(ck, self.settings.file_roots) as file, self._attempt(run_id, kind) as attempt:
                self.hub.upload_checkpoint(model_id, file, ck["sha256"], **fields)
        except FileRefused as exc:
            self.runs.checkpoint_refused(run_id, "checkpoint", payload, exc)
            return False
        return True if attempt.ok else None

    @contextlib.contextmanager
    def _attempt(self, run_id: str, kind: str) -> Iterator[Attempt]:
        """Around one HUB request: ``attempt.ok`` says whether it went through. A retryable failure
        moves the kind's next slot back (backoff, Retry-After); any other blocks the run and raises."""
        state_key = self.keys.state(SINK, run_id)
        attempt = Attempt()
        try:
            yield attempt
        except HubError as exc:
            if not exc.retryable:
                reason = f"run {run_id}: {exc}"
                log.error("upload sink=hub run=%s kind=%s outcome=failed error=%r", run_id, kind, str(exc))
                self.runs.counters.upload(SINK, kind, "failed")
                self.client.set(self.keys.blocked(SINK, run_id), reason)
                raise HubUploadFailed(reason) from None
            if exc.status is not None and kind == "create":
                self.client.hset(state_key, "create_http_status", exc.status)
            # The server said when (429 Retry-After): then, not later; else back off exponentially.
            delay = self.runs.failed_attempt(run_id, kind, exc, wait=exc.retry_after)
            if kind in RETRY_SOONER:  # a failed upload is not an upload: retry before the next slot
                self.limits.retry_in(state_key, kind, delay)
            else:
                self.limits.push_back(state_key, kind, delay)
            if exc.retry_after:  # the server's wait holds for every request to that endpoint
                for other in SAME_ENDPOINT.get(kind, ()):
                    self.limits.push_back(state_key, other, delay)
            return
        attempt.ok = True
        self.runs.attempt_ok(run_id, kind)


RETRY_SOONER = frozenset({"ckpt"})
SAME_ENDPOINT = {"ckpt": ("final",), "final": ("ckpt",)}  # both POST .../upload


def _snapshot_exists(payload: dict[str, Any]) -> bool:
    """False only for a snapshot that was made and is gone (pruned as superseded)."""
    path = (payload.get("checkpoint") or {}).get("path")
    return path is None or Path(path).exists()


def model_payload(session: dict[str, Any]) -> dict[str, Any]:
    """What the Ultralytics HUB session sent to create a model, from the run's args."""
    args = session.get("args") or {}
    filename = str(args.get("model") or "model")
    name = filename.rsplit("/", 1)[-1]
    payload: dict[str, Any] = {
        "config": {
            "batchSize": args.get("batch", -1),
            "epochs": args.get("epochs", 300),
            "imageSize": args.get("imgsz", 640),
            "patience": args.get("patience", 100),
            "device": str(args.get("device", "")),
            "cache": str(args.get("cache", "ram")),
        },
        "dataset": {"name": args.get("data")},
        "lineage": {"architecture": {"name": name.replace(".pt", "").replace(".yaml", "")}, "parent": {}},
        "meta": {"name": session.get("name") or name},
    }
    if name.endswith(".pt"):
        payload["lineage"]["parent"]["name"] = name
    return payload
