"""Typed messages between processes: every call gets an answer, an error included."""

from __future__ import annotations

import asyncio
import smtplib
import socket

import pytest

from sluice.ipc import Accept, Accepted, Channel, ChannelClosed, Figures, Ready, RemoteError, Stop
from sluice.spool import SqliteSpool

from ..support import InProcess, free_port, read_records, settings_for, until


async def pair(handlers_a, handlers_b):
    a, b = socket.socketpair()
    return await Channel.over(a, handlers_a), await Channel.over(b, handlers_b)


async def test_a_typed_call_gets_its_typed_answer_and_the_payload_travels_raw():
    seen = []

    async def on_accept(msg: Accept, payload: bytes) -> Accepted:
        seen.append((msg, payload))
        return Accepted(ids=["m1", "m2"], bounced=0)

    main, child = await pair({Accept: on_accept}, {})
    answer = await child.call(Accept(sender="s@x.org", recipients=["a@y.com", "b@y.com"],
                                     protocol="ESMTP", peer=("client", "127.0.0.1"),
                                     session_id=None), b"\x00raw body\xff", returns=Accepted)
    assert answer == Accepted(ids=["m1", "m2"], bounced=0)
    [(msg, payload)] = seen
    assert msg.peer == ("client", "127.0.0.1") and payload == b"\x00raw body\xff"
    await main.close()
    await child.close()


async def test_a_handler_that_raises_answers_at_once_with_the_error():
    async def broken(msg: Figures, payload: bytes) -> dict:
        raise OSError("disk on fire")

    main, child = await pair({}, {Figures: broken})
    with pytest.raises(RemoteError, match="OSError: disk on fire"):
        await asyncio.wait_for(main.call(Figures()), 1.0)  # not the 60 s call timeout
    with pytest.raises(RemoteError, match="no handler for Ready"):
        await asyncio.wait_for(main.call(Ready(pid=1)), 1.0)
    await main.close()
    await child.close()


async def test_a_call_to_a_side_that_went_away_fails():
    main, child = await pair({}, {Stop: lambda m, p: asyncio.sleep(3600)})
    call = asyncio.create_task(main.call(Stop(grace=1.0)))
    await asyncio.sleep(0)
    await child.close()
    with pytest.raises(ChannelClosed):
        await asyncio.wait_for(call, 1.0)
    await main.close()


async def test_a_failed_spool_write_during_data_is_a_451_at_once_and_the_session_goes_on(
        tmp_path, monkeypatch):
    """With a reception worker process: the write fails in the main process,
    the worker hears it at once, and its client gets 451 4.3.0."""
    real = SqliteSpool.receive
    calls = []

    async def failing_once(self, body, items):
        calls.append(items)
        if len(calls) == 1:
            raise OSError("disk full")
        return await real(self, body, items)

    monkeypatch.setattr(SqliteSpool, "receive", failing_once)
    settings = settings_for(tmp_path, workers=1, routes={"example.com": f"127.0.0.1:{free_port()}"},
                            queue={"retry_interval": "1h", "max_retry_interval": "2h"})
    async with InProcess(settings) as srv:
        def session() -> tuple[tuple[int, bytes], tuple[int, bytes]]:
            with smtplib.SMTP("127.0.0.1", srv.smtp_port, timeout=30) as s:
                s.ehlo("client.test")
                s.sock.settimeout(1.0)  # the answer must come within a second
                s.mail("a@example.org")
                s.rcpt("first@example.com")
                first = s.data(b"Subject: 1\r\n\r\none\r\n")
                s.mail("a@example.org")
                s.rcpt("second@example.com")
                second = s.data(b"Subject: 2\r\n\r\ntwo\r\n")
                return first, second

        first, second = await asyncio.to_thread(session)
        assert first[0] == 451 and first[1].startswith(b"4.3.0 ")
        assert second[0] == 250
        # nothing half-stored: the first message has no row and no record
        assert srv.services.spool.index.counts() == {"example.com": 1}
        await until(lambda: read_records(srv.data, "Reception"))
        assert [r["recipient"] for r in read_records(srv.data, "Reception")] == [
            "second@example.com"]
