"""Rates shared by the nodes of a cluster: one GCRA schedule per site in Redis.

``[shaping."<domain>"] shared = true`` makes a site's ``max_message_rate``
hold for the whole cluster. Every send asks Redis for the next slot of the
site's schedule, in one atomic step (a Lua script): the slot is the later
of the schedule's next free time and now, the schedule moves one interval
past it, and the answer is how long to wait for it. Times are Redis's own
clock (``TIME``), so the nodes' clocks do not matter; the key expires soon
after the last slot it granted.
"""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.exceptions import RedisError

# KEYS[1]: the schedule; ARGV[1]: the interval in microseconds. Returns the
# wait in microseconds. Numbers are written with %.0f: Lua's tostring would
# round microsecond times (about 1.8e15) to 14 digits.
_RESERVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
local slot = math.max(tat, now)
local ttl = math.ceil((slot + interval - now) / 1000) + 1000
redis.call('SET', KEYS[1], string.format('%.0f', slot + interval), 'PX', ttl)
return slot - now
"""


class SharedUnavailable(Exception):
    """Redis did not answer: the caller keeps to its own node's schedule."""


class SharedRate:
    """The cluster-wide schedule of one site (see the module docstring)."""

    Unavailable = SharedUnavailable  # what ``reserve`` raises

    def __init__(self, client: aioredis.Redis, site: str) -> None:
        self.key = f"sluice:rate:{site}"
        self._script = client.register_script(_RESERVE)

    async def reserve(self, interval: float) -> float:
        """Reserve the next slot, ``interval`` seconds after the previous
        one; returns the seconds to wait for it."""
        try:
            wait_us = await self._script(keys=[self.key], args=[round(interval * 1_000_000)])
        except RedisError as exc:
            raise SharedUnavailable(str(exc)) from None
        return max(0.0, int(wait_us) / 1_000_000)
