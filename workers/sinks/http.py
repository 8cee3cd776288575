"""What every HTTP sink's client shares: typed failures, one guarded send, streamed bodies.

A service's client (HUB, Platform) names itself with a :class:`Service`; every request then
has a timeout, a transport failure or an error status becomes that service's
:class:`ServiceError` saying whether a retry can help, how long the server asked to wait,
and what to fix. File bodies stream from an open descriptor, never read whole.
"""

from __future__ import annotations

import datetime
import email.utils
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
import requests

from shared.errors import TrainbusError

CONNECT_TIMEOUT_S = 10
CHUNK = 1 << 20


class ServiceError(TrainbusError):
    """A request to a service failed. ``retryable`` says whether trying again later can help."""

    def __init__(self, message: str, *, status: int | None, retryable: bool, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retryable = retryable
        self.retry_after = retry_after


@dataclass(frozen=True)
class Service:
    """How one service's failures read: its name, its error type, what to fix per status."""

    name: str  # as it reads in a sentence: "HUB", "the Platform"
    error: type[ServiceError]
    hints: Mapping[int, str] = field(default_factory=dict)
    retryable_status: frozenset[int] = frozenset({408, 429})  # and every 5xx

    def send(
        self, session: requests.Session, method: str, url: str, *, what: str, timeout_s: float, **kwargs: Any
    ) -> bytes:
        """One request; returns the body, read whole here (a body cut off midway fails too)."""
        kwargs.setdefault("timeout", (CONNECT_TIMEOUT_S, timeout_s))
        try:
            response = session.request(method, url, **kwargs)
            content = response.content
        except requests.Timeout as exc:
            raise self.error(
                f"{method} {what}: {self.name} did not answer in time ({exc.__class__.__name__})",
                status=None,
                retryable=True,
            ) from None
        except requests.RequestException as exc:  # refused, reset, cut off mid-body, bad chunking, ...
            raise self.error(
                f"{method} {what}: cannot reach {self.name} at {origin(url)} ({exc.__class__.__name__})",
                status=None,
                retryable=True,
            ) from None
        if response.status_code >= 400:
            raise self.refusal(method, what, response)
        return content

    def refusal(self, method: str, what: str, response: requests.Response) -> ServiceError:
        """The error for an error status: retryable with the server's wait, or what to fix."""
        status = response.status_code
        detail = _detail(response)
        if status in self.retryable_status or status >= 500:
            return self.error(
                f"{method} {what}: {self.name} answered {status}; will retry ({detail})",
                status=status,
                retryable=True,
                retry_after=retry_after(response.headers),
            )
        hint = self.hints.get(status, f"{self.name} refused the request")
        return self.error(f"{method} {what}: {hint} (HTTP {status}: {detail})", status=status, retryable=False)


def json_reply(content: bytes) -> dict[str, Any]:
    """A reply's JSON object, or ``{}`` when there is none (the caller checks what it needs)."""
    try:
        reply = orjson.loads(content) if content else {}
    except orjson.JSONDecodeError:
        return {}
    return reply if isinstance(reply, dict) else {}


def retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait: ``Retry-After`` (seconds or an HTTP date), else ``X-RateLimit-Reset``
    (an ISO time, an epoch time, or seconds)."""
    value = headers.get("Retry-After")
    if value:
        try:
            return max(0.0, float(value))
        except ValueError:
            try:
                return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
            except (TypeError, ValueError):
                pass
    reset = headers.get("X-RateLimit-Reset")
    if not reset or headers.get("X-RateLimit-Remaining", "0") != "0":
        return None
    try:
        seconds = float(reset)
    except ValueError:
        try:
            at = datetime.datetime.fromisoformat(reset.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return None
        return max(0.0, at - time.time())
    return max(0.0, seconds - time.time()) if seconds > 1e9 else max(0.0, seconds)


class StreamedBody:
    """A request body of known length read in chunks: bytes and chunk iterators, in order.

    ``requests`` streams any object with ``read`` and ``__len__``, so a checkpoint goes out
    1 MiB at a time instead of being loaded into memory.
    """

    def __init__(self, parts: Iterable[bytes | Iterator[bytes]], size: int) -> None:
        self._parts = list(parts)
        self._size = size
        self._buffer = b""

    def __len__(self) -> int:
        return self._size

    def read(self, size: int = -1) -> bytes:
        size = CHUNK if size is None or size < 0 else size
        while len(self._buffer) < size and self._parts:
            part = self._parts[0]
            chunk = part if isinstance(part, bytes) else next(part, None)
            if chunk is None or isinstance(part, bytes):
                self._parts.pop(0)
            if chunk:
                self._buffer += chunk
        out, self._buffer = self._buffer[:size], self._buffer[size:]
        return out


def _detail(response: requests.Response) -> str:
    try:
        reply = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        reply = None
    if isinstance(reply, dict) and (reply.get("error") or reply.get("message")):
        return str(reply.get("error") or reply.get("message"))[:200]
    return response.text[:200].strip()


def origin(url: str) -> str:
    """Scheme and host only: a signed URL's path and query, or credentials, stay out of logs."""
    scheme, _, rest = url.partition("://")
    host = rest.split("/", 1)[0].rsplit("@", 1)[-1]
    return f"{scheme}://{host}" if rest else url
