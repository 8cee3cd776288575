"""What each Ultralytics callback costs the training thread, one call at a time.

    python bench/callbacks.py                       # stand-in trainer, 30 MB checkpoints, Redis up and down
    python bench/callbacks.py --ckpt-mb 260         # a yolov8m-size checkpoint
    python bench/callbacks.py --real --epochs 10    # inside a real tiny YOLO training (needs ultralytics)
    python bench/callbacks.py --adapters            # beside them, the Lightning and transformers adapters'
                                                    # hooks in real tiny trainings (trainbus[lightning,transformers])

The callbacks are trainbus's (``producers.ultralytics``), each wrapped in a timer. With the
stand-in trainer (the attributes and call order of Ultralytics' trainer, a checkpoint of
``--ckpt-mb`` saved in place with ``torch.save`` before every ``on_model_save``), the calls
of an epoch come ``--gap-ms`` of training work apart (1 ms of matmuls), so trainbus's
background work from one call competes with the next, as it would in a fast training. Cases: Redis up, and Redis
unreachable (nothing at the URL: events stay in the spool). With ``--real``, a tiny YOLO
training on generated images (CPU) is run with the callbacks timed in place, Redis up, and
before four of them a probe times two tiny operations at the same point (an ``orjson.dumps``
of two keys; before ``on_model_save`` an ``os.stat`` of last.pt): the floor that the training's
cold caches set there.

With ``--adapters``, the stand-in's Ultralytics case (Redis up) is printed beside real tiny
trainings with ``producers.lightning.TrainbusLogger`` (its logger and callback methods) and
``producers.transformers.TrainbusCallback`` (``tests/lightning_training.py``,
``tests/transformers_training.py``, CPU), each hook timed in place.

Printed per case and callback: calls, p50, p99 and max in microseconds. One-offs are shown
apart: ``on_pretrain_routine_start`` (opens the publisher), ``on_train_end`` (the final, once)
and the first ``on_fit_epoch_end`` (Ultralytics' model info, which the seed computes too).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import redis
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.procs import DEFAULT_REDIS_URL, percentile, table
from producers.ultralytics import UltralyticsHooks
from shared.settings import Settings
from tests.helpers import kill_drainers, yolo_config_dir, yolo_dataset

REDIS_DOWN_URL = "redis://127.0.0.1:1/0"
ONE_OFF = ("on_pretrain_routine_start", "on_pretrain_routine_end", "on_train_start", "on_train_end", "teardown")


class StandInTrainer:
    """An Ultralytics trainer as the callbacks see it: args, epochs, losses, metrics, checkpoints."""

    def __init__(self, save_dir: Path, epochs: int, ckpt_mb: float) -> None:
        self.args = SimpleNamespace(
            model="yolov8n.yaml",
            data="coco8.yaml",
            epochs=epochs,
            imgsz=64,
            batch=2,
            name="bench",
            project="bench",
            task="detect",
            save_dir=save_dir,
        )
        self.save_dir, self.epochs = save_dir, epochs
        (save_dir / "weights").mkdir(parents=True)
        self.last, self.best = save_dir / "weights" / "last.pt", save_dir / "weights" / "best.pt"
        self.weights = torch.randn(max(1, int(ckpt_mb * 1e6 / 4)))  # float32: 4 bytes each
        self.fitness = self.best_fitness = None
        self.metrics: dict[str, float] = {}
        self.validator = SimpleNamespace(save_dir=save_dir, metrics=SimpleNamespace(results_dict={}))

    def label_loss_items(self, loss_items: Any = None, prefix: str = "train") -> Any:
        keys = [f"{prefix}/{x}" for x in ("box_loss", "cls_loss", "dfl_loss")]
        if loss_items is None:
            return keys
        return {k: round(float(v), 5) for k, v in zip(keys, loss_items.values(), strict=True)}

    def epoch_state(self, epoch: int) -> None:
        self.epoch = epoch
        self.tloss = {"box": torch.tensor(1.0 / (epoch + 1)), "cls": torch.tensor(0.5), "dfl": torch.tensor(0.9)}
        self.lr = {"lr/pg0": 0.01, "lr/pg1": 0.01, "lr/pg2": 0.01}
        self.metrics = {"metrics/precision(B)": 0.1, "metrics/mAP50-95(B)": epoch / 1000, "val/box_loss": 1.0}
        self.fitness = epoch / 1000
        self.best_fitness = max(self.best_fitness or 0, self.fitness)
        self.epoch_time = 0.5

    def save(self) -> None:
        torch.save({"epoch": self.epoch, "model": self.weights}, self.last)  # in place, as Ultralytics
        if self.fitness == self.best_fitness:
            self.best.write_bytes(self.last.read_bytes())


def compute_for(seconds: float) -> None:
    """Training work between two calls: small matmuls, so the CPU stays busy as in a training. (A
    sleep would idle it, and on these VMs any code right after a 1-10 ms idle runs 10-50x slower,
    a bytearray copy included: that would measure the machine, not the callback.)"""
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        torch.mm(WORK, WORK)


WORK = torch.randn(64, 64)


def stand_in(redis_url: str, epochs: int, ckpt_mb: float, gap_s: float) -> dict[str, list[float]]:
    """Microseconds per call of each callback over a stand-in training."""
    samples: dict[str, list[float]] = defaultdict(list)
    with tempfile.TemporaryDirectory(prefix="bench-callbacks-") as tmp:
        settings = bench_settings(redis_url, Path(tmp))
        hooks = UltralyticsHooks(settings, fixed_run_id=True)
        callbacks = hooks.callbacks()
        t = StandInTrainer(Path(tmp) / "run", epochs, ckpt_mb)

        def call(name: str, obj: Any) -> None:
            t0 = time.perf_counter_ns()
            callbacks[name](obj)
            samples[name].append((time.perf_counter_ns() - t0) / 1000)
            compute_for(gap_s)

        try:
            call("on_pretrain_routine_start", t)
            call("on_pretrain_routine_end", t)
            call("on_train_start", t)
            for epoch in range(epochs):
                t.epoch_state(epoch)
                call("on_train_epoch_end", t)
                call("on_val_start", t.validator)
                call("on_val_end", t.validator)
                t.save()
                call("on_model_save", t)
                call("on_fit_epoch_end", t)
            call("on_train_end", t)
        finally:
            bus = hooks.publisher
            if bus is not None:
                bus.close(timeout=10)
                if bus.delivery is not None:  # Redis down: it would retry the closed port for a day
                    bus.delivery.kill()
                    bus.delivery.wait()
        samples[WINDOW] = snapshot_windows(redis_url, settings.namespace)
    return dict(samples)


WINDOW = "save -> snapshot copied"


def snapshot_windows(redis_url: str, namespace: str) -> list[float]:
    """Per checkpoint event in the stream: microseconds from the hook (the event's ts) to the end of
    its copy (``copied_at``): how long the trainer must not rewrite the file. Removes the stream."""
    try:
        client = redis.Redis.from_url(redis_url, socket_connect_timeout=2)
        entries = client.xrange(f"{namespace}:events")
        client.delete(*client.keys(f"{namespace}:*") or ["-"])
    except redis.ConnectionError:
        return []  # Redis down: nothing was delivered
    windows = []
    for _, fields in entries:
        event = json.loads(fields[b"event"])
        copied = (event["payload"].get("checkpoint") or {}).get("copied_at")
        if event["type"] == "checkpoint" and copied:
            windows.append((copied - event["ts"]) * 1e6)
    return windows


REAL = textwrap.dedent("""
    import json, os, sys, time
    from collections import defaultdict
    import orjson
    from ultralytics import YOLO
    from producers.ultralytics import make_callbacks

    samples = defaultdict(list)

    def timed(name, fn):
        def hook(obj):
            t0 = time.perf_counter_ns()
            fn(obj)
            samples[name].append((time.perf_counter_ns() - t0) / 1000)
        return hook

    def floor(name):
        # before trainbus's hook, at the same point: what tiny operations cost there (cold caches)
        def probe(obj):
            t0 = time.perf_counter_ns()
            orjson.dumps({"epoch": 1, "loss": 0.5})
            samples[f"{name} | floor: orjson.dumps of 2 keys"].append((time.perf_counter_ns() - t0) / 1000)
            if name == "on_model_save":
                t0 = time.perf_counter_ns()
                os.stat(obj.last)
                samples[f"{name} | floor: os.stat(last.pt)"].append((time.perf_counter_ns() - t0) / 1000)
        return probe

    model = YOLO(sys.argv[5])
    for event, fn in make_callbacks(redis_url=sys.argv[3], console=False).items():
        if event in ("on_train_epoch_end", "on_val_start", "on_model_save", "on_fit_epoch_end"):
            model.add_callback(event, floor(event))
        model.add_callback(event, timed(event, fn))
    model.train(data=sys.argv[1], epochs=int(sys.argv[4]), imgsz=64, batch=4, workers=0, device="cpu", amp=False,
                project=sys.argv[2], name="bench", exist_ok=True, verbose=False, plots=False)
    samples["checkpoint MB"] = [os.path.getsize(model.trainer.last) / 1e6]
    print("SAMPLES " + json.dumps(samples))
""")


def real(redis_url: str, epochs: int, model: str) -> dict[str, list[float]]:
    """Microseconds per call of each callback inside a real tiny YOLO training (a subprocess)."""
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory(prefix="bench-callbacks-yolo-") as tmp:
        root = Path(tmp)
        data = yolo_dataset(root, images=16)
        config = yolo_config_dir(root)
        env = {
            **os.environ,
            "YOLO_OFFLINE": "1",
            "YOLO_CONFIG_DIR": str(config),
            "TRAINBUS_SPOOL_DIR": str(root / "spool"),
            "TRAINBUS_NAMESPACE": namespace,
            "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
            "YOLO_SETTINGS_CLEARML": "False",
        }
        out = subprocess.run(
            [sys.executable, "-c", REAL, str(data), str(root / "runs"), redis_url, str(epochs), model],
            env=env,
            capture_output=True,
            text=True,
            timeout=1800,
            cwd=root,
        )
        line = next((x for x in out.stdout.splitlines() if x.startswith("SAMPLES ")), None)
        if out.returncode or line is None:
            raise SystemExit(f"the YOLO training failed:\n{out.stderr[-3000:]}")
        kill_drainers(root)  # Redis down: the delivery process would retry the closed port for a day
        samples = json.loads(line.removeprefix("SAMPLES "))
        samples[WINDOW] = snapshot_windows(redis_url, namespace)
        return samples


def timed(adapter: Any, names: tuple[str, ...], samples: dict[str, list[float]]) -> None:
    """Each named hook of ``adapter`` replaced, on the instance, by itself inside a timer."""
    for name in names:
        method = getattr(adapter, name)

        def wrapper(*args: Any, _method: Any = method, _name: str = name, **kwargs: Any) -> Any:
            t0 = time.perf_counter_ns()
            try:
                return _method(*args, **kwargs)
            finally:
                samples[_name].append((time.perf_counter_ns() - t0) / 1000)

        setattr(adapter, name, wrapper)


def lightning_case(redis_url: str, epochs: int) -> dict[str, list[float]]:
    """A real tiny Lightning training (``tests/lightning_training.py``), its adapter's hooks timed."""
    from producers.lightning import TrainbusLogger
    from tests.lightning_training import fit

    samples: dict[str, list[float]] = defaultdict(list)
    with tempfile.TemporaryDirectory(prefix="bench-lightning-", ignore_cleanup_errors=True) as tmp:
        bus = TrainbusLogger(name="bench", settings=bench_settings(redis_url, Path(tmp)))
        hooks = ("on_fit_start", "on_train_epoch_start", "on_train_epoch_end", "log_hyperparams", "log_metrics")
        timed(bus, (*hooks, "after_save_checkpoint", "finalize"), samples)
        fit(bus, Path(tmp), epochs)
    return dict(samples)


def transformers_case(redis_url: str, epochs: int) -> dict[str, list[float]]:
    """A real tiny Trainer run (``tests/transformers_training.py``), its callback timed."""
    from producers.transformers import TrainbusCallback
    from tests.transformers_training import train

    samples: dict[str, list[float]] = defaultdict(list)
    with tempfile.TemporaryDirectory(prefix="bench-transformers-", ignore_cleanup_errors=True) as tmp:
        callback = TrainbusCallback(name="bench", settings=bench_settings(redis_url, Path(tmp)))
        names = ("on_train_begin", "on_epoch_begin", "on_log", "on_evaluate", "on_epoch_end", "on_save", "on_train_end")
        timed(callback, names, samples)
        train(callback, Path(tmp), epochs)
    return dict(samples)


def bench_settings(redis_url: str, tmp: Path) -> Settings:
    return Settings.from_env(
        redis_url=redis_url,
        namespace=f"bench-{uuid.uuid4().hex[:8]}",
        spool_dir=tmp / "spool",
        run_id=f"bench-{uuid.uuid4().hex[:8]}",
        console=False,
    )


def rows(case: str, samples: dict[str, list[float]]) -> list[tuple]:
    out = []
    for name, values in samples.items():
        if name == WINDOW:
            continue
        steady = values[1:] if name == "on_fit_epoch_end" and len(values) > 1 else values  # epoch 0: model info
        if name in ONE_OFF or not steady:
            continue
        out.append((case, name, len(steady), statistics.median(steady), percentile(steady, 99), max(steady)))
    return out


def one_offs(case: str, samples: dict[str, list[float]]) -> list[tuple]:
    out = [(case, name, samples[name][0] / 1000) for name in ONE_OFF if samples.get(name)]
    if samples.get("on_fit_epoch_end"):
        out.append((case, "on_fit_epoch_end, epoch 0 (model info)", samples["on_fit_epoch_end"][0] / 1000))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=200, help="epochs (default 200; with --real 10 is plenty)")
    parser.add_argument("--ckpt-mb", type=float, default=30.0, help="checkpoint size in MB (default 30, yolov8n's)")
    parser.add_argument("--gap-ms", type=float, default=1.0, help="pause between calls (default 1 ms)")
    parser.add_argument("--real", action="store_true", help="time them inside a real tiny YOLO training")
    parser.add_argument(
        "--model", default="yolov8n.yaml", help="with --real: yolov8n.yaml (30 MB checkpoints), yolov8m.yaml, ..."
    )
    parser.add_argument(
        "--adapters", action="store_true", help="also the Lightning and transformers adapters, in real tiny trainings"
    )
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL)
    args = parser.parse_args()
    redis.Redis.from_url(args.redis_url, socket_connect_timeout=2).ping()
    if args.adapters:
        cases = {
            "Ultralytics (stand-in)": stand_in(args.redis_url, args.epochs, args.ckpt_mb, args.gap_ms / 1000),
            "Lightning (real, tiny)": lightning_case(args.redis_url, 3),
            "transformers (real, tiny)": transformers_case(args.redis_url, 3),
        }
        print(f"the adapters' hooks, each call timed, Redis up (Ultralytics: {args.epochs} stand-in epochs)")
        every = [
            (case, name, len(v), statistics.median(v), percentile(v, 99), max(v))
            for case, samples in cases.items()
            for name, v in samples.items()
            if name != WINDOW and v
        ]
        print(table(("case", "hook", "calls", "p50 µs", "p99 µs", "max µs"), every))
        return
    if args.real:
        cases = {
            "real YOLO, Redis up": real(args.redis_url, args.epochs, args.model),
            "real YOLO, Redis unreachable": real(REDIS_DOWN_URL, args.epochs, args.model),
        }
        size = cases["real YOLO, Redis up"].pop("checkpoint MB")[0]
        cases["real YOLO, Redis unreachable"].pop("checkpoint MB")
        what = f"a real tiny {args.model} training, {args.epochs} epochs, CPU, {size:.0f} MB checkpoints"
    else:
        cases = {
            "Redis up": stand_in(args.redis_url, args.epochs, args.ckpt_mb, args.gap_ms / 1000),
            "Redis unreachable": stand_in(REDIS_DOWN_URL, args.epochs, args.ckpt_mb, args.gap_ms / 1000),
        }
        what = (
            f"stand-in trainer, {args.epochs} epochs, {args.ckpt_mb:g} MB checkpoints, calls {args.gap_ms:g} ms apart"
        )
    print(f"trainbus's Ultralytics callbacks, each call timed: {what}")
    steady = [r for case, samples in cases.items() for r in rows(case, samples)]
    print(table(("case", "callback", "calls", "p50 µs", "p99 µs", "max µs"), steady))
    windows = [
        (case, len(w), statistics.median(w) / 1000, max(w) / 1000)
        for case, samples in cases.items()
        if (w := samples.get(WINDOW))
    ]
    if windows:
        print("\nfrom a checkpoint's hook to the end of its snapshot's copy")
        print(table(("case", "checkpoints", "p50 ms", "max ms"), windows))
    print("\none-off calls")
    print(table(("case", "callback", "ms"), [r for case, samples in cases.items() for r in one_offs(case, samples)]))


if __name__ == "__main__":
    main()
