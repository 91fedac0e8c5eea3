#!/usr/bin/env python3
"""A load generator like Postfix's ``smtp-source -s SESSIONS -l SIZE -m N``,
with STARTTLS.

SESSIONS concurrent sessions, one connection per message, one command at a
time: banner, EHLO, STARTTLS, TLS handshake, EHLO, MAIL, RCPT, DATA with a
SIZE-byte message, QUIT. The handshake takes whatever the server negotiates
from TLS 1.2 up, without verifying the certificate and without resuming
sessions (every connection is a full handshake); the version and cipher of
the first session are reported. ``--no-tls`` leaves STARTTLS out (plain
EHLO, MAIL, ...).

Each message is SIZE bytes in all (headers included: From, To, Subject,
Date, Message-ID, MIME-Version, Content-Type; lines of at most 76
characters, none starting with a dot), built once: only the Message-ID
differs from one message to the next. A message counts when the server
answers 250 to the end of its DATA; any other reply at any step, a timeout
or a lost connection stops the run with a message on stderr and exit
status 1.

At the end it prints one JSON line on stdout: messages sent and accepted,
elapsed seconds (first connection to the last session's end), msg/s, its
own CPU seconds over that interval (``cpu_s``) and over its whole life
(``cpu_total_s``), the event loop (uvloop when importable) and the TLS
version and cipher. With ``--wait``, it first prints ``{"ready":true}`` once
set up and starts when a line arrives on stdin, so that a caller can start
its measurement after the interpreter's start-up.

    .venv/bin/python bench/tls_source.py -s 50 -l 10240 -m 10000 127.0.0.1:2025
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import ssl
import sys
import time
from email.utils import formatdate

try:
    import uvloop
except ImportError:  # plain asyncio then
    uvloop = None

_TEXT = (b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod "
         b"tempor incididunt ut labore et dolore magna aliqua. Ut enim ad minim veniam, "
         b"quis nostrud exercitation ullamco laboris nisi ut aliquip ex ea commodo. ")


class SmtpFailure(Exception):
    pass


def cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def body_of(n: int) -> bytes:
    """``n`` >= 3 bytes of text lines (76 characters + CRLF at most), none
    starting with a dot."""
    text = _TEXT * 2

    def line(k: int, width: int) -> bytes:
        start = (k * 7) % len(_TEXT)
        chunk = text[start:start + width]
        if chunk[:1] in (b".", b" "):
            chunk = b"x" + chunk[1:]
        return chunk + b"\r\n"

    full, rem = divmod(n, 78)
    if rem == 1:  # 78 + 1 = (40 + 2) + (35 + 2)
        full -= 1
        tail = [line(full, 40), line(full + 1, 35)]
    elif rem == 0:
        tail = []
    else:
        tail = [line(full, rem - 2)]
    body = b"".join([line(k, 76) for k in range(full)] + tail)
    assert len(body) == n, (len(body), n)
    return body


class Message:
    """The message bytes, split around the Message-ID's counter: the only
    part built per message. ``data(i)`` is ready to write after 354: the
    message, then ``.`` CRLF."""

    def __init__(self, size: int, sender: str, rcpt: str) -> None:
        token = os.urandom(6).hex()
        domain = sender.rpartition("@")[2] or "tls-source.example"
        self.head = (f"From: Bench Sender <{sender}>\r\n"
                     f"To: <{rcpt}>\r\n"
                     f"Subject: tls_source benchmark message\r\n"
                     f"Date: {formatdate(usegmt=True)}\r\n"
                     f"Message-ID: <").encode("ascii")
        mid_tail = f".{token}@{domain}>\r\n".encode("ascii")
        rest = (b"MIME-Version: 1.0\r\n"
                b"Content-Type: text/plain; charset=us-ascii\r\n"
                b"\r\n")
        fixed = len(self.head) + 10 + len(mid_tail) + len(rest)
        if size < fixed + 3:
            raise SystemExit(f"tls_source: -l {size} is smaller than the headers ({fixed + 3} bytes)")
        self.tail = mid_tail + rest + body_of(size - fixed) + b".\r\n"
        self.size = size

    def data(self, i: int) -> bytes:
        return b"".join((self.head, b"%010d" % i, self.tail))


class Source:
    def __init__(self, host: str, port: int, n: int, sessions: int, message: Message,
                 sender: str, rcpt: str, tls: bool, helo: str, timeout: float) -> None:
        self.host, self.port, self.n, self.sessions = host, port, n, sessions
        self.message = message
        self.ehlo = f"EHLO {helo}\r\n".encode("ascii")
        self.mail = f"MAIL FROM:<{sender}>\r\n".encode("ascii")
        self.rcpt = f"RCPT TO:<{rcpt}>\r\n".encode("ascii")
        self.timeout = timeout
        self.ctx: ssl.SSLContext | None = None
        if tls:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            self.ctx = ctx
        self.next = 0
        self.accepted = 0
        self.tls_version: str | None = None
        self.tls_cipher: str | None = None

    @staticmethod
    async def reply(reader: asyncio.StreamReader, step: str, want: bytes) -> bytes:
        """Read one reply (all its lines); SmtpFailure unless its code is ``want``."""
        line = await reader.readline()
        text = line
        while line[3:4] == b"-":
            line = await reader.readline()
            text += line
        if not line.endswith(b"\n"):
            raise SmtpFailure(f"{step}: connection closed ({text!r})")
        if line[:3] != want:
            raise SmtpFailure(f"{step}: expected {want.decode()}, got {text.decode('ascii', 'replace').strip()!r}")
        return text

    async def one(self, i: int) -> None:
        reader, writer = await asyncio.open_connection(self.host, self.port, limit=1 << 16)
        try:
            await self.reply(reader, "banner", b"220")
            writer.write(self.ehlo)
            caps = await self.reply(reader, "EHLO", b"250")
            if self.ctx is not None:
                if b"STARTTLS" not in caps.upper():
                    raise SmtpFailure(f"EHLO: no STARTTLS offered ({caps.decode('ascii', 'replace').strip()!r})")
                writer.write(b"STARTTLS\r\n")
                await self.reply(reader, "STARTTLS", b"220")
                await writer.start_tls(self.ctx)
                if self.tls_version is None:
                    obj = writer.get_extra_info("ssl_object")
                    self.tls_version = obj.version()
                    self.tls_cipher = obj.cipher()[0]
                writer.write(self.ehlo)
                await self.reply(reader, "EHLO after STARTTLS", b"250")
            writer.write(self.mail)
            await self.reply(reader, "MAIL", b"250")
            writer.write(self.rcpt)
            await self.reply(reader, "RCPT", b"250")
            writer.write(b"DATA\r\n")
            await self.reply(reader, "DATA", b"354")
            writer.write(self.message.data(i))
            await self.reply(reader, "end of DATA", b"250")
            self.accepted += 1
            writer.write(b"QUIT\r\n")
            await self.reply(reader, "QUIT", b"221")
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except (OSError, ssl.SSLError):  # the server may close first; the message is in
                pass

    async def session(self) -> None:
        while self.next < self.n:
            i = self.next
            self.next += 1
            try:
                async with asyncio.timeout(self.timeout):
                    await self.one(i)
            except TimeoutError:
                raise SmtpFailure(f"message {i}: no progress within {self.timeout:.0f} s") from None
            except (OSError, ssl.SSLError, asyncio.IncompleteReadError) as exc:
                raise SmtpFailure(f"message {i}: {type(exc).__name__}: {exc}") from None

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            for _ in range(self.sessions):
                tg.create_task(self.session())


def host_port(s: str) -> tuple[str, int]:
    host, _, port = s.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-s", "--sessions", type=int, default=50, help="concurrent sessions")
    ap.add_argument("-l", "--size", type=int, default=10240, help="message size in bytes, headers included")
    ap.add_argument("-m", "--messages", type=int, default=10000, help="messages in all")
    ap.add_argument("-f", "--sender", default="sender@bench.example", help="envelope and header From")
    ap.add_argument("-t", "--rcpt", default="user@bench.example", help="envelope recipient and To")
    ap.add_argument("--helo", default="tls-source.example", help="EHLO name")
    ap.add_argument("--no-tls", action="store_true", help="plain SMTP: no STARTTLS")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds a message may take, connection to QUIT")
    ap.add_argument("--wait", action="store_true",
                    help='print {"ready":true} once set up, start when a line arrives on stdin')
    ap.add_argument("server", help="HOST:PORT")
    args = ap.parse_args()
    host, port = host_port(args.server)
    message = Message(args.size, args.sender, args.rcpt)
    src = Source(host, port, args.messages, min(args.sessions, args.messages) or 1, message,
                 args.sender, args.rcpt, not args.no_tls, args.helo, args.timeout)
    loop_name = "uvloop" if uvloop is not None else "asyncio"
    if args.wait:
        print(json.dumps({"ready": True}), flush=True)
        if not sys.stdin.readline():
            print("tls_source: stdin closed before the start", file=sys.stderr)
            return 1
    c0, t0 = cpu_seconds(), time.perf_counter()
    error = None
    with asyncio.Runner(loop_factory=uvloop.new_event_loop if uvloop is not None else None) as runner:
        try:
            runner.run(src.run())
        except* SmtpFailure as eg:
            error = eg.exceptions[0]
    elapsed = time.perf_counter() - t0
    cpu = cpu_seconds() - c0
    out = {"tool": "tls_source", "server": args.server, "n": args.messages, "sent": src.next,
           "accepted": src.accepted, "size": message.size, "sessions": args.sessions,
           "tls": not args.no_tls, "seconds": round(elapsed, 3),
           "rate": round(src.accepted / elapsed, 1) if elapsed > 0 else 0.0,
           "cpu_s": round(cpu, 3), "cpu_total_s": round(cpu_seconds(), 3),
           "cpu_cores": round(cpu / elapsed, 3) if elapsed > 0 else 0.0, "loop": loop_name,
           "tls_version": src.tls_version, "tls_cipher": src.tls_cipher}
    print(json.dumps(out, separators=(",", ":")), flush=True)
    if error is not None or src.accepted != args.messages:
        print(f"tls_source: FAILED after {src.accepted} of {args.messages} accepted: "
              f"{error if error is not None else 'not every message was accepted'}",
              file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
