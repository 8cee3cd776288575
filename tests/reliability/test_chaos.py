"""The chaos scenario: a short fixed seed by default, longer randomized runs with ``-m soak``.

    pytest tests/reliability                              # seed 20261122, ~2 min
    pytest -m soak tests/reliability -s                   # random seeds for TRAINBUS_SOAK_MINUTES (20),
                                                          # every other one on a Sentinel cluster
    TRAINBUS_CHAOS_SEED=123 pytest tests/reliability -s   # replay one seed (TRAINBUS_CHAOS_FAILOVER=1:
                                                          # on a Sentinel cluster, with primary failovers)

Each run prints its seed, the faults as they were done, and every problem the checker
found (see chaos.py for what it checks).
"""

from __future__ import annotations

import os
import random
import time

import pytest

from tests.reliability.chaos import run_scenario

CI_SEED = 20261122


def test_a_fixed_seed_schedule_loses_nothing_and_breaks_no_limit(tmp_path):
    seed = int(os.environ.get("TRAINBUS_CHAOS_SEED", CI_SEED))
    failover = os.environ.get("TRAINBUS_CHAOS_FAILOVER") == "1"
    outcome = run_scenario(seed, tmp_path, epochs=30, pause=1.0, rounds=1, deadline_s=240, failover=failover)
    print(outcome.summary())
    assert not outcome.problems, outcome.summary()


@pytest.mark.soak
@pytest.mark.timeout(0)
def test_randomized_schedules_for_a_while(tmp_path):
    minutes = float(os.environ.get("TRAINBUS_SOAK_MINUTES", 20))
    stop_at = time.monotonic() + minutes * 60
    failed = []
    n = 0
    while n == 0 or time.monotonic() < stop_at:
        seed = random.randrange(1 << 32)
        failover = n % 2 == 0
        outcome = run_scenario(
            seed, tmp_path / str(n), epochs=30, pause=3.0, rounds=3, deadline_s=900, failover=failover
        )
        print(outcome.summary(), flush=True)
        if outcome.problems:
            failed.append(f"{seed}{' (failover)' if failover else ''}")
        n += 1
    assert not failed, f"{len(failed)} of {n} seeds failed: {failed}"
