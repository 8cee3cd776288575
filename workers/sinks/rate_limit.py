"""Per-run, per-type rate limits that hold across any number of workers.

A limit is "at most one request per ``interval`` seconds". Right before a request, a
worker reserves the slot with one atomic script: it succeeds only if the previous
reservation is at least ``interval`` old, and records the new one. Two workers can never
both get a slot, even if the per-run lock was lost; a failed request still used its slot.
A server's Retry-After or a backoff moves the next slot (``push_back``, ``retry_in``).

With TRAINBUS_REDIS_MIN_REPLICAS a slot counts as reserved only once that many replicas hold the
reservation (else it is given back and retried): a failover that lost it would let a second
request go inside the interval. The WAIT can take seconds, so a per-run slot is then moved to
start when the request goes, and a window's reservation that waited long is given back.

Every time is Redis's own clock (``TIME``), read inside the scripts: workers on machines
whose clocks disagree still space their requests correctly, and a slot is reserved at the
moment of the request, not when the drain job started.
"""

from __future__ import annotations

import logging
import time
import uuid

import redis

from shared.redis_client import replicas_hold

log = logging.getLogger("trainbus.rate_limit")
REPLICA_RETRY_S = 1.0  # a slot too few replicas hold is given back; the request tries again after this

NOW = "local t = redis.call('TIME')\nlocal now = tonumber(t[1]) + tonumber(t[2]) / 1000000\n"
NEXT = "local next_at = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')\n"

# KEYS: state hash. ARGV: field, interval (s). Returns 0 if reserved, else seconds to wait.
RESERVE = (
    NOW
    + NEXT
    + """
if now < next_at then
  return tostring(next_at - now)
end
redis.call('HSET', KEYS[1], ARGV[1], tostring(now + tonumber(ARGV[2])))
return '0'
"""
)

# KEYS: state hash. ARGV: field. Seconds until the next slot (0 if it is free).
WAIT = NOW + NEXT + "return tostring(math.max(0, next_at - now))\n"

# KEYS: state hash. ARGV: field, delay (s), '1' to also move the slot earlier. Sets it to now + delay.
MOVE = (
    NOW
    + NEXT
    + """
local at = now + tonumber(ARGV[2])
if at > next_at or ARGV[3] == '1' then
  redis.call('HSET', KEYS[1], ARGV[1], tostring(at))
end
return 1
"""
)


class RateLimiter:
    """Slots stored as ``next:<kind>`` fields (unix seconds, Redis's clock) in a run's state hash."""

    def __init__(self, client: redis.Redis, min_replicas: int = 0) -> None:
        self.client, self.min_replicas = client, min_replicas
        self._reserve = client.register_script(RESERVE)
        self._wait = client.register_script(WAIT)
        self._move = client.register_script(MOVE)

    def reserve(self, state_key: str, kind: str, interval: float) -> float:
        """0.0 if the slot is now ours, else the seconds until the next one."""
        wait = float(self._reserve(keys=[state_key], args=[f"next:{kind}", repr(interval)]))
        if wait or not self.min_replicas:
            return wait
        if not replicas_hold(self.client, self.min_replicas):
            self.retry_in(state_key, kind, REPLICA_RETRY_S)  # given back: its request did not go
            return unreplicated(kind, self.min_replicas)
        self.push_back(state_key, kind, interval)  # the interval runs from now, when the request goes, not
        return 0.0  # from before a WAIT that can take seconds (else the next slot could follow at once)

    def wait(self, state_key: str, kind: str) -> float:
        """Seconds until the next slot, without taking it."""
        return float(self._wait(keys=[state_key], args=[f"next:{kind}"]))

    def push_back(self, state_key: str, kind: str, delay: float) -> None:
        """No slot for ``delay`` seconds from now (Retry-After, backoff); never earlier than it was."""
        self._move(keys=[state_key], args=[f"next:{kind}", repr(delay), "0"])

    def retry_in(self, state_key: str, kind: str, delay: float) -> None:
        """The next slot in ``delay`` seconds, even if that is sooner than the interval allowed."""
        self._move(keys=[state_key], args=[f"next:{kind}", repr(delay), "1"])


# KEYS: window zset, hold key. ARGV: limit, window (s), member. Returns 0 if reserved, else seconds to wait.
WINDOW = (
    NOW
    + """
local hold = tonumber(redis.call('GET', KEYS[2]) or '0')
if now < hold then
  return tostring(hold - now)
end
local window = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return tostring(tonumber(oldest[2]) + window - now)
end
redis.call('ZADD', KEYS[1], now, ARGV[3])
redis.call('PEXPIRE', KEYS[1], math.ceil(window * 2000))
return '0'
"""
)
# KEYS: hold key. ARGV: seconds. Nothing of the window goes before now + seconds (never sooner than it was).
HOLD = (
    NOW
    + """
local at = now + tonumber(ARGV[1])
if at > tonumber(redis.call('GET', KEYS[1]) or '0') then
  redis.call('SET', KEYS[1], tostring(at), 'PX', math.ceil(tonumber(ARGV[1]) * 1000) + 1000)
end
return 1
"""
)


class WindowLimiter:
    """At most ``limit`` requests in any ``window`` seconds, shared by everyone using one key (a sliding
    window of reservation times on Redis's clock), and a hold that stops all of them until a time.

    A service's own limit is counted where the requests arrive, a little after they were reserved
    here: the window is kept WINDOW_MARGIN_S longer than asked, so network jitter cannot make two
    requests that were a window apart here arrive inside one window there.
    """

    WINDOW_MARGIN_S = 1.0

    def __init__(self, client: redis.Redis, min_replicas: int = 0) -> None:
        self.client, self.min_replicas = client, min_replicas
        self._reserve = client.register_script(WINDOW)
        self._hold = client.register_script(HOLD)

    def reserve(self, key: str, limit: int, window: float) -> float:
        """0.0 if a request may go now (and is counted), else the seconds until one may."""
        member = uuid.uuid4().hex
        wait = float(
            self._reserve(keys=[key, f"{key}:hold"], args=[limit, repr(window + self.WINDOW_MARGIN_S), member])
        )
        if wait or not self.min_replicas:
            return wait
        started = time.monotonic()
        if replicas_hold(self.client, self.min_replicas) and time.monotonic() - started < self.WINDOW_MARGIN_S / 2:
            return 0.0
        self.client.zrem(key, member)  # given back: its request did not go (a slow WAIT would eat the margin)
        return unreplicated(key, self.min_replicas)

    def hold(self, key: str, seconds: float) -> None:
        """Nothing under ``key`` goes for ``seconds`` (a 429's Retry-After)."""
        self._hold(keys=[f"{key}:hold"], args=[repr(seconds)])


def unreplicated(what: str, min_replicas: int) -> float:
    log.warning("a %s rate-limit slot was not on %d replicas in time: given back, retried", what, min_replicas)
    return REPLICA_RETRY_S
