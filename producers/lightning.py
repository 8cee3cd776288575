"""PyTorch Lightning: one object that is both the ``Logger`` and a ``Callback`` of a training.

    import lightning as L
    from producers.lightning import TrainbusLogger

    bus = TrainbusLogger(project="my-project")   # settings as Publisher's, else TRAINBUS_*
    trainer = L.Trainer(logger=bus, callbacks=[bus])
    trainer.fit(model, datamodule)

As the logger it gets what the training logs: ``log_metrics(metrics, step)`` becomes a
``train_epoch`` event with its ``step`` (ClearML and MLflow plot every point at that step),
``log_hyperparams`` a ``pretrain_end`` with the args, ``after_save_checkpoint`` a checkpoint
event for the file ModelCheckpoint just wrote (snapshotted before the next save, like
Ultralytics' ``last.pt``), ``finalize`` the final (the best checkpoint, else the last) and the
run's end. As the callback it gets the epoch boundary that a logger never sees:
``on_fit_start`` the session, ``on_train_epoch_end`` (after validation) a ``fit_epoch`` with
``trainer.callback_metrics``, which is the per-epoch record of HUB and the Platform (marked
``series_logged``: the series sinks have those points already). Lightning's epoch is the epoch
everywhere. Only global rank 0 publishes (the logger methods are rank-zero-only, as every
Lightning logger's; the callback asks ``trainer.is_global_zero``); the object pickles with
nothing open in it, for ``ddp_spawn``.
"""

from __future__ import annotations

import os
import time
from argparse import Namespace
from collections.abc import Mapping
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers.logger import Logger
from lightning.pytorch.utilities import rank_zero_only

from producers.adapter import Adapter, numbers
from shared.events import EventType

STATUS = {"success": "completed", "finished": "completed", "failed": "failed", "interrupted": "stopped"}


class TrainbusLogger(Adapter, Logger, Callback):
    """Publishes a Lightning training. ``name``/``project``: the run's name and project at the sinks
    (default: the LightningModule's class name, and TRAINBUS_PLATFORM_PROJECT or ``lightning``)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._trainer: Trainer | None = None
        self._epoch = 0
        self._epoch_started = time.monotonic()

    # -- Logger ------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.run_name or "trainbus"

    @property
    def version(self) -> str:
        return self.settings.run_id

    @rank_zero_only
    def log_hyperparams(self, params: dict[str, Any] | Namespace, *args: Any, **kwargs: Any) -> None:
        if bus := self.open_bus():
            values = vars(params) if isinstance(params, Namespace) else dict(params)
            # objects JSON cannot hold become text in the encoder
            bus.lifecycle(EventType.PRETRAIN_END, args={**_trainer_args(self._trainer), **values})

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if bus := self.open_bus():
            values = dict(metrics)
            epoch = values.pop("epoch", self._epoch)
            bus.metrics(int(epoch), numbers(values), stage="train", step=step)

    @rank_zero_only
    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        path = getattr(checkpoint_callback, "_last_checkpoint_saved", "") or checkpoint_callback.last_model_path
        if path and (bus := self.open_bus()):
            best = os.path.abspath(path) == os.path.abspath(checkpoint_callback.best_model_path or "")
            bus.checkpoint(path, self._epoch, is_best=best)

    @rank_zero_only
    def finalize(self, status: str) -> None:
        bus, trainer = self.publisher, self._trainer
        if bus is None:
            return
        best = _best_checkpoint(trainer)
        if best and status == "success":
            metrics = numbers(trainer.callback_metrics) if trainer else {}
            score = getattr(trainer.checkpoint_callback, "best_model_score", None) if trainer else None
            summary = {"metrics": metrics, "best_epoch": self._epoch}
            if score is not None:
                summary["best_fitness"] = float(score)
            bus.final(best, self._epoch, metrics, summary=summary)
        self.close_bus(STATUS.get(status, "failed"))

    # -- Callback ----------------------------------------------------------------------

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._trainer = trainer
        if not trainer.is_global_zero or not (bus := self.open_bus()):
            return
        bus.session(
            _trainer_args(trainer),
            name=self.run_name or type(pl_module).__name__,
            project=self.project or os.environ.get("TRAINBUS_PLATFORM_PROJECT") or "lightning",
            epochs=trainer.max_epochs,
            framework="lightning",
            device=str(pl_module.device),
            save_dir=str(trainer.default_root_dir),
        )
        bus.lifecycle(EventType.TRAIN_START, epochs=trainer.max_epochs)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._epoch, self._epoch_started = trainer.current_epoch, time.monotonic()

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.is_global_zero and (bus := self.open_bus()):
            bus.metrics(
                trainer.current_epoch,
                numbers(trainer.callback_metrics),
                step=trainer.global_step,
                epoch_time=round(time.monotonic() - self._epoch_started, 3),
                series_logged=True,
            )
            if bus.stop_requested:  # a Platform cancel or `trainbus stop`: end at this epoch boundary
                trainer.should_stop = True


def _trainer_args(trainer: Trainer | None) -> dict[str, Any]:
    """What of the trainer's configuration the sinks show as args."""
    if trainer is None:
        return {}
    return {
        "max_epochs": trainer.max_epochs,
        "max_steps": trainer.max_steps,
        "accumulate_grad_batches": trainer.accumulate_grad_batches,
        "precision": str(trainer.precision),
        "world_size": trainer.world_size,
        "strategy": type(trainer.strategy).__name__,
        "accelerator": type(trainer.accelerator).__name__,
    }


def _best_checkpoint(trainer: Trainer | None) -> str | None:
    callback = getattr(trainer, "checkpoint_callback", None)
    for path in (getattr(callback, "best_model_path", ""), getattr(callback, "last_model_path", "")):
        if path and os.path.isfile(path):
            return path
    return None
