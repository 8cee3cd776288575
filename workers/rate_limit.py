"""Per-run, per-type rate limits that hold across any number of workers.

A limit is "at most one request per ``interval`` seconds". Before a request, a worker
reserves the slot with one atomic script: it succeeds only if the previous reservation is
at least ``interval`` old, and records the new one. Two workers can never both get a slot,
even if the per-run lock was lost; a failed request still used its slot. A server's
Retry-After pushes the next slot further (``push_back``).
"""

from __future__ import annotations

import redis

# KEYS: state hash. ARGV: field, now (s), interval (s). Returns 0 if reserved, else seconds to wait.
RESERVE = """
local next_at = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
local now = tonumber(ARGV[2])
if now < next_at then
  return tostring(next_at - now)
end
redis.call('HSET', KEYS[1], ARGV[1], tostring(now + tonumber(ARGV[3])))
return '0'
"""

# KEYS: state hash. ARGV: field, time (s). Moves the next slot to at least that time.
PUSH_BACK = """
local next_at = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if tonumber(ARGV[2]) > next_at then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
end
return 1
"""


class RateLimiter:
    """Slots stored as ``next:<kind>`` fields (unix seconds) in a run's state hash."""

    def __init__(self, client: redis.Redis) -> None:
        self._reserve = client.register_script(RESERVE)
        self._push_back = client.register_script(PUSH_BACK)
        self._client = client

    def reserve(self, state_key: str, kind: str, interval: float, now: float) -> float:
        """0.0 if the slot is now ours, else the seconds until the next one."""
        return float(self._reserve(keys=[state_key], args=[f"next:{kind}", repr(now), repr(interval)]))

    def wait(self, state_key: str, kind: str, now: float) -> float:
        """Seconds until the next slot, without taking it."""
        next_at = self._client.hget(state_key, f"next:{kind}")
        return max(0.0, float(next_at or 0) - now)

    def push_back(self, state_key: str, kind: str, until: float) -> None:
        """No slot before ``until`` (unix seconds): Retry-After and backoff use this."""
        self._push_back(keys=[state_key], args=[f"next:{kind}", repr(until)])
