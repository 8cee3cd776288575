"""The worker classes' old dotted paths, as in ``rq worker hub-uploads -w workers.rq_worker.Worker``."""

from workers.pipeline.rq_worker import SimpleWorker, Worker

__all__ = ["SimpleWorker", "Worker"]
