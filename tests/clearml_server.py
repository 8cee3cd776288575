"""A ClearML server for tests: the subset of the API the SDK uses for a worker's run.

    python -m tests.clearml_server            # prints "clearml test server on http://127.0.0.1:PORT"

API calls are ``<method> /v2.x/<service>.<action>`` with a JSON body and the envelope
``{"meta": {...}, "data": {...}}``; ``auth.login`` takes Basic auth and returns a JWT.
It keeps projects, tasks (hyperparameters, tags, status, models, artifacts) and models,
records every event of ``events.add_batch`` (JSON lines) and every file uploaded to the
files host (multipart ``POST /``, same port). Control endpoints:

    GET  /_control/state    {"tasks": {...}, "models": {...}, "events": [...], "files": [...], "calls": [...]}
    POST /_control/faults   {"down": true} answers 503 to everything / {"hang": 10} / {"down": false}
                            {"hang": 6, "endpoint": "tasks.create"}: only that call hangs
"""

from __future__ import annotations

import base64
import re
import socket
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
import orjson

ACCESS_KEY, SECRET_KEY = "test-access-key", "test-secret-key-for-the-clearml-test-server"
API = re.compile(r"^/(?:v[0-9.]+/)?(?P<endpoint>[a-z_]+\.[a-z_]+)")


class State:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.projects: dict[str, dict] = {}
        self.tasks: dict[str, dict] = {}
        self.models: dict[str, dict] = {}
        self.events: list[dict] = []
        self.files: list[dict] = []
        self.calls: list[str] = []
        self.down = False
        self.hang = 0.0
        self.hang_endpoint: str | None = None


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: ClearmlTestServer

    def setup(self) -> None:
        super().setup()
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_PUT(self) -> None:
        self._handle()

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        state = self.server.state
        if self.path.startswith("/_control/"):
            return self._control(body)
        match = API.match(self.path)
        if state.hang and state.hang_endpoint in (None, match and match["endpoint"]):
            time.sleep(state.hang)
        if state.down:
            return self._send(503, {"meta": {"result_code": 503, "result_msg": "down for a test"}, "data": {}})
        if self.command in ("POST", "PUT") and not match:
            return self._upload(body)
        if not match:
            return self._send(404, {"meta": {"result_code": 404, "result_msg": "not found"}, "data": {}})
        endpoint = match["endpoint"]
        with state.lock:
            state.calls.append(endpoint)
        if endpoint == "auth.login":
            return self._reply(endpoint, self._login())
        params = _json(body) if endpoint != "events.add_batch" else body
        with state.lock:
            data = self.server.api(endpoint, params)
        return self._reply(endpoint, data)

    def _login(self) -> dict[str, Any]:
        expected = base64.b64encode(f"{ACCESS_KEY}:{SECRET_KEY}".encode()).decode()
        if self.headers.get("Authorization") != f"Basic {expected}":
            return {"_status": 401}
        now = int(time.time())
        token = jwt.encode(
            {
                "iat": now,
                "exp": now + 86400,
                "identity": {"user": "u", "company": "c", "role": "user", "user_name": "test"},
                "env": "test",
            },
            SECRET_KEY,
            algorithm="HS256",
        )
        return {"token": token}

    def _upload(self, body: bytes) -> None:
        with self.server.state.lock:
            self.server.state.files.append({"path": self.path, "bytes": len(body)})
        self._send(200, {})

    def _control(self, body: bytes) -> None:
        state = self.server.state
        with state.lock:
            if self.path == "/_control/state":
                return self._send(
                    200,
                    {
                        "tasks": state.tasks,
                        "models": state.models,
                        "events": state.events,
                        "files": state.files,
                        "calls": state.calls,
                    },
                )
            faults = _json(body)
            state.down = faults.get("down", state.down)
            state.hang = faults.get("hang", state.hang)
            state.hang_endpoint = faults.get("endpoint", state.hang_endpoint)
        return self._send(200, {"ok": True})

    def _reply(self, endpoint: str, data: dict[str, Any]) -> None:
        status = data.pop("_status", 200)
        meta = {
            "id": uuid.uuid4().hex,
            "trx": uuid.uuid4().hex,
            "result_code": status,
            "result_subcode": 0,
            "result_msg": "OK" if status == 200 else "error",
            "error_stack": "",
            "endpoint": {"name": endpoint, "requested_version": "2.30", "actual_version": "2.30"},
        }
        self._send(status, {"meta": meta, "data": data if status == 200 else {}})

    def _send(self, status: int, payload: dict[str, Any]) -> None:
        data = orjson.dumps(payload)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class ClearmlTestServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, port: int = 0) -> None:
        super().__init__(("127.0.0.1", port), Handler)
        self.state = State()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def api(self, endpoint: str, p: Any) -> dict[str, Any]:
        """One API call on the state (the lock is held)."""
        s = self.state
        service, action = endpoint.split(".")
        if endpoint == "events.add_batch":
            for line in p.splitlines():
                if line.strip():
                    s.events.append(orjson.loads(line))
            return {"added": len(p.splitlines()), "errors": 0}
        if service == "projects":
            return self._projects(action, p)
        if service == "tasks":
            return self._tasks(action, p)
        if service == "models":
            return self._models(action, p)
        return {}

    def _projects(self, action: str, p: dict) -> dict[str, Any]:
        s = self.state
        if action == "create":
            pid = uuid.uuid4().hex
            s.projects[pid] = {"id": pid, "name": p["name"]}
            return {"id": pid}
        if action == "get_all":
            name = (p.get("name") or "").strip("^$")
            return {"projects": [pr for pr in s.projects.values() if not name or pr["name"] == name]}
        return {}

    def _tasks(self, action: str, p: dict) -> dict[str, Any]:
        s = self.state
        if action == "create":
            tid = uuid.uuid4().hex
            s.tasks[tid] = {
                "id": tid,
                "status": "created",
                "tags": [],
                "system_tags": [],
                "hyperparams": {},
                "configuration": {},
                "execution": {"artifacts": []},
                "models": {"input": [], "output": []},
                "last_iteration": 0,
                "output": {},
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                **{k: v for k, v in p.items() if k != "method"},
            }
            s.tasks[tid]["project_name"] = s.projects.get(p.get("project"), {}).get("name")
            return {"id": tid}
        if action == "get_all":
            ids = p.get("id") or []
            ids = [ids] if isinstance(ids, str) else ids
            return {"tasks": [t for t in s.tasks.values() if not ids or t["id"] in ids]}
        task = s.tasks.get(str(p.get("task") or p.get("id") or ""))
        if action == "get_by_id":
            return {"task": task} if task else {"_status": 400}
        if task is None:
            return {"updated": 0}
        if action in ("edit", "update"):
            task.update({k: v for k, v in p.items() if k not in ("task", "method", "force")})
        elif action == "edit_hyper_params":
            for hp in p.get("hyperparams", []):
                task["hyperparams"].setdefault(hp["section"], {})[hp["name"]] = hp
        elif action == "edit_configuration":
            for conf in p.get("configuration", []):
                task["configuration"][conf["name"]] = conf
        elif action == "add_or_update_artifacts":
            task["execution"]["artifacts"] += p.get("artifacts", [])
        elif action == "add_or_update_model":
            task["models"].setdefault(p.get("type", "output"), []).append({"name": p.get("name"), "model": p["model"]})
        elif action in ("started", "completed", "failed", "stopped", "close", "reset", "dequeue"):
            task["status"] = {"started": "in_progress", "close": "closed"}.get(action, action)
            task["status_reason"] = p.get("status_reason")
        elif action == "add_tags" or action == "edit_tags":
            task["tags"] = sorted(set(task["tags"]) | set(p.get("tags") or []))
        return {"updated": 1, "fields": {}}

    def _models(self, action: str, p: dict) -> dict[str, Any]:
        s = self.state
        if action == "create":
            mid = uuid.uuid4().hex
            s.models[mid] = {"id": mid, **{k: v for k, v in p.items() if k != "method"}}
            return {"id": mid, "created": True}
        if action == "get_all":
            ids = p.get("id") or []
            ids = [ids] if isinstance(ids, str) else ids
            return {"models": [m for m in s.models.values() if not ids or m["id"] in ids]}
        model = s.models.get(str(p.get("model") or p.get("id") or ""))
        if action == "get_by_id":
            return {"model": model} if model else {"_status": 400}
        if model is not None and action in ("edit", "update", "update_for_task", "set_ready"):
            model.update({k: v for k, v in p.items() if k not in ("model", "method")})
        if action == "update_for_task":
            mid = p.get("override_model_id") or uuid.uuid4().hex
            s.models.setdefault(mid, {"id": mid}).update({k: v for k, v in p.items() if k != "method"})
            if p.get("task") in s.tasks:
                s.tasks[p["task"]]["models"]["output"].append({"name": p.get("name"), "model": mid})
            return {"id": mid, "updated": 1, "created": True}
        return {"updated": 1}


def _json(body: bytes) -> Any:
    try:
        return orjson.loads(body) if body else {}
    except orjson.JSONDecodeError:
        return {}


def main() -> int:
    server = ClearmlTestServer(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
    print(f"clearml test server on {server.url}", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
