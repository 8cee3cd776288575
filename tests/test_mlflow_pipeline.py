"""The MLflow path end to end against a real `mlflow server`: producer -> Redis -> dispatcher ->
`rq worker mlflow` -> MLflow's REST API (through a faulting proxy), read back with MlflowClient.

What MLflow holds is read from the server itself: params, each metric's history (a (key,
step) twice is a duplicate the UI shows), artifacts (downloaded and hashed), run status.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from pathlib import Path

import pytest
import torch

from producers import Publisher
from shared.events import EventType
from tests.helpers import wait_for
from tests.pipeline import Pipeline
from workers.devstack.local_mlflow import PASSWORD, MlflowServer

EPOCHS = 4


def mlflow_pipeline(redis_url, namespace, spool_dir, tmp_path, mlflow_env: dict[str, str]) -> Pipeline:
    return Pipeline(
        redis_url,
        namespace,
        None,
        spool_dir,
        TRAINBUS_SINKS="mlflow",
        TRAINBUS_FILE_ROOTS=f"{spool_dir}:{tmp_path / 'runs'}",
        TRAINBUS_MLFLOW_TIMEOUT_S=2,
        **mlflow_env,
    )


@pytest.fixture
def pipeline(redis_url, namespace, spool_dir, tmp_path, mlflow_server, mlflow_proxy):
    p = mlflow_pipeline(redis_url, namespace, spool_dir, tmp_path, mlflow_server.env(mlflow_proxy.url))
    yield p
    p.stop()


def publisher(p: Pipeline, spool_dir: Path, run_id: str) -> Publisher:
    return Publisher(redis_url=p.redis_url, namespace=p.namespace, spool_dir=spool_dir, run_id=run_id)


def train(bus: Publisher, save_dir: Path, experiment: str, epochs: int = EPOCHS, *, between=None) -> dict:
    """What the Ultralytics callbacks publish, reduced; returns what MLflow must hold for it."""
    weights = save_dir / "weights"
    weights.mkdir(parents=True, exist_ok=True)
    last, best = weights / "last.pt", weights / "best.pt"
    args = {"epochs": epochs, "optimizer": "auto", "lr0": 0.01, "project": experiment, "name": save_dir.name}
    bus.session(args, name=save_dir.name, project=experiment)
    bus.lifecycle(EventType.PRETRAIN_END, args={**args, "optimizer": "SGD"})  # as set-up resolved it
    metrics: dict[str, dict[int, float]] = {}
    for epoch in range(epochs):
        train_loss = round(1.0 / (epoch + 1), 6)
        bus.metrics(epoch, {"train/box_loss": train_loss}, stage="train", lr={"lr/pg0": 0.01 - epoch / 1000})
        fit = {"train/box_loss": train_loss, "val/box_loss": 2 * train_loss, "metrics/mAP50-95(B)": epoch / 100}
        bus.metrics(epoch, fit, stage="fit", final_eval=False)
        for key, value in {**fit, "lr/pg0": 0.01 - epoch / 1000}.items():
            metrics.setdefault(key.replace("(", "").replace(")", ""), {})[epoch] = value
        torch.save({"epoch": epoch, "w": torch.full((64,), float(epoch))}, last)
        bus.checkpoint(last, epoch, is_best=True)
        shutil.copyfile(last, best)
        if between:
            between(epoch)
    bus.metrics(epochs, {"metrics/mAP50-95(B)": 0.5, "train/box_loss": 9.0}, stage="fit", final_eval=True)
    metrics["metrics/mAP50-95B"][epochs] = 0.5
    (save_dir / "results.csv").write_text("epoch,loss\n1,0.5\n")
    (save_dir / "args.yaml").write_text("epochs: 4\n")
    torch.save({"final": True}, last)  # the final validation strips the optimizer from last.pt
    bus.checkpoint(last, epochs - 1, is_best=False)
    bus.final(best, epochs - 1, {"metrics/mAP50-95(B)": 0.5}, files=[save_dir / "results.csv", save_dir / "args.yaml"])
    bus.end()
    return {
        "params": {**{k: str(v) for k, v in args.items()}, "optimizer": "SGD"},
        "metrics": metrics,
        "artifacts": {
            "weights/best.pt": sha256(best),
            "weights/last.pt": sha256(last),
            "results.csv": sha256(save_dir / "results.csv"),
            "args.yaml": sha256(save_dir / "args.yaml"),
        },
    }


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def runs_of(mlflow_server, experiment: str, run_id: str) -> list:
    from mlflow.entities import ViewType

    client = mlflow_server.client()
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return client.search_runs(
        [exp.experiment_id], filter_string=f"tags.`trainbus.run_id` = '{run_id}'", run_view_type=ViewType.ALL
    )


def finished(mlflow_server, experiment: str, run_id: str) -> bool:
    runs = runs_of(mlflow_server, experiment, run_id)
    return bool(runs) and runs[0].info.status == "FINISHED"


def held(mlflow_server, experiment: str, run_id: str, tmp_path: Path) -> dict:
    """What the server holds for the run: params, each key's history as (step, value), artifacts."""
    client = mlflow_server.client()
    (run,) = runs_of(mlflow_server, experiment, run_id)
    rid = run.info.run_id
    history = {k: [(m.step, m.value) for m in client.get_metric_history(rid, k)] for k in run.data.metrics}
    out = tmp_path / f"download-{run_id}"
    out.mkdir()
    local = Path(client.download_artifacts(rid, "", str(out)))
    artifacts = {str(p.relative_to(local)): sha256(p) for p in local.rglob("*") if p.is_file()}
    return {
        "name": run.info.run_name,
        "status": run.info.status,
        "params": run.data.params,
        "history": history,
        "artifacts": artifacts,
    }


def check_whole(got: dict, expected: dict) -> None:
    assert got["status"] == "FINISHED"
    assert got["params"] == expected["params"]
    for key, steps in expected["metrics"].items():
        assert sorted(got["history"][key]) == sorted(steps.items()), key  # each step once, the value sent
    assert [s for s, _ in got["history"]["train/box_loss"]] == list(range(EPOCHS))  # none at the final validation
    assert got["artifacts"] == expected["artifacts"]


def deliver(pipeline, spool_dir, tmp_path, mlflow_server, namespace, name: str, timeout: float = 90, between=None):
    """One training through a dispatcher and a worker, until MLflow has the run FINISHED: what it
    must hold, and what it holds."""
    pipeline.dispatcher()
    pipeline.worker("mlflow")
    bus = publisher(pipeline, spool_dir, f"ml-{name}")
    expected = train(bus, tmp_path / "runs" / name, namespace, between=between)
    bus.close()
    wait_for(lambda: finished(mlflow_server, namespace, f"ml-{name}"), timeout=timeout)
    return expected, held(mlflow_server, namespace, f"ml-{name}", tmp_path)


def test_a_training_reaches_mlflow_whole_each_point_once(pipeline, spool_dir, tmp_path, mlflow_server, namespace):
    expected, got = deliver(pipeline, spool_dir, tmp_path, mlflow_server, namespace, "whole")
    assert got["name"] == "whole"
    check_whole(got, expected)
    status = pipeline.cli("status")
    assert "mlflow" in status.stdout, status.stdout + status.stderr


def test_a_lost_reply_to_the_run_creation_makes_one_run(
    pipeline, spool_dir, tmp_path, mlflow_server, mlflow_proxy, namespace
):
    mlflow_proxy.fault(endpoint="runs/create", lost_reply=True)
    expected, got = deliver(pipeline, spool_dir, tmp_path, mlflow_server, namespace, "lost")
    assert [r["status"] for r in mlflow_proxy.requests("runs/create")] == ["lost reply"]  # the server made it
    assert len(runs_of(mlflow_server, namespace, "ml-lost")) == 1
    check_whole(got, expected)


def test_batches_answered_past_the_timeout_are_not_sent_again(
    pipeline, spool_dir, tmp_path, mlflow_server, mlflow_proxy, namespace
):
    """The server logs the batch but answers after the worker's timeout (2 s): the retry asks the
    server what it holds and sends only the rest, so no point travels twice."""
    mlflow_proxy.fault(endpoint="runs/log-batch:metrics", hang=4, count=2)
    expected, got = deliver(pipeline, spool_dir, tmp_path, mlflow_server, namespace, "slow", timeout=120)
    check_whole(got, expected)
    sent: dict[tuple[str, int], int] = {}
    for r in mlflow_proxy.requests("runs/log-batch:metrics"):
        for m in (r.get("json") or {}).get("metrics", []):
            sent[(m["key"], int(m["step"]))] = sent.get((m["key"], int(m["step"])), 0) + 1
    assert sent and set(sent.values()) == {1}, {k: n for k, n in sent.items() if n > 1}
    assert mlflow_proxy.requests("metrics/get-history"), "the retry did not ask the server what it holds"


def test_the_server_stopped_mid_run_and_restarted_loses_nothing(
    pipeline, spool_dir, tmp_path, mlflow_server, namespace
):
    def outage(epoch: int) -> None:
        if epoch == 1:
            mlflow_server.stop()
        if epoch == 3:
            time.sleep(2)
            mlflow_server.start()

    pipeline.dispatcher()
    pipeline.worker("mlflow")
    bus = publisher(pipeline, spool_dir, "ml-down")
    try:
        expected = train(bus, tmp_path / "runs" / "down", namespace, between=outage)
    finally:
        if mlflow_server.proc is None:
            mlflow_server.start()
    bus.close()
    wait_for(lambda: finished(mlflow_server, namespace, "ml-down"), timeout=180)
    check_whole(held(mlflow_server, namespace, "ml-down", tmp_path), expected)


def test_a_worker_killed_mid_batch_and_two_racing_on_three_runs(
    pipeline, spool_dir, tmp_path, mlflow_server, mlflow_proxy, namespace
):
    mlflow_proxy.fault(endpoint="runs/log-batch:metrics", hang=15)  # the first batch hangs at the server's door
    pipeline.dispatcher()
    doomed = pipeline.worker("mlflow")
    expected = {}
    for name in ("r1", "r2", "r3"):
        bus = publisher(pipeline, spool_dir, f"ml-{name}")
        expected[name] = train(bus, tmp_path / "runs" / name, namespace)
        bus.close()
    wait_for(lambda: mlflow_proxy.requests("runs/log-batch:metrics"), timeout=60)
    pipeline.kill(doomed)  # mid-call: its batch reaches the server later, answered to nobody
    pipeline.worker("mlflow")
    pipeline.worker("mlflow")
    for name in expected:
        wait_for(lambda name=name: finished(mlflow_server, namespace, f"ml-{name}"), timeout=180)
    for name, want in expected.items():
        assert len(runs_of(mlflow_server, namespace, f"ml-{name}")) == 1
        check_whole(held(mlflow_server, namespace, f"ml-{name}", tmp_path), want)


def test_bad_credentials_stop_the_run_with_what_to_fix_and_the_password_stays_out(
    redis_url, namespace, spool_dir, tmp_path, client
):
    (tmp_path / "auth").mkdir()
    server = MlflowServer(tmp_path / "auth", auth=True).start()  # basic auth, as a deployed server
    wrong = "not-the-Password-42"
    p = mlflow_pipeline(redis_url, namespace, spool_dir, tmp_path, server.env(password=wrong))
    try:
        p.dispatcher()
        p.worker("mlflow")
        bus = publisher(p, spool_dir, "ml-auth")
        train(bus, tmp_path / "runs" / "auth", namespace)
        bus.close()
        wait_for(lambda: "MLFLOW_TRACKING_PASSWORD" in p.cli("failed").stdout, timeout=60)
        failed = p.cli("failed").stdout
        assert "credentials" in failed and "--requeue" in failed, failed
        assert not runs_of(server, namespace, "ml-auth")
    finally:
        p.stop()
        server.stop()
    logs = b"".join(f.read_bytes() for f in spool_dir.glob("proc-*.log"))
    assert wrong.encode() not in logs and PASSWORD.encode() not in logs
    for key in client.scan_iter(match=f"{namespace}:*"):
        assert wrong.encode() not in key
        kind = client.type(key)
        dump = client.dump(key) or b""
        assert wrong.encode() not in dump, (key, kind)


def drain_until_done(sink, run_id: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while (wait := sink.drain(run_id)) is not None:
        assert time.monotonic() < deadline, f"run {run_id} still has work after {timeout} s"
        time.sleep(min(wait, 0.2))


def test_a_failed_run_ends_failed_a_silent_one_killed_and_nan_is_kept(
    redis_url, namespace, client, keys, mlflow_server, tmp_path
):
    """The sink driven directly (no worker process), against the real server."""
    from shared.events import Event
    from shared.settings import WorkerSettings
    from workers.sinks.mlflow import MlflowSink

    mlflow_server.client()  # its credentials into this process's environment, where MLflow reads them
    settings = WorkerSettings(
        redis_url=redis_url,
        namespace=namespace,
        file_roots=(tmp_path,),
        mlflow_tracking_uri=mlflow_server.url,
        mlflow_experiment=namespace,
        rate_metrics=0.01,
    )
    sink = MlflowSink(client, keys, settings)

    def record(run: str, seq: int, type: str, payload: dict, *, ago: float = 0.0, nulls=()) -> None:
        pipe = client.pipeline()
        sink.record(pipe, Event(run, seq, time.time() - ago, type, payload, list(nulls)))
        pipe.execute()

    record("ml-failed", 0, "session", {"args": {"epochs": 2}, "name": "failed"})
    record("ml-failed", 1, "fit_epoch", {"epoch": 0, "metrics": {"val/loss": None}}, nulls=["metrics.val/loss"])
    record("ml-failed", 2, "run_end", {"status": "failed", "error": "CUDA out of memory"})
    drain_until_done(sink, "ml-failed")
    record("ml-silent", 0, "session", {"args": {"epochs": 2}, "name": "silent"}, ago=400)
    record("ml-silent", 1, "fit_epoch", {"epoch": 0, "metrics": {"val/loss": 0.5}}, ago=400)
    drain_until_done(sink, "ml-silent")

    (failed,) = runs_of(mlflow_server, namespace, "ml-failed")
    (silent,) = runs_of(mlflow_server, namespace, "ml-silent")
    assert (failed.info.status, silent.info.status) == ("FAILED", "KILLED")
    nan = mlflow_server.client().get_metric_history(failed.info.run_id, "val/loss")
    assert len(nan) == 1 and nan[0].value != nan[0].value  # NaN in training is NaN in MLflow

    # the "silent" producer was only cut off: what it sends now continues the run, and ends it
    record("ml-silent", 2, "fit_epoch", {"epoch": 1, "metrics": {"val/loss": 0.25}})
    record("ml-silent", 3, "run_end", {"status": "completed"})
    drain_until_done(sink, "ml-silent")
    (silent,) = runs_of(mlflow_server, namespace, "ml-silent")
    history = mlflow_server.client().get_metric_history(silent.info.run_id, "val/loss")
    assert silent.info.status == "FINISHED" and sorted((m.step, m.value) for m in history) == [(0, 0.5), (1, 0.25)]

    # resumed after it ended (a later session of the same run id): the same MLflow run runs again
    record("ml-silent", 4, "session", {"args": {"epochs": 3}, "name": "silent"})
    record("ml-silent", 5, "fit_epoch", {"epoch": 2, "metrics": {"val/loss": 0.125}})
    sink.drain("ml-silent")
    assert runs_of(mlflow_server, namespace, "ml-silent")[0].info.status == "RUNNING"
    record("ml-silent", 6, "run_end", {"status": "completed"})
    drain_until_done(sink, "ml-silent")
    (resumed,) = runs_of(mlflow_server, namespace, "ml-silent")
    history = mlflow_server.client().get_metric_history(resumed.info.run_id, "val/loss")
    assert resumed.info.run_id == silent.info.run_id and resumed.info.status == "FINISHED"
    assert sorted(m.step for m in history) == [0, 1, 2], "each step once across the resume"
