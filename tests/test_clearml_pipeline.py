"""The ClearML path end to end, offline mode: real dispatcher and `rq worker` processes.

The offline session (``<CLEARML_CACHE_DIR>/offline/<task>/``) is what `clearml` can import
later; its metrics.jsonl and task.json are checked event by event.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from producers import Publisher
from tests.helpers import wait_for
from tests.pipeline import MODEL_ID, ClearmlServer, Pipeline

EPOCHS = 5


@pytest.fixture
def cache_dir(tmp_path) -> Path:
    return tmp_path / "clearml-cache"


@pytest.fixture
def workdir(tmp_path) -> Path:
    path = tmp_path / "runs"
    path.mkdir()
    return path


def clearml_pipeline(redis_url, namespace, hub, spool_dir, workdir, **env) -> Pipeline:
    """Dispatcher and workers feeding both sinks, allowed to read the spool and the runs."""
    return Pipeline(
        redis_url,
        namespace,
        hub,
        spool_dir,
        TRAINBUS_SINKS="hub,clearml",
        TRAINBUS_FILE_ROOTS=f"{spool_dir}:{workdir}",
        **env,
    )


@pytest.fixture
def pipeline(redis_url, namespace, hub, spool_dir, cache_dir, workdir):
    p = clearml_pipeline(
        redis_url, namespace, hub, spool_dir, workdir, CLEARML_OFFLINE_MODE="1", CLEARML_CACHE_DIR=cache_dir
    )
    yield p
    p.stop()


def png(path: Path) -> None:
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 30, 30)).save(path)


def yolo_like_run(bus: Publisher, save_dir: Path, epochs: int = EPOCHS) -> None:
    """What the Ultralytics callbacks publish for a small training, files included."""
    (save_dir / "weights").mkdir(parents=True)
    bus.session(
        {"epochs": epochs, "imgsz": 64, "batch": 2, "model": "yolov8n.yaml", "project": None},
        name=save_dir.name,
        project="detectors",
    )
    for epoch in range(epochs):
        bus.metrics(
            epoch,
            {"train/box_loss": 1.0 / (epoch + 1), "train/cls_loss": 0.5},
            stage="train",
            lr={"lr/pg0": 0.01 * (epoch + 1)},
        )
        if epoch == 0:
            bus.media("debug", "Mosaic", directory=save_dir, pattern="train_batch*.jpg", iteration=0)
        png(save_dir / f"val_batch{epoch}_pred.jpg")
        bus.media("debug", "Validation", directory=save_dir, pattern="val*.jpg")
        extra = {"model_info": {"model/parameters": 3000000, "model/GFLOPs": 8.2}} if epoch == 0 else {}
        bus.metrics(
            epoch,
            {"train/box_loss": 1.0 / (epoch + 1), "metrics/mAP50-95(B)": epoch / 10, "val/box_loss": 2.0 - epoch / 10},
            epoch_time=0.5,
            final_eval=False,
            **extra,
        )
        if epoch == 0:
            for i in range(3):  # drawn in a background thread: they show up after the event
                png(save_dir / f"train_batch{i}.jpg")
        torch.save({"epoch": epoch}, save_dir / "weights" / "last.pt")
        bus.checkpoint(save_dir / "weights" / "last.pt", epoch, is_best=True)
        time.sleep(0.05)
    (save_dir / "weights" / "best.pt").write_bytes((save_dir / "weights" / "last.pt").read_bytes())
    png(save_dir / "results.png")
    png(save_dir / "BoxPR_curve.png")
    bus.media(
        "plot", "Results", directory=save_dir, names=("results.png", "confusion_matrix.png"), pattern="*_curve.png"
    )
    bus.final(save_dir / "weights" / "best.pt", epochs - 1, {"metrics/mAP50-95(B)": 0.4, "fitness": 0.4}, map50_95=0.4)
    bus.end("completed")


def sessions(cache_dir: Path) -> dict[str, Path]:
    """Offline session folders by task name."""
    found = {}
    for task_json in (cache_dir / "offline").glob("*/task.json"):
        try:
            found[json.loads(task_json.read_text())["name"]] = task_json.parent
        except json.JSONDecodeError:  # the SDK is writing it right now: seen at the next look
            continue
    return found


def metrics_of(session: Path) -> list[dict]:
    events = []
    for line in (session / "metrics.jsonl").read_text().splitlines():
        events += json.loads(line)
    return events


def plotted_iterations(session: Path, series: str) -> list[int]:
    """The iterations a scalar series was plotted at, sorted; asserts no (title, series, iteration) twice.
    Single values (``report_single_value``, iteration -2**31) are the summary table, not a plot."""
    scalars = [
        (m["metric"], m["variant"], m["iter"]) for m in metrics_of(session) if m.get("type") == "training_stats_scalar"
    ]
    assert len(scalars) == len(set(scalars)), "no point twice"
    return sorted(it for _, name, it in scalars if name == series and it != -(2**31))


def completed(cache_dir: Path, *names: str) -> bool:
    """Each named task's offline session was closed (the SDK zips it on close)."""
    found = sessions(cache_dir)
    return all(n in found and found[n].with_suffix(".zip").exists() for n in names)


def test_a_5_epoch_run_lands_in_one_offline_clearml_session(pipeline, spool_dir, cache_dir, workdir):
    pipeline.dispatcher()
    pipeline.worker("clearml")
    bus = Publisher(
        redis_url=pipeline.redis_url,
        namespace=pipeline.namespace,
        spool_dir=spool_dir,
        run_id="cml",
        hub_model=MODEL_ID,
    )
    yolo_like_run(bus, workdir / "exp1")
    bus.close()
    wait_for(lambda: completed(cache_dir, "exp1"), timeout=90)
    session = sessions(cache_dir)["exp1"]
    task = json.loads((session / "task.json").read_text())
    assert task["project_name"] == "detectors"
    assert {"trainbus", "run:cml"} <= set(task["tags"])
    general = task["hyperparams"]["General"]
    assert general["epochs"]["value"] == "5" and general["imgsz"]["value"] == "64"
    events = metrics_of(session)
    scalars = {
        (e["metric"], e["variant"], e["iter"]): e["value"]
        for e in events
        if e["type"] == "training_stats_scalar" and e["metric"] != "Summary"
    }
    for epoch in range(EPOCHS):
        assert scalars[("train", "train/box_loss", epoch)] == pytest.approx(1.0 / (epoch + 1))
        assert scalars[("lr", "lr/pg0", epoch)] == pytest.approx(0.01 * (epoch + 1))
        assert scalars[("metrics", "metrics/mAP50-95(B)", epoch)] == pytest.approx(epoch / 10)
        assert scalars[("val", "val/box_loss", epoch)] == pytest.approx(2.0 - epoch / 10)
        assert scalars[("Epoch Time", "Epoch Time", epoch)] == 0.5
    assert ("val", "train/box_loss", 0) not in scalars, "train losses are not repeated as val"
    reported = [e for e in events if e["type"] == "training_stats_scalar" and e["metric"] != "Summary"]
    assert len(reported) == len(scalars) == EPOCHS * 6, "each scalar once"
    singles = {e["variant"]: e["value"] for e in events if e["metric"] == "Summary"}
    assert singles == {"model/parameters": 3000000, "model/GFLOPs": 8.2, "metrics/mAP50-95(B)": 0.4, "fitness": 0.4}
    images = sorted((e["metric"], e["variant"], e["iter"]) for e in events if e["type"] == "training_debug_image")
    assert [i for i in images if i[0] == "Mosaic"] == [("Mosaic", "train.jpg", i) for i in range(3)]
    assert ("Validation", "val_pred.jpg", 4) in images
    plots = sorted((e["metric"], e["variant"], e["iter"]) for e in events if e["type"] == "plot")
    assert plots == [("BoxPR_curve", "plot image", 0), ("results", "plot image", 0)]
    artifacts = {a["key"]: a for a in task["execution"].get("artifacts", [])}
    assert "best.pt" in artifacts


def test_two_interleaved_runs_land_in_two_tasks_with_nothing_crossed(pipeline, spool_dir, cache_dir, workdir):
    pipeline.dispatcher()
    pipeline.worker("clearml")
    buses = {
        name: Publisher(
            redis_url=pipeline.redis_url,
            namespace=pipeline.namespace,
            spool_dir=spool_dir,
            run_id=name,
            hub_model=MODEL_ID,
        )
        for name in ("left", "right")
    }
    for name, bus in buses.items():
        bus.session({"epochs": 4}, name=name)
    for epoch in range(4):
        for i, bus in enumerate(buses.values()):
            bus.metrics(epoch, {"train/loss": 100 * i + epoch}, stage="train")
    for bus in buses.values():
        bus.end("completed")
        bus.close()
    wait_for(lambda: completed(cache_dir, "left", "right"), timeout=60)
    for i, name in enumerate(("left", "right")):
        values = sorted(
            e["value"] for e in metrics_of(sessions(cache_dir)[name]) if e["type"] == "training_stats_scalar"
        )
        assert values == [100 * i + epoch for epoch in range(4)]


@pytest.fixture
def online(redis_url, namespace, hub, spool_dir, workdir, clearml):
    p = clearml_pipeline(redis_url, namespace, hub, spool_dir, workdir, TRAINBUS_CLEARML_TIMEOUT_S=3, **clearml.env())
    yield p
    p.stop()


def task_named(clearml: ClearmlServer, name: str) -> dict | None:
    return next((t for t in clearml.state()["tasks"].values() if t.get("name") == name), None)


def test_a_5_epoch_run_reaches_a_clearml_server(online, clearml, spool_dir, workdir):
    online.dispatcher()
    online.worker("clearml")
    bus = Publisher(
        redis_url=online.redis_url, namespace=online.namespace, spool_dir=spool_dir, run_id="onl", hub_model=MODEL_ID
    )
    yolo_like_run(bus, workdir / "exp-online")
    bus.close()
    task = wait_for(lambda: (t := task_named(clearml, "exp-online")) and t["status"] == "completed" and t, timeout=90)
    state = clearml.state()
    events = [e for e in state["events"] if e.get("task") == task["id"]]
    scalars = [
        (e["metric"], e["variant"], e["iter"], e["value"])
        for e in events
        if e["type"] == "training_stats_scalar" and e["metric"] != "Summary"
    ]
    assert len(scalars) == len(set(scalars)) == EPOCHS * 6
    assert ("metrics", "metrics/mAP50-95(B)", 3, 0.3) in scalars
    singles = {e["variant"]: e["value"] for e in events if e["metric"] == "Summary"}
    assert singles["model/parameters"] == 3000000 and singles["fitness"] == 0.4
    images = sorted((e["metric"], e["variant"], e["iter"]) for e in events if e["type"] == "training_debug_image")
    assert [i for i in images if i[0] == "Mosaic"] == [("Mosaic", "train.jpg", i) for i in range(3)]
    assert sorted(e["metric"] for e in events if e["type"] == "plot") == ["BoxPR_curve", "results"]
    assert task["hyperparams"]["General"]["epochs"]["value"] == "5"
    assert task["project_name"] == "detectors" and "trainbus" in task["tags"]
    (output,) = task["models"]["output"]
    model = state["models"][output["model"]]
    assert model["name"] == "exp-online", "named after the run, as Ultralytics names it"
    assert state["files"], "images and the model went to the files host"


def test_clearml_down_for_part_of_the_run_then_everything_arrives_once(
    online, clearml, spool_dir, workdir, client, keys
):
    online.dispatcher()
    online.worker("clearml")
    bus = Publisher(
        redis_url=online.redis_url, namespace=online.namespace, spool_dir=spool_dir, run_id="outage", hub_model=MODEL_ID
    )
    bus.session({"epochs": 16}, name="outage")
    for epoch in range(16):
        if epoch == 3:  # once its task is set up: the reports of epochs 3-14 are handed while ClearML is down
            wait_for(lambda: client.hget(keys.state("clearml", "outage"), "task_ready"), timeout=60)
            clearml.fault(down=True)
        if epoch == 15:
            clearml.fault(down=False)
        bus.metrics(epoch, {"train/loss": float(epoch)}, stage="train")
        time.sleep(1.0)  # down for 12 s: past the 3 s call timeout and the SDK's own 10 s flush fallback
    bus.end("completed")
    bus.close()
    task = wait_for(lambda: (t := task_named(clearml, "outage")) and t["status"] == "completed" and t, timeout=120)
    values = sorted(
        e["value"]
        for e in clearml.state()["events"]
        if e.get("task") == task["id"] and e["type"] == "training_stats_scalar"
    )
    assert values == [float(e) for e in range(16)], "each scalar once (a blocking flush sent some twice)"
    logs = b"".join(p.read_bytes() for p in spool_dir.glob("proc-*.log"))
    assert b"sink=clearml run=outage outcome=waiting" in logs, "the outage was noticed and waited out"
