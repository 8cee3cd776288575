"""Ultralytics HUB (v1 protocol; the service was retired on 2026-07-31)."""

from workers.sinks.hub.sink import HubSink

__all__ = ["HubSink"]
