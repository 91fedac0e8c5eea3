#!/usr/bin/env python3
"""Sluice side by side with Postfix, driven by the same load generator.

Run through ``bench/peer_postfix.sh`` (which installs Postfix and OpenDKIM if
absent and cleans up on any exit). Both MTAs listen on 127.0.0.1, spool on
the same disk, and get the same load: Postfix's ``smtp-source`` (one
connection per message, one command at a time, HELO) except for the STARTTLS
figure, which has none and uses ``bench/tls_source.py`` (the same pattern,
EHLO, STARTTLS):

1. accept rate, 10 KB and 100 KB, 50 sessions, mail held in the queue
   (Postfix: ``defer_transports = smtp``; Sluice: domain suspended);
   ``--only accept10k,accept100k``;
2. accept-tls: the same, 10 KB, with STARTTLS on every connection (a full
   handshake each, no session resumption), both MTAs with the same ECDSA
   P-256 self-signed certificate made for the run (Postfix:
   ``smtpd_tls_security_level = may``; Sluice: ``[smtp] tls_certificate``),
   load from ``tls_source.py``; checked afterwards: every Reception record
   has ``tls_protocol_version`` (Sluice), the maillog has a "TLS connection
   established" line per message (Postfix);
3. accept-dkim: the same, 10 KB, plain SMTP (``smtp-source -f
   sender@bench.example``: its messages carry ``From: <sender@...>``), every
   message DKIM-signed (rsa-sha256, 2048 bits, the same key, relaxed/relaxed)
   before the 250: Sluice with ``[dkim."bench.example"]``, Postfix through a
   private OpenDKIM milter (``milter_default_action = tempfail``, so an
   unsigned message is never accepted); checked afterwards on one queued
   message of each: a ``DKIM-Signature:`` with ``d=bench.example`` that
   dkimpy verifies with the key's public half;
4. end-to-end relay rate to ``smtp-sink`` (from the first connection of
   ``smtp-source`` until the sink has counted every message);
5. purge of 100,000 queued messages: ``postsuper -d ALL`` against
   ``kcli bounce --everything`` until the last AdminBounce record is in the
   log files.

Each MTA runs alone during its measurement (the other one is stopped) and
gets a fresh spool for each figure. Prints a table (Postfix, Sluice, ratio
Sluice/Postfix), where the cores went during each accept figure (MTA, load
generator, other) and one JSON line.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))
from bounce import LogCounter as AdminBounceCounter  # noqa: E402
from inject import fs_type, process_tree, terminate  # noqa: E402

from tests.support.peers import MASTER_CF  # noqa: E402  (the tests' private Postfix, too)

ROOT = Path(__file__).resolve().parent.parent
SLUICE = Path(sys.executable).parent / "sluice"
KCLI = Path(sys.executable).parent / "kcli"
SMTP_SOURCE = "/usr/sbin/smtp-source"
SMTP_SINK = "/usr/sbin/smtp-sink"
POSTFIX = "/usr/sbin/postfix"
POSTSUPER = "/usr/sbin/postsuper"
POSTQUEUE = "/usr/sbin/postqueue"
POSTCAT = "/usr/sbin/postcat"
OPENDKIM = "/usr/sbin/opendkim"
TLS_SOURCE = Path(__file__).resolve().parent / "tls_source.py"
DOMAIN = "bench.example"
SENDER = f"sender@{DOMAIN}"
RCPT = f"user@{DOMAIN}"
SELECTOR = "s1"
FIGURES = ("accept10k", "accept100k", "accept-tls", "accept-dkim", "relay", "purge")
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_banner(port: int, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                s.settimeout(5)
                if s.recv(512).startswith(b"220"):
                    s.sendall(b"QUIT\r\n")
                    return
        except OSError:
            pass
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before answering on {port}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"nothing answered 220 on 127.0.0.1:{port} within {timeout:.0f}s")
        time.sleep(0.05)


def wait_closed(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                pass
        except OSError:
            return
        time.sleep(0.1)


# --------------------------------------------------------------------------
# CPU accounting


def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as fh:
        data = fh.read()
    return data[data.rindex(")") + 2:].split()


def proc_cpu(pid: int, children: bool = False) -> float:
    """utime+stime of ``pid`` (all threads), plus its reaped children's if asked."""
    try:
        f = _stat_fields(pid)
    except (OSError, ValueError):
        return 0.0
    ticks = int(f[11]) + int(f[12])
    if children:
        ticks += int(f[13]) + int(f[14])
    return ticks / CLK_TCK


def tree_cpu(root: int) -> float:
    """CPU of ``root`` and all its descendants, living or reaped (reaped ones
    are in their parent's cutime/cstime)."""
    return sum(proc_cpu(pid, children=True) for pid in process_tree(root))


def machine_ticks() -> list[int]:
    with open("/proc/stat") as fh:
        return [int(x) for x in fh.readline().split()[1:]]


def busy_cores(t0: list[int], t1: list[int], seconds: float) -> float:
    d = [b - a for a, b in zip(t0, t1)]
    idle = d[3] + (d[4] if len(d) > 4 else 0)  # idle + iowait
    return (sum(d[:8]) - idle) / CLK_TCK / seconds if seconds > 0 else 0.0


def vm_hwm_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class Pids:
    """Every process we start is listed here as "pid starttime" (field 22 of
    /proc/pid/stat), so that the shell's trap ends those and only those."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.live: dict[int, str] = {}

    def _write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(f"{p} {t}\n" for p, t in self.live.items()))
        tmp.replace(self.path)

    def add(self, pid: int) -> None:
        try:
            self.live[pid] = _stat_fields(pid)[19]
        except (OSError, IndexError):
            return
        self._write()

    def remove(self, pid: int) -> None:
        if self.live.pop(pid, None) is not None:
            self._write()


# --------------------------------------------------------------------------
# the load generator


class Source:
    """One ``smtp-source`` run; its CPU comes from wait4 on its own pid."""

    def __init__(self, port: int, n: int, size: int, sessions: int, out: Path, pids: Pids) -> None:
        self.argv = [SMTP_SOURCE, "-s", str(sessions), "-l", str(size), "-m", str(n),
                     "-f", SENDER, "-t", RCPT, f"127.0.0.1:{port}"]
        self.out = out
        self.t0 = time.perf_counter()
        self._fh = open(out, "wb")
        self.proc = subprocess.Popen(self.argv, stdout=self._fh, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        self.pids = pids
        pids.add(self.proc.pid)
        self.elapsed: float | None = None
        self.cpu = 0.0
        self.rc: int | None = None

    def poll(self, block: bool = False) -> bool:
        if self.rc is not None:
            return True
        pid, status, ru = os.wait4(self.proc.pid, 0 if block else os.WNOHANG)
        if pid == 0:
            return False
        self.elapsed = time.perf_counter() - self.t0
        self.rc = os.waitstatus_to_exitcode(status)
        self.proc.returncode = self.rc
        self.cpu = ru.ru_utime + ru.ru_stime
        self.pids.remove(self.proc.pid)
        self._fh.close()
        return True

    def wait(self) -> None:
        self.poll(block=True)

    def kill(self) -> None:
        if self.rc is None:
            try:
                self.proc.kill()
            except ProcessLookupError:
                pass
            self.poll(block=True)

    def check(self) -> None:
        if self.rc != 0:
            tail = self.out.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"smtp-source exited {self.rc}: {' '.join(self.argv)}\n{tail}")


class TlsSource:
    """One ``tls_source.py`` run (STARTTLS on every connection). It is set up
    and ready before ``go()``, so the measured interval leaves out the
    interpreter's start; rate and CPU come from its own JSON line (CPU over
    its sending; ``cpu_total`` from wait4 is its whole life)."""

    def __init__(self, port: int, n: int, size: int, sessions: int, out: Path, pids: Pids,
                 tls: bool = True) -> None:
        self.argv = [sys.executable, str(TLS_SOURCE), "--wait", "-s", str(sessions), "-l", str(size),
                     "-m", str(n), "-f", SENDER, "-t", RCPT, *([] if tls else ["--no-tls"]),
                     f"127.0.0.1:{port}"]
        self.out = out
        self._fh = open(out, "wb")
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._fh)
        self.pids = pids
        pids.add(self.proc.pid)
        self.elapsed: float | None = None
        self.cpu = 0.0
        self.cpu_total = 0.0
        self.rc: int | None = None
        self.result: dict = {}
        self.stdout = b""
        ready = self.proc.stdout.readline()
        if not ready.startswith(b'{"ready"'):
            self.kill()
            raise RuntimeError(f"tls_source did not start: {ready!r}\n{self.tail()}")

    def go(self) -> None:
        self.t0 = time.perf_counter()
        self.proc.stdin.write(b"go\n")
        self.proc.stdin.close()

    def wait(self) -> None:
        if self.rc is not None:
            return
        _, status, ru = os.wait4(self.proc.pid, 0)
        self.wall = time.perf_counter() - getattr(self, "t0", time.perf_counter())
        self.rc = os.waitstatus_to_exitcode(status)
        self.proc.returncode = self.rc
        self.cpu_total = ru.ru_utime + ru.ru_stime
        self.pids.remove(self.proc.pid)
        self.stdout = self.proc.stdout.read()
        self.proc.stdout.close()
        self._fh.close()
        for line in reversed(self.stdout.splitlines()):
            if line.startswith(b"{"):
                self.result = json.loads(line)
                break
        self.elapsed = self.result.get("seconds") or self.wall
        self.cpu = self.result.get("cpu_s", self.cpu_total)

    def kill(self) -> None:
        if self.rc is None:
            try:
                self.proc.kill()
            except ProcessLookupError:
                pass
            self.wait()

    def tail(self) -> str:
        try:
            return self.out.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def check(self, n: int) -> None:
        if self.rc != 0 or self.result.get("accepted") != n:
            raise RuntimeError(f"tls_source exited {self.rc}, {self.result.get('accepted')} of {n} accepted: "
                               f"{' '.join(self.argv)}\n{self.stdout.decode(errors='replace')}{self.tail()}")


class Sink:
    """``smtp-sink -c``: its counter line says how many messages it has taken."""

    _MESG = re.compile(rb"mesg=(\d+)")

    def __init__(self, port: int, out: Path, pids: Pids) -> None:
        self.out = out
        self._fh = open(out, "wb")
        self.proc = subprocess.Popen([SMTP_SINK, "-u", "nobody", "-c", f"127.0.0.1:{port}", "1000"],
                                     stdout=self._fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.pids = pids
        pids.add(self.proc.pid)
        self._off = 0
        self._last = 0
        wait_banner(port, 10, self.proc)

    def count(self) -> int:
        with open(self.out, "rb") as fh:
            fh.seek(max(0, os.path.getsize(self.out) - 200))
            tail = fh.read()
        found = self._MESG.findall(tail)
        if found:
            self._last = int(found[-1])
        return self._last

    def cpu(self) -> float:
        return proc_cpu(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.pids.remove(self.proc.pid)
        self._fh.close()


# --------------------------------------------------------------------------
# key material, and the signing milter Postfix uses


def make_tls_pair(d: Path) -> tuple[Path, Path]:
    """One ECDSA P-256 self-signed certificate and its key (PEM), given to
    both MTAs so that their handshakes cost the same."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    d.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench-tls.example")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName(
                [x509.DNSName(h) for h in ("bench-tls.example", "sluice-bench.example",
                                           "postfix-bench.example")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    key_path, cert_path = d / "tls-key.pem", d / "tls-cert.pem"
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def make_dkim_key(d: Path) -> Path:
    """An RSA 2048 key (PKCS#8 PEM, mode 0600, owned by root: both Sluice and
    OpenDKIM, which runs as root here, read it)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    d.mkdir(parents=True, exist_ok=True)
    path = d / f"dkim-{SELECTOR}.{DOMAIN}.pem"
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()))
    return path


def unfolded_headers(text: str) -> list[str]:
    """The header lines of ``text`` (up to the first empty line), folded
    lines joined."""
    out: list[str] = []
    for line in text.splitlines():
        if not line.strip():
            if out:
                break
            continue
        if line[:1] in (" ", "\t") and out:
            out[-1] += " " + line.strip()
        else:
            out.append(line.rstrip())
    return out


def dkim_signature(headers: list[str]) -> str | None:
    """The value of the first DKIM-Signature whose d= is our domain."""
    for h in headers:
        name, _, value = h.partition(":")
        if name.strip().lower() != "dkim-signature":
            continue
        tags = {k.strip(): v.strip() for k, _, v in (t.partition("=") for t in re.sub(r"\s+", "", value).split(";"))}
        if tags.get("d", "").lower() == DOMAIN:
            return value.strip()
    return None


def dkim_verifies(message: bytes, key: Path) -> bool | None:
    """dkimpy's verdict on ``message``'s signature, the public half of
    ``key`` standing in for the DNS record; None without dkimpy."""
    try:
        import dkim
        from cryptography.hazmat.primitives import serialization
    except ImportError:
        return None
    public = serialization.load_pem_private_key(key.read_bytes(), None).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    record = b"v=DKIM1; k=rsa; p=" + base64.b64encode(public)
    crlf = message.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    return bool(dkim.verify(crlf, dnsfunc=lambda name, timeout=5: record))


def signed_check(who: str, msg_id: str, message: str, key: Path) -> dict:
    """The DKIM-Signature with d=bench.example of one queued message, and
    that it verifies; RuntimeError otherwise."""
    sig = dkim_signature(unfolded_headers(message))
    if sig is None:
        raise RuntimeError(f"{who}: queued message {msg_id} has no DKIM-Signature with d={DOMAIN}:\n"
                           f"{message[:3000]}")
    verified = dkim_verifies(message.encode("utf-8", "surrogateescape"), key)
    if verified is False:
        raise RuntimeError(f"{who}: the DKIM-Signature of queued message {msg_id} does not verify:\n"
                           f"{message[:3000]}")
    return {"signed_sample": msg_id, "dkim_verified": verified,
            "dkim_signature": sig[:160] + ("..." if len(sig) > 160 else "")}


class OpenDkim:
    """A private ``opendkim`` (signing mode, our key, relaxed/relaxed) on a
    127.0.0.1 port, in the foreground (so it is our child, listed in Pids),
    running as root (no UserID: it reads the root-owned 0600 key)."""

    def __init__(self, base: Path, conf_dir: Path, key: Path, pids: Pids) -> None:
        self.base = base
        self.conf_dir = conf_dir
        self.key = key
        self.pids = pids
        self.port = free_port()
        self.out = base / "opendkim.out"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        """Its config file and key must sit where no directory above is
        writable by others (opendkim checks the whole path): ``conf_dir``."""
        self.base.mkdir(parents=True, exist_ok=True)
        conf = self.conf_dir / "opendkim.conf"
        conf.write_text(f"""\
Mode                    s
Domain                  {DOMAIN}
Selector                {SELECTOR}
KeyFile                 {self.key}
Socket                  inet:{self.port}@127.0.0.1
Canonicalization        relaxed/relaxed
SignatureAlgorithm      rsa-sha256
Background              no
Syslog                  no
""")
        self._fh = open(self.out, "wb")
        self.proc = subprocess.Popen([OPENDKIM, "-f", "-x", str(conf)], stdout=self._fh,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.pids.add(self.proc.pid)
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    break
            except OSError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"opendkim exited {self.proc.returncode}: "
                                   f"{self.out.read_text(errors='replace')[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"opendkim does not listen on 127.0.0.1:{self.port}")
            time.sleep(0.05)
        log(f"opendkim pid {self.proc.pid} on 127.0.0.1:{self.port}")

    def cpu(self) -> float:
        return proc_cpu(self.proc.pid) if self.proc and self.proc.poll() is None else 0.0

    def stop(self) -> None:
        if self.proc is not None:
            terminate(self.proc, "opendkim")
            self.pids.remove(self.proc.pid)
            self._fh.close()
            self.proc = None


# --------------------------------------------------------------------------
# the two MTAs


class Postfix:
    name = "postfix"

    def __init__(self, work: Path, port: int, pids: Pids) -> None:
        self.base = work / "postfix"
        self.etc = self.base / "etc"
        self.spool = self.base / "spool"
        self.data = self.base / "data"
        self.maillog = self.base / "maillog"
        self.port = port
        self.pids = pids
        self.master: int | None = None
        self.milter: OpenDkim | None = None
        self.milter_outs: list[Path] = []

    def start(self, mode: str, relay_port: int, tls: tuple[Path, Path] | None = None,
              dkim_key: Path | None = None) -> None:
        """``mode``: "held" (defer_transports = smtp) or "relay". ``tls``:
        (certificate, key) to offer STARTTLS with; ``dkim_key``: sign through
        a private OpenDKIM milter with that key."""
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)
        for d in (self.etc, self.spool, self.data):
            d.mkdir(parents=True)
        os.chmod(self.base, 0o755)
        shutil.chown(self.data, "postfix")
        held = "smtp" if mode == "held" else ""
        extra = ""
        if tls is not None:
            # loglevel 1: one "TLS connection established" line per session, checked afterwards
            extra += (f"smtpd_tls_security_level = may\nsmtpd_tls_cert_file = {tls[0]}\n"
                      f"smtpd_tls_key_file = {tls[1]}\nsmtpd_tls_loglevel = 1\n")
        if dkim_key is not None:
            self.milter = OpenDkim(self.base.parent / f"opendkim-{len(self.milter_outs)}", dkim_key.parent,
                                   dkim_key, self.pids)
            self.milter_outs.append(self.milter.out)
            self.milter.start()
            # a message the milter did not sign is refused (4xx), never accepted
            extra += (f"smtpd_milters = inet:127.0.0.1:{self.milter.port}\n"
                      "milter_default_action = tempfail\n")
        (self.etc / "main.cf").write_text(f"""\
compatibility_level = 3.6
queue_directory = {self.spool}
data_directory = {self.data}
myhostname = postfix-bench.example
mydomain = postfix-bench.example
myorigin = $myhostname
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
relayhost = [127.0.0.1]:{relay_port}
defer_transports = {held}
# a deferred message is not tried again during the run (Sluice: retry_interval 1h)
minimal_backoff_time = 1h
maximal_backoff_time = 2h
queue_run_delay = 1h
maillog_file = {self.maillog}
maillog_file_prefixes = {self.base}
biff = no
{extra}""")
        (self.etc / "master.cf").write_text(MASTER_CF.format(port=self.port))
        r = subprocess.run([POSTFIX, "-c", str(self.etc), "start"], capture_output=True, text=True, check=False)
        if r.returncode != 0:
            raise RuntimeError(f"postfix start failed ({r.returncode}): {r.stdout}{r.stderr}\n"
                               + self.log_tail())
        pidfile = self.spool / "pid" / "master.pid"
        deadline = time.monotonic() + 20
        while not pidfile.exists() or not pidfile.read_text().strip():
            if time.monotonic() > deadline:
                raise RuntimeError("postfix master wrote no pid file\n" + self.log_tail())
            time.sleep(0.05)
        self.master = int(pidfile.read_text().split()[0])
        self.pids.add(self.master)
        wait_banner(self.port, 30)

    def stop(self) -> None:
        try:
            self._stop_postfix()
        finally:
            if self.milter is not None:
                self.milter.stop()
                self.milter = None

    def _stop_postfix(self) -> None:
        if not (self.etc / "main.cf").exists():
            return
        if self.master is not None and Path(f"/proc/{self.master}").exists():
            subprocess.run([POSTFIX, "-c", str(self.etc), "stop"], capture_output=True, check=False)
            deadline = time.monotonic() + 20
            while Path(f"/proc/{self.master}").exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            if Path(f"/proc/{self.master}").exists():
                subprocess.run([POSTFIX, "-c", str(self.etc), "abort"], capture_output=True, check=False)
            if not Path(f"/proc/{self.master}").exists():
                self.pids.remove(self.master)
        self.master = None
        wait_closed(self.port)

    def cpu(self) -> float:
        """All of Postfix's processes, plus the signing milter when there is one."""
        return (tree_cpu(self.master) if self.master else 0.0) + self.milter_cpu()

    def milter_cpu(self) -> float:
        return self.milter.cpu() if self.milter is not None else 0.0

    def rss_mb(self) -> float:
        return 0.0

    def queued(self, queues: tuple[str, ...] = ("maildrop", "incoming", "active", "deferred", "hold")) -> int:
        n = 0
        for q in queues:
            for _, _, files in os.walk(self.spool / q):
                n += len(files)
        return n

    def settle(self, expect: int, timeout: float = 300.0) -> float:
        """Wait until all ``expect`` messages sit in the deferred queue."""
        t0 = time.perf_counter()
        last, since = None, t0
        while True:
            inflight = self.queued(("maildrop", "incoming", "active"))
            deferred = self.queued(("deferred",))
            if inflight == 0 and deferred >= expect:
                return time.perf_counter() - t0
            now = time.perf_counter()
            if (inflight, deferred) != last:
                last, since = (inflight, deferred), now
            # nothing moving for 15 s: some messages were refused (a tempfail, say)
            if now - t0 > timeout or (inflight == 0 and now - since > 15):
                raise RuntimeError(f"postfix did not settle: {inflight} in flight, {deferred} deferred"
                                   f" of {expect}\n" + self.log_tail())
            time.sleep(0.2)

    def log_count(self, needle: str) -> int:
        try:
            return self.maillog.read_text(errors="replace").count(needle)
        except OSError:
            return 0

    def log_problems(self) -> list[str]:
        try:
            lines = self.maillog.read_text(errors="replace").splitlines()
        except OSError:
            lines = []
        out = [ln for ln in lines if re.search(r"\b(warning|error|fatal|panic):", ln)]
        for path in self.milter_outs:
            try:
                out += [f"{path.parent.name}: {ln}" for ln in path.read_text(errors="replace").splitlines()
                        if ln.strip()]
            except OSError:
                pass
        return out

    def check_tls(self, n: int, timeout: float = 30.0) -> dict:
        """Every session of the run was encrypted: ``n`` "TLS connection
        established" lines in the maillog (postlogd may lag a little)."""
        needle = "TLS connection established from"
        deadline = time.monotonic() + timeout
        while (got := self.log_count(needle)) < n and time.monotonic() < deadline:
            time.sleep(0.2)
        if got < n:
            raise RuntimeError(f"postfix: {got} '{needle}' lines in the maillog for {n} messages")
        first = next((ln for ln in self.maillog.read_text(errors="replace").splitlines() if needle in ln), "")
        m = re.search(r"established from \S+: (\S+) with cipher (\S+)", first)
        return {"tls_sessions_logged": got, "server_tls_version": m.group(1) if m else None,
                "server_tls_cipher": m.group(2) if m else None}

    def check_signed(self, key: Path) -> dict:
        """One queued message (from ``postqueue -j``, read with ``postcat``)
        carries a DKIM-Signature with d=bench.example that verifies."""
        r = subprocess.run([POSTQUEUE, "-c", str(self.etc), "-j"], capture_output=True, text=True, check=False)
        ids = [json.loads(ln)["queue_id"] for ln in r.stdout.splitlines() if ln.startswith("{")]
        if not ids:
            raise RuntimeError(f"postfix: postqueue -j lists no message: {r.stdout[:500]}{r.stderr[:500]}")
        qid = ids[len(ids) // 2]
        r = subprocess.run([POSTCAT, "-c", str(self.etc), "-h", "-b", "-q", qid], capture_output=True,
                           text=True, errors="surrogateescape", check=False)
        if r.returncode != 0:
            raise RuntimeError(f"postfix: postcat -q {qid} failed: {r.stderr[:500]}")
        return signed_check("postfix", qid, r.stdout, key)

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.maillog.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


class Sluice:
    name = "sluice"

    def __init__(self, work: Path, port: int, http_port: int, pids: Pids) -> None:
        self.base = work / "sluice"
        self.data = self.base / "data"
        self.port = port
        self.http_port = http_port
        self.pids = pids
        self.proc: subprocess.Popen | None = None
        self._out = None
        self.outputs: list[Path] = []

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, mode: str, relay_port: int, tls: tuple[Path, Path] | None = None,
              dkim_key: Path | None = None) -> None:
        """``tls``: (certificate, key) for STARTTLS (otherwise Sluice's own
        self-signed one, unused by smtp-source's HELO sessions);
        ``dkim_key``: sign mail from bench.example with it."""
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)
        self.base.mkdir(parents=True)
        config = self.base / "sluice.toml"
        smtp_tls = (f'tls_certificate = "{tls[0]}"\ntls_private_key = "{tls[1]}"\n'
                    if tls is not None else "")
        dkim = (f'[dkim."{DOMAIN}"]\nselector = "{SELECTOR}"\nkey_file = "{dkim_key}"\n'
                f'algorithm = "rsa-sha256"\n' if dkim_key is not None else "")
        config.write_text(f"""\
[server]
data_dir = "{self.data}"
node_name = "bench"
[smtp]
listen = ["127.0.0.1:{self.port}"]
hostname = "sluice-bench.example"
{smtp_tls}[http]
listen = ["127.0.0.1:{self.http_port}"]
[queue]
retry_interval = "1h"
[routes]
"{DOMAIN}" = "127.0.0.1:{relay_port}"
{dkim}""")
        out = self.base.parent / f"sluice-serve-{len(self.outputs)}.out"
        self.outputs.append(out)
        self._out = open(out, "wb")
        self.proc = subprocess.Popen([str(SLUICE), "serve", "--config", str(config)],
                                     stdout=self._out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        self.pids.add(self.proc.pid)
        wait_banner(self.port, 60, self.proc)
        log(f"sluice serve pid {self.proc.pid}")
        if mode == "held":
            self.api("POST", "/api/admin/suspend/v1",
                     {"domain": DOMAIN, "reason": "bench: hold mail", "duration": "1h"})

    def api(self, method: str, path: str, body: dict | None = None):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.endpoint + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read() or b"null")

    def metrics(self) -> dict:
        return self.api("GET", "/metrics.json")

    def queued(self) -> int:
        return sum(self.metrics().get("scheduled", {}).values())

    def settle(self, expect: int, timeout: float = 300.0) -> float:
        t0 = time.perf_counter()
        last, since = None, t0
        while True:
            n = self.queued()
            if n >= expect:
                return time.perf_counter() - t0
            now = time.perf_counter()
            if n != last:
                last, since = n, now
            if now - t0 > timeout or now - since > 15:
                raise RuntimeError(f"sluice did not settle: {n} scheduled of {expect}")
            time.sleep(0.2)

    def reception_records(self, n: int, timeout: float = 30.0) -> list[bytes]:
        """The Reception records of the run, once there are ``n`` (the log
        writer may lag behind the spool a little)."""
        deadline = time.monotonic() + timeout
        while True:
            recs = []
            for path in sorted((self.data / "logs").glob("*.jsonl")):
                with open(path, "rb") as fh:
                    recs += [ln for ln in fh if b'"type":"Reception"' in ln]
            if len(recs) >= n or time.monotonic() > deadline:
                return recs
            time.sleep(0.2)

    def check_tls(self, n: int) -> dict:
        """Every message of the run came over TLS: each Reception record has
        ``tls_protocol_version``."""
        recs = self.reception_records(n)
        tls = [r for r in recs if b'"tls_protocol_version"' in r]
        if len(recs) < n or len(tls) < len(recs):
            raise RuntimeError(f"sluice: {len(recs)} Reception records for {n} messages, "
                               f"{len(tls)} with tls_protocol_version")
        first = json.loads(tls[0])
        return {"tls_sessions_logged": len(tls), "server_tls_version": first.get("tls_protocol_version"),
                "server_tls_cipher": first.get("tls_cipher")}

    def check_signed(self, key: Path) -> dict:
        """One queued message (its id from a Reception record, its body from
        inspect-message) carries a DKIM-Signature with d=bench.example that
        verifies."""
        recs = self.reception_records(1)
        if not recs:
            raise RuntimeError("sluice: no Reception record in the logs")
        msg_id = json.loads(recs[len(recs) // 2])["id"]
        got = self.api("GET", f"/api/admin/inspect-message/v1?id={msg_id}&want_body=true")
        return signed_check("sluice", msg_id, got.get("body") or "", key)

    def cpu(self) -> float:
        # the main process and its reception and delivery processes
        return tree_cpu(self.proc.pid) if self.proc else 0.0

    def rss_mb(self) -> float:
        """Peak RSS: the main process's plus its child processes' (VmHWM each)."""
        if not self.proc:
            return 0.0
        return sum(vm_hwm_mb(p) for p in process_tree(self.proc.pid))

    def stop(self) -> tuple[int | None, float]:
        code, took = None, 0.0
        if self.proc is not None:
            code, took = terminate(self.proc, "sluice")
            self._out.close()
            self.pids.remove(self.proc.pid)
            self.proc = None
            wait_closed(self.port)
        return code, took

    def log_problems(self) -> list[str]:
        out = []
        for path in self.outputs:
            try:
                for ln in path.read_text(errors="replace").splitlines():
                    if re.search(r"Traceback|ERROR|Error|CRITICAL|WARNING|exception", ln):
                        out.append(f"{path.name}: {ln}")
            except OSError:
                pass
        return out


# --------------------------------------------------------------------------
# measurements


class Meter:
    """Wall clock, machine busy cores, MTA CPU around one measured interval."""

    def __init__(self, mta) -> None:
        self.mta = mta

    def __enter__(self) -> Meter:
        self.t0 = time.perf_counter()
        self.m0 = machine_ticks()
        self.c0 = self.mta.cpu()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.t0
        self.m1 = machine_ticks()
        self.mta_cpu = self.mta.cpu() - self.c0
        self.busy = busy_cores(self.m0, self.m1, self.seconds)

    def other(self, client_cpu: float) -> float:
        """Busy cores not accounted to the MTA or our own tools: other
        processes, and kernel threads (journal commits, loopback softirq)."""
        return round(self.busy - (self.mta_cpu + client_cpu) / self.seconds, 2)


def accept(mta, args, work: Path, pids: Pids, n: int, size: int, dead_port: int,
           variant: str = "plain", keys: dict | None = None) -> dict:
    """Accept rate with the mail held. ``variant``: "plain" (smtp-source),
    "tls" (tls_source.py, STARTTLS on every connection, with ``keys["tls"]``)
    or "dkim" (smtp-source; the MTA signs with ``keys["dkim"]``). The tls and
    dkim variants check afterwards that the run really was encrypted / signed."""
    keys = keys or {}
    mta.start("held", dead_port, tls=keys.get("tls") if variant == "tls" else None,
              dkim_key=keys.get("dkim") if variant == "dkim" else None)
    wait_quiet(args.quiet, args.patience)
    tag = {"plain": str(size), "tls": "tls", "dkim": "dkim"}[variant]
    out = work / f"source-{mta.name}-{tag}.out"
    milter0 = mta.milter_cpu() if isinstance(mta, Postfix) else 0.0
    if variant == "tls":
        src = TlsSource(mta.port, n, size, args.sessions, out, pids)
        try:
            with Meter(mta) as m:
                src.go()
                src.wait()
        except BaseException:
            src.kill()
            raise
        src.check(n)
    else:
        with Meter(mta) as m:
            src = Source(mta.port, n, size, args.sessions, out, pids)
            src.wait()
        src.check()
        if variant == "dkim":
            # a refused message (the milter's tempfail) is fatal to smtp-source (exit 1,
            # caught by check()); any warning it printed fails the figure too
            bad = [ln for ln in out.read_text(errors="replace").splitlines()
                   if re.search(r"\b(warning|error|fatal):", ln)]
            if bad:
                raise RuntimeError(f"{mta.name}: smtp-source: " + "\n".join(bad[:10]))
    milter_cpu = (mta.milter_cpu() if isinstance(mta, Postfix) else 0.0) - milter0
    settle = mta.settle(n)
    queued = mta.queued()
    rss = mta.rss_mb()
    checked: dict = {}
    if variant == "tls":
        checked = {**mta.check_tls(n), "client": "tls_source.py", "client_loop": src.result.get("loop"),
                   "client_tls_version": src.result.get("tls_version"),
                   "client_tls_cipher": src.result.get("tls_cipher"),
                   "client_cpu_total_s": round(src.cpu_total, 2)}
    elif variant == "dkim":
        checked = mta.check_signed(keys["dkim"])
        if isinstance(mta, Postfix):
            checked["milter_cpu_s"] = round(milter_cpu, 1)
            checked["milter_cores"] = round(milter_cpu / m.seconds, 2)
    mta.stop()
    return {"n": n, "size": size, "seconds": round(src.elapsed, 3), "rate": round(n / src.elapsed, 1),
            "mta_cpu_s": round(m.mta_cpu, 1), "mta_cpu_ms_per_msg": round(m.mta_cpu / n * 1000, 3),
            "client_cpu_s": round(src.cpu, 2), "client_cpu_ms_per_msg": round(src.cpu / n * 1000, 3),
            "machine_busy_cores": round(m.busy, 2), "mta_cores": round(m.mta_cpu / m.seconds, 2),
            "client_cores": round(src.cpu / m.seconds, 2),
            "other_load_cores": m.other(src.cpu), "settled_after_s": round(settle, 2),
            "queued": queued, "rss_mb": round(rss, 1), **checked}


def relay(mta, args, work: Path, pids: Pids, n: int, size: int) -> dict:
    sink_port = free_port()
    sink = Sink(sink_port, work / f"sink-{mta.name}.out", pids)
    try:
        mta.start("relay", sink_port)
        wait_quiet(args.quiet, args.patience)
        s0 = sink.cpu()
        with Meter(mta) as m:
            src = Source(mta.port, n, size, args.sessions, work / f"source-{mta.name}-relay.out", pids)
            deadline = time.perf_counter() + args.relay_timeout
            while True:
                src.poll()
                got = sink.count()
                if got >= n:
                    break
                if src.rc not in (None, 0):
                    src.check()
                if time.perf_counter() > deadline:
                    raise RuntimeError(f"{mta.name}: sink has {got} of {n} after {args.relay_timeout}s")
                time.sleep(0.02)
        e2e = time.perf_counter() - src.t0
        sink_cpu = sink.cpu() - s0
        src.wait()
        src.check()
        rss = mta.rss_mb()
        extra = {}
        if isinstance(mta, Sluice):
            ready = mta.metrics().get("ready", {})
            extra = {"delivered": sum(v.get("delivered", 0) for v in ready.values()),
                     "failed": sum(v.get("failed", 0) for v in ready.values())}
        mta.stop()
        if isinstance(mta, Postfix):
            extra = {"delivered": mta.log_count("status=sent"), "deferred": mta.log_count("status=deferred")}
    except BaseException:
        if "src" in locals():
            src.kill()
        raise
    finally:
        sink.stop()
    return {"n": n, "size": size, "seconds": round(e2e, 3), "rate": round(n / e2e, 1),
            "accept_seconds": round(src.elapsed, 3), "accept_rate": round(n / src.elapsed, 1),
            "sink_count": sink.count(), "mta_cpu_s": round(m.mta_cpu, 1),
            "mta_cpu_ms_per_msg": round(m.mta_cpu / n * 1000, 3), "client_cpu_s": round(src.cpu, 2),
            "sink_cpu_s": round(sink_cpu, 2), "machine_busy_cores": round(m.busy, 2),
            "other_load_cores": m.other(src.cpu + sink_cpu),
            "rss_mb": round(rss, 1), **extra}


def purge(mta, args, work: Path, pids: Pids, n: int, dead_port: int) -> dict:
    mta.start("held", dead_port)
    time.sleep(1.0)
    log(f"{mta.name}: queueing {n} messages of {args.purge_size} B for the purge")
    fill = Source(mta.port, n, args.purge_size, args.sessions, work / f"source-{mta.name}-fill.out", pids)
    fill.wait()
    fill.check()
    settle = mta.settle(n)
    queued = mta.queued()
    log(f"{mta.name}: {queued} queued (filled at {n / fill.elapsed:.0f} msg/s); purging")
    rss_full = mta.rss_mb()
    wait_quiet(args.quiet, args.patience)
    if isinstance(mta, Postfix):
        before = mta.log_count("postsuper")
        with Meter(mta) as m:
            ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            r = subprocess.run([POSTSUPER, "-c", str(mta.etc), "-d", "ALL"], capture_output=True, text=True, check=False)
            t_cmd = time.perf_counter() - m.t0
            ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            left = mta.queued()
            while mta.log_count("postsuper") <= before and time.perf_counter() - m.t0 < 60:
                time.sleep(0.01)
        if r.returncode != 0:
            raise RuntimeError(f"postsuper failed: {r.stdout}{r.stderr}")
        record = [ln for ln in mta.log_tail(50).splitlines() if "postsuper" in ln][-1:]
        done = {"command_s": round(t_cmd, 3), "records": 1, "log": record,
                "tool_cpu_s": round((ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime), 2)}
    else:
        counter = AdminBounceCounter(mta.data / "logs")
        before = counter.poll()
        with Meter(mta) as m:
            ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            r = subprocess.run([str(KCLI), "--endpoint", mta.endpoint, "bounce", "--everything",
                                "--reason", "purge"], capture_output=True, text=True, check=False)
            t_cmd = time.perf_counter() - m.t0
            ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            if r.returncode != 0:
                raise RuntimeError(f"kcli bounce failed: {r.stdout}{r.stderr}")
            t_empty = None
            while True:
                got = counter.poll() - before
                if t_empty is None and mta.queued() == 0:
                    t_empty = time.perf_counter() - m.t0
                if got >= queued and t_empty is not None:
                    break
                if time.perf_counter() - m.t0 > args.purge_timeout:
                    raise RuntimeError(f"sluice: {got} AdminBounce records of {queued} after {args.purge_timeout}s")
                time.sleep(0.02)
        left = mta.queued()
        done = {"command_s": round(t_cmd, 3), "spool_empty_s": round(t_empty, 3),
                "records": counter.count - before,
                "tool_cpu_s": round((ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime), 2)}
    rss_after = mta.rss_mb()
    mta.stop()
    return {"n": n, "queued": queued, "seconds": round(m.seconds, 3), "rate": round(queued / m.seconds, 1),
            "left": left, "mta_cpu_s": round(m.mta_cpu, 1), "machine_busy_cores": round(m.busy, 2),
            "other_load_cores": m.other(done["tool_cpu_s"]),
            "fill_seconds": round(fill.elapsed, 1), "fill_rate": round(n / fill.elapsed, 1),
            "fill_settled_after_s": round(settle, 2), "rss_mb_full": round(rss_full, 1),
            "rss_mb_after": round(rss_after, 1), **done}


# --------------------------------------------------------------------------


def idle_load(seconds: float = 3.0) -> float:
    t0, m0 = time.perf_counter(), machine_ticks()
    time.sleep(seconds)
    return busy_cores(m0, machine_ticks(), time.perf_counter() - t0)


QUIET_LOG: list[float] = []


HOLD = 0.0


def wait_quiet(limit: float, patience: float) -> float:
    """Wait (at most ``patience`` s) until the machine is idle: less than
    ``limit`` cores busy over 2 s. Returns the last reading."""
    if HOLD:
        time.sleep(HOLD)
    deadline = time.monotonic() + patience
    while True:
        load = idle_load(2.0)
        if load <= limit or time.monotonic() > deadline:
            if load > limit:
                log(f"machine still busy ({load:.2f} cores) after {patience:.0f}s: measuring anyway")
            QUIET_LOG.append(round(load, 2))
            return load
        log(f"machine busy ({load:.2f} cores): waiting")


def fmt_ratio(s: float, p: float) -> str:
    return f"{s / p:.2f}" if p else "-"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, required=True, help="an empty directory on disk (not tmpfs)")
    ap.add_argument("--sessions", type=int, default=50)
    ap.add_argument("--n10k", type=int, default=20000, help="10 KB messages for the accept figure")
    ap.add_argument("--n100k", type=int, default=5000, help="100 KB messages for the accept figure")
    ap.add_argument("--n-tls", type=int, default=10000, help="10 KB messages for the accept-tls figure")
    ap.add_argument("--n-dkim", type=int, default=10000, help="10 KB messages for the accept-dkim figure")
    ap.add_argument("--relay-n", type=int, default=10000, help="10 KB messages relayed to smtp-sink")
    ap.add_argument("--purge-n", type=int, default=100000, help="messages queued, then purged")
    ap.add_argument("--purge-size", type=int, default=1024, help="smtp-source -l for the purge fill")
    ap.add_argument("--relay-timeout", type=float, default=300.0)
    ap.add_argument("--purge-timeout", type=float, default=300.0)
    ap.add_argument("--quiet", type=float, default=0.25,
                    help="before each measurement, wait until fewer cores than this are busy")
    ap.add_argument("--patience", type=float, default=60.0, help="... but no longer than this (s)")
    ap.add_argument("--repeat", type=int, default=2,
                    help="rounds of the accept and relay figures; the fastest round of each counts")
    ap.add_argument("--mta", choices=("both", "postfix", "sluice"), default="both",
                    help="measure only one of them (the table then has no ratio)")
    ap.add_argument("--hold", type=float, default=0.0,
                    help="seconds to wait after starting each MTA, e.g. to attach py-spy (pid in the log)")
    ap.add_argument("--only", default=",".join(FIGURES),
                    help="comma-separated subset of " + ",".join(FIGURES))
    args = ap.parse_args()
    only = {f.strip() for f in args.only.split(",") if f.strip()}
    if not only or only - set(FIGURES):
        ap.error(f"--only: unknown figure(s) {', '.join(sorted(only - set(FIGURES))) or '(none given)'};"
                 f" choose from {','.join(FIGURES)}")
    if "accept-dkim" in only and args.mta in ("both", "postfix") and not os.access(OPENDKIM, os.X_OK):
        ap.error(f"accept-dkim needs {OPENDKIM} for Postfix (Debian package opendkim; peer_postfix.sh installs it)")

    def _terminate(signum, frame):  # run the finally blocks, which stop the MTAs
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, _terminate)
    global HOLD
    HOLD = args.hold

    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.chmod(work, 0o755)
    pids = Pids(work / "pids")
    dead_port = free_port()
    postfix = Postfix(work, free_port(), pids)
    sluice = Sluice(work, free_port(), free_port(), pids)

    pf_version = subprocess.run(["/usr/sbin/postconf", "-d", "-h", "mail_version"],
                                capture_output=True, text=True, check=False).stdout.strip()
    sl_version = subprocess.run([sys.executable, "-c", "import importlib.metadata as m; print(m.version('sluice'))"],
                                capture_output=True, text=True, check=False).stdout.strip()
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True, check=False).stdout.strip()
    dirty = subprocess.run(["git", "--no-optional-locks", "-C", str(ROOT), "status", "--porcelain", "--", "src"],
                           capture_output=True, text=True, check=False).stdout.strip()
    commit = os.environ.get("PEER_SLUICE_COMMIT") or (commit + (" + uncommitted changes in src/" if dirty else ""))
    where = subprocess.run([sys.executable, "-c", "import sluice; print(sluice.__file__)"],
                           capture_output=True, text=True, check=False).stdout.strip()
    info = {"nproc": os.cpu_count(), "python": sys.version.split()[0], "postfix": pf_version,
            "sluice": sl_version, "commit": commit, "sluice_module": where,
            "fs": fs_type(work), "idle_load_cores": round(wait_quiet(args.quiet, args.patience), 2)}
    log(f"machine: {info}")

    res: dict[str, dict[str, dict]] = {}
    mtas = [m for m in (postfix, sluice) if args.mta in ("both", m.name)]
    own_keydir = None
    try:
        # The private keys (one TLS pair, one DKIM key, each shared by both
        # MTAs) and opendkim's config go in a root-only directory with no
        # world-writable one above it: opendkim checks the whole path, and
        # /var/tmp would fail. peer_postfix.sh makes it (PEER_KEYDIR).
        keydir = Path(os.environ["PEER_KEYDIR"]) if os.environ.get("PEER_KEYDIR") else None
        if keydir is None and only & {"accept-tls", "accept-dkim"}:
            keydir = own_keydir = Path(tempfile.mkdtemp(prefix="peer-postfix-keys.", dir="/run"))
        keys: dict = {}
        if "accept-tls" in only:
            keys["tls"] = make_tls_pair(keydir)
        if "accept-dkim" in only:
            keys["dkim"] = make_dkim_key(keydir)

        def best_of(key: str, mta, run) -> None:
            """Keep the fastest of the rounds (the least disturbed by other
            work on the machine); every round's rate and other load is kept."""
            r = run()
            log(f"  {r}")
            mine = res.setdefault(key, {})
            runs = mine.get(mta.name, {}).get("runs", []) + [[r["rate"], r["other_load_cores"]]]
            if mta.name not in mine or r["rate"] > mine[mta.name]["rate"]:
                mine[mta.name] = r
            mine[mta.name]["runs"] = runs

        for round_ in range(1, args.repeat + 1):
            for key, size, n, variant in (("accept10k", 10240, args.n10k, "plain"),
                                          ("accept100k", 102400, args.n100k, "plain"),
                                          ("accept-tls", 10240, args.n_tls, "tls"),
                                          ("accept-dkim", 10240, args.n_dkim, "dkim")):
                if key not in only:
                    continue
                for mta in mtas:
                    what = {"plain": "", "tls": ", STARTTLS", "dkim": ", DKIM-signed"}[variant]
                    log(f"{mta.name}: accept {n} x {size} B{what}, {args.sessions} sessions, held (round {round_})")
                    best_of(key, mta, lambda m=mta, n=n, size=size, v=variant:
                            accept(m, args, work, pids, n, size, dead_port, v, keys))
            if "relay" in only:
                for mta in mtas:
                    log(f"{mta.name}: relay {args.relay_n} x 10240 B to smtp-sink (round {round_})")
                    best_of("relay", mta, lambda m=mta: relay(m, args, work, pids, args.relay_n, 10240))
        if "purge" in only:
            for mta in mtas:
                res.setdefault("purge", {})[mta.name] = r = purge(mta, args, work, pids, args.purge_n, dead_port)
                log(f"  {r}")
    finally:
        for mta in (postfix, sluice):
            try:
                mta.stop()
            except Exception as exc:  # keep cleaning up
                log(f"stopping {mta.name}: {exc}")
        if own_keydir is not None:
            shutil.rmtree(own_keydir, ignore_errors=True)

    print()
    print(f"Sluice {sl_version} ({info['commit']}) vs Postfix {pf_version}; smtp-source -s {args.sessions},"
          f" one connection per message; {info['nproc']} cores; spool on {info['fs']};"
          f" idle load before {info['idle_load_cores']} cores")
    if "accept-tls" in res:
        any_tls = next(iter(res["accept-tls"].values()))
        print(f"accept-tls: bench/tls_source.py -s {args.sessions} ({any_tls.get('client_loop')}), EHLO + STARTTLS,"
              f" a full handshake per message, {any_tls.get('client_tls_version')}"
              f" {any_tls.get('client_tls_cipher')}, ECDSA P-256 certificate")
    if "accept-dkim" in res:
        print("accept-dkim: smtp-source; rsa-sha256 2048 bits, relaxed/relaxed; Postfix through OpenDKIM"
              " (milter), Sluice at reception")
    print()
    head = f"{'figure':<48} {'Postfix':>10} {'Sluice':>10} {'Sluice/Postfix':>15}"
    print(head)
    print("-" * len(head))
    rows = []

    def row(label: str, key: str, field: str, unit: str, better: str) -> None:
        if key not in res:
            return
        p = res[key].get("postfix", {}).get(field)
        s = res[key].get("sluice", {}).get(field)
        rows.append({"figure": label, "postfix": p, "sluice": s, "unit": unit,
                     "ratio": round(s / p, 3) if p and s else None, "better": better})
        cell = lambda v: f"{v:>10.1f}" if v is not None else f"{'-':>10}"
        print(f"{label:<48} {cell(p)} {cell(s)} {fmt_ratio(s, p) if p and s else '-':>15}")

    if "accept10k" in res:
        row(f"accept 10 KB, held (msg/s, n={args.n10k})", "accept10k", "rate", "msg/s", "higher")
    if "accept100k" in res:
        row(f"accept 100 KB, held (msg/s, n={args.n100k})", "accept100k", "rate", "msg/s", "higher")
    if "accept-tls" in res:
        row(f"accept 10 KB, STARTTLS, held (msg/s, n={args.n_tls})", "accept-tls", "rate", "msg/s", "higher")
    if "accept-dkim" in res:
        row(f"accept 10 KB, DKIM-signed, held (msg/s, n={args.n_dkim})", "accept-dkim", "rate", "msg/s", "higher")
    if "relay" in res:
        row("relay 10 KB to smtp-sink, end to end (msg/s)", "relay", "rate", "msg/s", "higher")
    if "purge" in res:
        row(f"purge {args.purge_n} queued (s, lower is better)", "purge", "seconds", "s", "lower")
    print()
    print("where the cores went during the accept figures (best round; busy = MTA + load generator + other):")
    for key in ("accept10k", "accept100k", "accept-tls", "accept-dkim"):
        for name in ("postfix", "sluice"):
            r = res.get(key, {}).get(name)
            if r:
                milter = f" (of which OpenDKIM {r['milter_cores']:.2f})" if "milter_cores" in r else ""
                print(f"  {key:<11} {name:<7} {r['machine_busy_cores']:.2f} of {info['nproc']} cores busy ="
                      f" MTA {r['mta_cores']:.2f}{milter} + client {r['client_cores']:.2f}"
                      f" ({r['client_cpu_ms_per_msg']:.2f} ms/msg) + other {r['other_load_cores']:.2f};"
                      f" MTA {r['mta_cpu_ms_per_msg']:.2f} ms/msg")
    print()
    print(f"details (best of {args.repeat} rounds for accept and relay, \"runs\" = [rate, other load] of each;"
          " CPU seconds over the measured interval; MTA = all its processes):")
    for key in FIGURES:
        for name in ("postfix", "sluice"):
            if name in res.get(key, {}):
                print(f"  {key:<11} {name:<7} {json.dumps(res[key][name], separators=(',', ':'))}")
    problems = {"postfix": postfix.log_problems()[:20], "sluice": sluice.log_problems()[:20]}
    for name, lines in problems.items():
        print(f"  {name} log warnings/errors: {len(lines)}" + "".join(f"\n    {ln}" for ln in lines[:10]))
    print(f"  machine load (cores) in the 2 s before each measurement: {QUIET_LOG}")
    print(json.dumps({"bench": "peer_postfix", **info, "repeat": args.repeat, "pre_measure_load": QUIET_LOG, "sessions": args.sessions, "figures": rows,
                      "details": res, "log_problems": {k: len(v) for k, v in problems.items()}},
                     separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
