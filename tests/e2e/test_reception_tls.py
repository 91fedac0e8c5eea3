"""STARTTLS on reception, through real `sluice serve` processes: the
self-signed default, a configured certificate, require_tls, TLS 1.2 as the
floor, and hostile TLS input (RFC 3207's command injection included)."""

from __future__ import annotations

import smtplib
import socket
import ssl
import subprocess

import pytest

from ..support import BIN, make_certificate, wait_for

ROUTES = {"example.com": "127.0.0.1:9"}  # nothing listens: mail stays queued


def client_context() -> ssl.SSLContext:
    """A client that encrypts without checking the certificate, like an MTA
    doing opportunistic TLS."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def reply(sock: socket.socket | ssl.SSLSocket) -> bytes:
    """One whole SMTP reply (all its lines)."""
    data = b""
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            return data
        data += chunk
        lines = data.split(b"\r\n")
        if len(lines) > 1 and len(lines[-2]) >= 4 and lines[-2][3:4] == b" ":
            return data


def plain_session(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    assert reply(s).startswith(b"220")
    s.sendall(b"EHLO client.test\r\n")
    assert b"STARTTLS" in reply(s)
    return s


def body_of(srv, msg_id: str) -> str:
    r = srv.api("GET", f"/api/admin/inspect-message/v1?id={msg_id}&want_body=true")
    assert r.status_code == 200, r.text
    return r.json()["body"]


def test_the_default_server_offers_starttls_with_a_self_signed_certificate(make_serve):
    srv = make_serve(routes=ROUTES).start()
    with smtplib.SMTP("127.0.0.1", srv.smtp_port, timeout=10) as c:
        c.ehlo("client.test")
        assert c.has_extn("starttls")
        code, _ = c.starttls(context=client_context())
        assert code == 220
        assert c.sock.version() in ("TLSv1.2", "TLSv1.3")
        cert = ssl.DER_cert_to_PEM_cert(c.sock.getpeercert(binary_form=True))
        c.ehlo("client.test")
        assert not c.has_extn("starttls")  # not offered twice
        c.sendmail("a@example.org", ["r@example.com"], b"Subject: tls\r\n\r\nhi\r\n")
    # made on first start under <data_dir>/tls, for [smtp] hostname
    assert (srv.data / "tls" / "cert.pem").read_text() == cert
    from cryptography import x509
    subject = x509.load_pem_x509_certificate(cert.encode()).subject.rfc4514_string()
    assert subject == "CN=mta.test"
    rec = wait_for(lambda: srv.records("Reception"))[0]
    assert rec["tls_protocol_version"] in ("TLSv1.2", "TLSv1.3")
    assert rec["tls_cipher"]
    assert "with ESMTPS;" in body_of(srv, rec["id"])
    # a restart keeps the certificate
    srv.stop()
    srv.start()
    assert (srv.data / "tls" / "cert.pem").read_text() == cert


def test_plain_text_sessions_have_no_tls_fields(make_serve):
    srv = make_serve(routes=ROUTES).start()
    srv.send(["r@example.com"])
    rec = wait_for(lambda: srv.records("Reception"))[0]
    assert "tls_cipher" not in rec and "tls_protocol_version" not in rec
    assert "with ESMTP;" in body_of(srv, rec["id"])


def test_a_configured_certificate_is_the_one_presented(make_serve, tmp_path):
    cert, key = make_certificate(tmp_path, "mx.configured.example")
    srv = make_serve(routes=ROUTES, smtp=f'tls_certificate = "{cert}"\n'
                                        f'tls_private_key = "{key}"').start()
    with smtplib.SMTP("127.0.0.1", srv.smtp_port, timeout=10) as c:
        c.starttls(context=client_context())
        der = c.sock.getpeercert(binary_form=True)
    assert ssl.DER_cert_to_PEM_cert(der) == cert.read_text()
    assert not (srv.data / "tls").exists()


def test_require_tls_refuses_mail_before_starttls(make_serve):
    srv = make_serve(routes=ROUTES, smtp="require_tls = true").start()
    with smtplib.SMTP("127.0.0.1", srv.smtp_port, timeout=10) as c:
        c.ehlo("client.test")
        code, text = c.mail("a@example.org")
        assert (code, text) == (530, b"5.7.0 Must issue a STARTTLS command first")
        c.starttls(context=client_context())
        c.ehlo("client.test")
        assert c.mail("a@example.org")[0] == 250
        assert c.rcpt("r@example.com")[0] == 250
        assert c.data(b"Subject: x\r\n\r\nbody\r\n")[0] == 250
    assert len(wait_for(lambda: srv.records("Reception"))) == 1


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
def test_tls_below_1_2_is_refused(make_serve):
    srv = make_serve(routes=ROUTES).start()
    old = client_context()
    old.minimum_version = ssl.TLSVersion.TLSv1
    old.maximum_version = ssl.TLSVersion.TLSv1_1
    old.set_ciphers("DEFAULT:@SECLEVEL=0")
    s = plain_session(srv.smtp_port)
    s.sendall(b"STARTTLS\r\n")
    assert reply(s).startswith(b"220 2.0.0")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        old.wrap_socket(s).do_handshake()
    s.close()
    # the same client allowed TLS 1.2 gets through: the version was the reason
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    s = plain_session(srv.smtp_port)
    s.sendall(b"STARTTLS\r\n")
    reply(s)
    t = old.wrap_socket(s)
    assert t.version() == "TLSv1.2"
    t.close()


def test_commands_pipelined_after_starttls_are_discarded(make_serve):
    """RFC 3207, section 5: plaintext sent after STARTTLS, before the
    handshake, must never be executed as if it came over TLS."""
    srv = make_serve(routes=ROUTES).start()
    s = plain_session(srv.smtp_port)
    s.sendall(b"STARTTLS\r\nMAIL FROM:<injected@evil.example>\r\n")
    assert reply(s).startswith(b"220 2.0.0")
    t = client_context().wrap_socket(s)
    t.sendall(b"EHLO client.test\r\n")
    assert reply(t).startswith(b"250-")
    t.sendall(b"RCPT TO:<r@example.com>\r\n")
    assert reply(t).startswith(b"503 5.5.1")  # no MAIL was given over TLS
    t.sendall(b"QUIT\r\n")
    reply(t)
    t.close()
    assert srv.records("Reception") == []


def test_starttls_twice_is_refused(make_serve):
    srv = make_serve(routes=ROUTES).start()
    with socket.create_connection(("127.0.0.1", srv.smtp_port), timeout=10) as s:
        reply(s)
        s.sendall(b"STARTTLS\r\n")  # before EHLO
        assert reply(s).startswith(b"503 5.5.1")
    s = plain_session(srv.smtp_port)
    s.sendall(b"STARTTLS\r\n")
    reply(s)
    t = client_context().wrap_socket(s)
    t.sendall(b"EHLO client.test\r\nSTARTTLS\r\n")
    ehlo = reply(t)
    assert b"STARTTLS" not in ehlo
    assert reply(t).startswith(b"503 5.5.1")
    t.sendall(b"NOOP\r\n")
    assert reply(t).startswith(b"250")  # the session goes on
    t.close()


@pytest.mark.parametrize("garbage", [b"\x00" * 600, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
                                     b"\x16\x03\x01\x00\x05hello"])
def test_garbage_instead_of_a_client_hello_closes_the_session(make_serve, garbage):
    srv = make_serve(routes=ROUTES).start()
    s = plain_session(srv.smtp_port)
    s.sendall(b"STARTTLS\r\n")
    reply(s)
    s.sendall(garbage)
    s.settimeout(20)
    rest = b""
    while True:  # the server ends the connection; whatever it sends is a TLS alert
        chunk = s.recv(4096)
        if not chunk:
            break
        rest += chunk
    assert b"250" not in rest
    s.close()
    # the server is unharmed
    srv.send(["r@example.com"])
    assert len(wait_for(lambda: srv.records("Reception"))) == 1


def test_a_client_stalling_mid_handshake_is_disconnected(make_serve):
    srv = make_serve(routes=ROUTES, smtp='idle_timeout = "2s"').start()
    s = plain_session(srv.smtp_port)
    s.sendall(b"STARTTLS\r\n")
    reply(s)
    s.sendall(b"\x16\x03\x01")  # the start of a ClientHello, then nothing
    s.settimeout(30)
    assert s.recv(4096) == b""  # closed by the server (bounded by the idle timeout)
    s.close()
    srv.send(["r@example.com"])


def _start_fails(make_serve, smtp: str) -> str:
    srv = make_serve(routes=ROUTES, smtp=smtp)
    r = subprocess.run([BIN / "sluice", "serve", "--config", str(srv.config)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "sluice: bad configuration:" in r.stderr
    return r.stderr


def test_a_bad_certificate_stops_the_server_at_start(make_serve, tmp_path):
    cert, key = make_certificate(tmp_path, "a.example")
    other_cert, _ = make_certificate(tmp_path, "b.example")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    # a key that does not belong to the certificate
    err = _start_fails(make_serve, f'tls_certificate = "{other_cert}"\ntls_private_key = "{key}"')
    assert "smtp.tls_certificate" in err and "not a usable PEM certificate" in err
    # not PEM at all
    err = _start_fails(make_serve, f'tls_certificate = "{garbage}"\ntls_private_key = "{key}"')
    assert "smtp.tls_certificate" in err and str(garbage) in err
    # a file that is not there: a configuration error naming the key
    err = _start_fails(make_serve, f'tls_certificate = "{tmp_path}/none.pem"\n'
                                   f'tls_private_key = "{key}"')
    assert "smtp.tls_certificate: cannot read" in err and "none.pem" in err
    # one without the other
    err = _start_fails(make_serve, f'tls_certificate = "{cert}"')
    assert "tls_private_key must be set too" in err
    # the key material never appears in an error
    assert key.read_text().splitlines()[1] not in err
