"""The Ultralytics Platform's training protocol, spoken with ``requests`` (``PLATFORM.md``).

One endpoint takes every training event (``POST /api/webhooks/training/metrics``); a
checkpoint goes up in three steps (an upload URL, a PUT of the bytes to it without
authorization, ``checkpoint_saved``). Unlike the Platform's own callbacks, every request
has a timeout and every failure raises :class:`PlatformError` saying whether a retry can
help, the server's Retry-After, and what to fix. Non-finite floats become null (the
Platform refuses NaN).
"""

from __future__ import annotations

import datetime
import math
import time
from collections.abc import Iterator, Mapping
from typing import Any

import orjson
import requests

from shared.errors import TrainbusError
from workers.sinks.files import OpenedFile

CONNECT_TIMEOUT_S = 10
UPLOAD_TIMEOUT_FACTOR = 20  # a PUT of a large checkpoint may take a while
RETRYABLE_STATUS = frozenset({408, 409, 429})  # and every 5xx
FIX_HINTS = {
    400: "the Platform rejected the request as malformed",
    401: "the Platform refused the API key: check TRAINBUS_PLATFORM_API_KEY on the worker (ul_ + 40 hex characters)",
    403: "the API key may not write to this project: check TRAINBUS_PLATFORM_PROJECT (owner/slug) and the key's access",
    404: "the Platform does not know this model or project",
}


class PlatformError(TrainbusError):
    """A Platform request failed. ``retryable`` says whether trying again later can help."""

    def __init__(self, message: str, *, status: int | None, retryable: bool, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retryable = retryable
        self.retry_after = retry_after


class PlatformClient:
    """One API key at one base URL."""

    def __init__(self, base_url: str, api_key: str | None, timeout_s: float = 30.0) -> None:
        """``timeout_s``: how long to wait for an answer (x20 for a checkpoint's PUT)."""
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.session = requests.Session()
        if api_key:
            self.session.headers["Authorization"] = f"Bearer {api_key}"
        self.session.headers["User-Agent"] = "trainbus"
        self.uploads = requests.Session()  # the signed PUT goes out without the API key
        self.uploads.headers["User-Agent"] = "trainbus"

    def event(
        self,
        event: str,
        data: Mapping[str, Any],
        *,
        model_id: str | None = None,
        project: str | None = None,
        name: str | None = None,
    ) -> dict[str, Any]:
        """One training event; identified by ``model_id``, or by ``project`` and ``name`` to register."""
        identity = {"modelId": model_id} if model_id else {"project": project, "name": name}
        body = {**identity, "event": event, "data": finite(data)}
        return self._json("POST", "/api/webhooks/training/metrics", body)

    def upload_url(self, filename: str, model_id: str, run_id: int | str | None) -> dict[str, Any]:
        """Step 1 of a checkpoint: where to PUT it (``uploadUrl``), and its ``gcsPath``/``uploadPath``."""
        reply = self._json(
            "POST", "/api/webhooks/models/upload", {"filename": filename, "modelId": model_id, "runId": run_id}
        )
        if not isinstance(reply.get("uploadUrl"), str):
            raise PlatformError("the Platform's upload reply has no uploadUrl", status=200, retryable=True)
        return reply

    def put(self, url: str, file: OpenedFile, sha256: str) -> None:
        """Step 2: the snapshot's bytes, streamed from its descriptor and hashed as they go."""
        self._send(
            self.uploads,
            "PUT",
            url,
            "the signed upload",
            data=_Body(file.chunks(sha256), file.size),
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(file.size)},
            timeout=(CONNECT_TIMEOUT_S, self.timeout_s * UPLOAD_TIMEOUT_FACTOR),
        )

    def models(self, owner: str, project: str) -> list[dict[str, Any]]:
        """The models of a project (to find one whose registration reply was lost)."""
        return list(self._json("GET", f"/api/models/{owner}/{project}", None).get("models") or [])

    def _json(self, method: str, path: str, body: Mapping[str, Any] | None) -> dict[str, Any]:
        data = orjson.dumps(body) if body is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else {}
        content = self._send(self.session, method, self.base_url + path, path, data=data, headers=headers)
        try:
            reply = orjson.loads(content) if content else {}
        except orjson.JSONDecodeError:
            return {}
        return reply if isinstance(reply, dict) else {}

    def _send(self, session: requests.Session, method: str, url: str, what: str, **kwargs: Any) -> bytes:
        kwargs.setdefault("timeout", (CONNECT_TIMEOUT_S, self.timeout_s))
        try:
            response = session.request(method, url, **kwargs)
            content = response.content  # read here: a body cut off midway is a transport failure too
        except requests.Timeout as exc:
            raise PlatformError(
                f"{method} {what}: the Platform did not answer in time ({exc.__class__.__name__})",
                status=None,
                retryable=True,
            ) from None
        except requests.RequestException as exc:
            raise PlatformError(
                f"{method} {what}: cannot reach the Platform at {self.base_url} ({exc.__class__.__name__})",
                status=None,
                retryable=True,
            ) from None
        if response.status_code >= 400:
            raise _error(method, what, response)
        return content


def _error(method: str, what: str, response: requests.Response) -> PlatformError:
    status = response.status_code
    try:
        detail = str(orjson.loads(response.content).get("error") or "")[:200]
    except (orjson.JSONDecodeError, AttributeError):
        detail = response.text[:200].strip()
    if status in RETRYABLE_STATUS or status >= 500:
        return PlatformError(
            f"{method} {what}: the Platform answered {status}; will retry ({detail})",
            status=status,
            retryable=True,
            retry_after=retry_after(response.headers),
        )
    hint = FIX_HINTS.get(status, "the Platform refused the request")
    return PlatformError(f"{method} {what}: {hint} (HTTP {status}: {detail})", status=status, retryable=False)


def retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait: ``Retry-After`` (seconds), else ``X-RateLimit-Reset`` (an ISO time, or seconds)."""
    value = headers.get("Retry-After")
    if value:
        try:
            return max(0.0, float(value))
        except ValueError:
            pass
    reset = headers.get("X-RateLimit-Reset")
    if reset:
        try:
            at = datetime.datetime.fromisoformat(reset.replace("Z", "+00:00")).timestamp()
        except ValueError:
            try:
                seconds = float(reset)
            except ValueError:
                return None
            return max(0.0, seconds - time.time()) if seconds > 1e9 else seconds
        return max(0.0, at - time.time())
    return None


def finite(value: Any) -> Any:
    """NaN and infinity as null, at any depth (the Platform refuses them)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


class _Body:
    """A streamed request body of known length (``requests`` sends it in chunks)."""

    def __init__(self, chunks: Iterator[bytes], size: int) -> None:
        self._chunks = chunks
        self._size = size
        self._buffer = b""

    def __len__(self) -> int:
        return self._size

    def read(self, size: int = -1) -> bytes:
        size = 1 << 20 if size is None or size < 0 else size
        while len(self._buffer) < size and (chunk := next(self._chunks, None)) is not None:
            self._buffer += chunk
        out, self._buffer = self._buffer[:size], self._buffer[size:]
        return out
