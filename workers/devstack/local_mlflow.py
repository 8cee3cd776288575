"""A real ``mlflow server`` (SQLite, local artifacts, basic auth) for the demo, the tests and the
benchmarks, and a faulting HTTP proxy in front of it: what a slow, cut-off or unanswering
tracking server does. Needs ``mlflow`` itself (the server), not only the client.

The proxy forwards every request to the real server and records it (endpoint, status, the
JSON body; a ``log-batch`` carrying metrics is ``runs/log-batch:metrics``), then applies the
first matching fault (``workers/devstack/http_double.py``):
``status`` answers instead of the server; ``reset`` cuts the connection before forwarding;
``lost_reply`` forwards (the server does the work) and then cuts the connection;
``delay``/``hang`` forwards and answers that late (the server did the work on time).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import requests

from workers.devstack.http_double import DoubleHandler, DoubleServer, Recorder

ADMIN = "admin"
PASSWORD = "trainbus-local-Pa55word"  # of a server that only listens on 127.0.0.1
START_TIMEOUT_S = 90.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MlflowServer:
    """``mlflow server`` on a free loopback port, which a test may stop and start again."""

    def __init__(self, workdir: Path, *, auth: bool = True) -> None:
        self.workdir = workdir
        self.auth = auth  # basic auth checks a password hash on every request: slower, as deployed
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> MlflowServer:
        env = {
            **os.environ,
            "MLFLOW_AUTH_ADMIN_PASSWORD": PASSWORD,
            "MLFLOW_FLASK_SERVER_SECRET_KEY": "trainbus-local",
        }
        log = open(self.workdir / "server.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                *(("--app-name", "basic-auth") if self.auth else ()),
                "--backend-store-uri",
                f"sqlite:///{self.workdir / 'mlflow.db'}",
                "--artifacts-destination",
                str(self.workdir / "artifacts"),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
            ],
            env=env,
            cwd=self.workdir,  # where basic auth keeps its users (basic_auth.db)
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: see {self.workdir / 'server.log'}")
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{self.url}/health", timeout=2).ok:
                    return self
            time.sleep(0.3)
        raise RuntimeError(f"mlflow server did not answer /health in {START_TIMEOUT_S:.0f} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()
        self.proc = None

    def env(self, url: str | None = None, password: str = PASSWORD) -> dict[str, str]:
        """What a worker (or Ultralytics' own callback) needs to reach the server."""
        return {
            "MLFLOW_TRACKING_URI": url or self.url,
            "MLFLOW_TRACKING_USERNAME": ADMIN,
            "MLFLOW_TRACKING_PASSWORD": password,
        }

    def client(self) -> Any:
        """An MlflowClient reading the server directly (not through a proxy)."""
        os.environ.update({"MLFLOW_TRACKING_USERNAME": ADMIN, "MLFLOW_TRACKING_PASSWORD": PASSWORD})
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.url)


class ProxyHandler(DoubleHandler):
    server: ProxyServer

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def route(self, method: str, path: str) -> tuple[str, dict[str, str]] | None:
        path = path.split("?", 1)[0]
        if "/mlflow-artifacts/" in path:
            return "artifacts", {}
        return path.split("/mlflow/", 1)[-1], {}

    def arrived(self, endpoint: str, record: dict[str, Any], body: bytes) -> None:
        if endpoint != "artifacts" and body:
            with contextlib.suppress(orjson.JSONDecodeError):
                record["json"] = orjson.loads(body)
        if endpoint == "runs/log-batch":  # params and metrics go in separate batches: faults pick one
            record["endpoint"] = "runs/log-batch:metrics" if (record.get("json") or {}).get("metrics") else endpoint

    def _dispatch(self, method: str) -> None:
        if self.path.startswith("/_control/"):
            return super()._dispatch(method)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        endpoint, _ = self.route(method, self.path)
        record: dict[str, Any] = {"ts": time.time(), "method": method, "endpoint": endpoint, "status": "pending"}
        self.arrived(endpoint, record, body)
        endpoint = record["endpoint"]
        self.server.recorder.record(record)
        fault = self.server.recorder.take_fault(endpoint)
        if fault is not None and fault.reset:
            return self.cut(record, "reset")
        if fault is not None and fault.status:
            record["status"] = fault.status
            return self.reply(fault.status, {"error_code": "TEMPORARILY_UNAVAILABLE", "message": "injected fault"})
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
        try:
            answer = requests.request(method, self.server.upstream + self.path, data=body, headers=headers, timeout=60)
        except requests.RequestException:  # the real server is down: the client sees it refuse
            return self.cut(record, "upstream down")
        if fault is not None and fault.lost_reply:
            return self.cut(record, "lost reply")
        if fault is not None and (fault.delay or fault.hang):
            time.sleep(fault.delay or fault.hang)
        record["status"] = answer.status_code
        self.send_response(answer.status_code)
        self.send_header("Content-Type", answer.headers.get("Content-Type", "application/json"))
        self.send_header("Content-Length", str(len(answer.content)))
        self.end_headers()
        with contextlib.suppress(OSError):  # the client may have given up waiting
            self.wfile.write(answer.content)
        return None


class ProxyServer(DoubleServer):
    def __init__(self, upstream: str) -> None:
        super().__init__(("127.0.0.1", 0), ProxyHandler)
        self.upstream = upstream
        self.recorder = Recorder()
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def fault(self, **fault: Any) -> None:
        requests.post(f"{self.url}/_control/faults", json=fault, timeout=5).raise_for_status()

    def requests(self, endpoint: str | None = None) -> list[dict[str, Any]]:
        with self.recorder.lock:
            return [dict(r) for r in self.recorder.requests if endpoint is None or r["endpoint"] == endpoint]

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
