"""The MLflow tracking server, through MLflow's own client (``MlflowClient``), with bounded calls.

MLflow's client retries on its own for minutes (7 retries with backoff, 120 s timeouts),
which would hold a worker and hide the failure from trainbus's backoff, rate limits and
dead letters. So the worker bounds it: no client-side retries and a timeout per call
(``TRAINBUS_MLFLOW_TIMEOUT_S``), set in the worker's environment before the first call.
Every failure becomes an :class:`MlflowError` saying whether a retry can help.

The tracking URI and credentials are MLflow's own variables (``MLFLOW_TRACKING_URI``,
``MLFLOW_TRACKING_USERNAME``/``PASSWORD``, ``MLFLOW_TRACKING_TOKEN``), read by MLflow; their
values never reach an error message or a log line from here.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from workers.sinks.http import ServiceError, origin

SECRET_VARS = ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
USERINFO = re.compile(r"//[^/@\s]+@")
TRANSPORT = re.compile(r"API request to \S+ failed with (timeout )?exception")
MAX_BATCH_METRICS = 1000  # the tracking API's limits per log_batch call
MAX_BATCH_PARAMS = 100
MAX_PARAM_CHARS = 6000
RETRYABLE_CODES = {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED"}
HINTS = {
    401: "MLflow refused the credentials: check MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD or "
    "MLFLOW_TRACKING_TOKEN in the worker's environment, then `trainbus failed --requeue`",
    403: "MLflow refused access: the worker's MLflow user needs permission on the experiment, "
    "then `trainbus failed --requeue`",
}


class MlflowError(ServiceError):
    """A call to the MLflow tracking server failed; ``code`` is MLflow's error code."""

    def __init__(self, message: str, *, status: int | None, retryable: bool, code: str = "") -> None:
        super().__init__(message, status=status, retryable=retryable)
        self.code = code


class MlflowApi:
    """The calls the MLflow sink makes, each bounded and mapped to :class:`MlflowError`."""

    def __init__(self, tracking_uri: str | None, timeout_s: float) -> None:
        os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"  # trainbus retries, with its own backoff
        os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] = "0"
        os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(max(1, round(timeout_s)))
        os.environ["MLFLOW_ARTIFACT_UPLOAD_DOWNLOAD_TIMEOUT"] = str(max(1, round(timeout_s)))
        try:
            from mlflow import MlflowClient
        except ImportError:
            raise MlflowError(
                "the MLflow sink needs the mlflow client: pip install 'trainbus[mlflow]'",
                status=None,
                retryable=False,
            ) from None
        self.uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or ""
        self.client = MlflowClient(tracking_uri=self.uri or None)

    # -- runs --------------------------------------------------------------------------

    def experiment_id(self, name: str) -> str:
        """The id of the experiment ``name``, created if missing (a racing creator is fine)."""
        with self._call(f"experiment {name!r}"):
            experiment = self.client.get_experiment_by_name(name)
            if experiment is None:
                try:
                    return self.client.create_experiment(name)
                except Exception as exc:
                    if getattr(exc, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
                        raise
                    experiment = self.client.get_experiment_by_name(name)
        if experiment is None or experiment.lifecycle_stage == "deleted":
            raise MlflowError(
                f"MLflow experiment {name!r} is deleted: restore it (mlflow experiments restore) or set "
                "TRAINBUS_MLFLOW_EXPERIMENT to another name, then `trainbus failed --requeue`",
                status=400,
                retryable=False,
            )
        return experiment.experiment_id

    def find_run(self, experiment_id: str, tag: str, value: str) -> str | None:
        """The run of the experiment tagged ``tag=value`` (deleted ones too), if any."""
        from mlflow.entities import ViewType

        with self._call("search runs"):
            runs = self.client.search_runs(
                [experiment_id], filter_string=f"tags.`{tag}` = '{value}'", run_view_type=ViewType.ALL, max_results=1
            )
        return runs[0].info.run_id if runs else None

    def create_run(self, experiment_id: str, name: str, tags: dict[str, str]) -> str:
        with self._call("create run"):
            return self.client.create_run(experiment_id, run_name=name, tags=tags).info.run_id

    def reopen(self, run_id: str) -> None:
        """A run that ended and is resumed runs again."""
        with self._call("reopen run"):
            self.client.update_run(run_id, status="RUNNING")

    def set_terminated(self, run_id: str, status: str) -> None:
        with self._call(f"end run as {status}"):
            self.client.set_terminated(run_id, status)

    # -- data --------------------------------------------------------------------------

    def log_batch(
        self, run_id: str, metrics: list[tuple[str, float, int, int]] = (), params: dict[str, str] | None = None
    ) -> None:
        """Metrics as (key, value, timestamp ms, step), params as key -> value, in one call."""
        from mlflow.entities import Metric, Param

        with self._call("log_batch"):
            self.client.log_batch(
                run_id,
                metrics=[Metric(k, v, ts, step) for k, v, ts, step in metrics],
                params=[Param(k, v) for k, v in (params or {}).items()],
            )

    def metric_steps(self, run_id: str, key: str) -> set[int]:
        """The steps the server holds for one metric of the run."""
        with self._call(f"metric history {key!r}"):
            return {m.step for m in self.client.get_metric_history(run_id, key)}

    def log_artifact(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        with self._call(f"artifact {path.name}"):
            self.client.log_artifact(run_id, str(path), artifact_path)

    @contextlib.contextmanager
    def _call(self, what: str) -> Iterator[None]:
        try:
            yield
        except MlflowError:
            raise
        except Exception as exc:
            raise as_error(exc, what) from None


def as_error(exc: Exception, what: str) -> MlflowError:
    """MLflow's exception (or a transport error) as an :class:`MlflowError`, secrets removed."""
    code = str(getattr(exc, "error_code", "") or "")
    status: int | None = None
    if hasattr(exc, "get_http_status_code"):
        status = int(exc.get_http_status_code())
    message = redact(str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__)[:300]
    if TRANSPORT.search(message):  # MLflow reports a refused or timed-out connection as INTERNAL_ERROR
        status = None
        timed_out = "timeout" in message.lower() or "timed out" in message.lower()
        message = "no answer in time" if timed_out else "cannot reach the server"
        message += f" at {origin(message_url(str(exc)))}"
    retryable = code in RETRYABLE_CODES or status is None or status >= 500 or status in (408, 429)
    hint = HINTS.get(status or 0)
    if retryable:
        text = f"MLflow {what}: {message}; will retry"
    else:
        text = f"MLflow {what}: {message}" + (f"; {hint}" if hint else "")
    return MlflowError(text, status=status, retryable=retryable, code=code)


def message_url(text: str) -> str:
    match = re.search(r"https?://\S+", text)
    return match.group(0) if match else ""


def redact(text: str) -> str:
    """``text`` without the values of MLflow's secret variables or credentials inside URLs."""
    for name in SECRET_VARS:
        secret = os.environ.get(name)
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return USERINFO.sub("//***@", text)


def param_value(value: Any) -> str:
    """A training arg as MLflow stores a param (``str(value)``, as ``mlflow.log_params`` does), cut to
    the server's limit."""
    text = str(value)
    return text if len(text) <= MAX_PARAM_CHARS else text[: MAX_PARAM_CHARS - 3] + "..."
