"""A local HTTP server that speaks the Ultralytics Platform's training protocol, for tests and the demo.

    python -m workers.devstack.local_platform --port 8788 --api-key ul_... [--events-per-min 100]

What it serves (``PLATFORM.md``): ``POST /api/webhooks/training/metrics`` (every event;
``training_started`` with project/name creates a model, with modelId starts a new run of it,
404 for an unknown one), ``POST /api/webhooks/models/upload`` (a signed URL back to this
server), ``PUT /_upload/<token>`` (the bytes; no Authorization expected), ``GET
/api/models/<owner>/<project>`` (the project's models). It checks ``Authorization: Bearer``
and keeps the Platform's per-key sliding-window limits (events, uploads), answering 429 with
``Retry-After`` and ``X-RateLimit-Reset`` (ISO time). Faults and the request log come from
``workers/devstack/http_double.py``; its own control actions:

    POST /_control/cancel   {"modelId": "..."}   replies for that model carry cancelled: true
    POST /_control/limits   {"events": 100, "uploads": 10, "window": 60}
    POST /_control/put403   {"count": 1}         the next PUTs answer 403 (an expired URL)
    POST /_control/forget   {"modelId": "..."}   the model is gone (deleted in the Platform)
    GET  /_control/models   every model with its runs, epochs, checkpoints, completion
"""

from __future__ import annotations

import datetime
import hashlib
import re
import secrets
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import orjson

from workers.devstack.http_double import DoubleHandler, DoubleServer, Recorder, Reply, command_line

ROUTES = [
    ("POST", re.compile(r"^/api/webhooks/training/metrics$"), "metrics"),
    ("POST", re.compile(r"^/api/webhooks/models/upload$"), "upload_url"),
    ("PUT", re.compile(r"^/_upload/(?P<token>[a-f0-9]+)$"), "put"),
    ("GET", re.compile(r"^/api/models/(?P<owner>[^/]+)/(?P<project>[^/?]+)"), "models"),
]
BUCKET = {"metrics": "events", "models": "events", "upload_url": "uploads"}


@dataclass
class PlatformState:
    api_key: str | None
    limits: dict[str, float] = field(default_factory=lambda: {"events": 100, "uploads": 10, "window": 60.0})
    models: dict[str, dict[str, Any]] = field(default_factory=dict)  # modelId -> model
    uploads: dict[str, dict[str, Any]] = field(default_factory=dict)  # token -> staged upload
    cancelled: set[str] = field(default_factory=set)
    put403: int = 0
    windows: dict[str, deque] = field(default_factory=dict)  # "<key>|<bucket>" -> arrival times
    next_run: int = 1
    lock: threading.Lock = field(default_factory=threading.Lock)


class PlatformHandler(DoubleHandler):
    server: LocalPlatform

    def route(self, method: str, path: str) -> tuple[str, dict[str, str]] | None:
        for route_method, pattern, endpoint in ROUTES:
            match = pattern.match(path)
            if match and route_method == method:
                return endpoint, match.groupdict()
        return None

    def authorized(self, endpoint: str) -> bool:
        key = self.server.state.api_key
        return endpoint == "put" or key is None or self.headers.get("Authorization") == f"Bearer {key}"

    def unauthorized(self) -> Reply:
        return 401, {"error": "Invalid API key"}, {}

    def serve(self, endpoint: str, params: dict[str, str], record: dict[str, Any], body: bytes) -> Reply:
        state = self.server.state
        limited = self._limited(endpoint)
        if limited is not None:
            record["limited"] = True
            return limited
        if endpoint == "put":
            record["authorization"] = self.headers.get("Authorization")
            return self._put(params["token"], record, body)
        if endpoint == "models":
            with state.lock:
                models = [
                    {
                        "id": m["id"],
                        "model": m["slug"],
                        "name": m["slug"],
                        "environment": m["environment"],
                        "createdAt": m["createdAt"],
                    }
                    for m in state.models.values()
                    if m["project"] == f"{params['owner']}/{params['project']}"
                ]
            return 200, {"models": models, "region": "us"}, {}
        payload = orjson.loads(body)
        record["json"] = payload
        if endpoint == "upload_url":
            return self._upload_url(payload)
        return self._event(payload, record)

    def _event(self, p: dict[str, Any], record: dict[str, Any]) -> Reply:
        state = self.server.state
        event, data = p.get("event"), p.get("data") or {}
        record["event"] = event
        with state.lock:
            if event == "training_started":
                return self._started(p, data)
            model = state.models.get(p.get("modelId") or "")
            if model is None:
                return 404, {"error": "Model not found"}, {}
            run = model["runs"][-1]
            if event == "epoch_end":
                run["epochs"].append(data)
            elif event == "checkpoint_saved":
                staged = next((u for u in state.uploads.values() if u.get("gcsPath") == data.get("modelPath")), None)
                if staged is None or not staged.get("bytes") or data.get("runId") != staged["runId"]:
                    return 400, {"error": "no uploaded checkpoint at that path for this run"}, {}
                run["checkpoints"].append({**data, "sha256": staged["sha256"], "size": staged["size"]})
            elif event in ("training_complete", "training_failed"):
                run["end"] = {"event": event, **data}
            else:
                run.setdefault("other", []).append({"event": event, **data})
            return 200, self._reply(model, event), {}

    def _started(self, p: dict[str, Any], data: dict[str, Any]) -> Reply:
        state = self.server.state
        if p.get("modelId"):
            model = state.models.get(p["modelId"])
            if model is None:
                return 404, {"error": "Model not found"}, {}
        else:
            project, slug = p.get("project") or "", p.get("name") or "train"
            taken = {m["slug"] for m in state.models.values() if m["project"] == project}
            base, n = slug, 1
            while slug in taken:  # the Platform auto-increments a taken slug
                n += 1
                slug = f"{base}-{n}"
            model = {
                "id": secrets.token_hex(10),
                "project": project,
                "slug": slug,
                "environment": data.get("environment") or {},
                "createdAt": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                "runs": [],
            }
            state.models[model["id"]] = model
        model["runs"].append({"runId": state.next_run, "started": data, "epochs": [], "checkpoints": [], "end": None})
        state.next_run += 1
        return 200, self._reply(model, "training_started"), {}

    def _reply(self, model: dict[str, Any], event: str) -> dict[str, Any]:
        reply = {
            "received": True,
            "event": event,
            "modelId": model["id"],
            "runId": model["runs"][-1]["runId"],
            "modelSlug": model["slug"],
            "modelUrl": f"{self.server.url_for(self)}/{model['project']}/{model['slug']}",
        }
        if model["id"] in self.server.state.cancelled:
            reply.update(cancelled=True, action="training_terminated")
        return reply

    def _upload_url(self, p: dict[str, Any]) -> Reply:
        state = self.server.state
        with state.lock:
            model = state.models.get(p.get("modelId") or "")
            if model is None:
                return 404, {"error": "Model not found"}, {}
            token = secrets.token_hex(8)
            gcs = f"gs://local-platform/{model['project']}/{model['slug']}/{token}/{p.get('filename')}"
            state.uploads[token] = {"gcsPath": gcs, "runId": p.get("runId"), "modelId": model["id"]}
        return (
            200,
            {
                "uploadUrl": f"{self.server.url_for(self)}/_upload/{token}",
                "gcsPath": gcs,
                "uploadPath": token,
                "modelId": model["id"],
            },
            {},
        )

    def _put(self, token: str, record: dict[str, Any], body: bytes) -> Reply:
        state = self.server.state
        with state.lock:
            if state.put403 > 0:
                state.put403 -= 1
                return 403, {"error": "Request has expired"}, {}
            staged = state.uploads.get(token)
            if staged is None:
                return 404, {"error": "no such upload"}, {}
            staged.update(bytes=True, size=len(body), sha256=hashlib.sha256(body).hexdigest())
        record.update(size=len(body), sha256=staged["sha256"])
        return 200, {}, {}

    def _limited(self, endpoint: str) -> Reply | None:
        """The Platform's per-key sliding window: 429 with Retry-After and an ISO X-RateLimit-Reset."""
        bucket = BUCKET.get(endpoint)
        if bucket is None:
            return None
        state = self.server.state
        now = time.time()
        window = state.limits["window"]
        with state.lock:
            arrivals = state.windows.setdefault(f"{self.headers.get('Authorization')}|{bucket}", deque())
            while arrivals and arrivals[0] <= now - window:
                arrivals.popleft()
            if len(arrivals) >= state.limits[bucket]:
                wait = arrivals[0] + window - now
                reset = datetime.datetime.fromtimestamp(now + wait, datetime.timezone.utc).isoformat()
                return (
                    429,
                    {"error": "Rate limit exceeded"},
                    {"Retry-After": f"{max(1, round(wait))}", "X-RateLimit-Reset": reset.replace("+00:00", "Z")},
                )
            arrivals.append(now)
        return None

    def control(self, action: str, method: str, body: bytes) -> dict[str, Any] | None:
        state = self.server.state
        p = orjson.loads(body) if body else {}
        with state.lock:
            if action == "cancel":
                state.cancelled.add(p["modelId"])
            elif action == "limits":
                state.limits.update(p)
            elif action == "put403":
                state.put403 += int(p.get("count", 1))
            elif action == "forget":
                state.models.pop(p["modelId"], None)
            elif action == "models":
                return {"models": list(state.models.values())}
            else:
                return None
        return {"ok": True}


class LocalPlatform(DoubleServer):
    def __init__(self, port: int = 0, api_key: str | None = None, host: str = "127.0.0.1") -> None:
        super().__init__((host, port), PlatformHandler)
        self.recorder = Recorder()
        self.state = PlatformState(api_key=api_key)


def main(argv: list[str] | None = None) -> int:
    parser = command_line("python -m workers.devstack.local_platform", __doc__, "the Bearer key to require")
    parser.add_argument("--events-per-min", type=int, default=100, help="per-key event limit (default 100)")
    parser.add_argument("--uploads-per-min", type=int, default=10, help="per-key upload-URL limit (default 10)")
    parser.add_argument("--window", type=float, default=60.0, help="seconds of the limits' window (default 60)")
    args = parser.parse_args(argv)
    server = LocalPlatform(args.port, args.api_key, args.host)
    server.state.limits.update(events=args.events_per_min, uploads=args.uploads_per_min, window=args.window)
    return server.serve_until_interrupted("Platform")


if __name__ == "__main__":
    sys.exit(main())
