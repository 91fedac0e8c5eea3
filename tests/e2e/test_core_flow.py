"""End to end: real ``sluice serve`` and ``sluice sink`` processes, smtplib as the client."""

from __future__ import annotations

import smtplib
import socket

import pytest

from ..support import free_port, wait_for


@pytest.mark.parametrize("workers", [None, 0], ids=["default", "workers0"])
def test_delivery_tempfail_retry_and_permfail(make_serve, sink, workers):
    srv = make_serve(routes={"example.com": f"127.0.0.1:{sink.port}"}, workers=workers).start()
    refused = srv.send(["ok1@example.com", "tempfail@example.com", "permfail@example.com",
                        "ok2@Example.COM"], headers={"X-Campaign": "c1", "X-Tenant": "t1"})
    assert refused == {}

    wait_for(lambda: len(srv.records("Delivery")) == 2 and srv.records("Bounce"))
    assert sorted(sink.recipients()) == ["ok1@example.com", "ok2@Example.COM"]

    delivered = srv.by_recipient("Delivery")
    rec = delivered["ok1@example.com"]
    assert rec["queue"] == "c1:t1@example.com"
    assert rec["meta"] == {"tenant": "t1", "campaign": "c1"}
    assert rec["response"]["code"] == 250
    assert rec["site"] == f"127.0.0.1:{sink.port}"
    assert rec["nodeid"] == (srv.data / "node_id").read_text().strip()
    assert rec["session_id"] and rec["reception_protocol"] == "ESMTP"
    assert rec["response"]["command"] == "."

    bounce = srv.by_recipient("Bounce")["permfail@example.com"]
    assert bounce["response"]["code"] == 550
    assert bounce["response"]["enhanced_code"] == {"class": 5, "subject": 1, "detail": 1}

    # tempfail@ is retried after retry_interval (1s in the test config), each time logged.
    wait_for(lambda: len([r for r in srv.records("TransientFailure")
                          if r["recipient"] == "tempfail@example.com"]) >= 2, timeout=20)
    tf = [r for r in srv.records("TransientFailure") if r["recipient"] == "tempfail@example.com"]
    assert tf[0]["response"]["code"] == 451
    assert [r["num_attempts"] for r in tf[:2]] == [1, 2]
    assert srv.scheduled() == {"c1:t1@example.com": 1}

    # Every message has a Reception record; none but tempfail@ is left without a terminal one.
    received = {r["id"]: r["recipient"] for r in srv.records("Reception")}
    assert len(received) == 4
    terminal = [r["id"] for r in srv.records() if r["type"] in
                ("Delivery", "Bounce", "Expiration", "AdminBounce")]
    assert len(terminal) == len(set(terminal)) == 3
    assert {received[i] for i in set(received) - set(terminal)} == {"tempfail@example.com"}


def test_expiration_after_max_age(make_serve, sink):
    srv = make_serve(routes={"example.com": f"127.0.0.1:{sink.port}"},
                     queue='retry_interval = "1s"\nmax_retry_interval = "1s"\nmax_age = "3s"').start()
    srv.send(["tempfail@example.com"])
    rec = wait_for(lambda: srv.records("Expiration"), timeout=20)[0]
    assert rec["recipient"] == "tempfail@example.com"
    assert srv.records("TransientFailure")
    assert srv.scheduled() == {}


def test_queued_mail_survives_restart_and_is_delivered(make_serve, tmp_path):
    from ..support import Sink

    sink_port = free_port()
    srv = make_serve(routes={"example.com": f"127.0.0.1:{sink_port}"}).start()
    srv.send(["a@example.com", "b@example.com"], headers={"X-Campaign": "spring"})
    wait_for(lambda: len(srv.records("TransientFailure")) >= 2)
    assert srv.stop() == 0

    srv.start()
    assert srv.scheduled() == {"spring:@example.com": 2}
    # a graceful stop leaves nothing in the outbox to be written twice
    assert len(srv.records("Reception")) == 2
    sink = Sink(tmp_path)
    sink.port = sink_port
    sink.start()
    try:
        wait_for(lambda: len(srv.records("Delivery")) == 2, timeout=20)
        assert sorted(sink.recipients()) == ["a@example.com", "b@example.com"]
    finally:
        sink.stop()
    assert srv.scheduled() == {}


def test_sigterm_exits_zero_quickly(make_serve):
    srv = make_serve().start()
    assert srv.stop(timeout=10) == 0  # raises if it is still running after 10 s


def _session(port: int) -> smtplib.SMTP:
    s = smtplib.SMTP("127.0.0.1", port, timeout=10)
    s.ehlo("client.test")
    return s


def test_relay_refused_outside_relay_hosts(make_serve):
    srv = make_serve(extra='').start()
    srv.stop()
    text = srv.config.read_text().replace('hostname = "mta.test"',
                                          'hostname = "mta.test"\nrelay_hosts = ["10.0.0.0/8"]')
    srv.config.write_text(text)
    srv.start()
    s = _session(srv.smtp_port)
    assert s.mail("a@example.org")[0] == 250
    code, msg = s.rcpt("someone@example.com")
    assert code == 550 and msg.startswith(b"5.7.1")
    assert s.noop()[0] == 250  # the session goes on
    s.quit()
    rej = wait_for(lambda: srv.records("Rejection"))
    assert rej[0]["recipient"] == "someone@example.com"
    assert rej[0]["response"]["code"] == 550
    assert srv.scheduled() == {}


@pytest.mark.parametrize("address", [
    "no-at-sign", "user@", "user@bad_domain!", "user@-bad.example", "<unbalanced@example.com",
    "user@" + "a" * 64 + ".example", "a" * 65 + "@example.com",
])
def test_malformed_recipient(make_serve, address):
    srv = make_serve().start()
    s = _session(srv.smtp_port)
    s.mail("a@example.org")
    got_code, msg = s.docmd(f"RCPT TO:{address}" if address.startswith("<") else f"RCPT TO:<{address}>")
    assert got_code in (501, 553) and msg.startswith(b"5.1.3"), (got_code, msg)
    assert s.rcpt("fine@example.com")[0] == 250  # the session survives
    s.quit()


def test_malformed_sender(make_serve):
    srv = make_serve().start()
    s = _session(srv.smtp_port)
    code, msg = s.docmd("MAIL FROM:<no-domain@>")
    assert code == 553 and msg.startswith(b"5.1."), (code, msg)
    code, msg = s.docmd("MAIL FROM:<user@bad_domain!>")
    assert code == 501 and msg.startswith(b"5.1.7"), (code, msg)
    assert s.mail("")[0] == 250  # the null sender is fine
    s.quit()


def test_oversize_message_refused_and_server_keeps_working(make_serve, sink):
    srv = make_serve(routes={"example.com": f"127.0.0.1:{sink.port}"},
                     extra="").start()
    srv.stop()
    srv.config.write_text(srv.config.read_text().replace(
        'hostname = "mta.test"', 'hostname = "mta.test"\nmax_message_size = 2000'))
    srv.start()
    s = _session(srv.smtp_port)
    assert b"SIZE 2000" in s.ehlo_resp
    # announced size too big: refused at MAIL
    code, msg = s.docmd("MAIL FROM:<a@example.org> SIZE=5000")
    assert code == 552, msg
    s.rset()
    # no SIZE announced: refused after DATA
    assert s.mail("a@example.org")[0] == 250
    assert s.rcpt("x@example.com")[0] == 250
    code, msg = s.data(b"Subject: big\r\n\r\n" + (b"x" * 70 + b"\r\n") * 60)
    assert code == 552 and msg.startswith(b"5.3.4"), (code, msg)
    # same session, small message: accepted and delivered
    assert s.sendmail("a@example.org", ["small@example.com"], b"Subject: s\r\n\r\nok\r\n") == {}
    s.quit()
    wait_for(lambda: srv.records("Delivery"))
    assert sink.recipients() == ["small@example.com"]


def test_garbage_commands_get_5xx_and_session_survives(make_serve):
    srv = make_serve().start()
    with socket.create_connection(("127.0.0.1", srv.smtp_port), timeout=10) as sock:
        f = sock.makefile("rwb")
        assert f.readline().startswith(b"220")

        def cmd(line: bytes) -> bytes:
            f.write(line + b"\r\n")
            f.flush()
            reply = f.readline()
            while reply[3:4] == b"-":
                reply = f.readline()
            return reply

        assert cmd(b"EHLO client.test").startswith(b"250 ")
        assert cmd(b"FOOBAR baz").startswith(b"500 5.5.2")
        assert cmd(b"MAIL FROM:<a@example.org> " + b"X" * 2000).startswith(b"500 ")
        assert cmd(b"\xff\xfe garbage").startswith(b"500 ")
        assert cmd(b"DATA").startswith(b"503 5.5.1")
        assert cmd(b"RCPT TO:<x@example.com>").startswith(b"503 ")
        assert cmd(b"NOOP").startswith(b"250 2.0.0")
        assert cmd(b"QUIT").startswith(b"221")
    # the server still serves new sessions
    s = _session(srv.smtp_port)
    assert s.noop()[0] == 250
    s.quit()


def test_pipelined_commands_and_dot_stuffing(make_serve, sink):
    srv = make_serve(routes={"example.com": f"127.0.0.1:{sink.port}"}).start()
    with socket.create_connection(("127.0.0.1", srv.smtp_port), timeout=10) as sock:
        f = sock.makefile("rwb")
        f.readline()
        f.write(b"EHLO c.test\r\n")
        f.flush()
        while (line := f.readline())[3:4] == b"-":
            assert line
        body = b"Subject: dots\r\n\r\n..leading dot\r\nnormal\r\n"
        # the whole transaction in one write, QUIT included (PIPELINING)
        f.write(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<p@example.com>\r\nDATA\r\n" + body
                + b".\r\nQUIT\r\n")
        f.flush()
        replies = [f.readline() for _ in range(5)]
    assert [r[:3] for r in replies] == [b"250", b"250", b"354", b"250", b"221"]
    wait_for(lambda: srv.records("Delivery"))
    assert sink.received()[0]["size"] > 0


def test_reception_protocol_follows_helo_or_ehlo(make_serve, sink):
    srv = make_serve(routes={"example.com": f"127.0.0.1:{sink.port}"}).start()
    with smtplib.SMTP("127.0.0.1", srv.smtp_port, timeout=10) as s:
        s.helo("old.test")
        s.sendmail("a@example.org", ["helo@example.com"], b"Subject: x\r\n\r\nx\r\n")
    srv.send(["ehlo@example.com"])
    wait_for(lambda: len(srv.by_recipient("Reception")) == 2)
    rec = srv.by_recipient("Reception")
    assert rec["helo@example.com"]["reception_protocol"] == "SMTP"
    assert rec["ehlo@example.com"]["reception_protocol"] == "ESMTP"


def test_lines_over_998_octets_are_folded_at_reception(make_serve, sink):
    """RFC 5322 2.1.1: stored, logged and delivered with no line over 998 octets."""
    srv = make_serve(routes={"example.com": f"127.0.0.1:{sink.port}"}).start()
    long_header = "x" * 1500
    srv.send(["a@example.com"], headers={"X-Long": long_header},
             body="short\r\n" + "y" * 3000 + "\r\n")
    wait_for(lambda: srv.records("Delivery"))
    got = sink.received()[0]
    assert got["longest_line"] == 998
    size = srv.records("Reception")[0]["size"]
    assert got["size"] == size  # what was stored is what went out
