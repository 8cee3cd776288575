"""Settings read from ``TRAINBUS_*`` environment variables, checked once at start-up.

A bad value raises :class:`SettingsError` naming the variable, before any training starts.
Secret values are never echoed in an error.
"""

from __future__ import annotations

import os
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from shared.errors import SettingsError
from shared.events import RUN_ID_PATTERN
from shared.hub_model import HubModelRef, parse_hub_model

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
REDIS_SCHEMES = ("redis", "rediss", "unix")
NAMESPACE_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
# Secrets a training process may have in its environment; never allowed into an event.
SECRET_ENV_VARS = (
    "TRAINBUS_HUB_API_KEY",
    "ULTRALYTICS_API_KEY",
    "CLEARML_API_ACCESS_KEY",
    "CLEARML_API_SECRET_KEY",
)


def default_spool_dir(env: Mapping[str, str]) -> Path:
    """``$XDG_STATE_HOME/trainbus/spool``, else ``~/.local/state/trainbus/spool``."""
    state_home = env.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state_home) / "trainbus" / "spool"


def generate_run_id() -> str:
    """A readable, sortable, unique run id such as ``20261122-023001-3fa9c1``."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


@dataclass(frozen=True)
class Settings:
    """Everything a producer needs; workers extend this with their own settings."""

    redis_url: str = DEFAULT_REDIS_URL
    namespace: str = "trainbus"
    run_id: str = field(default_factory=generate_run_id)
    hub_model: HubModelRef | None = None
    clearml_project: str | None = None
    spool_dir: Path = field(default_factory=lambda: default_spool_dir(os.environ))
    exit_flush_s: float = 5.0
    spool_max_mb: float = 512.0

    def __post_init__(self) -> None:
        check_redis_url("TRAINBUS_REDIS_URL", self.redis_url)
        if not NAMESPACE_PATTERN.match(self.namespace):
            raise SettingsError("TRAINBUS_NAMESPACE", "use 1-64 letters, digits, '.', '_' or '-'")
        if not RUN_ID_PATTERN.match(self.run_id):
            raise SettingsError("TRAINBUS_RUN_ID", f"{self.run_id[:80]!r}: use 1-64 letters, digits, '_' or '-'")
        if self.exit_flush_s < 0:
            raise SettingsError("TRAINBUS_EXIT_FLUSH_S", f"{self.exit_flush_s}: must be >= 0 seconds")
        if self.spool_max_mb <= 0:
            raise SettingsError("TRAINBUS_SPOOL_MAX_MB", f"{self.spool_max_mb}: must be > 0 MB")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        """Settings from the environment; keyword arguments win over variables."""
        env = os.environ if env is None else env
        values: dict[str, object] = {}
        text = _text(env)
        if (v := text("TRAINBUS_REDIS_URL")) is not None:
            values["redis_url"] = v
        if (v := text("TRAINBUS_NAMESPACE")) is not None:
            values["namespace"] = v
        if (v := text("TRAINBUS_RUN_ID")) is not None:
            values["run_id"] = v
        if (v := text("TRAINBUS_HUB_MODEL")) is not None:
            values["hub_model"] = hub_model_setting("TRAINBUS_HUB_MODEL", v)
        if (v := text("TRAINBUS_CLEARML_PROJECT")) is not None:
            values["clearml_project"] = v
        values["spool_dir"] = Path(text("TRAINBUS_SPOOL_DIR") or default_spool_dir(env)).expanduser()
        if (v := text("TRAINBUS_EXIT_FLUSH_S")) is not None:
            values["exit_flush_s"] = number_setting("TRAINBUS_EXIT_FLUSH_S", v, "seconds")
        if (v := text("TRAINBUS_SPOOL_MAX_MB")) is not None:
            values["spool_max_mb"] = number_setting("TRAINBUS_SPOOL_MAX_MB", v, "megabytes")
        if isinstance(overrides.get("hub_model"), str):
            overrides["hub_model"] = hub_model_setting("hub_model", overrides["hub_model"])  # type: ignore[arg-type]
        if "spool_dir" in overrides and overrides["spool_dir"] is not None:
            overrides["spool_dir"] = Path(overrides["spool_dir"]).expanduser()  # type: ignore[arg-type]
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]


def _text(env: Mapping[str, str]):
    def get(name: str) -> str | None:
        value = env.get(name, "").strip()
        return value or None

    return get


def number_setting(variable: str, value: str, unit: str) -> float:
    """Parse a number of ``unit``; the error names the variable and shows an example."""
    try:
        number = float(value)
    except ValueError:
        raise SettingsError(variable, f"{value[:40]!r} is not a number of {unit} (e.g. 5)") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise SettingsError(variable, f"{value!r} is not a finite number of {unit}")
    return number


def hub_model_setting(variable: str, value: str) -> HubModelRef:
    try:
        return parse_hub_model(value)
    except ValueError as exc:
        raise SettingsError(variable, str(exc)) from None


def check_redis_url(variable: str, url: str) -> None:
    """Refuse URLs redis-py would misread later; never echo a password."""
    parsed = urlparse(url)
    if parsed.scheme not in REDIS_SCHEMES:
        raise SettingsError(
            variable,
            f"scheme {parsed.scheme!r} is not one of {', '.join(REDIS_SCHEMES)} (e.g. redis://127.0.0.1:6379/0)",
        )
    if parsed.scheme != "unix" and not parsed.hostname:
        raise SettingsError(variable, "the URL has no host (e.g. redis://127.0.0.1:6379/0)")
    try:
        parsed.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise SettingsError(variable, "the URL's port is not a number between 0 and 65535") from None
    db = parsed.path.lstrip("/")
    if parsed.scheme != "unix" and db and not db.isdigit():
        raise SettingsError(variable, f"database {db[:20]!r} must be a number (e.g. /0)")


def redact_url(url: str) -> str:
    """The URL with any password replaced by ``***``, for logs and errors."""
    parsed = urlparse(url)
    if parsed.password is None:
        return url
    netloc = parsed.netloc.replace(f":{parsed.password}@", ":***@", 1)
    return parsed._replace(netloc=netloc).geturl()
