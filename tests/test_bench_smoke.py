"""Each benchmark script runs with tiny settings and prints its table (numbers not judged)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_hooks_benchmark_runs(redis_url):
    out = subprocess.run(
        [sys.executable, "bench/hooks.py", "--calls", "200", "--redis-url", redis_url],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    for case in (
        "no hook",
        "trainbus, Redis up",
        "trainbus, Redis unreachable",
        "redis-py XADD (sync)",
        "thread per upload (HUB)",
    ):
        assert case in out.stdout
