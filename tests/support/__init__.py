"""Everything the tests share: servers to run (``sluice serve`` and ``sluice
sink`` processes, or a ``Server`` in the test's own event loop), waiting for
what they do, peers to talk to (``peers``), load and consistency checks
(``load``), and KumoMTA's log record model (``kumo_record``)."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import smtplib
import socket
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from .kumo_record import parse as parse_kumo_record

BIN = Path(sys.executable).parent


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


_EPHEMERAL = _ephemeral_range()


def _port_range() -> tuple[int, int]:
    """Ports outside the kernel's range for outgoing connections (a port from
    that range can be taken by a client connection between now and the moment
    a server binds it), and, under pytest-xdist, a slice of them per worker: a
    port another worker picked a moment ago is never picked here before that
    worker's server has bound it."""
    low, high = (20000, _EPHEMERAL[0]) if _EPHEMERAL[0] > 21000 else (_EPHEMERAL[1] + 1, 65000)
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    if worker.startswith("gw") and worker[2:].isdigit() and count > 1:
        size = (high - low) // count
        low += int(worker[2:]) % count * size
        high = low + size
    return low, high


_GIVEN: set[int] = set()


def free_port() -> int:
    """A port nothing listens on (see ``_port_range``), never the same one
    twice in a test process: a port a test uses as a closed destination must
    not become the listening port of a server started after it."""
    low, high = _port_range()
    if len(_GIVEN) > (high - low) // 2:
        _GIVEN.clear()  # a long run: start over (the oldest tests are long done)
    for _ in range(200):
        port = random.randrange(low, high)
        if port in _GIVEN:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _GIVEN.add(port)
        return port
    raise RuntimeError("no free port found")


def wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on port {port}")


def wait_for(pred: Callable[[], Any], timeout: float = 15.0, interval: float = 0.1) -> Any:
    deadline = time.time() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


def wait_smtp(port: int, timeout: float = 30.0) -> None:
    """Wait until an SMTP server on ``port`` greets with 220 (a bound port is
    not yet a served one: the listening socket is bound before the rules load)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock:
                sock.settimeout(max(0.5, deadline - time.time()))
                if sock.recv(512).startswith(b"220"):
                    sock.sendall(b"QUIT\r\n")
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"no SMTP greeting on port {port}")


class Sink:
    """A ``sluice sink`` subprocess that records what it accepted."""

    def __init__(self, tmp: Path, stats: Path | None = None) -> None:
        """``stats``: the sink rewrites this file every second with its
        figures (``sluice sink --stats``)."""
        self.port = free_port()
        self.record = tmp / f"sink-{self.port}.jsonl"
        self.stats = stats
        self.proc: subprocess.Popen | None = None

    def start(self) -> Sink:
        self.proc = subprocess.Popen(
            [BIN / "sluice", "sink", "--listen", f"127.0.0.1:{self.port}",
             "--record", str(self.record),
             *(["--stats", str(self.stats)] if self.stats is not None else [])],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        wait_smtp(self.port)
        if self.proc.poll() is not None:  # what answered is another program
            raise RuntimeError(f"sluice sink exited: {self.proc.stdout.read().decode()}")
        return self

    def stop(self) -> str:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            out, _ = self.proc.communicate(timeout=10)
            return out.decode()
        return ""

    def received(self) -> list[dict]:
        if not self.record.exists():
            return []
        return [json.loads(line) for line in self.record.read_text().splitlines() if line]

    def recipients(self) -> list[str]:
        return [r for m in self.received() for r in m["recipients"]]


class Serve:
    """A ``sluice serve`` subprocess with its own ports and data dir."""

    def __init__(self, tmp: Path, extra: str = "", routes: dict[str, str] | None = None,
                 queue: str = "", http_port: int | None = None,
                 workers: int | None = None, smtp: str = "", node_name: str = "test") -> None:
        """``workers`` None: the default (one reception process per core and
        a delivery process); 0: everything in one process. ``smtp``: more
        ``[smtp]`` lines."""
        self.dir = tmp
        self.smtp_port = free_port()
        self.http_port = http_port or free_port()
        self.data = tmp / "var"
        self.config = tmp / "sluice.toml"
        queue = queue or 'retry_interval = "1s"\nmax_retry_interval = "2s"'
        routes_toml = "\n".join(f'"{d}" = "{hp}"' for d, hp in (routes or {}).items())
        self.config.write_text(f"""
[server]
data_dir = "{self.data}"
node_name = "{node_name}"
{"" if workers is None else f"workers = {workers}"}
[smtp]
listen = ["127.0.0.1:{self.smtp_port}"]
hostname = "mta.test"
{smtp}
[http]
listen = ["127.0.0.1:{self.http_port}"]
[queue]
{queue}
[routes]
{routes_toml}
{extra}
""")
        self.proc: subprocess.Popen | None = None
        self.log = tmp / "serve.out"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> Serve:
        self.proc = subprocess.Popen([BIN / "sluice", "serve", "--config", str(self.config)],
                                     stdout=open(self.log, "ab"), stderr=subprocess.STDOUT)
        try:
            wait_port(self.http_port)
            wait_smtp(self.smtp_port)
            if self.proc.poll() is not None:  # what answered is another program
                raise TimeoutError
        except TimeoutError:
            raise RuntimeError(f"sluice serve did not come up (exit status "
                               f"{self.proc.poll()}):\n{self.log.read_text()[-3000:]}") from None
        return self

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def send(self, recipients: list[str], *, sender: str = "sender@example.org",
             headers: dict[str, str] | None = None, body: str = "hello\r\n") -> dict:
        hdrs = {"Subject": "test", **(headers or {})}
        msg = "".join(f"{k}: {v}\r\n" for k, v in hdrs.items()) + "\r\n" + body
        with smtplib.SMTP("127.0.0.1", self.smtp_port, timeout=30) as s:
            return s.sendmail(sender, recipients, msg.encode())

    def records(self, kind: str | None = None) -> list[dict]:
        """The log records written so far; each one must parse as KumoMTA's
        ``JsonLogRecord`` (tests/kumo_record.py), or this raises."""
        out = []
        logs = self.data / "logs"
        if not logs.exists():
            return out
        for path in sorted(logs.glob("[0-9]*.jsonl")):  # the day files, not audit.jsonl
            for line in path.read_text().splitlines():
                if line:
                    parse_kumo_record(line)
                    rec = json.loads(line)
                    if kind is None or rec["type"] == kind:
                        out.append(rec)
        return out

    def by_recipient(self, kind: str) -> dict[str, dict]:
        return {r["recipient"]: r for r in self.records(kind)}

    def api(self, method: str, path: str, body: Any = None, **kw: Any) -> httpx.Response:
        return httpx.request(method, self.endpoint + path, json=body, timeout=30, **kw)

    def scheduled(self) -> dict[str, int]:
        return self.api("GET", "/metrics.json").json()["scheduled"]

    def kcli(self, *args: str, env: dict | None = None, check: bool = False) -> subprocess.CompletedProcess:
        e = {**os.environ, "KUMO_KCLI_ENDPOINT": self.endpoint, **(env or {})}
        return subprocess.run([BIN / "kcli", *args], capture_output=True, text=True, env=e,
                              timeout=60, check=check)


def settings_for(tmp: Path, *, routes: dict[str, str] | None = None, workers: int = 0,
                 **sections: dict[str, Any]):
    """Settings for a server run inside the test process: its own data dir
    and free ports, retries after a second."""
    from sluice.config import settings_from_dict

    raw: dict[str, Any] = {
        "server": {"data_dir": str(tmp / "var"), "node_name": "test", "workers": workers},
        "smtp": {"listen": [f"127.0.0.1:{free_port()}"], "hostname": "mta.test"},
        "http": {"listen": [f"127.0.0.1:{free_port()}"]},
        "queue": {"retry_interval": "1s", "max_retry_interval": "2s"},
        "routes": routes or {},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return settings_from_dict(raw)


class InProcess:
    """A ``sluice.server.Server`` started in the test's event loop, so a test
    can reach into its parts (the spool, the manager) while it runs."""

    def __init__(self, settings: Any) -> None:
        from sluice.server import Server

        self.settings = settings
        self.server = Server(settings)
        self.services = self.server.services
        self.smtp_port = int(settings.smtp.listen[0].rpartition(":")[2])
        self.http_port = int(settings.http.listen[0].rpartition(":")[2])
        self.data = Path(settings.server.data_dir)

    async def __aenter__(self) -> InProcess:
        await self.server.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.server.stop()

    records = Serve.records
    by_recipient = Serve.by_recipient

    async def send(self, recipients: list[str], **kw: Any) -> dict:
        return await asyncio.to_thread(Serve.send, self, recipients, **kw)  # type: ignore[arg-type]

    async def api(self, method: str, path: str, body: Any = None) -> httpx.Response:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.http_port}") as client:
            return await client.request(method, path, json=body, timeout=30)


async def until(pred: Callable[[], Any], timeout: float = 15.0, interval: float = 0.05) -> Any:
    """``wait_for`` for coroutines: poll ``pred`` without blocking the event loop."""
    deadline = time.time() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


def make_certificate(directory: Path, common_name: str) -> tuple[Path, Path]:
    """A self-signed certificate and its key (PEM files) for ``common_name``."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(common_name)]), False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / f"{common_name}.crt", directory / f"{common_name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def read_records(data_dir: Path, kind: str | None = None) -> list[dict]:
    """The log records under ``data_dir`` (each checked against KumoMTA's model)."""
    return Serve.records(types.SimpleNamespace(data=Path(data_dir)), kind)  # type: ignore[arg-type]


def inbound(queue: str, recipient: str = "r@example.com", *, held: bool = False,
            created: float | None = None, protocol: str = "ESMTP") -> Any:
    """A message as reception hands it to the spool, for in-process tests."""
    from sluice.message import parse_queue_name
    from sluice.spool import Inbound, new_message_id

    return Inbound(id=new_message_id(queue), queue=parse_queue_name(queue),
                   sender="s@example.org", recipient=recipient,
                   created=time.time() if created is None else created, protocol=protocol,
                   held=held)


from .load import TERMINAL, Blaster, assert_consistent, terminal_by_id  # noqa: E402
from .peers import Postfix, SlowPeer  # noqa: E402

__all__ = [
    "BIN", "TERMINAL", "Blaster", "InProcess", "Postfix", "Serve", "Sink", "SlowPeer",
    "assert_consistent", "free_port", "inbound", "make_certificate", "read_records",
    "settings_for", "terminal_by_id", "until", "wait_for", "wait_port", "wait_smtp",
]
