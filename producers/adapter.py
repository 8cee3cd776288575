"""What the framework adapters (``producers.lightning``, ``producers.transformers``) share: their
settings, the run's name and project, and a publisher opened on first use in the process that
publishes. They pickle with only the settings and names in them (``ddp_spawn`` and the like)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from producers.publisher import Publisher
from shared.settings import Settings

log = logging.getLogger("trainbus.adapter")


class Adapter:
    def __init__(
        self, *, name: str | None = None, project: str | None = None, settings: Settings | None = None, **overrides: Any
    ) -> None:
        """``name``/``project``: the run's name and project at the sinks; settings as ``Publisher``'s."""
        self.settings = settings or Settings.from_env(**overrides)
        self.run_name, self.project = name, project
        self.publisher: Publisher | None = None
        self._failed = False

    def __getstate__(self) -> dict[str, Any]:
        return {"settings": self.settings, "run_name": self.run_name, "project": self.project}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(name=state["run_name"], project=state["project"], settings=state["settings"])

    def open_bus(self) -> Publisher | None:
        """The publisher, opened on first use; None, said once, when it cannot open: training goes on."""
        if self.publisher is None and not self._failed:
            try:
                self.publisher = Publisher(self.settings)
            except Exception as exc:
                self._failed = True
                log.error("trainbus cannot record this training (%s: %s); it goes on unrecorded", type(exc), exc)
        return self.publisher

    def close_bus(self, status: str) -> None:
        """The run's end (``completed``, ``failed``, ``stopped``), then the publisher closed."""
        if self.publisher is not None:
            self.publisher.end(status)
            self.publisher.close()
            self.publisher = None


def numbers(values: Mapping[str, Any]) -> dict[str, float]:
    """The numeric values of a framework's logged metrics (floats, ints, 0-d tensors); the rest left out."""
    found = {}
    for key, value in values.items():
        if isinstance(value, bool):
            continue
        try:
            found[str(key)] = float(value)
        except (TypeError, ValueError, RuntimeError):
            continue
    return found
