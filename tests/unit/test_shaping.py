"""Traffic shaping without a peer: the rate limiter on a fake clock (exact
spacing, no burst, throttles that lower the rate and end), the delivery
meter, and how the dispatcher gives sites their limits and throttles.
What a destination sees is in ``tests/e2e/test_shaping.py``."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time

import pytest

from sluice.config import settings_from_dict
from sluice.delivery.dispatch import Dispatcher
from sluice.delivery.shaping import RateLimiter, RateMeter
from sluice.message import parse_queue_name

from ..support import until as until_true
from ..support.delivery import OneHop, StopEverything, stored

T0 = 1000.0


class _Handle:
    cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeTime:
    """A clock and timers that move only when told (``run``); ``late``
    makes every timer fire that much after its time, as a busy loop would."""

    def __init__(self, late: float = 0.0) -> None:
        self.now = T0
        self.late = late
        self._timers: list = []
        self._seq = itertools.count()

    def clock(self) -> float:
        return self.now

    def call_later(self, delay: float, callback) -> _Handle:
        handle = _Handle()
        heapq.heappush(self._timers, (self.now + delay + self.late, next(self._seq),
                                      callback, handle))
        return handle

    async def run(self, to: float) -> None:
        """Move the clock to ``to``, firing the timers due on the way in order
        and letting the tasks they wake run."""
        await settle()
        while self._timers and self._timers[0][0] <= to:
            when, _, callback, handle = heapq.heappop(self._timers)
            if handle.cancelled:
                continue
            self.now = max(self.now, when)
            callback()
            await settle()
        self.now = max(self.now, to)
        await settle()

    def limiter(self, rate: float | None) -> RateLimiter:
        return RateLimiter(rate, clock=self.clock, call_later=self.call_later)


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


def starts_of(ft: FakeTime, limiter: RateLimiter, n: int) -> tuple[list[float], list]:
    """``n`` callers asking at once; the times they were let go, in order."""
    starts: list[float] = []

    async def caller() -> None:
        await limiter.acquire()
        starts.append(ft.now)

    return starts, [asyncio.create_task(caller()) for _ in range(n)]


def most_in_a_window(starts: list[float], width: float) -> int:
    """The most starts in any window of ``width`` seconds (closed at both ends)."""
    j, best = 0, 0
    for i, t in enumerate(starts):
        while starts[j] < t - width - 1e-9:
            j += 1
        best = max(best, i - j + 1)
    return best


async def test_concurrent_callers_are_spaced_exactly_by_one_over_the_rate():
    ft = FakeTime()
    lim = ft.limiter(20.0)
    starts, tasks = starts_of(ft, lim, 100)
    await ft.run(T0 + 10)
    assert len(starts) == 100
    assert starts == pytest.approx([T0 + k * 0.05 for k in range(100)])
    assert most_in_a_window(starts, 1.0) == 21  # rate + 1, never more
    await asyncio.gather(*tasks)


async def test_no_burst_after_an_idle_spell():
    ft = FakeTime()
    lim = ft.limiter(10.0)
    await lim.acquire()            # at once
    await ft.run(T0 + 30)          # idle: no credit is saved up
    starts, tasks = starts_of(ft, lim, 5)
    await ft.run(T0 + 31)
    assert starts == pytest.approx([T0 + 30 + k * 0.1 for k in range(5)])
    await asyncio.gather(*tasks)


async def test_late_timers_do_not_add_up():
    """Slots follow the schedule, not the wake-ups: a loop that wakes every
    sleeper 10 ms late still gives the configured rate over a minute."""
    ft = FakeTime(late=0.01)
    lim = ft.limiter(50.0)
    starts, tasks = starts_of(ft, lim, 3001)
    await ft.run(T0 + 61)
    assert len(starts) == 3001
    assert (len(starts) - 1) / (starts[-1] - starts[0]) == pytest.approx(50.0, rel=0.001)
    assert most_in_a_window(starts, 1.0) <= 51
    await asyncio.gather(*tasks)


async def test_without_a_rate_nothing_waits_and_nobody_need_ask():
    ft = FakeTime()
    lim = ft.limiter(None)
    assert not lim.limited and lim.rate() is None and lim.expected_wait() == 0.0
    starts, tasks = starts_of(ft, lim, 50)
    await settle()
    assert starts == [T0] * 50


async def test_a_throttle_lowers_the_rate_until_it_ends():
    ft = FakeTime()
    lim = ft.limiter(20.0)
    lim.throttle(2.0, T0 + 5)
    assert lim.rate() == 2.0 and lim.throttled() == (2.0, T0 + 5)
    starts, tasks = starts_of(ft, lim, 30)
    await ft.run(T0 + 20)
    during = [t for t in starts if t < T0 + 5]
    after = [t for t in starts if t >= T0 + 5]
    assert during == pytest.approx([T0 + k * 0.5 for k in range(10)])
    # the configured rate again, spaced from the last slot given at 2/s
    assert after == pytest.approx([T0 + 5 + k * 0.05 for k in range(20)])
    assert lim.rate() == 20.0 and lim.throttled() is None
    await asyncio.gather(*tasks)


async def test_a_throttle_voids_the_slots_reserved_at_the_old_rate():
    ft = FakeTime()
    lim = ft.limiter(10.0)
    starts, tasks = starts_of(ft, lim, 6)     # slots at 0, .1, .2, .3, .4, .5
    await ft.run(T0 + 0.15)                   # two have gone
    lim.throttle(1.0, T0 + 100)
    await ft.run(T0 + 10)
    assert starts == pytest.approx([T0, T0 + 0.1, T0 + 1.1, T0 + 2.1, T0 + 3.1, T0 + 4.1])
    await asyncio.gather(*tasks)


async def test_the_end_of_a_throttle_wakes_those_waiting_at_its_rate():
    ft = FakeTime()
    lim = ft.limiter(None)
    lim.throttle(1 / 60, T0 + 10)             # 1/m, on a site without a limit
    assert lim.limited and lim.rate() == pytest.approx(1 / 60)
    starts, tasks = starts_of(ft, lim, 3)
    await ft.run(T0 + 11)
    assert starts == [T0, T0 + 10, T0 + 10]   # no limit once it ended
    assert lim.rate() is None
    await asyncio.gather(*tasks)


async def test_the_lowest_rate_in_force_wins():
    ft = FakeTime()
    lim = ft.limiter(5.0)
    lim.throttle(50.0, T0 + 100)              # above the configured rate: no effect
    assert lim.rate() == 5.0 and lim.throttled() is None
    lim.throttle(1.0, T0 + 10)
    lim.throttle(2.0, T0 + 20)
    assert lim.rate() == 1.0 and lim.throttled() == (1.0, T0 + 10)
    await ft.run(T0 + 15)
    assert lim.rate() == 2.0 and lim.throttled() == (2.0, T0 + 20)
    lim.throttle(2.0, T0 + 30)                # the same rate again: the later end
    await ft.run(T0 + 25)
    assert lim.rate() == 2.0
    await ft.run(T0 + 30)
    assert lim.rate() == 5.0
    lim.throttle(1.0, T0 + 30)                # already over: nothing
    assert lim.rate() == 5.0
    with pytest.raises(ValueError):
        lim.throttle(0.0, T0 + 100)


async def test_a_cancelled_caller_leaves_nothing_behind():
    ft = FakeTime()
    lim = ft.limiter(1.0)
    await lim.acquire()
    waiting = asyncio.create_task(lim.acquire())
    await settle()
    assert lim.expected_wait() == pytest.approx(2.0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert not lim._sleepers
    starts, tasks = starts_of(ft, lim, 1)     # the cancelled slot is not given back
    await ft.run(T0 + 5)
    assert starts == [T0 + 2]
    await asyncio.gather(*tasks)


def test_the_meter_gives_the_rate_over_the_last_ten_whole_seconds():
    now = [T0]
    meter = RateMeter(clock=lambda: now[0])
    assert meter.rate() == 0.0
    for second in range(20):
        now[0] = T0 + second + 0.5
        meter.add(7)
    now[0] = T0 + 20.2
    meter.add(100)                            # the second under way is left out
    assert meter.rate() == 7.0
    now[0] = T0 + 25.0
    assert meter.rate() == pytest.approx((5 * 7 + 100) / 10)
    now[0] = T0 + 100.0
    assert meter.rate() == 0.0
    assert len(meter._counts) <= 12


# -- the dispatcher: limits per site, throttles ---------------------------------



def shaped_settings():
    return settings_from_dict({
        "delivery": {"connections_per_site": 7, "messages_per_connection": 11},
        "tls": {"secure.example": "required"},
        "shaping": {"default": {"idle_timeout": "9s"},
                    "A.Example": {"max_connections": 3, "max_message_rate": "1000/m",
                                  "max_connection_rate": "2/s", "connect_timeout": "4s",
                                  "max_deliveries_per_connection": 5}},
    })


async def test_a_site_takes_the_limits_of_the_domain_that_made_it():
    s = shaped_settings()
    dispatcher = Dispatcher(s, OneHop(), StopEverything(s))  # type: ignore[arg-type]
    await dispatcher.dispatch(stored(1, "a.example"), parse_queue_name("a.example"))
    await dispatcher.dispatch(stored(2, "b.example"), parse_queue_name("b.example"))
    await dispatcher.dispatch(stored(3, "secure.example"), parse_queue_name("secure.example"))
    plain, secure = dispatcher.sites["mx.example:25"], dispatcher.sites["mx.example:25 tls=required"]
    # b.example shares a.example's site, so its limits; secure.example made its own variant
    assert plain.limits == s.limits_for("a.example")
    assert (plain.max_connections, plain.per_connection) == (3, 5)
    assert plain.message_rate.configured == pytest.approx(1000 / 60)
    assert plain.connection_rate.configured == 2.0
    assert plain._connection()._connect_timeout == 4.0
    # [shaping.default], then [delivery]
    assert secure.limits == s.limits_for("secure.example")
    assert (secure.max_connections, secure.per_connection) == (7, 11)
    assert secure.limits.idle_timeout == 9.0
    assert not secure.message_rate.limited and not secure.connection_rate.limited
    figures = (await dispatcher.figures())["mx.example:25"]
    assert figures["max_connections"] == 3 and figures["max_deliveries_per_connection"] == 5
    assert figures["max_message_rate"] == figures["message_rate_limit"] == pytest.approx(1000 / 60)
    assert figures["max_connection_rate"] == 2.0
    assert figures["throttled_until"] is None and figures["rate"] == 0.0
    await dispatcher.stop(1.0)


async def test_a_throttle_holds_every_variant_of_the_site_and_those_made_while_it_lasts():
    s = shaped_settings()
    outcomes = StopEverything(s)
    dispatcher = Dispatcher(s, OneHop(), outcomes)  # type: ignore[arg-type]
    await dispatcher.dispatch(stored(1, "a.example"), parse_queue_name("a.example"))
    end = time.time() + 60
    await dispatcher.throttle("mx.example:25", 0.5, end)
    await dispatcher.throttle("other.example:25", 0.1, end)   # another site: untouched
    await dispatcher.dispatch(stored(2, "secure.example"), parse_queue_name("secure.example"))
    assert set(dispatcher.sites) == {"mx.example:25", "mx.example:25 tls=required"}
    for site in dispatcher.sites.values():
        assert site.message_rate.rate() == 0.5
    figures = await dispatcher.figures()
    for f in figures.values():
        assert f["message_rate_limit"] == 0.5
        assert f["throttled_until"] == pytest.approx(end, abs=0.05)
    assert figures["mx.example:25"]["max_message_rate"] == pytest.approx(1000 / 60)
    # a throttle that has ended is not given to a site made later
    await dispatcher.stop(1.0)
    dispatcher = Dispatcher(s, OneHop(), outcomes)  # type: ignore[arg-type]
    dispatcher.throttles["mx.example:25"] = {0.5: time.time() - 1}
    await dispatcher.dispatch(stored(3, "a.example"), parse_queue_name("a.example"))
    assert dispatcher.sites["mx.example:25"].message_rate.rate() == pytest.approx(1000 / 60)
    assert dispatcher.throttles == {}
    await until_true(lambda: len(outcomes.stopped) == 3)
    with pytest.raises(ValueError):
        await dispatcher.throttle("mx.example:25", -1.0, time.time() + 60)
    await dispatcher.stop(1.0)


def test_the_limits_reach_a_child_process_as_they_were_configured():
    """Settings go to the delivery process as JSON: the rates (per second by
    then) must read back as they were."""
    from sluice.config import Settings

    s = shaped_settings()
    again = Settings.model_validate_json(s.model_dump_json())
    assert again.limits_for("a.example") == s.limits_for("a.example")
    assert again.limits_for("a.example").max_message_rate == pytest.approx(1000 / 60)
