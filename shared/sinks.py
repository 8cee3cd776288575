"""The sinks trainbus delivers to: the one list that names each of them.

A sink is one package under ``workers/sinks/`` and one entry here: its name (in
``TRAINBUS_SINKS``, its consumer group and its Redis keys), its RQ queue, the RQ worker
class that runs it, and its class (which also says how ``trainbus status`` shows its
pending work and how the demo knows it delivered). Dotted paths, so that this module
(read by settings and key names on both sides) imports no worker code.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SinkEntry:
    name: str
    queue: str  # the RQ queue in the default namespace (prefixed with the namespace elsewhere)
    worker: str  # the RQ worker class, for `rq worker QUEUE -w ...`
    sink: str  # "module:Class" implementing workers.sinks.interface.Sink


FORKING = "workers.pipeline.rq_worker.Worker"  # each job in a fresh work horse
NON_FORKING = "workers.pipeline.rq_worker.SimpleWorker"  # the SDK's state lives in the worker process

SINKS: dict[str, SinkEntry] = {
    entry.name: entry
    for entry in (
        SinkEntry("hub", "hub-uploads", FORKING, "workers.sinks.hub:HubSink"),
        SinkEntry("clearml", "clearml", NON_FORKING, "workers.sinks.clearml:ClearmlSink"),
        SinkEntry("platform", "platform", FORKING, "workers.sinks.platform:PlatformSink"),
        # Not forking: the mlflow import (about a second) and its HTTP session stay in the worker.
        SinkEntry("mlflow", "mlflow", NON_FORKING, "workers.sinks.mlflow:MlflowSink"),
    )
}
