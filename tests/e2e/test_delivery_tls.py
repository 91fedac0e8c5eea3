"""TLS on delivery (SPEC section 12) against real peers: Postfix offering or
demanding STARTTLS with certificates from a throwaway CA or self-signed,
``sluice sink`` without STARTTLS, and a peer whose TLS handshake breaks.
Only the next hop is configured (``[routes]``); nothing else is faked.

Each test waits for the record that ends what it checks (a Delivery, or a
second TransientFailure: the retry failed the same way) before it looks at
what the peer received.
"""

from __future__ import annotations

import smtplib

import pytest

from ..support import Postfix, make_certificate, wait_for
from ..support.peers import BrokenTlsPeer, CertificateAuthority

TLS_FIELDS = ("tls_cipher", "tls_protocol_version", "tls_peer_subject_name")


@pytest.fixture
def postfix():
    """``postfix(cert, key, level)``: a Postfix destination with that
    certificate and ``smtpd_tls_security_level``; stopped after the test."""
    started: list[Postfix] = []

    def make(cert, key, level: str = "encrypt") -> Postfix:
        pf = Postfix(smtpd_tls_security_level=level, smtpd_tls_cert_file=str(cert),
                     smtpd_tls_key_file=str(key), smtpd_tls_loglevel="1").start()
        started.append(pf)
        return pf

    yield make
    for pf in started:
        pf.stop()


@pytest.fixture
def broken_tls_peer():
    peer = BrokenTlsPeer().start()
    yield peer
    peer.stop()


def tls_config(default: str, ca_file=None, per_domain: dict[str, str] | None = None) -> str:
    lines = ["[delivery]", f'tls = "{default}"']
    if ca_file is not None:
        lines.append(f'tls_ca_file = "{ca_file}"')
    lines.append("[tls]")
    lines += [f'"{d}" = "{m}"' for d, m in (per_domain or {}).items()]
    return "\n".join(lines) + "\n"


def assert_tls_used(rec: dict, subject: list[str]) -> None:
    assert rec["tls_protocol_version"] in ("TLSv1.2", "TLSv1.3")
    assert rec["tls_cipher"]
    assert rec["tls_peer_subject_name"] == subject


def assert_no_tls(rec: dict) -> None:
    assert all(rec.get(f) is None for f in TLS_FIELDS), rec


def failures_of(srv, recipient: str, at_least: int) -> list[dict]:
    """The TransientFailure records of ``recipient`` once there are
    ``at_least`` of them (each retry failed the same way)."""
    return wait_for(lambda: (lambda r: r if len(r) >= at_least else None)(
        [r for r in srv.records("TransientFailure") if r["recipient"] == recipient]), timeout=30)


def test_required_delivers_over_tls_verified_against_tls_ca_file(tmp_path, make_serve, postfix):
    # The certificate names the host the route names ("localhost"), and its
    # CA is trusted through [delivery] tls_ca_file only.
    ca = CertificateAuthority(tmp_path)
    pf = postfix(*ca.issue("localhost"))
    srv = make_serve(routes={"example.com": f"localhost:{pf.port}"},
                     extra=tls_config("required", ca.cert)).start()
    srv.send(["a@example.com"])
    rec = wait_for(lambda: srv.records("Delivery"), timeout=30)[0]
    assert_tls_used(rec, ["CN=localhost"])
    assert rec["peer_address"]["name"] == "localhost"
    assert srv.records("TransientFailure") == []
    assert wait_for(lambda: pf.recipients(), timeout=20) == ["a@example.com"]


def test_required_refuses_a_certificate_for_another_name(tmp_path, make_serve, postfix):
    # Signed by the trusted CA, but for another host name than the one connected to.
    ca = CertificateAuthority(tmp_path)
    pf = postfix(*ca.issue("mx.elsewhere.example"))
    srv = make_serve(routes={"example.com": f"localhost:{pf.port}"},
                     extra=tls_config("required", ca.cert)).start()
    srv.send(["a@example.com"])
    first, second = failures_of(srv, "a@example.com", 2)[:2]
    for tf in (first, second):
        assert tf["response"]["code"] == 451
        assert tf["response"]["enhanced_code"] == {"class": 4, "subject": 7, "detail": 5}
        assert tf["response"]["command"] == "STARTTLS"
        assert "certificate" in tf["response"]["content"]
        assert "failed verification" in tf["response"]["content"]
        assert "Hostname mismatch" in tf["response"]["content"]
        assert tf["peer_address"]["name"] == "localhost"
        assert_no_tls(tf)  # no TLS session was established
    assert srv.records("Delivery") == []
    assert pf.queue() == []


def test_required_insecure_delivers_to_a_self_signed_certificate(tmp_path, make_serve, postfix):
    # The first message of the connection needs SMTPUTF8: what the peer
    # offers is read again under TLS (RFC 3207), before the first MAIL.
    pf = postfix(*make_certificate(tmp_path, "postfix-peer.example"))
    srv = make_serve(routes={"example.com": f"127.0.0.1:{pf.port}"},
                     extra=tls_config("required_insecure")).start()
    with smtplib.SMTP("127.0.0.1", srv.smtp_port, timeout=30) as s:
        assert s.sendmail("me@example.org", ["\u00fcser@example.com"],
                          "Subject: gr\u00fc\u00dfe\r\n\r\nGr\u00fc\u00dfe!\r\n".encode(),
                          mail_options=["SMTPUTF8", "BODY=8BITMIME"]) == {}
    rec = wait_for(lambda: srv.records("Delivery"), timeout=30)[0]
    assert_tls_used(rec, ["CN=postfix-peer.example"])
    assert srv.records("Bounce") == []
    assert wait_for(lambda: pf.recipients(), timeout=20) == ["\u00fcser@example.com"]


def test_required_fails_when_starttls_is_not_offered_and_sends_nothing(make_serve, sink):
    srv = make_serve(routes={"example.com": f"127.0.0.1:{sink.port}"},
                     extra=tls_config("required_insecure")).start()
    srv.send(["a@example.com"])
    for tf in failures_of(srv, "a@example.com", 2):
        assert tf["response"]["code"] == 451
        assert tf["response"]["enhanced_code"] == {"class": 4, "subject": 7, "detail": 4}
        assert tf["response"]["content"] == (f"STARTTLS is required (tls = required_insecure) "
                                             f"but 127.0.0.1:{sink.port} does not offer it")
    assert sink.received() == []


def test_disabled_never_starts_tls(tmp_path, make_serve, postfix, sink):
    # An encrypt-only Postfix answers MAIL with 530 5.7.0: a 5xx reply, so a
    # Bounce as for any 5xx. A peer without TLS gets the mail, and the record
    # carries no TLS fields.
    pf = postfix(*make_certificate(tmp_path, "postfix-peer.example"))
    srv = make_serve(routes={"encrypted.example": f"127.0.0.1:{pf.port}",
                             "plain.example": f"127.0.0.1:{sink.port}"},
                     extra=tls_config("disabled")).start()
    srv.send(["a@encrypted.example", "b@plain.example"])
    wait_for(lambda: srv.records("Bounce") and srv.records("Delivery"), timeout=30)
    bounce = srv.by_recipient("Bounce")["a@encrypted.example"]
    assert bounce["response"]["code"] == 530
    assert bounce["response"]["enhanced_code"] == {"class": 5, "subject": 7, "detail": 0}
    assert bounce["response"]["command"] == "MAIL FROM"
    assert_no_tls(bounce)
    delivery = srv.by_recipient("Delivery")["b@plain.example"]
    assert_no_tls(delivery)
    assert sink.recipients() == ["b@plain.example"]
    assert pf.queue() == []
    assert "TLS connection established" not in pf.log()


def test_a_required_domain_never_shares_an_opportunistic_connection(tmp_path, make_serve,
                                                                   postfix):
    # Both domains route to the same peer (one site), whose certificate is
    # self-signed: the opportunistic domain's mail goes over TLS unverified;
    # the required domain's is refused, on connections of its own.
    pf = postfix(*make_certificate(tmp_path, "postfix-peer.example"), level="may")
    hop = f"127.0.0.1:{pf.port}"
    srv = make_serve(routes={"plain.example": hop, "secure.example": hop},
                     extra=tls_config("opportunistic",
                                      per_domain={"Secure.Example": "required"})).start()
    srv.send(["a@plain.example", "b@secure.example"])
    delivered = wait_for(lambda: srv.records("Delivery"), timeout=30)[0]
    failures = failures_of(srv, "b@secure.example", 2)
    assert delivered["recipient"] == "a@plain.example"
    assert_tls_used(delivered, ["CN=postfix-peer.example"])
    assert delivered["site"] == hop
    for tf in failures:
        assert tf["response"]["enhanced_code"] == {"class": 4, "subject": 7, "detail": 5}
        assert "failed verification" in tf["response"]["content"]
        assert "self-signed certificate" in tf["response"]["content"]
        assert tf["site"] == hop
    assert [r["recipient"] for r in srv.records("Delivery")] == ["a@plain.example"]
    assert pf.recipients() == ["a@plain.example"]
    # the figures show the two ready queues of that one site
    assert {hop, f"{hop} tls=required"} <= set(srv.api("GET", "/metrics.json").json()["ready"])


def test_opportunistic_handshake_failure_is_retried_in_plain_text(make_serve, broken_tls_peer):
    peer = broken_tls_peer
    srv = make_serve(routes={"example.com": f"127.0.0.1:{peer.port}"}).start()
    srv.send(["a@example.com"])
    delivered = wait_for(lambda: srv.records("Delivery"), timeout=30)[0]
    (tf,) = srv.records("TransientFailure")
    assert tf["id"] == delivered["id"]
    assert tf["response"]["code"] == 451
    assert tf["response"]["enhanced_code"] == {"class": 4, "subject": 7, "detail": 5}
    where = f"127.0.0.1:{peer.port}"
    content = tf["response"]["content"]
    assert content.startswith(f"TLS handshake with {where} failed: ")
    assert content.endswith(f"; the next attempt to {where} goes in plain text")
    assert tf["peer_address"] == {"name": "127.0.0.1", "addr": "127.0.0.1"}
    assert_no_tls(tf)
    assert delivered["num_attempts"] == 2
    assert_no_tls(delivered)
    assert peer.starttls == 1  # the retry did not try TLS again
    assert len(peer.data_received) == 1
