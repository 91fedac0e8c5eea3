"""One outbound SMTP connection (aiosmtplib), reused for several messages.

STARTTLS is used whenever the peer offers it, without certificate checks
(opportunistic TLS, RFC 7435). ``send`` calls ``may_send`` right before DATA:
the last chance for a bounce or suspend rule to stop the message.
"""

from __future__ import annotations

from collections.abc import Callable

import aiosmtplib

from ..logs import Response, parse_enhanced


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


class Connection:
    def __init__(self, helo: str, connect_timeout: float, command_timeout: float) -> None:
        self._helo = helo
        self._connect_timeout = connect_timeout
        self._command_timeout = command_timeout
        self._smtp: aiosmtplib.SMTP | None = None
        self.peer: tuple[str, str] = ("", "")
        self.sent = 0

    @property
    def is_open(self) -> bool:
        return self._smtp is not None and self._smtp.is_connected

    async def open(self, hosts: tuple[tuple[str, int], ...]) -> None:
        """Connect to the first host that answers; DeliveryError if none does."""
        last = Response(451, "no hosts to connect to", (4, 4, 4), "connect")
        for host, port in hosts:
            smtp = aiosmtplib.SMTP(hostname=host, port=port, local_hostname=self._helo,
                                   timeout=self._command_timeout, start_tls=None,
                                   validate_certs=False)
            try:
                await smtp.connect(timeout=self._connect_timeout)
            except aiosmtplib.SMTPResponseException as exc:
                last = _response(exc.code if exc.code >= 400 else 421, exc.message, "connect")
                if last.code >= 500:  # a 5xx greeting still means "try later elsewhere"
                    last = Response(421, last.content, (4, 4, 2), "connect")
                continue
            except (aiosmtplib.SMTPException, OSError) as exc:
                last = Response(451, f"cannot connect to {host}:{port}: {exc}", (4, 4, 1),
                                "connect")
                continue
            self._smtp = smtp
            addr = smtp.transport.get_extra_info("peername") if smtp.transport else None
            self.peer = (host, str(addr[0]) if addr else host)
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
        if not (sender.isascii() and recipient.isascii()) and smtp.supports_extension("smtputf8"):
            options.append("SMTPUTF8")
        command = "MAIL FROM"
        try:
            await smtp.mail(sender, options=options)
            command = "RCPT TO"
            await smtp.rcpt(recipient)
            if not may_send():
                command = "RSET"
                await smtp.rset()
                raise Stopped()
            command = "DATA"
            resp = await smtp.data(body)
        except Stopped:
            raise
        except aiosmtplib.SMTPResponseException as exc:
            if command != "DATA":
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
        return _response(resp.code, resp.message, "DATA")

    async def close(self) -> None:
        smtp, self._smtp = self._smtp, None
        if smtp is None:
            return
        try:
            if smtp.is_connected:
                await smtp.quit(timeout=5)
        except (aiosmtplib.SMTPException, OSError):
            smtp.close()
