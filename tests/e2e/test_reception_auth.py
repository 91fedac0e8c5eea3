"""SMTP AUTH through real `sluice serve` processes, real clients (swaks,
Postfix as a relaying client with SASL over TLS) and `sluice passwd`."""

from __future__ import annotations

import base64
import smtplib
import socket
import subprocess
from pathlib import Path

import pytest

from ..support import BIN, wait_for
from ..support.peers import Postfix
from .test_reception_tls import client_context, reply

ROUTES = {"example.com": "127.0.0.1:9"}  # nothing listens: mail stays queued
# 127.0.0.1 is not trusted to relay: only an authenticated client may.
NO_RELAY = 'relay_hosts = []\nauth_file = "{}"'


def passwd(user: str, password: str, *args: str) -> str:
    r = subprocess.run([BIN / "sluice", "passwd", user, *args], input=password + "\n",
                       capture_output=True, text=True, timeout=60, check=True)
    return r.stdout.strip()


@pytest.fixture(scope="module")
def auth_lines() -> list[str]:
    return [passwd("alice", "s3cret pass", "--tenant", "acme"),
            passwd("bob", "hunter2", "--scheme", "bcrypt")]


@pytest.fixture
def auth_file(tmp_path, auth_lines) -> Path:
    p = tmp_path / "auth"
    p.write_text("# users\n" + "\n".join(auth_lines) + "\n")
    return p


def swaks(port: int, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["swaks", "--server", f"127.0.0.1:{port}", "--from", "app@example.org",
                           "--to", "r@example.com", "--header", "X-Tenant: other",
                           "--tls", *args], capture_output=True, text=True, timeout=60)


def test_passwd_prints_lines_the_server_accepts(auth_lines):
    alice, bob = auth_lines
    assert alice.startswith("alice:$argon2id$") and alice.endswith(":acme")
    assert bob.startswith("bob:$2b$") and bob.count(":") == 1
    assert "s3cret" not in alice and "hunter2" not in bob
    bad = subprocess.run([BIN / "sluice", "passwd", "a:b"], input="x\n", capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "cannot be a user name" in bad.stderr
    empty = subprocess.run([BIN / "sluice", "passwd", "carol"], input="\n", capture_output=True,
                           text=True, timeout=60)
    assert empty.returncode == 2 and "empty password" in empty.stderr


@pytest.mark.parametrize("mechanism,user,password", [("PLAIN", "alice", "s3cret pass"),
                                                     ("LOGIN", "bob", "hunter2")])
def test_an_authenticated_client_relays_and_its_tenant_is_forced(
        make_serve, auth_file, mechanism, user, password):
    srv = make_serve(routes=ROUTES, smtp=NO_RELAY.format(auth_file)).start()
    r = swaks(srv.smtp_port, "--auth", mechanism, "--auth-user", user,
              "--auth-password", password)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "235 2.7.0 Authentication successful" in r.stdout
    rec = wait_for(lambda: srv.records("Reception"))[0]
    assert rec["meta"]["authn_id"] == user
    assert rec["tls_protocol_version"] in ("TLSv1.2", "TLSv1.3")
    if user == "alice":  # her line names a tenant: it wins over X-Tenant
        assert rec["queue"] == "acme@example.com" and rec["meta"]["tenant"] == "acme"
    else:
        assert rec["queue"] == "other@example.com"
    body = srv.api("GET", f"/api/admin/inspect-message/v1?id={rec['id']}&want_body=true")
    assert "with ESMTPSA;" in body.json()["body"]


def test_without_auth_the_client_may_not_relay(make_serve, auth_file):
    srv = make_serve(routes=ROUTES, smtp=NO_RELAY.format(auth_file)).start()
    r = swaks(srv.smtp_port)
    assert "550 5.7.1 Relaying denied" in r.stdout
    assert srv.records("Reception") == []


def _auth_plain(sock, user: str, password: str) -> bytes:
    token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
    sock.sendall(f"AUTH PLAIN {token}\r\n".encode())
    return reply(sock)


def _tls_session(port: int):
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    reply(s)
    s.sendall(b"EHLO client.test\r\n")
    reply(s)
    s.sendall(b"STARTTLS\r\n")
    reply(s)
    t = client_context().wrap_socket(s)
    t.sendall(b"EHLO client.test\r\n")
    assert b"AUTH LOGIN PLAIN" in reply(t)
    return t


def test_bad_credentials_get_535_and_five_failures_end_the_session(make_serve, auth_file):
    srv = make_serve(routes=ROUTES, smtp=NO_RELAY.format(auth_file)).start()
    t = _tls_session(srv.smtp_port)
    answers = [_auth_plain(t, user, pw) for user, pw in
               [("alice", "wrong"), ("nobody", "s3cret pass"), ("bob", "s3cret pass"),
                ("alice", "S3CRET PASS")]]
    assert all(a.startswith(b"535 5.7.8 ") for a in answers), answers
    fifth = _auth_plain(t, "alice", "again wrong")
    assert fifth.startswith(b"535 5.7.8 ")
    if b"421" not in fifth:
        fifth += reply(t)
    assert b"421 4.7.0" in fifth
    assert t.recv(100) == b""  # disconnected
    t.close()
    # a good password on a new session still works
    t = _tls_session(srv.smtp_port)
    assert _auth_plain(t, "alice", "s3cret pass").startswith(b"235 2.7.0")
    t.close()
    # no password reaches a log
    logs = srv.log.read_text() + "".join(p.read_text() for p in (srv.data / "logs").glob("*"))
    for secret in ("wrong", "s3cret", "S3CRET", "again"):
        assert secret not in logs
    assert "AUTH PLAIN failed for 'alice'" in srv.log.read_text()


def test_malformed_auth_exchanges_get_clear_errors(make_serve, auth_file):
    srv = make_serve(routes=ROUTES, smtp=NO_RELAY.format(auth_file)).start()
    t = _tls_session(srv.smtp_port)
    t.sendall(b"AUTH PLAIN !!!notbase64\r\n")
    assert reply(t).startswith(b"501 5.5.2")
    t.sendall(b"AUTH PLAIN " + base64.b64encode(b"only-one-part") + b"\r\n")
    assert reply(t).startswith(b"501 5.5.2")
    t.sendall(b"AUTH CRAM-MD5\r\n")
    assert reply(t).startswith(b"504 5.5.4")
    t.sendall(b"AUTH LOGIN\r\n")
    assert reply(t).startswith(b"334 ")
    t.sendall(b"*\r\n")  # the client aborts (RFC 4954)
    assert reply(t).startswith(b"501 5.7.0")
    t.sendall(b"AUTH login\r\n")  # mechanism names are case-insensitive
    assert reply(t) == b"334 " + base64.b64encode(b"Username:") + b"\r\n"
    t.sendall(base64.b64encode(b"bob") + b"\r\n")
    assert reply(t) == b"334 " + base64.b64encode(b"Password:") + b"\r\n"
    t.sendall(base64.b64encode(b"hunter2") + b"\r\n")
    assert reply(t).startswith(b"235 2.7.0")
    t.sendall(b"AUTH PLAIN\r\n")
    assert reply(t).startswith(b"503")  # already authenticated
    t.close()


def test_auth_is_not_offered_without_an_auth_file(make_serve):
    srv = make_serve(routes=ROUTES).start()
    with smtplib.SMTP("127.0.0.1", srv.smtp_port, timeout=10) as c:
        c.starttls(context=client_context())
        c.ehlo("client.test")
        assert not c.has_extn("auth")
        assert c.docmd("AUTH PLAIN AGEAYg==") == (503, b"5.5.1 Error: authentication not enabled")


def _local_address() -> str | None:
    """An address of this machine that is not loopback, if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent
            addr = s.getsockname()[0]
        except OSError:
            return None
    return None if addr.startswith("127.") else addr


def test_auth_needs_tls_except_on_loopback(make_serve, auth_file, tmp_path):
    # on loopback: offered and accepted in plain text
    srv = make_serve(routes=ROUTES, smtp=NO_RELAY.format(auth_file)).start()
    with smtplib.SMTP("127.0.0.1", srv.smtp_port, timeout=10) as c:
        c.ehlo("client.test")
        assert c.has_extn("auth")
        c.login("alice", "s3cret pass")
    srv.stop()
    addr = _local_address()
    if addr is None:
        pytest.skip("this machine has no address other than loopback")
    # from another address: not offered before STARTTLS, and refused
    srv = make_serve(routes=ROUTES, smtp=f'relay_hosts = []\nauth_file = "{auth_file}"')
    srv.config.write_text(srv.config.read_text().replace(
        f'listen = ["127.0.0.1:{srv.smtp_port}"]', f'listen = ["{addr}:{srv.smtp_port}"]'))
    srv.proc = subprocess.Popen([BIN / "sluice", "serve", "--config", str(srv.config)],
                                stdout=open(srv.log, "ab"), stderr=subprocess.STDOUT)
    wait_for(lambda: _can_connect(addr, srv.smtp_port))
    with smtplib.SMTP(addr, srv.smtp_port, timeout=10) as c:
        c.ehlo("client.test")
        assert not c.has_extn("auth")
        assert c.docmd("AUTH PLAIN AGFsaWNlAHMzY3JldCBwYXNz")[0] == 538
        c.starttls(context=client_context())
        c.ehlo("client.test")
        assert c.has_extn("auth")
        c.login("alice", "s3cret pass")


def _can_connect(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1) as s:
            return s.recv(3) == b"220"
    except OSError:
        return False


@pytest.mark.parametrize("content,expected", [
    ("alice\n", "line 1: expected 'user:hash'"),
    ("alice:plaintext-password\n", "line 1: user 'alice': the password is not an argon2 or bcrypt"),
    ("# c\nalice:$2b$12$abc\nalice:$2b$12$abc\n", "line 3: user 'alice' is listed twice"),
])
def test_a_bad_auth_file_stops_the_server_at_start(make_serve, tmp_path, content, expected):
    bad = tmp_path / "bad-auth"
    bad.write_text(content)
    srv = make_serve(routes=ROUTES, smtp=f'auth_file = "{bad}"')
    r = subprocess.run([BIN / "sluice", "serve", "--config", str(srv.config)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "bad configuration" in r.stderr and f"smtp.auth_file {bad}" in r.stderr and expected in r.stderr
    assert "plaintext-password" not in r.stderr


def test_postfix_relays_to_sluice_over_tls_with_sasl(make_serve, auth_file):
    """Postfix, a client we did not write, with smtp_tls_security_level =
    encrypt and SASL: the mail arrives authenticated and encrypted."""
    srv = make_serve(routes=ROUTES, smtp=NO_RELAY.format(auth_file)).start()
    pf = Postfix(
        relayhost=f"[127.0.0.1]:{srv.smtp_port}",
        defer_transports="",
        smtp_tls_security_level="encrypt",
        smtp_sasl_auth_enable="yes",
        smtp_sasl_password_maps="static:{alice:s3cret pass}",
        smtp_sasl_security_options="noanonymous",
        smtp_sasl_tls_security_options="noanonymous",
    ).start()
    try:
        with smtplib.SMTP("127.0.0.1", pf.port, timeout=30) as c:
            c.sendmail("app@example.org", ["r@example.com"],
                       b"From: app@example.org\r\nSubject: via postfix\r\n\r\nhello\r\n")
        rec = wait_for(lambda: srv.records("Reception"), timeout=60)[0]
    finally:
        log = pf.log()
        pf.stop()
    assert rec["meta"]["authn_id"] == "alice", log
    assert rec["queue"] == "acme@example.com"
    assert rec["tls_protocol_version"] in ("TLSv1.2", "TLSv1.3")
    assert "status=sent" in log
