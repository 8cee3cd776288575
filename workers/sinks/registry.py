"""From a sink's name to its class: the entries of ``shared/sinks.py``, imported when needed."""

from __future__ import annotations

import importlib

import redis

from shared.errors import SettingsError
from shared.keys import Keys
from shared.settings import WorkerSettings
from shared.sinks import SINKS
from workers.sinks.interface import Sink


def sink_class(name: str) -> type[Sink]:
    entry = SINKS.get(name)
    if entry is None:
        raise SettingsError("TRAINBUS_SINKS", f"unknown sink {name!r}: use {', '.join(SINKS)}")
    module, _, cls = entry.sink.partition(":")
    return getattr(importlib.import_module(module), cls)


def make_sink(name: str, client: redis.Redis, keys: Keys, settings: WorkerSettings) -> Sink:
    return sink_class(name)(client, keys, settings)
