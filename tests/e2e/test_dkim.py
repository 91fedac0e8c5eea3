"""DKIM signing end to end: real ``sluice serve`` processes sign mail that
arrives over SMTP and HTTP inject, and OpenDKIM (``opendkim-testmsg``, a
verifier that shares no code with dkimpy) checks what the next hop got,
against the DNS record ``sluice dkim-keygen`` printed; also after Postfix
relayed it. Bad keys stop the start; a message that cannot be signed gets a
temporary failure and is not stored.

``opendkim-testmsg`` has no option for a public key: it asks DNS. ``DkimDns``
answers those queries from a loopback address of its own (port 53, so the
tests need root, as Postfix does) and runs the verifier in a mount namespace
whose ``/etc/resolv.conf`` names that address; the machine's own stays as it
is.
"""

from __future__ import annotations

import errno
import json
import os
import random
import smtplib
import socket
import stat
import subprocess
import threading
from collections.abc import Iterator
from email.utils import formatdate
from pathlib import Path

import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest

from ..support import BIN, Serve, wait_for
from ..support.peers import Postfix, SlowPeer

ALGORITHMS = ["rsa-sha256", "ed25519-sha256"]


class DkimDns:
    """A DNS server for ``S._domainkey.D`` TXT records, and the OpenDKIM
    verifier that asks it (see the module docstring)."""

    def __init__(self, tmp: Path) -> None:
        self.records: dict[dns.name.Name, dns.rrset.RRset] = {}
        self.resolv_conf = tmp / "resolv.conf"
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for _ in range(50):
            address = f"127.{random.randrange(1, 255)}.{random.randrange(1, 255)}.53"
            try:
                self.sock.bind((address, 53))
                break
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
        else:
            raise RuntimeError("no loopback address with a free port 53")
        self.sock.settimeout(0.2)
        self.resolv_conf.write_text(f"nameserver {address}\noptions edns0 attempts:2 timeout:2\n")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def publish(self, record: str) -> None:
        """A record as ``sluice dkim-keygen`` prints it (``NAME IN TXT "..." "..."``),
        read as zone file text: replaces what was published under that name."""
        name, klass, rtype, rdata = record.split(" ", 3)
        assert (klass, rtype) == ("IN", "TXT"), record
        rrset = dns.rrset.from_text(name + ".", 300, klass, rtype, rdata)
        self.records[rrset.name] = rrset

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            query = dns.message.from_wire(data)
            answer = dns.message.make_response(query)
            question = query.question[0]
            rrset = self.records.get(question.name)
            if rrset is not None and question.rdtype == dns.rdatatype.TXT:
                answer.answer.append(rrset)
            else:
                answer.set_rcode(dns.rcode.NXDOMAIN)
            self.sock.sendto(answer.to_wire(), peer)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()

    def opendkim(self, message: bytes) -> subprocess.CompletedProcess:
        """``opendkim-testmsg`` verifying ``message``: exit status 0 and no
        output when the signature verifies."""
        return subprocess.run(
            ["unshare", "--mount", "sh", "-c",
             'mount --bind "$0" /etc/resolv.conf && exec opendkim-testmsg',
             str(self.resolv_conf)],
            input=message, capture_output=True, timeout=60)

    def assert_verifies(self, message: bytes) -> None:
        r = self.opendkim(message)
        assert (r.returncode, r.stdout, r.stderr) == (0, b"", b""), (r, message)

    def assert_fails(self, message: bytes, reason: bytes) -> None:
        r = self.opendkim(message)
        assert r.returncode != 0 and reason in r.stderr, (r, message)


@pytest.fixture
def dkim_dns(tmp_path: Path) -> Iterator[DkimDns]:
    server = DkimDns(tmp_path)
    yield server
    server.stop()


@pytest.fixture
def peer() -> Iterator[SlowPeer]:
    """The next hop, keeping every message it gets as it got it."""
    p = SlowPeer(greet_delay=0).start()
    yield p
    p.stop()


@pytest.fixture
def postfix() -> Iterator[Postfix]:
    pf = Postfix().start()
    yield pf
    pf.stop()


def keygen(cwd: Path, selector: str, algorithm: str = "rsa-sha256",
           domain: str = "example.org") -> tuple[Path, str]:
    """``sluice dkim-keygen`` in ``cwd``: the key file it wrote (at its default
    place) and the record it printed."""
    r = subprocess.run([BIN / "sluice", "dkim-keygen", "--domain", domain, "--selector", selector,
                        "--algorithm", algorithm], cwd=cwd, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    key = cwd / f"{selector}.{domain}.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----\n")
    record = r.stdout.strip()
    assert "\n" not in record and key.read_text().split("\n")[1] not in r.stdout + r.stderr
    return key, record


def dkim_config(key: Path, selector: str, algorithm: str = "rsa-sha256") -> str:
    return (f'[dkim."example.org"]\nselector = "{selector}"\nkey_file = "{key}"\n'
            f'algorithm = "{algorithm}"\n')


def headers(subject: str, sender: str = "x@example.org") -> dict[str, str]:
    return {"From": f"Example <{sender}>", "To": "someone@example.com", "Subject": subject,
            "Date": formatdate(), "Message-ID": f"<{subject.replace(' ', '.')}@example.org>"}


def inject_request(subject: str) -> dict:
    return {"envelope_sender": "x@example.org",
            "content": {"from": {"email": "x@news.example.org", "name": "News"},
                        "subject": subject, "text_body": "Hello {{ name }}.\n.a dot line\n"},
            "recipients": [{"email": "b@example.com", "name": "B"}]}


def as_sent(data: bytes) -> bytes:
    """The message in a DATA transfer: end marker removed, dot-stuffing undone."""
    assert data.endswith(b"\r\n.\r\n")
    data = data[:-3]
    return (data[1:] if data.startswith(b"..") else data).replace(b"\r\n..", b"\r\n.")


def by_subject(messages: list[bytes]) -> dict[str, bytes]:
    out = {}
    for m in messages:
        for line in m.split(b"\n\n" if b"\r\n\r\n" not in m else b"\r\n\r\n", 1)[0].splitlines():
            if line.startswith(b"Subject: "):
                out[line[9:].decode().strip()] = m
    return out


def tampered(message: bytes) -> bytes:
    out = message.replace(b"Hello", b"Hallo", 1)
    assert out != message
    return out


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_mail_over_smtp_and_inject_arrives_signed_and_opendkim_verifies_it(
        make_serve, tmp_path, dkim_dns, peer, algorithm):
    key, record = keygen(tmp_path, "s1", algorithm)
    dkim_dns.publish(record)
    srv = make_serve(extra=dkim_config(key, "s1", algorithm),
                     routes={"example.com": f"127.0.0.1:{peer.port}"}).start()
    srv.send(["a@example.com"], sender="x@example.org", headers=headers("over smtp"),
             body="Hello over SMTP.\r\n.a dot line\r\n")
    r = srv.api("POST", "/api/inject/v1", inject_request("over http"))  # From a subdomain
    assert r.status_code == 200 and r.json()["success_count"] == 1, r.text
    srv.send(["c@example.com"], sender="c@other.test", headers=headers("not ours", "c@other.test"),
             body="Hello from elsewhere.\r\n")
    wait_for(lambda: len(peer.data_received) == 3, timeout=30)
    got = by_subject([as_sent(d) for d in peer.data_received])

    for subject in ("over smtp", "over http"):
        message = got[subject]
        assert message.startswith(b"DKIM-Signature: v=1; a=" + algorithm.encode()), message
        assert b" d=example.org;" in message and b" s=s1;" in message
        dkim_dns.assert_verifies(message)
        dkim_dns.assert_fails(tampered(message), b"Bad signature")
    # mail from a domain without a key goes out as it came
    assert b"DKIM-Signature" not in got["not ours"]
    dkim_dns.assert_fails(got["not ours"], b"No signature")
    # the verdict rests on the published key: another key's record fails
    (tmp_path / "other").mkdir()
    _, other = keygen(tmp_path / "other", "s1", algorithm)
    dkim_dns.publish(other)
    dkim_dns.assert_fails(got["over smtp"], b"Bad signature")


def postfix_messages(pf: Postfix) -> list[bytes]:
    """Every message in Postfix's queue, header and body as Postfix keeps them."""
    out = []
    for entry in pf.queue():
        r = subprocess.run(["/usr/sbin/postcat", "-c", str(pf.etc), "-h", "-b", "-q",
                            entry["queue_id"]], capture_output=True, check=True, timeout=30)
        out.append(r.stdout)
    return out


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_the_signature_survives_relaying_through_postfix(
        make_serve, tmp_path, dkim_dns, postfix, algorithm):
    key, record = keygen(tmp_path, "relay", algorithm)
    dkim_dns.publish(record)
    srv = make_serve(extra=dkim_config(key, "relay", algorithm),
                     routes={"example.com": f"127.0.0.1:{postfix.port}"}).start()
    srv.send(["a@example.com", "b@example.com"], sender="x@example.org",
             headers=headers("relayed smtp"), body="Hello through Postfix.\r\n")
    r = srv.api("POST", "/api/inject/v1", inject_request("relayed http"))
    assert r.status_code == 200, r.text
    wait_for(lambda: len(postfix.recipients()) == 3, timeout=30)
    messages = postfix_messages(postfix)
    assert sorted(by_subject(messages)) == ["relayed http", "relayed smtp"]
    for message in messages:
        # Postfix's own trace header above Sluice's signature: it came through
        assert message.startswith(b"Received: from mta.test (localhost [127.0.0.1])\n")
        assert b"\nDKIM-Signature: v=1; a=" + algorithm.encode() in message
        dkim_dns.assert_verifies(message)
        dkim_dns.assert_fails(tampered(message), b"Bad signature")


def start_and_fail(srv: Serve) -> subprocess.CompletedProcess:
    r = subprocess.run([BIN / "sluice", "serve", "--config", str(srv.config)],
                       capture_output=True, text=True, timeout=60)
    for port in (srv.smtp_port, srv.http_port):
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
    return r


def _bad_key(tmp: Path, kind: str) -> tuple[Path, str, str]:
    """(key_file, algorithm, what the error says) for a key that cannot be used."""
    if kind == "missing":
        return tmp / "missing.key", "rsa-sha256", "No such file or directory"
    if kind == "directory":
        return tmp, "rsa-sha256", "Is a directory"
    if kind == "garbage":
        path = tmp / "garbage.key"
        path.write_text("-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5IGF0IGFsbA==\n"
                        "-----END PRIVATE KEY-----\n")
        return path, "rsa-sha256", "not a PEM private key"
    key, _ = keygen(tmp, "wrong", "rsa-sha256")
    return key, "ed25519-sha256", 'an RSA key, but algorithm is "ed25519-sha256"'


@pytest.mark.parametrize("kind", ["missing", "directory", "garbage", "wrong-algorithm"])
def test_a_key_that_cannot_be_used_stops_the_start_naming_it(make_serve, tmp_path, kind):
    key, algorithm, problem = _bad_key(tmp_path, kind)
    srv = make_serve(extra=dkim_config(key, "s1", algorithm))
    r = start_and_fail(srv)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith(f"sluice: bad configuration: {srv.config}: "), r.stderr
    assert 'dkim."example.org".key_file' in r.stderr and problem in r.stderr, r.stderr
    if key.is_file():
        for line in key.read_text().splitlines()[1:-1]:
            assert line not in r.stderr
    assert not (srv.data / "logs").exists()


def test_dkim_keygen_never_overwrites_and_refuses_bad_names(tmp_path):
    key, record = keygen(tmp_path, "s1", "ed25519-sha256")
    assert record.startswith('s1._domainkey.example.org IN TXT "v=DKIM1; k=ed25519; p=')
    before = key.read_bytes()
    run = [BIN / "sluice", "dkim-keygen", "--domain", "example.org", "--selector", "s1"]
    r = subprocess.run(run, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stdout == ""
    assert f"{key.name} exists; not overwriting" in r.stderr
    assert key.read_bytes() == before
    # --out names the file; RSA records are split into strings of at most 255 characters
    r = subprocess.run([*run, "--out", "elsewhere.pem", "--bits", "4096"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    name, _, strings = r.stdout.strip().partition(" IN TXT ")
    parts = strings[1:-1].split('" "')
    assert name == "s1._domainkey.example.org" and len(parts) == 3
    assert all(len(p) <= 255 for p in parts) and parts[0].startswith("v=DKIM1; k=rsa; p=MII")
    assert (tmp_path / "elsewhere.pem").exists()
    for bad in (["--domain", "not a domain", "--selector", "s1"],
                ["--domain", "[192.0.2.1]", "--selector", "s1"],
                ["--domain", "example.org", "--selector", "bad selector"],
                ["--domain", "example.org", "--selector", "s9", "--bits", "512"]):
        r = subprocess.run([BIN / "sluice", "dkim-keygen", *bad], cwd=tmp_path,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and "Invalid value for '--" in r.stderr, (bad, r.stderr)
    assert sorted(os.listdir(tmp_path)) == ["elsewhere.pem", "s1.example.org.key"]


BROKEN = "From: x@example.org\r\nthis line is no header field\r\nSubject: broken\r\n\r\nbody\r\n"


def test_a_message_that_cannot_be_signed_is_refused_for_now_and_not_stored(
        make_serve, tmp_path, sink):
    """A header line without a colon: dkimpy cannot sign it. SMTP answers
    451 4.3.0, inject 503; nothing is stored, and the next message goes on."""
    key, _ = keygen(tmp_path, "s1")
    srv = make_serve(extra=dkim_config(key, "s1"),
                     routes={"example.com": f"127.0.0.1:{sink.port}"}).start()
    with smtplib.SMTP("127.0.0.1", srv.smtp_port, timeout=30) as s:
        s.ehlo()
        s.mail("x@example.org")
        s.rcpt("broken@example.com")
        code, reply = s.data(BROKEN.encode())
        assert code == 451 and reply.startswith(b"4.3.0 Cannot DKIM-sign the message"), reply
        assert b"Unexpected characters in RFC822 header" in reply
        # the same session goes on: a good message is signed and queued
        s.sendmail("x@example.org", ["marker1@example.com"],
                   BROKEN.replace("this line is no header field\r\n", ""))
    r = srv.api("POST", "/api/inject/v1", {
        "envelope_sender": "x@example.org", "content": BROKEN,
        "recipients": [{"email": "broken@example.com"}]})
    assert r.status_code == 503, r.text
    assert r.json()["error"].startswith("DKIM signing failed, nothing was queued: example.org: ")
    r = srv.api("POST", "/api/inject/v1", {
        "envelope_sender": "x@example.org",
        "content": BROKEN.replace("this line is no header field\r\n", ""),
        "recipients": [{"email": "marker2@example.com"}]})
    assert r.status_code == 200, r.text
    wait_for(lambda: len(sink.recipients()) == 2, timeout=30)
    assert sorted(sink.recipients()) == ["marker1@example.com", "marker2@example.com"]
    assert sorted(r["recipient"] for r in srv.records("Reception")) == [
        "marker1@example.com", "marker2@example.com"]
    assert srv.scheduled() == {}
    log = srv.log.read_text()
    assert log.count("DKIM signing failed, answered 451: example.org: Unexpected") == 1
    assert log.count("DKIM signing failed, answered 503: example.org: Unexpected") == 1
    assert json.dumps(key.read_text().split("\n")[1])[1:-1] not in log
