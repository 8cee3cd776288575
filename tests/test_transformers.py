"""A real Hugging Face ``Trainer`` run through the whole pipeline (``-m transformers``): the local
Platform server and ClearML offline receive every epoch and logged step once, the checkpoints'
weights whole, the best one as the final, last."""

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

pytest.importorskip("transformers", reason="needs transformers: ./dev test -m transformers installs the extra")
pytestmark = pytest.mark.transformers

ROOT = Path(__file__).resolve().parents[1]
EPOCHS, STEPS_PER_EPOCH = 2, 4  # 64 examples, batches of 16
NAME = "tiny-bert"


def test_a_trainer_run_reaches_the_platform_and_clearml_once(
    redis_url, namespace, spool_dir, platform, client, keys, tmp_path
):
    pipeline = framework_pipeline(redis_url, namespace, spool_dir, platform, tmp_path)
    try:
        env = {**producer_env(redis_url, namespace, spool_dir), "TRAINBUS_RUN_ID": "hf-run"}
        run_training([sys.executable, str(ROOT / "tests" / "transformers_training.py"), str(tmp_path)], env, tmp_path)

        events = stream_events(client, keys)
        kinds = Counter(e["type"] for e in events)
        assert kinds["session"] == 1 and kinds["final"] == 1 and kinds["run_end"] == 1, kinds
        assert kinds["checkpoint"] == EPOCHS, "one per save_strategy='epoch' save"
        fit = [e["payload"] for e in events if e["type"] == "fit_epoch"]
        assert [p["epoch"] for p in fit] == list(range(EPOCHS)) and all("eval_loss" in p["metrics"] for p in fit)
        steps = [
            e["payload"]["step"] for e in events if e["type"] == "train_epoch" and "loss" in e["payload"]["metrics"]
        ]
        assert steps == list(range(1, EPOCHS * STEPS_PER_EPOCH + 1)), "every logged step once, in order"
        final = next(e for e in events if e["type"] == "final")["payload"]
        assert final["checkpoint"]["path"].endswith(".safetensors"), "a snapshot of the weights file"

        model = wait_for(
            lambda: next((m for m in platform.models() if m["slug"] == NAME and m["runs"][-1]["end"]), 0), 60
        )
        run = model["runs"][-1]
        assert [e["epoch"] for e in run["epochs"]] == list(range(EPOCHS)), "every epoch once, in order"
        assert run["checkpoints"][-1]["sha256"] == final["checkpoint"]["sha256"], "the best weights, whole, last"
        assert run["end"]["event"] == "training_complete"

        cache = tmp_path / "clearml"
        wait_for(lambda: session_closed(cache, NAME), timeout=90)
        assert plotted_iterations(sessions(cache)[NAME], "loss") == steps, "plotted at the global step, once"
    finally:
        pipeline.stop()
