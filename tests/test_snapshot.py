"""Checkpoint snapshots: never torn, hashed, labelled, and only what can still be uploaded kept."""

from __future__ import annotations

import hashlib
import os
import threading
import time

import pytest
import torch

from producers import Publisher
from producers.snapshot import SnapshotError, Stamp, take_snapshot
from tests.conftest import stream_events
from tests.helpers import wait_for


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_checkpoint(path, seed: int, numel: int = 1_000_000) -> None:
    """What Ultralytics does: rewrite the same file in place (same inode)."""
    torch.manual_seed(seed)
    buf = path.with_suffix(".buf")
    torch.save({"epoch": seed, "w": torch.randn(numel)}, buf)
    data = buf.read_bytes()
    buf.unlink()
    with open(path, "r+b" if path.exists() else "wb") as f:
        f.truncate(0)
        f.write(data)


def rewrite_in_place_slowly(path, data: bytes, chunks: int = 64) -> None:
    with open(path, "r+b") as f:
        f.truncate(0)
        step = len(data) // chunks + 1
        for i in range(0, len(data), step):
            f.write(data[i : i + step])
            f.flush()
            time.sleep(0.0005)


def test_rewrite_in_place_during_snapshots_never_yields_a_torn_copy(tmp_path):
    src = tmp_path / "last.pt"
    save_checkpoint(src, seed=1, numel=4_000_000)  # 16 MB: the copy takes a few ms
    v1 = src.read_bytes()
    sha_v1 = hashlib.sha256(v1).hexdigest()
    other = tmp_path / "v2.pt"
    save_checkpoint(other, seed=2, numel=4_000_000)
    v2 = other.read_bytes()
    outcomes = []
    for trial in range(12):
        with open(src, "r+b") as f:  # back to version 1, in place
            f.truncate(0)
            f.write(v1)
        stamp = Stamp.of(src)
        writer = threading.Thread(target=rewrite_in_place_slowly, args=(src, v2))
        time.sleep(0.011)  # a new mtime tick for the rewrite
        writer.start()
        time.sleep(trial * 0.002)
        dest = tmp_path / f"snap-{trial}.pt"
        try:
            result = take_snapshot(src, stamp, dest)
        except SnapshotError as exc:
            outcomes.append(str(exc))
            assert not dest.exists() and not dest.with_name(dest.name + ".part").exists()
        else:
            outcomes.append("ok")
            assert result["sha256"] == sha_v1 == sha256(dest), "a snapshot is version 1, whole"
        writer.join()
    assert any(o != "ok" for o in outcomes), "the rewrite must have hit some snapshots"
    assert all(o == "ok" or "rewritten" in o or "changed" in o or "torn" in o for o in outcomes)


def test_a_half_written_zip_is_refused_even_when_its_stamp_matches(tmp_path):
    src = tmp_path / "last.pt"
    save_checkpoint(src, seed=3)
    data = src.read_bytes()
    src.write_bytes(data[: len(data) // 2])  # what a reader sees mid-write
    with pytest.raises(SnapshotError, match="torn write"):
        take_snapshot(src, Stamp.of(src), tmp_path / "snap.pt")
    corrupt = bytearray(data)
    corrupt[len(corrupt) // 2] ^= 0xFF  # same size, bad member CRC
    src.write_bytes(bytes(corrupt))
    with pytest.raises(SnapshotError, match="torn write"):
        take_snapshot(src, Stamp.of(src), tmp_path / "snap.pt")


def test_checkpoint_events_carry_a_verified_snapshot_and_old_ones_are_pruned(
    redis_url, namespace, spool_dir, client, keys, tmp_path
):
    last, best = tmp_path / "last.pt", tmp_path / "best.pt"
    expected = {}
    with Publisher(redis_url=redis_url, namespace=namespace, spool_dir=spool_dir, run_id="ck") as bus:
        wait_for(lambda: bus.delivering, timeout=30)  # a training's first save comes much later than this
        for epoch in range(8):
            save_checkpoint(last, seed=epoch, numel=10_000)
            expected[epoch] = sha256(last)
            is_best = epoch in (2, 5)
            if is_best:
                best.write_bytes(last.read_bytes())
            bus.checkpoint(last, epoch, is_best=is_best)
            time.sleep(0.02)  # the next save comes later, as in training
        bus.final(best, 7, {"map": 0.5}, map50_95=0.5)
    events = [e for e in stream_events(client, keys) if e["type"] in ("checkpoint", "final")]
    assert len(events) == 9
    for e in events[:-1]:
        ck = e["payload"]["checkpoint"]
        assert ck["sha256"] == expected[e["payload"]["epoch"]], "labelled with the epoch that saved it"
        assert ck["label"] == ("best" if e["payload"]["is_best"] else "last")
        assert ck["size"] == ck["stamp"]["size"]
    final = events[-1]["payload"]["checkpoint"]
    assert final["sha256"] == sha256(best) == expected[5] and final["label"] == "final"
    kept = sorted(p.name for p in (spool_dir / "ck" / "checkpoints").glob("*.pt"))
    assert len(kept) == 3, kept  # newest last (epoch 7), newest best (epoch 5), the final
    assert os.path.basename(final["path"]) in kept
    assert sha256(spool_dir / "ck" / "checkpoints" / os.path.basename(final["path"])) == final["sha256"]


def test_one_read_checks_every_member_and_hashes(tmp_path):
    """Stored members (torch.save) are CRC-checked in the same read as the sha256."""
    src = tmp_path / "last.pt"
    torch.save({"a": torch.randn(300_000), "b": torch.randn(700_000)}, src)  # members across 1 MiB chunks
    result = take_snapshot(src, Stamp.of(src), tmp_path / "ok.pt")
    assert result["sha256"] == sha256(src)
    data = bytearray(src.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside a tensor's bytes: size and structure unchanged
    src.write_bytes(bytes(data))
    with pytest.raises(SnapshotError, match="fails its CRC check"):
        take_snapshot(src, Stamp.of(src), tmp_path / "bad.pt")
    assert not list(tmp_path.glob("*.part"))
