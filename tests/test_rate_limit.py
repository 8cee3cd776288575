"""Rate-limit slots on Redis's clock: reserved atomically, moved by Retry-After and backoff."""

from __future__ import annotations

import threading

import pytest

from workers.sinks.rate_limit import RateLimiter


@pytest.fixture
def limits(client):
    return RateLimiter(client)


def test_one_slot_per_interval(limits, keys):
    state = keys.state("hub", "r")
    assert limits.reserve(state, "metrics", 3.0) == 0.0
    assert 2.9 < limits.reserve(state, "metrics", 3.0) <= 3.0
    assert 2.9 < limits.wait(state, "metrics") <= 3.0
    assert limits.wait(state, "ckpt") == 0.0, "each kind has its own slot"


def test_racing_workers_get_one_slot(limits, keys):
    state = keys.state("hub", "race")
    got = []
    threads = [threading.Thread(target=lambda: got.append(limits.reserve(state, "ckpt", 60.0))) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got.count(0.0) == 1


def test_push_back_never_moves_a_slot_earlier_and_retry_in_does(limits, keys):
    state = keys.state("hub", "r")
    limits.reserve(state, "metrics", 10.0)
    limits.push_back(state, "metrics", 2.0)  # Retry-After 2 s: the slot 10 s away stays
    assert limits.wait(state, "metrics") > 9.0
    limits.push_back(state, "metrics", 20.0)
    assert limits.wait(state, "metrics") > 19.0
    limits.retry_in(state, "metrics", 1.0)  # a failed upload is retried after its backoff
    assert 0.5 < limits.wait(state, "metrics") <= 1.0
