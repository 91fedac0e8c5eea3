"""Remote MTAs for tests: ``SlowPeer``, a hand-made one that is slow to
greet and can refuse at RCPT, and ``Postfix``, a private instance of the real
thing (from Debian, installed by ``tests/install-peers.sh``).

``SlowPeer`` runs in a thread with its own event loop so that a test can
hold a delivery in the "connecting" state for as long as it needs.

``Postfix`` has its own config, queue and data directories under /var/tmp
(Postfix's own user must reach them; pytest's tmp dirs are private to root),
one smtpd on 127.0.0.1 at a free port, and logs to a file. As a destination
it accepts mail for any domain from loopback and keeps it in its queue
(``defer_transports = smtp``), where ``queue()`` reads it back. Starting it
needs root, as CI and ``make test`` run.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from . import free_port, wait_smtp


class SlowPeer:
    def __init__(self, greet_delay: float = 3.0, rcpt_reply: bytes = b"250 2.1.5 OK") -> None:
        self.port = free_port()
        self.greet_delay = greet_delay
        self.rcpt_reply = rcpt_reply
        self.connections = 0
        self.data_received: list[bytes] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.base_events.Server | None = None

    def start(self) -> SlowPeer:
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._session, "127.0.0.1", self.port), self._loop)
        self._server = fut.result(5)
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await asyncio.sleep(self.greet_delay)
            writer.write(b"220 slow.test ESMTP\r\n")
            while True:
                line = await reader.readline()
                if not line:
                    return
                verb = line[:4].upper()
                if verb in (b"EHLO", b"HELO"):
                    writer.write(b"250 slow.test\r\n")
                elif verb == b"RCPT":
                    writer.write(self.rcpt_reply + b"\r\n")
                elif verb == b"DATA":
                    writer.write(b"354 go ahead\r\n")
                    await writer.drain()
                    data = await reader.readuntil(b"\r\n.\r\n")
                    self.data_received.append(data)
                    writer.write(b"250 2.0.0 OK\r\n")
                elif verb == b"QUIT":
                    writer.write(b"221 bye\r\n")
                    await writer.drain()
                    return
                else:  # MAIL, RSET, NOOP
                    writer.write(b"250 2.0.0 OK\r\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


POSTFIX = "/usr/sbin/postfix"

# Debian's master.cf without chroot (the chroot jail of a non-default queue
# directory would lack /etc files) and without the pipe services; shared
# with bench/peer_postfix.py.
MASTER_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class Postfix:
    def __init__(self, base: Path | None = None, **main_cf: str) -> None:
        self.base = base or Path(tempfile.mkdtemp(prefix="sluice-postfix-", dir="/var/tmp"))
        self.etc = self.base / "etc"
        self.spool = self.base / "spool"
        self.data = self.base / "data"
        self.maillog = self.base / "maillog"
        self.port = free_port()
        self.extra = main_cf

    def start(self) -> Postfix:
        for d in (self.etc, self.spool, self.data):
            d.mkdir(parents=True, exist_ok=True)
        self.base.chmod(0o755)
        shutil.chown(self.data, "postfix")
        settings = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.spool),
            "data_directory": str(self.data),
            "myhostname": "postfix-peer.example",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mydestination": "",
            "local_recipient_maps": "",
            "alias_maps": "",
            "alias_database": "",
            "mynetworks": "127.0.0.0/8",
            "smtpd_relay_restrictions": "permit_mynetworks, reject",
            "defer_transports": "smtp",
            "queue_run_delay": "1h",
            "maillog_file": str(self.maillog),
            "maillog_file_prefixes": str(self.base),
            "biff": "no",
            **self.extra,
        }
        (self.etc / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in settings.items()))
        (self.etc / "master.cf").write_text(MASTER_CF.format(port=self.port))
        r = subprocess.run([POSTFIX, "-c", str(self.etc), "start"], capture_output=True,
                           text=True, check=False)
        if r.returncode != 0:
            raise RuntimeError(f"postfix start failed: {r.stdout}{r.stderr}\n{self.log()}")
        wait_smtp(self.port)
        return self

    def stop(self) -> None:
        pidfile = self.spool / "pid" / "master.pid"
        if pidfile.exists():
            master = Path(f"/proc/{pidfile.read_text().strip()}")
            subprocess.run([POSTFIX, "-c", str(self.etc), "stop"], capture_output=True,
                           check=False)
            deadline = time.time() + 20
            while master.exists() and time.time() < deadline:
                time.sleep(0.1)
        shutil.rmtree(self.base, ignore_errors=True)

    def queue(self) -> list[dict]:
        """The messages in Postfix's queue (``postqueue -j``)."""
        r = subprocess.run(["/usr/sbin/postqueue", "-c", str(self.etc), "-j"],
                           capture_output=True, text=True, check=True)
        return [json.loads(line) for line in r.stdout.splitlines() if line.strip()]

    def recipients(self) -> list[str]:
        return [r["address"] for m in self.queue() for r in m["recipients"]]

    def log(self) -> str:
        return self.maillog.read_text(errors="replace") if self.maillog.exists() else ""


class BrokenTlsPeer(SlowPeer):
    """A peer that offers STARTTLS, answers ``220`` to it and then meets the
    client's TLS hello with bytes that are not TLS, and closes: the
    handshake breaks. Plain-text
    sessions get the mail through (``data_received``); ``starttls`` counts
    the STARTTLS commands it got."""

    def __init__(self) -> None:
        super().__init__(greet_delay=0.0)
        self.starttls = 0

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            writer.write(b"220 broken-tls.test ESMTP\r\n")
            while True:
                line = await reader.readline()
                if not line:
                    return
                verb = line[:4].upper()
                if verb == b"EHLO":
                    writer.write(b"250-broken-tls.test\r\n250-STARTTLS\r\n250 8BITMIME\r\n")
                elif verb == b"STAR":
                    self.starttls += 1
                    writer.write(b"220 2.0.0 Ready to start TLS\r\n")
                    await writer.drain()
                    await reader.read(1)  # the client's hello has come: answer it with junk
                    writer.write(b"this is not a TLS record\r\n" * 4)
                    await writer.drain()
                    return
                elif verb == b"DATA":
                    writer.write(b"354 go ahead\r\n")
                    await writer.drain()
                    self.data_received.append(await reader.readuntil(b"\r\n.\r\n"))
                    writer.write(b"250 2.0.0 OK\r\n")
                elif verb == b"QUIT":
                    writer.write(b"221 2.0.0 bye\r\n")
                    await writer.drain()
                    return
                else:  # HELO, MAIL, RCPT, RSET, NOOP
                    writer.write(b"250 2.0.0 OK\r\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


class CertificateAuthority:
    """A throwaway CA (``cert`` is its PEM file) that issues server
    certificates, for tests that need a certificate a client can verify."""

    def __init__(self, directory: Path, name: str = "Sluice Test CA") -> None:
        import datetime as dt

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self.directory = directory
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = dt.datetime.now(dt.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(self._name).issuer_name(self._name)
                .public_key(self._key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5))
                .not_valid_after(now + dt.timedelta(days=1))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(
                    digital_signature=False, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True,
                    crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()),
                               critical=False)
                .sign(self._key, hashes.SHA256()))
        self._cert = cert
        self.cert = directory / "test-ca.crt"
        self.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, common_name: str, names: list[str] | None = None) -> tuple[Path, Path]:
        """A certificate for ``common_name`` (and ``names`` as its DNS names;
        default: the common name) and its key, as PEM files."""
        import datetime as dt

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.timezone.utc)
        ca_ski = self._cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
                .issuer_name(self._name).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5))
                .not_valid_after(now + dt.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName(
                    [x509.DNSName(n) for n in (names or [common_name])]), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                               critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                    ca_ski), critical=False)
                .sign(self._key, hashes.SHA256()))
        cert_path = self.directory / f"{common_name}.crt"
        key_path = self.directory / f"{common_name}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        return cert_path, key_path


class Redis:
    """A private ``redis-server`` (Debian's) on a free port, nothing saved to disk."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> Redis:
        self.base.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.base)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 15
        while time.time() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
