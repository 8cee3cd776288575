"""The load benchmarks (throughput, latency, scale) run with tiny settings and print every row.

Numbers are not judged here: the machine is shared and the settings too small to mean much.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def bench(script: str, redis_url: str, *args: str) -> str:
    out = subprocess.run(
        [sys.executable, f"bench/{script}", "--redis-url", redis_url, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.skipif(shutil.which("redis-benchmark") is None, reason="needs redis-benchmark on the PATH")
def test_throughput_benchmark_prints_every_stage(redis_url):
    args = ("--events", "500", "--runs", "5", "--upload-runs", "3", "--workers", "1,2", "--xadds", "5000")
    out = bench("throughput.py", redis_url, *args, "--repeats", "1")
    for stage in (
        "producer: hook calls",
        "producer: into the stream",
        "dispatcher (--burst)",
        "hub-uploads: 1 worker ",
        "hub-uploads: 2 workers",
        "redis-benchmark XADD",
    ):
        assert stage in out


def test_latency_benchmark_prints_every_stage(redis_url):
    out = bench("latency.py", redis_url, "--events", "5", "--interval", "0.1")
    for stage in ("hook -> stream", "stream -> HUB", "hook -> HUB", "held back"):
        assert stage in out


def test_scale_benchmark_prints_each_scale_and_the_keys_left(redis_url):
    out = bench("scale.py", redis_url, "--runs", "1,2", "--epochs", "3", "--epoch-s", "0.05", "--rate-heartbeat", "1")
    delivery, memory = out.split("\n\n")[1:3]
    assert [line.split()[0] for line in delivery.splitlines()[1:]] == ["1", "2"]
    assert [line.split()[0] for line in memory.splitlines()[1:3]] == ["1", "2"]
    assert "keys left after 2 run(s)" in out
    assert "<ns>:hub:<run>:state" in out
    assert "bytes per run" in out
