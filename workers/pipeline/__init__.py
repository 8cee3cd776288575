"""From the stream to the services: the dispatcher, drain jobs, their queues and RQ worker classes."""
