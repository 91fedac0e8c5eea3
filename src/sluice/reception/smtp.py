"""SMTP reception: aiosmtpd for the protocol, a handler for the decisions.

``SluiceSMTP`` adds what aiosmtpd lacks for an MTA: enhanced status codes on
every reply (RFC 2034), PIPELINING and ENHANCEDSTATUSCODES in EHLO, and a
bulk DATA reader (the end-of-data marker is found in large chunks and
dot-stuffing undone with bytes operations, instead of line by line).
``SluiceSMTP`` also does STARTTLS with the event loop's own TLS
(``loop.start_tls``: uvloop's native implementation when uvloop runs),
refuses a second STARTTLS, bounds the handshake by the idle timeout, and
disconnects a client after 5 failed AUTH attempts.
``ReceptionHandler`` holds the policy: relay control (trusted hosts or an
authenticated client), AUTH PLAIN and LOGIN against the auth_file, address
syntax, recipient limit, and the durable store before the 250.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import ipaddress
import logging
import re
import socket
import ssl
import time
import uuid
import weakref
from email.utils import formatdate
from typing import TYPE_CHECKING, Any, ClassVar

from aiosmtpd.smtp import MISSING, SMTP, Envelope, Session, login_always_fail

from ..config import IPNetwork, Settings, host_in
from ..logs import REJECTION, Response, Tls, make_record
from ..message import AddressError, split_address
from ..node import node_id
from .intake import Intake
from .lines import fold_long_lines
from .tls import server_context

if TYPE_CHECKING:
    from .auth import Credentials
    from .dkim import DkimSigner
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


MAX_AUTH_FAILURES = 5  # then the client is disconnected


def _is_loopback(peer: Any) -> bool:
    try:
        return isinstance(peer, tuple) and ipaddress.ip_address(peer[0].split("%")[0]).is_loopback
    except ValueError:
        return False


_PLAIN_PATH = re.compile(r"\s*<([A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+@[A-Za-z0-9.-]+)>(.*)", re.S)


class SluiceSMTP(SMTP):
    """aiosmtpd's SMTP with enhanced codes, a bulk DATA reader and a cheap start.

    aiosmtpd's ``__init__`` rebuilds its command and hook tables with
    ``inspect`` for every connection, which was over a quarter of the CPU of
    accepting a message. This ``__init__`` sets the same state with tables
    built once per class and once per handler (AUTH is the handler's
    ``handle_AUTH``, so aiosmtpd's authenticator machinery stays unused).
    """

    _command_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, handler: ReceptionHandler, *, hostname: str, ident: str,
                 data_size_limit: int, timeout: float,
                 loop: asyncio.AbstractEventLoop, tls_context: ssl.SSLContext | None = None,
                 require_tls: bool = False) -> None:
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
        self.tls_context = tls_context
        self.require_starttls = bool(tls_context) and require_tls
        self._timeout_duration = timeout
        self._timeout_handle = None
        self._tls_handshake_okay = True
        self._tls_protocol = None
        self._original_transport = None
        self.session = None
        self.envelope = None
        self.transport = None
        self._handler_coroutine = None
        self._auth_require_tls = True  # False for loopback clients (connection_made)
        self._proxy_timeout = None
        self._authenticator = None
        self._auth_callback = login_always_fail
        self._auth_required = False
        # the mechanisms offered; handle_AUTH does the exchange
        self._auth_methods = dict.fromkeys(("LOGIN", "PLAIN")) if handler.credentials else {}
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

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self._original_transport is None:  # a new connection, not STARTTLS
            self._auth_require_tls = not _is_loopback(transport.get_extra_info("peername"))

    async def smtp_STARTTLS(self, arg: str) -> None:
        """RFC 3207 with the loop's TLS; the plaintext the client pipelined
        after STARTTLS is discarded, a second STARTTLS refused."""
        if self._original_transport is not None:
            await self.push("503 5.5.1 Already using TLS")
            return
        if await self.check_helo_needed("EHLO"):
            return
        if arg:
            await self.push("501 5.5.4 Syntax: STARTTLS")
            return
        if not self.tls_context:
            await self.push("454 4.7.0 TLS not available")
            return
        await self.push("220 2.0.0 Ready to start TLS")
        self._reader._buffer.clear()  # type: ignore[attr-defined]  # RFC 3207, 5
        plain = self.transport
        assert plain is not None
        self._original_transport = plain
        try:
            secure = await self.loop.start_tls(
                plain, self, self.tls_context, server_side=True,
                ssl_handshake_timeout=min(60.0, self._timeout_duration))
        except (OSError, ssl.SSLError, asyncio.TimeoutError, ConnectionError) as exc:
            log.info("%r TLS handshake failed: %s", self.session and self.session.peer, exc)
            secure = None
        if secure is None:  # no TLS: the session ends here, as aiosmtpd ends it
            plain.close()
            self.connection_lost(None)
            return
        # RFC 3207, 4.2: the session starts again, as at connection time.
        self._reader._transport = secure  # type: ignore[attr-defined]
        self._writer._transport = secure  # type: ignore[attr-defined]
        self.transport = secure
        self._tls_protocol = secure  # type: ignore[assignment]  # "TLS is in use"
        self._set_rset_state()
        old = self.session
        self.session = self._create_session()
        if old is not None:
            self.session.peer = old.peer
            if hasattr(old, "sluice_id"):  # one session id per connection
                self.session.sluice_id = old.sluice_id  # type: ignore[attr-defined]
        self.session.ssl = {"ssl_object": secure.get_extra_info("ssl_object")}
        self._greeted = True
        self._reset_timeout()

    async def smtp_AUTH(self, arg: str) -> None:
        if not self._auth_methods:
            await self.push("503 5.5.1 Error: authentication not enabled")
            return
        # mechanism names are case-insensitive (RFC 4954)
        mech, sep, rest = (arg or "").partition(" ")
        await super().smtp_AUTH(mech.upper() + sep + rest)
        session = self.session
        if session is not None and getattr(session, "auth_failures", 0) >= MAX_AUTH_FAILURES:
            await self.push("421 4.7.0 Too many failed authentication attempts, closing")
            if self.transport is not None:
                self.transport.close()

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
        self.credentials = credentials(settings)
        self.nodeid = node_id(settings.data_path)
        self.dkim = dkim_signer(settings)  # keys loaded once per process
        # aiosmtpd's hook table, built once for every session
        self.hooks = {m[7:]: getattr(self, m) for m in dir(self) if m.startswith("handle_")}

    def _may_relay(self, session: Session) -> bool:
        if session.authenticated:
            return True
        peer = session.peer
        return isinstance(peer, tuple) and host_in(peer[0], self.relay)

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope,
                          hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname
        if not hasattr(session, "sluice_id"):
            session.sluice_id = str(uuid.uuid4())  # type: ignore[attr-defined]
        # aiosmtpd writes "250-AUTH " with no mechanism when none is offered
        lines = [r for r in responses[:-1] if r != "250-AUTH "]
        # one write for the whole reply
        return ["\r\n".join([*lines, "250-PIPELINING", "250-ENHANCEDSTATUSCODES",
                              responses[-1]])]

    async def handle_AUTH(self, server: SMTP, session: Session, envelope: Envelope,
                          args: list[str]) -> str | None:
        """AUTH PLAIN and LOGIN (RFC 4954, 4616), with or without an initial
        response; None when the exchange was aborted (its reply is sent)."""
        mechanism, initial = args[0], (args[1] if len(args) > 1 else None)
        if mechanism == "PLAIN":
            blob = await _auth_response(server, initial, "")
            if blob is None:
                return None
            parts = blob.split(b"\0")
            if len(parts) != 3:
                return "501 5.5.2 Malformed AUTH PLAIN response"
            login, password = parts[1], parts[2]
        else:  # LOGIN
            login = await _auth_response(server, initial, "Username:")
            if login is None:
                return None
            password = await _auth_response(server, None, "Password:")
            if password is None:
                return None
        try:
            name, secret = login.decode("utf-8"), password.decode("utf-8")
        except UnicodeDecodeError:
            name, secret = "", ""
        user = await self.credentials.check(name, secret) if self.credentials and name else None
        if user is None:
            session.auth_failures = getattr(session, "auth_failures", 0) + 1  # type: ignore[attr-defined]
            log.warning("AUTH %s failed for %r from %s", mechanism, printable(name)[:64],
                        session.peer[0] if isinstance(session.peer, tuple) else "?")
            return "535 5.7.8 Authentication credentials invalid"
        session.authenticated = True
        session.sluice_user = user  # type: ignore[attr-defined]
        return "235 2.7.0 Authentication successful"


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
        tls = Tls.of(server.transport.get_extra_info("ssl_object") if server.transport else None)
        user = getattr(session, "sluice_user", None)
        # RFC 3848: ESMTPS with TLS, ESMTPA / ESMTPSA when authenticated
        with_ = protocol + ("S" if tls and protocol == "ESMTP" else "") + ("A" if user else "")
        received = (f"Received: from {session.host_name or 'unknown'} ([{peer[0]}])\r\n"
                    f"\tby {self.settings.smtp.hostname} (Sluice) with {with_};\r\n"
                    f"\t{_rfc2822_now()}\r\n").encode("utf-8", "replace")
        message = received + body
        if self.dkim is not None:
            try:
                message = self.dkim.sign(message)
            except self.dkim.Error as exc:
                log.warning("DKIM signing failed, answered 451: %s", exc)
                return f"451 4.3.0 Cannot DKIM-sign the message ({exc}), try again later"
        try:
            accepted = await self.intake.accept(
                message, "" if envelope.mail_from == "<>" else envelope.mail_from or "",
                list(envelope.rcpt_tos),
                protocol=protocol, peer=(session.host_name or "", str(peer[0])),
                session_id=getattr(session, "sluice_id", None), tls=tls,
                authn_id=user.name if user else None, tenant=user.tenant if user else None)
        except AddressError as exc:
            return f"554 5.1.3 {exc}"
        except Exception:
            log.exception("storing a message failed")
            return "451 4.3.0 Temporary failure storing the message, try again later"
        return f"250 2.0.0 OK queued as {accepted.ids[0]}" + (
            f" (+{len(accepted.ids) - 1})" if len(accepted.ids) > 1 else "")


def credentials(settings: Settings) -> Credentials | None:
    """The auth_file's users; argon2 and bcrypt are loaded only when there is one."""
    if not settings.smtp.auth_file:
        return None
    from .auth import Credentials
    return Credentials.load(settings.smtp.auth_file)


def dkim_signer(settings: Settings) -> DkimSigner | None:
    """The DKIM signer when some domain has a key; dkimpy (and its share of
    every process's memory) is loaded only then."""
    if not settings.dkim:
        return None
    from .dkim import DkimSigner
    return DkimSigner(settings)


async def _auth_response(server: SMTP, initial: str | None, challenge: str) -> bytes | None:
    """The client's decoded answer: the initial response ("=" is empty), or
    the answer to a 334 ``challenge``; None when the client aborted or sent
    bad base64 (the 501 is already sent)."""
    if initial is None:
        blob = await server.challenge_auth(challenge)
        return None if blob is MISSING else blob  # type: ignore[return-value]
    if initial == "=":
        return b""
    try:
        return base64.b64decode(initial, validate=True)
    except binascii.Error:
        await server.push("501 5.5.2 Can't decode base64")
        return None


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

    tls_context = server_context(settings)

    def factory() -> SluiceSMTP:
        proto = SluiceSMTP(handler, hostname=s.hostname, ident="Sluice ESMTP",
                           data_size_limit=s.max_message_size, timeout=s.idle_timeout, loop=loop,
                           tls_context=tls_context, require_tls=s.require_tls)
        sessions.add(proto)
        return proto

    return await loop.create_server(factory, sock=sock, backlog=1024)
