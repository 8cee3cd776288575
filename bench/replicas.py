"""What TRAINBUS_REDIS_MIN_REPLICAS=1 costs beside 0: a primary and a replica on loopback ports.

    python bench/replicas.py                   # defaults: about a minute
    python bench/replicas.py --events 50000 --repeats 5

Per setting, each repeated --repeats times in a fresh run (medians shown):

  hook p50 / p99 µs           one ``metrics()`` call on the training thread (the hook path never
                              touches Redis: it must not change)
  released events/s           --events calls back to back, timed until ``close()`` returns, i.e.
                              until the delivery process knows every record is in the stream
                              (and, with 1, that WAIT says the replica holds it): spool release
  event -> released p50/p99   --paced events 20 ms apart; per event, from the hook until the
                              control page's pushed seq covers it (WAIT included with 1)
  worker slot + record p50/p99  what a worker adds per delivery: a rate-limit reservation and
                              the delivery's record (``RunState.remove_if_same``), each WAITed
                              for with 1 (--paced times)

The replica is local, so WAIT costs a round trip of the replication link, not of a network.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.procs import epoch_metrics, percentile, table
from producers import Publisher
from shared.keys import Keys
from shared.redis_client import connect
from workers.devstack.embedded_redis import RedisServer
from workers.sinks.rate_limit import RateLimiter
from workers.sinks.run_state import RunState

METRICS = epoch_metrics(3)


def one_run(url: str, min_replicas: int, events: int, paced: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="bench-replicas-", ignore_cleanup_errors=True) as tmp:
        bus = Publisher(
            redis_url=url,
            namespace=f"bench-{uuid.uuid4().hex[:8]}",
            spool_dir=Path(tmp),
            run_id=f"r{uuid.uuid4().hex[:8]}",
            redis_min_replicas=min_replicas,
            spool_max_mb=4096,
            exit_flush_s=300,
        )
        while not bus.delivering:
            time.sleep(0.01)
        hooks, latency = [], []
        for epoch in range(paced):
            t0 = time.perf_counter()
            seq = bus.metrics(epoch, METRICS)
            hooks.append((time.perf_counter() - t0) * 1e6)
            while bus._control.pushed < seq:
                time.sleep(0.0005)
            latency.append((time.perf_counter() - t0) * 1000)
            time.sleep(0.02)
        start = time.perf_counter()
        for epoch in range(paced, paced + events):
            bus.metrics(epoch, METRICS)
        assert bus.close(timeout=300), "not everything was released"
        released = events / (time.perf_counter() - start)
    writes = worker_writes(url, min_replicas, paced)
    return {
        "hook p50 µs": statistics.median(hooks),
        "hook p99 µs": percentile(hooks, 99),
        "released events/s": released,
        "event -> released p50 ms": statistics.median(latency),
        "event -> released p99 ms": percentile(latency, 99),
        "worker slot + record p50 µs": statistics.median(writes),
        "worker slot + record p99 µs": percentile(writes, 99),
    }


def worker_writes(url: str, min_replicas: int, count: int) -> list[float]:
    """µs per delivery's own Redis writes in a worker: its slot reserved, its record written."""
    client = connect(url)
    keys = Keys(f"bench-{uuid.uuid4().hex[:8]}")
    slots, runs = RateLimiter(client, min_replicas), RunState(client, keys, "hub", min_replicas)
    pending, state = keys.pending("hub", "r", "ckpt"), keys.state("hub", "r")
    samples = []
    for n in range(count):
        client.hset(pending, "data", str(n))
        t0 = time.perf_counter()
        slots.reserve(state, "bench", 0.0)
        runs.remove_if_same(pending, {"data": str(n).encode()})
        samples.append((time.perf_counter() - t0) * 1e6)
    client.delete(pending, state)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=20000, help="back-to-back events per run (20000)")
    parser.add_argument("--paced", type=int, default=200, help="paced events per run, for latency (200)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per setting; medians shown (3)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-replicas-redis-") as tmp:
        primary = RedisServer(Path(tmp) / "primary").start()
        replica = RedisServer(Path(tmp) / "replica", None, "--replicaof", "127.0.0.1", str(primary.port)).start()
        try:
            results = {}
            for min_replicas in (0, 1):
                runs = [one_run(primary.url, min_replicas, args.events, args.paced) for _ in range(args.repeats)]
                results[min_replicas] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        finally:
            replica.stop()
            primary.stop()
    rows = [
        (name, f"{results[0][name]:,.1f}", f"{results[1][name]:,.1f}", f"{results[1][name] / results[0][name]:.2f}")
        for name in results[0]
    ]
    print(f"TRAINBUS_REDIS_MIN_REPLICAS 0 vs 1, a local replica; medians of {args.repeats} runs")
    print(table(("measure", "0", "1", "1 / 0"), rows))


if __name__ == "__main__":
    main()
