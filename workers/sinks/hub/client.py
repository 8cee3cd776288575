"""The Ultralytics HUB v1 REST protocol, spoken with ``requests``.

Unlike the official client, every request has a timeout, every failure raises
:class:`HubError` with the status, whether a retry can help, the server's Retry-After,
and a message that says what to fix. Checkpoint files are streamed, never read whole.
"""

from __future__ import annotations

import email.utils
import platform
import time
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

import orjson
import requests

from shared.errors import TrainbusError
from workers.sinks.files import OpenedFile

CONNECT_TIMEOUT_S = 10
UPLOAD_TIMEOUT_FACTOR = 10  # the server may take a while to store a large file
RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
AGENT = f"python-{platform.python_version()}-local"
FIX_HINTS = {
    400: "HUB rejected the request as malformed",
    401: "HUB refused the API key: check TRAINBUS_HUB_API_KEY on the worker",
    403: "HUB refused the API key for this model: check TRAINBUS_HUB_API_KEY and the model's owner",
    404: "HUB does not know this model: check TRAINBUS_HUB_MODEL (or the run's HUB model id)",
    413: "HUB refused the file as too large",
}


class HubError(TrainbusError):
    """A HUB request failed. ``retryable`` says whether trying again later can help."""

    def __init__(self, message: str, *, status: int | None, retryable: bool, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retryable = retryable
        self.retry_after = retry_after


class HubClient:
    """One HUB account (API key) at one base URL."""

    def __init__(self, base_url: str, api_key: str | None, timeout_s: float = 60.0) -> None:
        """``timeout_s``: how long to wait for an answer (x10 for checkpoint uploads)."""
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.session = requests.Session()
        if api_key:
            self.session.headers["x-api-key"] = api_key
        self.session.headers["User-Agent"] = "trainbus"

    def create_model(self, payload: Mapping[str, Any]) -> str:
        """``POST /v1/models``; returns the new model's id."""
        reply = self._request("POST", "/v1/models", json=payload)
        model_id = (reply.get("data") or {}).get("id")
        if not isinstance(model_id, str):
            raise HubError("HUB created a model but its reply has no data.id", status=200, retryable=False)
        return model_id

    def upload_metrics(self, model_id: str, metrics: Mapping[int, Mapping[str, Any]]) -> None:
        """``POST /v1/models/{id}``: several epochs at once, each a JSON string (double encoded)."""
        body = {"metrics": {str(e): orjson.dumps(m).decode() for e, m in sorted(metrics.items())}, "type": "metrics"}
        self._request("POST", f"/v1/models/{model_id}", json=body)

    def upload_checkpoint(
        self,
        model_id: str,
        file: OpenedFile,
        sha256: str,
        *,
        epoch: int,
        is_best: bool = False,
        final: bool = False,
        map50_95: float | None = None,
    ) -> None:
        """``POST /v1/models/{id}/upload``: multipart, the file part named last.pt or best.pt.

        The bytes come from the open descriptor and are hashed as they go: if they are not
        ``sha256``, :class:`~workers.files.FileRefused` aborts the body before its end.
        """
        if final:
            fields = {"epoch": str(epoch), "type": "final", "map": str(map50_95 or 0.0)}
            part = "best.pt"
        else:
            fields = {"epoch": str(epoch), "type": "epoch", "isBest": str(bool(is_best))}
            part = "last.pt"
        body = MultipartStream(fields, part, file.chunks(sha256), file.size)
        self._request(
            "POST",
            f"/v1/models/{model_id}/upload",
            data=body,
            headers={"Content-Type": body.content_type, "Content-Length": str(len(body))},
            timeout=(CONNECT_TIMEOUT_S, self.timeout_s * UPLOAD_TIMEOUT_FACTOR),
        )

    def heartbeat(self, model_id: str, agent_id: str | None) -> str | None:
        """``POST /v1/agent/heartbeat/models/{id}``; returns the agentId to send from now on."""
        reply = self._request(
            "POST", f"/v1/agent/heartbeat/models/{model_id}", json={"agent": AGENT, "agentId": agent_id}
        )
        return (reply.get("data") or {}).get("agentId") or agent_id

    def _request(
        self, method: str, path: str, *, timeout: tuple[float, float] | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        url = self.base_url + path
        try:
            response = self.session.request(
                method, url, timeout=timeout or (CONNECT_TIMEOUT_S, self.timeout_s), **kwargs
            )
            content = response.content  # read here: a body cut off midway is a transport failure too
        except requests.Timeout as exc:
            raise HubError(
                f"{method} {path}: HUB did not answer in time ({exc.__class__.__name__})", status=None, retryable=True
            ) from None
        except requests.RequestException as exc:  # refused, reset, cut off mid-body, bad chunking, ...
            raise HubError(
                f"{method} {path}: cannot reach HUB at {self.base_url} ({exc.__class__.__name__}: {_short(exc)})",
                status=None,
                retryable=True,
            ) from None
        if response.status_code >= 400:
            raise _error(method, path, response)
        try:
            return orjson.loads(content) if content else {}
        except orjson.JSONDecodeError:
            return {}


def _error(method: str, path: str, response: requests.Response) -> HubError:
    status = response.status_code
    detail = response.text[:200].strip()
    if status in RETRYABLE_STATUS:
        return HubError(
            f"{method} {path}: HUB answered {status}; will retry ({detail})",
            status=status,
            retryable=True,
            retry_after=retry_after(response.headers),
        )
    hint = FIX_HINTS.get(status, "HUB refused the request")
    return HubError(f"{method} {path}: {hint} (HTTP {status}: {detail})", status=status, retryable=False)


def retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait from Retry-After (seconds or HTTP date), or the rate-limit reset headers."""
    value = headers.get("Retry-After")
    if value:
        try:
            return max(0.0, float(value))
        except ValueError:
            parsed = email.utils.parsedate_to_datetime(value) if value else None
            if parsed is not None:
                return max(0.0, parsed.timestamp() - time.time())
    if headers.get("X-RateLimit-Remaining") == "0" and headers.get("X-RateLimit-Reset"):
        try:
            reset = float(headers["X-RateLimit-Reset"])
        except ValueError:
            return None
        return max(0.0, reset - time.time()) if reset > 1e9 else reset  # epoch time or seconds
    return None


def _short(exc: Exception) -> str:
    text = str(exc)
    return text if len(text) < 160 else text[:160] + "..."


class MultipartStream:
    """A multipart/form-data body read in chunks: text fields, then one file part.

    ``requests`` streams an object with ``read`` and a known length, so the file goes out
    in 1 MiB chunks instead of being loaded into memory.
    """

    def __init__(self, fields: Mapping[str, str], part: str, file: Iterator[bytes], size: int) -> None:
        boundary = uuid.uuid4().hex
        self.content_type = f"multipart/form-data; boundary={boundary}"
        head = b"".join(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
            for k, v in fields.items()
        )
        head += (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{part}"; filename="{part}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        self._parts: list[bytes | Iterator[bytes]] = [head, file, f"\r\n--{boundary}--\r\n".encode()]
        self._length = len(head) + size + len(self._parts[2])  # type: ignore[arg-type]
        self._buffer = b""

    def __len__(self) -> int:
        return self._length

    def read(self, size: int = -1) -> bytes:
        size = 1 << 20 if size is None or size < 0 else size
        while len(self._buffer) < size and self._parts:
            part = self._parts[0]
            if isinstance(part, bytes):
                self._buffer += part
                self._parts.pop(0)
                continue
            chunk = next(part, None)
            if chunk is None:
                self._parts.pop(0)
            else:
                self._buffer += chunk
        out, self._buffer = self._buffer[:size], self._buffer[size:]
        return out
