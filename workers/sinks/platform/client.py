"""The Ultralytics Platform's training protocol, spoken with ``requests`` (``PLATFORM.md``).

One endpoint takes every training event (``POST /api/webhooks/training/metrics``); a
checkpoint goes up in three steps (an upload URL, a PUT of the bytes to it without
authorization, ``checkpoint_saved``). Unlike the Platform's own callbacks, every request
has a timeout and every failure raises :class:`PlatformError` (see
:mod:`workers.sinks.http`). Non-finite floats become null (the Platform refuses NaN).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import orjson
import requests

from workers.sinks.files import OpenedFile
from workers.sinks.http import CONNECT_TIMEOUT_S, Service, ServiceError, StreamedBody, json_reply

UPLOAD_TIMEOUT_FACTOR = 20  # a PUT of a large checkpoint may take a while


class PlatformError(ServiceError):
    """A Platform request failed. ``retryable`` says whether trying again later can help."""


PLATFORM = Service(
    "the Platform",
    PlatformError,
    hints={
        400: "the Platform rejected the request as malformed",
        401: "the Platform refused the API key: check TRAINBUS_PLATFORM_API_KEY on the worker"
        " (ul_ + 40 hex characters)",
        403: "the API key may not write to this project: check TRAINBUS_PLATFORM_PROJECT (owner/slug)"
        " and the key's access",
        404: "the Platform does not know this model or project",
    },
    retryable_status=frozenset({408, 409, 429}),
)


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
        PLATFORM.send(
            self.uploads,
            "PUT",
            url,
            what="the signed upload",
            timeout_s=self.timeout_s,
            data=StreamedBody([file.chunks(sha256)], file.size),
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(file.size)},
            timeout=(CONNECT_TIMEOUT_S, self.timeout_s * UPLOAD_TIMEOUT_FACTOR),
        )

    def models(self, owner: str, project: str) -> list[dict[str, Any]]:
        """The models of a project (to find one whose registration reply was lost)."""
        return list(self._json("GET", f"/api/models/{owner}/{project}", None).get("models") or [])

    def _json(self, method: str, path: str, body: Mapping[str, Any] | None) -> dict[str, Any]:
        data = orjson.dumps(body) if body is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else {}
        content = PLATFORM.send(
            self.session, method, self.base_url + path, what=path, timeout_s=self.timeout_s, data=data, headers=headers
        )
        return json_reply(content)


def finite(value: Any) -> Any:
    """NaN and infinity as null, at any depth (the Platform refuses them)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value
