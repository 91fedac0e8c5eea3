"""Throttles (``DeliveryPort.throttle``, what the automation engine calls)
on a server in the test's process: they lower a site's message rate and the
configured one holds again after them; the delivery process gets those
still in force again when it is replaced. And a site without limits awaits
no limiter at all."""

from __future__ import annotations

import json
import time

import pytest

from sluice.delivery.shaping import RateLimiter

from ..support import InProcess, Sink, settings_for, until


@pytest.fixture
def stats_sink(tmp_path):
    sink = Sink(tmp_path, stats=tmp_path / "stats.json").start()
    yield sink
    sink.stop()


def sink_figures(sink: Sink) -> dict:
    try:
        return json.loads(sink.stats.read_text())
    except (OSError, ValueError):
        return {}


async def test_a_throttle_lowers_the_rate_then_the_configured_one_holds_again(
        tmp_path, stats_sink):
    settings = settings_for(tmp_path, routes={"example.com": f"127.0.0.1:{stats_sink.port}"},
                            shaping={"example.com": {"max_message_rate": "20/s"}})
    site = f"127.0.0.1:{stats_sink.port}"
    async with InProcess(settings) as srv:
        dispatcher = srv.services.manager.delivery
        await srv.send(["first@example.com"])
        await until(lambda: srv.records("Delivery"))
        assert (await dispatcher.figures())[site]["message_rate_limit"] == 20.0

        start = time.time()
        end = start + 3.0
        await dispatcher.throttle(site, 2.0, end)
        held = (await dispatcher.figures())[site]
        assert held["message_rate_limit"] == 2.0 and held["max_message_rate"] == 20.0
        assert held["throttled_until"] == pytest.approx(end, abs=0.05)

        await srv.send([f"r{i}@example.com" for i in range(60)])
        await until(lambda: len(srv.records("Delivery")) == 61, timeout=30)
        f = await until(lambda: (f := sink_figures(stats_sink)).get("accepted") == 61 and f)
        seconds = {int(s): n for s, n in f["per_second"].items()}
        # the whole seconds inside the throttle: 2/s (one more for the
        # time from a start to the sink's count)
        during = [n for s, n in seconds.items() if s > start and s + 1 <= end]
        assert during and max(during) <= 3, seconds
        # then 20/s again: the rest arrived within a few seconds
        after = [n for s, n in seconds.items() if s >= end]
        assert max(after) >= 10, seconds
        restored = (await dispatcher.figures())[site]
        assert restored["message_rate_limit"] == 20.0 and restored["throttled_until"] is None
        assert dispatcher.throttles == {}  # forgotten once over


async def test_a_new_delivery_process_gets_the_throttles_still_in_force(tmp_path, stats_sink):
    settings = settings_for(tmp_path, routes={"example.com": f"127.0.0.1:{stats_sink.port}"},
                            workers=1)
    site = f"127.0.0.1:{stats_sink.port}"
    async with InProcess(settings) as srv:
        delivery = srv.server.delivery
        assert delivery is not None
        await srv.send(["first@example.com"])
        await until(lambda: srv.records("Delivery"))
        figures = (await delivery.figures())[site]
        assert figures["message_rate_limit"] is None and figures["max_message_rate"] is None

        end = time.time() + 120
        await delivery.throttle(site, 0.5, end)
        await delivery.throttle("other.example:25", 1.0, time.time() - 1)  # over already
        figures = (await delivery.figures())[site]
        assert figures["message_rate_limit"] == 0.5
        assert figures["throttled_until"] == pytest.approx(end, abs=0.05)

        old = delivery.proc
        assert old is not None
        old.kill()
        await until(lambda: delivery._up and delivery.proc is not old, timeout=30)
        assert await delivery.figures() == {}  # a new process: no site yet
        await srv.send(["second@example.com"])
        await until(lambda: len(srv.records("Delivery")) == 2)
        figures = (await delivery.figures())[site]
        assert figures["message_rate_limit"] == 0.5
        assert figures["throttled_until"] == pytest.approx(end, abs=0.05)
        assert list(delivery._throttles) == [site]


async def test_without_limits_no_limiter_is_awaited(tmp_path, stats_sink, monkeypatch):
    async def never(self):
        raise AssertionError("a limiter was awaited for a site without limits")

    monkeypatch.setattr(RateLimiter, "acquire", never)
    settings = settings_for(tmp_path, routes={"example.com": f"127.0.0.1:{stats_sink.port}"})
    async with InProcess(settings) as srv:
        await srv.send([f"r{i}@example.com" for i in range(20)])
        await until(lambda: len(srv.records("Delivery")) == 20)
        assert not srv.records("TransientFailure")
