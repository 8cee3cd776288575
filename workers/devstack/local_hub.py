"""A local HTTP server that speaks the HUB v1 protocol, for tests and the demo.

    python -m workers.devstack.local_hub --port 8787 --api-key KEY [--model MODEL_ID ...]

It checks the ``x-api-key`` header, parses what the official client sent (metrics as JSON
strings per epoch, multipart checkpoint uploads, heartbeats with agentId, model create and
get), records every request, and injects faults (``workers/devstack/http_double.py``).
Its own control action: ``POST /_control/models {"id": "..."}`` registers a model id.

Endpoints are ``create``, ``get``, ``metrics``, ``upload``, ``heartbeat`` (or ``any``).
"""

from __future__ import annotations

import hashlib
import re
import secrets
import sys
import threading
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import HTTP
from typing import Any

import orjson

from workers.devstack.http_double import DoubleHandler, DoubleServer, Fault, Recorder, Reply, command_line

__all__ = ["Fault", "LocalHub"]

ROUTES = [
    ("POST", re.compile(r"^/v1/models$"), "create"),
    ("GET", re.compile(r"^/v1/models/(?P<model>[A-Za-z0-9]+)$"), "get"),
    ("POST", re.compile(r"^/v1/models/(?P<model>[A-Za-z0-9]+)$"), "metrics"),
    ("POST", re.compile(r"^/v1/models/(?P<model>[A-Za-z0-9]+)/upload$"), "upload"),
    ("POST", re.compile(r"^/v1/agent/heartbeat/models/(?P<model>[A-Za-z0-9]+)$"), "heartbeat"),
]


@dataclass
class HubState:
    api_key: str | None
    models: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)


class HubHandler(DoubleHandler):
    server: LocalHub

    def route(self, method: str, path: str) -> tuple[str, dict[str, str]] | None:
        routed = route(method, path)
        return None if routed is None else (routed[0], {"model": routed[1]})

    def authorized(self, endpoint: str) -> bool:
        key = self.server.state.api_key
        return not key or self.headers.get("x-api-key") == key

    def arrived(self, endpoint: str, record: dict[str, Any], body: bytes) -> None:
        if endpoint == "upload":
            fields, files = parse_multipart(self.headers.get("Content-Type", ""), body)
            record["fields"] = fields
            record["files"] = {
                name: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()} for name, data in files.items()
            }

    def serve(self, endpoint: str, params: dict[str, str], record: dict[str, Any], body: bytes) -> Reply:
        state = self.server.state
        if endpoint == "create":
            record["json"] = orjson.loads(body)
            model_id = secrets.token_hex(10)
            with state.lock:
                state.models.add(model_id)
            return 200, {"data": {"id": model_id}}, {}
        if record["model"] not in state.models:
            return 404, {"message": "Model not found"}, {}
        if endpoint == "get":
            return 200, {"data": {"id": record["model"], "status": "training"}}, {}
        if endpoint == "metrics":
            payload = orjson.loads(body)
            record["json"] = payload
            record["metrics"] = {e: orjson.loads(v) for e, v in payload["metrics"].items()}  # double encoded
            return 200, {"data": {}}, {}
        if endpoint == "heartbeat":
            payload = orjson.loads(body)
            record["json"] = payload
            return 200, {"data": {"agentId": payload.get("agentId") or f"agent-{secrets.token_hex(4)}"}}, {}
        return 200, {"data": {}}, {}

    def control(self, action: str, method: str, body: bytes) -> dict[str, Any] | None:
        if action == "models" and method == "POST":
            with self.server.state.lock:
                self.server.state.models.add(orjson.loads(body)["id"])
            return {"ok": True}
        return None


def route(method: str, path: str) -> tuple[str, str | None] | None:
    """(endpoint, model id) for a HUB API request, or None."""
    for route_method, pattern, endpoint in ROUTES:
        match = pattern.match(path)
        if match and route_method == method:
            return endpoint, match.groupdict().get("model")
    return None


def parse_multipart(content_type: str, body: bytes) -> tuple[dict[str, str], dict[str, bytes]]:
    """Text fields and file parts of a multipart/form-data body (file part name -> bytes)."""
    message = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body)
    fields: dict[str, str] = {}
    files: dict[str, bytes] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        data = part.get_payload(decode=True) or b""
        if part.get_filename() is not None:
            files[f"{name}|{part.get_filename()}"] = data
        else:
            fields[name] = data.decode()
    return fields, files


class LocalHub(DoubleServer):
    def __init__(
        self, port: int = 0, api_key: str | None = None, models: tuple[str, ...] = (), host: str = "127.0.0.1"
    ) -> None:
        super().__init__((host, port), HubHandler)
        self.recorder = Recorder()
        self.state = HubState(api_key=api_key, models=set(models))


def main(argv: list[str] | None = None) -> int:
    parser = command_line("python -m workers.devstack.local_hub", __doc__, "the x-api-key to require")
    parser.add_argument("--model", action="append", default=[], help="a model id that exists (repeatable)")
    args = parser.parse_args(argv)
    return LocalHub(args.port, args.api_key, tuple(args.model), args.host).serve_until_interrupted("HUB")


if __name__ == "__main__":
    sys.exit(main())
