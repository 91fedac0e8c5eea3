"""TLS on delivery: which mode a message needs, and how a connection gets it.

Modes (``[delivery] tls``, per recipient domain in ``[tls]``):

- ``opportunistic``: STARTTLS when the peer offers it, any certificate
  (RFC 7435). A handshake that breaks fails that attempt; the host then gets
  plain text for ``PlainFallback.SECONDS``, so a peer with a broken TLS stack
  still gets its mail, one retry later.
- ``required``: STARTTLS, and a certificate valid for the host name we
  connected to (the MX name or the route's host), checked against the
  system's CAs plus ``[delivery] tls_ca_file``. Never plain text.
- ``required_insecure``: STARTTLS, any certificate. Never plain text.
- ``disabled``: never STARTTLS.

A connection only carries mail of one mode (the ready queues are per site
and mode, see ``dispatch``), so the mode is decided once per connection.
The SSL contexts are built once per process, at start: loading the system's
CAs for every connection would cost more than the handshake (the verifying
context, and ``tls_ca_file``, only when some domain is ``required``).

Failures are ``TlsFailure`` with the response the records show, in the
codes Postfix uses: 4.7.4 when TLS cannot be started (not offered, or the
peer refuses STARTTLS), 4.7.5 when the handshake or the certificate check
fails (RFC 3463 "cryptographic failure").
"""

from __future__ import annotations

import re
import ssl
import time
from collections.abc import Callable

import aiosmtplib

from ..config import ConfigError, DeliverySettings, TlsMode
from ..logs import Response


# What OpenSSL errors end with: the line of CPython's C source that raised them.
_SSL_SOURCE = re.compile(r" \(_ssl\.c:\d+\)$")


class TlsFailure(Exception):
    """TLS could not be had as the mode requires: the attempt fails transiently
    and nothing was sent in clear; the session is not used again."""

    def __init__(self, response: Response) -> None:
        super().__init__(response.text)
        self.response = response


def _client_context(verify: bool, ca_file: str | None) -> ssl.SSLContext:
    """A client context with TLS 1.2 at least; ``verify``: the system's CAs
    plus ``ca_file``, and the peer's name checked."""
    if verify:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        if ca_file is not None:
            try:
                context.load_verify_locations(cafile=ca_file)
            except ssl.SSLError as exc:
                # Readable (config checked that) but unusable: a bad configuration,
                # which stops the start like an unusable DKIM key.
                raise ConfigError(f"delivery.tls_ca_file {ca_file!r}: no CA certificate "
                                  f"could be loaded from it ({exc.reason or exc})") from None
    else:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


class PlainFallback:
    """Hosts (host, port) whose opportunistic TLS handshake failed: they get
    plain text for ``SECONDS``. In memory, so a restart forgets them."""

    SECONDS = 3600.0

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._until: dict[tuple[str, int], float] = {}

    def remember(self, host: str, port: int) -> None:
        self._until[(host, port)] = self._clock() + self.SECONDS

    def __contains__(self, hostport: tuple[str, int]) -> bool:
        until = self._until.get(hostport)
        if until is None:
            return False
        if until <= self._clock():
            del self._until[hostport]
            return False
        return True


class TlsPolicy:
    """The TLS of one process's outbound connections: the mode of each
    destination domain, the SSL contexts, the hosts that get plain text."""

    def __init__(self, delivery: DeliverySettings, per_domain: dict[str, TlsMode]) -> None:
        self.default: TlsMode = delivery.tls
        # Only the overrides that change something: with none, every message
        # takes the default without a lookup.
        self.per_domain = {d: m for d, m in per_domain.items() if m != delivery.tls}
        self.insecure = _client_context(False, None)
        # Loading the system's CAs costs tens of ms and a MB: only when used.
        self.verified = (_client_context(True, delivery.tls_ca_file)
                         if "required" in (self.default, *self.per_domain.values()) else None)
        self.plain_hosts = PlainFallback()

    def mode_for(self, domain: str) -> TlsMode:
        """The mode of mail to ``domain`` (a normalized recipient domain)."""
        return self.per_domain.get(domain, self.default)

    async def start(self, smtp: aiosmtplib.SMTP, host: str, port: int, mode: TlsMode) -> None:
        """Bring a greeted session (EHLO done) to the TLS ``mode`` asks for;
        TlsFailure when it cannot be had. The session may stay plain only in
        ``opportunistic`` and ``disabled`` modes."""
        if mode == "disabled":
            return
        where = f"{host}:{port}"
        if mode == "opportunistic" and (host, port) in self.plain_hosts:
            return
        if not smtp.supports_extension("starttls"):
            if mode == "opportunistic":
                return
            raise TlsFailure(Response(451, f"STARTTLS is required (tls = {mode}) but {where} "
                                      "does not offer it", (4, 7, 4), "STARTTLS"))
        context = self.insecure
        if mode == "required":
            assert self.verified is not None  # built when a mode is "required"
            context = self.verified
        try:
            await smtp.starttls(server_hostname=host, tls_context=context)
        except aiosmtplib.SMTPResponseException as exc:
            # Refused: the session goes on in plain text, if the mode allows.
            if mode == "opportunistic":
                return
            refusal = f"{exc.code} {exc.message}".replace("\r", " ").replace("\n", " ")
            raise TlsFailure(Response(451, f"STARTTLS is required (tls = {mode}) but {where} "
                                      f"refused it: {refusal}", (4, 7, 4), "STARTTLS")) from None
        except ssl.SSLCertVerificationError as exc:
            smtp.close()
            reason = exc.verify_message or exc.reason or str(exc)
            raise TlsFailure(Response(451, f"TLS certificate of {where} failed verification: "
                                      f"{reason}", (4, 7, 5), "STARTTLS")) from None
        except (aiosmtplib.SMTPException, OSError) as exc:
            # A broken handshake leaves the session unusable.
            smtp.close()
            if mode == "opportunistic":
                self.plain_hosts.remember(host, port)
            reason = _SSL_SOURCE.sub("", str(exc)) or type(exc).__name__
            then = (f"; the next attempt to {where} goes in plain text"
                    if mode == "opportunistic" else "")
            raise TlsFailure(Response(451, f"TLS handshake with {where} failed: {reason}{then}",
                                      (4, 7, 5), "STARTTLS")) from None
