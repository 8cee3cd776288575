"""MLflow, through its own client library (``pip install 'trainbus[mlflow]'``)."""

from workers.sinks.mlflow.sink import MlflowSink

__all__ = ["MlflowSink"]
