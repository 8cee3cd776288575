"""A real, tiny, offline YOLO training with the callbacks (opt-in: `pytest -m ultralytics`)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import stream_events

pytestmark = pytest.mark.ultralytics
ROOT = Path(__file__).resolve().parents[1]

TRAIN = textwrap.dedent("""
    import sys
    from ultralytics import YOLO
    from producers.ultralytics import make_callbacks

    model = YOLO("yolov8n.yaml")
    for event, fn in make_callbacks(run_id="real-yolo").items():
        model.add_callback(event, fn)
    model.train(data=sys.argv[1], epochs=2, imgsz=64, batch=4, workers=0, device="cpu", amp=False,
                project=sys.argv[2], name="train", exist_ok=True, verbose=False)
""")


def make_dataset(root: Path) -> Path:
    """Eight 64x64 images with one box each, train = val: enough for two epochs."""
    from PIL import Image

    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i in range(8):
            img = Image.new("RGB", (64, 64), (20 * i, 100, 150))
            img.paste((255, 255, 255), (16, 16, 48, 48))
            img.save(root / "images" / split / f"{i}.jpg")
            (root / "labels" / split / f"{i}.txt").write_text("0 0.5 0.5 0.5 0.5\n")
    data = root / "data.yaml"
    data.write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnames:\n  0: square\n")
    return data


def test_real_training_puts_every_epoch_checkpoint_and_final_on_the_stream(
    redis_url, namespace, spool_dir, client, keys, tmp_path
):
    pytest.importorskip("ultralytics")
    import matplotlib

    config = tmp_path / "yolo-config"
    config.mkdir()
    font = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    shutil.copy(font, config / "Arial.ttf")  # keeps Ultralytics from downloading its font
    data = make_dataset(tmp_path / "data")
    env = dict(
        os.environ,
        YOLO_OFFLINE="1",
        YOLO_CONFIG_DIR=str(config),
        PYTHONPATH=str(ROOT),
        TRAINBUS_REDIS_URL=redis_url,
        TRAINBUS_NAMESPACE=namespace,
        TRAINBUS_SPOOL_DIR=str(spool_dir),
    )
    out = subprocess.run(
        [sys.executable, "-c", TRAIN, str(data), str(tmp_path / "runs")],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    events = stream_events(client, keys)
    types = [e["type"] for e in events]
    assert [e["seq"] for e in events] == list(range(len(events)))
    fits = [e["payload"] for e in events if e["type"] == "fit_epoch"]
    assert [f["epoch"] for f in fits if not f["final_eval"]] == [0, 1]
    assert "model_info" in fits[0]
    ckpts = [e["payload"] for e in events if e["type"] == "checkpoint"]
    assert [c["epoch"] for c in ckpts] == [0, 1]
    assert all("sha256" in c["checkpoint"] or "superseded" in c["checkpoint"].get("error", "") for c in ckpts)
    final = next(e["payload"] for e in events if e["type"] == "final")
    assert len(final["checkpoint"]["sha256"]) == 64
    assert types[0] == "session" and "run_end" in types
