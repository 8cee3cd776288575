"""Drop-in Ultralytics callbacks: what the HUB and ClearML callbacks send, as events.

    from ultralytics import YOLO
    from producers.ultralytics import callbacks

    model = YOLO("yolov8n.yaml")
    for event, fn in callbacks.items():
        model.add_callback(event, fn)
    model.train(data="coco8.yaml", epochs=3)

``callbacks`` is configured from the ``TRAINBUS_*`` environment (checked where it is
imported, so a bad value stops the script before training starts); ``make_callbacks(**settings)`` takes
the same settings as arguments. A publisher (spool, delivery process) opens when a training
starts and closes at interpreter exit.

The trainer's quirks are tolerated: ``epoch``, ``lr``, ``tloss`` and ``fitness`` are
missing or None early on; the final validation repeats ``on_fit_epoch_end`` once more
(marked ``final_eval``); mosaic images are drawn in a background thread and appear late,
so they are sent as a directory and a glob for the worker to wait on.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from producers.publisher import Publisher
from producers.rank import publishes
from shared.events import EventType
from shared.settings import Settings, generate_run_id

log = logging.getLogger("trainbus.ultralytics")

PLOT_NAMES = ("results.png", "confusion_matrix.png", "confusion_matrix_normalized.png")
PLOT_PATTERN = "*_curve.png"  # F1/PR/P/R curves, prefixed by task in recent releases
MAP_KEY = "metrics/mAP50-95(B)"
FINISHED_SUFFIXES = (".png", ".jpg", ".csv", ".yaml")  # of the save dir's files, kept as artifacts

Callback = Callable[[Any], None]


class UltralyticsHooks:
    """Holds one training's publisher and the little state the trainer does not keep."""

    def __init__(self, settings: Settings, *, fixed_run_id: bool) -> None:
        self.settings = settings
        self.fixed_run_id = fixed_run_id  # else each training in this process gets a new id
        self.publisher: Publisher | None = None
        self.failure: str | None = None  # why this training is not recorded (said once)
        self._fit_epochs_seen: set[int] = set()
        self._losses = _LossCache()
        self._console: Any = None  # Ultralytics' ConsoleLogger, while this training's console is captured
        self.publishing: bool | None = None  # global rank 0 (or not distributed); decided at the first hook

    def __getstate__(self) -> dict[str, Any]:
        """Pickled into DDP ranks (Ultralytics >= 8.4 does, with cloudpickle): settings only. Each rank
        decides at its first hook whether it publishes; rank 0 opens its own publisher."""
        state = {"settings": self.settings, "fixed_run_id": self.fixed_run_id}
        if self.publisher is not None and not self.fixed_run_id:  # that run is this process's: a new one
            state["settings"] = dataclasses.replace(self.settings, run_id=generate_run_id())
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["settings"], fixed_run_id=state["fixed_run_id"])

    def bus(self) -> Publisher | _Unrecorded:
        """The open publisher, opened on first use (val/predict/export may come first).

        If it cannot open (spool not writable, disk full, the run open in another process),
        that is said once and every hook of this training does nothing, in nanoseconds.
        """
        if self.publisher is not None:
            return self.publisher
        if self.failure is None:
            try:
                self.publisher = Publisher(self.settings, system_metrics=True)
            except Exception as exc:
                self.failure = f"{exc.__class__.__name__}: {exc}"
                log.error("trainbus cannot record this training (%s); its hooks do nothing", self.failure)
                return UNRECORDED
            self._add_ultralytics_key()
            return self.publisher
        return UNRECORDED

    # -- trainer ------------------------------------------------------------------------

    def on_pretrain_routine_start(self, trainer: Any) -> None:
        if self.publisher is not None:  # a second training in this process: a new run
            self.publisher.close()
            self.publisher = None
            if not self.fixed_run_id:
                self.settings = dataclasses.replace(self.settings, run_id=generate_run_id())
        self.failure = None  # a new training tries again
        self._fit_epochs_seen.clear()
        args = dict(vars(trainer.args)) if getattr(trainer, "args", None) is not None else {}
        self.bus().session(
            args,
            name=args.get("name"),
            project=args.get("project"),
            task=args.get("task"),
            save_dir=str(getattr(trainer, "save_dir", "") or "") or None,
            epochs=getattr(trainer, "epochs", args.get("epochs")),
            framework="ultralytics",
            device=str(getattr(trainer, "device", "") or args.get("device") or ""),
            environment=_environment(),  # once, as the Platform's callbacks do (a few ms)
        )

    def on_pretrain_routine_end(self, trainer: Any) -> None:
        # The args as set-up resolved them (optimizer=auto -> the one chosen): MLflow's params.
        args = dict(vars(trainer.args)) if getattr(trainer, "args", None) is not None else None
        self.bus().lifecycle(EventType.PRETRAIN_END, args=args)
        if self.settings.console and self.publisher is not None and self._console is None:
            # Not at the routine's start: ClearML's Task.init (run then) fails on a captured stdout.
            self._console = _capture_console(self.publisher)
        self._obey_stop(trainer)  # the trainer's set-up reset trainer.stop: an order from the start holds

    def on_train_start(self, trainer: Any) -> None:
        self.bus().lifecycle(EventType.TRAIN_START, epochs=getattr(trainer, "epochs", None))

    def on_train_epoch_end(self, trainer: Any) -> None:
        epoch = getattr(trainer, "epoch", None)
        lr = getattr(trainer, "lr", None) or {}
        self.bus().metrics(epoch, self._losses.get(trainer), stage="train", lr=dict(lr))
        if epoch == 0 and getattr(trainer, "save_dir", None):
            self.bus().media("debug", "Mosaic", directory=trainer.save_dir, pattern="train_batch*.jpg", iteration=epoch)
        self._obey_stop(trainer)

    def on_fit_epoch_end(self, trainer: Any) -> None:
        epoch = getattr(trainer, "epoch", None)
        final_eval = epoch in self._fit_epochs_seen or (
            isinstance(epoch, int) and epoch >= (getattr(trainer, "epochs", None) or sys.maxsize)
        )
        self._fit_epochs_seen.add(epoch)
        metrics = {**self._losses.get(trainer), **(getattr(trainer, "metrics", None) or {})}
        extra: dict[str, Any] = {
            "epoch_time": getattr(trainer, "epoch_time", None),
            "final_eval": final_eval,
            "fitness": getattr(trainer, "fitness", None),
            "best_fitness": getattr(trainer, "best_fitness", None),
            "lr": _first_lr(trainer),
            "system": self.publisher.system_sample() if self.publisher is not None else None,  # sampled elsewhere
        }
        if epoch == 0 and not final_eval:
            extra["model_info"] = _model_info(trainer)  # costly: once, as HUB and ClearML do
        self.bus().metrics(epoch, metrics, stage="fit", **extra)
        self._obey_stop(trainer)

    def on_model_save(self, trainer: Any) -> None:
        fitness = getattr(trainer, "fitness", None)
        is_best = fitness is not None and getattr(trainer, "best_fitness", None) == fitness
        self.bus().checkpoint(trainer.last, getattr(trainer, "epoch", 0), is_best=is_best)

    def on_train_end(self, trainer: Any) -> None:
        self.teardown(trainer)  # the console's last lines go before the final, as in Ultralytics
        bus = self.bus()
        plots = _plots(trainer)
        if plots:
            bus.media("plot", "Results", paths=plots)
        elif getattr(trainer, "save_dir", None):  # a trainer that does not register its plots
            bus.media("plot", "Results", directory=trainer.save_dir, names=PLOT_NAMES, pattern=PLOT_PATTERN)
        metrics = getattr(trainer, "metrics", None) or {}
        validator_metrics = getattr(getattr(getattr(trainer, "validator", None), "metrics", None), "results_dict", None)
        last = getattr(trainer, "last", None)
        if last is not None and os.path.exists(last):  # as the final validation left it (optimizer stripped)
            bus.checkpoint(last, getattr(trainer, "epoch", 0), is_best=False)
        bus.final(
            trainer.best,
            getattr(trainer, "epoch", 0),
            validator_metrics or metrics,
            map50_95=metrics.get(MAP_KEY, 0),
            summary=_summary(trainer),
            files=_finished_files(trainer),
        )
        bus.end("stopped" if getattr(self.publisher, "stop_requested", False) else "completed")

    # -- validator, predictor, exporter -----------------------------------------------

    def on_val_start(self, validator: Any) -> None:
        self.bus().lifecycle(EventType.VAL_START)

    def on_val_end(self, validator: Any) -> None:
        save_dir = getattr(validator, "save_dir", None)
        if save_dir:
            self.bus().media("debug", "Validation", directory=save_dir, pattern="val*.jpg")
        self.bus().lifecycle(EventType.VAL_END)

    def on_predict_start(self, predictor: Any) -> None:
        self.bus().lifecycle(EventType.PREDICT_START)

    def on_export_start(self, exporter: Any) -> None:
        self.bus().lifecycle(EventType.EXPORT_START)

    def teardown(self, trainer: Any) -> None:
        if self._console is not None:
            self._console.stop_capture()
            self._console = None

    def _obey_stop(self, trainer: Any) -> None:
        """A stop order for the run (a Platform cancel, ``trainbus stop``): end at the next epoch boundary,
        as Ultralytics' own Platform callback does."""
        if self.publisher is not None and self.publisher.stop_requested and not getattr(trainer, "stop", False):
            trainer.stop = True
            log.warning(
                "trainbus: run %s: %s; training stops after this epoch",
                self.publisher.run_id,
                self.publisher.stop_reason,
            )

    def callbacks(self) -> dict[str, Callback]:
        """The dict for ``model.add_callback``: every hook guarded so it never raises."""
        return {name: GuardedHook(self, name) for name in CALLBACK_NAMES}

    def _add_ultralytics_key(self) -> None:
        """The HUB key Ultralytics keeps in its settings file must not leak via args."""
        utils = sys.modules.get("ultralytics.utils")
        key = getattr(utils, "SETTINGS", {}).get("api_key") if utils else None
        if key and self.publisher is not None:
            self.publisher.add_secret(key)


class _Unrecorded:
    """Stands in for a publisher that could not open: every method does nothing."""

    def __getattr__(self, name: str) -> Callable[..., None]:
        return _nothing


def _nothing(*args: Any, **kwargs: Any) -> None:
    return None


UNRECORDED = _Unrecorded()

CALLBACK_NAMES = (
    "on_pretrain_routine_start",
    "on_pretrain_routine_end",
    "on_train_start",
    "on_train_epoch_end",
    "on_fit_epoch_end",
    "on_model_save",
    "on_train_end",
    "on_val_start",
    "on_val_end",
    "on_predict_start",
    "on_export_start",
    "teardown",
)


def make_callbacks(settings: Settings | None = None, **overrides: Any) -> dict[str, Callback]:
    """Callbacks for ``model.add_callback``; settings as ``Settings`` or keyword overrides."""
    fixed = bool(overrides.get("run_id") or settings or os.environ.get("TRAINBUS_RUN_ID"))
    return UltralyticsHooks(settings or Settings.from_env(**overrides), fixed_run_id=fixed).callbacks()


class GuardedHook:
    """One callback: nothing outside global rank 0, and whatever goes wrong is logged, never raised into
    training. A class, not a closure, so that plain pickle carries it into a spawned rank too."""

    def __init__(self, hooks: UltralyticsHooks, name: str) -> None:
        self.hooks, self.__name__ = hooks, name
        self.failures = 0

    def __call__(self, obj: Any) -> None:
        hooks = self.hooks
        if hooks.publishing is None:
            hooks.publishing = publishes()
        if not hooks.publishing:
            return
        try:
            getattr(hooks, self.__name__)(obj)
        except Exception:
            self.failures += 1
            if self.failures <= 3:
                log.exception("trainbus hook %s failed; training continues", self.__name__)


def _train_losses(trainer: Any) -> dict[str, Any]:
    """``label_loss_items(tloss, prefix="train")``, or {} before the first batch."""
    tloss = getattr(trainer, "tloss", None)
    if tloss is None:
        return {}
    try:
        return dict(trainer.label_loss_items(tloss, prefix="train"))
    except Exception:  # older/newer trainers differ; losses are not worth a crash
        log.debug("label_loss_items failed", exc_info=True)
        return {}


class _LossCache:
    """The epoch's losses, converted once: ``on_train_epoch_end`` and ``on_fit_epoch_end`` both send
    them, and between the two the trainer keeps the same ``tloss`` (a new one each batch)."""

    def __init__(self) -> None:
        self._tloss: Any = None
        self._losses: dict[str, Any] = {}

    def get(self, trainer: Any) -> dict[str, Any]:
        tloss = getattr(trainer, "tloss", None)
        if tloss is None or tloss is not self._tloss:
            self._tloss, self._losses = tloss, _train_losses(trainer)
        return dict(self._losses)


def _plots(trainer: Any) -> list[str]:
    """The trainer's and validator's registered plots but batch images, as Ultralytics' ClearML logs them."""
    validator = getattr(trainer, "validator", None)
    registered = [*(getattr(trainer, "plots", None) or {}), *(getattr(validator, "plots", None) or {})]
    return [str(p) for p in registered if "batch" not in getattr(p, "name", str(p))]


def _capture_console(bus: Publisher) -> Any:
    """The training's console, in batches of 5 lines or 5 s, as the Platform's callbacks capture it
    (Ultralytics' own ConsoleLogger: it tees stdout and calls back from its own thread)."""
    try:
        from ultralytics.utils.logger import ConsoleLogger
    except ImportError:
        return None

    def publish(content: str, line_count: int, chunk_id: int) -> None:
        bus.publish(
            EventType.CONSOLE,
            {"chunk_id": chunk_id, "content": content, "line_count": line_count, "progress": logger.progress_sent},
        )

    logger = ConsoleLogger(batch_size=5, flush_interval=5.0, on_flush=publish)
    logger.start_capture()
    return logger


def _environment() -> dict[str, Any] | None:
    """The environment the Platform's callbacks send at ``training_started``."""
    try:
        from ultralytics.utils.callbacks.platform import _get_environment_info

        return dict(_get_environment_info())
    except Exception:
        log.debug("no Ultralytics environment info", exc_info=True)
        return None


def _finished_files(trainer: Any) -> list[str]:
    """The save dir's plots, tables and configs, which Ultralytics' MLflow callback logs at the end."""
    save_dir = getattr(trainer, "save_dir", None)
    if not save_dir or not os.path.isdir(save_dir):
        return []
    return sorted(e.path for e in os.scandir(save_dir) if e.is_file() and e.name.endswith(FINISHED_SUFFIXES))


def _first_lr(trainer: Any) -> float | None:
    optimizer = getattr(trainer, "optimizer", None)
    groups = getattr(optimizer, "param_groups", None)
    return groups[0].get("lr") if groups else None


def _summary(trainer: Any) -> dict[str, Any]:
    """What the Platform's ``training_complete`` carries beyond the final metrics: best epoch and
    fitness, class names, the plots' data and the per-image validation sample (a one-off at the end)."""
    validator = getattr(trainer, "validator", None)
    stopper = getattr(trainer, "stopper", None)
    summary: dict[str, Any] = {
        "metrics": {**(getattr(trainer, "metrics", None) or {}), "fitness": getattr(trainer, "fitness", None)},
        "best_epoch": max(0, getattr(stopper, "best_epoch", (getattr(trainer, "epoch", 0) or 0) + 1) - 1),
        "best_fitness": getattr(trainer, "best_fitness", None),
    }
    names = getattr(validator, "names", None) or (getattr(trainer, "data", None) or {}).get("names")
    summary["class_names"] = list(names.values()) if isinstance(names, dict) else list(names) if names else None
    try:
        from ultralytics.utils.callbacks import platform as ul_platform

        by_type: dict[str, Any] = {}
        for info in (getattr(trainer, "plots", None) or {}).values():
            if (info.get("data") or {}).get("type"):
                by_type[info["data"]["type"]] = info["data"]
        for info in reversed(list((getattr(validator, "plots", None) or {}).values())):
            if (info.get("data") or {}).get("type"):
                by_type.setdefault(info["data"]["type"], info["data"])
        if (pr := by_type.get("pr_curve")) and validator is not None:
            classes = [int(c) for c in validator.metrics.ap_class_index]
            if len(classes) < len(validator.names):
                by_type["pr_curve"] = {**pr, "classes": classes}
        summary["plots"] = [ul_platform._interp_plot(p) for p in by_type.values()]
        if getattr(trainer.args, "task", None) == "detect":
            validation = ul_platform._validation_payload(validator.metrics.box.image_metrics)
            if validation["rows"]:
                summary["validation"] = validation
        if calibration := getattr(trainer, "depth_calibration", None):
            summary["calibration"] = calibration
    except Exception:  # another Ultralytics release, or not a detection run: the rest still goes
        log.debug("no Platform plots/validation", exc_info=True)
    return summary


def _model_info(trainer: Any) -> dict[str, Any]:
    try:
        from ultralytics.utils.torch_utils import model_info_for_loggers

        return dict(model_info_for_loggers(trainer))
    except Exception:
        log.debug("model_info_for_loggers failed", exc_info=True)
        return {}


def __getattr__(name: str) -> dict[str, Callback]:
    """``from producers.ultralytics import callbacks`` builds them from the environment right there
    (a bad value stops the script at that line); importing the module alone reads nothing."""
    if name == "callbacks":
        globals()["callbacks"] = built = make_callbacks()
        return built
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
