"""Hugging Face transformers: a ``TrainerCallback`` that publishes a ``Trainer`` run as events.

    from transformers import Trainer
    from producers.transformers import TrainbusCallback

    trainer = Trainer(model, args, train_dataset=train, eval_dataset=val, callbacks=[TrainbusCallback()])
    trainer.train()

(``report_to`` takes only the integrations transformers itself knows, so the callback is passed
by ``callbacks=[...]``; ``report_to="none"`` leaves it the only tracker.) What it publishes:
``on_train_begin`` the session (the ``TrainingArguments``); every ``on_log`` a ``train_epoch``
point at ``state.global_step`` (loss, learning rate, grad norm, eval metrics: ClearML and MLflow
plot them by step); once per epoch a ``fit_epoch`` with the epoch's latest values, for HUB and
the Platform: after the epoch's evaluation with ``eval_strategy="epoch"``, else at the epoch's
end. ``on_save`` names the checkpoint's weights file (``model.safetensors``), snapshotted before
the next save; ``on_train_end`` the final (the best checkpoint's weights, else the last) and the
end of the run. The epoch is the Trainer's, 0-based: ``ceil(state.epoch) - 1``. Only the world's
process zero publishes (``state.is_world_process_zero``).
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from producers.adapter import Adapter, numbers
from producers.publisher import Publisher

WEIGHTS = ("model.safetensors", "pytorch_model.bin", "adapter_model.safetensors")


class TrainbusCallback(Adapter, TrainerCallback):
    """Publishes one ``Trainer.train()``. ``name``/``project``: the run's name and project at the sinks
    (default: ``args.run_name``, and TRAINBUS_PLATFORM_PROJECT or ``transformers``)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._latest: dict[str, float] = {}
        self._last_saved: str | None = None
        self._epoch_started = time.monotonic()

    def bus(self, state: TrainerState) -> Publisher | None:
        """The publisher in the world's process zero; None elsewhere or if it cannot open."""
        return self.open_bus() if state.is_world_process_zero else None

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: Any = None, **kw: Any
    ) -> None:
        if bus := self.bus(state):
            bus.session(
                args.to_dict(),
                name=self.run_name or args.run_name or type(model).__name__,
                project=self.project or os.environ.get("TRAINBUS_PLATFORM_PROJECT") or "transformers",
                epochs=math.ceil(args.num_train_epochs),
                framework="transformers",
                device=str(args.device),
                save_dir=args.output_dir,
            )

    def on_epoch_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        self._epoch_started = time.monotonic()

    def on_log(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs: Any = None, **kw: Any
    ) -> None:
        values = numbers(logs or {})
        values.pop("epoch", None)
        if values and (bus := self.bus(state)):
            self._latest.update(values)
            bus.metrics(_epoch(state), values, stage="train", step=state.global_step)

    def on_evaluate(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, metrics: Any = None, **kw: Any
    ) -> None:
        self._latest.update(numbers(metrics or {}))
        if _strategy(args.eval_strategy) == "epoch":
            self._epoch_done(state)

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        if _strategy(args.eval_strategy) != "epoch":  # else the epoch's evaluation, which comes next, ends it
            self._epoch_done(state)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        directory = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        weights = _weights(directory)
        if weights and (bus := self.bus(state)):
            self._last_saved = weights
            best = state.best_model_checkpoint and os.path.abspath(state.best_model_checkpoint) == directory
            bus.checkpoint(weights, _epoch(state), is_best=bool(best))

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        bus = self.bus(state)
        if bus is None:
            return
        best = _weights(state.best_model_checkpoint or "") or self._last_saved
        if best:
            summary: dict[str, Any] = {"metrics": dict(self._latest), "best_epoch": _epoch(state)}
            if state.best_metric is not None:
                summary["best_fitness"] = float(state.best_metric)
            bus.final(best, _epoch(state), dict(self._latest), summary=summary)
        self.close_bus(
            "stopped" if control.should_training_stop and state.epoch < args.num_train_epochs else "completed"
        )

    def _epoch_done(self, state: TrainerState) -> None:
        if bus := self.bus(state):
            bus.metrics(
                _epoch(state),
                dict(self._latest),
                step=state.global_step,
                epoch_time=round(time.monotonic() - self._epoch_started, 3),
                series_logged=True,
            )


def _epoch(state: TrainerState) -> int:
    """0-based: ``state.epoch`` is progress (0.25 in the first quarter of epoch 0, 1.0 at its end)."""
    return max(0, math.ceil(state.epoch or 0) - 1)


def _strategy(value: Any) -> str:
    return str(getattr(value, "value", value))


def _weights(directory: str) -> str | None:
    for name in WEIGHTS:
        path = os.path.join(directory, name)
        if directory and os.path.isfile(path):
            return path
    return None
