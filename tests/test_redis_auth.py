"""Redis with a password and an ACL user, and over TLS, end to end; pickled jobs are never unpickled."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
from pathlib import Path

import pytest
import redis
from rq import Queue

from producers import Publisher
from tests.helpers import children, wait_for
from tests.pipeline import MODEL_ID, ROOT, Pipeline, metrics_by_epoch, train
from workers.devstack.embedded_redis import RedisServer, free_port
from workers.pipeline.rq_worker import worker_command, worker_env

USER, PASSWORD = "trainbus", "s3cret-acl-password"


def delivered_through(url: str, namespace: str, hub, spool_dir: Path, workdir: Path) -> Pipeline:
    """A dispatcher and a worker on this Redis URL; a 3-epoch run reaches HUB through them."""
    p = Pipeline(url, namespace, hub, spool_dir)
    p.dispatcher()
    p.worker()
    with Publisher(
        redis_url=url, namespace=namespace, spool_dir=spool_dir, run_id=workdir.name, hub_model=MODEL_ID
    ) as bus:
        sent = train(bus, workdir, epochs=3)
    wait_for(lambda: sorted(metrics_by_epoch(hub, MODEL_ID)) == [0, 1, 2], timeout=60)
    assert {e: v for e, v in metrics_by_epoch(hub, MODEL_ID).items()} == {e: [sent[e]] for e in range(3)}
    return p


def test_an_acl_user_with_a_password_works_end_to_end_and_is_never_logged(tmp_path, namespace, hub, spool_dir):
    server = RedisServer(
        tmp_path / "acl-redis",
        None,
        "--requirepass",
        "admin-password-1",
        "--user",
        "default",
        "off",
        "--user",
        USER,
        "on",
        f">{PASSWORD}",
        "~*",
        "&*",
        "+@all",
    )
    server.start()
    url = f"redis://{USER}:{PASSWORD}@127.0.0.1:{server.port}/0"
    try:
        assert redis.Redis.from_url(url).ping()
        p = delivered_through(url, namespace, hub, spool_dir, tmp_path / "acl")
        for proc in p.procs:  # what `ps` shows: the URL travels in RQ_REDIS_URL, not in a worker's arguments
            for pid in (proc.pid, *children(proc.pid)):
                assert PASSWORD.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
        p.stop()
        logs = b"".join(path.read_bytes() for path in spool_dir.glob("proc-*.log"))
        assert PASSWORD.encode() not in logs
    finally:
        server.stop()


def make_certificates(directory: Path) -> None:
    """A throwaway CA and a server certificate for 127.0.0.1, made with openssl."""
    if not shutil.which("openssl"):
        pytest.skip("openssl is needed to make test certificates")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    directory.mkdir(parents=True)
    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "1",
        "-subj",
        "/CN=ca",
    )
    (directory / "san").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=x")
    openssl(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "1",
        "-extfile",
        "san",
    )


def test_rediss_with_a_verified_certificate_works_end_to_end(tmp_path, namespace, hub, spool_dir):
    certs = tmp_path / "certs"
    make_certificates(certs)
    tls_port = free_port()
    server = RedisServer(
        tmp_path / "tls-redis",
        None,
        "--tls-port",
        str(tls_port),
        "--tls-cert-file",
        str(certs / "server.crt"),
        "--tls-key-file",
        str(certs / "server.key"),
        "--tls-ca-cert-file",
        str(certs / "ca.crt"),
        "--tls-auth-clients",
        "no",
    )
    try:
        server.start()
    except RuntimeError:
        pytest.skip("this redis-server was built without TLS")
    url = f"rediss://127.0.0.1:{tls_port}/0?ssl_cert_reqs=required&ssl_ca_certs={certs / 'ca.crt'}"
    try:
        p = delivered_through(url, namespace, hub, spool_dir, tmp_path / "tls")
        untrusted = p.cli("status", TRAINBUS_REDIS_URL=f"rediss://127.0.0.1:{tls_port}/0")
        assert untrusted.returncode == 1 and "certificate verify failed" in untrusted.stderr
        p.stop()
    finally:
        server.stop()


class Boom:
    """A pickle that, if ever unpickled, writes a file: the worker must never do that."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickled_job_is_refused_not_unpickled(redis_url, namespace, keys, tmp_path):
    marker = tmp_path / "unpickled"
    client = redis.Redis.from_url(redis_url)
    queue = Queue(keys.queue("hub"), connection=client)  # RQ's default serializer: pickle
    job = queue.enqueue(print, Boom(str(marker)))
    assert pickle.loads(pickle.dumps(Boom(str(tmp_path / "control")))) is not None  # the payload does work
    (tmp_path / "control").unlink()
    worker = subprocess.run(
        [*worker_command(keys.queue("hub")), "--burst"],
        env=worker_env(os.environ, redis_url),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert worker.returncode == 0, worker.stderr
    assert not marker.exists(), "the worker unpickled a job"
    assert "DeserializationError" in worker.stderr, "refused, with the reason in the log"
    assert client.hget(f"rq:job:{job.id}", "status") == b"failed"
    job.delete()  # other tests read every job in Redis as JSON
