"""``sluice sink``: an SMTP server for tests and benchmarks that keeps nothing but counts.

Every recipient gets 250, except the local parts ``tempfail`` (451 4.3.0)
and ``permfail`` (550 5.1.1). ``--respond 'DOMAIN=CODE TEXT'`` makes it
answer DATA for mail to DOMAIN with that reply instead, to play a receiver
that throttles (``example.com=421 4.7.0 [TSS04] Messages deferred``). With
``--record FILE`` each accepted message is appended to FILE as one JSON line
(sender, recipients, size, the length of its longest line, headers of
interest), so a test can check what arrived. The sink counts the most
connections it had open at once and the messages it accepted each second;
``--stats FILE`` rewrites FILE with those figures every second, and they are
printed when it stops.
"""

from __future__ import annotations

import asyncio
import collections
import os
import re
import signal
import sys
import time
from pathlib import Path

import orjson
from aiosmtpd.smtp import SMTP, Envelope, Session

from ..config import split_host_port
from ..reception.intake import header_values

_REPLY = re.compile(r"([2-5][0-9][0-9])( .*)?", re.S)


def parse_respond(value: str) -> tuple[str, str]:
    """``DOMAIN=CODE TEXT`` -> (domain, reply); ValueError saying what is wrong."""
    domain, sep, reply = value.partition("=")
    domain = domain.strip().lower().rstrip(".")
    reply = reply.strip()
    if not sep or not domain or " " in domain:
        raise ValueError(f"{value!r}: expected DOMAIN=CODE TEXT, e.g. "
                         "'example.com=421 4.7.0 [TSS04] deferred'")
    if not _REPLY.fullmatch(reply) or "\r" in reply or "\n" in reply:
        raise ValueError(f"{value!r}: the reply must start with a code from 200 to 599 "
                         "and be one line")
    return domain, reply


class Figures:
    """Connections open now and at most, messages accepted per second."""

    def __init__(self) -> None:
        self.open = 0
        self.peak_connections = 0
        self.per_second: collections.Counter[int] = collections.Counter()
        self.first: float | None = None
        self.last: float | None = None

    def accepted(self, n: int) -> None:
        now = time.time()
        self.per_second[int(now)] += n
        if self.first is None:
            self.first = now
        self.last = now

    def as_dict(self, accepted: int) -> dict:
        span = (self.last - self.first) if self.first is not None and self.last else 0.0
        return {
            "accepted": accepted,
            "connections": self.open,
            "peak_connections": self.peak_connections,
            # over the whole run: from the first accepted message to the last
            "rate": round((accepted - 1) / span, 2) if span > 0 else 0.0,
            "peak_rate_1s": max(self.per_second.values(), default=0),
            "per_second": {str(k): v for k, v in sorted(self.per_second.items())},
        }


class SinkHandler:
    def __init__(self, record: Path | None, respond: dict[str, str] | None = None) -> None:
        self.record = record
        self.respond = respond or {}
        self.accepted = 0
        self.tempfailed = 0
        self.permfailed = 0
        self.responded = 0
        self.figures = Figures()

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        local = address.rpartition("@")[0].lower()
        if local == "tempfail":
            self.tempfailed += 1
            return "451 4.3.0 Temporary failure, try again later"
        if local == "permfail":
            self.permfailed += 1
            return "550 5.1.1 No such user"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.respond:
            for rcpt in envelope.rcpt_tos:
                reply = self.respond.get(rcpt.rpartition("@")[2].lower().rstrip("."))
                if reply is not None:
                    self.responded += len(envelope.rcpt_tos)
                    return reply
        body = envelope.original_content or b""
        self.accepted += len(envelope.rcpt_tos)
        self.figures.accepted(len(envelope.rcpt_tos))
        if self.record is not None:
            line = orjson.dumps({
                "sender": envelope.mail_from, "recipients": envelope.rcpt_tos, "size": len(body),
                "longest_line": max(len(x.rstrip(b"\r")) for x in body.split(b"\n")),
                "headers": header_values(body, ["Subject", "Message-ID", "X-Campaign", "X-Tenant"]),
            }) + b"\n"
            with open(self.record, "ab") as fh:
                fh.write(line)
        return "250 2.0.0 OK"

    def stats(self) -> dict:
        return {**self.figures.as_dict(self.accepted), "tempfailed": self.tempfailed,
                "permfailed": self.permfailed, "responded": self.responded}


class _CountingSMTP(SMTP):
    """aiosmtpd's SMTP, counting the connections open at once."""

    def __init__(self, handler: SinkHandler, **kw) -> None:
        super().__init__(handler, **kw)
        self._figures = handler.figures

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._original_transport is None:  # not the STARTTLS upgrade
            f = self._figures
            f.open += 1
            f.peak_connections = max(f.peak_connections, f.open)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        self._figures.open -= 1
        super().connection_lost(error)


def _write_stats(path: Path, handler: SinkHandler) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(orjson.dumps(handler.stats()))
    os.replace(tmp, path)


async def _main(listen: str, record: Path | None, respond: dict[str, str],
                stats: Path | None) -> SinkHandler:
    host, port = split_host_port(listen)
    handler = SinkHandler(record, respond)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: _CountingSMTP(handler, hostname="sink.invalid", ident="Sluice sink",
                              enable_SMTPUTF8=True, decode_data=False, data_size_limit=None),
        host=host, port=port, reuse_address=True)
    print(f"sluice sink: listening on {listen}", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    while not stop.is_set():
        if stats is not None:
            _write_stats(stats, handler)
        try:
            await asyncio.wait_for(stop.wait(), timeout=1.0)
        except asyncio.TimeoutError:
            pass
    server.close()
    if stats is not None:
        _write_stats(stats, handler)
    return handler


def run(listen: str, record: str | None, respond: dict[str, str] | None = None,
        stats: str | None = None) -> int:
    handler = asyncio.run(_main(listen, Path(record) if record else None, respond or {},
                                Path(stats) if stats else None))
    s = handler.stats()
    print(f"accepted={handler.accepted} tempfailed={handler.tempfailed} "
          f"permfailed={handler.permfailed} responded={handler.responded} "
          f"peak_connections={s['peak_connections']} rate={s['rate']}/s "
          f"peak_rate_1s={s['peak_rate_1s']}", flush=True)
    return 0
