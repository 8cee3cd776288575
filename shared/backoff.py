"""Exponential backoff with full jitter: the one formula every retry path uses."""

from __future__ import annotations

import random


def compute_backoff(attempt: int, *, base: float = 0.1, cap: float = 30.0) -> float:
    """Seconds to wait before retry number ``attempt`` (0-based).

    Full jitter: uniform in [d/2, d] where d = min(cap, base * 2**attempt), so waiting
    clients spread out instead of retrying in lockstep, and never wait less than half.
    """
    delay = min(cap, base * (2 ** min(attempt, 62)))
    return random.uniform(delay / 2, delay)
