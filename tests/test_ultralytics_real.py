"""Real, tiny, offline YOLO trainings with the callbacks (opt-in: ``./dev test -m ultralytics``).

``./dev test -m ultralytics`` runs these in ``.venv-ultralytics`` (torch 2.14.1, torchvision
0.29.1, ultralytics), which it sets up on first use.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import stream_events
from tests.helpers import wait_for, yolo_config_dir, yolo_dataset
from tests.pipeline import PLATFORM_KEY, Pipeline

pytestmark = pytest.mark.ultralytics
ROOT = Path(__file__).resolve().parents[1]

TRAIN = textwrap.dedent("""
    import json, os, sys
    from ultralytics import YOLO
    from producers.ultralytics import make_callbacks

    if os.environ.get("RECORD_OUTPUT_MODEL"):  # the SDK's offline output model crashes on_train_end: record the call
        from clearml import Task

        def record(self, model_path, model_name=None, **kwargs):
            with open(os.environ["RECORD_OUTPUT_MODEL"], "w") as f:
                json.dump({"model_path": model_path, "model_name": model_name}, f)

        Task.update_output_model = record

    model = YOLO("yolov8n.yaml")
    for event, fn in make_callbacks(run_id=sys.argv[3]).items():
        model.add_callback(event, fn)
    model.train(data=sys.argv[1], epochs=int(sys.argv[4]), imgsz=64, batch=4, workers=0, device="cpu", amp=False,
                project=sys.argv[2], name=sys.argv[5] if len(sys.argv) > 5 else "train", exist_ok=True, verbose=False)
""")


def train(tmp_path: Path, env: dict[str, str], run_id: str, epochs: int, project: str | None = None) -> Path:
    """One real training in a subprocess; returns its project directory (``project`` e.g. owner/slug
    for the Platform: the save dir is then under it, relative to tmp_path)."""
    pytest.importorskip("ultralytics")
    config = yolo_config_dir(tmp_path)
    data = yolo_dataset(tmp_path / "data")
    project = Path(project) if project else tmp_path / "runs"
    env = {k: v for k, v in {**os.environ, **env}.items() if k != "PYTEST_CURRENT_TEST"}  # else Ultralytics skips its
    env.update(YOLO_OFFLINE="1", YOLO_CONFIG_DIR=str(config), PYTHONPATH=str(ROOT), HOME=str(tmp_path))  # integrations
    out = subprocess.run(
        [sys.executable, "-c", TRAIN, str(data), str(project), run_id, str(epochs)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return project


def test_real_training_puts_every_epoch_checkpoint_and_final_on_the_stream(
    redis_url, namespace, spool_dir, client, keys, tmp_path
):
    env = {"TRAINBUS_REDIS_URL": redis_url, "TRAINBUS_NAMESPACE": namespace, "TRAINBUS_SPOOL_DIR": str(spool_dir)}
    train(tmp_path, {**env, "YOLO_SETTINGS_CLEARML": "False"}, "real-yolo", 2)
    events = stream_events(client, keys)
    types = [e["type"] for e in events]
    assert [e["seq"] for e in events] == list(range(len(events)))
    fits = [e["payload"] for e in events if e["type"] == "fit_epoch"]
    assert [f["epoch"] for f in fits if not f["final_eval"]] == [0, 1]
    assert "model_info" in fits[0]
    ckpts = [e["payload"] for e in events if e["type"] == "checkpoint"]
    assert [c["epoch"] for c in ckpts] == [0, 1, 1], "each epoch's save, and last.pt as training left it"
    # the last epoch's last.pt is stripped in place right after its save: captured, or said to have changed
    errors = [c["checkpoint"].get("error", "") for c in ckpts[:-1] if "sha256" not in c["checkpoint"]]
    assert all("superseded" in e or "changed while" in e for e in errors), errors
    assert len(ckpts[-1]["checkpoint"]["sha256"]) == 64 and not ckpts[-1]["is_best"], "the stripped last.pt, whole"
    assert next(e["payload"] for e in events if e["type"] == "pretrain_end")["args"]["optimizer"] != "auto"
    final = next(e["payload"] for e in events if e["type"] == "final")
    assert len(final["checkpoint"]["sha256"]) == 64
    assert types[0] == "session" and "run_end" in types


def offline_session(cache: Path) -> tuple[dict, list[dict]]:
    """(task.json, every reported event) of the one offline session under a ClearML cache dir."""
    (folder,) = [p.parent for p in (cache / "offline").glob("*/task.json")]
    events = [e for line in (folder / "metrics.jsonl").read_text().splitlines() for e in json.loads(line)]
    return json.loads((folder / "task.json").read_text()), events


def keyed(events: list[dict], kind: str, summary: bool | None = None) -> dict[tuple, object]:
    found: dict[tuple, object] = {}
    for e in events:
        if e["type"] != kind or (summary is not None and (e.get("metric") == "Summary") != summary):
            continue
        found[(e["metric"], e["variant"], e["iter"])] = e.get("value")
    return found


def test_the_clearml_task_holds_what_ultralytics_own_clearml_callbacks_record(
    redis_url, namespace, hub, spool_dir, tmp_path
):
    """One real training with both Ultralytics' ClearML callbacks (Task.init in the training, offline)
    and trainbus's callbacks; trainbus's ClearML worker (offline) makes its own task from the events.
    Side by side, scalar by scalar: everything Ultralytics records is in trainbus's task too."""
    pytest.importorskip("clearml")
    theirs, ours = tmp_path / "clearml-ultralytics", tmp_path / "clearml-trainbus"
    pipeline = Pipeline(
        redis_url,
        namespace,
        hub,
        spool_dir,
        TRAINBUS_SINKS="clearml",
        TRAINBUS_FILE_ROOTS=f"{spool_dir}:{tmp_path}",
        CLEARML_OFFLINE_MODE="1",
        CLEARML_CACHE_DIR=ours,
    )
    try:
        pipeline.dispatcher()
        pipeline.worker("clearml")
        env = {
            "TRAINBUS_REDIS_URL": redis_url,
            "TRAINBUS_NAMESPACE": namespace,
            "TRAINBUS_SPOOL_DIR": str(spool_dir),
            "CLEARML_OFFLINE_MODE": "1",
            "CLEARML_CACHE_DIR": str(theirs),
            "RECORD_OUTPUT_MODEL": str(tmp_path / "their-output-model.json"),
        }
        train(tmp_path, env, "parity", 3)
        wait_for(lambda: list((ours / "offline").glob("*.zip")), timeout=180)
    finally:
        pipeline.stop()
    their_task, their_events = offline_session(theirs)
    our_task, our_events = offline_session(ours)
    table = []
    for kind, summary in (
        ("training_stats_scalar", False),
        ("training_stats_scalar", True),
        ("training_debug_image", None),
        ("plot", None),
    ):
        want, got = keyed(their_events, kind, summary), keyed(our_events, kind, summary)
        table.append(f"{kind}{' (single values)' if summary else ''}: Ultralytics {len(want)}, trainbus {len(got)}")
        assert set(want) <= set(got), f"{kind}: trainbus lacks {sorted(set(want) - set(got))}"
        for key, value in want.items():
            if kind == "training_stats_scalar" and "speed" not in key[1]:  # inference speed is timed twice
                assert math.isclose(got[key], value, rel_tol=1e-9), f"{key}: Ultralytics {value}, trainbus {got[key]}"
    print("\n".join(table))
    scalars = [(e["metric"], e["variant"], e["iter"]) for e in our_events if e["type"] == "training_stats_scalar"]
    assert len(scalars) == len(set(scalars)), "each scalar once"
    images = [(e["metric"], e["variant"], e["iter"]) for e in our_events if e["type"] == "training_debug_image"]
    assert len(images) == len(set(images)), "each image once"
    their_args = {k: v["value"] for k, v in their_task["hyperparams"]["General"].items()}
    our_args = {k: v["value"] for k, v in our_task["hyperparams"]["General"].items()}
    assert their_args == {k: our_args.get(k) for k in their_args}, "every arg as Ultralytics connects it"
    assert our_task["name"] == their_task["name"] and our_task["project_name"] == their_task["project_name"]
    assert set(their_task.get("tags") or []) <= set(our_task.get("tags") or [])
    their_model = json.loads((tmp_path / "their-output-model.json").read_text())
    artifacts = {a["key"]: a for a in our_task["execution"]["artifacts"]}
    print("output model: Ultralytics", their_model, "trainbus", artifacts.get("best.pt"))
    assert "best.pt" in artifacts, "the final best.pt, as the output model (an artifact offline)"
    best = hashlib.sha256(Path(their_model["model_path"]).read_bytes()).hexdigest()
    assert artifacts["best.pt"]["hash"] == best, "the same bytes Ultralytics would have sent"


def test_trainbus_sends_the_platform_every_event_and_key_ultralytics_own_platform_callbacks_send(
    redis_url, namespace, spool_dir, platform, tmp_path
):
    """One real training with both Ultralytics' Platform callbacks (on: a key, a project, the local
    server's URL before ultralytics is imported) and trainbus's callbacks with the Platform sink, to
    the same local server. Ultralytics registers model "train", trainbus the next slug."""
    pipeline = Pipeline(
        redis_url,
        namespace,
        None,
        spool_dir,
        TRAINBUS_SINKS="platform",
        TRAINBUS_FILE_ROOTS=f"{spool_dir}:{tmp_path}",
        TRAINBUS_RATE_CKPT=1,
        **platform.env(),
    )
    try:
        pipeline.dispatcher()
        pipeline.worker("platform")
        env = {
            "TRAINBUS_REDIS_URL": redis_url,
            "TRAINBUS_NAMESPACE": namespace,
            "TRAINBUS_SPOOL_DIR": str(spool_dir),
            "ULTRALYTICS_API_KEY": PLATFORM_KEY,
            "ULTRALYTICS_PLATFORM_URL": platform.url,
            "YOLO_SETTINGS_CLEARML": "False",
        }
        train(tmp_path, env, "platform-parity", 3, project="tester/parity")
        wait_for(lambda: len([m for m in platform.models() if m["runs"] and m["runs"][-1]["end"]]) == 2, timeout=180)
    finally:
        pipeline.stop()
    requests = [r for r in platform.requests() if r["status"] == 200 and r["endpoint"] == "metrics"]
    theirs = next(m["id"] for m in platform.models() if "trainbusRunId" not in m["environment"])
    by_model: dict[str, dict[str, list[dict]]] = {}
    for r in requests:
        model = r["json"].get("modelId") or next(
            (m["id"] for m in platform.models() if m["slug"] == r["json"].get("name")), "?"
        )
        by_model.setdefault(model if r["event"] != "training_started" else _registered(r, platform), {}).setdefault(
            r["event"], []
        ).append(r["json"]["data"])
    ours = next(m for m in by_model if m != theirs)
    table = []
    for event, sent in sorted(by_model[theirs].items()):
        got = by_model[ours].get(event, [])
        table.append(f"{event}: Ultralytics {len(sent)}, trainbus {len(got)}")
        assert got, f"trainbus never sent {event}"
        their_keys, our_keys = set().union(*map(set, sent)), set().union(*map(set, got))
        assert their_keys <= our_keys, f"{event}: trainbus lacks {sorted(their_keys - our_keys)}"
        if event == "epoch_end":
            assert sorted(d["epoch"] for d in got) == sorted(d["epoch"] for d in sent), "the same epochs"
            for a, b in zip(sorted(sent, key=lambda d: d["epoch"]), sorted(got, key=lambda d: d["epoch"]), strict=True):
                assert set(a["metrics"]) <= set(b["metrics"]), f"epoch {a['epoch']}: metric keys"
                assert a.keys() - {"system"} <= b.keys()
        if event == "training_complete":
            assert set(sent[0]["results"]) <= set(got[0]["results"]), "results keys"
    print("\n".join(table))
    assert len(by_model[ours]["epoch_end"]) == len({d["epoch"] for d in by_model[ours]["epoch_end"]}), "each once"


def _registered(request: dict, platform) -> str:
    """The model a training_started created: the one whose first run began with these trainArgs' name."""
    data = request["json"]["data"]
    for model in platform.models():
        if (
            model["runs"]
            and model["runs"][0]["started"]["trainArgs"] == data["trainArgs"]
            and (("trainbusRunId" in model["environment"]) == ("trainbusRunId" in data["environment"]))
        ):
            return model["id"]
    return "?"


def test_the_mlflow_run_holds_every_param_metric_and_artifact_ultralytics_own_mlflow_callback_logs(
    redis_url, namespace, spool_dir, mlflow_server, tmp_path
):
    """One real training with both Ultralytics' MLflow callback (on, to the real server, from the
    training process) and trainbus's callbacks with the MLflow sink. Both runs land in the
    experiment named by the project arg; key by key, everything Ultralytics logs is in trainbus's run."""
    from mlflow.entities import ViewType

    pipeline = Pipeline(
        redis_url,
        namespace,
        None,
        spool_dir,
        TRAINBUS_SINKS="mlflow",
        TRAINBUS_FILE_ROOTS=f"{spool_dir}:{tmp_path}",
        **mlflow_server.env(),
    )
    client = mlflow_server.client()
    # Made up front: when trainbus's worker creates it at the same moment, MLflow's fluent
    # set_experiment in the training (Ultralytics' callback) gets RESOURCE_ALREADY_EXISTS and
    # its run lands in the Default experiment (seen here).
    client.create_experiment(str(tmp_path / "runs"))
    try:
        pipeline.dispatcher()
        pipeline.worker("mlflow")
        env = {
            "TRAINBUS_REDIS_URL": redis_url,
            "TRAINBUS_NAMESPACE": namespace,
            "TRAINBUS_SPOOL_DIR": str(spool_dir),
            "YOLO_SETTINGS_CLEARML": "False",
            "YOLO_SETTINGS_MLFLOW": "True",
            **mlflow_server.env(),
        }
        project = train(tmp_path, env, "mlflow-parity", 3)
        experiment = client.get_experiment_by_name(str(project))
        assert experiment is not None, "Ultralytics' callback did not log (is mlflow installed beside it?)"

        def both_ended() -> list:
            runs = client.search_runs([experiment.experiment_id], run_view_type=ViewType.ALL)
            return runs if len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs) else []

        runs = wait_for(both_ended, timeout=180)
    finally:
        pipeline.stop()
    (ours,) = [r for r in runs if r.data.tags.get("trainbus.run_id") == "mlflow-parity"]
    (theirs,) = [r for r in runs if r is not ours]
    assert ours.info.run_name == theirs.info.run_name == "train"

    def history(run) -> dict[tuple[str, int], float]:
        points = [(k, m.step, m.value) for k in run.data.metrics for m in client.get_metric_history(run.info.run_id, k)]
        assert len(points) == len({(k, s) for k, s, _ in points}), "a (key, step) twice"
        return {(k, s): v for k, s, v in points}

    def artifacts(run) -> dict[str, str]:
        out = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / run.info.run_id)))
        return {
            str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in out.rglob("*") if p.is_file()
        }

    their_points, our_points = history(theirs), history(ours)
    their_files, our_files = artifacts(theirs), artifacts(ours)
    print(
        f"params: Ultralytics {len(theirs.data.params)}, trainbus {len(ours.data.params)}\n"
        f"metric points: Ultralytics {len(their_points)}, trainbus {len(our_points)}\n"
        f"artifacts: Ultralytics {len(their_files)}, trainbus {len(our_files)}: {sorted(our_files)}"
    )
    assert theirs.data.params == {k: ours.data.params.get(k) for k in theirs.data.params}, "every param, same value"
    assert set(their_points) <= set(our_points), f"trainbus lacks {sorted(set(their_points) - set(our_points))}"
    for key, value in their_points.items():
        if "speed" not in key[0]:  # inference speed is timed, not computed
            assert math.isclose(our_points[key], value, rel_tol=1e-6, abs_tol=1e-12), (key, value, our_points[key])
    assert set(their_files) <= set(our_files), f"trainbus lacks {sorted(set(their_files) - set(our_files))}"
    assert {k: our_files[k] for k in their_files} == their_files, "the same bytes"
