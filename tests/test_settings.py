"""Settings: defaults, errors that name the variable, HUB keys stripped and never echoed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from shared.errors import SettingsError
from shared.hub_model import parse_hub_model
from shared.settings import Settings, WorkerSettings, redact_url
from workers.pipeline.rq_worker import worker_command, worker_env

ROOT = Path(__file__).resolve().parents[1]
KEY = "k" * 42
MODEL = "AbCdEfGhIjKlMnOpQrSt"


def test_defaults():
    s = Settings.from_env({"HOME": "/home/u"})
    assert s.redis_url == "redis://127.0.0.1:6379/0"
    assert s.namespace == "trainbus"
    assert s.exit_flush_s == 5.0
    assert s.hub_model is None and s.clearml_project is None
    assert s.spool_dir == Path.home() / ".local/state/trainbus/spool"
    assert len(s.run_id) > 10


def test_environment_and_overrides():
    env = {
        "TRAINBUS_REDIS_URL": "rediss://user:pw@redis.example:6380/2",
        "TRAINBUS_RUN_ID": "exp_7-a",
        "TRAINBUS_HUB_MODEL": f"{KEY}_{MODEL}",
        "TRAINBUS_CLEARML_PROJECT": "detectors",
        "TRAINBUS_SPOOL_DIR": "/tmp/spool-x",
        "TRAINBUS_EXIT_FLUSH_S": "1.5",
    }
    s = Settings.from_env(env, exit_flush_s=0.5)
    assert s.run_id == "exp_7-a" and s.clearml_project == "detectors"
    assert s.hub_model.model_id == MODEL and s.hub_model.api_key == KEY
    assert KEY not in repr(s)
    assert s.spool_dir == Path("/tmp/spool-x") and s.exit_flush_s == 0.5


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("TRAINBUS_REDIS_URL", "http://x:6379", "scheme 'http'"),
        ("TRAINBUS_REDIS_URL", "redis://:6379/0", "no host"),
        ("TRAINBUS_REDIS_URL", "redis://h:99999/0", "port"),
        ("TRAINBUS_REDIS_URL", "redis://h:6379/db", "database 'db'"),
        ("TRAINBUS_RUN_ID", "has space", "letters, digits"),
        ("TRAINBUS_EXIT_FLUSH_S", "soon", "not a number of seconds"),
        ("TRAINBUS_EXIT_FLUSH_S", "-1", "must be >= 0"),
        ("TRAINBUS_SPOOL_MAX_MB", "0", "must be > 0"),
        ("TRAINBUS_HUB_MODEL", "nope", "HUB model URL"),
    ],
)
def test_bad_values_name_the_variable(variable, value, message):
    with pytest.raises(SettingsError) as err:
        Settings.from_env({variable: value})
    assert err.value.variable == variable
    assert str(err.value).startswith(f"{variable}: ") and message in str(err.value)


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("TRAINBUS_RATE_METRICS", "0", "must be > 0"),
        ("TRAINBUS_RATE_CKPT", "-5", "must be > 0"),
        ("TRAINBUS_RATE_HEARTBEAT", "every minute", "not a number of seconds"),
        ("TRAINBUS_HUB_TIMEOUT_S", "0", "must be > 0"),
        ("TRAINBUS_HUB_API_URL", "api.ultralytics.com", "http(s) URL with a host"),
        ("TRAINBUS_HUB_API_URL", "ftp://x", "http(s) URL with a host"),
        ("TRAINBUS_SINKS", "hub,wandb", "wandb"),
        ("TRAINBUS_REDIS_URL", "redis://u:hunter2secret@:6379/0", "no host"),
    ],
)
def test_bad_worker_values_name_the_variable(variable, value, message):
    with pytest.raises(SettingsError) as err:
        WorkerSettings.from_env({variable: value})
    assert err.value.variable == variable and message in str(err.value)
    assert "hunter2secret" not in str(err.value)


def test_workers_and_dispatchers_refuse_to_start_on_a_bad_setting(redis_url):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRAINBUS_RATE_CKPT": "-1", "TRAINBUS_NAMESPACE": "test-bad-setting"}
    for command in (
        worker_command("test-bad-setting.hub-uploads"),
        [sys.executable, "-m", "workers.ops.cli", "dispatch"],
    ):
        out = subprocess.run(
            command, env=worker_env(env, redis_url), cwd=ROOT, capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 2, out.stderr
        assert "TRAINBUS_RATE_CKPT: -1.0: must be > 0" in out.stderr


def test_a_bad_hub_identifier_never_echoes_the_key():
    with pytest.raises(SettingsError) as err:
        Settings.from_env({"TRAINBUS_HUB_MODEL": f"{KEY}_short"})
    assert KEY not in str(err.value)


@pytest.mark.parametrize(
    "identifier",
    [
        f"https://hub.ultralytics.com/models/{MODEL}",
        f"https://hub.ultralytics.com/models/{MODEL}/",
        f"https://hub.ultralytics.com/models/{MODEL}?api_key={KEY}",
        f"{KEY}_{MODEL}",
        MODEL,
    ],
)
def test_hub_identifiers_reduce_to_the_model_id(identifier):
    assert parse_hub_model(identifier).model_id == MODEL


def test_redact_url():
    assert redact_url("redis://u:secret@h:1/0") == "redis://u:***@h:1/0"
    assert redact_url("redis://h:1/0") == "redis://h:1/0"


def test_sentinel_urls_are_parsed_and_bad_ones_say_what_is_wrong():
    from shared.redis_client import parse_sentinel_url
    from shared.settings import redact_url

    url = "rediss+sentinel://app:p%40ss@10.0.0.1:26379,10.0.0.2:26380/main/2?sentinel_password=zq9x&ssl_ca_certs=/ca"
    assert Settings.from_env({"TRAINBUS_REDIS_URL": url}).redis_url == url
    s = parse_sentinel_url(url)
    assert s.sentinels == (("10.0.0.1", 26379), ("10.0.0.2", 26380)) and (s.master, s.db) == ("main", 2)
    assert (s.username, s.password, s.sentinel_password) == ("app", "p@ss", "zq9x")
    assert s.tls == {"ssl": True, "ssl_ca_certs": "/ca"}
    assert "p%40ss" not in redact_url(url) and "zq9x" not in redact_url(url)
    for bad, says in [
        ("redis+sentinel:///main/0", "no sentinel addresses"),
        ("redis+sentinel://h:1/", "/MASTER_NAME"),
        ("redis+sentinel://h:port/main", "not host:port"),
        ("redis+sentinel://h:1/main/x", "must be a number"),
    ]:
        with pytest.raises(SettingsError, match=says):
            Settings.from_env({"TRAINBUS_REDIS_URL": bad})


def test_min_replicas_is_a_whole_number():
    assert Settings.from_env({"TRAINBUS_REDIS_MIN_REPLICAS": "1"}).redis_min_replicas == 1
    assert WorkerSettings.from_env({}).redis_min_replicas == 0
    with pytest.raises(SettingsError, match="TRAINBUS_REDIS_MIN_REPLICAS"):
        Settings.from_env({"TRAINBUS_REDIS_MIN_REPLICAS": "-1"})
