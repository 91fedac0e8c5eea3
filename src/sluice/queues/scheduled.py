"""Retry schedule and expiry of scheduled queues.

The n-th retry waits ``retry_interval * 2**(n-1)``, capped at
``max_retry_interval``, with +/-10% jitter so that mail deferred together
does not come back together. A message is never due later than its expiry
(``created + max_age``): it expires at its next due time at the latest.
"""

from __future__ import annotations

import random

from ..config import QueueSettings


def retry_delay(attempts: int, settings: QueueSettings, rng: random.Random | None = None) -> float:
    """Seconds to wait after the ``attempts``-th failed attempt (attempts >= 1)."""
    exponent = max(0, attempts - 1)
    base = settings.retry_interval * (2 ** min(exponent, 32))
    base = min(base, settings.max_retry_interval)
    jitter = (rng or random).uniform(0.9, 1.1)
    return base * jitter


def expires_at(created: float, settings: QueueSettings) -> float:
    return created + settings.max_age


def next_due(now: float, created: float, attempts: int, settings: QueueSettings,
             rng: random.Random | None = None) -> float:
    """When a message that just failed its ``attempts``-th attempt is due again."""
    return min(now + retry_delay(attempts, settings, rng), expires_at(created, settings))
