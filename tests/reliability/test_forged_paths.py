"""Whatever path an event names, workers read and upload only files below TRAINBUS_FILE_ROOTS.

Forged events go straight onto the stream (as anyone with write access to Redis could
write them), with the right sha256 of the files they point at, to real workers.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from shared.events import encode_event
from tests.helpers import wait_for
from tests.pipeline import MODEL_ID, Pipeline

OUTSIDE = Path("/etc/passwd")


@pytest.fixture
def pipeline(redis_url, namespace, hub, spool_dir, tmp_path):
    p = Pipeline(
        redis_url,
        namespace,
        hub,
        spool_dir,
        TRAINBUS_SINKS="hub,clearml",
        CLEARML_OFFLINE_MODE="1",
        CLEARML_CACHE_DIR=tmp_path / "clearml-cache",
    )
    yield p
    p.stop()


def test_forged_paths_outside_the_roots_are_never_read_or_uploaded(pipeline, hub, spool_dir, client, keys, tmp_path):
    secret = OUTSIDE.read_bytes()
    sha = hashlib.sha256(secret).hexdigest()
    escape = spool_dir / "looks-inside.pt"
    escape.symlink_to(OUTSIDE)
    events = [
        ("session", {"args": {"epochs": 1}, "name": "forged", "hub_model_id": MODEL_ID}),
        ("checkpoint", {"epoch": 0, "checkpoint": {"path": str(OUTSIDE), "sha256": sha}}),
        ("media", {"kind": "debug", "title": "Leak", "paths": [str(OUTSIDE)]}),
        ("media", {"kind": "plot", "title": "Glob", "dir": "/etc", "pattern": "passwd"}),
        ("media", {"kind": "plot", "title": "Dots", "dir": str(spool_dir / ".." / ".." / ".."), "names": ["passwd"]}),
        ("final", {"epoch": 0, "metrics": {}, "checkpoint": {"path": str(escape), "sha256": sha}}),
        ("run_end", {"status": "completed"}),
    ]
    for seq, (kind, payload) in enumerate(events):
        client.xadd(keys.events, {"event": encode_event("forged", seq, 1.0 + seq, kind, payload)})
    pipeline.dispatcher()
    pipeline.worker("hub")
    pipeline.worker("clearml")

    def reasons() -> list[str]:
        return [fields[b"reason"].decode() for _, fields in client.xrange(keys.dead_letters)]

    wait_for(lambda: len(reasons()) >= 6, timeout=90)
    assert sum("outside TRAINBUS_FILE_ROOTS" in r for r in reasons()) >= 4, "\n".join(reasons())
    assert sum("is a symbolic link" in r for r in reasons()) == 2, "the final's link, once per sink"
    assert not hub.requests("upload", status=None), "nothing was uploaded to HUB"
    wait_for(lambda: client.hget(keys.state("hub", "forged"), "final_done"), timeout=30)
    for path in (tmp_path / "clearml-cache").rglob("*"):
        assert not path.is_file() or secret not in path.read_bytes(), f"{path} holds the file"
