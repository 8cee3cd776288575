"""HUB model identifiers as users pass them, reduced to the model id.

Users pass what the Ultralytics HUB client accepted: a model URL
(``https://hub.ultralytics.com/models/MODEL_ID``, optionally ``?api_key=KEY``),
``APIKEY_MODELID`` (42 + 20 characters), or a bare 20-character model id. The API key part
is split off here so that it can be redacted; it never enters an event.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlparse

from shared.errors import TrainbusError


class InvalidHubModel(TrainbusError, ValueError):
    """Not a HUB model identifier; the message never echoes a key."""


MODEL_ID = re.compile(r"^[A-Za-z0-9]{20}$")
API_KEY = re.compile(r"^[A-Za-z0-9]{42}$")
FORMATS = (
    "a HUB model URL (https://hub.ultralytics.com/models/MODEL_ID), "
    "APIKEY_MODELID (42 + 20 characters) or a 20-character model id"
)


@dataclass(frozen=True, slots=True)
class HubModelRef:
    model_id: str
    api_key: str | None = field(default=None, repr=False)  # only kept to be redacted


def parse_hub_model(identifier: str) -> HubModelRef:
    """Split a user's HUB model identifier; raises ValueError that never echoes a key."""
    text = identifier.strip()
    if text.startswith(("http://", "https://")):
        return _parse_url(text)
    parts = text.split("_")
    if len(parts) == 2 and API_KEY.match(parts[0]) and MODEL_ID.match(parts[1]):
        return HubModelRef(model_id=parts[1], api_key=parts[0])
    if MODEL_ID.match(text):
        return HubModelRef(model_id=text)
    raise InvalidHubModel(f"expected {FORMATS}; got a value of {len(text)} characters")


def looks_like_hub_model(text: str) -> bool:
    """True when ``text`` is a HUB model identifier (used to scrub training args)."""
    try:
        parse_hub_model(text)
    except ValueError:
        return False
    return True


def _parse_url(text: str) -> HubModelRef:
    url = urlparse(text)
    segments = [s for s in url.path.split("/") if s]
    if len(segments) < 2 or segments[-2] != "models" or not MODEL_ID.match(segments[-1]):
        raise InvalidHubModel(f"expected {FORMATS}; the URL path does not end in /models/<20-character id>")
    api_key = parse_qs(url.query).get("api_key", [None])[0]
    return HubModelRef(model_id=segments[-1], api_key=api_key)
