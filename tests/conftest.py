"""Fixtures: a real Redis (the machine's, or one started here), a namespace per test."""

from __future__ import annotations

import atexit
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import redis

from shared.keys import Keys
from tests.helpers import delivery_processes, kill_drainers, wait_for
from workers.devstack.embedded_redis import RedisServer

DEFAULT_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """TRAINBUS_TEST_REDIS_URL or the local Redis; a redis-server of our own if neither answers."""
    url = os.environ.get("TRAINBUS_TEST_REDIS_URL", DEFAULT_URL)
    try:
        redis.Redis.from_url(url, socket_connect_timeout=1).ping()
        yield url
        return
    except redis.ConnectionError:
        pass
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def no_drainer_left(tmp_path: Path) -> Iterator[None]:
    """Drainers the test's publishers started (for a Redis the test stopped, or for snapshots
    waiting for sinks the test never ran) end with the test."""
    yield

    def none_left() -> bool:  # a delivery process may start a drainer as it dies
        kill_drainers(tmp_path)
        return not delivery_processes(tmp_path)

    wait_for(none_left, timeout=10)


@pytest.fixture(scope="session", autouse=True)
def no_drainer_left_at_exit(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Publishers a test left open close at interpreter exit and may start a drainer then:
    an exit handler registered before theirs runs after them (exit handlers run last first)."""
    atexit.register(kill_drainers, tmp_path_factory.getbasetemp())


@pytest.fixture
def namespace(redis_url: str) -> Iterator[str]:
    """A fresh key namespace; its keys are removed after the test."""
    ns = f"test-{uuid.uuid4().hex[:12]}"
    yield ns
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"{ns}:*", count=1000))
    if keys:
        client.delete(*keys)


@pytest.fixture
def keys(namespace: str) -> Keys:
    return Keys(namespace)


@pytest.fixture
def client(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


@pytest.fixture
def spool_dir(tmp_path: Path) -> Path:
    return tmp_path / "spool"


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server on a free port that the test may stop and start (not started yet)."""
    server = RedisServer(tmp_path / "own-redis")
    yield server
    server.stop()


@pytest.fixture
def hub() -> Iterator:
    """The local HUB server as a process, knowing the model id the pipeline tests use."""
    from tests.pipeline import MODEL_ID, HubServer

    server = HubServer(MODEL_ID)
    yield server
    server.stop()


@pytest.fixture
def clearml() -> Iterator:
    """The ClearML test server as a process."""
    from tests.pipeline import ClearmlServer

    server = ClearmlServer()
    yield server
    server.stop()


@pytest.fixture
def platform() -> Iterator:
    """The local Platform server as a process, knowing the key the pipeline tests use."""
    from tests.pipeline import PlatformServer

    server = PlatformServer()
    yield server
    server.stop()


def stream_events(client: redis.Redis, keys: Keys) -> list[dict]:
    """Every event on the stream, decoded, in stream order."""
    return [orjson.loads(fields[b"event"]) for _, fields in client.xrange(keys.events)]


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """A real `mlflow server` (SQLite, local artifacts) for the whole session. Without basic auth,
    which checks a password hash on every request (about 0.2 s here); the credentials test
    starts one with it."""
    pytest.importorskip("mlflow", reason="the MLflow tests need mlflow: pip install -e '.[test]'")
    from workers.devstack.local_mlflow import MlflowServer

    server = MlflowServer(tmp_path_factory.mktemp("mlflow"), auth=False).start()
    yield server
    server.stop()


@pytest.fixture
def mlflow_uri(request: pytest.FixtureRequest) -> str | None:
    """The session's MLflow server's URL for the benchmarks' smoke runs; None without mlflow (they
    then print that they skip their MLflow rows)."""
    try:
        import mlflow.server  # noqa: F401
    except ImportError:
        return None
    return request.getfixturevalue("mlflow_server").url


@pytest.fixture
def mlflow_proxy(mlflow_server) -> Iterator:
    """A faulting HTTP proxy in front of the session's MLflow server, for one test."""
    from workers.devstack.local_mlflow import ProxyServer

    proxy = ProxyServer(mlflow_server.url)
    yield proxy
    proxy.stop()
