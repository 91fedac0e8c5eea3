"""SMTP reception: aiosmtpd for the protocol, a handler for the decisions.

``SluiceSMTP`` adds what aiosmtpd lacks for an MTA: enhanced status codes on
every reply (RFC 2034), PIPELINING and ENHANCEDSTATUSCODES in EHLO, and a
bulk DATA reader (the end-of-data marker is found in large chunks and
dot-stuffing undone with bytes operations, instead of line by line).
``ReceptionHandler`` holds the policy: relay control, address syntax,
recipient limit, and the durable store before the 250.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import re
import socket
import time
import uuid
import weakref
from email.utils import formatdate
from typing import TYPE_CHECKING, Any, ClassVar

from aiosmtpd.smtp import SMTP, Envelope, Session, login_always_fail

from ..config import IPNetwork, Settings, host_in
from ..logs import REJECTION, Response, make_record
from ..message import AddressError, split_address
from ..node import node_id
from .intake import Intake
from .lines import fold_long_lines

if TYPE_CHECKING:
    from .worker import RemoteIntake

log = logging.getLogger(__name__)

# Default enhanced codes (RFC 3463) for replies written without one. RFC 2034:
# once ENHANCEDSTATUSCODES is offered, every reply but the greeting, the EHLO
# lines and 354 carries one.
_ENHANCED = {
    "421": "4.3.0", "451": "4.3.0", "452": "4.5.3", "454": "4.7.0",
    "500": "5.5.2", "501": "5.5.4", "502": "5.5.1", "503": "5.5.1", "504": "5.5.4",
    "530": "5.7.0", "550": "5.7.1", "552": "5.3.4", "553": "5.1.3", "554": "5.5.0",
    "555": "5.5.4",
}

_END = b"\r\n.\r\n"

# Anything outside printable US-ASCII in a reply (a client's garbage echoed
# back, say) is written as \xNN; line breaks of multi-line replies stay.
_UNPRINTABLE = re.compile(r"[^\x20-\x7e\r\n]|\r(?!\n)|(?<!\r)\n")


def printable(text: str) -> str:
    """``text`` with every character outside printable US-ASCII escaped."""
    return _UNPRINTABLE.sub(lambda m: "".join(f"\\x{b:02x}" for b in m.group(0).encode()), text)


def _with_enhanced(status: str) -> str:
    """``status`` with an enhanced code after its reply code, if it has none."""
    code = status[:3]
    if len(status) < 4 or status[3] != " " or not code.isdigit() or code[0] not in "245":
        return status  # 354, multi-line (EHLO) replies: as they are
    rest = status[4:]
    first = rest.split(" ", 1)[0]
    if first.count(".") == 2 and first.replace(".", "").isdigit():
        return status
    default = "2.0.0" if code[0] == "2" else _ENHANCED.get(code, f"{code[0]}.0.0")
    return f"{code} {default} {rest}"


_PLAIN_PATH = re.compile(r"\s*<([A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+@[A-Za-z0-9.-]+)>(.*)", re.S)


class SluiceSMTP(SMTP):
    """aiosmtpd's SMTP with enhanced codes, a bulk DATA reader and a cheap start.

    aiosmtpd's ``__init__`` rebuilds its command and hook tables with
    ``inspect`` for every connection, which was over a quarter of the CPU of
    accepting a message. Sluice offers no AUTH, so this ``__init__`` sets the
    same state with tables built once per class and once per handler.
    """

    _command_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, handler: ReceptionHandler, *, hostname: str, ident: str,
                 data_size_limit: int, timeout: float,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.__ident__ = ident
        self.loop = loop
        asyncio.StreamReaderProtocol.__init__(
            self, asyncio.StreamReader(loop=loop, limit=self.line_length_limit),
            client_connected_cb=self._cb_client_connected, loop=loop)
        self.event_handler = handler
        self.data_size_limit = data_size_limit
        self.enable_SMTPUTF8 = True
        self._decode_data = False
        # per connection (aiosmtpd keeps this one on the class, shared)
        self.command_size_limits = collections.defaultdict(lambda: SMTP.command_size_limit)
        self.hostname = hostname
        self.tls_context = None
        self.require_starttls = False
        self._timeout_duration = timeout
        self._timeout_handle = None
        self._tls_handshake_okay = True
        self._tls_protocol = None
        self._original_transport = None
        self.session = None
        self.envelope = None
        self.transport = None
        self._handler_coroutine = None
        self._auth_require_tls = True
        self._proxy_timeout = None
        self._authenticator = None
        self._auth_callback = login_always_fail
        self._auth_required = False
        self._auth_methods = {}
        self._handle_hooks = handler.hooks
        self._ehlo_hook_ver = "new"
        names = type(self)._command_names
        if not names:
            names = type(self)._command_names = tuple(
                m[5:] for m in dir(type(self)) if m.startswith("smtp_"))
        self._smtp_methods = {n: getattr(self, "smtp_" + n) for n in names}
        self._enforce_call_limit = False
        self._greeted = False
        self._helo_reply = f"250 {hostname}"  # RFC 2034: as it is, like the greeting

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        # The common case, a plain <local@domain>, without the header parser.
        m = _PLAIN_PATH.fullmatch(arg) if arg else None
        if m is not None:
            local = m.group(1).rpartition("@")[0]
            if not (self.local_part_limit and len(local) > self.local_part_limit):
                return m.group(1), m.group(2)
        # RFC 5321 paths are <...>: an opening bracket without its closing one is malformed.
        if arg and arg.lstrip().startswith("<") and ">" not in arg:
            return None, None
        return super()._getaddr(arg)

    async def push(self, status: Any) -> None:
        if isinstance(status, bytes):
            status = status.decode("utf-8", "replace")
        if self._greeted and status != self._helo_reply:
            status = _with_enhanced(status)
        else:
            self._greeted = True  # the 220 greeting carries no enhanced code
        await super().push(printable(status))

    async def smtp_DATA(self, arg: str) -> None:
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        content, too_big = await self._read_data()
        if too_big:
            self._set_post_data_state()
            await self.push("552 5.3.4 Error: message size exceeds fixed maximum message size")
            return
        self.envelope.content = content
        self.envelope.original_content = content
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()
        await self.push(status)

    async def _read_data(self) -> tuple[bytes, bool]:
        """Read DATA up to CRLF.CRLF in chunks; returns (content, over size limit)."""
        reader = self._reader
        limit = self.data_size_limit or 0
        buf = bytearray()
        dropped = 0
        scanned = 0
        while True:
            chunk = await reader.read(262144)
            if not chunk:
                raise ConnectionResetError("connection closed during DATA")
            buf += chunk
            if scanned == 0 and buf[:3] == b".\r\n" and dropped == 0:
                self._unread(bytes(buf[3:]))
                return b"", False
            idx = buf.find(_END, max(0, scanned - 4))
            if idx >= 0:
                self._unread(bytes(buf[idx + len(_END):]))
                del buf[idx + 2:]
                break
            scanned = len(buf)
            if limit and dropped + len(buf) > limit + 2:
                # Over the limit: keep reading to the end marker, keep nothing.
                keep = bytes(buf[-4:])
                dropped += len(buf) - len(keep)
                buf = bytearray(keep)
                scanned = len(buf)
        if dropped or (limit and len(buf) > limit + 2):
            return b"", True
        if buf[:2] == b"..":
            del buf[0]
        return bytes(buf).replace(b"\r\n..", b"\r\n."), False

    def _unread(self, data: bytes) -> None:
        # Pipelined commands that arrived with the end of DATA go back to the
        # reader for the command loop. StreamReader has no public unread.
        if data:
            self._reader._buffer[0:0] = data  # type: ignore[attr-defined]


class ReceptionHandler:
    """aiosmtpd handler hooks: the policy of what Sluice accepts."""

    def __init__(self, settings: Settings, intake: Intake | RemoteIntake) -> None:
        self.settings = settings
        self.intake = intake
        self.relay: list[IPNetwork] = settings.smtp.relay_networks()
        self.nodeid = node_id(settings.data_path)
        # aiosmtpd's hook table, built once for every session
        self.hooks = {m[7:]: getattr(self, m) for m in dir(self) if m.startswith("handle_")}

    def _may_relay(self, session: Session) -> bool:
        peer = session.peer
        return isinstance(peer, tuple) and host_in(peer[0], self.relay)

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope,
                          hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname
        if not hasattr(session, "sluice_id"):
            session.sluice_id = str(uuid.uuid4())  # type: ignore[attr-defined]
        # one write for the whole reply
        return ["\r\n".join([*responses[:-1], "250-PIPELINING", "250-ENHANCEDSTATUSCODES",
                              responses[-1]])]

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, mail_options: list[str]) -> str:
        # The null reverse-path stays "<>" in the envelope (aiosmtpd needs a
        # non-empty mail_from) and is stored as "".
        if address != "<>":
            try:
                split_address(address)
            except AddressError as exc:
                return f"501 5.1.7 Bad sender address syntax: {exc}"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        try:
            split_address(address)
        except AddressError as exc:
            return f"501 5.1.3 Bad recipient address syntax: {exc}"
        if not self._may_relay(session):
            await self._log_rejection(session, envelope, address,
                                      Response(550, "Relaying denied", (5, 7, 1), "RCPT TO"))
            return "550 5.7.1 Relaying denied"
        if len(envelope.rcpt_tos) >= self.settings.smtp.max_recipients:
            return "452 4.5.3 Too many recipients"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def _log_rejection(self, session: Session, envelope: Envelope, rcpt: str,
                             response: Response) -> None:
        peer = session.peer if isinstance(session.peer, tuple) else ("", "")
        sender = "" if envelope.mail_from == "<>" else envelope.mail_from or ""
        now = time.time()
        rec = make_record(REJECTION, msg_id="", sender=sender, recipient=rcpt,
                          queue="", meta={}, size=0, created=now, num_attempts=0,
                          nodeid=self.nodeid, response=response, now=now,
                          peer=(session.host_name or "", str(peer[0])),
                          reception_protocol=_protocol(session),
                          session_id=getattr(session, "sluice_id", None))
        try:
            await self.intake.add_records([rec])
        except Exception:  # a log-only record must never break the session
            log.exception("could not log rejection")

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        body = fold_long_lines(envelope.original_content or b"")
        peer = session.peer if isinstance(session.peer, tuple) else ("", "")
        protocol = _protocol(session)
        received = (f"Received: from {session.host_name or 'unknown'} ([{peer[0]}])\r\n"
                    f"\tby {self.settings.smtp.hostname} (Sluice) with {protocol};\r\n"
                    f"\t{_rfc2822_now()}\r\n").encode("utf-8", "replace")
        try:
            accepted = await self.intake.accept(
                received + body, "" if envelope.mail_from == "<>" else envelope.mail_from or "",
                list(envelope.rcpt_tos),
                protocol=protocol, peer=(session.host_name or "", str(peer[0])),
                session_id=getattr(session, "sluice_id", None))
        except AddressError as exc:
            return f"554 5.1.3 {exc}"
        except Exception:
            log.exception("storing a message failed")
            return "451 4.3.0 Temporary failure storing the message, try again later"
        return f"250 2.0.0 OK queued as {accepted.ids[0]}" + (
            f" (+{len(accepted.ids) - 1})" if len(accepted.ids) > 1 else "")


def _protocol(session: Session) -> str:
    """RFC 3848: ESMTP after EHLO, SMTP after HELO."""
    return "ESMTP" if session.extended_smtp else "SMTP"


def _rfc2822_now() -> str:
    return formatdate(usegmt=True)


async def start_smtp(settings: Settings, handler: ReceptionHandler, sock: socket.socket,
                     sessions: weakref.WeakSet) -> asyncio.base_events.Server:
    """Serve SMTP on the listening socket ``sock`` (bound by the main process);
    every session protocol is added to ``sessions``."""
    loop = asyncio.get_running_loop()
    s = settings.smtp

    def factory() -> SluiceSMTP:
        proto = SluiceSMTP(handler, hostname=s.hostname, ident="Sluice ESMTP",
                           data_size_limit=s.max_message_size, timeout=s.idle_timeout, loop=loop)
        sessions.add(proto)
        return proto

    return await loop.create_server(factory, sock=sock, backlog=1024)
