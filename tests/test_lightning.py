"""Real PyTorch Lightning trainings through the whole pipeline (``-m lightning``): the local Platform
server and ClearML offline receive every epoch and step once, the checkpoints whole, the final last;
under ``strategy="ddp", devices=2`` it is one run, published by rank 0 only."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import stream_events
from tests.helpers import producer_env, run_training, wait_for
from tests.pipeline import framework_pipeline
from tests.test_clearml_pipeline import completed as session_closed
from tests.test_clearml_pipeline import plotted_iterations, sessions

pytest.importorskip(
    "lightning", reason="needs PyTorch Lightning: pip install trainbus[lightning] (./dev test -m lightning)"
)
pytestmark = pytest.mark.lightning

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 2
NAME = "tiny-regressor"


@pytest.fixture
def pipeline(redis_url, namespace, spool_dir, platform, tmp_path):
    p = framework_pipeline(redis_url, namespace, spool_dir, platform, tmp_path)
    yield p
    p.stop()


@pytest.mark.parametrize(("mode", "steps_per_epoch"), [("single", 4), ("ddp", 2)])
def test_a_lightning_training_reaches_the_platform_and_clearml_once(
    mode, steps_per_epoch, pipeline, platform, redis_url, namespace, spool_dir, client, keys, tmp_path
):
    run_id = f"lightning-{mode}"
    env = {**producer_env(redis_url, namespace, spool_dir), "TRAINBUS_RUN_ID": run_id}
    run_training([sys.executable, str(ROOT / "tests" / "lightning_training.py"), mode, str(tmp_path)], env, tmp_path)

    events = [e for e in stream_events(client, keys)]
    assert {e["run_id"] for e in events} == {run_id}, "one run: the other rank published nothing"
    kinds = Counter(e["type"] for e in events)
    assert kinds["session"] == 1 and kinds["final"] == 1 and kinds["run_end"] == 1, kinds
    assert [e["payload"]["epoch"] for e in events if e["type"] == "fit_epoch"] == list(range(EPOCHS))
    steps = [
        e["payload"]["step"]
        for e in events
        if e["type"] == "train_epoch" and "train_loss_step" in e["payload"]["metrics"]
    ]
    assert steps == list(range(steps_per_epoch * EPOCHS)), "every step logged once, in order"
    params = next(e for e in events if e["type"] == "pretrain_end")["payload"]["args"]
    assert params["lr"] == 0.05 and params["hidden"] == 8 and params["max_epochs"] == EPOCHS

    model = wait_for(
        lambda: next((m for m in platform.models() if m["slug"] == NAME and m["runs"][-1]["end"]), None), 60
    )
    run = model["runs"][-1]
    assert [e["epoch"] for e in run["epochs"]] == list(range(EPOCHS)), "every epoch once, in order"
    assert all("val_loss" in e["metrics"] for e in run["epochs"])
    best = next(e for e in events if e["type"] == "final")["payload"]["checkpoint"]
    assert run["checkpoints"][-1]["sha256"] == best["sha256"], "the final is the best checkpoint, whole"
    assert run["end"]["event"] == "training_complete"

    cache = tmp_path / "clearml"
    wait_for(lambda: session_closed(cache, NAME), timeout=90)
    plotted = plotted_iterations(sessions(cache)[NAME], "train_loss_step")
    assert plotted == list(range(steps_per_epoch * EPOCHS)), "plotted at the global step, once"
