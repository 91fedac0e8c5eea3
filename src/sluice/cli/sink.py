"""``sluice sink``: an SMTP server for tests that keeps nothing but counts.

Every recipient gets 250, except the local parts ``tempfail`` (451 4.3.0)
and ``permfail`` (550 5.1.1). With ``--record FILE`` each accepted message is
appended to FILE as one JSON line (sender, recipients, size, the length of
its longest line, headers of interest), so a test can check what arrived.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

import orjson
from aiosmtpd.smtp import SMTP, Envelope, Session

from ..config import split_host_port
from ..reception.intake import header_values


class SinkHandler:
    def __init__(self, record: Path | None) -> None:
        self.record = record
        self.accepted = 0
        self.tempfailed = 0
        self.permfailed = 0

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
        body = envelope.original_content or b""
        self.accepted += len(envelope.rcpt_tos)
        if self.record is not None:
            line = orjson.dumps({
                "sender": envelope.mail_from, "recipients": envelope.rcpt_tos, "size": len(body),
                "longest_line": max(len(x.rstrip(b"\r")) for x in body.split(b"\n")),
                "headers": header_values(body, ["Subject", "Message-ID", "X-Campaign", "X-Tenant"]),
            }) + b"\n"
            with open(self.record, "ab") as fh:
                fh.write(line)
        return "250 2.0.0 OK"


async def _main(listen: str, record: Path | None) -> SinkHandler:
    host, port = split_host_port(listen)
    handler = SinkHandler(record)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(handler, hostname="sink.invalid", ident="Sluice sink",
                     enable_SMTPUTF8=True, decode_data=False, data_size_limit=None),
        host=host, port=port, reuse_address=True)
    print(f"sluice sink: listening on {listen}", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()
    return handler


def run(listen: str, record: str | None) -> int:
    handler = asyncio.run(_main(listen, Path(record) if record else None))
    print(f"accepted={handler.accepted} tempfailed={handler.tempfailed} "
          f"permfailed={handler.permfailed}", flush=True)
    return 0
