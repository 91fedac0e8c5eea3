"""Whatever goes wrong while a message is being delivered, it ends in a record
and a way forward: never left claimed without a record.

In-process server (real SQLite spool, real sockets, ``sluice sink`` as the
destination), with failures injected where a bug or a failing disk would
put them.
"""

from __future__ import annotations

import pytest

from sluice.delivery import smtp as delivery_smtp
from sluice.spool.sqlite import SqliteSpool

from ..support import InProcess, settings_for, until


@pytest.fixture
def settings(tmp_path, sink):
    return settings_for(tmp_path, routes={"example.com": f"127.0.0.1:{sink.port}"})


def fail_once(monkeypatch, cls, name, exc):
    real = getattr(cls, name)
    calls = []

    async def flaky(self, *args, **kw):
        calls.append(args)
        if len(calls) == 1:
            raise exc
        return await real(self, *args, **kw)

    monkeypatch.setattr(cls, name, flaky)
    return calls


async def test_unexpected_exception_while_sending_ends_in_transient_failure_and_retry(
        settings, sink, monkeypatch, caplog):
    fail_once(monkeypatch, delivery_smtp.Connection, "send", RuntimeError("injected fault"))
    async with InProcess(settings) as srv:
        await srv.send(["a@example.com"])
        tf = (await until(lambda: srv.records("TransientFailure")))[0]
        assert tf["response"]["code"] == 451
        assert tf["response"]["enhanced_code"] == {"class": 4, "subject": 3, "detail": 0}
        assert "RuntimeError: injected fault" in tf["response"]["content"]
        delivered = (await until(lambda: srv.records("Delivery")))[0]
        assert delivered["id"] == tf["id"] and delivered["num_attempts"] == 2
        assert sink.recipients() == ["a@example.com"]
        assert srv.services.spool.in_hand == set()
    # logged with its traceback
    assert any(r.exc_info and "injected fault" in str(r.exc_info[1]) for r in caplog.records)


async def test_message_whose_outcome_could_not_be_recorded_is_reaped_and_retried(
        settings, sink, monkeypatch):
    # The first attempt fails, and so does the write of its retry: the
    # message is left claimed with nobody in charge of it (an orphan).
    fail_once(monkeypatch, delivery_smtp.Connection, "send", RuntimeError("injected fault"))
    retries = fail_once(monkeypatch, SqliteSpool, "retry", OSError("disk on fire"))
    async with InProcess(settings) as srv:
        manager = srv.services.manager
        await srv.send(["a@example.com"])
        await until(lambda: retries)
        assert srv.services.spool.in_hand == set()
        assert await manager.reap_orphans() == 1
        tf = await until(lambda: [r for r in srv.records("TransientFailure")
                                  if "attempt lost" in r["response"]["content"]])
        assert tf[0]["recipient"] == "a@example.com"
        await until(lambda: srv.records("Delivery"))
        assert sink.recipients() == ["a@example.com"]
        assert await manager.reap_orphans() == 0


async def test_bounce_sweep_takes_orphans_too(settings, sink, monkeypatch):
    fail_once(monkeypatch, delivery_smtp.Connection, "send", RuntimeError("injected fault"))
    retries = fail_once(monkeypatch, SqliteSpool, "retry", OSError("disk on fire"))
    async with InProcess(settings) as srv:
        await srv.send(["a@example.com"])
        await until(lambda: retries)
        resp = await srv.api("POST", "/api/admin/bounce/v1", {"reason": "purge"})
        assert resp.status_code == 200
        bounced = (await until(lambda: srv.records("AdminBounce")))[0]
        assert bounced["recipient"] == "a@example.com"
        assert srv.services.spool.index.counts() == {}
        listed = (await srv.api("GET", "/api/admin/bounce/v1")).json()
        assert listed[0]["total_bounced"] == 1
    assert sink.recipients() == []
