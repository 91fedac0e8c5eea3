"""Traffic shaping: how fast a destination site gets mail.

``RateLimiter`` spaces starts (messages, or new connections) by at least
``1 / rate`` seconds: a GCRA scheduler with no burst. Each caller reserves
the next slot at once (``slot = max(tat, now)``, then ``tat = slot + 1/rate``,
the "theoretical arrival time") and sleeps until it, so concurrent callers
(a site's connections) take consecutive slots, in the order they asked.
Slots follow from the schedule, not from when a sleeper actually woke, so
timer lateness never adds up: over a minute a destination sees the
configured rate, and never more than one start per ``1/rate`` seconds
(in any window of ``w`` seconds, at most ``w * rate + 1`` starts).

A *throttle* lowers the rate until a given time (the automation engine's
``max_message_rate=`` action); the lowest rate in force wins, and the
configured one holds again once every throttle has ended. When the rate in
force changes, the slots reserved at the old rate are void: every sleeper
wakes and reserves again, spaced from the last slot granted.

``RateMeter`` counts what was delivered over the last 10 seconds.

``SiteThrottles`` remembers the throttles in force by site (unix times):
where sites are made (the dispatcher) and where they are sent to a new
delivery process (``DeliveryProcess``).

Times are in the limiter's clock (``time.monotonic`` and the running loop's
timers by default; tests give a fake clock).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..cluster.throttle import SharedRate

Clock = Callable[[], float]
CallLater = Callable[[float, Callable[[], None]], Any]  # returns a handle with cancel()


class RateLimiter:
    """At most one start per ``1/rate`` seconds (``rate`` per second; None:
    no limit). ``await acquire()`` right before each start."""

    def __init__(self, rate: float | None, clock: Clock = time.monotonic,
                 call_later: CallLater | None = None, shared: SharedRate | None = None) -> None:
        self.configured = rate
        # The configured rate held for the whole cluster (``cluster.throttle``);
        # a throttle below it, or Redis not answering, falls back to this
        # node's own schedule.
        self.shared = shared if rate is not None else None
        self._clock = clock
        self._call_later = call_later
        self._throttles: dict[float, float] = {}  # rate -> until (this clock)
        self._tat = -math.inf    # the earliest time the next slot can be
        self._last = -math.inf   # the last slot granted
        self._generation = 0     # bumped when the rate in force changes
        self._sleepers: set[asyncio.Future] = set()

    # -- the rate in force ---------------------------------------------------

    @property
    def limited(self) -> bool:
        """Whether ``acquire`` can make anyone wait (cheap: no clock read).
        False when nothing is configured and no throttle was set: then a
        caller need not call ``acquire`` at all."""
        return self.configured is not None or bool(self._throttles)

    def rate(self) -> float | None:
        """The rate in force now (per second), the throttles' included."""
        self._expire(self._clock())
        return self._rate()

    def _rate(self) -> float | None:
        rates = [r for r in (self.configured, *self._throttles) if r is not None]
        return min(rates) if rates else None

    def throttled(self) -> tuple[float, float] | None:
        """``(rate, until)`` of the throttle that holds the rate below the
        configured one now, or None."""
        self._expire(self._clock())
        binding = [(r, u) for r, u in self._throttles.items()
                   if self.configured is None or r < self.configured]
        return min(binding) if binding else None

    def throttle(self, rate: float, until: float) -> None:
        """Hold the rate to at most ``rate`` until ``until`` (this clock)."""
        if rate <= 0 or not math.isfinite(rate):
            raise ValueError(f"a throttle's rate must be above 0 (got {rate!r})")
        now = self._clock()
        self._expire(now)
        if until <= now:
            return
        before = self._rate()
        self._throttles[rate] = max(until, self._throttles.get(rate, until))
        if self._rate() != before:
            self._changed()

    def _expire(self, now: float) -> None:
        if not self._throttles:
            return
        ended = [r for r, u in self._throttles.items() if u <= now]
        if ended:
            before = self._rate()
            for r in ended:
                del self._throttles[r]
            if self._rate() != before:
                self._changed()

    def _changed(self) -> None:
        """The rate in force changed: slots reserved at the old one are void;
        the next is spaced from the last one granted, at the new rate."""
        rate = self._rate()
        self._tat = self._last + 1.0 / rate if rate is not None else -math.inf
        self._generation += 1
        for fut in list(self._sleepers):
            if not fut.done():
                fut.set_result(None)

    # -- slots ---------------------------------------------------------------

    def expected_wait(self) -> float:
        """How long a caller asking now would wait (0 when none; not known
        for a shared schedule, where it is taken as 0)."""
        now = self._clock()
        self._expire(now)
        if self._rate() is None or (self.shared is not None and self._rate() == self.configured):
            return 0.0
        return max(0.0, self._tat - now)

    async def acquire(self) -> None:
        """Wait for this caller's slot."""
        if self.shared is not None and self.rate() == self.configured:
            try:
                wait = await self.shared.reserve(1.0 / self.configured)  # type: ignore[operator]
            except self.shared.Unavailable:
                pass  # this node's own schedule, until Redis answers again
            else:
                if wait > 0:
                    await self._sleep(wait)
                return
        while True:
            now = self._clock()
            self._expire(now)
            rate = self._rate()
            if rate is None:
                return
            slot = max(self._tat, now)
            self._tat = slot + 1.0 / rate
            generation = self._generation
            while True:
                if now >= slot:
                    self._last = max(self._last, slot)
                    return
                # Wake at the slot, or when a throttle ends (the rate may
                # rise then), or when the rate changes (``_changed``).
                wake = min(slot, *self._throttles.values()) if self._throttles else slot
                await self._sleep(wake - now)
                now = self._clock()
                self._expire(now)
                if generation != self._generation:
                    break  # the slot is void: reserve again

    async def _sleep(self, delay: float) -> None:
        fut = asyncio.get_running_loop().create_future()
        call_later = self._call_later or asyncio.get_running_loop().call_later

        def wake() -> None:
            if not fut.done():
                fut.set_result(None)

        handle = call_later(max(0.0, delay), wake)
        self._sleepers.add(fut)
        try:
            await fut
        finally:
            self._sleepers.discard(fut)
            handle.cancel()


class RateMeter:
    """Messages per second over the last ``WINDOW`` whole seconds."""

    WINDOW = 10

    def __init__(self, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self._counts: deque[list[int]] = deque()  # [second, count], oldest first

    def add(self, n: int = 1) -> None:
        second = int(self._clock())
        counts = self._counts
        if counts and counts[-1][0] == second:
            counts[-1][1] += n
            return
        counts.append([second, n])
        while counts[0][0] <= second - self.WINDOW - 1:
            counts.popleft()

    def rate(self) -> float:
        """The messages counted in the last ``WINDOW`` whole seconds (the one
        under way left out), per second."""
        now = int(self._clock())
        total = sum(n for s, n in self._counts if now - self.WINDOW <= s < now)
        return total / self.WINDOW


def check_throttle(rate: float, until: float) -> None:
    """ValueError unless ``rate`` (per second) is above 0 and both are finite numbers."""
    if not (isinstance(rate, (int, float)) and math.isfinite(rate) and rate > 0):
        raise ValueError(f"a throttle's rate must be a number above 0 (got {rate!r})")
    if not (isinstance(until, (int, float)) and math.isfinite(until)):
        raise ValueError(f"a throttle's end must be a unix time (got {until!r})")


class SiteThrottles(dict[str, dict[float, float]]):
    """Site name -> {rate: until (a unix time)}: the throttles not ended yet."""

    def add(self, site: str, rate: float, until: float) -> bool:
        """Remember a throttle (ValueError for a bad one); False when it has ended already."""
        check_throttle(rate, until)
        if until <= time.time():
            return False
        held = self.setdefault(site, {})
        held[rate] = max(until, held.get(rate, until))
        self.in_force()  # forget those that ended
        return True

    def in_force(self, site: str | None = None) -> list[tuple[str, float, float]]:
        """(site, rate, until) of each throttle not ended (of ``site`` only, if
        given); those that ended are forgotten."""
        now = time.time()
        out = []
        for name, held in list(self.items()):
            for rate, until in list(held.items()):
                if until <= now:
                    del held[rate]
                elif site is None or name == site:
                    out.append((name, rate, until))
            if not held:
                del self[name]
        return out
