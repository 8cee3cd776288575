"""The drain job's old dotted path: jobs queued before the move name ``workers.drain_job.drain``."""

from workers.pipeline.drain_job import drain

__all__ = ["drain"]
