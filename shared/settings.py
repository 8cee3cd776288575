"""Settings read from ``TRAINBUS_*`` environment variables, checked once at start-up.

A bad value raises :class:`SettingsError` naming the variable, before any training or
uploading starts. Secret values are never echoed in an error or a ``repr``.
"""

from __future__ import annotations

import dataclasses
import os
import re
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

from shared.errors import SettingsError
from shared.events import RUN_ID_PATTERN
from shared.hub_model import HubModelRef, parse_hub_model
from shared.keys import DEFAULT_NAMESPACE
from shared.redis_client import SENTINEL_SCHEMES, is_sentinel, parse_sentinel_url
from shared.sinks import SINKS

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_HUB_API_URL = "https://api.ultralytics.com"
DEFAULT_PLATFORM_URL = "https://platform.ultralytics.com"
REDIS_SCHEMES = ("redis", "rediss", "unix")
NAMESPACE_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
# Secrets a training process may have in its environment; never allowed into an event.
SECRET_ENV_VARS = (
    "TRAINBUS_HUB_API_KEY",
    "TRAINBUS_PLATFORM_API_KEY",
    "ULTRALYTICS_API_KEY",
    "CLEARML_API_ACCESS_KEY",
    "CLEARML_API_SECRET_KEY",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
)

T = TypeVar("T")


def default_spool_dir(env: Mapping[str, str] = os.environ) -> Path:
    """``$XDG_STATE_HOME/trainbus/spool``, else ``~/.local/state/trainbus/spool``."""
    state_home = env.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state_home) / "trainbus" / "spool"


def generate_run_id() -> str:
    """A readable, sortable, unique run id such as ``20261122-023001-3fa9c1``."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def env_field(variable: str, parse: Callable[[str, str], Any], **kwargs: Any) -> Any:
    """A settings field read from ``variable`` with ``parse(variable, text)``."""
    return field(metadata={"env": variable, "parse": parse}, **kwargs)


# -- parsers: (variable, text) -> value, raising SettingsError that names the variable ----


def text_setting(variable: str, value: str) -> str:
    return value


def number_setting(variable: str, value: str, unit: str = "seconds") -> float:
    """Parse a finite number; the error names the variable and shows an example."""
    try:
        number = float(value)
    except ValueError:
        raise SettingsError(variable, f"{value[:40]!r} is not a number of {unit} (e.g. 5)") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise SettingsError(variable, f"{value!r} is not a finite number of {unit}")
    return number


def megabytes_setting(variable: str, value: str) -> float:
    return number_setting(variable, value, "megabytes")


def hours_setting(variable: str, value: str) -> float:
    return number_setting(variable, value, "hours")


def flag_setting(variable: str, value: str) -> bool:
    if value.lower() not in ("0", "1", "true", "false", "yes", "no", "on", "off"):
        raise SettingsError(variable, f"{value[:40]!r}: use 1 or 0")
    return value.lower() in ("1", "true", "yes", "on")


def replicas_setting(variable: str, value: str) -> int:
    if not value.isdigit():
        raise SettingsError(variable, f"{value[:40]!r} is not a whole number (0: do not wait for replicas)")
    return int(value)


def count_setting(variable: str, value: str) -> int:
    """A whole number of at least 1 (requests per window, say)."""
    if not value.isdigit() or int(value) < 1:
        raise SettingsError(variable, f"{value[:40]!r} is not a whole number of at least 1 (e.g. 100)")
    return int(value)


def path_setting(variable: str, value: str) -> Path:
    return Path(value).expanduser()


def paths_setting(variable: str, value: str) -> tuple[Path, ...]:
    """``os.pathsep``-separated directories; each must exist (workers read files there)."""
    roots = tuple(Path(p).expanduser().resolve() for p in value.split(os.pathsep) if p.strip())
    for root in roots:
        if not root.is_dir():
            raise SettingsError(variable, f"{str(root)!r} is not a directory")
    return roots


def sinks_setting(variable: str, value: str) -> tuple[str, ...]:
    sinks = tuple(s.strip() for s in value.split(",") if s.strip())
    unknown = [s for s in sinks if s not in SINKS]
    if unknown or not sinks:
        raise SettingsError(variable, f"{value!r}: use a comma-separated list of {', '.join(SINKS)}")
    return sinks


def hub_model_setting(variable: str, value: str) -> HubModelRef:
    try:
        return parse_hub_model(value)
    except ValueError as exc:
        raise SettingsError(variable, str(exc)) from None


def redis_url_setting(variable: str, url: str) -> str:
    """Refuse URLs redis-py would misread later; never echo a password."""
    if is_sentinel(url):
        try:
            parse_sentinel_url(url)
        except ValueError as exc:
            raise SettingsError(variable, str(exc)) from None
        return url
    parsed = urlparse(url)
    if parsed.scheme not in REDIS_SCHEMES:
        raise SettingsError(
            variable,
            f"scheme {parsed.scheme!r} is not one of {', '.join(REDIS_SCHEMES + SENTINEL_SCHEMES)} "
            "(e.g. redis://127.0.0.1:6379/0)",
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
    return url


def http_url_setting(variable: str, url: str) -> str:
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise SettingsError(variable, "expected an http(s) URL with a host, e.g. https://platform.ultralytics.com")
    return url.rstrip("/")


def namespace_setting(variable: str, value: str) -> str:
    if not NAMESPACE_PATTERN.match(value):
        raise SettingsError(variable, "use 1-64 letters, digits, '.', '_' or '-'")
    return value


def run_id_setting(variable: str, value: str) -> str:
    if not RUN_ID_PATTERN.match(value):
        raise SettingsError(variable, f"{value[:80]!r}: use 1-64 letters, digits, '_' or '-'")
    return value


def positive(variable: str, value: float) -> None:
    if value <= 0:
        raise SettingsError(variable, f"{value}: must be > 0")


def from_env(cls: type[T], env: Mapping[str, str] | None, overrides: Mapping[str, Any]) -> T:
    """Build ``cls`` from its fields' variables; keyword overrides win and are parsed too."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        variable, parse = f.metadata.get("env"), f.metadata.get("parse")
        if variable is None:
            continue
        given = overrides.get(f.name)
        if given is not None:
            values[f.name] = parse(variable, given) if isinstance(given, str) else given
        elif text := env.get(variable, "").strip():
            values[f.name] = parse(variable, text)
    return cls(**values)


def check(variable: str, ok: bool, problem: str) -> None:
    if not ok:
        raise SettingsError(variable, problem)


@dataclass(frozen=True)
class Settings:
    """What a training process needs (the producers)."""

    redis_url: str = env_field("TRAINBUS_REDIS_URL", redis_url_setting, default=DEFAULT_REDIS_URL)
    namespace: str = env_field("TRAINBUS_NAMESPACE", namespace_setting, default=DEFAULT_NAMESPACE)
    run_id: str = env_field("TRAINBUS_RUN_ID", run_id_setting, default_factory=generate_run_id)
    hub_model: HubModelRef | None = env_field("TRAINBUS_HUB_MODEL", hub_model_setting, default=None)
    clearml_project: str | None = env_field("TRAINBUS_CLEARML_PROJECT", text_setting, default=None)
    spool_dir: Path = env_field("TRAINBUS_SPOOL_DIR", path_setting, default_factory=default_spool_dir)
    exit_flush_s: float = env_field("TRAINBUS_EXIT_FLUSH_S", number_setting, default=5.0)
    spool_max_mb: float = env_field("TRAINBUS_SPOOL_MAX_MB", megabytes_setting, default=512.0)
    # A spool record goes only once WAIT says this many replicas hold it (a failover cannot lose it).
    redis_min_replicas: int = env_field("TRAINBUS_REDIS_MIN_REPLICAS", replicas_setting, default=0)
    console: bool = env_field("TRAINBUS_CONSOLE", flag_setting, default=True)
    snapshot_retention_h: float = env_field("TRAINBUS_SNAPSHOT_RETENTION_H", hours_setting, default=24.0)

    def __post_init__(self) -> None:
        check("TRAINBUS_EXIT_FLUSH_S", self.exit_flush_s >= 0, f"{self.exit_flush_s}: must be >= 0 seconds")
        check("TRAINBUS_SPOOL_MAX_MB", self.spool_max_mb > 0, f"{self.spool_max_mb}: must be > 0 MB")
        positive("TRAINBUS_SNAPSHOT_RETENTION_H", self.snapshot_retention_h)

    @property
    def snapshot_retention_s(self) -> float:
        """Snapshots go this long after their run's last file changed, even if a sink never finished."""
        return self.snapshot_retention_h * 3600

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Settings from the environment; keyword arguments win over variables."""
        return from_env(cls, env, overrides)


@dataclass(frozen=True)
class WorkerSettings:
    """What the dispatcher and the workers need. Rates are minimum seconds between requests."""

    redis_url: str = env_field("TRAINBUS_REDIS_URL", redis_url_setting, default=DEFAULT_REDIS_URL)
    namespace: str = env_field("TRAINBUS_NAMESPACE", namespace_setting, default=DEFAULT_NAMESPACE)
    sinks: tuple[str, ...] = env_field("TRAINBUS_SINKS", sinks_setting, default=("platform",))
    hub_api_url: str = env_field("TRAINBUS_HUB_API_URL", http_url_setting, default=DEFAULT_HUB_API_URL)
    hub_api_key: str | None = env_field("TRAINBUS_HUB_API_KEY", text_setting, default=None, repr=False)
    hub_timeout_s: float = env_field("TRAINBUS_HUB_TIMEOUT_S", number_setting, default=60.0)
    clearml_timeout_s: float = env_field("TRAINBUS_CLEARML_TIMEOUT_S", number_setting, default=30.0)
    rate_metrics: float = env_field("TRAINBUS_RATE_METRICS", number_setting, default=3.0)
    rate_ckpt: float = env_field("TRAINBUS_RATE_CKPT", number_setting, default=900.0)
    rate_heartbeat: float = env_field("TRAINBUS_RATE_HEARTBEAT", number_setting, default=300.0)
    file_roots: tuple[Path, ...] = env_field(
        "TRAINBUS_FILE_ROOTS", paths_setting, default_factory=lambda: (default_spool_dir().resolve(),)
    )
    group_abandon_h: float = env_field("TRAINBUS_GROUP_ABANDON_H", hours_setting, default=24.0)
    # The dispatcher handles entries only once WAIT says this many replicas hold them.
    redis_min_replicas: int = env_field("TRAINBUS_REDIS_MIN_REPLICAS", replicas_setting, default=0)
    platform_url: str = env_field("TRAINBUS_PLATFORM_URL", http_url_setting, default=DEFAULT_PLATFORM_URL)
    platform_api_key: str | None = env_field("TRAINBUS_PLATFORM_API_KEY", text_setting, default=None, repr=False)
    # Compose cannot say "this URL unless a key is set": the stack sets this to its devstack's local Platform.
    platform_dev_url: str | None = env_field("TRAINBUS_PLATFORM_DEV_URL", http_url_setting, default=None)
    platform_project: str | None = env_field("TRAINBUS_PLATFORM_PROJECT", text_setting, default=None)
    platform_timeout_s: float = env_field("TRAINBUS_PLATFORM_TIMEOUT_S", number_setting, default=30.0)
    # The Platform's documented limits, per API key: 100 requests a minute, 10 uploads a minute.
    platform_events_per_min: int = env_field("TRAINBUS_PLATFORM_EVENTS_PER_MIN", count_setting, default=100)
    platform_uploads_per_min: int = env_field("TRAINBUS_PLATFORM_UPLOADS_PER_MIN", count_setting, default=10)
    platform_window_s: float = env_field("TRAINBUS_PLATFORM_WINDOW_S", number_setting, default=60.0)
    # MLflow reads its credentials itself (MLFLOW_TRACKING_USERNAME/PASSWORD, MLFLOW_TRACKING_TOKEN).
    mlflow_tracking_uri: str | None = env_field("MLFLOW_TRACKING_URI", text_setting, default=None)
    mlflow_experiment: str | None = env_field("TRAINBUS_MLFLOW_EXPERIMENT", text_setting, default=None)
    mlflow_timeout_s: float = env_field("TRAINBUS_MLFLOW_TIMEOUT_S", number_setting, default=30.0)

    def __post_init__(self) -> None:
        positive("TRAINBUS_GROUP_ABANDON_H", self.group_abandon_h)
        positive("TRAINBUS_PLATFORM_TIMEOUT_S", self.platform_timeout_s)
        positive("TRAINBUS_PLATFORM_WINDOW_S", self.platform_window_s)
        positive("TRAINBUS_RATE_METRICS", self.rate_metrics)
        positive("TRAINBUS_RATE_CKPT", self.rate_ckpt)
        positive("TRAINBUS_RATE_HEARTBEAT", self.rate_heartbeat)
        positive("TRAINBUS_HUB_TIMEOUT_S", self.hub_timeout_s)
        positive("TRAINBUS_CLEARML_TIMEOUT_S", self.clearml_timeout_s)
        positive("TRAINBUS_MLFLOW_TIMEOUT_S", self.mlflow_timeout_s)

    @property
    def group_abandon_s(self) -> float:
        return self.group_abandon_h * 3600

    @property
    def platform_target(self) -> str:
        """Where the Platform sink delivers: TRAINBUS_PLATFORM_DEV_URL while no API key is set, if given."""
        if self.platform_dev_url and not self.platform_api_key:
            return self.platform_dev_url
        return self.platform_url

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> WorkerSettings:
        return from_env(cls, env, overrides)


def redact_url(url: str) -> str:
    """The URL with any password replaced by ``***``, for logs and errors."""
    parsed = urlparse(url)
    query = re.sub(r"(sentinel_password=)[^&]*", r"\1***", parsed.query)
    netloc = parsed.netloc
    if parsed.password is not None:
        netloc = netloc.replace(f":{parsed.password}@", ":***@", 1)
    if (netloc, query) == (parsed.netloc, parsed.query):
        return url
    return parsed._replace(netloc=netloc, query=query).geturl()
