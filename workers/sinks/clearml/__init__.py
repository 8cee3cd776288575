"""ClearML, through its SDK, from a long-lived worker."""

from workers.sinks.clearml.sink import ClearmlSink

__all__ = ["ClearmlSink"]
