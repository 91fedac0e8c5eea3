"""Hostile SMTP input: the server answers well-formed replies or closes, and never dies."""

from __future__ import annotations

import re
import resource
import socket
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ..support import Serve, free_port, wait_for

REPLY = re.compile(rb"^[2-5][0-9]{2}([ -].*)?$")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    srv = Serve(tmp, routes={"example.com": f"127.0.0.1:{free_port()}"},
                queue='retry_interval = "1h"')
    srv.config.write_text(srv.config.read_text().replace(
        'hostname = "mta.test"', 'hostname = "mta.test"\nmax_message_size = 100000\nidle_timeout = "3s"'))
    srv.start()
    yield srv
    srv.stop()


def exchange(port: int, payload: bytes, wait: float = 0.5) -> list[bytes]:
    """Send ``payload`` after the greeting; return every reply line until quiet or closed."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.settimeout(5)
        data = b""
        while b"\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
        try:
            sock.sendall(payload)
        except OSError:
            pass
        sock.settimeout(wait)
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except (TimeoutError, socket.timeout, ConnectionResetError):
            pass
    assert data.endswith(b"\r\n"), data[-200:]
    return data[:-2].split(b"\r\n")


def assert_alive(srv: Serve) -> None:
    lines = exchange(srv.smtp_port, b"EHLO ok.test\r\nNOOP\r\nQUIT\r\n")
    assert lines[0].startswith(b"220") and lines[-1].startswith(b"221"), lines
    assert srv.api("GET", "/api/check-liveness/v1").status_code == 200


COMMANDS = st.sampled_from([
    b"EHLO fuzz.test", b"HELO fuzz.test", b"MAIL FROM:<a@example.org>", b"MAIL FROM:<>",
    b"RCPT TO:<x@example.com>", b"RCPT TO:<@@@>", b"DATA", b"RSET", b"NOOP", b"QUIT",
    b"VRFY x", b"STARTTLS", b"AUTH PLAIN", b"MAIL FROM:<a@example.org> SIZE=999999999",
    b"RCPT TO:<x@example.com> NOTIFY=NEVER", b".", b"Subject: x", b"",
])
JUNK = st.one_of(
    st.binary(max_size=300),
    st.binary(min_size=1001, max_size=5000),               # over-long line
    st.builds(lambda b: b.replace(b"\r", b"") + b"\n", st.binary(max_size=50)),  # bare LF
    st.builds(lambda b: b + b"\r", st.binary(max_size=50)),                       # bare CR
    st.builds(lambda b: b"\x00" + b, st.binary(max_size=50)),                     # NUL bytes
)
LINE = st.one_of(COMMANDS.map(lambda c: c + b"\r\n"), JUNK)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(LINE, max_size=25))
def test_fuzzed_command_sequences(server, lines):
    replies = exchange(server.smtp_port, b"".join(lines), wait=0.3)
    for line in replies:
        assert REPLY.match(line), line


def test_fuzz_left_the_server_alive(server):
    assert_alive(server)


def test_pipelined_garbage_then_valid_transaction(server):
    payload = (b"EHLO p.test\r\nGARBAGE\r\n\x00\x01\x02\r\nMAIL FROM:<a@example.org>\r\n"
               b"RCPT TO:<piped@example.com>\r\nDATA\r\nSubject: p\r\n\r\nbody\r\n.\r\nQUIT\r\n")
    replies = exchange(server.smtp_port, payload)
    codes = [r[:3] for r in replies if not r[3:4] == b"-"]
    assert codes == [b"220", b"250", b"500", b"500", b"250", b"250", b"354", b"250", b"221"]
    wait_for(lambda: "piped@example.com" in server.by_recipient("Reception"))


def test_oversize_data_is_refused(server):
    body = (b"y" * 998 + b"\r\n") * 150  # 150 KB > max_message_size 100 KB
    payload = (b"EHLO big.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<big@example.com>\r\nDATA\r\n"
               + body + b".\r\nNOOP\r\n")
    replies = exchange(server.smtp_port, payload, wait=1.0)
    assert any(r.startswith(b"552 5.3.4") for r in replies), replies
    assert replies[-1].startswith(b"250")  # the session goes on
    assert "big@example.com" not in server.by_recipient("Reception")


def test_client_stopping_mid_data_stores_nothing(server):
    with socket.create_connection(("127.0.0.1", server.smtp_port), timeout=5) as sock:
        sock.recv(1024)
        sock.sendall(b"EHLO gone.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<gone@example.com>\r\n"
                     b"DATA\r\nSubject: half\r\n\r\nhalf a mess")
        replies = b""
        while b"354 " not in replies:  # the server is reading the data
            chunk = sock.recv(4096)
            assert chunk, replies
            replies += chunk
    # a whole message after it is stored; the half one never is
    server.send(["marker@example.com"])
    wait_for(lambda: "marker@example.com" in server.by_recipient("Reception"))
    assert "gone@example.com" not in server.by_recipient("Reception")
    assert_alive(server)


def _rss_mb(pid: int) -> float:
    """RSS of the server: its main process and its reception and delivery processes."""
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) / 1024
        todo.extend(int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split())
    return total


def test_thousand_idle_connections(server):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    rss_before = _rss_mb(server.proc.pid)
    idle = []
    try:
        for _ in range(1000):
            s = socket.create_connection(("127.0.0.1", server.smtp_port), timeout=10)
            idle.append(s)
        for s in idle[:50]:
            assert s.recv(1024).startswith(b"220")
        # others are still served while 1,000 sessions sit idle
        assert_alive(server)
        assert _rss_mb(server.proc.pid) - rss_before < 150
        # the idle timeout (3s in this config) reclaims them: each is closed by the server
        closed = 0
        for s in idle:
            s.settimeout(15)
            try:
                data = b""
                while chunk := s.recv(4096):
                    data += chunk
                closed += 1
            except (TimeoutError, socket.timeout):
                pass
            except ConnectionResetError:
                closed += 1
        assert closed == 1000
    finally:
        for s in idle:
            s.close()
    assert_alive(server)


ENHANCED = re.compile(rb"^[245][0-9]{2} [245]\.[0-9]{1,3}\.[0-9]{1,3} ")


def test_every_reply_after_ehlo_carries_an_enhanced_code(server):
    """RFC 2034: all but the greeting, the HELO/EHLO answers and 354."""
    lines = exchange(server.smtp_port, b"EHLO me.test\r\nHELP\r\nVRFY someone\r\nSTARTTLS x\r\n"
                                       b"AUTH PLAIN\r\nNOOP\r\nRSET\r\nXYZZY\r\nQUIT\r\n")
    replies = [x for x in lines[1:] if not x.startswith(b"250-") and x != b"250 HELP"]
    assert [x[:3] for x in replies] == [b"250", b"252", b"501", b"503", b"250", b"250", b"500",
                                        b"221"]
    assert all(ENHANCED.match(x) for x in replies), replies
    assert lines[0].startswith(b"220 mta.test ")
    assert exchange(server.smtp_port, b"HELO me.test\r\nQUIT\r\n")[1] == b"250 mta.test"


def test_replies_are_printable_ascii_whatever_the_client_sends(server):
    lines = exchange(server.smtp_port, b"EHLO me.test\r\nFO\x1bO\x00\x7f x\r\n"
                                       b"MAIL FROM:<a\x01@b.example>\r\nQUIT\r\n")
    for line in lines:
        assert all(0x20 <= c < 0x7F for c in line), line
    assert lines[-1].startswith(b"221")
    assert lines[-3] == b'500 5.5.2 Error: command "FO\\x1bO\\x00\\x7f" not recognized'
