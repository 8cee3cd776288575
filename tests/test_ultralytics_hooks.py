"""The Ultralytics callbacks, driven the way a real 8.x trainer calls them, quirks included.

The trainer here is a stand-in with the attributes and call order DESIGN.md lists (checked
on a real training); `pytest -m ultralytics` runs the same checks on a real YOLO training.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from producers.control import Control
from producers.ultralytics import CALLBACK_NAMES, make_callbacks
from tests.conftest import stream_events
from tests.helpers import wait_for

ROOT = Path(__file__).resolve().parents[1]
MAP = "metrics/mAP50-95(B)"


class StandInTrainer:
    """Attributes appear when a real trainer sets them, not before."""

    def __init__(self, save_dir: Path, epochs: int) -> None:
        self.args = SimpleNamespace(
            model="yolov8n.yaml",
            data="coco8.yaml",
            epochs=epochs,
            imgsz=64,
            name="train",
            project=None,
            task="detect",
            batch=2,
            save_dir=save_dir,
        )
        self.save_dir = save_dir
        self.epochs = epochs
        self.fitness = self.best_fitness = None
        self.metrics: dict = {}
        (save_dir / "weights").mkdir(parents=True)
        self.last, self.best = save_dir / "weights" / "last.pt", save_dir / "weights" / "best.pt"
        self.validator = SimpleNamespace(save_dir=save_dir, metrics=SimpleNamespace(results_dict={}))

    def label_loss_items(self, loss_items=None, prefix="train"):
        keys = [f"{prefix}/{x}" for x in ("box_loss", "cls_loss", "dfl_loss")]
        if loss_items is None:
            return keys
        values = loss_items.values() if isinstance(loss_items, dict) else loss_items
        return {k: round(float(v), 5) for k, v in zip(keys, values, strict=True)}


def train(callbacks: dict, save_dir: Path, epochs: int = 3, spool: Path | None = None) -> StandInTrainer:
    """``spool``: the run's spool directory, to start once its delivery process follows it (as a
    real training's first save comes much later than that)."""
    t = StandInTrainer(save_dir, epochs)
    callbacks["on_pretrain_routine_start"](t)
    if spool is not None:
        wait_for(lambda: Control.attach(spool).following, timeout=30)
    callbacks["on_fit_epoch_end"](t)  # attributes missing: must not raise
    callbacks["on_pretrain_routine_end"](t)
    callbacks["on_train_start"](t)
    for epoch in range(epochs):
        t.epoch = epoch
        t.tloss = {"box": torch.tensor(1.0 / (epoch + 1)), "cls": torch.tensor(0.5), "dfl": torch.tensor(float("nan"))}
        t.lr = {"lr/pg0": 0.01, "lr/pg1": 0.01, "lr/pg2": 0.01}
        callbacks["on_train_epoch_end"](t)
        callbacks["on_val_start"](t.validator)
        (save_dir / f"val_batch{epoch}_pred.jpg").write_bytes(b"jpg")
        callbacks["on_val_end"](t.validator)
        t.metrics = {"metrics/precision(B)": 0.1 * epoch, MAP: 0.2 * epoch, "val/box_loss": 1.0}
        t.fitness = 0.2 * epoch
        t.best_fitness = max(t.best_fitness or 0, t.fitness)
        torch.save({"epoch": epoch, "w": torch.randn(1000)}, t.last)
        if t.fitness == t.best_fitness:
            t.best.write_bytes(t.last.read_bytes())
        callbacks["on_model_save"](t)
        t.epoch_time = 0.5
        callbacks["on_fit_epoch_end"](t)
        time.sleep(0.05)  # an epoch takes time; the snapshot is done long before the next save
    if epochs:
        for i in range(3):  # mosaics drawn in a background thread: they show up late
            (save_dir / f"train_batch{i}.jpg").write_bytes(b"jpg")
    t.epoch = epochs  # the final validation's extra on_fit_epoch_end, then the epoch restored
    callbacks["on_fit_epoch_end"](t)
    t.epoch = epochs - 1
    torch.save({"epoch": epochs - 1, "w": torch.zeros(10)}, t.best)  # stripped in place, no on_model_save
    (save_dir / "results.png").write_bytes(b"png")
    (save_dir / "BoxPR_curve.png").write_bytes(b"png")
    t.validator.metrics.results_dict = {MAP: 0.4, "fitness": 0.4}
    callbacks["on_train_end"](t)
    return t


def test_a_training_publishes_what_hub_and_clearml_callbacks_need(
    redis_url, namespace, spool_dir, client, keys, tmp_path
):
    callbacks = make_callbacks(
        redis_url=redis_url,
        namespace=namespace,
        spool_dir=spool_dir,
        run_id="yolo",
        hub_model="https://hub.ultralytics.com/models/" + "m" * 20,
    )
    assert set(callbacks) == set(CALLBACK_NAMES)
    trainer = train(callbacks, tmp_path / "runs" / "train", epochs=3, spool=spool_dir / "yolo")
    events = wait_for(lambda: (e := stream_events(client, keys)) and e[-1]["type"] == "run_end" and e)
    by_type: dict[str, list] = {}
    for e in events:
        by_type.setdefault(e["type"], []).append(e["payload"])
    assert [e["seq"] for e in events] == list(range(len(events)))

    session = by_type["session"][0]
    assert session["hub_model_id"] == "m" * 20 and session["name"] == "train"
    assert session["args"]["imgsz"] == 64 and session["save_dir"] == str(trainer.save_dir)

    fits = by_type["fit_epoch"]
    assert [f["epoch"] for f in fits] == [None, 0, 1, 2, 3]
    assert [f["final_eval"] for f in fits] == [False, False, False, False, True]
    assert "model_info" in fits[1] and all("model_info" not in f for f in fits[2:])
    assert fits[2]["metrics"]["train/box_loss"] == 0.5 and fits[2]["metrics"][MAP] == 0.2
    assert fits[2]["epoch_time"] == 0.5

    trains = by_type["train_epoch"]
    assert [t["epoch"] for t in trains] == [0, 1, 2]
    assert trains[0]["lr"] == {"lr/pg0": 0.01, "lr/pg1": 0.01, "lr/pg2": 0.01}
    nan_event = next(e for e in events if e["type"] == "train_epoch")
    assert nan_event["nulls"] == ["metrics.train/dfl_loss"]

    ckpts = by_type["checkpoint"]  # and last.pt as training left it (the final validation strips it)
    assert [(c["epoch"], c["is_best"]) for c in ckpts] == [(0, True), (1, True), (2, True), (2, False)]
    assert all(len(c["checkpoint"]["sha256"]) == 64 for c in ckpts)
    assert ckpts[-1]["checkpoint"]["source"] == str(trainer.last)

    media = by_type["media"]
    mosaic = [m for m in media if m["title"] == "Mosaic"]
    assert len(mosaic) == 1 and mosaic[0]["pattern"] == "train_batch*.jpg" and mosaic[0]["iteration"] == 0
    assert sum(m["title"] == "Validation" for m in media) == 3
    plots = [m for m in media if m["kind"] == "plot"]
    assert plots[0]["names"][0] == "results.png" and plots[0]["pattern"] == "*_curve.png"

    final = by_type["final"][0]
    assert final["map50_95"] == 0.2 * 2 and final["metrics"][MAP] == 0.4
    names = ["BoxPR_curve.png", "results.png", *(f"train_batch{i}.jpg" for i in range(3))]
    names += [f"val_batch{i}_pred.jpg" for i in range(3)]
    assert [Path(f).name for f in final["files"]] == names  # the save dir's, for MLflow's artifacts
    assert by_type["pretrain_end"][0]["args"]["imgsz"] == 64  # the args as set-up left them, for MLflow
    assert final["checkpoint"]["label"] == "final" and len(final["checkpoint"]["sha256"]) == 64
    assert events[-1]["type"] == "run_end" and events[-1]["payload"]["status"] == "completed"
    assert {"pretrain_end", "train_start", "val_start", "val_end"} <= set(by_type)


def test_module_callbacks_read_the_environment_and_bad_values_stop_the_script(tmp_path):
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(ROOT),
        "TRAINBUS_EXIT_FLUSH_S": "soon",
        "TRAINBUS_SPOOL_DIR": str(tmp_path),
    }
    out = subprocess.run(
        [sys.executable, "-c", "from producers.ultralytics import callbacks"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0
    assert "TRAINBUS_EXIT_FLUSH_S: 'soon' is not a number of seconds" in out.stderr
