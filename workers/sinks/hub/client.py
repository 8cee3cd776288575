"""The Ultralytics HUB v1 REST protocol, spoken with ``requests``.

Unlike the official client, every request has a timeout and every failure raises
:class:`HubError` (see :mod:`workers.sinks.http`). Checkpoint files are streamed, never
read whole.
"""

from __future__ import annotations

import platform
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

import orjson
import requests

from workers.sinks.files import OpenedFile
from workers.sinks.http import CONNECT_TIMEOUT_S, Service, ServiceError, StreamedBody, json_reply

UPLOAD_TIMEOUT_FACTOR = 10  # the server may take a while to store a large file
AGENT = f"python-{platform.python_version()}-local"


class HubError(ServiceError):
    """A HUB request failed. ``retryable`` says whether trying again later can help."""


HUB = Service(
    "HUB",
    HubError,
    hints={
        400: "HUB rejected the request as malformed",
        401: "HUB refused the API key: check TRAINBUS_HUB_API_KEY on the worker",
        403: "HUB refused the API key for this model: check TRAINBUS_HUB_API_KEY and the model's owner",
        404: "HUB does not know this model: check TRAINBUS_HUB_MODEL (or the run's HUB model id)",
        413: "HUB refused the file as too large",
    },
)


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
        body, content_type = multipart(fields, part, file.chunks(sha256), file.size)
        self._request(
            "POST",
            f"/v1/models/{model_id}/upload",
            data=body,
            headers={"Content-Type": content_type, "Content-Length": str(len(body))},
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
        if timeout:
            kwargs["timeout"] = timeout
        content = HUB.send(self.session, method, self.base_url + path, what=path, timeout_s=self.timeout_s, **kwargs)
        return json_reply(content)


def multipart(fields: Mapping[str, str], part: str, file: Iterator[bytes], size: int) -> tuple[StreamedBody, str]:
    """A multipart/form-data body streamed in chunks: text fields, then one file part.

    Returns the body and its Content-Type.
    """
    boundary = uuid.uuid4().hex
    head = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in fields.items()
    )
    head += (
        f'--{boundary}\r\nContent-Disposition: form-data; name="{part}"; filename="{part}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    return StreamedBody([head, file, tail], len(head) + size + len(tail)), f"multipart/form-data; boundary={boundary}"
