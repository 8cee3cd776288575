"""What operators run: the ``trainbus`` command, status, failed jobs, the Prometheus exporter."""
