"""What the local protocol servers share: recording every request, injecting faults, a control API.

A server here stands in for a real service (HUB, the Platform) on 127.0.0.1 (``--host 0.0.0.0``
in the compose stack's ``devstack`` profile), for the tests and the demo. Its handler routes a
request to an endpoint name, records it on arrival (status "pending" while it is answered), then
applies the first matching fault, if any:

    {"endpoint": "metrics", "status": 503, "count": 3}      answer 503, three times
    {"endpoint": "upload", "status": 429, "retry_after": 2}  with Retry-After (and rate-limit headers)
    {"endpoint": "any", "delay": 2.5} / {"hang": 30}         answer late / hang, then answer
    {"endpoint": "any", "reset": true}                       reset the connection
    {"endpoint": "metrics", "truncate": true}                headers, then half a body, then close
    {"endpoint": "metrics", "lost_reply": true}              serve it (its effect happens), then reset

Control: ``GET /_control/requests`` (every request by arrival), ``POST /_control/faults``,
``POST /_control/reset`` (forget requests and faults); servers add their own actions.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson

Reply = tuple[int, dict[str, Any], dict[str, str]]


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
    lost_reply: bool = False  # the request is served, then the connection cut: the answer is lost


@dataclass
class Recorder:
    """Requests in arrival order, and the faults still to inject."""

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

    def record(self, entry: dict[str, Any]) -> None:
        with self.lock:
            self.requests.append(entry)


class DoubleServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128
    recorder: Recorder

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def url_for(self, handler: BaseHTTPRequestHandler) -> str:
        """This server's URL as the client named it (its Host header): in a container, not 127.0.0.1."""
        host = handler.headers.get("Host")
        return f"http://{host}" if host else self.url

    def serve_until_interrupted(self, name: str) -> int:
        """Serve in the foreground (``python -m ...``) until Ctrl-C or SIGTERM (``docker compose stop``)."""
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        print(f"local {name} listening on http://{self.server_address[0]}:{self.server_address[1]}", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            self.serve_forever()
        return 0


def command_line(prog: str, doc: str | None, key_help: str) -> argparse.ArgumentParser:
    """The options every double's ``main`` takes: its port and the API key it requires."""
    parser = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port (default: any free one)")
    parser.add_argument("--api-key", help=f"{key_help} (default: accept any)")
    return parser


class DoubleHandler(BaseHTTPRequestHandler):
    """Subclasses give ``route`` (method, path -> endpoint, params), ``serve`` and ``authorized``."""

    protocol_version = "HTTP/1.1"
    server: DoubleServer

    def setup(self) -> None:
        super().setup()
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # else ~40 ms per call

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    # -- what a server defines ---------------------------------------------------------------

    def route(self, method: str, path: str) -> tuple[str, dict[str, str]] | None:
        raise NotImplementedError

    def authorized(self, endpoint: str) -> bool:
        return True

    def arrived(self, endpoint: str, record: dict[str, Any], body: bytes) -> None:
        """What a request carried, noted on arrival, whatever the answer (a fault's too)."""

    def serve(self, endpoint: str, params: dict[str, str], record: dict[str, Any], body: bytes) -> Reply:
        raise NotImplementedError

    def control(self, action: str, method: str, body: bytes) -> dict[str, Any] | None:
        """A server's own control actions; None: no such action."""
        return None

    def unauthorized(self) -> Reply:
        return 401, {"message": "Invalid API key"}, {}

    # -- the request's path ------------------------------------------------------------------

    def _dispatch(self, method: str) -> None:
        arrived = time.time()  # before the body: rate-limit checks compare when requests began
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        if self.path.startswith("/_control/"):
            return self._control(method, body)
        routed = self.route(method, self.path)
        if routed is None:
            return self.reply(404, {"message": f"no route {method} {self.path}"})
        endpoint, params = routed
        record: dict[str, Any] = {
            "ts": arrived,
            "method": method,
            "path": self.path,
            "endpoint": endpoint,
            **params,
            "status": "pending",  # recorded on arrival: a test can see a request in progress
        }
        self.arrived(endpoint, record, body)
        if len(body) < length:  # the client gave up mid-body: nothing was received
            record["status"] = "incomplete"
            self.server.recorder.record(record)
            self.close_connection = True
            return None
        self.server.recorder.record(record)
        fault = self.server.recorder.take_fault(endpoint)
        if fault is not None and self._inject(fault, record):
            return None
        if self.authorized(endpoint):
            status, payload, headers = self.serve(endpoint, params, record, body)
        else:
            status, payload, headers = self.unauthorized()
        if fault is not None and fault.lost_reply:
            return self.cut(record, "lost reply")
        record["status"] = status
        return self.reply(status, payload, headers)

    def _inject(self, fault: Fault, record: dict[str, Any]) -> bool:
        """Apply a fault; True when it answered (or dropped) the request itself."""
        if fault.reset:
            self.cut(record, "reset")
            return True
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
            return True
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
            self.reply(fault.status, {"message": "injected fault", "error": "injected fault"}, headers)
            return True
        return False

    def cut(self, record: dict[str, Any], why: str) -> None:
        """Reset the connection instead of answering (``why`` is the recorded status)."""
        record["status"] = why
        self.request.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.request.close()

    def _control(self, method: str, body: bytes) -> None:
        recorder = self.server.recorder
        action = self.path.removeprefix("/_control/")
        if action == "requests":
            with recorder.lock:
                return self.reply(200, {"requests": list(recorder.requests)})
        if action == "faults" and method == "POST":
            with recorder.lock:
                recorder.faults.append(Fault(**orjson.loads(body)))
            return self.reply(200, {"ok": True})
        if action == "reset" and method == "POST":
            with recorder.lock:
                recorder.requests.clear()
                recorder.faults.clear()
            return self.reply(200, {"ok": True})
        answer = self.control(action, method, body)
        if answer is None:
            return self.reply(404, {"message": f"no control action {action}"})
        return self.reply(200, answer)

    def reply(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        data = orjson.dumps(payload)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)
