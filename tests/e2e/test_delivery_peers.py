"""Delivery against real peers: mail with non-ASCII envelope addresses
(RFC 6531) is delivered with SMTPUTF8 when the next hop offers it, bounced
with 5.6.7 when it does not, never stuck; and the records of a delivery over
TLS say so.

The peers are ``sluice sink`` (aiosmtpd, SMTPUTF8 on) and Postfix from
Debian: as it ships (SMTPUTF8 on), with ``smtputf8_enable = no``, and with
STARTTLS offered.
"""

from __future__ import annotations

import smtplib

import pytest

from ..support import Postfix
from ..support import make_certificate, wait_for

BODY = "Subject: h\u00e9llo\r\nFrom: s\u00e9nder@example.org\r\n\r\nGr\u00fc\u00dfe!\r\n".encode()


def send_utf8(srv, sender: str, recipients: list[str]) -> None:
    with smtplib.SMTP("127.0.0.1", srv.smtp_port, timeout=30) as s:
        refused = s.sendmail(sender, recipients, BODY, mail_options=["SMTPUTF8", "BODY=8BITMIME"])
    assert refused == {}


@pytest.fixture
def postfix():
    started: list[Postfix] = []

    def make(**main_cf: str) -> Postfix:
        pf = Postfix(**main_cf).start()
        started.append(pf)
        return pf

    yield make
    for pf in started:
        pf.stop()


def test_utf8_recipient_is_delivered_with_smtputf8_to_sluice_sink(make_serve, sink):
    srv = make_serve(routes={"example.com": f"127.0.0.1:{sink.port}",
                             "xn--bcher-kva.example": f"127.0.0.1:{sink.port}"}).start()
    send_utf8(srv, "me@example.org", ["\u00fcser@example.com", "plain@b\u00fccher.example"])
    wait_for(lambda: len(srv.records("Delivery")) == 2)
    # the local part needs SMTPUTF8; the IDN domain alone goes in its ASCII form
    assert sorted(sink.recipients()) == ["plain@xn--bcher-kva.example", "\u00fcser@example.com"]
    assert {r["recipient"] for r in srv.records("Delivery")} == {
        "\u00fcser@example.com", "plain@b\u00fccher.example"}
    assert srv.scheduled() == {}


def test_utf8_recipient_is_delivered_to_postfix(make_serve, postfix):
    pf = postfix()
    srv = make_serve(routes={"example.com": f"127.0.0.1:{pf.port}"}).start()
    send_utf8(srv, "s\u00e9nder@example.org", ["\u00fcser@example.com"])
    rec = wait_for(lambda: srv.records("Delivery"), timeout=30)[0]
    assert rec["response"]["code"] == 250 and rec["response"]["command"] == "."
    assert wait_for(lambda: pf.recipients(), timeout=20) == ["\u00fcser@example.com"]
    assert pf.queue()[0]["sender"] == "s\u00e9nder@example.org"


def test_utf8_addresses_bounce_with_5_6_7_when_the_peer_lacks_smtputf8(make_serve, postfix):
    pf = postfix(smtputf8_enable="no")
    srv = make_serve(routes={"example.com": f"127.0.0.1:{pf.port}"}).start()
    send_utf8(srv, "me@example.org", ["\u00fcser@example.com"])
    send_utf8(srv, "s\u00e9nder@example.org", ["plain@example.com"])
    srv.send(["ascii@example.com"])  # ASCII mail on the same route still goes
    wait_for(lambda: len(srv.records("Bounce")) == 2 and srv.records("Delivery"), timeout=30)
    bounces = srv.by_recipient("Bounce")
    for rcpt, which in (("\u00fcser@example.com", "recipient"), ("plain@example.com", "sender")):
        resp = bounces[rcpt]["response"]
        assert resp["code"] == 553
        assert resp["enhanced_code"] == {"class": 5, "subject": 6, "detail": 7}
        assert which in resp["content"] and "SMTPUTF8" in resp["content"]
    assert srv.scheduled() == {}
    assert pf.recipients() == ["ascii@example.com"]
    # one terminal record each, nothing left behind
    terminal = [r["id"] for r in srv.records() if r["type"] in ("Delivery", "Bounce")]
    assert len(terminal) == len(set(terminal)) == 3


def test_delivery_over_tls_logs_cipher_version_and_peer_subject(make_serve, postfix):
    pf = Postfix()
    cert, key = make_certificate(pf.base, "postfix-peer.example")
    pf = postfix(base=pf.base, smtpd_tls_security_level="may", smtpd_tls_cert_file=str(cert),
                 smtpd_tls_key_file=str(key), smtpd_tls_loglevel="1")
    srv = make_serve(routes={"example.com": f"127.0.0.1:{pf.port}"}).start()
    srv.send(["a@example.com"])
    rec = wait_for(lambda: srv.records("Delivery"), timeout=30)[0]
    assert rec["tls_protocol_version"] in ("TLSv1.2", "TLSv1.3")
    assert rec["tls_cipher"]
    assert rec["tls_peer_subject_name"] == ["CN=postfix-peer.example"]
    assert rec["session_id"] and rec["peer_address"]["addr"] == "127.0.0.1"
    assert "TLS connection established from localhost" in pf.log()
