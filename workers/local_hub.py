"""A local HTTP server that speaks the HUB v1 protocol, for tests and the demo.

    python -m workers.local_hub --port 8787 --api-key KEY [--model MODEL_ID ...]

It checks the ``x-api-key`` header, parses what the official client sent (metrics as JSON
strings per epoch, multipart checkpoint uploads, heartbeats with agentId, model create and
get), records every request, and injects faults on request through ``/_control``:

    POST /_control/faults   {"endpoint": "metrics", "status": 503, "count": 3}
                            {"endpoint": "upload", "status": 429, "retry_after": 2}
                            {"endpoint": "any", "delay": 2.5} / {"hang": 30} / {"reset": true}
                            {"endpoint": "metrics", "truncate": true}  (headers, then half a body, then close)
    GET  /_control/requests every request by arrival; status "pending" while it is answered
    POST /_control/models   {"id": "..."} registers a model id
    POST /_control/reset    forget requests and faults

Endpoints are ``create``, ``get``, ``metrics``, ``upload``, ``heartbeat`` (or ``any``).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import re
import secrets
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson

ROUTES = [
    ("POST", re.compile(r"^/v1/models$"), "create"),
    ("GET", re.compile(r"^/v1/models/(?P<model>[A-Za-z0-9]+)$"), "get"),
    ("POST", re.compile(r"^/v1/models/(?P<model>[A-Za-z0-9]+)$"), "metrics"),
    ("POST", re.compile(r"^/v1/models/(?P<model>[A-Za-z0-9]+)/upload$"), "upload"),
    ("POST", re.compile(r"^/v1/agent/heartbeat/models/(?P<model>[A-Za-z0-9]+)$"), "heartbeat"),
]


@dataclass
class Fault:
    endpoint: str = "any"
    count: int = 1
    status: int | None = None
    retry_after: float | None = None
    delay: float = 0.0
    hang: float = 0.0
    reset: bool = False
    truncate: bool = False


@dataclass
class HubState:
    api_key: str | None
    models: set[str] = field(default_factory=set)
    requests: list[dict[str, Any]] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def take_fault(self, endpoint: str) -> Fault | None:
        with self.lock:
            for fault in self.faults:
                if fault.endpoint in (endpoint, "any") and fault.count > 0:
                    fault.count -= 1
                    return fault
        return None


class HubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: LocalHub

    def setup(self) -> None:
        super().setup()
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # else ~40 ms per call

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        arrived = time.time()  # before the body: rate-limit checks compare when requests began
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        state = self.server.state
        if self.path.startswith("/_control/"):
            return self._control(method, body)
        routed = route(method, self.path)
        if routed is None:
            return self._reply(404, {"message": f"no route {method} {self.path}"})
        endpoint, model = routed
        record: dict[str, Any] = {
            "ts": arrived,
            "method": method,
            "path": self.path,
            "endpoint": endpoint,
            "model": model,
            "status": "pending",  # recorded on arrival: a test can see an upload in progress
        }
        if len(body) < length:  # the client gave up mid-body: nothing was received
            record["status"] = "incomplete"
            self._record(record)
            self.close_connection = True
            return None
        if endpoint == "upload":  # what was uploaded is known on arrival, whatever the answer
            fields, files = parse_multipart(self.headers.get("Content-Type", ""), body)
            record["fields"] = fields
            record["files"] = {
                name: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()} for name, data in files.items()
            }
        self._record(record)
        fault = state.take_fault(endpoint)
        if fault is not None:
            if fault.reset:
                record["status"] = "reset"
                self.request.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True
                self.request.close()
                return None
            time.sleep(fault.delay or fault.hang)
            if fault.truncate:
                record["status"] = "truncated"
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", "100")
                self.end_headers()
                self.wfile.write(b'{"data": {')
                self.wfile.flush()
                self.close_connection = True
                self.request.shutdown(socket.SHUT_RDWR)
                return None
            if fault.status:
                record["status"] = fault.status
                headers = {}
                if fault.retry_after is not None:
                    record["retry_after"] = fault.retry_after
                    headers = {
                        "Retry-After": f"{fault.retry_after:g}",
                        "X-RateLimit-Limit": "100",
                        "X-RateLimit-Remaining": "0",
                        "X-RateLimit-Reset": f"{fault.retry_after:g}",
                    }
                return self._reply(fault.status, {"message": "injected fault"}, headers)
        if state.api_key and self.headers.get("x-api-key") != state.api_key:
            record["status"] = 401
            return self._reply(401, {"message": "Invalid API key"})
        status, reply = self._serve(endpoint, record, body)
        record["status"] = status
        return self._reply(status, reply)

    def _serve(self, endpoint: str, record: dict[str, Any], body: bytes) -> tuple[int, dict[str, Any]]:
        state = self.server.state
        if endpoint == "create":
            record["json"] = orjson.loads(body)
            model_id = secrets.token_hex(10)
            with state.lock:
                state.models.add(model_id)
            return 200, {"data": {"id": model_id}}
        if record["model"] not in state.models:
            return 404, {"message": "Model not found"}
        if endpoint == "get":
            return 200, {"data": {"id": record["model"], "status": "training"}}
        if endpoint == "metrics":
            payload = orjson.loads(body)
            record["json"] = payload
            record["metrics"] = {e: orjson.loads(v) for e, v in payload["metrics"].items()}  # double encoded
            return 200, {"data": {}}
        if endpoint == "heartbeat":
            payload = orjson.loads(body)
            record["json"] = payload
            return 200, {"data": {"agentId": payload.get("agentId") or f"agent-{secrets.token_hex(4)}"}}
        return 200, {"data": {}}

    def _control(self, method: str, body: bytes) -> None:
        state = self.server.state
        action = self.path.removeprefix("/_control/")
        with state.lock:
            if action == "requests":
                return self._reply(200, {"requests": list(state.requests)})
            if action == "faults" and method == "POST":
                state.faults.append(Fault(**orjson.loads(body)))
            elif action == "models" and method == "POST":
                state.models.add(orjson.loads(body)["id"])
            elif action == "reset" and method == "POST":
                state.requests.clear()
                state.faults.clear()
            else:
                return self._reply(404, {"message": f"no control action {action}"})
        return self._reply(200, {"ok": True})

    def _record(self, record: dict[str, Any]) -> None:
        with self.server.state.lock:
            self.server.state.requests.append(record)

    def _reply(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        data = orjson.dumps(payload)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)


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


class LocalHub(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, port: int = 0, api_key: str | None = None, models: tuple[str, ...] = ()) -> None:
        super().__init__(("127.0.0.1", port), HubHandler)
        self.state = HubState(api_key=api_key, models=set(models))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m workers.local_hub", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: any free one)")
    parser.add_argument("--api-key", help="the x-api-key to require (default: accept any)")
    parser.add_argument("--model", action="append", default=[], help="a model id that exists (repeatable)")
    args = parser.parse_args(argv)
    server = LocalHub(args.port, args.api_key, tuple(args.model))
    print(f"local HUB listening on {server.url}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
