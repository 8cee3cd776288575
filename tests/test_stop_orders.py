"""A stop order travels back to training: the Platform's cancel button, or `trainbus stop RUN`.

worker (a reply with cancelled: true) or operator -> Redis -> the training process's background
thread (about once a second) -> the next hook sets ``trainer.stop`` (Ultralytics) or
``Publisher.stop_requested`` turns true (any loop); the run then ends normally.
"""

from __future__ import annotations

import threading
import time

import torch

from producers import Publisher
from producers.ultralytics import make_callbacks
from tests.helpers import wait_for
from tests.pipeline import Pipeline
from tests.test_ultralytics_hooks import StandInTrainer

EPOCH_S = 1.5  # longer than the producer's look for its stop order (1 s)


def test_a_cancel_in_the_platform_stops_the_training_within_one_epoch_and_the_run_ends_normally(
    redis_url, namespace, spool_dir, platform, client, keys, tmp_path
):
    pipeline = Pipeline(
        redis_url, namespace, None, spool_dir, TRAINBUS_SINKS="platform", TRAINBUS_FILE_ROOTS=tmp_path, **platform.env()
    )
    try:
        pipeline.dispatcher()
        pipeline.worker("platform")
        callbacks = make_callbacks(redis_url=redis_url, namespace=namespace, spool_dir=spool_dir, run_id="cancelled")
        t = StandInTrainer(tmp_path / "runs" / "cancelled", epochs=30)
        t.args.name, t.stop = "cancelled", False
        ordered_at: list[int] = []

        def cancel_after_epoch_1() -> None:
            model = wait_for(lambda: [m for m in platform.models() if len(m["runs"][0]["epochs"]) >= 2], timeout=60)[0]
            platform.control("cancel", modelId=model["id"])  # the user presses stop in the Platform's UI
            wait_for(lambda: client.exists(keys.stop("cancelled")), timeout=60, interval=0.01)
            ordered_at.append(t.epoch)

        threading.Thread(target=cancel_after_epoch_1, daemon=True).start()
        callbacks["on_pretrain_routine_start"](t)
        callbacks["on_pretrain_routine_end"](t)
        callbacks["on_train_start"](t)
        for epoch in range(t.epochs):  # the trainer's loop: it checks trainer.stop after each epoch
            t.epoch = epoch
            t.tloss = {"box": torch.tensor(1.0), "cls": torch.tensor(0.5), "dfl": torch.tensor(0.1)}
            callbacks["on_train_epoch_end"](t)
            time.sleep(EPOCH_S)
            t.metrics, t.fitness = {"metrics/mAP50-95(B)": epoch / 100}, epoch / 100
            t.best_fitness = t.fitness
            torch.save({"epoch": epoch}, t.last)
            t.best.write_bytes(t.last.read_bytes())
            callbacks["on_model_save"](t)
            callbacks["on_fit_epoch_end"](t)
            if t.stop:
                break
        stopped_at = t.epoch
        callbacks["on_train_end"](t)
        assert ordered_at, "the order reached Redis"
        assert stopped_at - ordered_at[0] <= 1, f"ordered in epoch {ordered_at[0]}, stopped after epoch {stopped_at}"
        model = wait_for(lambda: (m := platform.models()[0]) and m["runs"][0]["end"] and m, timeout=60)
        assert model["runs"][0]["end"]["event"] == "training_complete", "the run then ended normally"
        assert [e["epoch"] for e in model["runs"][0]["epochs"]] == list(range(stopped_at + 1))
    finally:
        pipeline.stop()


def test_trainbus_stop_tells_any_training_loop(redis_url, namespace, spool_dir, hub):
    told: list[str] = []
    bus = Publisher(redis_url=redis_url, namespace=namespace, spool_dir=spool_dir, run_id="loop", on_stop=told.append)
    pipeline = Pipeline(redis_url, namespace, hub, spool_dir)
    try:
        bus.metrics(0, {"loss": 1.0})
        out = pipeline.cli("stop", "loop", "--reason", "budget used up")
        assert out.returncode == 0 and "told run loop to stop" in out.stdout, out.stderr
        epochs = 0
        while not bus.stop_requested:  # a plain loop, looking once per "epoch"
            bus.metrics(epochs, {"loss": 1.0})
            epochs += 1
            time.sleep(0.1)
            assert epochs < 50, "the order arrived within about a second"
        assert bus.stop_reason == "budget used up" and told == ["budget used up"]
    finally:
        bus.close()
