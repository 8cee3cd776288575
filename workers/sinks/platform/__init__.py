"""The Ultralytics Platform (HUB's successor), over its training webhooks, with ``requests``."""

from workers.sinks.platform.sink import PlatformSink

__all__ = ["PlatformSink"]
