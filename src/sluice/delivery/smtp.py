"""One outbound SMTP connection (aiosmtplib), reused for several messages.

Each connection carries mail of one TLS mode; ``tls.TlsPolicy`` brings the
session to it right after EHLO, or the connection fails (``TlsFailure``) and
nothing is sent. ``send`` calls ``may_send`` right before DATA:
the last chance for a bounce or suspend rule to stop the message. A message
whose envelope needs SMTPUTF8 (a non-ASCII local part) goes with SMTPUTF8
when the peer offers it, else it fails permanently with 5.6.7 (RFC 6531);
an internationalized domain alone is sent in its ASCII (A-label) form.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

import aiosmtplib
from cryptography import x509

from ..logs import Attempt, Response, Tls, parse_enhanced
from ..message import AddressError, normalize_domain
from .tls import TlsFailure

if TYPE_CHECKING:
    from ..config import TlsMode
    from .tls import TlsPolicy


class DeliveryError(Exception):
    """A failed attempt; ``response`` says how, ``connection_ok`` whether to reuse."""

    def __init__(self, response: Response, connection_ok: bool) -> None:
        super().__init__(response.text)
        self.response = response
        self.connection_ok = connection_ok

    @property
    def permanent(self) -> bool:
        return 500 <= self.response.code < 600


class Stopped(Exception):
    """``may_send`` said no: the message was not sent; the connection is reusable."""


def _response(code: int, message: str, command: str | None) -> Response:
    enhanced, text = parse_enhanced(message.replace("\n", " "))
    return Response(code, text, enhanced, command)


def _tls_of(smtp: aiosmtplib.SMTP) -> Tls | None:
    """The TLS a connection uses (None in plain text), with the peer
    certificate's subject as KumoMTA logs it (``["C=US", ..., "CN=mx..."]``)."""
    ssl_object = smtp.get_transport_info("ssl_object")
    if ssl_object is None:
        return None
    subject = None
    der = ssl_object.getpeercert(binary_form=True)
    if der:
        try:
            cert = x509.load_der_x509_certificate(der)
            subject = tuple(attr.rfc4514_string() for attr in cert.subject)
        except ValueError:
            subject = None
    return Tls.of(ssl_object, subject)


def _ascii_path(address: str) -> str | None:
    """``address`` as an ASCII path: an internationalized domain in its
    A-label form; None when the local part itself is not ASCII (that needs
    SMTPUTF8, RFC 6531)."""
    if address.isascii():
        return address
    local, at, domain = address.rpartition("@")
    if not at or not local.isascii():
        return None
    try:
        return f"{local}@{normalize_domain(domain)}"
    except AddressError:
        return None


async def _greet(smtp: aiosmtplib.SMTP) -> None:
    """EHLO, or HELO when the peer refuses EHLO (RFC 5321 section 3.2): the
    extensions must be known before STARTTLS and before the first MAIL."""
    try:
        await smtp.ehlo()
    except aiosmtplib.SMTPHeloError:
        if not smtp.is_connected:
            raise
        await smtp.helo()


class Connection:
    def __init__(self, helo: str, connect_timeout: float, command_timeout: float,
                 policy: TlsPolicy, mode: TlsMode) -> None:
        self._helo = helo
        self._connect_timeout = connect_timeout
        self._command_timeout = command_timeout
        self._policy = policy
        self._mode = mode
        self._smtp: aiosmtplib.SMTP | None = None
        self.peer: tuple[str, str] | None = None
        self.session_id: str | None = None
        self.tls: Tls | None = None
        self.sent = 0

    @property
    def is_open(self) -> bool:
        return self._smtp is not None and self._smtp.is_connected

    def attempt(self, site: str) -> Attempt:
        """What the records of an attempt on this connection say about it."""
        return Attempt(site, self.peer, self.session_id, self.tls)

    async def open(self, hosts: tuple[tuple[str, int], ...]) -> None:
        """Connect to the first host that answers and gives the TLS the mode
        asks for; DeliveryError if none does. After a TLS failure, ``peer``
        and ``session_id`` name the session that failed."""
        last = Response(451, "no hosts to connect to", (4, 4, 4), "connect")
        for host, port in hosts:
            self.peer = self.session_id = None
            smtp = aiosmtplib.SMTP(hostname=host, port=port, local_hostname=self._helo,
                                   timeout=self._command_timeout, start_tls=False)
            try:
                await smtp.connect(timeout=self._connect_timeout)
                addr = smtp.get_transport_info("peername")
                self.peer = (host, str(addr[0])) if addr else None
                self.session_id = str(uuid.uuid4())
                await _greet(smtp)
                await self._policy.start(smtp, host, port, self._mode)
                if smtp.get_transport_info("ssl_object") is not None:
                    await smtp.ehlo()  # RFC 3207: what the peer offers under TLS
            except TlsFailure as exc:
                smtp.close()
                last = exc.response
                continue
            except aiosmtplib.SMTPResponseException as exc:
                smtp.close()
                self.peer = self.session_id = None
                last = _response(exc.code if exc.code >= 400 else 421, exc.message, "connect")
                if last.code >= 500:  # a 5xx greeting still means "try later elsewhere"
                    last = Response(421, last.content, (4, 4, 2), "connect")
                continue
            except (aiosmtplib.SMTPException, OSError) as exc:
                smtp.close()
                self.peer = self.session_id = None
                last = Response(451, f"cannot connect to {host}:{port}: {exc}", (4, 4, 1),
                                "connect")
                continue
            self._smtp = smtp
            self.tls = _tls_of(smtp)
            return
        raise DeliveryError(last, connection_ok=False)

    async def send(self, sender: str, recipient: str, body: bytes,
                   may_send: Callable[[], bool]) -> Response:
        """Deliver one message; returns the 2xx response or raises."""
        smtp = self._smtp
        assert smtp is not None
        options = []
        if not body.isascii() and smtp.supports_extension("8bitmime"):
            options.append("BODY=8BITMIME")
        encoding = "ascii"
        ascii_sender, ascii_rcpt = _ascii_path(sender), _ascii_path(recipient)
        if ascii_sender is None or ascii_rcpt is None:
            if not smtp.supports_extension("smtputf8"):
                which = "recipient" if ascii_rcpt is None else "sender"
                raise DeliveryError(Response(
                    553, f"the {which} address is not ASCII and the destination does not "
                    "offer SMTPUTF8 (RFC 6531)", (5, 6, 7), "MAIL FROM"), connection_ok=True)
            options.append("SMTPUTF8")
            encoding = "utf-8"
        else:
            sender, recipient = ascii_sender, ascii_rcpt
        command = "MAIL FROM"
        try:
            await smtp.mail(sender, options=options, encoding=encoding)
            command = "RCPT TO"
            await smtp.rcpt(recipient, encoding=encoding)
            if not may_send():
                command = "RSET"
                await smtp.rset()
                raise Stopped()
            command = "."
            resp = await smtp.data(body)
        except Stopped:
            raise
        except aiosmtplib.SMTPResponseException as exc:
            if command != ".":
                try:
                    await smtp.rset()
                    ok = True
                except aiosmtplib.SMTPException:
                    ok = False
            else:
                ok = exc.code not in (421,)
            raise DeliveryError(_response(exc.code, exc.message, command), ok) from None
        except (aiosmtplib.SMTPException, OSError) as exc:
            await self.close()
            raise DeliveryError(Response(451, f"connection lost during {command}: {exc}",
                                         (4, 4, 2), command), connection_ok=False) from None
        self.sent += 1
        return _response(resp.code, resp.message, ".")

    async def close(self) -> None:
        smtp, self._smtp = self._smtp, None
        if smtp is None:
            return
        try:
            if smtp.is_connected:
                await smtp.quit(timeout=5)
        except (aiosmtplib.SMTPException, OSError):
            smtp.close()
