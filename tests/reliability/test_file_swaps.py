"""A file checked below TRAINBUS_FILE_ROOTS and swapped for a symlink before it is read is never sent.

Anything that can write below a root (a training container sharing the volume) can replace a
checked file with a link to a file outside the roots between the check and the read. Real
workers, a real HUB server, real ClearML offline sessions, real swaps while they read.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import time
from pathlib import Path

import pytest

from shared.events import encode_event
from tests.helpers import children, wait_for
from tests.pipeline import MODEL_ID, Pipeline

SECRET = b"TOP-SECRET-OUTSIDE-THE-ROOTS "


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    path = tmp_path / "outside" / "secret.bin"
    path.parent.mkdir()
    path.write_bytes(b"\xff\xd8" + SECRET * 40_000 + b"\xff\xd9")
    return path


def swap_for_link(path: Path, target: Path) -> None:
    """Atomically replace ``path`` with a symlink to ``target`` (what an attacker does)."""
    tmp = path.with_name(path.name + ".swap")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    os.rename(tmp, path)


def opened_by(pids: list[int], path: Path) -> bool:
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == str(path):
                        return True
    return False


def test_a_checkpoint_swapped_for_a_link_after_its_check_is_never_uploaded(
    redis_url, namespace, hub, spool_dir, client, keys, secret
):
    """The worker opens the snapshot to check its sha256; right then the path becomes a link to a
    secret. Whatever HUB receives must be the checked bytes."""
    pipeline = Pipeline(redis_url, namespace, hub, spool_dir)
    try:
        snapshot = spool_dir / "swap" / "000000000001-final.pt"
        snapshot.parent.mkdir(parents=True)
        snapshot.write_bytes(os.urandom(1 << 20) * 48)  # big enough that reading it takes a while
        sha = hashlib.sha256(snapshot.read_bytes()).hexdigest()
        for seq, (kind, payload) in enumerate(
            [
                ("session", {"args": {"epochs": 1}, "name": "swap", "hub_model_id": MODEL_ID}),
                ("final", {"epoch": 0, "metrics": {}, "checkpoint": {"path": str(snapshot), "sha256": sha}}),
                ("run_end", {"status": "completed"}),
            ]
        ):
            client.xadd(keys.events, {"event": encode_event("swap", seq, 1.0 + seq, kind, payload)})
        swapped = threading.Event()
        worker = pipeline.worker("hub")

        def attacker() -> None:
            while not swapped.is_set():
                if opened_by([worker.pid, *children(worker.pid)], snapshot):
                    swap_for_link(snapshot, secret)
                    swapped.set()
                time.sleep(0.0005)

        threading.Thread(target=attacker, daemon=True).start()
        pipeline.dispatcher()
        wait_for(lambda: client.hget(keys.state("hub", "swap"), "final_done"), timeout=90)
        assert swapped.is_set(), "the swap happened while the worker had the file open"
        uploads = hub.requests("upload", status=None)
        secret_sha = hashlib.sha256(secret.read_bytes()).hexdigest()
        for upload in uploads:
            for part in upload.get("files", {}).values():
                assert part["sha256"] != secret_sha, "the secret was uploaded"
                assert part["sha256"] == sha, "what HUB received is the checked snapshot"
        assert [u["status"] for u in uploads] == [200], "the checked bytes were uploaded, once"
    finally:
        pipeline.stop()


def test_media_files_flipped_between_a_file_and_a_link_never_leak_into_clearml(
    redis_url, namespace, hub, spool_dir, client, keys, secret, tmp_path
):
    """An attacker keeps flipping 30 debug images between real images and links to a secret while
    the ClearML worker reports them: no byte of the secret reaches the ClearML session."""
    from PIL import Image

    cache = tmp_path / "clearml-cache"
    run_dir = tmp_path / "runs" / "flip"
    pristine = tmp_path / "runs" / "pristine"
    run_dir.mkdir(parents=True)
    pristine.mkdir()
    names = [f"val_batch{i}_pred.jpg" for i in range(30)]
    for name in names:
        Image.new("RGB", (16, 16), (10, 200, 10)).save(pristine / name)
        os.link(pristine / name, run_dir / name)
    pipeline = Pipeline(
        redis_url,
        namespace,
        hub,
        spool_dir,
        TRAINBUS_SINKS="clearml",
        TRAINBUS_FILE_ROOTS=f"{spool_dir}:{tmp_path / 'runs'}",
        CLEARML_OFFLINE_MODE="1",
        CLEARML_CACHE_DIR=cache,
    )
    stop = threading.Event()

    def attacker() -> None:
        while not stop.is_set():
            for name in names:
                swap_for_link(run_dir / name, secret)
                tmp = run_dir / f".{name}.back"
                tmp.unlink(missing_ok=True)
                os.link(pristine / name, tmp)
                os.rename(tmp, run_dir / name)
                time.sleep(0)

    flipper = threading.Thread(target=attacker, daemon=True)
    try:
        pipeline.dispatcher()
        pipeline.worker("clearml")
        flipper.start()
        events = [("session", {"args": {"epochs": 10}, "name": "flip", "project": "swaps"})]
        events += [("media", {"kind": "debug", "title": "Validation", "paths": [str(run_dir / n) for n in names]})] * 10
        for seq, (kind, payload) in enumerate([*events, ("run_end", {"status": "completed"})]):
            client.xadd(keys.events, {"event": encode_event("flip", seq, time.time(), kind, payload)})
            time.sleep(0.3)
        wait_for(lambda: client.hget(keys.state("clearml", "flip"), "ended"), timeout=120)
    finally:
        stop.set()
        flipper.join()
        pipeline.stop()
    leaked = [p for p in cache.rglob("*") if p.is_file() and SECRET in p.read_bytes()]
    assert not leaked, f"the secret reached ClearML: {leaked}"
    (session,) = [p.parent for p in (cache / "offline").glob("*/task.json")]
    reported = [e for line in (session / "metrics.jsonl").read_text().splitlines() for e in json.loads(line)]
    assert any(e["type"] == "training_debug_image" for e in reported), "images that were files at open were reported"
