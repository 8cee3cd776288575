"""Each benchmark script runs with tiny settings and prints its table (numbers not judged)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_bench(script: str, *args: str) -> str:
    out = subprocess.run(
        [sys.executable, f"bench/{script}", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def mlflow_args(uri: str | None) -> list[str]:
    """The session's mlflow server, when there is one, instead of a server each script starts."""
    return ["--mlflow-uri", uri] if uri else []


def test_hooks_benchmark_runs(redis_url, mlflow_uri):
    stdout = run_bench("hooks.py", "--calls", "60", "--redis-url", redis_url, *mlflow_args(mlflow_uri))
    for case in (
        "no hook",
        "trainbus, Redis up",
        "trainbus, Redis unreachable",
        "redis-py XADD (sync)",
        "wandb.log (offline)",  # its row, or the note that wandb is not installed
        "thread per upload (HUB)",
        "mlflow.log_metrics",  # its rows, or the note that mlflow is not installed
    ):
        assert case in stdout


def test_training_benchmark_runs(redis_url, mlflow_uri):
    tiny = ["--epochs", "2", "--batches", "3", "--repeats", "1", "--final-timeout", "1", "--slow-s", "0.2"]
    stdout = run_bench("training.py", *tiny, "--redis-url", redis_url, *mlflow_args(mlflow_uri))
    for case in (
        "no telemetry",
        "trainbus, sinks healthy",
        "trainbus, HUB slow (0.2 s)",
        "trainbus, HUB down",
        "trainbus, Redis down",
        "in-process HUB, healthy",
        "in-process HUB, slow (0.2 s)",
        "in-process HUB, down",
        "in-process MLflow",  # its rows, or the note that mlflow is not installed
    ):
        assert case in stdout
    assert "goal, trainbus >= " in stdout


def test_callbacks_benchmark_runs(redis_url):
    stdout = run_bench("callbacks.py", "--epochs", "5", "--ckpt-mb", "1", "--redis-url", redis_url)
    for case in ("Redis up", "Redis unreachable", "on_model_save", "on_fit_epoch_end", "on_pretrain_routine_start"):
        assert case in stdout
